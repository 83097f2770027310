// Web Push end to end: the real `herald` binary pushes to `web-push-testing`, a mock push service from npm
// that hands out subscriptions like a browser's, checks the VAPID token against the key the subscription
// was made with, decrypts each message (aes128gcm) and lets the test read the plaintext back. A user with
// an open connection gets no push; preferences turn push off per category; a subscription the service
// calls expired (410) is removed from Herald.
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { test } from 'node:test';

import { EventSource } from 'eventsource';

import { once, sign, startHerald, withTimeout } from './lib.mjs';

const require = createRequire(import.meta.url);
const PushTestingServer = require('web-push-testing/src/server.js');
const { PushApiModel } = require('web-push-testing/src/PushApiModel.js');

const KEY = 'push-node-secret';
const API_KEY = 'push-node-api-key';
// One worker: pushes go out in the order notifications were made, so a later user's push arriving proves
// an earlier one was never queued.
const CONFIG = `[auth]\njwt_key = "${KEY}"\n[centrifugo]\napi_key = "${API_KEY}"\n[inbox]\nenabled = true\n`
  + `[inbox.push]\nenabled = true\nsubject = "mailto:ops@example.com"\nallow_insecure_endpoints = true\n`
  + `workers = 1\nretry_delay = "100ms"\n`;
const token = (sub) => sign({ sub, exp: Math.floor(Date.now() / 1000) + 600 }, KEY);

/** The mock push service in this process, on a free port. */
async function startPushService() {
  const model = new PushApiModel();
  const server = new PushTestingServer(model, 0);
  // It announces itself on stdout, which is the test runner's.
  const log = console.log;
  console.log = () => {};
  try {
    server.startServer();
    await withTimeout(new Promise((r) => (server._server.listening ? r() : server._server.once('listening', r))), 5000, 'web-push-testing to listen');
  } finally { console.log = log; }
  const { port } = server._server.address();
  // Its endpoints are built from the port it was given; it was given 0.
  model.notifyUrl = `http://localhost:${port}/notify/`;
  const url = `http://localhost:${port}`;
  const post = async (path, body) => {
    const res = await fetch(`${url}${path}`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify(body ?? {}),
    });
    return { status: res.status, body: await res.text() };
  };
  return {
    async subscribe(applicationServerKey) {
      const r = await post('/subscribe', { applicationServerKey, userVisibleOnly: 'true' });
      assert.equal(r.status, 200, r.body);
      return JSON.parse(r.body).data;
    },
    async messages(clientHash) {
      const r = await post('/get-notifications', { clientHash });
      assert.equal(r.status, 200, r.body);
      return JSON.parse(r.body).data.messages.map((m) => JSON.parse(m));
    },
    async expire(clientHash) {
      const r = await post(`/expire-subscription/${clientHash}`);
      assert.equal(r.status, 200, r.body);
    },
    close: () => new Promise((r) => { server._server.closeAllConnections?.(); server._server.close(r); }),
  };
}

