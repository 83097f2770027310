// The chat example (examples/chat) in headless Chromium: three users, a room with presence and history on
// join (the last 50 messages, oldest first), private messages that only their recipient (and sender) see and
// that are kept with an error when they cannot be sent, "Enter room" before "Join", the layout at desktop
// (1200x800) and phone (390x844) sizes, and a Herald without the chat config (the page says what is wrong).
// Screenshots go to a temporary directory (SCREENSHOT_DIR to choose it), printed at the end.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { api, startHerald, withTimeout } from './lib.mjs';

const EXAMPLE = new URL('../../examples/chat/', import.meta.url).pathname;
const API_KEY = 'chat-example-api-key';
const SHOTS = process.env.SCREENSHOT_DIR ?? mkdtempSync(path.join(tmpdir(), 'herald-chat-shots-'));
mkdirSync(SHOTS, { recursive: true });
const heralds = [], apps = [];
let herald, appUrl, browser;
const pageErrors = [];

// The example's own config, on a free port, allowing the example app's origin whatever port it gets.
const chatConfig = readFileSync(`${EXAMPLE}herald.toml`, 'utf8')
  .split('\n')
  .filter((l) => !/^(listen|data_dir)\s*=/.test(l))
  .map((l) => (l.startsWith('allowed_origins') ? 'allowed_origins = ["http://127.0.0.1:*"]' : l))
  .join('\n');

async function startChat(config) {
  const h = await startHerald({ config });
  heralds.push(h);
  const app = spawn(process.execPath, ['server.mjs'], { cwd: EXAMPLE, env: { ...process.env, PORT: '0', HERALD_URL: h.url }, stdio: ['ignore', 'pipe', 'inherit'] });
  apps.push(app);
  const url = await withTimeout(new Promise((resolve) => readline.createInterface({ input: app.stdout })
    .once('line', (l) => resolve(/(http:\S+)/.exec(l)[1]))), 10000, 'the example app');
  return { herald: h, url };
}

before(async () => {
  ({ herald, url: appUrl } = await startChat(chatConfig));
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  for (const app of apps) app.kill();
  for (const h of heralds) { await h.stop(); h.cleanup(); }
  console.log(`chat screenshots: ${SHOTS}`);
  assert.deepEqual(pageErrors, [], 'errors in the page');
});

async function open(url = appUrl, viewport = { width: 1200, height: 800 }) {
  const page = await (await browser.newContext({ viewport })).newPage();
  page.on('pageerror', (e) => pageErrors.push(`${url}: ${e.message}`));
  await page.goto(url);
  return page;
}

async function join(user, { room = 'lobby', viewport, url } = {}) {
  const page = await open(url, viewport);
  if (viewport && viewport.width < 700) await page.click('.tabs button[data-view="side"]');
  await page.fill('#user', user);
  await page.click('#login button');
  await page.locator('#status', { hasText: `connected as ${user}` }).waitFor({ timeout: 10000 });
  await page.fill('#room', room);
  await page.click('#room-form button');
  await page.locator('#room-title', { hasText: `room:${room}` }).waitFor();
  await page.locator('#send button:enabled').waitFor({ timeout: 10000 });
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
  assert.equal(await alice.inputValue('#text'), '', 'a sent message clears the box');

  // History on join: carol was not there, but sees the message when she enters, once.
  const carol = await join('carol');
  await carol.locator('#messages li', { hasText: 'hello everyone' }).waitFor({ timeout: 10000 });
  assert.equal((await items(carol, 'messages')).filter((t) => t.includes('hello everyone')).length, 1);

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
  await alice.locator('#presence li', { hasText: 'bob' }).waitFor({ state: 'detached', timeout: 10000 });
  await alice.close(); await carol.close();
});

test('a member whose connection drops gets what was said meanwhile, once', async () => {
  const kim = await join('kim', { room: 'drops' });
  await api(herald.url, API_KEY, 'publish', { channel: 'room:drops', data: { text: 'before the drop' } });
  await kim.locator('#messages li', { hasText: 'before the drop' }).waitFor({ timeout: 10000 });
  const kimsClient = async () => (await (await fetch(`${herald.url}/console/api/connections`)).json())
    .websocket.find((c) => c.user === 'kim')?.client;
  const before = await kimsClient();
  assert.ok(before, 'kim is connected');
  // Herald closes kim's connection with a code that tells the SDK to reconnect; two messages are published
  // before it is back.
  const res = await fetch(`${herald.url}/console/api/disconnect`, {
    method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user: 'kim', code: 3010, reason: 'test drop' }),
  });
  assert.equal(res.status, 200, await res.text());
  // The disconnect is carried out by kim's connection task, after the answer: publish only once the old
  // connection is gone, or the messages could still reach it live instead of through the recovery.
  for (let i = 0; i < 200 && (await kimsClient()) === before; i++) await new Promise((r) => setTimeout(r, 25));
  assert.notEqual(await kimsClient(), before, 'the old connection is closed');
  await api(herald.url, API_KEY, 'publish', { channel: 'room:drops', data: { text: 'during the drop 1' } });
  await api(herald.url, API_KEY, 'publish', { channel: 'room:drops', data: { text: 'during the drop 2' } });
  await kim.locator('#messages li', { hasText: 'during the drop 2' }).waitFor({ timeout: 15000 });
  await kim.locator('#status', { hasText: 'connected as kim' }).waitFor({ timeout: 10000 });
  const after = await kimsClient();
  assert.ok(after && after !== before, 'kim is back on a new connection');
  await api(herald.url, API_KEY, 'publish', { channel: 'room:drops', data: { text: 'after the drop' } });
  await kim.locator('#messages li', { hasText: 'after the drop' }).waitFor({ timeout: 10000 });
  assert.deepEqual((await kim.locator('#messages li').allTextContents()).map((t) => t.replace(/^server/, '')),
    ['before the drop', 'during the drop 1', 'during the drop 2', 'after the drop']);
  await kim.close();
});

