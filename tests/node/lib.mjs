// Shared helpers for the Node tests: start a real Herald, cut connections with a TCP proxy, sign tokens,
// and wait for events with a deadline (never a bare sleep).
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

export const HERALD_BIN = process.env.HERALD_BIN ?? new URL('../../target/debug/herald', import.meta.url).pathname;

/** Starts `herald serve` with a TOML config; resolves once it prints its address. */
export async function startHerald({ config = '', dataDir, port = 0, args = [] } = {}) {
  const dir = dataDir ?? mkdtempSync(path.join(tmpdir(), 'herald-node-'));
  const file = path.join(dir, 'herald.toml');
  writeFileSync(file, `listen = "127.0.0.1:${port}"\ndata_dir = ${JSON.stringify(dir)}\nshutdown_timeout = "2s"\n${config}\n`);
  const child = spawn(HERALD_BIN, ['serve', '--config', file, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  let stderr = '';
  child.stderr.on('data', (d) => { stderr += d; });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`herald did not start:\n${stderr}`)), 15000);
    child.once('exit', (code) => { clearTimeout(timer); reject(new Error(`herald exited (${code}):\n${stderr}`)); });
    readline.createInterface({ input: child.stdout }).once('line', (line) => {
      clearTimeout(timer);
      const m = /listening on (http:\/\/\S+)/.exec(line);
      m ? resolve(m[1]) : reject(new Error(`unexpected output: ${line}`));
    });
  });
  const stop = async () => {
    if (child.exitCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await withTimeout(exited, 10000, 'herald to exit');
  };
  return { url, port: Number(new URL(url).port), dir, stop, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A TCP proxy the test can cut: `cut()` destroys live connections and refuses new ones until `restore()`. */
export async function startProxy(targetPort) {
  const sockets = new Set();
  let open = true;
  const server = net.createServer((client) => {
    if (!open) { client.destroy(); return; }
    const upstream = net.connect(targetPort, '127.0.0.1');
    for (const s of [client, upstream]) { sockets.add(s); s.on('close', () => sockets.delete(s)); s.on('error', () => {}); }
    client.pipe(upstream); upstream.pipe(client);
    client.on('close', () => upstream.destroy()); upstream.on('close', () => client.destroy());
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  return {
    port: server.address().port,
    cut() { open = false; for (const s of sockets) s.destroy(); },
    restore() { open = true; },
    close: () => new Promise((r) => { for (const s of sockets) s.destroy(); server.close(r); }),
  };
}

const b64url = (v) => Buffer.from(typeof v === 'string' ? v : JSON.stringify(v)).toString('base64url');

/** An HS256 JWT. */
export function sign(claims, key) {
  const head = b64url({ alg: 'HS256', typ: 'JWT' });
  const body = b64url(claims);
  const sig = createHmac('sha256', key).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

export function withTimeout(promise, ms, what) {
  let t;
  return Promise.race([
    promise.finally(() => clearTimeout(t)),
    new Promise((_, reject) => { t = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms); }),
  ]);
}

// EventEmitters (the centrifuge SDK) and EventTargets (EventSource) alike.
const listen = (e, name, h) => (e.on ? e.on(name, h) : e.addEventListener(name, h));
const unlisten = (e, name, h) => (e.removeListener ? e.removeListener(name, h) : e.removeEventListener(name, h));

/** Resolves with the first `emitter` event `name` whose payload satisfies `pred`. */
export function once(emitter, name, pred = () => true, ms = 10000) {
  return withTimeout(new Promise((resolve) => {
    const h = (ctx) => { if (pred(ctx)) { unlisten(emitter, name, h); resolve(ctx); } };
    listen(emitter, name, h);
  }), ms, `${name} event`);
}

/** Collects `emitter` events `name` and lets a test wait until `n` have arrived. */
export function collect(emitter, name) {
  const items = [];
  const waiters = [];
  listen(emitter, name, (ctx) => {
    items.push(ctx);
    for (const w of [...waiters]) if (items.length >= w.n) { waiters.splice(waiters.indexOf(w), 1); w.resolve(items); }
  });
  return {
    items,
    until(n, ms = 10000) {
      if (items.length >= n) return Promise.resolve(items);
      return withTimeout(new Promise((resolve) => waiters.push({ n, resolve })), ms, `${n} ${name} events (have ${items.length})`);
    },
  };
}

/** Calls Herald's server API. */
export async function api(url, key, method, body) {
  const res = await fetch(`${url}/api/${method}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': key },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  if (res.status !== 200 || json.error) throw new Error(`api ${method}: ${res.status} ${JSON.stringify(json)}`);
  return json.result;
}
