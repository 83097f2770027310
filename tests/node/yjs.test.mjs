// Herald as a y-websocket server, driven by the real `yjs` and `y-websocket` npm packages (with `ws` as the
// provider's WebSocket in Node): concurrent edits converge, a late joiner gets everything, awareness comes
// and goes, read-only and unauthorized clients are refused, a restart keeps every accepted edit, offline
// edits merge, a corrupt update is refused with the document intact, and a restored snapshot reaches
// connected and offline clients alike.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import WebSocket from 'ws';
import * as Y from 'yjs';
import { WebsocketProvider } from 'y-websocket';

import { once as onceEmitter, sign, startHerald, withTimeout } from './lib.mjs';

const KEY = 'node-yjs-secret';
const CONFIG = `
[auth]
jwt_key = "${KEY}"
`;

const writer = sign({ sub: 'w', docs: { write: ['*'] } }, KEY);
const reader = sign({ sub: 'r', docs: { read: ['*'] } }, KEY);

let herald;
const open = [];

before(async () => { herald = await startHerald({ config: CONFIG }); });
after(async () => {
  for (const p of open) close(p);
  await herald.stop();
  herald.cleanup();
});

/** `once` for lib0 observables (providers, awareness: `on`/`off`) and for Node emitters (`ws`). */
function once(target, name, pred = () => true, ms = 10000) {
  if (!target.off) return onceEmitter(target, name, pred, ms);
  return withTimeout(new Promise((resolve) => {
    const h = (...args) => { if (pred(...args)) { target.off(name, h); resolve(args[0]); } };
    target.on(name, h);
  }), ms, `${name} event`);
}

const wsUrl = (h) => `${h.url.replace('http://', 'ws://')}/yjs`;

/** Ends a provider for good: its awareness (and the interval it keeps) goes with the document. */
function close(p) {
  p.destroy();
  p.doc.destroy();
}

/** A provider on a fresh Y.Doc, as an app creates one. */
function provider(room, token, { h = herald, doc = new Y.Doc(), connect = true } = {}) {
  const p = new WebsocketProvider(wsUrl(h), room, doc, {
    WebSocketPolyfill: WebSocket,
    params: token ? { authorization: token } : {},
    disableBc: true,
    connect,
  });
  open.push(p);
  return p;
}

const synced = (p) => (p.synced ? Promise.resolve() : once(p, 'sync', (s) => s === true));
const text = (p) => p.doc.getText('t').toString();

/** Resolves once `pred(doc)` holds, re-checked on every change of the document. */
function until(p, pred, what = 'document state') {
  if (pred(p.doc)) return Promise.resolve();
  return withTimeout(new Promise((resolve) => {
    const h = () => { if (pred(p.doc)) { p.doc.off('update', h); resolve(); } };
    p.doc.on('update', h);
  }), 10000, `${what} (now ${JSON.stringify(text(p))})`);
}

/** A fresh provider's view of the stored document: what a late joiner sees. */
async function storedText(room, want, h = herald) {
  const p = provider(room, writer, { h });
  await synced(p);
  if (want !== undefined) await until(p, () => text(p) === want, `stored ${JSON.stringify(want)}`);
  const t = text(p);
  close(p);
  return t;
}

test('three clients converge after concurrent edits, and a late joiner gets it all', async () => {
  const ps = [provider('converge', writer), provider('converge', writer), provider('converge', writer)];
  await Promise.all(ps.map(synced));
  // All three edit at the same position before any sees the others' edits.
  ps.forEach((p, i) => p.doc.getText('t').insert(0, `<${i}>`));
  await Promise.all(ps.map((p) => until(p, () => text(p).length === 9)));
  assert.equal(text(ps[1]), text(ps[0]));
  assert.equal(text(ps[2]), text(ps[0]));
  for (const i of [0, 1, 2]) assert.ok(text(ps[0]).includes(`<${i}>`));

  const late = provider('converge', reader);
  await synced(late);
  await until(late, () => text(late) === text(ps[0]), 'late joiner');
});