async function call(url, path, { method = 'GET', user, body, apiKey } = {}) {
  const headers = { 'content-type': 'application/json' };
  if (user) headers.authorization = `Bearer ${token(user)}`;
  if (apiKey) headers['x-api-key'] = apiKey;
  const res = await fetch(`${url}${path}`, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  return { status: res.status, json: await res.json() };
}

async function notify(url, users, item) {
  const r = await call(url, '/api/inbox_notify', { method: 'POST', apiKey: API_KEY, body: { users, item } });
  assert.equal(r.status, 200, JSON.stringify(r.json));
  return r.json.result;
}

/** Polls `read` until `done` holds, for at most `ms` (every check is a real request). */
async function until(read, done, ms, what) {
  const deadline = Date.now() + ms;
  for (let i = 0; i < 1000; i++) {
    const v = await read();
    if (done(v)) return v;
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}: ${JSON.stringify(v)}`);
    await new Promise((r) => setTimeout(r, 50));
  }
  throw new Error(`gave up waiting for ${what}`);
}

test('pushes reach a mock push service, decrypted, per connection and preference', async (t) => {
  const push = await startPushService();
  t.after(() => push.close());
  const herald = await startHerald({ config: CONFIG });
  t.after(async () => { await herald.stop(); herald.cleanup(); });

  const vapid = await call(herald.url, '/inbox/push/vapid');
  assert.equal(vapid.status, 200, JSON.stringify(vapid.json));
  const key = vapid.json.public_key;
  assert.equal(Buffer.from(key, 'base64url').length, 65);

  const devices = {};
  for (const user of ['alice', 'bob', 'carol']) {
    devices[user] = await push.subscribe(key);
    const { clientHash, ...subscription } = devices[user];
    const r = await call(herald.url, '/inbox/push/subscriptions', { method: 'POST', user, body: subscription });
    assert.equal(r.status, 201, JSON.stringify(r.json));
    assert.equal(r.json.subscription.endpoint, subscription.endpoint);
  }

  // Nobody is connected: alice's notification is pushed, encrypted, and decrypts to the item.
  const created = await notify(herald.url, ['alice'], {
    title: 'Build failed', body: 'main is red', category: 'ci', action_url: 'https://ci.example.com/1',
  });
  const [sent] = await until(() => push.messages(devices.alice.clientHash), (m) => m.length >= 1, 10000, "alice's push");
  assert.deepEqual(
    { type: sent.type, id: sent.id, title: sent.title, body: sent.body, category: sent.category, action_url: sent.action_url },
    { type: 'inbox', id: created.delivered[0].id, title: 'Build failed', body: 'main is red', category: 'ci', action_url: 'https://ci.example.com/1' },
  );

  // Alice opens her inbox live: no push while she reads it. Carol turned pushes of "general" off.
  const es = new EventSource(`${herald.url}/.well-known/mercure?topic=${encodeURIComponent('inbox:#alice')}&authorization=${token('alice')}`);
  t.after(() => es.close());
  await once(es, 'open');
  const prefs = await call(herald.url, '/inbox/preferences', {
    method: 'PUT', user: 'carol', body: { categories: { general: { push: false } } },
  });
  assert.equal(prefs.status, 200, JSON.stringify(prefs.json));
  const live = once(es, 'message', (e) => e.data.includes('while you read'));
  await notify(herald.url, ['alice', 'carol'], { title: 'while you read' });
  await live;
  // Bob's push comes after theirs in the one worker's queue: once it is in, theirs would be too.
  await notify(herald.url, ['bob'], { title: 'marker' });
  const bobs = await until(() => push.messages(devices.bob.clientHash), (m) => m.length >= 1, 10000, "bob's push");
  assert.equal(bobs[0].title, 'marker');
  assert.equal((await push.messages(devices.alice.clientHash)).length, 1, 'no push to a connected user');
  assert.equal((await push.messages(devices.carol.clientHash)).length, 0, 'no push in a category turned off');

  // Carol still gets other categories.
  await notify(herald.url, ['carol'], { title: 'you were mentioned', category: 'mentions' });
  const carols = await until(() => push.messages(devices.carol.clientHash), (m) => m.length >= 1, 10000, "carol's push");
  assert.equal(carols[0].title, 'you were mentioned');

  // Bob's subscription expires at the push service: the next push gets 410, and Herald forgets it.
  await push.expire(devices.bob.clientHash);
  await notify(herald.url, ['bob'], { title: 'into the void' });
  await until(
    async () => (await call(herald.url, '/inbox/push/subscriptions', { user: 'bob' })).json.subscriptions,
    (subs) => subs.length === 0, 10000, "bob's expired subscription to be removed",
  );
  const alices = await call(herald.url, '/inbox/push/subscriptions', { user: 'alice' });
  assert.equal(alices.json.subscriptions.length, 1, "alice's subscription stays");

  // Unsubscribing through the API stops pushes to that device.
  es.close();
  const del = await call(herald.url, '/inbox/push/subscriptions', {
    method: 'DELETE', user: 'alice', body: { endpoint: devices.alice.endpoint },
  });
  assert.equal(del.status, 200, JSON.stringify(del.json));
  const metrics = await (await fetch(`${herald.url}/metrics`)).text();
  assert.match(metrics, /herald_inbox_push_sent_total \d+/);
  assert.match(metrics, /herald_inbox_push_removed_total 1/);
});
