// What the stock `centrifuge` SDK tripped over, each checked with both of its builds (JSON and Protobuf):
// close reasons that do not fit a close frame, reverse history from a position, the `subs` claim, a
// subscription token for another channel, history_remove keeping the stream position, publish options
// (tags, skip_history, idempotency), Centrifugo's error messages, the personal channel being opt-in, and
// join/leave only for subscribers that asked.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Centrifuge } from 'centrifuge';
import { Centrifuge as CentrifugeProtobuf } from 'centrifuge/build/protobuf';
import WebSocket from 'ws';

import { api, collect, once, sign, startHerald, withTimeout } from './lib.mjs';

const KEY = 'parity-secret';
const API_KEY = 'parity-api-key';
const CONFIG = `
[auth]
jwt_key = "${KEY}"
[centrifugo]
api_key = "${API_KEY}"
[[centrifugo.namespaces]]
name = "room"
publish = "subscribers"
join_leave = true
[[centrifugo.namespaces]]
name = "secret"
subscribe = "token"
`;

const now = () => Math.floor(Date.now() / 1000);
const token = (sub, extra = {}, key = KEY) => sign({ sub, exp: now() + 600, ...extra }, key);
const text = new TextDecoder();

let herald;
before(async () => { herald = await startHerald({ config: CONFIG }); });
after(async () => { await herald.stop(); herald.cleanup(); });

