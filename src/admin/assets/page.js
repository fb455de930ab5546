// The operator's page of imagegate: plain DOM and SVG, no framework, no build step.
// Every figure comes from the admin API of this listener, called with the admin key the operator
// typed (kept in this tab's sessionStorage). Text is only ever set with textContent.
'use strict';
(() => {
  const KEY = 'imagegate.adminKey';
  const SVG = 'http://www.w3.org/2000/svg';
  const TOP = 10;
  const PAGE = 25;
  const $ = (id) => document.getElementById(id);

  const view = { since: '', until: '', cursor: null, filters: {} };

  class WrongKey extends Error {}

  async function api(path) {
    const key = sessionStorage.getItem(KEY) || '';
    const r = await fetch(path, { headers: { Authorization: 'Bearer ' + key }, cache: 'no-store' });
    if (r.status === 401) throw new WrongKey('wrong key');
    const body = await r.json().catch(() => null);
    if (!r.ok) {
      const msg = body && body.error && body.error.message;
      throw new Error(msg || 'HTTP ' + r.status);
    }
    return body;
  }

  // ---- formatting -------------------------------------------------------------------------------

  const usd = (micros) => '$' + (Number(micros) / 1e6).toLocaleString('en-US',
    { minimumFractionDigits: 2, maximumFractionDigits: 6 });
  const int = (n) => Number(n).toLocaleString('en-US');
  const rejected = (row) => Object.values(row.rejections || {}).reduce((a, b) => a + b, 0);

  function el(tag, attrs, ...kids) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === 'class') e.className = v; else e.setAttribute(k, v);
    }
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }

  function svg(tag, attrs, ...kids) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
    for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(String(k)));
    return e;
  }

  function fill(tbodyParent, rows) {
    const tbody = tbodyParent.tBodies[0];
    tbody.replaceChildren(...rows);
  }

  // Calendar days as YYYY-MM-DD strings (no time zone involved: the server's days are used).
  function addDays(day, n) {
    const [y, m, d] = day.split('-').map(Number);
    const t = new Date(Date.UTC(y, m - 1, d + n));
    return t.toISOString().slice(0, 10);
  }

  function daysBetween(since, until) {
    const out = [];
    for (let d = since; d <= until && out.length < 400; d = addDays(d, 1)) out.push(d);
    return out;
  }

  // ---- sections ---------------------------------------------------------------------------------

  function usageQuery(extra) {
    const p = new URLSearchParams({ since: view.since, until: addDays(view.until, 1), ...extra });
    return '/admin/usage?' + p.toString();
  }

  // The totals are the sum of the per-client rows (every record has one client key, '-' when
  // unauthenticated), which saves the page one pass over the period's records.
  function renderTotals(rows) {
    const t = { requests: 0, forwarded: 0, images: 0, spend_micros: 0, rejections: {} };
    for (const r of rows) {
      for (const k of ['requests', 'forwarded', 'images', 'spend_micros']) t[k] += r[k];
      for (const [code, n] of Object.entries(r.rejections || {})) t.rejections[code] = (t.rejections[code] || 0) + n;
    }
    const set = (k, v) => { document.querySelector(`[data-k="${k}"]`).textContent = v; };
    set('total-requests', int(t.requests));
    set('total-forwarded', int(t.forwarded));
    set('total-images', int(t.images));
    set('total-spend', usd(t.spend_micros));
    set('total-rejected', int(rejected(t)));
  }

  function renderChart(rows) {
    const byDay = new Map(rows.map((r) => [r.key, r]));
    const days = daysBetween(view.since, view.until);
    const W = 960, H = 240, L = 56, R = 44, T = 22, B = 28;
    const w = (W - L - R) / Math.max(days.length, 1);
    const spend = days.map((d) => (byDay.get(d) || {}).spend_micros || 0);
    const images = days.map((d) => (byDay.get(d) || {}).images || 0);
    const maxS = Math.max(...spend, 1), maxI = Math.max(...images, 1);
    const y = (v, max) => T + (H - T - B) * (1 - v / max);
    const g = svg('svg', { viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'spend and images per day' });
    g.append(svg('line', { class: 'axis', x1: L, y1: H - B, x2: W - R, y2: H - B }));
    g.append(svg('text', { x: L - 6, y: T + 4, 'text-anchor': 'end' }, usd(maxS)));
    g.append(svg('text', { x: L - 6, y: H - B, 'text-anchor': 'end' }, '$0'));
    g.append(svg('text', { x: W - R + 6, y: T + 4 }, int(maxI)));
    g.append(svg('text', { x: W - R + 6, y: H - B }, '0'));
    g.append(svg('rect', { class: 'legend-spend', x: L, y: 4, width: 10, height: 10 }));
    g.append(svg('text', { x: L + 14, y: 13 }, 'spend'));
    g.append(svg('rect', { class: 'legend-images', x: L + 64, y: 4, width: 10, height: 10 }));
    g.append(svg('text', { x: L + 78, y: 13 }, 'images'));
    const every = Math.ceil(days.length / 10);
    let path = '';
    days.forEach((d, i) => {
      const x = L + i * w;
      const top = y(spend[i], maxS);
      const bar = svg('rect', { class: 'spend', x: x + w * 0.15, y: top, width: w * 0.7, height: H - B - top, 'data-day': d });
      bar.append(svg('title', {}, `${d}: ${usd(spend[i])}, ${int(images[i])} images`));
      g.append(bar);
      const cx = x + w / 2, cy = y(images[i], maxI);
      path += (i ? 'L' : 'M') + cx.toFixed(1) + ' ' + cy.toFixed(1);
      if (images[i] > 0) g.append(svg('circle', { class: 'dot', cx, cy, r: 3 }));
      if (i % every === 0) g.append(svg('text', { x: cx, y: H - 10, 'text-anchor': 'middle' }, d.slice(5)));
    });
    g.append(svg('path', { class: 'images', d: path }));
    $('chart').replaceChildren(g);
    $('chart-period').textContent = `${view.since} – ${view.until}`;
  }

  function usageRows(rows) {
    return rows
      .slice()
      .sort((a, b) => b.spend_micros - a.spend_micros || b.requests - a.requests || (a.key < b.key ? -1 : 1))
      .slice(0, TOP)
      .map((r) => el('tr', { 'data-key': r.key },
        el('td', {}, r.key),
        el('td', { class: 'n', 'data-f': 'requests' }, int(r.requests)),
        el('td', { class: 'n', 'data-f': 'images' }, int(r.images)),
        el('td', { class: 'n', 'data-f': 'spend', 'data-micros': r.spend_micros }, usd(r.spend_micros)),
        el('td', { class: 'n', 'data-f': 'rejected' }, int(rejected(r)))));
  }

  function bar(used, limit) {
    const s = svg('svg', { class: 'bar', width: 80, height: 10, viewBox: '0 0 80 10' });
    s.append(svg('rect', { class: 'bg', x: 0, y: 0, width: 80, height: 10, rx: 3 }));
    if (limit) {
      const f = Math.min(used / limit, 1);
      const cls = 'fg' + (f >= 1 ? ' full' : f >= 0.8 ? ' high' : '');
      s.append(svg('rect', { class: cls, x: 0, y: 0, width: 80 * f, height: 10, rx: 3 }));
    }
    return s;
  }

  function quotaCell(used, limit, money) {
    const show = money ? usd : int;
    const text = limit == null ? `${show(used)} (no limit)` : `${show(used)} / ${show(limit)}`;
    return el('td', { class: 'quota-cell' }, bar(used, limit), text);
  }

  function renderQuotas(q) {
    $('quota-period').textContent = `${q.day} and ${q.month} (${q.time_zone})` + (q.truncated ? ', first scopes only' : '');
    fill($('quotas'), q.scopes.map((s) => el('tr', { 'data-scope': s.user == null ? s.client : `${s.client}/${s.user}` },
      el('td', {}, s.client),
      el('td', {}, s.user == null ? '(client)' : s.user),
      quotaCell(s.day.images, s.day.images_limit, false),
      quotaCell(s.day.micros, s.day.micros_limit, true),
      quotaCell(s.month.images, s.month.images_limit, false),
      quotaCell(s.month.micros, s.month.micros_limit, true))));
  }

  async function loadRecent() {
    const p = new URLSearchParams({ limit: String(PAGE), since: view.since, until: addDays(view.until, 1) });
    for (const [k, v] of Object.entries(view.filters)) if (v) p.set(k, v);
    if (view.cursor) p.set('before', view.cursor);
    const page = await api('/admin/requests?' + p.toString());
    fill($('recent'), page.requests.map((r) => {
      const tr = el('tr', { 'data-id': r.request_id },
        el('td', {}, r.received_at.replace('T', ' ').slice(0, 19)),
        el('td', {}, el('code', {}, r.request_id)),
        el('td', { 'data-f': 'client' }, r.client ?? '–'),
        el('td', { 'data-f': 'user' }, r.user ?? '–'),
        el('td', { class: 'o-' + r.outcome, 'data-f': 'outcome' }, r.outcome + (r.reason_code ? ` (${r.reason_code})` : '')),
        el('td', { class: 'n', 'data-f': 'status' }, r.status ?? '–'),
        el('td', {}, r.model ?? '–'),
        el('td', { class: 'n', 'data-f': 'images' }, r.images_returned ?? 0),
        el('td', { class: 'n', 'data-f': 'cost', 'data-micros': r.cost_settled_micros }, usd(r.cost_settled_micros)),
        el('td', { class: 'n' }, r.total_ms ?? '–'));
      tr.addEventListener('click', () => showRecord(r.request_id, tr));
      return tr;
    }));
    $('older').hidden = !page.next_before;
    $('older').onclick = () => { view.cursor = page.next_before; guard(loadRecent()); };
    $('newest').hidden = !view.cursor;
  }

  async function showRecord(id, tr) {
    const r = await guard(api('/admin/requests/' + encodeURIComponent(id)));
    if (!r) return;
    for (const row of $('recent').tBodies[0].rows) row.classList.toggle('sel', row === tr);
    $('record-id').textContent = id;
    fill($('record-fields'), Object.entries(r).map(([k, v]) =>
      el('tr', { 'data-field': k }, el('td', {}, k), el('td', {}, v == null ? '–' : typeof v === 'object' ? JSON.stringify(v) : String(v)))));
    $('record').hidden = false;
  }

  function renderChain(c) {
    const items = [
      ['head seq', c.head ? int(c.head.seq) : 'empty'],
      ['head hash', c.head ? c.head.hash : '–'],
      ['chain entries', int(c.entries)],
      ['records', int(c.records)],
    ];
    for (const r of c.chains || []) items.push([`replica ${r.replica}`, `seq ${int(r.head.seq)} · ${r.head.hash.slice(0, 16)}…`]);
    $('chain').replaceChildren(...items.flatMap(([k, v]) => [el('dt', {}, k), el('dd', { 'data-k': 'chain-' + k.replace(/ /g, '-') }, v)]));
  }

  function renderUpstream(u) {
    fill($('upstream'), u.keys.map((k) => el('tr', { 'data-name': k.name },
      el('td', {}, k.name),
      el('td', { class: 'st-' + k.state }, k.state),
      el('td', {}, k.base_url || '–'),
      el('td', {}, k.key_set ? 'set' : 'missing'),
      el('td', { class: 'n' }, k.weight ?? 1))));
  }

  // ---- flow -------------------------------------------------------------------------------------

  function showError(e) {
    if (e instanceof WrongKey) return logout('wrong key');
    $('load-error').textContent = e.message;
    $('load-error').hidden = false;
  }

  async function guard(p) {
    try { return await p; } catch (e) { showError(e); return null; }
  }

  async function loadAll() {
    const started = performance.now();
    $('load-error').hidden = true;
    const quotas = await api('/admin/quotas');
    if (!view.since) {
      view.until = quotas.day;
      view.since = addDays(quotas.day, -29);
      $('since').value = view.since;
      $('until').value = view.until;
    }
    renderQuotas(quotas);
    const [perDay, users, clients, chain, upstream] = await Promise.all([
      api(usageQuery({ group_by: 'day' })),
      api(usageQuery({ group_by: 'user' })),
      api(usageQuery({ group_by: 'client' })),
      api('/admin/chain'),
      api('/admin/upstream'),
      loadRecent(),
    ]);
    renderTotals(clients);
    renderChart(perDay);
    fill($('top-users'), usageRows(users));
    fill($('top-clients'), usageRows(clients));
    renderChain(chain);
    renderUpstream(upstream);
    const ms = Math.round(performance.now() - started);
    $('loaded').textContent = `Loaded in ${ms} ms.`;
    document.body.dataset.loadedMs = String(ms);
    document.body.dataset.state = 'loaded';
  }

  function clearData() {
    for (const t of document.querySelectorAll('#dash tbody')) t.replaceChildren();
    for (const v of document.querySelectorAll('.tile .value')) v.textContent = '–';
    $('chart').replaceChildren();
    $('chain').replaceChildren();
    $('record').hidden = true;
    $('verify-result').textContent = '';
    $('loaded').textContent = '';
    Object.assign(view, { since: '', until: '', cursor: null, filters: {} });
  }

  function logout(message) {
    sessionStorage.removeItem(KEY);
    clearData();
    $('dash').hidden = true;
    $('session').hidden = true;
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('login-error').hidden = !message;
    $('key').value = '';
    document.body.dataset.state = message ? 'wrong-key' : 'logged-out';
  }

  async function start() {
    $('login').hidden = true;
    $('login-error').hidden = true;
    $('dash').hidden = false;
    $('session').hidden = false;
    try {
      await loadAll();
    } catch (e) {
      showError(e);
    }
  }

  document.addEventListener('DOMContentLoaded', () => {
    $('login-form').addEventListener('submit', (ev) => {
      ev.preventDefault();
      sessionStorage.setItem(KEY, $('key').value);
      start();
    });
    $('logout').addEventListener('click', () => logout());
    $('period').addEventListener('submit', (ev) => {
      ev.preventDefault();
      if (!$('since').value || !$('until').value) return;
      view.since = $('since').value;
      view.until = $('until').value;
      view.cursor = null;
      guard(loadAll());
    });
    $('filters').addEventListener('submit', (ev) => {
      ev.preventDefault();
      view.filters = { client: $('f-client').value.trim(), user: $('f-user').value.trim(), outcome: $('f-outcome').value };
      view.cursor = null;
      guard(loadRecent());
    });
    $('newest').addEventListener('click', () => { view.cursor = null; guard(loadRecent()); });
    $('record-close').addEventListener('click', () => { $('record').hidden = true; });
    $('verify').addEventListener('click', async () => {
      $('verify-result').textContent = 'verifying…';
      const r = await guard(api('/admin/chain?verify=1'));
      if (!r) { $('verify-result').textContent = ''; return; }
      $('verify-result').textContent = r.ok
        ? `ok: ${int(r.entries)} chain entries, ${int(r.records)} records (${r.took_ms} ms)`
        : `BROKEN at seq ${r.first_broken.seq} (${r.first_broken.request_id || 'no request'}): ${r.first_broken.reason}`;
      $('verify-result').className = r.ok ? 'st-active' : 'error';
    });
    if (sessionStorage.getItem(KEY)) start(); else logout();
  });
})();
