// The Herald console: views chosen by the URL hash, fed by the console API (api.js). Live numbers come from
// the server's stats stream (one snapshot a second), kept here so charts have their history whichever view
// is open.

import * as api from './api.js';
import { LineChart, formatNumber } from './chart.js';

/** `1 client`, `2 clients`. */
const plural = (n, word) => `${n} ${word}${n === 1 ? '' : 's'}`;

const WINDOW_S = 120;

/** Builds an element: h('div', {class: 'x', onclick: f}, child, 'text', …). Text is never parsed as HTML. */
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs ?? {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'class') el.className = v;
    else if (v === true) el.setAttribute(k, '');
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  return el;
}

const $ = (sel) => document.querySelector(sel);
const view = () => $('#view');

function banner(text, kind = 'error') {
  const b = $('#banner');
  if (!text) { b.hidden = true; return; }
  b.className = `banner ${kind}`;
  b.replaceChildren(h('span', {}, text), h('button', { class: 'link', onclick: () => { b.hidden = true; } }, 'dismiss'));
  b.hidden = false;
}

function errorText(e) {
  return e instanceof api.ApiError ? `${e.message} (${e.code})` : String(e?.message ?? e);
}

function duration(s) {
  s = Math.max(0, Math.floor(s));
  const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  if (d) return `${d}d ${hh}h`;
  if (hh) return `${hh}h ${m}m`;
  if (m) return `${m}m ${s % 60}s`;
  return `${s}s`;
}

const time = (ms) => new Date(ms).toLocaleTimeString();
const datetime = (ms) => new Date(ms).toLocaleString();

// ---- live stats, shared by the views ----

const live = {
  snap: null,
  points: [], // {t, values: [sse, ws, pubs/s, deliveries/s]}
  listeners: new Set(),
  stream: null,
};

function startStats() {
  live.stream?.close();
  live.stream = api.stream('/console/api/stats/stream', {}, (snap) => {
    live.snap = snap;
    const r = snap.rates ?? { publications: 0, deliveries: 0 };
    live.points.push({ t: snap.time_ms, values: [snap.hub.sse_connections, snap.hub.websocket_connections, r.publications, r.deliveries] });
    while (live.points.length > WINDOW_S + 5) live.points.shift();
    $('#live-text').textContent = plural(snap.hub.connections, 'connection');
    for (const f of live.listeners) f(snap);
  }, (state, err) => {
    $('#live-dot').className = `dot ${state}`;
    if (state === 'retrying') $('#live-text').textContent = 'reconnecting…';
    if (state === 'closed' && err) { $('#live-text').textContent = 'stopped'; banner(errorText(err)); }
  });
}

// ---- views ----

function card(id, label, hint) {
  return h('div', { class: 'card' }, h('div', { class: 'label' }, label), h('div', { class: 'value', id }, '–'), hint ? h('div', { class: 'hint muted', id: `${id}-hint` }, hint) : null);
}

