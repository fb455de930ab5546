#!/usr/bin/env node
// Drive the operator page in headless Chromium (Debian's `chromium`, through playwright-core)
// and print what it shows as one JSON object on stdout. The Rust test
// (tests/operator_page.rs, `browser_shows_the_traffic_sent`) starts the gateway, sends known
// traffic, runs this script and compares the figures with the traffic.
//
// Usage: node operator_page.mjs ADMIN_PAGE_URL ADMIN_KEY SCREENSHOT_PATH
//   1. a wrong key: the page must say "wrong key" and show no data;
//   2. the right key: wait for the page to load, read the totals, top users and clients,
//      quotas, recent requests, chain and upstream; open one record; filter by client;
//      take a full-page screenshot;
//   3. log out: the key is gone from sessionStorage and the data from the page.
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';

import { chromium } from 'playwright-core';

const [url, key, screenshot] = process.argv.slice(2);
if (!url || !key || !screenshot) {
  console.error('usage: node operator_page.mjs ADMIN_PAGE_URL ADMIN_KEY SCREENSHOT_PATH');
  process.exit(2);
}
const STEP_MS = 30_000;

const profile = mkdtempSync(path.join(tmpdir(), 'imagegate-page-'));
// A fresh profile directory (playwright passes it as --user-data-dir).
const browser = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  headless: true,
  timeout: STEP_MS,
  viewport: { width: 1280, height: 900 },
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});
const out = { api: [], console: [], page_errors: [] };
try {
  const page = await browser.newPage();
  page.setDefaultTimeout(STEP_MS);
  page.on('response', (r) => {
    const u = new URL(r.url());
    if (u.pathname.startsWith('/admin/') && !/\.(js|css)$|\/admin\/$/.test(u.pathname)) {
      out.api.push({ path: u.pathname + u.search, status: r.status() });
    }
  });
  page.on('console', (m) => { if (m.type() === 'error') out.console.push(m.text()); });
  page.on('pageerror', (e) => out.page_errors.push(String(e)));

  // Everything a test compares, read from the DOM.
  const read = () => page.evaluate(() => {
    const rows = (sel) => [...document.querySelectorAll(`${sel} tbody tr`)];
    const cell = (tr, f) => tr.querySelector(`[data-f="${f}"]`);
    const usage = (sel) => rows(sel).map((tr) => ({
      key: tr.dataset.key,
      requests: cell(tr, 'requests').textContent,
      images: cell(tr, 'images').textContent,
      spend: cell(tr, 'spend').textContent,
      spend_micros: Number(cell(tr, 'spend').dataset.micros),
      rejected: cell(tr, 'rejected').textContent,
    }));
    const tiles = {};
    for (const v of document.querySelectorAll('.tile .value')) tiles[v.dataset.k] = v.textContent;
    return {
      state: document.body.dataset.state || null,
      login_visible: !document.getElementById('login').hidden,
      dash_visible: !document.getElementById('dash').hidden,
      login_error: document.getElementById('login-error').hidden ? null : document.getElementById('login-error').textContent,
      tiles,
      top_users: usage('#top-users'),
      top_clients: usage('#top-clients'),
      chart_bars: document.querySelectorAll('#chart rect.spend').length,
      quotas: rows('#quotas').map((tr) => ({ scope: tr.dataset.scope, cells: [...tr.cells].map((c) => c.textContent) })),
      recent: rows('#recent').map((tr) => ({
        id: tr.dataset.id,
        client: cell(tr, 'client').textContent,
        user: cell(tr, 'user').textContent,
        outcome: cell(tr, 'outcome').textContent,
        status: cell(tr, 'status').textContent,
        images: cell(tr, 'images').textContent,
        cost_micros: Number(cell(tr, 'cost').dataset.micros),
      })),
      chain: Object.fromEntries([...document.querySelectorAll('#chain dd')].map((d) => [d.dataset.k, d.textContent])),
      upstream: rows('#upstream').map((tr) => [...tr.cells].map((c) => c.textContent)),
      loaded_ms: Number(document.body.dataset.loadedMs || 0),
      stored_key: sessionStorage.getItem('imagegate.adminKey'),
    };
  });

  // 1. A wrong key.
  await page.goto(url);
  await page.waitForSelector('body[data-state="logged-out"]');
  await page.fill('#key', 'ig-certainly-not-the-admin-key');
  await page.click('#login-form button');
  await page.waitForSelector('body[data-state="wrong-key"]');
  out.wrong_key = await read();

  // 2. The right key.
  await page.fill('#key', key);
  await page.click('#login-form button');
  await page.waitForSelector('body[data-state="loaded"]');
  out.loaded = await read();
  await page.screenshot({ path: screenshot, fullPage: true });

  // One record's full view.
  const first = out.loaded.recent[out.loaded.recent.length - 1];
  await page.click(`#recent tr[data-id="${first.id}"]`);
  await page.waitForSelector('#record:not([hidden])');
  out.record = await page.evaluate(() => Object.fromEntries(
    [...document.querySelectorAll('#record-fields tr')].map((tr) => [tr.dataset.field, tr.cells[1].textContent])));

  // The recent list filtered by client.
  await page.click('#record-close');
  await page.fill('#f-client', 'other');
  await page.click('#filters button');
  await page.waitForFunction(() => {
    const cells = [...document.querySelectorAll('#recent tbody [data-f="client"]')];
    return cells.length > 0 && cells.every((c) => c.textContent === 'other');
  });
  out.filtered = (await read()).recent;

  // 3. Log out.
  await page.click('#logout');
  await page.waitForSelector('body[data-state="logged-out"]');
  out.logged_out = await read();
} finally {
  await browser.close();
  rmSync(profile, { recursive: true, force: true });
}
process.stdout.write(JSON.stringify(out) + '\n');
