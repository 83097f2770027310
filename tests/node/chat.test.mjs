// The chat example (examples/chat) in headless Chromium: three users, a room with presence and history on
// join, and a private message that only its recipient (and sender) see.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { readFileSync } from 'node:fs';
import readline from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { startHerald, withTimeout } from './lib.mjs';

const EXAMPLE = new URL('../../examples/chat/', import.meta.url).pathname;
let herald, app, appUrl, browser;

before(async () => {
  // The example's own config, on a free port, allowing the example app's origin whatever port it gets.
  const config = readFileSync(`${EXAMPLE}herald.toml`, 'utf8')
    .split('\n')
    .filter((l) => !/^(listen|data_dir)\s*=/.test(l))
    .map((l) => (l.startsWith('allowed_origins') ? 'allowed_origins = ["http://127.0.0.1:*"]' : l))
    .join('\n');
  herald = await startHerald({ config });
  app = spawn(process.execPath, ['server.mjs'], { cwd: EXAMPLE, env: { ...process.env, PORT: '0', HERALD_URL: herald.url }, stdio: ['ignore', 'pipe', 'inherit'] });
  appUrl = await withTimeout(new Promise((resolve) => readline.createInterface({ input: app.stdout })
    .once('line', (l) => resolve(/(http:\S+)/.exec(l)[1]))), 10000, 'the example app');
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  app?.kill();
  await herald?.stop();
  herald?.cleanup();
});

async function join(user) {
  const page = await (await browser.newContext()).newPage();
  await page.goto(appUrl);
  await page.fill('#user', user);
  await page.click('#login button');
  await page.locator('#status', { hasText: `connected as ${user}` }).waitFor({ timeout: 10000 });
  await page.click('#room-form button'); // the default room: lobby
  await page.locator('#room-title', { hasText: 'room:lobby' }).waitFor();
  return page;
}

const items = (page, list) => page.locator(`#${list} li`).allTextContents();

test('rooms, presence, history on join and private messages in the browser', async () => {
  const alice = await join('alice');
  const bob = await join('bob');

  // Presence: alice sees bob arrive.
  await alice.locator('#presence li', { hasText: 'bob' }).waitFor({ timeout: 10000 });

  await alice.fill('#text', 'hello everyone');
  await alice.click('#send button');
  await bob.locator('#messages li', { hasText: 'hello everyone' }).waitFor({ timeout: 10000 });
  assert.ok((await items(bob, 'messages')).some((t) => t.startsWith('alice') && t.includes('hello everyone')));

  // History on join: carol was not there, but sees the message when she enters.
  const carol = await join('carol');
  await carol.locator('#messages li', { hasText: 'hello everyone' }).waitFor({ timeout: 10000 });

  // A private message reaches bob (and alice's own list), never carol.
  await alice.fill('#dm-to', 'bob');
  await alice.fill('#dm-text', 'just between us');
  await alice.click('#dm-form button');
  await bob.locator('#dms li', { hasText: 'just between us' }).waitFor({ timeout: 10000 });
  await alice.locator('#dms li', { hasText: 'just between us' }).waitFor({ timeout: 10000 });
  // Carol gets a message of her own afterwards; by then anything misrouted would have arrived before it.
  await bob.fill('#dm-to', 'carol');
  await bob.fill('#dm-text', 'hi carol');
  await bob.click('#dm-form button');
  await carol.locator('#dms li', { hasText: 'hi carol' }).waitFor({ timeout: 10000 });
  assert.deepEqual((await items(carol, 'dms')).filter((t) => t.includes('just between us')), []);

  // Leaving updates the others.
  await bob.close();
  await alice.locator('#messages li', { hasText: 'bob left' }).waitFor({ timeout: 10000 });
});
