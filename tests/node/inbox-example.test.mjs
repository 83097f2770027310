// The inbox example (examples/inbox) in headless Chromium: one user in two tabs, notifications sent by the
// example's own script (send.mjs), then many random clicks in both tabs (read, unread, archive, unarchive,
// actions, mark all read). Both tabs must converge on the server's state: the same items with the same
// read marks, and a badge equal to the server's unread count. Screenshots go to a temporary directory
// (SCREENSHOT_DIR to choose it).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { sign, startHerald, withTimeout } from './lib.mjs';

const EXAMPLE = new URL('../../examples/inbox/', import.meta.url).pathname;
const SHOTS = process.env.SCREENSHOT_DIR ?? mkdtempSync(path.join(tmpdir(), 'herald-inbox-shots-'));
mkdirSync(SHOTS, { recursive: true });
const KEY = 'inbox-example-secret';
const pageErrors = [];
let herald, app, appUrl, browser;

// The example's own config on a free port, allowing the example app's origin whatever port it gets, and a
// rate that the test's fast clicking stays under.
const config = readFileSync(`${EXAMPLE}herald.toml`, 'utf8')
  .split('\n')
  .filter((l) => !/^(listen|data_dir)\s*=/.test(l))
  .map((l) => (l.startsWith('allowed_origins') ? 'allowed_origins = ["http://127.0.0.1:*"]' : l))
  .map((l) => (l === '[inbox]' ? '[inbox]\nuser_rate = 1000' : l))
  .join('\n');

before(async () => {
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
  if (herald) { await herald.stop(); herald.cleanup(); }
  console.log(`inbox screenshots: ${SHOTS}`);
  assert.deepEqual(pageErrors, [], 'errors in the page');
});

/** The server's view of alice's "all" tab and unread count. */
async function server() {
  const token = sign({ sub: 'alice', exp: Math.floor(Date.now() / 1000) + 600 }, KEY);
  const res = await fetch(`${herald.url}/inbox?limit=200`, { headers: { authorization: `Bearer ${token}` } });
  const page = await res.json();
  return { unread: page.counts.unread, items: page.items.map((i) => `${i.id}:${i.read_at ? 'read' : 'unread'}`) };
}

const view = (page) => page.evaluate(() => ({
  unread: Number(document.querySelector('#badge').dataset.count),
  items: [...document.querySelectorAll('li.item')].map((li) => `${li.dataset.id}:${li.classList.contains('unread') ? 'unread' : 'read'}`),
}));

/** Waits (with a deadline) until every tab shows what the server has. */
async function converged(tabs, ms = 15000) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    const want = await server();
    const got = await Promise.all(tabs.map(view));
    last = { want, got };
    if (got.every((g) => JSON.stringify(g) === JSON.stringify(want))) return want;
    if (Date.now() > deadline) assert.fail(`tabs did not converge: ${JSON.stringify(last)}`);
    await tabs[0].waitForTimeout(50); // polling the server and the pages, not waiting for an event
  }
}

