// Herald driven by the real `centrifuge` npm SDK (with `ws` as its WebSocket in Node), in both of its builds:
// JSON and Protobuf (`centrifuge/build/protobuf`, which offers the `centrifuge-protobuf` subprotocol and
// sends binary frames). Each scenario runs once per codec: connect with a token, subscribe, receive, publish
// from a client, presence and join/leave, history, token refresh, and recovery after a cut connection and
// after a server restart.
import assert from 'node:assert/strict';
import { after, before, test } from 'node:test';

import { Centrifuge } from 'centrifuge';
import { Centrifuge as CentrifugeProtobuf } from 'centrifuge/build/protobuf';
import WebSocket from 'ws';

import { api, collect, once, sign, startHerald, startProxy, withTimeout } from './lib.mjs';

const KEY = 'node-test-secret';
const API_KEY = 'node-api-key';
const CONFIG = `
[auth]
jwt_key = "${KEY}"
[centrifugo]
api_key = "${API_KEY}"
refresh_grace = "1s"
[[centrifugo.namespaces]]
name = "chat"
publish = "subscribers"
presence = true
join_leave = true
`;

const now = () => Math.floor(Date.now() / 1000);
const token = (sub, ttl = 600, extra = {}) => sign({ sub, exp: now() + ttl, ...extra }, KEY);

const CODECS = [['json', Centrifuge], ['protobuf', CentrifugeProtobuf]];

// The application's data: JSON values with the JSON build; bytes (here, UTF-8 JSON) with the Protobuf build,
// whose SDK hands the app raw bytes both ways.
const text = new TextDecoder();
const codecData = (codec) => ({
  dec: (d) => (codec === 'protobuf' ? JSON.parse(text.decode(d)) : d),
  enc: (v) => (codec === 'protobuf' ? new TextEncoder().encode(JSON.stringify(v)) : v),
});

function clientOf(Impl) {
  return (url, opts = {}) => {
    const ws = url.replace(/^http/, 'ws') + '/connection/websocket';
    return new Impl(ws, { websocket: WebSocket, minReconnectDelay: 100, maxReconnectDelay: 300, ...opts });
  };
}

let herald;
before(async () => { herald = await startHerald({ config: CONFIG }); });
after(async () => { await herald.stop(); herald.cleanup(); });

