// The HTMX example (examples/htmx) in headless Chromium: the backend renders the board from Herald's history
// and publishes every new message as HTML fragments (Mercure POST, one SSE event type per slot); htmx-ext-sse
// swaps them into every open page. Checks the server-rendered list, a message published between the render
// and the subscription (held back with a route), escaping of what users type, form errors, and a reload
// (no duplicate). A screenshot goes to a temporary directory (SCREENSHOT_DIR).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { startHerald, withTimeout } from './lib.mjs';

const EXAMPLE = new URL('../../examples/htmx/', import.meta.url).pathname;
const SHOTS = process.env.SCREENSHOT_DIR ?? mkdtempSync(path.join(tmpdir(), 'herald-htmx-shots-'));
mkdirSync(SHOTS, { recursive: true });
let herald, app, appUrl, browser;
const pageErrors = [];

before(async () => {
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
  console.log(`htmx screenshots: ${SHOTS}`);
  assert.deepEqual(pageErrors, [], 'errors in the pages');
});

/** Posts the form the way the page does, from outside any page. */
async function post(author, text) {
  const res = await fetch(`${appUrl}/messages`, { method: 'POST', body: new URLSearchParams({ author, text }) });
  assert.equal(res.status, 200);
  return { error: await res.text(), trigger: res.headers.get('hx-trigger') };
}

async function open() {
  const page = await (await browser.newContext({ viewport: { width: 1200, height: 800 } })).newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  return page;
}

const texts = (page) => page.locator('#messages li.message .text').allTextContents();

test('the backend publishes HTML fragments and every page swaps them in', async () => {
  for (const t of ['first', 'second', 'third']) assert.deepEqual(await post('setup', t), { error: '', trigger: 'posted' });

  // Rendered on the server from Herald's history, newest first, then live.
  const a = await open();
  await a.goto(appUrl);
  assert.deepEqual(await texts(a), ['third', 'second', 'first']);
  assert.match(await a.textContent('#latest'), /Latest: setup at/);
  await a.locator('#connection', { hasText: 'live' }).waitFor({ timeout: 10000 });

  // A message posted after page B was rendered but before its stream opened still reaches it, once: the
  // stream starts right after the last rendered update (lastEventID).
  const b = await open();
  let release;
  const held = new Promise((r) => { release = r; });
  await b.route((url) => url.pathname === '/.well-known/mercure', async (route) => { await held; await route.continue(); });
  await b.goto(appUrl);
  assert.deepEqual(await texts(b), ['third', 'second', 'first']);
  await post('setup', 'between the render and the stream');
  release();
  await b.locator('#messages .text', { hasText: 'between the render and the stream' }).waitFor({ timeout: 10000 });
  await b.locator('#connection', { hasText: 'live' }).waitFor({ timeout: 10000 });
  await b.unroute((url) => url.pathname === '/.well-known/mercure');
  await a.locator('#messages .text', { hasText: 'between the render and the stream' }).waitFor({ timeout: 10000 });
  assert.deepEqual(await texts(b), ['between the render and the stream', 'third', 'second', 'first']);

  // From the page's own form: the fragment reaches both pages, what the user typed is text, not markup; the
  // "latest" slot is replaced; the text box is cleared, the name kept.
  const typed = '<b>hi</b> & "bye" <img src=x onerror=alert(1)>';
  await a.fill('#author', 'ann');
  await a.fill('#text', typed);
  await a.click('form button');
  for (const page of [a, b]) {
    await page.locator('#messages li.message').first().locator('.author', { hasText: 'ann' }).waitFor({ timeout: 10000 });
    assert.equal(await page.locator('#messages li.message .text').first().textContent(), typed);
    assert.equal(await page.locator('#messages b, #messages img').count(), 0, 'no markup from a user in the page');
    await page.locator('#latest', { hasText: 'Latest: ann at' }).waitFor({ timeout: 5000 });
  }
  assert.equal(await a.inputValue('#text'), '');
  assert.equal(await a.inputValue('#author'), 'ann');

  // A form error is swapped into the form's error line, and nothing is published.
  await a.click('form button');
  await a.locator('#form-error', { hasText: 'Say something first.' }).waitFor({ timeout: 5000 });
  await a.fill('#text', 'after the error');
  await a.click('form button');
  await b.locator('#messages .text', { hasText: 'after the error' }).waitFor({ timeout: 10000 });
  await a.locator('#form-error:empty').waitFor({ timeout: 5000 });
  const expected = ['after the error', typed, 'between the render and the stream', 'third', 'second', 'first'];
  assert.deepEqual(await texts(b), expected);
  await a.locator('#messages .text', { hasText: 'after the error' }).waitFor({ timeout: 10000 });
  assert.deepEqual(await texts(a), expected);
  await a.screenshot({ path: path.join(SHOTS, 'htmx-1200x800.png') });

  // A reload renders the same list from history and goes live without repeating any of it.
  await b.reload();
  assert.deepEqual(await texts(b), expected);
  await b.locator('#connection', { hasText: 'live' }).waitFor({ timeout: 10000 });
  await post('setup', 'after the reload');
  await b.locator('#messages .text', { hasText: 'after the reload' }).waitFor({ timeout: 10000 });
  assert.deepEqual(await texts(b), ['after the reload', ...expected]);
});
