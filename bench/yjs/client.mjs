// A load process of the Yjs benchmark: bench.mjs forks a few of these so the clients do not share one
// Node event loop (one process saturates a core long before the servers do). Each holds providers and
// does what the orchestrator asks over IPC:
//
//   {op: 'open', kind, url, rooms: [name, ...]}   one provider (one socket) per entry, in batches, synced
//   {op: 'arm', expect: [n, ...], writes: [k, ...], rate, wid}
//                                                  client i expects its document's array 'a' to reach
//                                                  expect[i] entries and will push writes[i] entries
//   {op: 'go', timeoutMs}                          writers push, everyone waits for expect; answers with
//                                                  the latency histogram and the first send / last receipt
//   {op: 'close'}                                  destroys every provider
//
// Every wait is bounded; every loop is bounded by a count.
import { connect, now, sleep, within, record } from './lib.mjs';

const OPEN_BATCH = 50;
// y-websocket's provider adds a process 'exit' listener per instance (to send its awareness removal).
process.setMaxListeners(0);
let clients = [];
let armed = null;

async function open({ kind, url, rooms, timeoutMs }) {
  const deadline = Date.now() + timeoutMs;
  for (let i = 0; i < rooms.length; i += OPEN_BATCH) {
    const batch = rooms.slice(i, i + OPEN_BATCH).map((room) => ({ room, ...connect(kind, url, room) }));
    clients.push(...batch);
    await within(Math.max(1, deadline - Date.now()), `opening ${rooms.length} clients`, Promise.all(batch.map((c) => c.synced())));
  }
  return { n: clients.length };
}

function arm({ expect, writes, rate, wid }) {
  const hist = {};
  let received = 0; // entries from other clients, summed over clients
  let lastRecv = 0;
  const pending = new Set();
  let resolveAll;
  const all = new Promise((r) => { resolveAll = r; });
  clients.forEach((c, i) => {
    const a = c.doc.getArray('a');
    c.me = `${wid}:${i}`;
    if (a.length >= expect[i]) return;
    pending.add(i);
    a.observe((ev) => {
      const t = now();
      for (const d of ev.changes.delta) {
        if (!d.insert) continue;
        for (const [who, , sent] of d.insert) {
          if (who === c.me) continue;
          record(hist, t - sent);
          received += 1;
          lastRecv = t;
        }
      }
      if (a.length >= expect[i] && pending.delete(i) && pending.size === 0) resolveAll();
    });
  });
  if (pending.size === 0) resolveAll();
  armed = { hist, all, writes, rate, pending, get received() { return received; }, get lastRecv() { return lastRecv; } };
  return { pending: pending.size };
}

/** Each writer pushes its entries: as fast as the event loop lets it (rate 0), or paced at `rate`/s each. */
async function write(c, k, rate) {
  const a = c.doc.getArray('a');
  const start = now();
  for (let i = 0; i < k; i++) {
    if (rate > 0) {
      const due = start + (i * 1000) / rate;
      const wait = due - now();
      if (wait > 1) await sleep(wait);
    } else if (i % 10 === 9) {
      await new Promise((r) => setImmediate(r)); // let the socket write and read
    }
    a.push([[c.me, i, now()]]);
  }
}

async function go({ timeoutMs }) {
  const { writes, rate } = armed;
  const closes0 = clients.reduce((n, c) => n + c.closes.n, 0);
  const firstSend = now();
  const writing = Promise.all(clients.map((c, i) => (writes[i] > 0 ? write(c, writes[i], rate) : null)));
  let complete = true;
  try {
    await within(timeoutMs, 'every client got every update', Promise.all([writing, armed.all]));
  } catch {
    complete = false;
  }
  return {
    hist: armed.hist, received: armed.received, firstSend, lastRecv: armed.lastRecv, complete,
    missingClients: armed.pending.size, closes: clients.reduce((n, c) => n + c.closes.n, 0) - closes0,
  };
}

async function close() {
  for (const c of clients.splice(0)) c.destroy();
  armed = null;
  await sleep(200);
  return {};
}

const ops = { open, arm, go, close };
process.on('message', async (m) => {
  try {
    const r = await ops[m.op](m);
    process.send({ id: m.id, ok: true, ...r });
  } catch (e) {
    process.send({ id: m.id, ok: false, error: String(e?.stack ?? e) });
  }
});
process.on('disconnect', () => process.exit(0));