function overview() {
  const cards = h('section', { class: 'cards' },
    card('stat-sse', 'SSE connections'),
    card('stat-ws', 'WebSocket connections', ' '),
    card('stat-channels', 'Channels', ' '),
    card('stat-pubrate', 'Publishes / s', ' '),
    card('stat-delrate', 'Deliveries / s', ' '),
    card('stat-slow', 'Slow consumers cut', ' '),
  );
  const connCanvas = h('canvas', { id: 'chart-conn', 'aria-label': 'connections by transport' });
  const rateCanvas = h('canvas', { id: 'chart-rate', 'aria-label': 'publishes and deliveries per second' });
  const engine = h('dl', { class: 'facts', id: 'engine' });
  view().replaceChildren(
    h('h1', {}, 'Overview'),
    cards,
    h('section', { class: 'charts' },
      h('div', { class: 'panel' }, h('h2', {}, 'Connections'), connCanvas),
      h('div', { class: 'panel' }, h('h2', {}, 'Throughput'), rateCanvas)),
    h('section', { class: 'panel' }, h('h2', {}, 'Server'), engine),
  );
  const conn = new LineChart(connCanvas, { series: ['SSE', 'WebSocket'], windowS: WINDOW_S, integer: true });
  const rate = new LineChart(rateCanvas, { series: ['publishes/s', 'deliveries/s'], windowS: WINDOW_S, unit: '' });
  conn.load(live.points.map((p) => ({ t: p.t, values: p.values.slice(0, 2) })));
  rate.load(live.points.map((p) => ({ t: p.t, values: p.values.slice(2) })));

  const set = (id, v, hint) => {
    const el = document.getElementById(id);
    if (el) el.textContent = v;
    const hel = document.getElementById(`${id}-hint`);
    if (hel && hint !== undefined) hel.textContent = hint;
  };
  const render = (s) => {
    const r = s.rates;
    set('stat-sse', formatNumber(s.hub.sse_connections));
    set('stat-ws', formatNumber(s.hub.websocket_connections), `${plural(s.websocket.clients, 'client')}, ${plural(s.websocket.users, 'user')}`);
    set('stat-channels', formatNumber(s.hub.channels), plural(s.hub.subscriptions, 'subscription'));
    set('stat-pubrate', r ? formatNumber(r.publications) : '–', `${formatNumber(s.hub.publications)} since start`);
    set('stat-delrate', r ? formatNumber(r.deliveries) : '–', `${formatNumber(s.hub.deliveries)} since start`);
    set('stat-slow', formatNumber(s.hub.disconnects.slow_consumer ?? 0),
      `token expired ${s.hub.disconnects.token_expired ?? 0}, by the server ${s.hub.disconnects.server ?? 0}`);
    const e = s.engine;
    engine.replaceChildren(
      h('dt', {}, 'Storage'), h('dd', { id: 'engine-state', class: e.ready ? 'ok' : 'bad' }, e.ready ? 'ready' : `not ready: ${e.error}`),
      h('dt', {}, 'Engine'), h('dd', {}, `${e.kind}${e.durable ? ', durable (fsync per commit)' : ''}`),
      h('dt', {}, 'History'), h('dd', { class: 'wrap' }, e.history),
      h('dt', {}, 'Last position'), h('dd', {}, String(s.hub.last_seq)),
      h('dt', {}, 'Version'), h('dd', { id: 'version' }, s.version),
      h('dt', {}, 'Uptime'), h('dd', { id: 'uptime' }, duration(s.hub.uptime_ms / 1000)),
      h('dt', {}, 'JWT key'), h('dd', { class: s.dev_key ? 'warn' : '' }, s.dev_key ? 'the public development key (fine on a laptop, never in production)' : 'configured'),
    );
    const p = live.points[live.points.length - 1];
    if (p) {
      conn.push(p.t, p.values.slice(0, 2));
      rate.push(p.t, p.values.slice(2));
    }
  };
  if (live.snap) render(live.snap);
  live.listeners.add(render);
  return () => { live.listeners.delete(render); conn.dispose(); rate.dispose(); };
}

function channels() {
  const filter = h('input', { id: 'channel-filter', type: 'search', placeholder: 'filter by name', 'aria-label': 'filter channels' });
  const body = h('tbody', {});
  const summary = h('p', { class: 'muted', id: 'channels-summary' });
  const open = h('form', { class: 'inline', id: 'open-channel' },
    h('input', { name: 'channel', placeholder: 'any channel or topic, e.g. chat:lobby', 'aria-label': 'channel', required: true }),
    h('button', {}, 'Open'));
  open.addEventListener('submit', (e) => {
    e.preventDefault();
    location.hash = `#/channel/${encodeURIComponent(new FormData(open).get('channel').trim())}`;
  });
  view().replaceChildren(
    h('h1', {}, 'Channels'),
    h('div', { class: 'toolbar' }, filter, open),
    summary,
    h('div', { class: 'table-wrap' }, h('table', { id: 'channels-table' },
      h('thead', {}, h('tr', {}, h('th', {}, 'Channel'), h('th', { class: 'num' }, 'Subscribers'), h('th', { class: 'num' }, 'Present'))),
      body)),
    h('p', { class: 'muted' }, 'Listed: channels with at least one subscriber on this node (wildcard subscriptions are not counted per channel). Open any channel to see its history, tail it or publish.'),
  );
  let timer;
  const load = async () => {
    try {
      const r = await api.get('/console/api/channels', { filter: filter.value });
      body.replaceChildren(...r.channels.map((c) => h('tr', {},
        h('td', { class: 'wrap' }, h('a', { href: `#/channel/${encodeURIComponent(c.name)}` }, c.name)),
        h('td', { class: 'num' }, c.subscribers),
        h('td', { class: 'num' }, c.presence ?? '–'))));
      if (!r.channels.length) body.replaceChildren(h('tr', {}, h('td', { colspan: 3, class: 'muted' }, filter.value ? 'no channel matches' : 'no channel has subscribers yet')));
      summary.textContent = `${r.matching} of ${r.total} channels${r.matching > r.channels.length ? `, first ${r.channels.length} shown` : ''}`;
    } catch (e) { banner(errorText(e)); }
  };
  filter.addEventListener('input', () => { clearTimeout(timer); timer = setTimeout(load, 200); });
  load();
  const every = setInterval(load, 3000);
  return () => { clearInterval(every); clearTimeout(timer); };
}

