// End-to-end tests of the bundled web client against a real chat-hub server,
// in Debian's Chromium driven by playwright-core. Run with `bash run.sh`.
//
// Every wait is a Playwright wait for a condition, with a timeout; the only
// loop with a pause is the bounded /healthz readiness poll of the server.

import { test, describe, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { setTimeout as delay } from 'node:timers/promises';
import { chromium } from 'playwright-core';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const REPO = path.resolve(HERE, '..', '..');
const BIN = process.env.CHAT_HUB_BIN || path.join(REPO, 'target', 'debug', 'chat-hub');
const SHOTS = path.join(HERE, 'screenshots');
const WAIT = 15_000;          // one condition
const RECONNECT_WAIT = 30_000; // covers the client's backoff (at most 15 s +30 %) after a restart
const TEST_TIMEOUT = 120_000;
// The server embeds web/ when it is built. With CHAT_HUB_WEB_FROM_DISK=1 the
// pages get web/ from the work tree instead (headers still come from the
// server), to try client changes without rebuilding the server.
const WEB = path.join(REPO, 'web');
const WEB_FROM_DISK = process.env.CHAT_HUB_WEB_FROM_DISK === '1';
const WEB_FILES = { '/': 'index.html', '/app.js': 'app.js', '/style.css': 'style.css' };

// ---------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------

function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.unref();
    srv.on('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

class ChatHub {
  constructor(dir, port) {
    this.dir = dir;
    this.port = port;
    this.url = `http://127.0.0.1:${port}`;
    this.proc = null;
    this.output = '';
  }

  async start() {
    this.output = '';
    const proc = spawn(BIN, [], {
      cwd: this.dir,
      env: {
        ...process.env,
        CHAT_HUB_BIND: `127.0.0.1:${this.port}`,
        DATABASE_URL: path.join(this.dir, 'chat.db'),
        CHAT_HUB_DEV_LOGIN: '1',
        RUST_LOG: 'warn',
      },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.proc = proc;
    proc.exitCode_ = null;
    proc.exited = new Promise((resolve) => {
      proc.on('exit', (code, signal) => { proc.exitCode_ = code ?? signal; resolve(code ?? signal); });
    });
    const keep = (d) => { this.output = (this.output + d).slice(-20_000); };
    proc.stdout.on('data', keep);
    proc.stderr.on('data', keep);
    proc.on('error', (e) => { this.output += String(e); });

    // Readiness: a bounded number of /healthz tries, giving up at once if the
    // process dies.
    for (let i = 0; i < 200; i++) {
      if (proc.exitCode_ !== null) throw new Error(`chat-hub exited (${proc.exitCode_}) during start-up:\n${this.output}`);
      try {
        const r = await fetch(`${this.url}/healthz`, { signal: AbortSignal.timeout(1000) });
        if (r.status === 200) return;
      } catch { /* not listening yet */ }
      await Promise.race([delay(100), proc.exited]);
    }
    throw new Error(`chat-hub did not answer /healthz on ${this.url}:\n${this.output}`);
  }

  // SIGTERM and wait for the exit; returns the exit code.
  async stop() {
    const proc = this.proc;
    if (!proc) return null;
    this.proc = null;
    if (proc.exitCode_ !== null) return proc.exitCode_;
    proc.kill('SIGTERM');
    const code = await Promise.race([proc.exited, delay(15_000, 'timeout', { ref: false })]);
    if (code === 'timeout') {
      proc.kill('SIGKILL');
      await proc.exited;
      throw new Error(`chat-hub did not exit within 15 s of SIGTERM:\n${this.output}`);
    }
    return code;
  }
}

// ---------------------------------------------------------------------------
// Browser helpers
// ---------------------------------------------------------------------------

let server;
let browser;
let tmp;
const contexts = new Set();

const DESKTOP = { width: 1100, height: 720 };
const PHONE = { width: 375, height: 740 };

// A signed-in user in a browser context of their own.
async function openUser(user, { viewport = DESKTOP, token = null } = {}) {
  const context = await browser.newContext({ viewport });
  contexts.add(context);
  if (WEB_FROM_DISK) {
    await context.route((url) => url.origin === server.url && url.pathname in WEB_FILES, async (route) => {
      const response = await route.fetch();
      const file = WEB_FILES[new URL(route.request().url()).pathname];
      await route.fulfill({ response, body: fs.readFileSync(path.join(WEB, file)) });
    });
  }
  const page = await context.newPage();
  const u = { user, context, page, pageErrors: [], dialogs: [] };
  page.on('pageerror', (e) => u.pageErrors.push(String(e)));
  page.on('dialog', (d) => { u.dialogs.push(d.message()); d.dismiss().catch(() => {}); });
  if (token) {
    await page.goto(`${server.url}/#token=${token}`);
  } else {
    await page.goto(server.url);
    await page.getByTestId('dev-user').fill(user);
    await page.getByTestId('dev-login').click();
  }
  await page.getByTestId('me').filter({ hasText: user }).waitFor({ timeout: WAIT });
  await waitSynced(page);
  return u;
}

async function closeUser(u) {
  contexts.delete(u.context);
  await u.context.close();
  assert.deepEqual(u.pageErrors, [], `page errors for ${u.user}`);
}

function waitSynced(page, timeout = WAIT) {
  return page.waitForSelector('[data-testid=conn-state][data-state=online][data-synced=true]', { timeout });
}

const dm = (a, b) => (a <= b ? `dm:${a}:${b}` : `dm:${b}:${a}`);
const convItem = (page, conv) => page.locator(`[data-testid=conv-item][data-conv="${conv}"]`);

async function startDm(page, peer) {
  await page.getByTestId('new-dm-user').fill(peer);
  await page.getByTestId('new-dm-start').click();
  await page.getByTestId('conv-title').filter({ hasText: peer }).waitFor({ timeout: WAIT });
}

async function openConv(page, conv) {
  await convItem(page, conv).waitFor({ timeout: WAIT });
  await convItem(page, conv).click();
  await page.waitForSelector(`[data-testid=conversation][data-conv="${conv}"]`, { timeout: WAIT });
}

async function send(page, text) {
  const box = page.getByTestId('composer-input');
  await box.fill(text);
  await box.press('Enter');
}

function messages(page, text, status) {
  const sel = status ? `[data-testid=message][data-status=${status}]` : '[data-testid=message]';
  return page.locator(sel).filter({ hasText: text });
}

async function seeMessage(page, text, { status, timeout = WAIT } = {}) {
  await messages(page, text, status).first().waitFor({ timeout });
}

// Each element (by test id; the first of several) lies wholly inside the viewport.
async function assertFits(page, testids) {
  const { width, height } = page.viewportSize();
  for (const id of testids) {
    const box = await page.getByTestId(id).first().boundingBox();
    assert.ok(box, `${id} is not displayed`);
    assert.ok(box.x >= 0 && box.y >= 0 && box.x + box.width <= width + 0.5 && box.y + box.height <= height + 0.5,
      `${id} does not fit in ${width}x${height}: ${JSON.stringify(box)}`);
  }
}

async function shot(page, name) {
  fs.mkdirSync(SHOTS, { recursive: true });
  await page.screenshot({ path: path.join(SHOTS, name) });
}

// ---------------------------------------------------------------------------
// Suite
// ---------------------------------------------------------------------------

describe('chat-hub web client', { timeout: 15 * 60_000 }, () => {
  before(async () => {
    if (!fs.existsSync(BIN)) throw new Error(`no chat-hub binary at ${BIN} (build it, or set CHAT_HUB_BIN)`);
    tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'chat-hub-browser-'));
    server = new ChatHub(tmp, await freePort());
    await server.start();
    browser = await chromium.launch({
      executablePath: process.env.CHROMIUM_BIN || '/usr/bin/chromium',
      headless: true,
      args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-quic',
        '--no-first-run', '--disable-component-update', '--disable-sync',
        // A document fulfilled by a route has no address space of its own, and
        // Chromium would then refuse its socket to the loopback server.
        ...(WEB_FROM_DISK ? ['--disable-features=LocalNetworkAccessChecks'] : [])],
    });
  });

  after(async () => {
    for (const c of contexts) await c.close().catch(() => {});
    await browser?.close().catch(() => {});
    await server?.stop().catch(() => {});
    if (tmp) fs.rmSync(tmp, { recursive: true, force: true });
  });

  test('the server serves the web client of this work tree', { skip: WEB_FROM_DISK && 'CHAT_HUB_WEB_FROM_DISK=1' }, async () => {
    const types = { '/': /^text\/html/, '/app.js': /^(text|application)\/javascript/, '/style.css': /^text\/css/ };
    for (const [route, file] of Object.entries(WEB_FILES)) {
      const r = await fetch(`${server.url}${route}`);
      assert.equal(r.status, 200, route);
      assert.match(r.headers.get('content-type') || '', types[route], route);
      assert.ok((await r.text()) === fs.readFileSync(path.join(WEB, file), 'utf8'),
        `${route} differs from web/${file}: the binary is older than web/ (rebuild it, or set CHAT_HUB_WEB_FROM_DISK=1)`);
    }
  });

  test('(a) two users chat both ways', { timeout: TEST_TIMEOUT }, async () => {
    const alice = await openUser('alice');
    const bob = await openUser('bob');
    const conv = dm('alice', 'bob');

    // Alice's message is shown as "sending" first, then "sent".
    await startDm(alice.page, 'bob');
    await alice.page.evaluate(() => {
      window.__statuses = [];
      new MutationObserver((records) => {
        for (const r of records) for (const n of r.addedNodes) {
          if (n.dataset?.testid === 'message' && n.textContent.includes('hello bob')) window.__statuses.push(n.dataset.status);
        }
      }).observe(document.getElementById('message-list'), { childList: true });
    });
    await send(alice.page, 'hello bob');
    await seeMessage(alice.page, 'hello bob', { status: 'sent' });
    const statuses = await alice.page.evaluate(() => window.__statuses);
    assert.equal(statuses[0], 'sending');
    assert.equal(statuses.at(-1), 'sent');

    // Bob gets it live: unread badge and preview, then the conversation.
    await bob.page.locator(`[data-testid=conv-item][data-conv="${conv}"] [data-testid=unread]`)
      .filter({ hasText: '1' }).waitFor({ timeout: WAIT });
    assert.match(await convItem(bob.page, conv).getByTestId('conv-preview').textContent(), /hello bob/);
    await openConv(bob.page, conv);
    await seeMessage(bob.page, 'hello bob', { status: 'received' });
    await bob.page.waitForSelector(`[data-testid=conv-item][data-conv="${conv}"][data-unread="0"]`, { timeout: WAIT });
    assert.equal(await convItem(bob.page, conv).getByTestId('unread').isVisible(), false);

    // Typing indicator, then Bob's reply (Shift+Enter makes a new line).
    await bob.page.getByTestId('composer-input').fill('hi al');
    await alice.page.getByTestId('typing').filter({ hasText: 'bob is typing' }).waitFor({ timeout: WAIT });
    await bob.page.getByTestId('composer-input').fill('');
    await bob.page.getByTestId('composer-input').pressSequentially('hi alice');
    await bob.page.getByTestId('composer-input').press('Shift+Enter');
    await bob.page.getByTestId('composer-input').pressSequentially('second line');
    await bob.page.getByTestId('composer-input').press('Enter');
    await seeMessage(bob.page, 'second line', { status: 'sent' });
    await seeMessage(alice.page, 'second line', { status: 'received' });
    const body = await messages(alice.page, 'second line').getByTestId('message-body').textContent();
    assert.equal(body, 'hi alice\nsecond line');
    await alice.page.getByTestId('typing').filter({ hasText: /^$/ }).waitFor({ timeout: WAIT });

    // A few more both ways; each shows exactly once, in order.
    for (let i = 1; i <= 3; i++) {
      await send(alice.page, `ping ${i}`);
      await seeMessage(bob.page, `ping ${i}`);
      await send(bob.page, `pong ${i}`);
      await seeMessage(alice.page, `pong ${i}`);
    }
    for (const u of [alice, bob]) {
      const texts = await u.page.getByTestId('message-body').allTextContents();
      assert.deepEqual(texts, ['hello bob', 'hi alice\nsecond line', 'ping 1', 'pong 1', 'ping 2', 'pong 2', 'ping 3', 'pong 3']);
      const seqs = await u.page.locator('[data-testid=message]').evaluateAll((ns) => ns.map((n) => Number(n.dataset.seq)));
      assert.deepEqual(seqs, [1, 2, 3, 4, 5, 6, 7, 8]);
    }

    // Presence: a fresh connection is told who is online; a reload also keeps
    // the sign-in (sessionStorage) and the conversation list.
    await alice.page.reload();
    await waitSynced(alice.page);
    await alice.page.getByTestId('me').filter({ hasText: 'alice' }).waitFor({ timeout: WAIT });
    await alice.page.waitForSelector(`[data-testid=conv-item][data-conv="${conv}"] [data-testid=conv-item-presence][data-online=true]`, { timeout: WAIT });
    await openConv(alice.page, conv);
    await seeMessage(alice.page, 'pong 3');
    await alice.page.waitForSelector('[data-testid=conv-presence][data-online=true]', { timeout: WAIT });
    await shot(alice.page, 'chat.png');

    // Bob goes away: Alice sees him offline.
    await closeUser(bob);
    await alice.page.waitForSelector('[data-testid=conv-presence][data-online=false]', { timeout: WAIT });

    // Sign-out returns to the sign-in screen.
    await alice.page.getByTestId('sign-out').click();
    await alice.page.getByTestId('login-view').waitFor({ timeout: WAIT });
    await closeUser(alice);
  });

  test('(b) a group of three', { timeout: TEST_TIMEOUT }, async () => {
    const ann = await openUser('ann');
    const ben = await openUser('ben');
    const cy = await openUser('cy');
    const conv = 'group:team-b';
    const name = 'Team <b>B</b>';

    await ann.page.getByTestId('new-group-toggle').click();
    await ann.page.getByTestId('group-id').fill('team-b');
    await ann.page.getByTestId('group-name').fill(name);
    await ann.page.getByTestId('group-members').fill('ben, cy');
    await ann.page.getByTestId('group-create').click();
    // The creator lands in the new group.
    await ann.page.waitForSelector(`[data-testid=conversation][data-conv="${conv}"]`, { timeout: WAIT });
    assert.equal(await ann.page.getByTestId('conv-title').textContent(), name);

    for (const u of [ben, cy]) {
      await convItem(u.page, conv).waitFor({ timeout: WAIT });
      assert.equal(await convItem(u.page, conv).getByTestId('conv-name').textContent(), name);
      await openConv(u.page, conv);
    }

    await send(ann.page, 'hi team');
    await seeMessage(ann.page, 'hi team', { status: 'sent' });
    await seeMessage(ben.page, 'hi team');
    await seeMessage(cy.page, 'hi team');
    assert.equal(await messages(cy.page, 'hi team').getByTestId('message-from').textContent(), 'ann');

    await send(ben.page, 'hello from ben');
    await seeMessage(ann.page, 'hello from ben');
    await seeMessage(cy.page, 'hello from ben');
    await send(cy.page, 'and cy');
    await seeMessage(ann.page, 'and cy');
    await seeMessage(ben.page, 'and cy');

    // Members: only the owner may remove; others may leave.
    await ann.page.getByTestId('members-toggle').click();
    await ann.page.getByTestId('member').nth(2).waitFor({ timeout: WAIT });
    assert.equal(await ann.page.getByTestId('member').count(), 3);
    assert.equal(await ann.page.getByTestId('remove-member').count(), 2);
    assert.equal(await ann.page.getByTestId('leave-group').isVisible(), false);
    await ben.page.getByTestId('members-toggle').click();
    await ben.page.getByTestId('member').nth(2).waitFor({ timeout: WAIT });
    assert.equal(await ben.page.getByTestId('remove-member').count(), 0);
    assert.equal(await ben.page.getByTestId('leave-group').isVisible(), true);

    // The owner adds someone, then removes cy, who can no longer write.
    await ann.page.getByTestId('add-member-user').fill('dana');
    await ann.page.getByTestId('add-member').click();
    await ann.page.locator('[data-testid=member][data-user=dana]').waitFor({ timeout: WAIT });
    await ben.page.locator('[data-testid=member][data-user=dana]').waitFor({ timeout: WAIT });
    await shot(ann.page, 'group.png');

    await ann.page.locator('[data-testid=remove-member][data-user=cy]').click();
    await ann.page.locator('[data-testid=member][data-user=cy]').waitFor({ state: 'detached', timeout: WAIT });
    await cy.page.getByTestId('not-member').waitFor({ timeout: WAIT });
    assert.equal(await cy.page.getByTestId('composer').isVisible(), false);

    // Ben leaves; ann sees the member list shrink.
    await ben.page.getByTestId('leave-group').click();
    await ben.page.getByTestId('not-member').waitFor({ timeout: WAIT });
    await ann.page.locator('[data-testid=member][data-user=ben]').waitFor({ state: 'detached', timeout: WAIT });

    await send(ann.page, 'just us now');
    await seeMessage(ann.page, 'just us now', { status: 'sent' });

    for (const u of [ann, ben, cy]) await closeUser(u);
  });

  test('(c) messages sent while the recipient is offline arrive at sign-in', { timeout: TEST_TIMEOUT }, async () => {
    const eve = await openUser('eve');
    const conv = dm('eve', 'frank');
    await startDm(eve.page, 'frank');
    for (const text of ['while you were away 1', 'while you were away 2', 'while you were away 3']) {
      await send(eve.page, text);
      await seeMessage(eve.page, text, { status: 'sent' });
    }

    // Frank signs in with a token in the URL fragment.
    const r = await fetch(`${server.url}/dev/token`, {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user: 'frank' }),
    });
    assert.equal(r.status, 200);
    const { token } = await r.json();
    const frank = await openUser('frank', { token });
    assert.equal(new URL(frank.page.url()).hash, '', 'the token is taken out of the address bar');

    await convItem(frank.page, conv).locator('[data-testid=unread]').filter({ hasText: '3' }).waitFor({ timeout: WAIT });
    assert.match(await convItem(frank.page, conv).getByTestId('conv-preview').textContent(), /while you were away 3/);
    await openConv(frank.page, conv);
    await seeMessage(frank.page, 'while you were away 3');
    assert.deepEqual(await frank.page.getByTestId('message-body').allTextContents(),
      ['while you were away 1', 'while you were away 2', 'while you were away 3']);

    // Frank acknowledged all three, so a new connection does not bring them
    // again as unread.
    await frank.page.waitForSelector(`[data-testid=conv-item][data-conv="${conv}"][data-acked="3"]`, { timeout: WAIT });
    await frank.page.reload();
    await waitSynced(frank.page);
    await convItem(frank.page, conv).waitFor({ timeout: WAIT });
    assert.equal(await convItem(frank.page, conv).getAttribute('data-unread'), '0');

    // He answers; eve sees it live.
    await openConv(frank.page, conv);
    await send(frank.page, 'back now');
    await seeMessage(eve.page, 'back now');
    await closeUser(frank);
    await closeUser(eve);
  });

  test('(d) the server restarts under open pages', { timeout: TEST_TIMEOUT }, async () => {
    const gus = await openUser('gus');
    const hal = await openUser('hal');
    const conv = dm('gus', 'hal');
    await startDm(gus.page, 'hal');
    await send(gus.page, 'before restart');
    await seeMessage(gus.page, 'before restart', { status: 'sent' });
    await openConv(hal.page, conv);
    await seeMessage(hal.page, 'before restart');
    await hal.page.waitForSelector(`[data-testid=conv-item][data-conv="${conv}"][data-acked="1"]`, { timeout: WAIT });

    const code = await server.stop();
    assert.equal(code, 0, `chat-hub exit code after SIGTERM:\n${server.output}`);
    for (const u of [gus, hal]) {
      await u.page.getByTestId('banner').filter({ hasText: 'Reconnecting' }).waitFor({ timeout: WAIT });
    }

    // Written while the server is down: stays "sending" and goes out after.
    await send(gus.page, 'queued while down');
    await seeMessage(gus.page, 'queued while down', { status: 'sending' });

    await server.start();
    for (const u of [gus, hal]) {
      await u.page.getByTestId('banner').waitFor({ state: 'hidden', timeout: RECONNECT_WAIT });
      await waitSynced(u.page);
    }
    await seeMessage(gus.page, 'queued while down', { status: 'sent' });
    await seeMessage(hal.page, 'queued while down');

    await send(gus.page, 'after restart');
    await seeMessage(hal.page, 'after restart');
    await send(hal.page, 'reply after restart');
    await seeMessage(gus.page, 'reply after restart');

    for (const u of [gus, hal]) {
      assert.deepEqual(await u.page.getByTestId('message-body').allTextContents(),
        ['before restart', 'queued while down', 'after restart', 'reply after restart'], `${u.user}'s messages`);
    }
    await closeUser(gus);
    await closeUser(hal);
  });

  test('(e) message bodies are text, never markup', { timeout: TEST_TIMEOUT }, async () => {
    const ivy = await openUser('ivy');
    const jay = await openUser('jay');
    const evil = '<img src=x onerror=alert(1)>';
    await startDm(ivy.page, 'jay');
    await send(ivy.page, evil);
    await seeMessage(ivy.page, evil, { status: 'sent' });
    await openConv(jay.page, dm('ivy', 'jay'));
    await seeMessage(jay.page, evil);

    // Something after it makes sure any handler would have had its chance.
    await send(jay.page, 'after the img');
    await seeMessage(ivy.page, 'after the img');

    for (const u of [ivy, jay]) {
      assert.equal(await messages(u.page, evil).getByTestId('message-body').textContent(), evil);
      assert.equal(await u.page.evaluate(() => document.querySelectorAll('img').length), 0);
      assert.match(await convItem(u.page, dm('ivy', 'jay')).getByTestId('conv-preview').textContent(), /after the img/);
      assert.deepEqual(u.dialogs, []);
    }
    await closeUser(ivy);
    await closeUser(jay);
  });

  test('(f) phone-width layout', { timeout: TEST_TIMEOUT }, async () => {
    const lee = await openUser('lee');
    const kim = await openUser('kim', { viewport: PHONE });
    const conv = dm('kim', 'lee');
    const { page } = kim;

    // Only the list at first, all of it on screen.
    assert.equal(await page.getByTestId('sidebar').isVisible(), true);
    assert.equal(await page.getByTestId('conversation').isVisible(), false);
    await assertFits(page, ['sidebar', 'sign-out', 'new-dm-start']);

    await startDm(page, 'lee');
    assert.equal(await page.getByTestId('sidebar').isVisible(), false);
    assert.equal(await page.getByTestId('back').isVisible(), true);
    const box = await page.getByTestId('conversation').boundingBox();
    assert.equal(Math.round(box.width), PHONE.width);

    await send(page, 'hi from a phone');
    await seeMessage(page, 'hi from a phone', { status: 'sent' });
    await openConv(lee.page, conv);
    await seeMessage(lee.page, 'hi from a phone');
    await send(lee.page, 'a longer answer from the desktop, long enough to wrap over several lines on a narrow screen');
    await seeMessage(page, 'a longer answer');
    await assertFits(page, ['conversation', 'back', 'composer-input', 'send', 'message']);
    await shot(page, 'phone.png');

    await page.getByTestId('back').click();
    await page.getByTestId('sidebar').waitFor({ timeout: WAIT });
    assert.equal(await page.getByTestId('conversation').isVisible(), false);
    await assertFits(page, ['sidebar', 'sign-out', 'new-dm-start', 'conv-item']);
    assert.match(await convItem(page, conv).getByTestId('conv-preview').textContent(), /a longer answer/);
    await shot(page, 'phone-list.png');
    await closeUser(kim);
    await closeUser(lee);
  });

  test('(g) older history loads on scroll-back', { timeout: TEST_TIMEOUT }, async () => {
    const mo = await openUser('mo');
    const conv = dm('mo', 'nu');
    const total = 60;
    await startDm(mo.page, 'nu');
    await send(mo.page, 'bulk 1');
    await seeMessage(mo.page, 'bulk 1', { status: 'sent' });
    // The rest through a second socket of mo's, like another device would,
    // honouring rate_limited as a client must.
    const sent = await mo.page.evaluate(async ({ total }) => {
      const token = sessionStorage.getItem('chat-hub.token');
      const ws = new WebSocket(`ws://${location.host}/ws?token=${encodeURIComponent(token)}`);
      let n = 2;
      return await new Promise((resolve, reject) => {
        const next = () => ws.send(JSON.stringify({ type: 'send', to: { user: 'nu' }, body: `bulk ${n}`, client_id: `bulk-${n}`, ref: `b${n}` }));
        ws.onmessage = (ev) => {
          const f = JSON.parse(ev.data);
          if (f.type === 'synced') next();
          else if (f.type === 'sent') { if (++n > total) { ws.close(); resolve(f.seq); } else next(); }
          else if (f.type === 'error' && f.code === 'rate_limited') setTimeout(next, 200);
          else if (f.type === 'error') reject(new Error(JSON.stringify(f)));
        };
        ws.onerror = () => reject(new Error('socket failed'));
      });
    }, { total });
    assert.equal(sent, total);
    await seeMessage(mo.page, `bulk ${total}`);

    // After a reload only the newest page is fetched; scrolling up brings the rest.
    await mo.page.reload();
    await waitSynced(mo.page);
    await openConv(mo.page, conv);
    await seeMessage(mo.page, `bulk ${total}`);
    await mo.page.waitForSelector('[data-testid=history-status][data-state=loaded]', { timeout: WAIT });
    assert.equal(await mo.page.getByTestId('message').count(), 50);
    await mo.page.getByTestId('messages').evaluate((box) => { box.scrollTop = 0; });
    await mo.page.locator('[data-testid=message][data-seq="1"]').waitFor({ timeout: WAIT });
    const seqs = await mo.page.locator('[data-testid=message]').evaluateAll((ns) => ns.map((n) => Number(n.dataset.seq)));
    assert.deepEqual(seqs, Array.from({ length: total }, (_, i) => i + 1));
    assert.match(await mo.page.getByTestId('history-status').textContent(), /Start of the conversation/);
    await closeUser(mo);
  });
});
