// The chat page in headless Chromium, driven by playwright-core.
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { after, before, describe, test } from 'node:test';

import { chromium } from 'playwright-core';

import { WAIT_MS, GRACE_MS, mintToken, newSecret, sleep, startServer } from './support.mjs';

const CHROMIUM = process.env.CHROMIUM_PATH || '/usr/bin/chromium';
const TEST_TIMEOUT = 90_000;
const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

async function launchBrowser() {
  if (!existsSync(CHROMIUM)) {
    throw new Error(`Chromium not found at ${CHROMIUM}: install it (apt-get install -y chromium) or set CHROMIUM_PATH`);
  }
  return chromium.launch({ executablePath: CHROMIUM, headless: true, args: CHROMIUM_ARGS, timeout: 30_000 });
}

/** A page in its own browser context, with page errors collected for diagnostics. */
async function openPage(browser, url) {
  const context = await browser.newContext();
  const page = await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.problems = [];
  page.on('pageerror', (err) => page.problems.push(`pageerror: ${err.message}`));
  page.on('console', (msg) => {
    if (msg.type() === 'error') page.problems.push(`console: ${msg.text()}`);
  });
  await page.goto(url);
  return page;
}

async function waitForStatus(page, status) {
  try {
    await page.waitForFunction((s) => document.getElementById('status').textContent === s, status, { timeout: WAIT_MS });
  } catch (err) {
    const now = await page.textContent('#status');
    const errors = await page.locator('#errors li').allTextContents();
    throw new Error(`#status never became "${status}" (is "${now}"; #errors: ${JSON.stringify(errors)}; ${page.problems.join('; ')})`);
  }
}

async function signIn(page, user) {
  await page.fill('#user', user);
  await page.click('#signin');
  await waitForStatus(page, 'Connected');
  const id = (await page.textContent('#connection-id')).trim();
  assert.ok(id.length > 0 && id !== '—', `${user}'s page shows a connection id (got "${id}")`);
  return id;
}

async function sendWithEnter(page, to, text) {
  await page.fill('#to', to);
  await page.fill('#message', text);
  await page.press('#message', 'Enter');
}

const items = (page, list) => page.locator(`#${list} li`).allTextContents();

describe('the chat page in Chromium (server with --dev)', { timeout: 180_000 }, () => {
  let server;
  let browser;
  before(async () => {
    server = await startServer({ dev: true });
    browser = await launchBrowser();
  });
  after(async () => {
    await browser?.close().catch(() => {});
    await server?.stop();
  });

  test('alice and bob sign in by name, alice writes to bob, and to an offline carol', { timeout: TEST_TIMEOUT }, async (t) => {
    const alice = await openPage(browser, `${server.url}/`);
    const bob = await openPage(browser, `${server.url}/`);
    assert.equal(await alice.locator('#missing-client').isVisible(), false, 'the SignalR client loaded');

    const aliceId = await signIn(alice, 'alice');
    const bobId = await signIn(bob, 'bob');
    assert.notEqual(aliceId, bobId);
    assert.equal(await alice.textContent('#whoami'), 'alice');

    await sendWithEnter(alice, 'bob', 'Hello Bob!');
    await bob.locator('#messages li', { hasText: 'alice: Hello Bob!' }).waitFor();
    // The field is cleared once the invocation completed.
    await alice.waitForFunction(() => document.getElementById('message').value === '');

    await sendWithEnter(alice, 'carol', 'Are you there?');
    await alice.locator('#errors li', { hasText: "The user 'carol' is not connected." }).waitFor();

    await sleep(GRACE_MS);
    assert.deepEqual(await items(bob, 'messages'), ['alice: Hello Bob!']);
    assert.deepEqual(await items(bob, 'errors'), []);
    assert.deepEqual(await items(alice, 'messages'), []);
    assert.deepEqual(await items(alice, 'errors'), ["The user 'carol' is not connected."]);

    // bob answers with the button instead of Enter.
    await bob.fill('#to', 'alice');
    await bob.fill('#message', 'Hi Alice');
    await bob.click('#send');
    await alice.locator('#messages li', { hasText: 'bob: Hi Alice' }).waitFor();

    const shot = path.join(os.tmpdir(), `switchboard-chat-${process.pid}.png`);
    await alice.screenshot({ path: shot, fullPage: true });
    t.diagnostic(`screenshot of alice's page: ${shot}`);

    assert.deepEqual(alice.problems, [], 'no script errors on alice\'s page');
    assert.deepEqual(bob.problems, [], 'no script errors on bob\'s page');
    await alice.context().close();
    await bob.context().close();
  });

  test('a user signed in on two pages gets the message on both', { timeout: TEST_TIMEOUT }, async () => {
    const pages = [];
    for (let i = 0; i < 3; i++) pages.push(await openPage(browser, `${server.url}/`));
    const [dave1, dave2, erin] = pages;
    const ids = [await signIn(dave1, 'dave'), await signIn(dave2, 'dave'), await signIn(erin, 'erin')];
    assert.equal(new Set(ids).size, 3, 'every page has its own connection id');

    await sendWithEnter(erin, 'dave', 'to all of you');
    for (const p of [dave1, dave2]) await p.locator('#messages li', { hasText: 'erin: to all of you' }).waitFor();
    await sleep(GRACE_MS);
    assert.deepEqual(await items(dave1, 'messages'), ['erin: to all of you']);
    assert.deepEqual(await items(dave2, 'messages'), ['erin: to all of you']);
    assert.deepEqual(await items(erin, 'messages'), []);
    for (const p of pages) await p.context().close();
  });
});