test('awareness states reach the others and disappear when their client goes', async () => {
  const a = provider('presence', writer);
  const b = provider('presence', writer);
  await Promise.all([synced(a), synced(b)]);
  const seen = once(b.awareness, 'change', () => b.awareness.getStates().get(a.doc.clientID)?.user?.name === 'ada');
  a.awareness.setLocalStateField('user', { name: 'ada', color: '#f00' });
  await seen;
  // A newcomer gets the states with its first messages.
  const c = provider('presence', reader);
  await synced(c);
  await withTimeout(new Promise((resolve) => {
    const check = () => c.awareness.getStates().get(a.doc.clientID)?.user?.name === 'ada' && resolve();
    check();
    c.awareness.on('change', check);
  }), 10000, 'newcomer awareness');
  // a's connection drops without a goodbye: the server removes its state for everyone.
  const gone = once(b.awareness, 'change', () => !b.awareness.getStates().has(a.doc.clientID));
  a.shouldConnect = false;
  a.ws.terminate();
  await gone;
});

test('a read-only client reads, and its edits are refused and stored nowhere', async () => {
  const w = provider('readonly', writer);
  await synced(w);
  w.doc.getText('t').insert(0, 'by the writer');
  assert.equal(await storedText('readonly', 'by the writer'), 'by the writer');

  const warnings = [];
  const warn = console.warn;
  let refused;
  const gotRefusal = new Promise((resolve) => { refused = resolve; });
  console.warn = (...args) => { warnings.push(args.join(' ')); if (/read-only/.test(args.join(' '))) refused(); };
  try {
    const r = provider('readonly', reader);
    await synced(r);
    assert.equal(text(r), 'by the writer');
    r.doc.getText('t').insert(0, 'NOPE ');
    // y-websocket hands the server's auth message to its permission-denied handler (console.warn).
    await withTimeout(gotRefusal, 10000, 'the read-only refusal');
  } finally {
    console.warn = warn;
  }
  assert.match(warnings.join('\n'), /Permission denied.*\n.*read-only/);
  w.doc.getText('t').insert(0, '> ');
  assert.equal(await storedText('readonly', '> by the writer'), '> by the writer');
  assert.ok(!text(w).includes('NOPE'));
});

test('a client without access gets a permanent close with the reason', async () => {
  const none = provider('private', null);
  const ev = await once(none, 'closed', () => true);
  assert.equal(ev.code, 4401);
  assert.match(ev.reason, /no token/);
  const other = provider('private', sign({ sub: 'x', docs: { read: ['public/*'] } }, KEY));
  const ev2 = await once(other, 'closed', () => true);
  assert.equal(ev2.code, 4403);
  assert.match(ev2.reason, /docs claim/);
});

test('offline edits merge on reconnect', async () => {
  const a = provider('offline', writer);
  const b = provider('offline', writer);
  await Promise.all([synced(a), synced(b)]);
  a.doc.getText('t').insert(0, 'shared');
  await until(b, () => text(b) === 'shared');
  b.disconnect();
  b.doc.getText('t').insert(0, '[offline] ');
  a.doc.getText('t').insert(6, ' [online]');
  await until(a, () => text(a) === 'shared [online]');
  b.connect();
  await until(b, () => text(b).includes('[online]'), 'b gets the online edit');
  await until(a, () => text(a).includes('[offline]'), 'a gets the offline edit');
  assert.equal(text(a), '[offline] shared [online]');
  assert.equal(text(b), text(a));
});

test('a corrupt update is refused with a close reason, and the document stays intact', async () => {
  const w = provider('corrupt', writer);
  await synced(w);
  w.doc.getText('t').insert(0, 'intact');
  assert.equal(await storedText('corrupt', 'intact'), 'intact');
  const ws = new WebSocket(`${wsUrl(herald)}/corrupt?authorization=${writer}`);
  ws.binaryType = 'arraybuffer';
  await once(ws, 'open');
  const closed = new Promise((resolve) => ws.once('close', (c, reason) => resolve([c, reason.toString()])));
  // messageSync, messageYjsUpdate, then a length-prefixed buffer that is no Yjs update.
  ws.send(Uint8Array.from([0, 2, 7, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3]));
  const [code, reason] = await withTimeout(closed, 10000, 'the close');
  assert.equal(code, 1007);
  assert.match(reason, /corrupt/);
  w.doc.getText('t').insert(6, '!');
  assert.equal(await storedText('corrupt', 'intact!'), 'intact!');
});

