// The dashboard page: one EventSource on the host's Mercure topic, opened from the start of Herald's history
// (`lastEventID=earliest`: the retained figures fill the charts at once, on a reload too), then live. When the
// connection drops the browser reconnects with `Last-Event-ID` and Herald replays what was published
// meanwhile; if the browser gives up (the EventSource is closed), the page opens a new one from the last id it
// saw. Every figure carries the publisher's sequence number, so the page can show that nothing is missing.
import { LineChart } from './chart.js';

const $ = (id) => document.getElementById(id);
const KEEP = 600; // figures kept: ten minutes at one a second

const config = await (await fetch('/config')).json();
$('host').textContent = config.host;

const pct = (v) => `${Math.round(v)}%`;
function bytes(v) {
  for (const [unit, size] of [['GB', 1e9], ['MB', 1e6], ['kB', 1e3]]) {
    if (v >= size) return `${(v / size).toFixed(v < 10 * size ? 1 : 0)} ${unit}`;
  }
  return `${Math.round(v)} B`;
}
// The charts span 60 to 300 figures (one to five minutes at one a second); a line breaks where five are missing.
const times = { minWindow: config.interval * 60, window: config.interval * 300, gapAfter: config.interval * 5 };
const charts = {
  cpu: new LineChart($('cpu'), { series: [{ label: 'busy', color: '#2563eb' }], max: 100, format: pct, ...times }),
  mem: new LineChart($('mem'), { series: [{ label: 'used', color: '#7c3aed' }], max: 100, format: pct, ...times }),
  net: new LineChart($('net'), { series: [{ label: 'in', color: '#2563eb' }, { label: 'out', color: '#db2777' }], format: (v) => `${bytes(v)}/s`, ...times }),
  load: new LineChart($('load'), { series: [{ label: '1 min', color: '#059669' }], format: (v) => v.toFixed(2), ...times }),
};

// What the page has: figures in publisher order, the last SSE id, and how many numbers were missing.
const state = { figures: [], lastId: null, gaps: 0, duplicates: 0, backfilled: 0, reconnects: 0 };
window.dashboard = state; // for the console (and the test)
const bands = [];
let minLag = Infinity, resuming = false;

function add(f, receivedAt) {
  const last = state.figures.at(-1);
  if (last && f.seq <= last.seq) { state.duplicates++; return; } // already here (a retried publish)
  if (last && f.seq !== last.seq + 1) state.gaps += f.seq - last.seq - 1;
  // Late figures after a drop came from history: mark their time range. "Late" is measured against the
  // smallest delay seen, so the publisher's and this browser's clocks need not agree.
  const lag = receivedAt - f.t;
  minLag = Math.min(minLag, lag);
  if (resuming) {
    if (lag - minLag > config.interval * 1.5) {
      state.backfilled++;
      const band = bands.at(-1);
      if (band && band.open) band.to = f.t; else bands.push({ from: last ? last.t : f.t, to: f.t, open: true });
    } else {
      resuming = false;
      if (bands.at(-1)?.open) { bands.at(-1).open = false; bands.at(-1).to = f.t; }
    }
  }
  state.figures.push(f);
  if (state.figures.length > KEEP) state.figures.shift();
}

let pending = false;
function render() {
  if (pending) return;
  pending = true;
  requestAnimationFrame(() => {
    pending = false;
    const figs = state.figures, last = figs.at(-1);
    const at = (fn) => figs.map((f) => ({ t: f.t, values: fn(f) }));
    charts.cpu.set(at((f) => [f.cpu]), bands);
    charts.mem.set(at((f) => [(100 * f.mem.used) / f.mem.total]), bands);
    charts.net.set(at((f) => [f.net.rx, f.net.tx]), bands);
    charts.load.set(at((f) => [f.load[0]]), bands);
    if (!last) return;
    $('cores').textContent = `1 min · ${last.cores} cores`;
    $('cpu-now').textContent = pct(last.cpu);
    $('mem-now').textContent = `${bytes(last.mem.used)} of ${bytes(last.mem.total)}`;
    $('net-now').textContent = `↓ ${bytes(last.net.rx)}/s ↑ ${bytes(last.net.tx)}/s`;
    $('load-now').textContent = last.load[0].toFixed(2);
    $('stats').textContent = `${figs.length} figures, #${figs[0].seq} to #${last.seq} · missing: ${state.gaps}` +
      (state.reconnects ? ` · reconnected ${state.reconnects}× · ${state.backfilled} back-filled from history` : '');
  });
}

function status(text, cls) { $('status').textContent = text; $('status').className = cls; }

let source = null, retry = 1000, dropped = false;
function connect(from) {
  const url = new URL('/.well-known/mercure', config.herald);
  url.searchParams.append('topic', config.topic);
  url.searchParams.set('lastEventID', from);
  const es = new EventSource(url);
  source = es;
  es.onopen = () => {
    retry = 1000;
    if (dropped) { dropped = false; state.reconnects++; }
    status('live', 'live');
    $('notice').hidden = true;
  };
  es.onmessage = (e) => {
    state.lastId = e.lastEventId;
    add(JSON.parse(e.data), Date.now());
    render();
  };
  es.onerror = () => {
    if (es !== source) return;
    if (!dropped) { dropped = true; resuming = true; }
    status('reconnecting…', 'down');
    // While CONNECTING the browser retries by itself, with Last-Event-ID. CLOSED means it gave up (Herald
    // answered with an error, or the browser stopped retrying): open a new stream from the last id seen.
    if (es.readyState === EventSource.CLOSED) {
      $('notice').hidden = false;
      $('notice').textContent = `Cannot subscribe to ${config.topic} on ${config.herald}: is Herald running with examples/dashboard/herald.toml (this page's origin allowed, anonymous subscribers)? Retrying.`;
      setTimeout(() => connect(state.lastId ?? 'earliest'), retry);
      retry = Math.min(retry * 2, 15000);
    }
  };
}

// Herald answers `earliest` with every retained figure, then goes live.
connect('earliest');