test('two tabs converge on the server state after many random clicks', async () => {
  const context = await browser.newContext({ viewport: { width: 1000, height: 900 } });
  const tabs = [];
  for (let i = 0; i < 2; i++) {
    const page = await context.newPage();
    page.on('pageerror', (e) => pageErrors.push(e.message));
    await page.goto(appUrl);
    await page.click('#login button');
    await page.locator('#status', { hasText: 'live' }).waitFor({ timeout: 10000 });
    tabs.push(page);
  }
  // The example's script sends the notifications, as a backend would.
  const sent = spawn(process.execPath, ['send.mjs', 'alice', '12'], { cwd: EXAMPLE, env: { ...process.env, HERALD_URL: herald.url }, stdio: 'inherit' });
  assert.equal(await new Promise((r) => sent.on('exit', r)), 0, 'send.mjs succeeded');
  for (const t of tabs) await t.locator('li.item').nth(11).waitFor({ timeout: 10000 });
  let state = await converged(tabs);
  assert.equal(state.unread, 12);
  await tabs[0].screenshot({ path: path.join(SHOTS, 'inbox-12-unread.png') });

  // Random clicks in both tabs: a seeded generator, so a failure can be replayed.
  let seed = 42;
  const random = (n) => { seed = (seed * 1103515245 + 12345) % 2147483648; return seed % n; };
  for (let i = 0; i < 40; i++) {
    const tab = tabs[random(2)];
    if (random(10) === 0) { await tab.click('#read-all'); continue; }
    const items = tab.locator('li.item');
    const n = await items.count();
    if (n === 0) continue;
    // Any of the item's buttons but snooze (read/unread, archive/unarchive, its actions).
    const buttons = items.nth(random(n)).locator('button:not(.snooze)');
    const m = await buttons.count();
    if (m === 0) continue;
    // An item can leave the list (archived from the other tab) between counting and clicking.
    await buttons.nth(random(m)).click({ timeout: 500 }).catch(() => {});
  }
  // Whatever the clicks left, two items are unread again, from the second tab.
  for (const k of [0, 1]) {
    const item = tabs[1].locator('li.item').nth(k);
    if (!(await item.getAttribute('class')).includes('unread')) await item.locator('.toggle-read').click();
  }
  state = await converged(tabs);
  assert.ok(state.unread >= 2, JSON.stringify(state));
  await tabs[1].screenshot({ path: path.join(SHOTS, 'inbox-after-clicks.png') });

  // The unread tab shows exactly the unread items; archiving from the other tab takes one away live.
  await tabs[0].click('#tabs button[data-tab="unread"]');
  await tabs[0].waitForFunction((n) => document.querySelectorAll('li.item').length === n, state.unread, { timeout: 10000 });
  await tabs[1].click('#tabs button[data-tab="all"]');
  if (state.unread > 0) {
    const firstUnread = tabs[1].locator('li.item.unread').first();
    const id = await firstUnread.getAttribute('data-id');
    await firstUnread.locator('.toggle-archive').click();
    await tabs[0].waitForFunction((x) => !document.querySelector(`li.item[data-id="${x}"]`), id, { timeout: 10000 });
    await tabs[0].waitForFunction((n) => document.querySelector('#badge').dataset.count === String(n), state.unread - 1, { timeout: 10000 });
  }
  // Archived and category tabs exist and list from the server.
  await tabs[0].click('#tabs button[data-tab="archived"]');
  await tabs[0].locator('#tabs button[data-tab="billing"]').waitFor();
  await tabs[0].screenshot({ path: path.join(SHOTS, 'inbox-archived.png') });
  await context.close();
});

test('the push toggle subscribes through Herald or says why it cannot', async () => {
  // Notifications granted, so the toggle gets as far as the browser's push service: headless Chromium here
  // has none it can reach, and the page must say so and leave the toggle off; where it has one, the
  // subscription must be registered with Herald and removed again when the toggle is turned off.
  const context = await browser.newContext({ permissions: ['notifications'] });
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(appUrl);
  await page.click('#login button');
  await page.locator('#push-status', { hasText: 'Push off.' }).waitFor({ timeout: 10000 });
  assert.equal(await page.isEnabled('#push'), true, 'the toggle is usable once the VAPID key is known');
  assert.equal(await page.isChecked('#push'), false);

  await page.click('#push');
  // Settled when the toggle is enabled again.
  await page.waitForFunction(() => !document.querySelector('#push').disabled, null, { timeout: 30000 });
  const status = await page.textContent('#push-status');
  const checked = await page.isChecked('#push');
  const token = sign({ sub: 'alice', exp: Math.floor(Date.now() / 1000) + 600 }, KEY);
  const registered = async () => (await (await fetch(`${herald.url}/inbox/push/subscriptions`, { headers: { authorization: `Bearer ${token}` } })).json()).subscriptions;
  await page.screenshot({ path: path.join(SHOTS, 'inbox-push-toggle.png') });
  if (status === 'Push on.') {
    assert.equal(checked, true);
    assert.equal((await registered()).length, 1, 'the subscription is registered with Herald');
    await page.click('#push');
    await page.locator('#push-status', { hasText: 'Push off.' }).waitFor({ timeout: 10000 });
    assert.equal((await registered()).length, 0, 'turning push off unregisters it');
  } else {
    assert.match(status, /^Push is unavailable: .+/);
    assert.equal(checked, false, 'the toggle stays off when push is unavailable');
    assert.equal((await registered()).length, 0);
  }
  await context.close();
});