function pubRow(p, channel) {
  const data = p.encoding === 'base64' ? `(binary, base64) ${p.data}` : p.data;
  return h('li', { class: 'pub' },
    h('div', { class: 'meta' },
      h('span', { class: 'seq' }, p.seq ? `#${p.seq}` : 'live only'),
      h('span', {}, time(p.time_ms)),
      p.private ? h('span', { class: 'tag private' }, 'private') : null,
      p.type ? h('span', { class: 'tag' }, `type ${p.type}`) : null,
      p.topics.length > 1 || p.topics[0] !== channel ? h('span', { class: 'muted wrap' }, p.topics.join(', ')) : null,
      h('span', { class: 'muted wrap', title: 'id' }, p.id)),
    h('pre', { class: 'data' }, data));
}

function channel(name) {
  const tailList = h('ol', { id: 'tail-list', class: 'pubs' });
  const tailState = h('span', { class: 'muted', id: 'tail-state' }, 'stopped');
  const tailToggle = h('button', { id: 'tail-toggle' }, 'Start tail');
  const histList = h('ol', { id: 'history-list', class: 'pubs' });
  const older = h('button', { id: 'history-older' }, 'Older');
  const newest = h('button', { id: 'history-newest', title: 'the newest page, reloaded' }, 'Newest');
  const histInfo = h('span', { class: 'muted', id: 'history-info' });
  const presence = h('ul', { id: 'presence-list', class: 'plain' });

  const form = h('form', { id: 'publish-form', class: 'stack' },
    h('label', {}, 'Topic', h('input', { id: 'pub-topic', name: 'topic', value: name, required: true })),
    h('label', {}, 'Data', h('textarea', { id: 'pub-data', name: 'data', rows: 4, placeholder: '{"hello": "world"} or any text' })),
    h('div', { class: 'row' },
      h('label', {}, 'Format ', h('select', { id: 'pub-format', name: 'format' }, h('option', { value: 'text' }, 'text'), h('option', { value: 'json' }, 'JSON'))),
      h('label', { class: 'check' }, h('input', { id: 'pub-private', name: 'private', type: 'checkbox' }), ' private'),
      h('button', { id: 'pub-send' }, 'Publish')),
    h('p', { id: 'pub-result', class: 'muted', 'aria-live': 'polite' }));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    const result = $('#pub-result');
    try {
      const r = await api.post('/console/api/publish', { topic: f.get('topic'), data: f.get('data'), format: f.get('format'), private: f.get('private') === 'on' });
      result.textContent = `published ${r.id} at ${time(Date.now())}`;
      result.className = 'ok';
      if (f.get('topic') === name && !before) loadHistory(null);
    } catch (err) { result.textContent = errorText(err); result.className = 'bad'; }
  });

  const disc = h('form', { id: 'channel-disconnect', class: 'inline' },
    h('input', { name: 'user', placeholder: 'user', 'aria-label': 'user to disconnect', required: true }),
    h('button', {}, 'Disconnect user'));
  disc.addEventListener('submit', (e) => { e.preventDefault(); disconnectUser(new FormData(disc).get('user')); });

  view().replaceChildren(
    h('p', { class: 'crumbs' }, h('a', { href: '#/channels' }, 'Channels'), ' / '),
    h('h1', { class: 'wrap', id: 'channel-name' }, name),
    h('section', { class: 'grid2' },
      h('div', { class: 'panel' },
        h('h2', {}, 'Live tail'),
        h('p', { class: 'muted small' }, 'Everything published to this channel as it happens, private updates included (the console reads as the admin).'),
        h('div', { class: 'toolbar' }, tailToggle, h('button', { onclick: () => tailList.replaceChildren() }, 'Clear'), tailState),
        tailList),
      h('div', { class: 'panel' },
        h('h2', {}, 'Publish'),
        form)),
    h('section', { class: 'grid2' },
      h('div', { class: 'panel' }, h('h2', {}, 'Presence'), presence),
      h('div', { class: 'panel' }, h('h2', {}, 'Disconnect'), h('p', { class: 'muted small' }, 'Ends every WebSocket connection of a user (Centrifugo disconnect, code 3503).'), disc)),
    h('section', { class: 'panel' },
      h('h2', {}, 'History'),
      h('div', { class: 'toolbar' }, newest, older, histInfo),
      histList),
  );

  let tail = null;
  const stopTail = () => { tail?.close(); tail = null; tailToggle.textContent = 'Start tail'; tailState.textContent = 'stopped'; };
  const startTail = () => {
    tail = api.stream('/console/api/tail', { topic: name }, (p) => {
      tailList.prepend(pubRow(p, name));
      while (tailList.children.length > 200) tailList.lastChild.remove();
    }, (state, err) => {
      tailState.textContent = state === 'open' ? 'live' : state;
      if (state === 'closed') { if (err) banner(errorText(err)); stopTail(); }
    });
    tailToggle.textContent = 'Stop tail';
    tailState.textContent = 'connecting…';
  };
  tailToggle.addEventListener('click', () => (tail ? stopTail() : startTail()));
  startTail();

  let before = null; // null: the newest page
  const pages = [];
  async function loadHistory(b) {
    try {
      const r = await api.get('/console/api/history', { channel: name, before: b ?? undefined, limit: 20 });
      before = b;
      histList.replaceChildren(...r.publications.map((p) => pubRow(p, name)));
      if (!r.publications.length) histList.replaceChildren(h('li', { class: 'muted' }, b ? 'no older publications' : 'no history for this channel'));
      older.disabled = !r.older;
      older.dataset.before = r.older ?? '';
      const first = r.publications[0]?.seq, last = r.publications[r.publications.length - 1]?.seq;
      histInfo.textContent = r.publications.length ? `page ${pages.length + 1}: #${first} … #${last}` : '';
    } catch (e) { banner(errorText(e)); }
  }
  older.addEventListener('click', () => { pages.push(before); loadHistory(Number(older.dataset.before)); });
  newest.addEventListener('click', () => { pages.length = 0; loadHistory(null); });
  loadHistory(null);

  const loadPresence = async () => {
    try {
      const r = await api.get('/console/api/presence', { channel: name });
      presence.replaceChildren(...r.presence.map((c) => h('li', {}, h('strong', {}, c.user || '(anonymous)'), ' ', h('span', { class: 'muted' }, c.client))));
      if (!r.presence.length) presence.replaceChildren(h('li', { class: 'muted' }, 'nobody (presence is kept for WebSocket subscribers)'));
    } catch (e) { presence.replaceChildren(h('li', { class: 'muted' }, errorText(e))); }
  };
  loadPresence();
  const every = setInterval(loadPresence, 5000);
  return () => { stopTail(); clearInterval(every); };
}