test('a restart keeps every accepted edit, and connected clients carry on', async () => {
  const h = await startHerald({ config: CONFIG });
  try {
    const a = provider('durable', writer, { h });
    await synced(a);
    for (const word of ['one ', 'two ', 'three ']) a.doc.getText('t').insert(text(a).length, word);
    assert.equal(await storedText('durable', 'one two three ', h), 'one two three ');
    const down = a.wsconnected ? once(a, 'status', (s) => s.status === 'disconnected') : null;
    await h.stop();
    await down;
    const again = await startHerald({ config: CONFIG, dataDir: h.dir, port: h.port });
    try {
      assert.equal(await storedText('durable', undefined, again), 'one two three ');
      // The provider reconnects by itself, and its next edit is stored on the new process.
      await synced(a);
      a.doc.getText('t').insert(0, '0 ');
      assert.equal(await storedText('durable', '0 one two three ', again), '0 one two three ');
    } finally {
      close(a);
      await again.stop();
    }
  } finally {
    h.cleanup();
  }
});

test('a restored snapshot reaches a connected client, and a client offline with newer edits cannot bring them back', async () => {
  const API_KEY = 'node-yjs-api-key';
  const h = await startHerald({ config: `${CONFIG}\n[centrifugo]\napi_key = "${API_KEY}"\n` });
  const docApi = async (method, path) => {
    const res = await fetch(`${h.url}/api/yjs/${path}`, { method, headers: { 'x-api-key': API_KEY } });
    return [res.status, await res.json()];
  };
  const map = (p) => p.doc.getMap('m').toJSON();
  const delta = (p) => p.doc.getText('t').toDelta();
  try {
    const a = provider('restore', writer, { h });
    const b = provider('restore', writer, { h });
    await Promise.all([synced(a), synced(b)]);
    a.doc.transact(() => {
      a.doc.getText('t').insert(0, 'Hello ');
      a.doc.getText('t').insert(6, 'world', { bold: true });
      a.doc.getMap('m').set('title', 'v1');
    });
    await until(b, () => text(b) === 'Hello world' && map(b).title === 'v1');
    assert.equal(await storedText('restore', 'Hello world', h), 'Hello world');
    const [status, taken] = await docApi('POST', 'doc/snapshot?name=restore');
    assert.equal(status, 200, JSON.stringify(taken));
    const id = taken.snapshot.id;
    const wantDelta = delta(a);
    assert.deepEqual(wantDelta, [{ insert: 'Hello ' }, { insert: 'world', attributes: { bold: true } }]);

    // Newer edits everyone has, b included; then b goes offline with them and edits on.
    a.doc.transact(() => {
      a.doc.getText('t').insert(11, ' and more', { italic: true });
      a.doc.getMap('m').set('title', 'v2');
      a.doc.getMap('m').set('extra', 1);
    });
    await until(b, () => text(b) === 'Hello world and more' && map(b).extra === 1);
    b.disconnect();
    b.doc.getText('t').insert(text(b).length, ' [b offline]');

    const [rs, restored] = await docApi('POST', `doc/restore?name=restore&id=${id}`);
    assert.equal(rs, 200, JSON.stringify(restored));
    assert.equal(restored.restored, id);
    // The connected client now holds exactly the snapshot's content, formatting included.
    await until(a, () => JSON.stringify(delta(a)) === JSON.stringify(wantDelta) && JSON.stringify(map(a)) === '{"title":"v1"}',
      'the connected client restored');

    // b comes back: what the server knew at the restore stays reverted for b too; b's own offline edit,
    // which the server had not seen, is kept (merged after the restored content), for both.
    b.connect();
    const settled = (p) => text(p) === 'Hello world [b offline]' && JSON.stringify(map(p)) === '{"title":"v1"}';
    await until(b, () => settled(b), 'b after reconnecting');
    await until(a, () => settled(a), 'a with b\'s offline edit');
    for (const p of [a, b]) {
      assert.deepEqual(delta(p).slice(0, 2), wantDelta);
      assert.ok(!text(p).includes('and more'));
    }
    assert.equal(await storedText('restore', 'Hello world [b offline]', h), 'Hello world [b offline]');
    const [ls, listed] = await docApi('GET', 'doc/snapshots?name=restore');
    assert.equal(ls, 200);
    assert.deepEqual(listed.snapshots.map((s) => s.reason), ['before-restore', 'api']);
    const [ns, missing] = await docApi('POST', 'doc/restore?name=restore&id=999999');
    assert.equal(ns, 404);
    assert.equal(missing.code, 'snapshot_not_found');
    close(a);
    close(b);
  } finally {
    await h.stop();
    h.cleanup();
  }
});
