// The collaborative editor's app backend. A real application would authenticate users and decide who may
// edit which document; this one trusts the name it is given and lets everyone edit every `collab/*`
// document. It does what a backend does for Herald's documents:
//   GET /token?user=NAME  -> a JWT whose `docs` claim lets NAME edit collab/* (signed with Herald's key)
// and serves the page, plus the npm packages it imports (yjs, y-websocket, y-quill and their lib0 and
// y-protocols modules) straight from node_modules through an import map: no build step.
import { createHmac } from 'node:crypto';
import { readFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';

const HERALD = process.env.HERALD_URL ?? 'http://127.0.0.1:8080';
const JWT_KEY = process.env.COLLAB_JWT_KEY ?? 'collab-example-secret';
const PORT = Number(process.env.PORT ?? 3001);
const MODULES = new URL('./node_modules/', import.meta.url).pathname;

const b64 = (v) => Buffer.from(JSON.stringify(v)).toString('base64url');
function jwt(claims) {
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64(claims);
  return `${head}.${body}.${createHmac('sha256', JWT_KEY).update(`${head}.${body}`).digest('base64url')}`;
}

// The import map: every ES module export of the packages the page imports, resolved as a browser would
// (its `exports` conditions, browser first), so `import ... from 'lib0/observable'` works unbundled.
const CONDITIONS = ['browser', 'module', 'import', 'default'];
function pick(target) {
  if (typeof target === 'string') return target;
  if (!target || typeof target !== 'object') return null;
  for (const c of CONDITIONS) if (c in target) { const t = pick(target[c]); if (t) return t; }
  return null;
}
const imports = {};
for (const pkg of ['yjs', 'y-websocket', 'y-quill', 'y-protocols', 'lib0', 'isomorphic.js']) {
  const exportsMap = JSON.parse(readFileSync(path.join(MODULES, pkg, 'package.json'), 'utf8')).exports ?? {};
  for (const [key, target] of Object.entries(exportsMap)) {
    const file = pick(target);
    if (key.includes('*') || !file || !/\.m?js$/.test(file)) continue;
    imports[pkg + key.slice(1)] = `/modules/${pkg}/${file.replace(/^\.\//, '')}`;
  }
}
const importMap = JSON.stringify({ imports }, null, 1);
const page = readFileSync(new URL('./index.html', import.meta.url), 'utf8')
  .replace('<!--importmap-->', `<script type="importmap">${importMap}</script>`)
  .replace('__HERALD_URL__', HERALD);

const TYPES = { '.js': 'text/javascript', '.mjs': 'text/javascript', '.css': 'text/css', '.map': 'application/json' };

const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/') {
    res.writeHead(200, { 'content-type': 'text/html; charset=utf-8' });
    return res.end(page);
  }
  if (url.pathname === '/token') {
    const user = url.searchParams.get('user') ?? '';
    if (!/^[\p{L}\p{N} _-]{1,32}$/u.test(user)) {
      res.writeHead(400, { 'content-type': 'application/json' });
      return res.end(JSON.stringify({ error: 'a name is 1-32 letters, digits, spaces, _ or -' }));
    }
    const token = jwt({ sub: user, exp: Math.floor(Date.now() / 1000) + 8 * 3600, docs: { write: ['collab/{+name}'] } });
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(JSON.stringify({ token }));
  }
  if (url.pathname.startsWith('/modules/')) {
    const file = path.normalize(path.join(MODULES, decodeURIComponent(url.pathname.slice('/modules/'.length))));
    if (!file.startsWith(MODULES)) { res.writeHead(403); return res.end(); }
    try {
      const body = readFileSync(file);
      res.writeHead(200, { 'content-type': TYPES[path.extname(file)] ?? 'application/octet-stream' });
      return res.end(body);
    } catch { /* fall through to 404 */ }
  }
  res.writeHead(404, { 'content-type': 'text/plain' });
  res.end('not found');
});

server.listen(PORT, '127.0.0.1', () => {
  console.log(`collab example on http://127.0.0.1:${server.address().port} (Herald at ${HERALD})`);
});
