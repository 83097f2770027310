// The web console (/) in headless Chromium against the real binary: every view renders without errors in the
// page, live numbers move when something is published, the tail shows a publication, history pages, the
// publish form reaches an SSE subscriber, and dev tokens are minted. Screenshots of every view at 1280x800 and
// 390x844 go to a temporary directory (SCREENSHOT_DIR to choose it), printed at the end.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, before, test } from 'node:test';

import { Centrifuge } from 'centrifuge';
import { EventSource } from 'eventsource';
import { chromium } from 'playwright-core';
import WebSocket from 'ws';

import { collect, once, sign, startHerald, withTimeout } from './lib.mjs';

const DEV_KEY = '!ChangeThisMercureHubJWTSecretKey!';
const SHOTS = process.env.SCREENSHOT_DIR ?? mkdtempSync(path.join(tmpdir(), 'herald-console-shots-'));
mkdirSync(SHOTS, { recursive: true });

let herald, browser, sse, sseEvents, ws;
const pageErrors = [];

before(async () => {
  // The README's first command, on a free port: loopback, the development key, no console password.
  herald = await startHerald({ config: '[log]\nbackend = "memory"\n[auth]\nallow_anonymous = true\n' });
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  // A Mercure subscriber of `news` and a WebSocket client in `lobby`, so every view has something.
  const url = new URL(`${herald.url}/.well-known/mercure`);
  url.searchParams.append('topic', 'news');
  sse = new EventSource(url);
  sseEvents = collect(sse, 'message');
  await once(sse, 'open');
});

after(async () => {
  sse?.close();
  ws?.disconnect();
  await browser?.close();
  await herald?.stop();
  herald?.cleanup();
  console.log(`console screenshots: ${SHOTS}`);
});

