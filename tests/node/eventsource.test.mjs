// Herald with the npm `eventsource` client (a WHATWG EventSource no one here wrote): it subscribes, receives,
// is cut off, reconnects on its own with Last-Event-ID, and gets exactly the messages it missed, in order,
// once. The cut is made by a TCP proxy the client does not know about, and once by a server restart.
import assert from 'node:assert/strict';
import { test } from 'node:test';

import { EventSource } from 'eventsource';

import { collect, once, sign, startHerald, startProxy } from './lib.mjs';

const KEY = 'es-test-secret';
const CONFIG = `[auth]\njwt_key = "${KEY}"\nallow_anonymous = true\n[mercure]\nheartbeat = "1s"\n`;
const TOPIC = 'https://example.com/feed';

async function publish(herald, id, data) {
  const res = await fetch(`${herald.url}/.well-known/mercure`, {
    method: 'POST',
    headers: { authorization: `Bearer ${sign({ mercure: { publish: ['*'] } }, KEY)}` },
    body: new URLSearchParams({ topic: TOPIC, id, data }),
  });
  assert.equal(res.status, 200, await res.text());
}

async function scenario(t, restart) {
  let herald = await startHerald({ config: CONFIG });
  const proxy = await startProxy(herald.port);
  t.after(async () => { es.close(); await proxy.close(); await herald.stop(); herald.cleanup(); });

  const url = new URL(`http://127.0.0.1:${proxy.port}/.well-known/mercure`);
  url.searchParams.append('topic', TOPIC);
  // Record, per request, the Last-Event-ID the client sends and the one Herald answers: a restart that lost
  // the log would answer `earliest` and could still look right from the messages alone.
  const requests = [];
  const es = new EventSource(url, {
    fetch: async (input, init) => {
      const sent = new Headers(init?.headers).get('last-event-id');
      const res = await fetch(input, init);
      requests.push({ sent, answered: res.headers.get('last-event-id') });
      return res;
    },
  });
  const messages = collect(es, 'message');
  const opened = once(es, 'open');
  await opened;

  await publish(herald, 'm1', 'one');
  await messages.until(1);

  const lost = once(es, 'error');
  proxy.cut();
  await lost; // the client noticed and is reconnecting by itself
  if (restart) {
    await herald.stop();
    herald = await startHerald({ config: CONFIG, dataDir: herald.dir, port: herald.port });
  }
  for (const [id, data] of [['m2', 'two'], ['m3', 'three\nwith a second line'], ['m4', 'four']]) {
    await publish(herald, id, data);
  }
  const reopened = once(es, 'open', () => true, 20000);
  proxy.restore();
  await reopened;

  await messages.until(4, 20000);
  await publish(herald, 'm5', 'five');
  await messages.until(5);
  assert.deepEqual(messages.items.map((m) => m.lastEventId), ['m1', 'm2', 'm3', 'm4', 'm5'], 'each once, in order');
  const reconnect = requests.filter((r) => r.answered !== null || r.sent !== null).at(-1);
  assert.equal(requests[0].sent, null, 'the first request has no Last-Event-ID');
  assert.deepEqual(reconnect, { sent: 'm1', answered: 'm1' }, 'resumed after m1, and Herald knew m1');
  assert.equal(messages.items[2].data, 'three\nwith a second line');
}

test('reconnects by itself after its connection is cut and gets what it missed', async (t) => {
  await scenario(t, false);
});

test('reconnects after a server restart and gets what it missed from the SQLite log', async (t) => {
  await scenario(t, true);
});
