// The Vue and React examples (examples/vue, examples/react), each built with vite and run in headless Chromium
// against the real binary through a TCP proxy the test can cut. The same scenario for both, since their pages
// show the same things: the SSE hook/composable and the centrifuge channel one receive a server API
// publication and one published from the page; the connection is cut while two more are published, and both
// get them after reconnecting (SSE: Last-Event-ID; WebSocket: recovery), once each and in order; unmounting
// the component ends both subscriptions on the server, and mounting it again subscribes again.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import http from 'node:http';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { chromium } from 'playwright-core';

import { api, startHerald, startProxy, withTimeout } from './lib.mjs';

const EXAMPLES = new URL('../../examples/', import.meta.url).pathname;
const API_KEY = 'frameworks-example-api-key';
const CHANNEL = 'live:updates';
let browser;
const cleanups = [];
const pageErrors = [];

before(async () => {
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
});

after(async () => {
  await browser?.close();
  for (const c of cleanups.reverse()) await c();
  assert.deepEqual(pageErrors, [], 'errors in the pages');
});

/** `vite build` of an example, pointed at `heraldUrl`, into a temporary directory. */
async function build(example, heraldUrl) {
  const dir = path.join(EXAMPLES, example);
  const out = mkdtempSync(path.join(tmpdir(), `herald-${example}-dist-`));
  cleanups.push(() => rmSync(out, { recursive: true, force: true }));
  const vite = spawn(process.execPath, [path.join(dir, 'node_modules/vite/bin/vite.js'), 'build', '--outDir', out, '--emptyOutDir', '--logLevel', 'warn'], {
    cwd: dir, env: { ...process.env, VITE_HERALD_URL: heraldUrl }, stdio: ['ignore', 'inherit', 'inherit'],
  });
  const code = await withTimeout(new Promise((r) => vite.once('exit', r)), 120000, `vite build of ${example}`);
  assert.equal(code, 0, `vite build of ${example} failed`);
  return out;
}

/** Serves a built app (the way any static host would). */
async function serve(dir) {
  const types = { '.html': 'text/html', '.js': 'text/javascript', '.css': 'text/css', '.svg': 'image/svg+xml' };
  const server = http.createServer(async (req, res) => {
    let file = path.join(dir, path.normalize(new URL(req.url, 'http://x').pathname));
    if (!file.startsWith(dir) || file.endsWith('/')) file = path.join(dir, 'index.html');
    try {
      const body = await readFile(file);
      res.writeHead(200, { 'content-type': types[path.extname(file)] ?? 'application/octet-stream' });
      res.end(body);
    } catch { res.writeHead(404); res.end(); }
  });
  await new Promise((r) => server.listen(0, '127.0.0.1', r));
  cleanups.push(() => new Promise((r) => server.close(r)));
  return `http://127.0.0.1:${server.address().port}`;
}

/** Waits until `check()` returns something truthy (a server-side condition), for at most `ms`. */
async function until(check, ms, what) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    last = await check();
    if (last) return last;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const subscribers = async (herald) => (await api(herald.url, API_KEY, 'channels', {})).channels[CHANNEL]?.num_clients ?? 0;
const texts = (page, list) => page.locator(`#${list} li`).allTextContents();