async function disconnectUser(user, client) {
  if (!user && user !== '') return;
  try {
    const r = await api.post('/console/api/disconnect', { user, client });
    banner(`disconnect sent to ${user || '(anonymous)'}${client ? ` / ${client}` : ''} (${r.connected_here} connection(s) on this node)`, 'info');
  } catch (e) { banner(errorText(e)); }
}

function connections() {
  const ws = h('tbody', {});
  const sse = h('tbody', {});
  const wsInfo = h('p', { class: 'muted', id: 'ws-info' });
  const sseInfo = h('p', { class: 'muted', id: 'sse-info' });
  view().replaceChildren(
    h('h1', {}, 'Connections'),
    h('section', { class: 'panel' },
      h('h2', {}, 'WebSocket clients'), wsInfo,
      h('div', { class: 'table-wrap' }, h('table', { id: 'ws-table', class: 'cards-sm' },
        h('thead', {}, h('tr', {}, ...['User', 'Client', 'Remote', 'Channels', 'Age', ''].map((t) => h('th', {}, t)))), ws))),
    h('section', { class: 'panel' },
      h('h2', {}, 'SSE subscribers'), sseInfo,
      h('div', { class: 'table-wrap' }, h('table', { id: 'sse-table', class: 'cards-sm' },
        h('thead', {}, h('tr', {}, ...['Subscriber', 'Topics', 'Remote', 'Age', ''].map((t) => h('th', {}, t)))), sse))),
  );
  const load = async () => {
    try {
      const r = await api.get('/console/api/connections');
      ws.replaceChildren(...r.websocket.map((c) => h('tr', {},
        h('td', { class: 'wrap', 'data-label': 'User' }, c.user || h('span', { class: 'muted' }, '(anonymous)')),
        h('td', { class: 'mono small', 'data-label': 'Client' }, c.client),
        h('td', { class: 'mono small', 'data-label': 'Remote' }, c.remote ?? '–'),
        h('td', { class: 'wrap', 'data-label': 'Channels' }, ...c.channels.map((ch, i) => [i ? ', ' : '', h('a', { href: `#/channel/${encodeURIComponent(ch)}` }, ch)])),
        h('td', { class: 'num', 'data-label': 'Age' }, duration(c.age_s)),
        h('td', { class: 'action' }, h('button', { class: 'small', onclick: () => disconnectUser(c.user, c.client).then(load) }, 'Disconnect')))));
      if (!r.websocket.length) ws.replaceChildren(h('tr', {}, h('td', { colspan: 6, class: 'muted' }, 'none')));
      wsInfo.textContent = `${r.websocket_total} connected${r.websocket_pending ? `, ${r.websocket_pending} not yet past connect` : ''}`;
      sse.replaceChildren(...r.sse.map((c) => h('tr', {},
        h('td', { class: 'mono small wrap', 'data-label': 'Subscriber' }, c.subscriber),
        h('td', { class: 'wrap', 'data-label': 'Topics' }, c.topics.join(', ')),
        h('td', { class: 'mono small', 'data-label': 'Remote' }, c.remote ?? '–'),
        h('td', { class: 'num', 'data-label': 'Age' }, duration(c.age_s)),
        h('td', { class: 'action' }, h('button', { class: 'small', onclick: async () => {
          try { await api.post('/console/api/disconnect', { subscription: c.subscription }); load(); } catch (e) { banner(errorText(e)); }
        } }, 'Disconnect')))));
      if (!r.sse.length) sse.replaceChildren(h('tr', {}, h('td', { colspan: 5, class: 'muted' }, 'none')));
      sseInfo.textContent = `${r.sse_total} streams`;
    } catch (e) { banner(errorText(e)); }
  };
  load();
  const every = setInterval(load, 3000);
  return () => clearInterval(every);
}

