// The inbox example's app backend. A real application would authenticate users; this one trusts the name it
// is given. It serves the page and mints the user's token (GET /token?user=NAME), the one thing a page
// cannot do for itself: the token's `sub` is whose inbox the page reads. Everything else the page asks
// Herald directly (its /inbox API and the user's inbox channel over EventSource). It also serves sw.js, the
// service worker that shows Web Push notifications.
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';

const HERALD = process.env.HERALD_URL ?? 'http://127.0.0.1:8080';
const JWT_KEY = process.env.INBOX_JWT_KEY ?? 'inbox-example-secret';
const PORT = Number(process.env.PORT ?? 3001);
const page = readFileSync(new URL('./index.html', import.meta.url));
const worker = readFileSync(new URL('./sw.js', import.meta.url));

const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
function jwt(claims) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64(claims);
  return `${head}.${body}.${createHmac('sha256', JWT_KEY).update(`${head}.${body}`).digest('base64url')}`;
}

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    return res.end(page);
  }
  if (url.pathname === '/sw.js') {
    // The push toggle's service worker: served from the page's origin, as service workers must be.
    res.writeHead(200, { 'content-type': 'text/javascript; charset=utf-8' });
    return res.end(worker);
  }
  if (url.pathname === '/token') {
    const user = url.searchParams.get('user') ?? '';
    if (!/^[a-z0-9_-]{1,32}$/i.test(user)) {
      res.writeHead(400, { 'content-type': 'application/json' });
      return res.end(JSON.stringify({ message: 'a user name is 1-32 letters, digits, _ or -' }));
    }
    const token = jwt({ sub: user, exp: Math.floor(Date.now() / 1000) + 12 * 3600 });
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(JSON.stringify({ token, herald: HERALD }));
  }
  res.writeHead(404);
  res.end();
});

server.listen(PORT, '127.0.0.1', () => {
  console.log(`inbox example on http://127.0.0.1:${server.address().port} (Herald at ${HERALD})`);
});
