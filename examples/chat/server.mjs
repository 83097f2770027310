// The chat example's app backend. A real application would authenticate users; this one trusts the name it
// is given. It does what a backend does for Herald:
//   GET  /token?user=NAME      -> a connection JWT for that user (signed with Herald's key)
//   POST /dm {from,to,text}    -> a private message, published through Herald's server API into both users'
//                                 personal channels (personal:#<user>), which only they can subscribe to
//   GET  /config               -> where Herald is, and what is wrong with it for this app (checked on each
//                                 page load), so the page can say so instead of retrying forever
// and serves the page and the centrifuge browser bundle from node_modules.
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import { createRequire } from 'node:module';
import path from 'node:path';

const HERALD = process.env.HERALD_URL ?? 'http://127.0.0.1:8080';
const JWT_KEY = process.env.CHAT_JWT_KEY ?? 'chat-example-secret';
const API_KEY = process.env.CHAT_API_KEY ?? 'chat-example-api-key';
const PORT = Number(process.env.PORT ?? 3000);
const CONFIG_HINT = 'examples/chat/herald.toml has what this app needs: cargo run -- serve --config examples/chat/herald.toml';

const require = createRequire(import.meta.url);
// The browser build ships in the package's dist/ folder (not an exported subpath, so resolve the package root).
const pkgRoot = path.resolve(path.dirname(require.resolve('centrifuge')), '..'); // build/index.js -> package root
const bundle = readFileSync(path.join(pkgRoot, 'dist', 'centrifuge.js'));
const page = readFileSync(new URL('./index.html', import.meta.url));

const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
function jwt(claims) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64(claims);
  return `${head}.${body}.${createHmac('sha256', JWT_KEY).update(`${head}.${body}`).digest('base64url')}`;
}

const NAME_RULE = '1-32 letters, digits, _ or -';
const validName = (s) => typeof s === 'string' && /^[a-z0-9_-]{1,32}$/i.test(s);

/** Calls Herald's server API; throws with Herald's own error message. */
async function api(method, body) {
  const res = await fetch(`${HERALD}/api/${method}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  if (!res.ok) throw new Error(`${json.message ?? res.statusText} (${json.code ?? res.status})`);
  if (json.error) throw new Error(`${json.error.message} (${json.error.code})`);
  return json.result;
}

/** The status of a WebSocket upgrade request sent with the page's Origin (101: Herald accepts that origin). */
function upgradeStatus(origin) {
  return new Promise((resolve, reject) => {
    const req = http.request(`${HERALD}/connection/websocket`, {
      headers: {
        connection: 'Upgrade', upgrade: 'websocket', origin,
        'sec-websocket-version': '13', 'sec-websocket-key': Buffer.from('herald-chat-check').toString('base64'),
      },
      timeout: 2000,
    });
    req.on('upgrade', (res, socket) => { socket.destroy(); resolve(101); });
    req.on('response', (res) => { res.resume(); resolve(res.statusCode); });
    req.on('timeout', () => req.destroy(new Error('timed out')));
    req.on('error', reject);
    req.end();
  });
}

/** Does Herald accept this app's tokens? A Mercure subscription with one says it (closed at once). */
async function tokenAccepted() {
  const ctl = new AbortController();
  const token = jwt({ sub: 'config-check', exp: Math.floor(Date.now() / 1000) + 60 });
  // A URL topic is in no namespace, so only the token is judged (an empty topic list would be a 400).
  const res = await fetch(`${HERALD}/.well-known/mercure?topic=https://chat.example/config-check`, {
    headers: { authorization: `Bearer ${token}` }, signal: ctl.signal,
  });
  if (res.status !== 401) { ctl.abort(); return null; }
  const body = await res.json().catch(() => ({}));
  return body.code ?? String(res.status);
}

/** What keeps this app from working with the Herald at HERALD_URL, in words for the page. */
async function problems(pageOrigin) {
  try {
    await fetch(`${HERALD}/healthz`, { signal: AbortSignal.timeout(2000) });
  } catch {
    return [`Herald is not reachable at ${HERALD}: is it running?`, CONFIG_HINT];
  }
  // In a fixed order: whether the page can connect, then whether its tokens work, then the server API.
  const checks = [
    upgradeStatus(pageOrigin).then((status) => {
      if (status === 403) return `Herald refuses WebSocket connections from this page's origin (${pageOrigin}): add it to cors.allowed_origins.`;
      if (status !== 101) return `Herald answered ${status} to a WebSocket upgrade at ${HERALD}/connection/websocket.`;
    }),
    tokenAccepted().then((code) => {
      if (code) return `Herald does not accept this app's tokens (${code}): its auth.jwt_key must be the key server.mjs signs with (CHAT_JWT_KEY).`;
    }),
    api('info', {}).then(() => null, (e) => `Private messages cannot be sent: Herald's server API says "${e.message}"; its centrifugo.api_key must be CHAT_API_KEY.`),
  ];
  const found = (await Promise.all(checks.map((c) => c.catch((e) => `checking Herald failed: ${e.message}`)))).filter(Boolean);
  if (found.length) found.push(CONFIG_HINT);
  return found;
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const send = (status, type, body) => { res.writeHead(status, { 'content-type': type }); res.end(body); };
  const sendJson = (status, value) => send(status, 'application/json', JSON.stringify(value));
  try {
    if (req.method === 'GET' && url.pathname === '/') return send(200, 'text/html; charset=utf-8', page);
    if (req.method === 'GET' && url.pathname === '/centrifuge.js') return send(200, 'text/javascript', bundle);
    if (req.method === 'GET' && url.pathname === '/config') {
      const ws = HERALD.replace(/^http/, 'ws') + '/connection/websocket';
      return sendJson(200, { ws, herald: HERALD, problems: await problems(`http://${req.headers.host}`) });
    }
    if (req.method === 'GET' && url.pathname === '/token') {
      const user = url.searchParams.get('user');
      if (!validName(user)) return sendJson(400, { error: `a name is ${NAME_RULE}` });
      const token = jwt({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600, info: { name: user } });
      return sendJson(200, { token });
    }
    if (req.method === 'POST' && url.pathname === '/dm') {
      let raw = '';
      for await (const chunk of req) { raw += chunk; if (raw.length > 10000) throw new Error('too large'); }
      const { from, to, text } = JSON.parse(raw);
      if (!validName(from)) return sendJson(400, { error: `join first (a name is ${NAME_RULE})` });
      if (!validName(to)) return sendJson(400, { error: `"${String(to ?? '')}" is not a valid name: a name is ${NAME_RULE}` });
      if (typeof text !== 'string' || !text.trim()) return sendJson(400, { error: 'the message is empty' });
      const msg = { from, to, text, at: Date.now() };
      await api('publish', { channel: `personal:#${to}`, data: msg });
      if (to !== from) await api('publish', { channel: `personal:#${from}`, data: msg });
      return sendJson(200, {});
    }
    sendJson(404, { error: 'not found' });
  } catch (e) {
    sendJson(502, { error: `Herald: ${e.message ?? e}` });
  }
});
server.listen(PORT, '127.0.0.1', () => console.log(`chat example on http://127.0.0.1:${server.address().port}`));