test('history on join shows the last 50 messages, oldest first', async () => {
  for (let i = 1; i <= 60; i++) await api(herald.url, API_KEY, 'publish', { channel: 'room:history', data: { text: `message ${i}` } });
  const dora = await join('dora', { room: 'history' });
  await dora.locator('#messages li', { hasText: 'message 60' }).waitFor({ timeout: 10000 });
  const texts = await dora.locator('#messages li').allTextContents();
  assert.deepEqual(texts.map((t) => t.replace(/^server/, '')), Array.from({ length: 50 }, (_, i) => `message ${i + 11}`));
  await dora.close();
});

/** Fails unless the element is entirely inside the window. */
async function assertInView(page, selector) {
  const box = await page.locator(selector).boundingBox();
  const { width, height } = page.viewportSize();
  assert.ok(box, `${selector} is not displayed`);
  assert.ok(box.x >= 0 && box.y >= 0 && box.x + box.width <= width + 0.5 && box.y + box.height <= height + 0.5,
    `${selector} is outside the ${width}x${height} window: ${JSON.stringify(box)}`);
}

/** Fails if the page or a visible panel is wider than its box (something cut off on the right). */
async function assertNotClipped(page, what) {
  const clipped = await page.evaluate(() => {
    const out = [];
    if (document.documentElement.scrollWidth > innerWidth) out.push(`the page (${document.documentElement.scrollWidth}px)`);
    for (const el of document.querySelectorAll('.panel, .panel form')) {
      if (el.offsetParent !== null && el.scrollWidth > el.clientWidth + 1) out.push(`${el.id || el.className} (${el.scrollWidth} > ${el.clientWidth})`);
    }
    return out;
  });
  assert.deepEqual(clipped, [], `${what}: wider than the window`);
}

/** Waits until the newest line of a list is scrolled into its view. */
const newestVisible = (page, list, ms = 5000) => page.waitForFunction((id) => {
  const l = document.getElementById(id), li = l.lastElementChild;
  if (!li) return false;
  const a = l.getBoundingClientRect(), b = li.getBoundingClientRect();
  return b.top >= a.top - 1 && b.bottom <= a.bottom + 1;
}, list, { timeout: ms });

test('the layout works at 1200x800 and 390x844: everything reachable, nothing clipped, new messages scrolled into view', async () => {
  // Desktop: three columns; a long room scrolls inside its own list and keeps the newest line in view.
  const desk = await join('erin', { room: 'history' });
  await desk.locator('#messages li', { hasText: 'message 60' }).waitFor({ timeout: 10000 });
  await newestVisible(desk, 'messages');
  for (const sel of ['#login button', '#room-form button', '#send button', '#text', '#dm-to', '#dm-text', '#dm-form button', '#status']) await assertInView(desk, sel);
  await assertNotClipped(desk, '1200x800');
  const phoneUser = await join('frank', { room: 'history', viewport: { width: 390, height: 844 } });
  await phoneUser.fill('#text', 'a live message from the phone');
  await phoneUser.click('#send button');
  await desk.locator('#messages li', { hasText: 'a live message from the phone' }).waitFor({ timeout: 10000 });
  await newestVisible(desk, 'messages');
  await desk.fill('#dm-to', 'frank');
  await desk.fill('#dm-text', 'psst, frank');
  await desk.click('#dm-form button');
  await desk.locator('#dms li', { hasText: 'psst, frank' }).waitFor({ timeout: 10000 });
  await desk.screenshot({ path: path.join(SHOTS, 'chat-1200x800.png') });

  // Phone: one panel at a time; entering a room shows the room, with its newest line and the Send button.
  await phoneUser.locator('#messages li', { hasText: 'a live message from the phone' }).waitFor({ timeout: 10000 });
  await newestVisible(phoneUser, 'messages');
  for (const sel of ['#send button', '#text', '#room-title', '.tabs button[data-view="dms"]']) await assertInView(phoneUser, sel);
  assert.equal(await phoneUser.locator('#side').isVisible(), false, 'one panel at a time on a phone');
  await assertNotClipped(phoneUser, '390x844 room');
  await phoneUser.screenshot({ path: path.join(SHOTS, 'chat-390x844-room.png') });
  // The private message that arrived meanwhile is flagged on its tab.
  await phoneUser.locator('#dm-badge').waitFor({ state: 'visible', timeout: 5000 });
  await phoneUser.click('.tabs button[data-view="dms"]');
  await phoneUser.locator('#dms li', { hasText: 'psst, frank' }).waitFor({ timeout: 10000 });
  for (const sel of ['#dm-to', '#dm-text', '#dm-form button']) await assertInView(phoneUser, sel);
  await assertNotClipped(phoneUser, '390x844 private messages');
  await phoneUser.screenshot({ path: path.join(SHOTS, 'chat-390x844-private.png') });
  await phoneUser.click('.tabs button[data-view="side"]');
  await phoneUser.locator('#presence li', { hasText: 'erin' }).waitFor({ timeout: 10000 });
  for (const sel of ['#login button', '#room-form button']) await assertInView(phoneUser, sel);
  await assertNotClipped(phoneUser, '390x844 people');
  await phoneUser.screenshot({ path: path.join(SHOTS, 'chat-390x844-people.png') });
  await desk.close(); await phoneUser.close();
});