function tools(session) {
  const out = h('div', { id: 'token-out', class: 'medium' });
  const list = (v) => v.split(/[\n,]/).map((s) => s.trim()).filter(Boolean);
  const form = h('form', { id: 'token-form', class: 'stack medium' },
    h('label', {}, 'sub (user)', h('input', { name: 'sub', placeholder: 'alice' })),
    h('label', {}, 'mercure.subscribe (selectors, comma separated)', h('input', { name: 'subscribe', placeholder: 'https://example.com/books/{id}' })),
    h('label', {}, 'mercure.publish (selectors)', h('input', { name: 'publish', placeholder: '*' })),
    h('label', {}, 'channels (WebSocket, subscribed at connect)', h('input', { name: 'channels', placeholder: 'chat:lobby' })),
    h('label', {}, 'info (JSON, shown in presence)', h('input', { name: 'info', placeholder: '{"name": "Alice"}' })),
    h('label', {}, 'ttl', h('input', { name: 'ttl', value: '1h' })),
    h('div', { class: 'row' }, h('button', {}, 'Mint token')));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    const f = new FormData(form);
    let info;
    try { info = f.get('info').trim() ? JSON.parse(f.get('info')) : undefined; } catch (err) { out.replaceChildren(h('p', { class: 'bad' }, `info is not JSON: ${err.message}`)); return; }
    try {
      const r = await api.post('/console/api/token', {
        sub: f.get('sub'), subscribe: list(f.get('subscribe')), publish: list(f.get('publish')),
        channels: list(f.get('channels')), info, ttl: f.get('ttl'),
      });
      out.replaceChildren(
        h('label', {}, 'Token', h('textarea', { id: 'token-value', rows: 4, readonly: true }, r.token)),
        h('pre', { class: 'data tall' }, JSON.stringify(r.claims, null, 2)));
    } catch (err) { out.replaceChildren(h('p', { class: 'bad', id: 'token-error' }, errorText(err))); }
  });
  view().replaceChildren(
    h('h1', {}, 'Dev tools'),
    h('section', { class: 'panel' },
      h('h2', {}, 'Mint a token'),
      session.dev_key
        ? h('p', { class: 'muted small' }, 'Signed with the public development key this server uses: for trying things out only.')
        : h('p', { class: 'warn', id: 'dev-key-note' }, 'This server has a JWT key of its own, so the console mints no tokens: mint them where the key is kept (your backend, or herald token with the server\'s config).'),
      form, out),
  );
  return () => {};
}