test('without --dev the page asks for a JWT, and a pasted token signs in', { timeout: TEST_TIMEOUT }, async () => {
  const secret = newSecret();
  const server = await startServer({ jwtSecret: secret });
  const browser = await launchBrowser();
  try {
    const page = await openPage(browser, `${server.url}/`);
    assert.equal(await page.locator('#token').isVisible(), false, 'no token field before dev sign-in fails');
    await page.fill('#user', 'frank');
    await page.click('#signin');
    await page.locator('#token').waitFor({ state: 'visible' });
    assert.equal(await page.textContent('#status'), 'Signed out');

    await page.fill('#token', mintToken(secret, 'frank'));
    await page.click('#signin');
    await waitForStatus(page, 'Connected');
    assert.equal(await page.textContent('#whoami'), 'frank');

    await sendWithEnter(page, 'frank', 'note to self');
    await page.locator('#messages li', { hasText: 'frank: note to self' }).waitFor();

    // A token the server does not accept: the page reports it and is not connected.
    await page.fill('#token', mintToken(newSecret(), 'frank'));
    await page.click('#signin');
    await page.locator('#errors li', { hasText: 'Could not connect' }).waitFor();
    await waitForStatus(page, 'Disconnected');
  } finally {
    await browser.close().catch(() => {});
    await server.stop();
  }
});

test('without the vendored SignalR client the page says how to get it', { timeout: TEST_TIMEOUT }, async () => {
  const emptyVendor = mkdtempSync(path.join(os.tmpdir(), 'switchboard-empty-vendor-'));
  const server = await startServer({ dev: true, args: ['--vendor-dir', emptyVendor] });
  const browser = await launchBrowser();
  try {
    const page = await openPage(browser, `${server.url}/`);
    const banner = page.locator('#missing-client');
    await banner.waitFor({ state: 'visible' });
    const text = await banner.textContent();
    assert.ok(text.includes('The SignalR browser client is missing'), text);
    assert.ok(text.includes('npm ci --prefix web'), text);
    assert.equal(await page.isDisabled('#signin'), true, 'sign-in is disabled');
  } finally {
    await browser.close().catch(() => {});
    await server.stop();
    rmSync(emptyVendor, { recursive: true, force: true });
  }
});
