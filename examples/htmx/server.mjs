// The HTMX example's backend: a message board whose page is rendered on the server and kept live by
// htmx-ext-sse. The backend renders every change as an HTML fragment and publishes it to Herald (a Mercure
// POST, with the SSE event type naming the slot it goes in); the pages swap the fragments in. No JSON, no
// client-side templates.
//   GET  /            the page, with the newest messages read from Herald's history, and an SSE connection
//                     that resumes right after them (no gap, no duplicate between the render and live)
//   POST /messages    a form post: renders the message and publishes it; answers with what goes in the form's
//                     error line (nothing when it worked, with an HX-Trigger that clears the text box: the
//                     message itself arrives over SSE, on this page as on every other)
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

const HERALD = process.env.HERALD_URL ?? 'http://127.0.0.1:8080';
const JWT_KEY = process.env.HTMX_JWT_KEY ?? 'htmx-example-secret';
const API_KEY = process.env.HTMX_API_KEY ?? 'htmx-example-api-key';
const PORT = Number(process.env.PORT ?? 3002);
const TOPIC = 'board:main';
const SHOWN = 20;

const asset = (path) => readFileSync(new URL(path, import.meta.url));
const ASSETS = {
  '/htmx.min.js': asset('./node_modules/htmx.org/dist/htmx.min.js'),
  '/sse.js': asset('./node_modules/htmx-ext-sse/sse.js'),
};

const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
function jwt(claims) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64(claims);
  return `${head}.${body}.${createHmac('sha256', JWT_KEY).update(`${head}.${body}`).digest('base64url')}`;
}

// Everything a user typed goes through this before it is part of a fragment.
const escape = (s) => String(s).replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]);
const clock = (t) => new Date(t).toISOString().slice(11, 16) + ' UTC';

// --- Fragments ----------------------------------------------------------------------------------------------

const messageFragment = ({ author, text, at }) =>
  `<li class="message"><span class="author">${escape(author)}</span><time datetime="${new Date(at).toISOString()}">${clock(at)}</time><p class="text">${escape(text)}</p></li>`;
const latestFragment = ({ author, at }) => `Latest: <b>${escape(author)}</b> at ${clock(at)}`;

// --- Herald -------------------------------------------------------------------------------------------------

/** Publishes a fragment as a Mercure update: `type` is the SSE event name, i.e. the `sse-swap` slot. */
async function publish(type, html) {
  const token = jwt({ mercure: { publish: [TOPIC] }, exp: Math.floor(Date.now() / 1000) + 60 });
  const res = await fetch(`${HERALD}/.well-known/mercure`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}` },
    body: new URLSearchParams({ topic: TOPIC, type, data: html }),
  });
  if (!res.ok) throw new Error(`Herald refused the publication: ${res.status} ${await res.text()}`);
  return res.text(); // the update's id
}

/** The newest message fragments (newest first) and the position they go up to. */
async function recent() {
  const res = await fetch(`${HERALD}/api/history`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify({ channel: TOPIC, limit: SHOWN * 2, reverse: true }),
  });
  const body = await res.json();
  if (!res.ok || body.error) throw new Error(`Herald's history: ${JSON.stringify(body.error ?? body)}`);
  const { publications, offset, epoch } = body.result;
  // Fragments are stored as they were published; the history holds both kinds, the messages are the <li>s.
  const messages = publications.map((p) => p.data).filter((html) => typeof html === 'string' && html.startsWith('<li')).slice(0, SHOWN);
  const latest = publications.map((p) => p.data).find((html) => typeof html === 'string' && html.startsWith('Latest:'));
  // Herald's id for a publication without one of its own is #<epoch>-<offset>: the stream resumes after it.
  return { messages, latest, lastEventId: `#${epoch}-${offset}` };
}

// --- Pages --------------------------------------------------------------------------------------------------

