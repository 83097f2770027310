// Herald's y-websocket endpoint beside the reference server, @y/websocket-server (with its LevelDB
// persistence, YPERSISTENCE), driven by the stock y-websocket provider in this process. Each server runs
// alone, one after the other, on this machine; the numbers are only comparable within one run.
//
//   node bench.mjs [--servers herald,y-websocket-server] [--edits 100000] [--clients 50] [--updates 2000]
//                  [--docs 500] [--idle 1000] [--herald ../../target/release/herald] [--json-out FILE]
//
// Scenarios, per server:
//   late-joiner  one client makes --edits single-character edits (each its own update); the time a fresh
//                client takes from connecting to holding the whole document
//   fan-out      --clients clients on one document, one of them sends --updates updates; deliveries per
//                second until every client has every update
//   documents    --docs documents with one client and one edit each: server RSS per loaded document
//   idle         --idle more connections to one document: server RSS per idle connection
//
// @hocuspocus/server is not driven yet (it needs Node 22; see the README); this is a tool for the lead to
// run, not a test.
import { spawn } from 'node:child_process';
import { appendFileSync, mkdtempSync, readFileSync, rmSync, writeFileSync, existsSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';

import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const HERE = path.dirname(new URL(import.meta.url).pathname);
const opt = {
  servers: (args.servers ?? 'herald,y-websocket-server').split(','),
  edits: Number(args.edits ?? 100000),
  clients: Number(args.clients ?? 50),
  updates: Number(args.updates ?? 2000),
  docs: Number(args.docs ?? 500),
  idle: Number(args.idle ?? 1000),
  herald: args.herald ?? [path.join(HERE, '../../target/release/herald'), path.join(HERE, '../../target/debug/herald')].find(existsSync),
  jsonOut: args['json-out'],
};

const freePort = () => new Promise((resolve) => {
  const s = net.createServer().listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});

async function waitPort(port, ms = 15000) {
  const deadline = Date.now() + ms;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${port}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

async function startServer(name) {
  const dir = mkdtempSync(path.join(tmpdir(), `yjs-bench-${name}-`));
  const port = await freePort();
  let child, url;
  if (name === 'herald') {
    const cfg = path.join(dir, 'herald.toml');
    writeFileSync(cfg, `listen = "127.0.0.1:${port}"\ndata_dir = ${JSON.stringify(dir)}\n[limits]\nmax_connections = 100000\n[yjs]\nanonymous = "write"\nmax_documents = ${opt.docs + 10}\nmax_document_size = 1073741824\n`);
    child = spawn(opt.herald, ['serve', '--config', cfg], { stdio: ['ignore', 'pipe', 'inherit'] });
    await new Promise((resolve, reject) => {
      readline.createInterface({ input: child.stdout }).once('line', resolve);
      child.once('exit', (c) => reject(new Error(`herald exited ${c}`)));
    });
    url = `ws://127.0.0.1:${port}/yjs`;
  } else if (name === 'y-websocket-server') {
    child = spawn(process.execPath, [path.join(HERE, 'node_modules/@y/websocket-server/src/server.js')], {
      env: { ...process.env, HOST: '127.0.0.1', PORT: String(port), YPERSISTENCE: path.join(dir, 'leveldb') },
      stdio: ['ignore', 'inherit', 'inherit'],
    });
    await waitPort(port);
    url = `ws://127.0.0.1:${port}`;
  } else {
    throw new Error(`unknown server ${name}`);
  }
  const rss = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${child.pid}/status`, 'utf8'))[1]) * 1024;
  const stop = async () => {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    await exited;
    rmSync(dir, { recursive: true, force: true });
  };
  return { url, rss, stop };
}

const providers = [];
function provider(url, room, doc = new Y.Doc()) {
  const p = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true });
  providers.push(p);
  return p;
}
const synced = (p) => (p.synced ? Promise.resolve() : new Promise((r) => { const h = (s) => { if (s) { p.off('sync', h); r(); } }; p.on('sync', h); }));
/** Resolves once the provider's text `t` has length `n`. */
const hasLength = (p, n) => new Promise((resolve) => {
  const t = p.doc.getText('t');
  if (t.length >= n) return resolve();
  const h = () => { if (t.length >= n) { p.doc.off('update', h); resolve(); } };
  p.doc.on('update', h);
});
const closeAll = () => { for (const p of providers.splice(0)) p.destroy(); };

async function lateJoiner(s) {
  const w = provider(s.url, 'late');
  const watcher = provider(s.url, 'late');
  await Promise.all([synced(w), synced(watcher)]);
  const t = w.doc.getText('t');
  for (let i = 0; i < opt.edits; i++) {
    t.insert(t.length, 'x');
    if (i % 1000 === 999) await new Promise((r) => setImmediate(r)); // let the socket drain
  }
  await hasLength(watcher, opt.edits);
  const start = performance.now();
  const late = provider(s.url, 'late');
  await synced(late);
  await hasLength(late, opt.edits);
  const ms = performance.now() - start;
  closeAll();
  return { late_joiner_ms: Math.round(ms) };
}

async function fanOut(s) {
  const ps = Array.from({ length: opt.clients }, () => provider(s.url, 'fanout'));
  await Promise.all(ps.map(synced));
  const start = performance.now();
  const t = ps[0].doc.getText('t');
  for (let i = 0; i < opt.updates; i++) t.insert(t.length, 'y');
  await Promise.all(ps.map((p) => hasLength(p, opt.updates)));
  const secs = (performance.now() - start) / 1000;
  closeAll();
  return { fanout_deliveries_per_s: Math.round((opt.updates * (opt.clients - 1)) / secs) };
}

async function documents(s) {
  const before = s.rss();
  const ps = Array.from({ length: opt.docs }, (_, i) => provider(s.url, `doc-${i}`));
  await Promise.all(ps.map(synced));
  ps.forEach((p) => p.doc.getText('t').insert(0, 'hello'));
  const check = Array.from({ length: Math.min(opt.docs, 20) }, (_, i) => provider(s.url, `doc-${i}`));
  await Promise.all(check.map((p) => synced(p).then(() => hasLength(p, 5))));
  const per = (s.rss() - before) / opt.docs;
  closeAll();
  return { rss_per_loaded_doc_bytes: Math.round(per) };
}

async function idle(s) {
  const first = provider(s.url, 'idle');
  await synced(first);
  const before = s.rss();
  const ps = Array.from({ length: opt.idle }, () => provider(s.url, 'idle'));
  await Promise.all(ps.map(synced));
  const per = (s.rss() - before) / opt.idle;
  closeAll();
  return { rss_per_idle_connection_bytes: Math.round(per) };
}

const results = [];
for (const name of opt.servers) {
  const s = await startServer(name);
  const row = { server: name };
  try {
    for (const scenario of [lateJoiner, fanOut, documents, idle]) Object.assign(row, await scenario(s));
  } finally {
    closeAll();
    await s.stop();
  }
  results.push(row);
  console.log(JSON.stringify(row));
  if (opt.jsonOut) appendFileSync(opt.jsonOut, `${JSON.stringify({ ...row, opt })}\n`);
}
console.table(results);
process.exit(0);
