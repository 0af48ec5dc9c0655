// The server's command line and plain HTTP surface: start-up rules, health,
// development tokens, JWT options, and the embedded chat page.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import {
  WAIT_MS,
  connect,
  devToken,
  freePort,
  mintToken,
  negotiate,
  newSecret,
  runBinary,
  startServer,
  stopAll,
  upgradeStatus,
  withTimeout,
} from './support.mjs';

const TEST_TIMEOUT = 60_000;
const tag = () => randomBytes(3).toString('hex');

async function get(url, init = {}) {
  return fetch(url, { ...init, signal: AbortSignal.timeout(WAIT_MS) });
}

test('serve refuses to start without --jwt-secret and without --dev', { timeout: TEST_TIMEOUT }, async () => {
  const port = await freePort();
  const run = await runBinary(['serve', '--store', 'memory', '--listen', `127.0.0.1:${port}`], { timeoutMs: 10_000 });
  assert.notEqual(run.code, 0, `exit code (stderr: ${run.stderr})`);
  assert.ok(run.stderr.trim().length > 0, 'explains why on stderr');
});

describe('a server with a JWT secret and no --dev', { timeout: 120_000 }, () => {
  let server;
  let secret;
  before(async () => {
    secret = newSecret();
    server = await startServer({ jwtSecret: secret });
  });
  after(async () => server?.stop());

  test('GET /healthz answers {"status":"ok"}', { timeout: TEST_TIMEOUT }, async () => {
    const res = await get(`${server.url}/healthz`);
    assert.equal(res.status, 200);
    assert.match(res.headers.get('content-type') || '', /application\/json/);
    assert.equal((await res.json()).status, 'ok');
  });

  test('POST /auth/dev-token is 404 without --dev', { timeout: TEST_TIMEOUT }, async () => {
    const res = await get(`${server.url}/auth/dev-token`, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: JSON.stringify({ user: 'alice' }),
    });
    assert.equal(res.status, 404);
  });

  test('the chat page, its script and stylesheet, and the vendored SignalR client are served', { timeout: TEST_TIMEOUT }, async () => {
    const page = await get(`${server.url}/`);
    assert.equal(page.status, 200);
    assert.match(page.headers.get('content-type') || '', /text\/html/);
    const html = await page.text();
    assert.ok(html.includes('/vendor/signalr.min.js'), 'the page loads the vendored client');
    assert.ok(html.includes('/chat.js'), 'the page loads chat.js');

    const js = await get(`${server.url}/chat.js`);
    assert.equal(js.status, 200);
    assert.match(js.headers.get('content-type') || '', /javascript/);
    assert.ok((await js.text()).includes('HubConnectionBuilder'));

    const css = await get(`${server.url}/chat.css`);
    assert.equal(css.status, 200);
    assert.match(css.headers.get('content-type') || '', /text\/css/);

    const vendor = await get(`${server.url}/vendor/signalr.min.js`);
    assert.equal(vendor.status, 200, 'served from web/node_modules/@microsoft/signalr/dist/browser');
    assert.match(vendor.headers.get('content-type') || '', /javascript/);
    assert.ok((await vendor.text()).includes('HubConnectionBuilder'));

    const missing = await get(`${server.url}/vendor/no-such-file.js`);
    assert.equal(missing.status, 404);
    const escape = await get(`${server.url}/vendor/..%2F..%2Fpackage.json`);
    assert.notEqual(escape.status, 200, 'no path traversal out of the vendor directory');
  });
});

test('--dev: /auth/dev-token mints tokens that the hub accepts, named by the user', { timeout: TEST_TIMEOUT }, async () => {
  const server = await startServer({ dev: true });
  const conns = [];
  try {
    const a = `alice-${tag()}`;
    const b = `bob-${tag()}`;
    const tokenA = await devToken(server.url, a);
    assert.equal(tokenA.split('.').length, 3, 'a JWT');
    const ca = await connect(server.hubUrl, { token: tokenA, label: a });
    const cb = await connect(server.hubUrl, { token: await devToken(server.url, b), label: b });
    conns.push(ca, cb);
    await withTimeout(ca.connection.invoke('SendChatMessage', b, 'hi'), WAIT_MS, 'invoke');
    await cb.inbox.waitFor('messages', 1);
    assert.deepEqual(cb.inbox.messages, [`${a}: hi`]);
    assert.equal((await negotiate(server.hubUrl)).status, 401, 'still no anonymous access with --dev');
  } finally {
    await stopAll(conns);
    await server.stop();
  }
});

test('SWITCHBOARD_JWT_SECRET configures the secret like --jwt-secret', { timeout: TEST_TIMEOUT }, async () => {
  const secret = newSecret();
  const server = await startServer({ env: { SWITCHBOARD_JWT_SECRET: secret } });
  try {
    assert.equal((await negotiate(server.hubUrl, { token: mintToken(secret, 'env-user') })).status, 200);
    assert.equal((await negotiate(server.hubUrl, { token: mintToken(newSecret(), 'env-user') })).status, 401);
  } finally {
    await server.stop();
  }
});

test('--jwt-issuer and --jwt-audience: only tokens with that iss and aud are accepted', { timeout: TEST_TIMEOUT }, async () => {
  const secret = newSecret();
  const server = await startServer({ jwtSecret: secret, args: ['--jwt-issuer', 'https://issuer.test', '--jwt-audience', 'switchboard-tests'] });
  try {
    const token = (claims) => mintToken(secret, 'sam', { claims });
    const good = token({ iss: 'https://issuer.test', aud: 'switchboard-tests' });
    assert.equal((await negotiate(server.hubUrl, { token: good })).status, 200, 'matching iss and aud');
    assert.equal(await upgradeStatus(`${server.wsUrl}?access_token=${encodeURIComponent(good)}`), 101);
    const bad = {
      'wrong iss': { iss: 'https://elsewhere.test', aud: 'switchboard-tests' },
      'wrong aud': { iss: 'https://issuer.test', aud: 'someone-else' },
      'no iss': { aud: 'switchboard-tests' },
      'no aud': { iss: 'https://issuer.test' },
    };
    for (const [what, claims] of Object.entries(bad)) {
      assert.equal((await negotiate(server.hubUrl, { token: token(claims) })).status, 401, what);
      assert.equal(await upgradeStatus(`${server.wsUrl}?access_token=${encodeURIComponent(token(claims))}`), 401, `${what} (upgrade)`);
    }
  } finally {
    await server.stop();
  }
});

test('--user-claim picks the claim that names the user', { timeout: TEST_TIMEOUT }, async () => {
  const secret = newSecret();
  const server = await startServer({ jwtSecret: secret, args: ['--user-claim', 'name'] });
  const conns = [];
  try {
    const name = `tina-${tag()}`;
    const subject = `subject-${tag()}`;
    const c = await connect(server.hubUrl, { token: mintToken(secret, subject, { claims: { name } }), label: name });
    conns.push(c);
    await withTimeout(c.connection.invoke('SendChatMessage', name, 'by name'), WAIT_MS, 'invoke');
    await c.inbox.waitFor('messages', 1);
    assert.deepEqual(c.inbox.messages, [`${name}: by name`]);
    await withTimeout(c.connection.invoke('SendChatMessage', subject, 'by subject'), WAIT_MS, 'invoke');
    await c.inbox.waitFor('errors', 1);
    assert.deepEqual(c.inbox.errors, [`The user '${subject}' is not connected.`]);
  } finally {
    await stopAll(conns);
    await server.stop();
  }
});