for (const [codec, Impl] of CODECS) {
  const client = clientOf(Impl);
  const { dec, enc } = codecData(codec);

  test(`${codec}: connect, subscribe, receive from the server API, publish from a client, presence, join/leave, history`, async (t) => {
    const alice = client(herald.url, { token: token('alice', 600, { info: { name: 'Alice' } }) });
    const bob = client(herald.url, { token: token('bob') });
    t.after(() => { alice.disconnect(); bob.disconnect(); });

    const connected = once(alice, 'connected');
    alice.connect();
    const ctx = await connected;
    assert.ok(ctx.client, 'the server assigns a client id');

    const aSub = alice.newSubscription(`chat:lobby-${codec}`, { joinLeave: true });
    const joins = collect(aSub, 'join');
    const leaves = collect(aSub, 'leave');
    const aPubs = collect(aSub, 'publication');
    aSub.subscribe();
    await once(aSub, 'subscribed');

    bob.connect();
    const bSub = bob.newSubscription(`chat:lobby-${codec}`);
    const bPubs = collect(bSub, 'publication');
    bSub.subscribe();
    await once(bSub, 'subscribed');

    // Bob's arrival reaches Alice as a join with his user id.
    const join = (await joins.until(2)).find((j) => j.info.user === 'bob');
    assert.ok(join, `a join for bob among ${JSON.stringify(joins.items)}`);

    // A publication through the server API reaches both.
    const { offset } = await api(herald.url, API_KEY, 'publish', { channel: `chat:lobby-${codec}`, data: { text: 'from the backend' } });
    assert.ok(offset > 0);
    assert.deepEqual(dec((await aPubs.until(1))[0].data), { text: 'from the backend' });
    assert.equal((await bPubs.until(1))[0].offset, offset, 'the offset is the publication id for every client');

    // A client publication reaches the others, with its author.
    await bSub.publish(enc({ text: 'hi from bob' }));
    const got = (await aPubs.until(2))[1];
    assert.deepEqual(dec(got.data), { text: 'hi from bob' });
    assert.equal(got.info.user, 'bob');

    const presence = await aSub.presence();
    const users = Object.values(presence.clients).map((c) => c.user).sort();
    assert.deepEqual(users, ['alice', 'bob']);
    assert.deepEqual(dec(Object.values(presence.clients).find((c) => c.user === 'alice').connInfo), { name: 'Alice' });
    const stats = await aSub.presenceStats();
    assert.deepEqual([stats.numClients, stats.numUsers], [2, 2]);

    const history = await aSub.history({ limit: 10 });
    assert.deepEqual(history.publications.map((p) => dec(p.data).text), ['from the backend', 'hi from bob']);

    bSub.unsubscribe();
    const leave = await leaves.until(1);
    assert.equal(leave[0].info.user, 'bob');
  });

  test(`${codec}: refusals: a channel of other users, a namespace that does not exist, publishing without permission`, async (t) => {
    const carol = client(herald.url, { token: token('carol') });
    t.after(() => carol.disconnect());
    carol.connect();
    await once(carol, 'connected');

    // A permanent subscribe error moves the subscription to unsubscribed with the server's code.
    const dialog = carol.newSubscription('dialog#alice,bob');
    const dialogErr = once(dialog, 'unsubscribed');
    dialog.subscribe();
    assert.equal((await dialogErr).code, 103);

    const unknown = carol.newSubscription('nope:x');
    const unknownErr = once(unknown, 'unsubscribed');
    unknown.subscribe();
    assert.equal((await unknownErr).code, 102);

    // The default namespace does not let clients publish.
    await assert.rejects(carol.publish('news', enc({ x: 1 })), (e) => e.code === 103);
  });

  test(`${codec}: a token about to expire is refreshed without reconnecting`, async (t) => {
    let calls = 0;
    const dave = client(herald.url, {
      token: token('dave', 2),
      getToken: async () => { calls += 1; return token('dave', 600); },
    });
    t.after(() => dave.disconnect());
    const connected = once(dave, 'connected');
    dave.connect();
    const first = await connected;
    const disconnects = collect(dave, 'connecting'); // any after the first connect would be a drop

    // The SDK refreshes before exp; then the connection must outlive exp + grace.
    await withTimeout((async () => { while (calls === 0) await new Promise((r) => setTimeout(r, 50)); })(), 10000, 'getToken');
    const sub = dave.newSubscription(`chat:refresh-${codec}`);
    const pubs = collect(sub, 'publication');
    sub.subscribe();
    await once(sub, 'subscribed');
    const deadline = (now() + 4) * 1000; // past the old exp (2 s) plus the 1 s grace
    while (Date.now() < deadline) await new Promise((r) => setTimeout(r, 100));
    await api(herald.url, API_KEY, 'publish', { channel: `chat:refresh-${codec}`, data: { ok: true } });
    await pubs.until(1);
    assert.equal(disconnects.items.length, 0, 'never disconnected');
    assert.equal(dave.state, 'connected');
    assert.ok(first.client);
  });

  async function recoveryScenario(t, restartServer) {
    const proxy = await startProxy(herald.port);
    t.after(() => proxy.close());
    const url = `http://127.0.0.1:${proxy.port}`;
    const frank = client(url, { token: token('frank') });
    t.after(() => frank.disconnect());
    const sub = frank.newSubscription(`chat:recover-${codec}`);
    const pubs = collect(sub, 'publication');
    const subscribed = collect(sub, 'subscribed');
    sub.subscribe();
    frank.connect();
    await subscribed.until(1);

    await api(herald.url, API_KEY, 'publish', { channel: `chat:recover-${codec}`, data: { n: 1 } });
    await pubs.until(1);

    const reconnecting = once(frank, 'connecting');
    proxy.cut();
    await reconnecting;
    if (restartServer) {
      await herald.stop();
      herald = await startHerald({ config: CONFIG, dataDir: herald.dir, port: herald.port });
    }
    for (const n of [2, 3, 4]) await api(herald.url, API_KEY, 'publish', { channel: `chat:recover-${codec}`, data: { n } });
    proxy.restore();

    const again = (await subscribed.until(2))[1];
    assert.equal(again.wasRecovering, true);
    assert.equal(again.recovered, true, 'the gap is recovered from the log');
    await pubs.until(4);
    await api(herald.url, API_KEY, 'publish', { channel: `chat:recover-${codec}`, data: { n: 5 } });
    await pubs.until(5);
    assert.deepEqual(pubs.items.map((p) => dec(p.data).n), [1, 2, 3, 4, 5], 'every message once, in order');
    const offsets = pubs.items.map((p) => p.offset);
    assert.deepEqual([...offsets].sort((a, b) => a - b), offsets, 'offsets increase');
  }

  test(`${codec}: recovery after the connection is cut`, async (t) => { await recoveryScenario(t, false); });

  test(`${codec}: recovery after a server restart (SQLite log, same epoch)`, async (t) => { await recoveryScenario(t, true); });
}
