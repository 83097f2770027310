// The embedding example (examples/embed, a cargo example: `cargo build --example embed`) in headless Chromium:
// an axum app with its own login that mounts Herald's router. Logging in sets the hub cookie; the page's
// EventSource (withCredentials) reads the user's private notes and the public activity; a note saved through
// the app's own route (hub.publish in process) reaches its author, and only its author. A screenshot goes to a
// temporary directory (SCREENSHOT_DIR).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { withTimeout } from './lib.mjs';

const SHOTS = process.env.SCREENSHOT_DIR ?? mkdtempSync(path.join(tmpdir(), 'herald-embed-shots-'));
mkdirSync(SHOTS, { recursive: true });
const BIN = process.env.HERALD_EMBED_BIN ?? new URL('../../target/debug/examples/embed', import.meta.url).pathname;
let app, appUrl, dataDir, browser;
const pageErrors = [];

before(async () => {
  assert.ok(existsSync(BIN), `${BIN} is missing: cargo build --example embed (scripts/test.sh does)`);
  dataDir = mkdtempSync(path.join(tmpdir(), 'herald-embed-'));
  app = spawn(BIN, [], { env: { ...process.env, EMBED_LISTEN: '127.0.0.1:0', EMBED_DATA_DIR: dataDir }, stdio: ['ignore', 'pipe', 'inherit'] });
  appUrl = await withTimeout(new Promise((resolve, reject) => {
    app.once('exit', (code) => reject(new Error(`the embed example exited (${code})`)));
    readline.createInterface({ input: app.stdout }).once('line', (l) => resolve(/(http:\S+)/.exec(l)[1]));
  }), 15000, 'the embed example to listen');
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  if (app && app.exitCode === null) {
    const exited = new Promise((r) => app.once('exit', r));
    app.kill('SIGTERM');
    await withTimeout(exited, 10000, 'the embed example to shut down');
  }
  if (dataDir) rmSync(dataDir, { recursive: true, force: true });
  console.log(`embed screenshots: ${SHOTS}`);
  assert.deepEqual(pageErrors, [], 'errors in the pages');
});

async function login(user, password) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(appUrl);
  await page.fill('#user', user);
  await page.fill('#password', password);
  await page.click('form.login button');
  return { context, page };
}

const items = (page, list) => page.locator(`#${list} li`).allTextContents();

test('log in, save a note through the app route (hub.publish), receive it over SSE with the hub cookie', async () => {
  const wrong = await login('alice', 'not her password');
  await wrong.page.locator('#error', { hasText: 'Wrong name or password' }).waitFor({ timeout: 5000 });
  assert.deepEqual(await wrong.context.cookies(), [], 'no cookie without a login');
  await wrong.context.close();

  const alice = await login('alice', 'wonderland');
  await alice.page.locator('h1', { hasText: 'Notes of alice' }).waitFor({ timeout: 5000 });
  await alice.page.locator('#status', { hasText: 'live' }).waitFor({ timeout: 10000 });
  // The hub cookie: for Herald's path only, out of reach of scripts.
  const hubCookie = (await alice.context.cookies()).find((c) => c.name === 'mercureAuthorization');
  assert.ok(hubCookie, 'the login set the hub cookie');
  assert.equal(hubCookie.path, '/.well-known/mercure');
  assert.equal(hubCookie.httpOnly, true);
  assert.equal(hubCookie.sameSite, 'Strict');
  assert.equal(await alice.page.evaluate(() => document.cookie), '');

  await alice.page.fill('#text', 'buy milk');
  await alice.page.click('#note button');
  await alice.page.locator('#notes li', { hasText: 'buy milk' }).waitFor({ timeout: 10000 });
  await alice.page.locator('#activity li', { hasText: 'you saved a note' }).waitFor({ timeout: 10000 });
  assert.equal(await alice.page.inputValue('#text'), '');

  // Bob sees the public activity (from history) but not alice's notes; his note does not reach alice.
  const bob = await login('bob', 'builder');
  await bob.page.locator('#activity li', { hasText: 'alice saved a note' }).waitFor({ timeout: 10000 });
  await bob.page.fill('#text', 'fix the roof');
  await bob.page.click('#note button');
  await bob.page.locator('#notes li', { hasText: 'fix the roof' }).waitFor({ timeout: 10000 });
  // The activity line is published after the note: once alice has it, a misrouted note would be there too.
  await alice.page.locator('#activity li', { hasText: 'bob saved a note' }).waitFor({ timeout: 10000 });
  assert.deepEqual(await items(alice.page, 'notes'), [await alice.page.locator('#notes li').first().textContent()]);
  assert.ok((await items(alice.page, 'notes'))[0].startsWith('buy milk'));
  assert.ok((await items(bob.page, 'notes')).every((t) => !t.includes('buy milk')));

  // A reload replays the notes from Herald's history, once.
  await alice.page.reload();
  await alice.page.locator('#notes li', { hasText: 'buy milk' }).waitFor({ timeout: 10000 });
  await alice.page.locator('#activity li', { hasText: 'bob saved a note' }).waitFor({ timeout: 10000 });
  assert.equal((await items(alice.page, 'notes')).length, 1);
  await alice.page.screenshot({ path: path.join(SHOTS, 'embed-notes.png') });

  // Logging out clears both cookies.
  await alice.page.click('header form button');
  await alice.page.locator('form.login').waitFor({ timeout: 5000 });
  assert.deepEqual((await alice.context.cookies()).map((c) => c.name), []);
});
