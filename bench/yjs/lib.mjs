// What the orchestrator (bench.mjs) and the client processes (client.mjs) share: one way to open a
// document on any of the three servers, a latency histogram that merges across processes, and bounded
// waits.
import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';
import { HocuspocusProvider } from '@hocuspocus/provider';

/** YJS_BENCH_NO_AWARENESS=1: y-websocket clients without awareness state (diagnosis; not for the comparison). */
const NO_AWARENESS = process.env.YJS_BENCH_NO_AWARENESS === '1';

/** Wall-clock milliseconds with sub-millisecond precision, comparable between processes of one machine. */
export const now = () => performance.timeOrigin + performance.now();

/** Resolves after `ms`. */
export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** `promise`, or a rejection naming `what` after `ms`. */
export function within(ms, what, promise) {
  let timer;
  return Promise.race([
    promise.finally(() => clearTimeout(timer)),
    new Promise((_, reject) => { timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms); }),
  ]);
}

/**
 * Opens document `room` on a server: Hocuspocus with its own provider (its protocol variant, the document
 * name in every message), Herald and @y/websocket-server with the stock y-websocket provider. One socket per
 * client in both cases.
 */
export function connect(kind, url, room, doc = new Y.Doc()) {
  if (kind === 'hocuspocus') {
    const p = new HocuspocusProvider({ url, name: room, document: doc, WebSocketPolyfill: WebSocket, quiet: true });
    const closes = { n: 0 };
    p.on('close', () => { closes.n += 1; });
    return {
      doc,
      closes,
      synced: () => (p.synced ? Promise.resolve() : new Promise((r) => {
        const h = ({ state }) => { if (state) { p.off('synced', h); r(); } };
        p.on('synced', h);
      })),
      destroy: () => p.destroy(),
    };
  }
  const p = new WebsocketProvider(url, room, doc, { WebSocketPolyfill: WebSocket, disableBc: true, connect: !NO_AWARENESS });
  if (NO_AWARENESS) {
    // Diagnosis only: a client without awareness state sends none and renews none.
    p.awareness.setLocalState(null);
    p.connect();
  }
  // Closes of the socket by the server (or the network) while the provider should be connected; it reconnects.
  const closes = { n: 0 };
  p.on('connection-close', () => { if (p.shouldConnect) closes.n += 1; });
  return {
    doc,
    closes,
    synced: () => (p.synced ? Promise.resolve() : new Promise((r) => {
      const h = (s) => { if (s) { p.off('sync', h); r(); } };
      p.on('sync', h);
    })),
    destroy: () => p.destroy(),
  };
}

/** Resolves once `pred()` holds, checked after every update of `doc`. */
export const whenDoc = (doc, pred) => new Promise((resolve) => {
  if (pred()) return resolve();
  const h = () => { if (pred()) { doc.off('update', h); resolve(); } };
  doc.on('update', h);
});

// Latency histogram: logarithmic buckets 1% wide, from 10 µs; mergeable by adding counts.
const BASE = Math.log(1.01);
export const bucketOf = (ms) => (ms <= 0.01 ? 0 : Math.ceil(Math.log(ms / 0.01) / BASE));
export const msOfBucket = (b) => 0.01 * Math.exp(b * BASE);
export function record(hist, ms) { const b = bucketOf(ms); hist[b] = (hist[b] ?? 0) + 1; }
export function merge(into, h) { for (const [b, n] of Object.entries(h)) into[b] = (into[b] ?? 0) + n; return into; }
export function quantile(hist, q) {
  const entries = Object.entries(hist).map(([b, n]) => [Number(b), n]).sort((a, b) => a[0] - b[0]);
  const total = entries.reduce((s, [, n]) => s + n, 0);
  if (total === 0) return null;
  let seen = 0;
  for (const [b, n] of entries) { seen += n; if (seen >= q * total) return msOfBucket(b); }
  return msOfBucket(entries[entries.length - 1][0]);
}
export const count = (hist) => Object.values(hist).reduce((s, n) => s + n, 0);