test('a private message to an invalid name shows an error and keeps the text', async () => {
  const gina = await join('gina');
  await gina.fill('#dm-to', 'not a name!');
  await gina.fill('#dm-text', 'do not lose me');
  await gina.click('#dm-form button');
  await gina.locator('#dm-error', { hasText: 'not a valid name' }).waitFor({ timeout: 5000 });
  assert.equal(await gina.inputValue('#dm-text'), 'do not lose me');
  assert.equal(await gina.inputValue('#dm-to'), 'not a name!');
  // Corrected, it goes, and the error goes away.
  await gina.fill('#dm-to', 'gina');
  await gina.click('#dm-form button');
  await gina.locator('#dms li', { hasText: 'do not lose me' }).waitFor({ timeout: 10000 });
  assert.equal(await gina.locator('#dm-error').isVisible(), false);
  assert.equal(await gina.inputValue('#dm-text'), '');
  await gina.close();
});

test('"Enter room" before "Join" asks for a name, or joins with the one typed', async () => {
  const page = await open();
  await page.click('#room-form button');
  await page.locator('#room-error', { hasText: 'name' }).waitFor({ timeout: 5000 });
  assert.equal(await page.textContent('#status'), 'not connected');
  assert.equal(await page.textContent('#room-title'), 'No room');

  await page.fill('#user', 'henry');
  await page.click('#room-form button');
  await page.locator('#status', { hasText: 'connected as henry' }).waitFor({ timeout: 10000 });
  await page.locator('#room-title', { hasText: 'room:lobby' }).waitFor({ timeout: 10000 });
  await page.locator('#presence li', { hasText: 'henry' }).waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#room-error').isVisible(), false);
  await page.close();
});

test('against a Herald without the chat config, the page says what is wrong', async () => {
  // `herald serve` as it comes: the development key, no allowed origins, no server API, no namespaces.
  const plain = await startChat('');
  const page = await open(plain.url);
  const problem = page.locator('#problem');
  await problem.waitFor({ state: 'visible', timeout: 10000 });
  const text = await problem.textContent();
  assert.match(text, /refuses WebSocket connections from this page's origin/);
  assert.match(text, /does not accept this app's tokens/);
  assert.match(text, /server API/);
  await page.fill('#user', 'ivan');
  await page.click('#login button');
  await page.locator('#status', { hasText: 'cannot connect to Herald' }).waitFor({ timeout: 10000 });
  await page.screenshot({ path: path.join(SHOTS, 'chat-no-config.png') });
  await page.close();

  // The right origin but another key: Herald closes the connection with 3500, and the page says why.
  const wrongKey = await startChat('[cors]\nallowed_origins = ["http://127.0.0.1:*"]\n[auth]\njwt_key = "another-secret"\n');
  const p2 = await open(wrongKey.url);
  await p2.fill('#user', 'ivan');
  await p2.click('#login button');
  await p2.locator('#problem', { hasText: '3500' }).waitFor({ timeout: 10000 });
  await p2.locator('#status', { hasText: 'refused' }).waitFor({ timeout: 5000 });
  await p2.close();

  // Everything but the room namespace: entering a room reports 102 instead of waiting for ever.
  const noRooms = await startChat('[cors]\nallowed_origins = ["http://127.0.0.1:*"]\n[auth]\njwt_key = "chat-example-secret"\n[centrifugo]\napi_key = "chat-example-api-key"\n');
  const p3 = await open(noRooms.url);
  await p3.fill('#user', 'ivan');
  await p3.click('#room-form button');
  await p3.locator('#room-error', { hasText: '102' }).waitFor({ timeout: 10000 });
  assert.equal(await p3.locator('#problem').isVisible(), false, 'nothing else is wrong');
  await p3.close();
});