function page({ messages, latest, lastEventId }) {
  const sse = new URL('/.well-known/mercure', HERALD);
  sse.searchParams.append('topic', TOPIC);
  sse.searchParams.set('lastEventID', lastEventId);
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Board · HTMX on Herald</title>
<link rel="icon" href="data:,">
<script src="/htmx.min.js"></script>
<script src="/sse.js"></script>
<style>
  * { box-sizing: border-box; }
  body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 44rem; padding: 1rem; color: #111827; }
  h1 { font-size: 1.2rem; margin: 0 0 .2rem; }
  #latest, #connection { color: #6b7280; font-size: .9rem; margin: 0; }
  form { display: grid; grid-template-columns: 9rem minmax(0, 1fr) auto; gap: .4rem; margin: 1rem 0 .3rem; }
  input { font: inherit; padding: .45rem .6rem; border: 1px solid #cbd0d8; border-radius: 6px; min-width: 0; }
  button { font: inherit; padding: .45rem .9rem; border: 0; border-radius: 6px; background: #2563eb; color: #fff; cursor: pointer; }
  #form-error { color: #b91c1c; min-height: 1.3em; margin: 0 0 .5rem; font-size: .9rem; }
  ul { list-style: none; margin: 0; padding: 0; }
  .message { border-top: 1px solid #e5e7eb; padding: .55rem 0; animation: arrive .6s ease-out; }
  .author { font-weight: 600; margin-right: .5rem; } time { color: #6b7280; font-size: .8rem; }
  .text { margin: .15rem 0 0; overflow-wrap: anywhere; }
  @keyframes arrive { from { background: #fef9c3; } to { background: transparent; } }
  @media (max-width: 30rem) { form { grid-template-columns: minmax(0, 1fr) auto; } #author { grid-column: 1 / -1; } }
</style>
</head>
<body>
<h1>Board</h1>
<div hx-ext="sse" sse-connect="${escape(sse.href)}">
  <p id="latest" sse-swap="latest">${latest ?? 'No messages yet.'}</p>
  <p id="connection">connecting…</p>
  <form hx-post="/messages" hx-target="#form-error" hx-on:posted="this.text.value = ''">
    <input id="author" name="author" placeholder="your name" maxlength="40" required>
    <input id="text" name="text" placeholder="say something" maxlength="500" autocomplete="off">
    <button>Post</button>
  </form>
  <p id="form-error"></p>
  <ul id="messages" sse-swap="message" hx-swap="afterbegin">${messages.join('')}</ul>
</div>
<script>
  // Keep the stream's position in sse-connect: if the browser gives up on the stream, htmx-ext-sse opens a new
  // one from that URL, which then resumes after the last update received instead of after the first render.
  // And never swap an update twice.
  let lastSeq = Number(/-(\\d+)$/.exec(${JSON.stringify(lastEventId)})[1]);
  document.body.addEventListener('htmx:sseBeforeMessage', (e) => {
    const seq = Number(/-(\\d+)$/.exec(e.detail.lastEventId)?.[1]);
    if (seq <= lastSeq) return e.preventDefault();
    lastSeq = seq;
    const source = document.querySelector('[sse-connect]');
    const url = new URL(source.getAttribute('sse-connect'));
    url.searchParams.set('lastEventID', e.detail.lastEventId);
    source.setAttribute('sse-connect', url.href);
  });
  const connection = document.getElementById('connection');
  document.body.addEventListener('htmx:sseOpen', () => { connection.textContent = 'live'; });
  document.body.addEventListener('htmx:sseError', () => { connection.textContent = 'reconnecting…'; });
</script>
</body>
</html>`;
}

async function form(req) {
  let raw = '';
  for await (const chunk of req) { raw += chunk; if (raw.length > 10000) throw new Error('too large'); }
  return Object.fromEntries(new URLSearchParams(raw));
}

const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, 'http://x').pathname;
  const html = (status, body, headers = {}) => { res.writeHead(status, { 'content-type': 'text/html; charset=utf-8', ...headers }); res.end(body); };
  try {
    if (req.method === 'GET' && path === '/') return html(200, page(await recent()));
    if (req.method === 'GET' && ASSETS[path]) {
      res.writeHead(200, { 'content-type': 'text/javascript' });
      return res.end(ASSETS[path]);
    }
    if (req.method === 'POST' && path === '/messages') {
      // htmx swaps 2xx answers only: problems are said with 200, in the form's error line.
      const { author = '', text = '' } = await form(req);
      if (!author.trim()) return html(200, 'Who are you? Type a name.');
      if (!text.trim()) return html(200, 'Say something first.');
      const message = { author: author.trim().slice(0, 40), text: text.trim().slice(0, 500), at: Date.now() };
      try {
        await publish('message', messageFragment(message));
        await publish('latest', latestFragment(message));
      } catch (e) {
        return html(200, escape(e.message));
      }
      return html(200, '', { 'hx-trigger': 'posted' });
    }
    html(404, 'not found');
  } catch (e) {
    html(502, escape(e.message));
  }
});
server.listen(PORT, '127.0.0.1', () => console.log(`htmx example on http://127.0.0.1:${server.address().port}`));