async function publish(topic, data, extra = {}) {
  const token = sign({ mercure: { publish: ['*'] } }, DEV_KEY);
  const res = await fetch(`${herald.url}/.well-known/mercure`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}` },
    body: new URLSearchParams({ topic, data, ...extra }),
  });
  assert.equal(res.status, 200, await res.text());
}

async function openPage(width, height) {
  const ctx = await browser.newContext({ viewport: { width, height } });
  const page = await ctx.newPage();
  page.on('console', (m) => { if (m.type() === 'error') pageErrors.push(`${width}px: ${m.text()} (${m.location().url})`); });
  page.on('pageerror', (e) => pageErrors.push(`${width}px: ${e.message}`));
  return page;
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS, `${name}.png`), fullPage: true });
  // Nothing wider than the window (tables scroll inside their own box).
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
  assert.ok(overflow <= 0, `${name}: the page is ${overflow}px wider than the window`);
}

const number = (text) => Number(String(text).replace(/[^0-9.]/g, ''));

test('the console works on `herald serve` with no login: every view, live numbers, tail, history, publish', async () => {
  const page = await openPage(1280, 800);
  await page.goto(herald.url);

  // Overview: the SSE subscriber is counted; publishing moves the rate.
  await page.locator('#stat-sse', { hasText: '1' }).waitFor({ timeout: 10000 });
  await page.locator('#engine-state', { hasText: 'ready' }).waitFor();
  const moved = (async () => {
    await page.waitForFunction(() => Number(document.querySelector('#stat-pubrate')?.textContent) > 0, null, { timeout: 15000 });
  })();
  let n = 0;
  const pumping = (async () => { while (n < 60) { await publish('news', `tick ${n++}`); await new Promise((r) => setTimeout(r, 150)); if (await page.evaluate(() => Number(document.querySelector('#stat-pubrate')?.textContent) > 0)) break; } })();
  await withTimeout(moved, 20000, 'publishes/s to move');
  await pumping;
  assert.ok(number(await page.textContent('#stat-delrate-hint')) > 0, 'deliveries counted');
  await sseEvents.until(1);

  // A WebSocket client with a token minted by the console's own dev tool.
  const minted = await (await fetch(`${herald.url}/console/api/token`, {
    method: 'POST', headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ sub: 'alice', channels: ['lobby'], info: { name: 'Alice' }, ttl: '10m' }),
  })).json();
  ws = new Centrifuge(`${herald.url.replace('http', 'ws')}/connection/websocket`, { websocket: WebSocket, token: minted.token });
  ws.connect();
  await once(ws, 'connected');
  await page.locator('#stat-ws', { hasText: '1' }).waitFor({ timeout: 10000 });
  // Let the charts gather a few seconds of points.
  await page.waitForTimeout(2500);
  await shot(page, 'overview-1280');

  // Channels: news (the SSE subscriber) and lobby (alice, present).
  await page.click('#nav-channels');
  const lobby = page.locator('#channels-table tr', { hasText: 'lobby' });
  await lobby.waitFor({ timeout: 10000 });
  assert.match(await lobby.textContent(), /lobby\s*1\s*1/);
  await page.locator('#channels-table tr', { hasText: 'news' }).waitFor();
  await shot(page, 'channels-1280');

  // A channel: history pages (newest first, then older), the tail, presence.
  for (let i = 0; i < 25; i++) await publish('history:demo', `h${i}`);
  await page.goto(`${herald.url}/#/channel/${encodeURIComponent('history:demo')}`);
  await page.locator('#history-list li', { hasText: 'h24' }).first().waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#history-list li.pub').count(), 20);
  assert.match(await page.locator('#history-list li.pub').first().textContent(), /h24/, 'newest first');
  await page.locator('#tail-state', { hasText: 'live' }).waitFor({ timeout: 10000 });
  await page.click('#history-older');
  await page.locator('#history-list li', { hasText: 'h4' }).first().waitFor({ timeout: 10000 });
  assert.equal(await page.locator('#history-list li.pub').count(), 5);
  assert.ok(await page.locator('#history-older').isDisabled(), 'no page older than the first');
  await page.click('#history-newest');
  await page.locator('#history-list li', { hasText: 'h24' }).first().waitFor({ timeout: 10000 });

  await publish('history:demo', 'tailed and private', { private: 'on' });
  await page.locator('#tail-list li', { hasText: 'tailed and private' }).waitFor({ timeout: 10000 });
  assert.match(await page.locator('#tail-list li').first().textContent(), /private/);

  // The publish form reaches an SSE subscriber of news.
  await page.goto(`${herald.url}/#/channel/news`);
  await page.locator('#tail-state', { hasText: 'live' }).waitFor({ timeout: 10000 });
  const before = sseEvents.items.length;
  await page.fill('#pub-data', '{"from": "the console"}');
  await page.selectOption('#pub-format', 'json');
  await page.click('#pub-send');
  await page.locator('#pub-result', { hasText: 'published' }).waitFor({ timeout: 10000 });
  const got = await sseEvents.until(before + 1);
  assert.deepEqual(JSON.parse(got[before].data), { from: 'the console' });
  await page.locator('#tail-list li', { hasText: 'the console' }).waitFor({ timeout: 10000 });
  // Invalid JSON is refused with the server's message (Chromium logs the 400 as an error: not ours).
  const errorsSoFar = pageErrors.length;
  await page.fill('#pub-data', '{oops');
  await page.click('#pub-send');
  await page.locator('#pub-result.bad', { hasText: 'invalid_json' }).waitFor({ timeout: 10000 });
  pageErrors.splice(errorsSoFar, pageErrors.length - errorsSoFar,
    ...pageErrors.slice(errorsSoFar).filter((e) => !e.includes('status of 400')));
  await page.fill('#pub-data', '{"from": "the console"}');
  await page.goto(`${herald.url}/#/channel/${encodeURIComponent('lobby')}`);
  await page.locator('#presence-list li', { hasText: 'alice' }).waitFor({ timeout: 10000 });
  await page.goto(`${herald.url}/#/channel/${encodeURIComponent('history:demo')}`);
  await page.locator('#history-list li', { hasText: 'h24' }).first().waitFor({ timeout: 10000 });
  await page.locator('#tail-state', { hasText: 'live' }).waitFor({ timeout: 10000 });
  await publish('history:demo', 'one more for the screenshot');
  await page.locator('#tail-list li', { hasText: 'one more' }).waitFor({ timeout: 10000 });
  await shot(page, 'channel-1280');

  // Connections: alice over WebSocket with her channel, the news subscriber over SSE, with addresses.
  await page.click('#nav-connections');
  const row = page.locator('#ws-table tr', { hasText: 'alice' });
  await row.waitFor({ timeout: 10000 });
  assert.match(await row.textContent(), /127\.0\.0\.1:\d+.*lobby/);
  const sseRow = page.locator('#sse-table tr', { hasText: 'news' });
  await sseRow.waitFor();
  assert.match(await sseRow.textContent(), /urn:uuid:.*127\.0\.0\.1:\d+/);
  await shot(page, 'connections-1280');

  // Dev tools: a token for the given claims.
  await page.click('#nav-tools');
  await page.fill('#token-form input[name=sub]', 'bob');
  await page.fill('#token-form input[name=channels]', 'lobby, news');
  await page.fill('#token-form input[name=info]', '{"name": "Bob"}');
  await page.click('#token-form button');
  await page.locator('#token-value').waitFor({ timeout: 10000 });
  const tok = await page.inputValue('#token-value');
  const claims = JSON.parse(Buffer.from(tok.split('.')[1], 'base64url'));
  assert.equal(claims.sub, 'bob');
  assert.deepEqual(claims.channels, ['lobby', 'news']);
  await shot(page, 'tools-1280');

  // Disconnect alice from the Connections view: her client sees the server's disconnect.
  await page.click('#nav-connections');
  const gone = once(ws, 'disconnected', () => true, 10000);
  await page.locator('#ws-table tr', { hasText: 'alice' }).locator('button').click();
  const ctx = await gone;
  assert.equal(ctx.code, 3503);
  await page.locator('#banner', { hasText: 'disconnect sent to alice' }).waitFor({ timeout: 10000 });

  assert.deepEqual(pageErrors, []);
});