/** Resolves when `c` has been in state `disconnected` past the SDK's longest reconnect delay. */
async function staysDisconnected(c) {
  const reconnects = collect(c, 'connecting');
  const deadline = Date.now() + 1500; // maxReconnectDelay is 300 ms: a reconnect would have started by now
  while (Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
  assert.equal(c.state, 'disconnected');
  assert.equal(reconnects.items.length, 0, 'the SDK did not try to reconnect');
}

for (const [codec, Impl] of [['json', Centrifuge], ['protobuf', CentrifugeProtobuf]]) {
  const dec = (d) => (codec === 'protobuf' ? JSON.parse(text.decode(d)) : d);
  const client = (opts = {}) => new Impl(herald.url.replace(/^http/, 'ws') + '/connection/websocket', {
    websocket: WebSocket, minReconnectDelay: 100, maxReconnectDelay: 300, ...opts,
  });
  const ch = (name) => `${name}-${codec}`;

  test(`${codec}: a token signed with another key: disconnected with 3500 (a reason that fits the frame), no reconnect`, async (t) => {
    const c = client({ token: token('mallory', {}, 'not-the-key') });
    t.after(() => c.disconnect());
    const gone = once(c, 'disconnected');
    c.connect();
    const ctx = await gone;
    assert.equal(ctx.code, 3500, `closed with ${ctx.code} ${ctx.reason}`);
    assert.ok(Buffer.byteLength(ctx.reason) <= 123, ctx.reason);
    await staysDisconnected(c);
  });

  test(`${codec}: a subscription token for another channel disconnects with 3500`, async (t) => {
    const c = client({ token: token('alice') });
    t.after(() => c.disconnect());
    c.connect();
    await once(c, 'connected');
    const sub = c.newSubscription(ch('secret:a'), { token: token('alice', { channel: ch('secret:b') }) });
    const gone = once(c, 'disconnected');
    sub.subscribe();
    assert.equal((await gone).code, 3500);
    await staysDisconnected(c);
  });

  test(`${codec}: reverse history walks back from since`, async (t) => {
    const c = client({ token: token('hist') });
    t.after(() => c.disconnect());
    c.connect();
    const sub = c.newSubscription(ch('room:history'));
    sub.subscribe();
    await once(sub, 'subscribed');
    const offsets = [];
    for (let n = 1; n <= 10; n++) {
      offsets.push((await api(herald.url, API_KEY, 'publish', { channel: ch('room:history'), data: { n } })).offset);
    }
    const { epoch } = await sub.history({ limit: 0 });
    const back = await sub.history({ since: { offset: offsets[3], epoch }, limit: 3, reverse: true });
    assert.deepEqual(back.publications.map((p) => dec(p.data).n), [3, 2, 1]);
    const forward = await sub.history({ since: { offset: offsets[3], epoch }, limit: 3 });
    assert.deepEqual(forward.publications.map((p) => dec(p.data).n), [5, 6, 7]);
    const newest = await sub.history({ limit: 2, reverse: true });
    assert.deepEqual(newest.publications.map((p) => dec(p.data).n), [10, 9]);

    // history_remove keeps the stream position (offset and epoch) so clients can still recover.
    await api(herald.url, API_KEY, 'history_remove', { channel: ch('room:history') });
    const after = await sub.history({ limit: 10 });
    assert.deepEqual([after.publications.length, after.offset, after.epoch], [0, offsets[9], epoch]);
  });

  test(`${codec}: the subs claim subscribes server-side with its data`, async (t) => {
    const c = client({ token: token('subs', { subs: { [ch('room:server')]: { data: { welcome: true } } } }) });
    t.after(() => c.disconnect());
    const subscribed = once(c, 'subscribed', (ctx) => ctx.channel === ch('room:server'));
    const pubs = collect(c, 'publication');
    c.connect();
    const ctx = await subscribed;
    assert.deepEqual(dec(ctx.data), { welcome: true });
    await api(herald.url, API_KEY, 'publish', { channel: ch('room:server'), data: { n: 1 } });
    const [p] = await pubs.until(1);
    assert.deepEqual([p.channel, dec(p.data)], [ch('room:server'), { n: 1 }]);
  });

  test(`${codec}: publish options: tags, skip_history, idempotency_key`, async (t) => {
    const c = client({ token: token('opts') });
    t.after(() => c.disconnect());
    c.connect();
    const sub = c.newSubscription(ch('room:opts'));
    const pubs = collect(sub, 'publication');
    sub.subscribe();
    await once(sub, 'subscribed');
    await api(herald.url, API_KEY, 'publish', { channel: ch('room:opts'), data: { n: 1 }, tags: { kind: 'alert' } });
    const skipped = await api(herald.url, API_KEY, 'publish', { channel: ch('room:opts'), data: { n: 2 }, skip_history: true });
    assert.equal(skipped.offset, undefined, 'no position outside history');
    const a = await api(herald.url, API_KEY, 'publish', { channel: ch('room:opts'), data: { n: 3 }, idempotency_key: 'once' });
    const b = await api(herald.url, API_KEY, 'publish', { channel: ch('room:opts'), data: { n: 99 }, idempotency_key: 'once' });
    assert.deepEqual(a, b);
    await api(herald.url, API_KEY, 'publish', { channel: ch('room:opts'), data: { n: 4 } });
    const got = await pubs.until(4);
    assert.deepEqual(got.map((p) => dec(p.data).n), [1, 2, 3, 4], 'the repeat was not published');
    assert.deepEqual(got[0].tags, { kind: 'alert' });
    const history = await sub.history({ limit: 10 });
    assert.deepEqual(history.publications.map((p) => dec(p.data).n), [1, 3, 4], 'skip_history is not stored');
  });

  test(`${codec}: Centrifugo's error messages; no personal channel unless configured`, async (t) => {
    const c = client({ token: token('errs') });
    t.after(() => c.disconnect());
    c.connect();
    const sub = c.newSubscription('nope:x');
    const refused = once(sub, 'unsubscribed');
    sub.subscribe();
    const r = await refused;
    assert.deepEqual([r.code, r.reason], [102, 'unknown channel']);
    // Not subscribed to personal:#errs at connect: subscribing to it is not "already subscribed".
    const personal = c.newSubscription('personal:#errs');
    personal.subscribe();
    await once(personal, 'subscribed');
  });

  test(`${codec}: join/leave reach only subscribers that asked for them`, async (t) => {
    const asked = client({ token: token('asked') });
    const quiet = client({ token: token('quiet') });
    const comer = client({ token: token('comer') });
    t.after(() => { asked.disconnect(); quiet.disconnect(); comer.disconnect(); });
    for (const c of [asked, quiet, comer]) c.connect();
    const aSub = asked.newSubscription(ch('room:jl'), { joinLeave: true });
    const qSub = quiet.newSubscription(ch('room:jl'));
    const aJoins = collect(aSub, 'join');
    const qJoins = collect(qSub, 'join');
    const qPubs = collect(qSub, 'publication');
    aSub.subscribe(); qSub.subscribe();
    await Promise.all([once(aSub, 'subscribed'), once(qSub, 'subscribed')]);
    const cSub = comer.newSubscription(ch('room:jl'));
    cSub.subscribe();
    await once(cSub, 'subscribed');
    await withTimeout(aJoins.until(2), 10000, 'joins for the one that asked'); // quiet's and comer's
    // A publication after the join: once quiet has it, a join would have arrived before it.
    await api(herald.url, API_KEY, 'publish', { channel: ch('room:jl'), data: { n: 1 } });
    await qPubs.until(1);
    assert.equal(qJoins.items.length, 0, 'no join for a subscriber that did not ask');
  });
}