async function scenario(example) {
  const config = readFileSync(path.join(EXAMPLES, example, 'herald.toml'), 'utf8')
    .split('\n')
    .filter((l) => !/^(listen|data_dir)\s*=/.test(l))
    .map((l) => (l.startsWith('allowed_origins') ? 'allowed_origins = ["http://127.0.0.1:*"]' : l))
    .join('\n');
  const herald = await startHerald({ config });
  cleanups.push(async () => { await herald.stop(); herald.cleanup(); });
  const proxy = await startProxy(herald.port);
  cleanups.push(() => proxy.close());
  const appUrl = await serve(await build(example, `http://127.0.0.1:${proxy.port}`));

  const page = await (await browser.newContext()).newPage();
  page.on('pageerror', (e) => pageErrors.push(`${example}: ${e.message}`));
  await page.goto(appUrl);
  await page.locator('#ws-state', { hasText: 'connected' }).waitFor({ timeout: 10000 });
  await page.locator('#sse-status', { hasText: 'open' }).waitFor({ timeout: 10000 });
  await page.locator('#sub-state', { hasText: 'subscribed' }).waitFor({ timeout: 10000 });
  await until(async () => (await subscribers(herald)) === 2, 5000, 'an SSE and a WebSocket subscriber on the server');

  // From a backend (the server API), and from the page itself (a client publication): both faces get both.
  await api(herald.url, API_KEY, 'publish', { channel: CHANNEL, data: { text: 'from the server' } });
  await page.fill('#text', 'from the page');
  await page.click('#publish button');
  for (const list of ['sse-list', 'ws-list']) await page.locator(`#${list} li`, { hasText: 'from the page' }).waitFor({ timeout: 10000 });
  assert.equal(await page.inputValue('#text'), '');

  // The connection drops; two publications are made meanwhile; both come back with them.
  proxy.cut();
  await page.locator('#ws-state', { hasText: 'connecting' }).waitFor({ timeout: 10000 });
  await page.locator('#sse-status:not(:text-is("open"))').waitFor({ timeout: 10000 });
  await api(herald.url, API_KEY, 'publish', { channel: CHANNEL, data: { text: 'missed 1' } });
  await api(herald.url, API_KEY, 'publish', { channel: CHANNEL, data: { text: 'missed 2' } });
  proxy.restore();
  for (const list of ['sse-list', 'ws-list']) await page.locator(`#${list} li`, { hasText: 'missed 2' }).waitFor({ timeout: 20000 });
  await page.locator('#recovered', { hasText: 'everything missed was recovered' }).waitFor({ timeout: 5000 });
  const expected = ['from the server', 'from the page', 'missed 1', 'missed 2'];
  assert.deepEqual(await texts(page, 'sse-list'), expected, 'SSE: every publication once, in order');
  assert.deepEqual(await texts(page, 'ws-list'), expected, 'WebSocket: every publication once, in order');
  await page.locator('#sse-status', { hasText: 'open' }).waitFor({ timeout: 5000 });

  // Unmounting the component ends both subscriptions on the server; the app's connection stays.
  await page.click('#toggle');
  await until(async () => (await subscribers(herald)) === 0, 5000, 'no subscriber left on the server after unmounting');
  const conns = await (await fetch(`${herald.url}/console/api/connections`)).json();
  assert.deepEqual(conns.sse, [], 'no SSE stream left open');
  assert.equal(conns.websocket.length, 1, 'the app keeps its WebSocket connection');
  assert.deepEqual(conns.websocket[0].channels, [], 'with no channel');
  assert.equal(await page.textContent('#ws-state'), 'connected');

  // Mounted again: subscribed again, and live.
  await page.click('#toggle');
  await page.locator('#sub-state', { hasText: 'subscribed' }).waitFor({ timeout: 10000 });
  await page.locator('#sse-status', { hasText: 'open' }).waitFor({ timeout: 10000 });
  await until(async () => (await subscribers(herald)) === 2, 5000, 'both subscribers back after mounting again');
  await api(herald.url, API_KEY, 'publish', { channel: CHANNEL, data: { text: 'after mounting again' } });
  for (const list of ['sse-list', 'ws-list']) await page.locator(`#${list} li`, { hasText: 'after mounting again' }).waitFor({ timeout: 10000 });
  await page.close();
}

test('examples/vue: useHeraldStream and useCentrifugeChannel receive, resume after a drop, clean up on unmount', () => scenario('vue'));
test('examples/react: useHeraldStream and useCentrifugeChannel receive, resume after a drop, clean up on unmount', () => scenario('react'));
