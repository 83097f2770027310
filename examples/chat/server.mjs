// The chat example's app backend. A real application would authenticate users; this one trusts the name it
// is given. It does what a backend does for Herald:
//   GET  /token?user=NAME      -> a connection JWT for that user (signed with Herald's key)
//   POST /dm {from,to,text}    -> a private message, published through Herald's server API into both users'
//                                 personal channels (personal:#<user>), which only they can subscribe to
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

const validName = (s) => typeof s === 'string' && /^[a-z0-9_-]{1,32}$/i.test(s);

async function publish(channel, data) {
  const res = await fetch(`${HERALD}/api/publish`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify({ channel, data }),
  });
  const body = await res.json();
  if (!res.ok || body.error) throw new Error(JSON.stringify(body));
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, 'http://x');
  const send = (status, type, body) => { res.writeHead(status, { 'content-type': type }); res.end(body); };
  try {
    if (req.method === 'GET' && url.pathname === '/') return send(200, 'text/html; charset=utf-8', page);
    if (req.method === 'GET' && url.pathname === '/centrifuge.js') return send(200, 'text/javascript', bundle);
    if (req.method === 'GET' && url.pathname === '/config') {
      return send(200, 'application/json', JSON.stringify({ ws: HERALD.replace(/^http/, 'ws') + '/connection/websocket' }));
    }
    if (req.method === 'GET' && url.pathname === '/token') {
      const user = url.searchParams.get('user');
      if (!validName(user)) return send(400, 'application/json', '{"error":"user: 1-32 letters, digits, _ or -"}');
      const token = jwt({ sub: user, exp: Math.floor(Date.now() / 1000) + 3600, info: { name: user } });
      return send(200, 'application/json', JSON.stringify({ token }));
    }
    if (req.method === 'POST' && url.pathname === '/dm') {
      let raw = '';
      for await (const chunk of req) { raw += chunk; if (raw.length > 10000) throw new Error('too large'); }
      const { from, to, text } = JSON.parse(raw);
      if (!validName(from) || !validName(to) || typeof text !== 'string' || !text) return send(400, 'application/json', '{"error":"from, to, text"}');
      const msg = { from, to, text, at: Date.now() };
      await publish(`personal:#${to}`, msg);
      if (to !== from) await publish(`personal:#${from}`, msg);
      return send(200, 'application/json', '{}');
    }
    send(404, 'application/json', '{"error":"not found"}');
  } catch (e) {
    send(500, 'application/json', JSON.stringify({ error: String(e.message ?? e) }));
  }
});
server.listen(PORT, '127.0.0.1', () => console.log(`chat example on http://127.0.0.1:${server.address().port}`));
