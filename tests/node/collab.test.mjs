// The collaborative editor (examples/collab) in headless Chromium against the real binary: two pages type
// into the same document at the same time and converge, each shows the other in its presence list and
// cursors, and after Herald restarts (same data directory, same port) reloaded pages still show the text.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { startHerald, withTimeout } from './lib.mjs';

const EXAMPLE = new URL('../../examples/collab/', import.meta.url).pathname;
const config = readFileSync(`${EXAMPLE}herald.toml`, 'utf8')
  .split('\n')
  .filter((l) => !/^(listen|data_dir)\s*=/.test(l))
  .map((l) => (l.startsWith('allowed_origins') ? 'allowed_origins = ["http://127.0.0.1:*"]' : l))
  .join('\n');

let browser, app, appUrl, herald;
const dataDir = mkdtempSync(path.join(tmpdir(), 'herald-collab-'));
const pageErrors = [];

before(async () => {
  herald = await startHerald({ config, dataDir });
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
  rmSync(dataDir, { recursive: true, force: true });
  assert.deepEqual(pageErrors, [], 'errors in the pages');
});

async function open(user, doc) {
  const page = await (await browser.newContext({ viewport: { width: 1000, height: 700 } })).newPage();
  page.on('pageerror', (e) => pageErrors.push(`${user}: ${e.message}`));
  await page.goto(`${appUrl}/?doc=${doc}&user=${user}`);
  await page.locator('#status', { hasText: `editing collab/${doc} as ${user}` }).waitFor({ timeout: 15000 });
  await page.waitForFunction(() => window.collab?.provider.synced, null, { timeout: 15000 });
  return page;
}

const editorText = (page) => page.evaluate(() => window.collab.quill.getText());

test('two pages edit one document at once and converge, then keep it across a restart', async () => {
  const ada = await open('ada', 'notes');
  const bob = await open('bob', 'notes');
  // Presence: each page lists the other (awareness through Herald).
  await ada.locator('#people span', { hasText: 'bob' }).waitFor({ timeout: 10000 });
  await bob.locator('#people span', { hasText: 'ada' }).waitFor({ timeout: 10000 });

  // Both type at the same time, into the same line.
  await Promise.all([
    ada.locator('.ql-editor').click().then(() => ada.keyboard.type('Ada was here. ', { delay: 5 })),
    bob.locator('.ql-editor').click().then(() => bob.keyboard.type('Bob too. ', { delay: 5 })),
  ]);
  const converged = (page) => page.waitForFunction(() => {
    const t = window.collab.quill.getText();
    return t.includes('Ada was here. ') && t.includes('Bob too. ');
  }, null, { timeout: 15000 });
  await Promise.all([converged(ada), converged(bob)]);
  const text = await editorText(ada);
  assert.equal(await editorText(bob), text);
  // Formatting travels too: bold from bob's page shows in ada's.
  await bob.evaluate(() => window.collab.quill.formatText(0, 3, 'bold', true, 'user'));
  await ada.locator('.ql-editor strong').first().waitFor({ timeout: 10000 });
  // bob's cursor is drawn in ada's editor (quill-cursors), labelled with his name.
  await ada.locator('.ql-cursor-name', { hasText: 'bob' }).waitFor({ state: 'attached', timeout: 10000 });

  // Herald restarts on the same data directory and port; reloaded pages show the document.
  await herald.stop();
  herald = await startHerald({ config, dataDir, port: herald.port });
  for (const page of [ada, bob]) {
    await page.reload();
    await page.locator('#status', { hasText: 'editing collab/notes' }).waitFor({ timeout: 15000 });
    await page.waitForFunction((want) => window.collab.quill.getText() === want, text, { timeout: 15000 });
  }
  assert.equal(await ada.locator('.ql-editor strong').first().textContent(), text.slice(0, 3));
  // A third page, never open before, loads it from Herald alone.
  const cy = await open('cy', 'notes');
  assert.equal(await editorText(cy), text);
});

test('another document is another document', async () => {
  const page = await open('dan', 'elsewhere');
  assert.equal((await editorText(page)).trim(), '');
});
