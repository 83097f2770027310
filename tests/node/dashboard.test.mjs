// The dashboard example (examples/dashboard) in headless Chromium: the publisher pushes this machine's figures
// through the server API, the page charts them over SSE; Herald is stopped and started again on the same data
// directory, and the page carries on without a gap (every sequence number the publisher gave, once, in order);
// a reload fills the charts from history. Screenshots go to a temporary directory (SCREENSHOT_DIR).
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import readline from 'node:readline';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { startHerald, withTimeout } from './lib.mjs';

const EXAMPLE = new URL('../../examples/dashboard/', import.meta.url).pathname;
const SHOTS = process.env.SCREENSHOT_DIR ?? mkdtempSync(path.join(tmpdir(), 'herald-dashboard-shots-'));
mkdirSync(SHOTS, { recursive: true });
const INTERVAL = 250; // ms between figures: the example's 1 s, sped up

// The example's own config on a free port, allowing the publisher's origin whatever port it gets.
const config = readFileSync(`${EXAMPLE}herald.toml`, 'utf8')
  .split('\n')
  .filter((l) => !/^(listen|data_dir)\s*=/.test(l))
  .map((l) => (l.startsWith('allowed_origins') ? 'allowed_origins = ["http://127.0.0.1:*"]' : l))
  .join('\n');

let herald, publisher, lines, browser;
const pageErrors = [];

/** The publisher's stdout, line by line, with a way to wait for a line that passes a test. */
function lineReader(stream) {
  const seen = [], waiters = [];
  readline.createInterface({ input: stream }).on('line', (l) => {
    seen.push(l);
    for (const w of [...waiters]) if (w.ok(l)) { waiters.splice(waiters.indexOf(w), 1); w.resolve(l); }
  });
  return {
    get count() { return seen.length; },
    /** The first line from the `since`-th on that passes `ok` (a function or a RegExp). */
    find(ok, since, ms = 10000) {
      if (ok instanceof RegExp) { const re = ok; ok = (l) => re.test(l); }
      const found = seen.slice(since).find(ok);
      if (found !== undefined) return Promise.resolve(found);
      return withTimeout(new Promise((resolve) => waiters.push({ ok, resolve })), ms, `publisher output (so far: ${seen.slice(-5).join(' | ')})`);
    },
  };
}

before(async () => {
  herald = await startHerald({ config });
  publisher = spawn(process.execPath, ['publisher.mjs'], {
    cwd: EXAMPLE, env: { ...process.env, PORT: '0', HERALD_URL: herald.url, INTERVAL_MS: String(INTERVAL) }, stdio: ['ignore', 'pipe', 'inherit'],
  });
  lines = lineReader(publisher.stdout);
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  publisher?.kill();
  await herald?.stop();
  herald?.cleanup();
  console.log(`dashboard screenshots: ${SHOTS}`);
  assert.deepEqual(pageErrors, [], 'errors in the page');
});

const seqs = (page) => page.evaluate(() => window.dashboard.figures.map((f) => f.seq));
const lastSeq = async (page) => (await seqs(page)).at(-1) ?? -1;
const waitSeq = (page, n, ms = 15000) => page.waitForFunction((n) => (window.dashboard?.figures.at(-1)?.seq ?? -1) >= n, n, { timeout: ms });

/** Every number from the first to the last, once, in order. */
function assertContiguous(list, what) {
  assert.ok(list.length > 0, `${what}: no figures`);
  const expected = Array.from({ length: list.at(-1) - list[0] + 1 }, (_, i) => list[0] + i);
  assert.deepEqual(list, expected, `${what}: figures missing or repeated`);
}

test('the charts go on without a gap across a restart of Herald, and a reload fills them from history', async () => {
  const appUrl = /(http:\S+)/.exec(await lines.find(/^dashboard on /, 0))[1];
  const page = await (await browser.newContext({ viewport: { width: 1200, height: 800 } })).newPage();
  page.on('pageerror', (e) => pageErrors.push(e.message));
  await page.goto(appUrl);
  await page.locator('#status', { hasText: 'live' }).waitFor({ timeout: 10000 });

  // The charts gain points.
  await page.waitForFunction(() => Number(document.getElementById('cpu').dataset.points) >= 3, null, { timeout: 10000 });
  const before = Number(await page.getAttribute('#cpu', 'data-points'));
  await page.waitForFunction((n) => Number(document.getElementById('cpu').dataset.points) > n, before, { timeout: 5000 });
  for (const id of ['mem', 'net', 'load']) assert.ok(Number(await page.getAttribute(`#${id}`, 'data-points')) > 0, `${id} chart drawn`);
  assert.match(await page.textContent('#cpu-now'), /^\d+%$/);

  // Herald goes away: the page says so, the publisher keeps its figures.
  let since = lines.count;
  await herald.stop();
  const atStop = await lastSeq(page);
  await page.locator('#status', { hasText: 'reconnecting' }).waitFor({ timeout: 10000 });
  await lines.find((l) => Number(/^(\d+) figure\(s\) waiting/.exec(l)?.[1]) >= 3, since);
  assert.equal(await lastSeq(page), atStop, 'nothing arrives while Herald is down');

  // Back on the same port and data directory: the page resumes from its last id, Herald replays what the
  // publisher sent once it was back, and live figures follow.
  since = lines.count;
  herald = await startHerald({ config, dataDir: herald.dir, port: herald.port });
  const back = await lines.find(/^Herald is back/, since);
  const lastQueued = Number(/last #(\d+)/.exec(back)[1]);
  await page.locator('#status', { hasText: 'live' }).waitFor({ timeout: 15000 });
  await waitSeq(page, lastQueued + 3);
  const live = await seqs(page);
  assertContiguous(live, 'after the restart');
  assert.ok(live[0] <= atStop, 'the figures from before the restart are still there');
  const st = await page.evaluate(() => ({ gaps: window.dashboard.gaps, reconnects: window.dashboard.reconnects, backfilled: window.dashboard.backfilled }));
  assert.equal(st.gaps, 0);
  assert.ok(st.reconnects >= 1, 'the page counted its reconnection');
  assert.ok(st.backfilled >= 2, `the figures of the outage came late, from history (${st.backfilled})`);
  assert.match(await page.textContent('#stats'), /missing: 0/);
  await page.screenshot({ path: path.join(SHOTS, 'dashboard-1200x800.png') });

  // A reload: the retained history (from before the restart too, kept in SQLite) fills the charts, then live.
  await page.reload();
  await page.locator('#status', { hasText: 'live' }).waitFor({ timeout: 10000 });
  const now = await lastSeq(page);
  await waitSeq(page, now + 2);
  const reloaded = await seqs(page);
  assertContiguous(reloaded, 'after a reload');
  assert.equal(reloaded[0], 0, 'history from the first figure on');
  assert.ok(Number(await page.getAttribute('#cpu', 'data-points')) >= reloaded.length - 1, 'the chart shows the history');

  const phone = await (await browser.newContext({ viewport: { width: 390, height: 844 } })).newPage();
  phone.on('pageerror', (e) => pageErrors.push(e.message));
  await phone.goto(appUrl);
  await phone.waitForFunction(() => Number(document.getElementById('load').dataset.points) >= 3, null, { timeout: 10000 });
  const overflow = await phone.evaluate(() => document.documentElement.scrollWidth - innerWidth);
  assert.ok(overflow <= 0, `the page is ${overflow}px wider than a phone`);
  await phone.screenshot({ path: path.join(SHOTS, 'dashboard-390x844.png'), fullPage: true });
});