function login(message) {
  const form = h('form', { id: 'login-form', class: 'stack narrow' },
    h('label', {}, 'Console password', h('input', { id: 'login-password', name: 'password', type: 'password', autocomplete: 'current-password', required: true })),
    h('button', {}, 'Log in'),
    h('p', { id: 'login-error', class: message ? 'bad' : 'muted' }, message ?? 'The password is console.password in the server\'s configuration.'));
  form.addEventListener('submit', async (e) => {
    e.preventDefault();
    try {
      const r = await api.post('/console/api/login', { password: new FormData(form).get('password') });
      api.token.set(r.token);
      boot();
    } catch (err) { $('#login-error').textContent = errorText(err); $('#login-error').className = 'bad'; }
  });
  $('#nav').hidden = true;
  $('#logout').hidden = true;
  $('#live-dot').className = 'dot';
  $('#live-text').textContent = 'not logged in';
  view().replaceChildren(h('h1', {}, 'Log in'), form);
  form.querySelector('input').focus();
}

// ---- routing ----

let session = null;
let cleanup = () => {};

function route() {
  cleanup();
  cleanup = () => {};
  const hash = location.hash || '#/overview';
  const [, name, arg] = /^#\/([a-z]+)\/?(.*)$/.exec(hash) ?? [null, 'overview', ''];
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.id === `nav-${name === 'channel' ? 'channels' : name}`);
  const views = { overview, channels, connections, tools: () => tools(session), channel: () => channel(decodeURIComponent(arg)) };
  cleanup = (views[name] ?? overview)() ?? (() => {});
  document.title = `Herald console · ${name}`;
}

async function boot() {
  banner(null);
  try {
    session = await api.get('/console/api/session');
  } catch (e) {
    $('#nav').hidden = true;
    $('#live-text').textContent = 'unavailable';
    view().replaceChildren(h('h1', {}, 'Console unavailable'), h('p', { class: 'bad', id: 'unavailable' }, errorText(e)));
    return;
  }
  if (session.login_required && !session.authenticated) {
    api.token.set(null);
    login();
    return;
  }
  $('#nav').hidden = false;
  $('#logout').hidden = !session.login_required;
  startStats();
  route();
}

api.whenUnauthorized((err) => {
  live.stream?.close();
  cleanup();
  api.token.set(null);
  login(errorText(err));
});

$('#logout').addEventListener('click', () => {
  api.token.set(null);
  live.stream?.close();
  cleanup();
  login('Logged out.');
});
window.addEventListener('hashchange', () => { if (session && (!session.login_required || api.token.get())) route(); });
boot();
