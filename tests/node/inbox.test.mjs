// The notification centre with the npm clients users run: a device on EventSource (`eventsource`) and one on
// the Centrifugo protocol (`centrifuge` + `ws`). A read made on one device reaches the other with the new
// counts; a device that loads a page and subscribes from the page's position misses nothing; a device that
// was offline through changes and a server restart resumes with exactly what it missed.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { Centrifuge } from 'centrifuge';
import { EventSource } from 'eventsource';
import WebSocket from 'ws';

import { collect, once, sign, startHerald, startProxy } from './lib.mjs';

const KEY = 'inbox-node-secret';
const API_KEY = 'inbox-node-api-key';
const CONFIG = `[auth]\njwt_key = "${KEY}"\n[centrifugo]\napi_key = "${API_KEY}"\n[inbox]\nenabled = true\n`;
const token = (sub) => sign({ sub, exp: Math.floor(Date.now() / 1000) + 600 }, KEY);

async function backend(url, method, body) {
  const res = await fetch(`${url}/api/inbox_${method}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'x-api-key': API_KEY },
    body: JSON.stringify(body),
  });
  const json = await res.json();
  assert.equal(res.status, 200, JSON.stringify(json));
  return json.result;
}

async function browser(url, user, method, path, body) {
  const res = await fetch(`${url}${path}`, {
    method,
    headers: { authorization: `Bearer ${token(user)}`, 'content-type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const json = await res.json();
  assert.equal(res.status, 200, JSON.stringify(json));
  return json;
}

const centrifuge = (url, user) => new Centrifuge(`${url.replace(/^http/, 'ws')}/connection/websocket`, {
  websocket: WebSocket, token: token(user), minReconnectDelay: 100, maxReconnectDelay: 300,
});

test('a read on one device reaches the other, with the new counts', async (t) => {
  const herald = await startHerald({ config: CONFIG });
  t.after(async () => { await herald.stop(); herald.cleanup(); });
  const page = await browser(herald.url, 'alice', 'GET', '/inbox');
  assert.equal(page.channel, 'inbox:#alice');

  // Device A: the centrifuge SDK, subscribed from the page's position.
  const a = centrifuge(herald.url, 'alice');
  t.after(() => a.disconnect());
  const subA = a.newSubscription(page.channel, { since: { offset: page.position.offset, epoch: page.position.epoch } });
  const eventsA = collect(subA, 'publication');
  const subscribed = once(subA, 'subscribed');
  subA.subscribe();
  a.connect();
  await subscribed;

  // Device B: EventSource, from the same position.
  const u = new URL(`${herald.url}/.well-known/mercure`);
  u.searchParams.append('topic', page.channel);
  u.searchParams.append('authorization', token('alice'));
  u.searchParams.append('lastEventID', page.position.last_event_id);
  const b = new EventSource(u);
  t.after(() => b.close());
  const eventsB = collect(b, 'message');
  await once(b, 'open');

  const sent = await backend(herald.url, 'notify', { users: ['alice', 'bob'], item: { title: 'Build failed', category: 'ci' } });
  const id = sent.delivered[0].id;
  const createdA = (await eventsA.until(1))[0].data;
  const createdB = JSON.parse((await eventsB.until(1))[0].data);
  assert.deepEqual(createdA, createdB, 'the same event on both devices');
  assert.equal(createdA.type, 'created');
  assert.equal(createdA.counts.unread, 1);

  // Device A reads it; device B learns at once.
  await browser(herald.url, 'alice', 'POST', `/inbox/items/${id}`, { read: true });
  const updated = JSON.parse((await eventsB.until(2))[1].data);
  assert.equal(updated.type, 'updated');
  assert.equal(updated.items[0].id, id);
  assert.equal(updated.counts.unread, 0);
  assert.deepEqual((await eventsA.until(2))[1].data, updated);
  // Bob's copy is untouched, and nothing of his reached alice's devices.
  const bob = await browser(herald.url, 'bob', 'GET', '/inbox/counts');
  assert.equal(bob.counts.unread, 1);
  assert.deepEqual(eventsB.items.map((e) => JSON.parse(e.data).version), [1, 2]);
});

test('an offline device resumes with exactly what it missed, across a server restart', async (t) => {
  let herald = await startHerald({ config: CONFIG });
  const proxy = await startProxy(herald.port);
  t.after(async () => { await proxy.close(); await herald.stop(); herald.cleanup(); });
  await backend(herald.url, 'notify', { users: ['carol'], item: { title: 'before the page' } });
  const page = await browser(herald.url, 'carol', 'GET', '/inbox');
  assert.equal(page.version, 1);

  const device = centrifuge(`http://127.0.0.1:${proxy.port}`, 'carol');
  t.after(() => device.disconnect());
  const sub = device.newSubscription(page.channel, { since: { offset: page.position.offset, epoch: page.position.epoch } });
  const events = collect(sub, 'publication');
  const subscribed = collect(sub, 'subscribed');
  sub.subscribe();
  device.connect();
  await subscribed.until(1);
  await backend(herald.url, 'notify', { users: ['carol'], item: { title: 'online' } });
  await events.until(1);

  const offline = once(device, 'connecting');
  proxy.cut();
  await offline;
  const second = await backend(herald.url, 'notify', { users: ['carol'], item: { title: 'while offline' } });
  await browser(herald.url, 'carol', 'POST', `/inbox/items/${second.delivered[0].id}`, { archived: true });
  await herald.stop();
  herald = await startHerald({ config: CONFIG, dataDir: herald.dir, port: herald.port });
  await backend(herald.url, 'notify', { users: ['carol'], item: { title: 'after the restart' } });
  proxy.restore();

  const again = (await subscribed.until(2, 20000))[1];
  assert.equal(again.recovered, true, 'recovered from the log');
  await events.until(4, 20000);
  const seen = events.items.map((p) => [p.data.version, p.data.type]);
  assert.deepEqual(seen, [[2, 'created'], [3, 'created'], [4, 'updated'], [5, 'created']], 'each once, in order');
  const last = events.items.at(-1).data;
  const counts = await browser(herald.url, 'carol', 'GET', '/inbox/counts');
  assert.deepEqual(last.counts, counts.counts, 'the last event carries the counts the server has');
});
