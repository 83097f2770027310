// The dashboard example's publisher: every second it reads this machine's CPU, memory and network figures
// from /proc and publishes them through Herald's server API into the channel metrics:<host>, numbered
// (`seq`) so a page can prove it missed nothing. It also serves the page (public/) and tells it where Herald is.
//
// While Herald is unreachable the figures wait here, in order, and go out when it is back: the numbering never
// skips, and a page that reconnects gets them from Herald's history. After a restart of this script the
// numbering continues from the last figure in Herald's history.
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import os from 'node:os';

const HERALD = process.env.HERALD_URL ?? 'http://127.0.0.1:8080';
const API_KEY = process.env.DASHBOARD_API_KEY ?? 'dashboard-example-api-key';
const PORT = Number(process.env.PORT ?? 3001);
const INTERVAL_MS = Number(process.env.INTERVAL_MS ?? 1000);
const HOST = os.hostname().replace(/[^a-zA-Z0-9_.-]/g, '-');
const CHANNEL = `metrics:${HOST}`;
const MAX_WAITING = 3600; // an hour of figures kept while Herald is away; older ones are dropped (and seen as a gap)

/** Why a call to Herald failed, in a word when there is one (ECONNREFUSED), else Herald's message. */
const why = (e) => e.cause?.code ?? e.cause?.errors?.[0]?.code ?? e.cause?.message ?? e.message;

async function api(method, body) {
  const res = await fetch(`${HERALD}/api/${method}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify(body),
    signal: AbortSignal.timeout(5000),
  });
  const json = await res.json();
  if (!res.ok) throw new Error(`${json.message ?? res.statusText} (${json.code ?? res.status})`);
  if (json.error) throw new Error(`${json.error.message} (${json.error.code})`);
  return json.result;
}

// --- Figures from /proc ---------------------------------------------------------------------------------

async function cpuTimes() {
  // cpu  user nice system idle iowait irq softirq steal ...
  const first = (await readFile('/proc/stat', 'utf8')).split('\n', 1)[0];
  const v = first.trim().split(/\s+/).slice(1).map(Number);
  const idle = v[3] + (v[4] ?? 0);
  return { idle, total: v.slice(0, 8).reduce((a, b) => a + b, 0) };
}

async function memory() {
  const info = Object.fromEntries((await readFile('/proc/meminfo', 'utf8')).split('\n')
    .map((l) => /^(\w+):\s+(\d+)/.exec(l)).filter(Boolean).map((m) => [m[1], Number(m[2]) * 1024]));
  return { total: info.MemTotal, used: info.MemTotal - info.MemAvailable };
}

async function netBytes() {
  let rx = 0, tx = 0;
  for (const line of (await readFile('/proc/net/dev', 'utf8')).split('\n').slice(2)) {
    const m = /^\s*([^:]+):\s*(.*)$/.exec(line);
    if (!m || m[1] === 'lo') continue;
    const f = m[2].trim().split(/\s+/).map(Number);
    rx += f[0]; tx += f[8];
  }
  return { rx, tx };
}

let prev = null;
async function sample() {
  const [cpu, mem, net, load] = await Promise.all([cpuTimes(), memory(), netBytes(), readFile('/proc/loadavg', 'utf8')]);
  const now = Date.now();
  const p = prev;
  prev = { cpu, net, now };
  if (!p) return null; // rates need two readings
  const secs = (now - p.now) / 1000;
  const busy = cpu.total - p.cpu.total;
  return {
    t: now,
    cpu: busy > 0 ? Math.round(1000 * (1 - (cpu.idle - p.cpu.idle) / busy)) / 10 : 0,
    mem,
    net: { rx: Math.round((net.rx - p.net.rx) / secs), tx: Math.round((net.tx - p.net.tx) / secs) },
    load: load.split(' ', 3).map(Number),
    cores: os.cpus().length,
  };
}

// --- Publishing, in order, through outages ---------------------------------------------------------------

const waiting = [];
let seq = null, down = false, flushing = false;

/** The number after the newest figure in Herald's history (0 for a new channel). */
async function nextSeq() {
  const { publications } = await api('history', { channel: CHANNEL, limit: 1, reverse: true });
  return publications?.length ? publications[0].data.seq + 1 : 0;
}

async function flush() {
  if (flushing) return;
  flushing = true;
  try {
    while (waiting.length) {
      const figure = waiting[0];
      // The same key for a retry: if Herald stored a figure but its answer was lost, it is not stored twice.
      await api('publish', { channel: CHANNEL, data: figure, idempotency_key: `${HOST}-${figure.seq}` });
      waiting.shift();
    }
    if (down) { down = false; console.log(`Herald is back: every waiting figure sent (last #${seq - 1})`); }
  } catch (e) {
    if (!down) console.log(`Herald unreachable (${why(e)}); figures wait here`);
    down = true;
    console.log(`${waiting.length} figure(s) waiting`);
  } finally {
    flushing = false;
  }
}

async function tick() {
  const figure = await sample();
  if (!figure) return;
  if (seq === null) {
    try { seq = await nextSeq(); } catch (e) {
      if (!down) console.log(`waiting for Herald at ${HERALD} (${why(e)})`);
      down = true;
      return;
    }
    if (down) { down = false; console.log('Herald is up'); }
  }
  waiting.push({ seq: seq++, host: HOST, ...figure });
  if (waiting.length > MAX_WAITING) waiting.shift();
  await flush();
}

// --- The page ----------------------------------------------------------------------------------------------

const FILES = { '/': ['index.html', 'text/html; charset=utf-8'], '/dashboard.js': ['dashboard.js', 'text/javascript'], '/chart.js': ['chart.js', 'text/javascript'] };
const server = http.createServer(async (req, res) => {
  const path = new URL(req.url, 'http://x').pathname;
  if (path === '/config') {
    res.writeHead(200, { 'content-type': 'application/json' });
    return res.end(JSON.stringify({ herald: HERALD, topic: CHANNEL, host: HOST, interval: INTERVAL_MS }));
  }
  const file = FILES[path];
  if (!file) { res.writeHead(404); return res.end(); }
  res.writeHead(200, { 'content-type': file[1] });
  res.end(await readFile(new URL(`./public/${file[0]}`, import.meta.url)));
});
server.listen(PORT, '127.0.0.1', () => {
  console.log(`dashboard on http://127.0.0.1:${server.address().port}`);
  console.log(`publishing ${CHANNEL} to ${HERALD} every ${INTERVAL_MS} ms`);
  // The first reading only starts the rates. One tick at a time: a slow Herald delays the next figure rather
  // than piling up requests.
  sample().then(() => setTimeout(async function loop() {
    const started = Date.now();
    await tick().catch((e) => console.error(e));
    setTimeout(loop, Math.max(0, INTERVAL_MS - (Date.now() - started)));
  }, INTERVAL_MS));
});