test('every view at 390x844 fits the phone', async () => {
  const page = await openPage(390, 844);
  await page.goto(herald.url);
  await page.locator('#stat-sse', { hasText: '1' }).waitFor({ timeout: 10000 });
  await page.waitForTimeout(1500);
  await shot(page, 'overview-390');
  for (const [name, hash, ready] of [
    ['channels', '#/channels', '#channels-table tbody tr'],
    ['channel', `#/channel/${encodeURIComponent('history:demo')}`, '#history-list li.pub'],
    ['connections', '#/connections', '#sse-table tbody tr'],
    ['tools', '#/tools', '#token-form'],
  ]) {
    await page.goto(`${herald.url}/${hash}`);
    await page.locator(ready).first().waitFor({ timeout: 10000 });
    if (name === 'channel') await page.locator('#tail-state', { hasText: 'live' }).waitFor({ timeout: 10000 });
    await shot(page, `${name}-390`);
  }
  assert.deepEqual(pageErrors, []);
});

test('with a password the console asks for it, says why when refused, and then works', async () => {
  const guarded = await startHerald({ config: '[log]\nbackend = "memory"\n[console]\npassword = "open sesame"\n' });
  try {
    const page = await openPage(1280, 800);
    await page.goto(guarded.url);
    await page.locator('#login-form').waitFor({ timeout: 10000 });
    await page.fill('#login-password', 'wrong');
    await page.click('#login-form button');
    await page.locator('#login-error', { hasText: 'wrong_password' }).waitFor({ timeout: 10000 });
    await shot(page, 'login-1280');
    await page.fill('#login-password', 'open sesame');
    await page.click('#login-form button');
    await page.locator('#engine-state', { hasText: 'ready' }).waitFor({ timeout: 10000 });
    // A token the server no longer accepts sends the console back to the login, with the reason.
    await page.evaluate(() => sessionStorage.setItem('herald-console-token', 'not-a-token'));
    await page.click('#nav-connections');
    await page.locator('#login-error', { hasText: 'admin_token_invalid' }).waitFor({ timeout: 10000 });
    // Chromium logs the refused requests (401) as errors: the ones asked for here; nothing else.
    assert.deepEqual(pageErrors.filter((e) => !e.includes('status of 401')), []);
  } finally {
    await guarded.stop();
    guarded.cleanup();
  }
});
