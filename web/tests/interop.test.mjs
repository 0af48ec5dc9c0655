// The hub against the official @microsoft/signalr Node client (and raw
// WebSockets where the browser's way of sending the token matters).
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { after, before, describe, test } from 'node:test';

import {
  GRACE_MS,
  RawHubSocket,
  WAIT_MS,
  buildConnection,
  connect,
  expectRejection,
  mintToken,
  negotiate,
  newSecret,
  signalR,
  sleep,
  startProxy,
  startServer,
  stopAll,
  upgradeStatus,
  waitUntil,
  withTimeout,
} from './support.mjs';

const TEST_TIMEOUT = 60_000;
const tag = () => randomBytes(3).toString('hex');

describe('hub interop with the official Node client', { timeout: 180_000 }, () => {
  let server;
  let secret;
  let keepAliveSocket;
  let keepAliveOpenedAt;
  const open = [];

  before(async () => {
    secret = newSecret();
    server = await startServer({ jwtSecret: secret });
    // Opened first so that the keep-alive test at the end has waited most of
    // the interval by the time it runs.
    keepAliveOpenedAt = Date.now();
    keepAliveSocket = await RawHubSocket.open(`${server.wsUrl}?access_token=${encodeURIComponent(mintToken(secret, `idle-${tag()}`))}`);
    assert.deepEqual(await keepAliveSocket.handshake(), {});
  });

  after(async () => {
    keepAliveSocket?.close();
    await stopAll(open);
    await server?.stop();
  });

  async function connectAs(user, label = user, options = {}) {
    const c = await connect(server.hubUrl, { token: mintToken(secret, user), label, ...options });
    open.push(c);
    return c;
  }

  async function invoke(c, ...args) {
    return withTimeout(c.connection.invoke(...args), WAIT_MS, `invoke(${args.map((a) => JSON.stringify(a)).join(', ')})`);
  }

  test('a message to a user reaches every connection of that user exactly once, and nobody else', { timeout: TEST_TIMEOUT }, async () => {
    const t = tag();
    const users = ['alice', 'bob', 'carol'].map((u) => `${u}-${t}`);
    const conns = {};
    for (const u of users) {
      conns[u] = await Promise.all([0, 1, 2].map((i) => connectAs(u, `${u}#${i}`)));
    }
    const all = users.flatMap((u) => conns[u]);
    const ids = all.map((c) => c.connection.connectionId);
    assert.equal(new Set(ids).size, ids.length, `connection ids are distinct: ${ids}`);
    for (const id of ids) assert.ok(typeof id === 'string' && id.length > 0, 'every connection has an id');

    // alice -> bob, bob -> carol, carol -> alice, each time from another of the sender's connections.
    for (const [from, to] of [[0, 1], [1, 2], [2, 0]]) {
      for (const c of all) c.inbox.clear();
      const sender = conns[users[from]][from];
      const text = `hello ${users[to]} (${tag()})`;
      const result = await invoke(sender, 'SendChatMessage', users[to], text);
      assert.equal(result ?? null, null, 'SendChatMessage completes without a result');
      await Promise.all(conns[users[to]].map((c) => c.inbox.waitFor('messages', 1)));
      await sleep(GRACE_MS);
      for (const u of users) {
        for (const [i, c] of conns[u].entries()) {
          const expected = u === users[to] ? [`${users[from]}: ${text}`] : [];
          assert.deepEqual(c.inbox.messages, expected, `messages of ${u}#${i} after ${users[from]} -> ${users[to]}`);
          assert.deepEqual(c.inbox.errors, [], `errors of ${u}#${i}`);
        }
      }
    }
    await stopAll(all);
  });

  test('a message to yourself reaches all your connections, the sender included', { timeout: TEST_TIMEOUT }, async () => {
    const me = `dora-${tag()}`;
    const other = await connectAs(`eve-${tag()}`);
    const mine = await Promise.all([0, 1, 2].map((i) => connectAs(me, `${me}#${i}`)));
    const text = 'note to self';
    await invoke(mine[1], 'SendChatMessage', me, text);
    await Promise.all(mine.map((c) => c.inbox.waitFor('messages', 1)));
    await sleep(GRACE_MS);
    for (const [i, c] of mine.entries()) {
      assert.deepEqual(c.inbox.messages, [`${me}: ${text}`], `messages of ${me}#${i}`);
      assert.deepEqual(c.inbox.errors, []);
    }
    assert.deepEqual(other.inbox.messages, []);
    await stopAll([...mine, other]);
  });

  test('a message to an offline user: showErrorMessage on the caller only, and the invocation completes', { timeout: TEST_TIMEOUT }, async () => {
    const me = `fred-${tag()}`;
    const nobody = `nobody-${tag()}`;
    const [caller, sibling] = await Promise.all([connectAs(me, `${me}#0`), connectAs(me, `${me}#1`)]);
    const bystander = await connectAs(`gina-${tag()}`);
    const result = await invoke(caller, 'SendChatMessage', nobody, 'anyone there?');
    assert.equal(result ?? null, null, 'the invocation completes without a result');
    await caller.inbox.waitFor('errors', 1);
    await sleep(GRACE_MS);
    assert.deepEqual(caller.inbox.errors, [`The user '${nobody}' is not connected.`]);
    assert.deepEqual(caller.inbox.messages, []);
    for (const c of [sibling, bystander]) {
      assert.deepEqual(c.inbox.errors, [], 'no error reaches other connections');
      assert.deepEqual(c.inbox.messages, []);
    }
    await stopAll([caller, sibling, bystander]);
  });

  test('closed connections stop receiving; a user whose last connection closed is offline', { timeout: TEST_TIMEOUT }, async () => {
    const target = `hank-${tag()}`;
    const callerUser = `ivy-${tag()}`;
    const caller = await connectAs(callerUser);
    const conns = await Promise.all([0, 1, 2].map((i) => connectAs(target, `${target}#${i}`)));

    await withTimeout(conns[0].connection.stop(), WAIT_MS, 'stop()');
    await invoke(caller, 'SendChatMessage', target, 'two of you left');
    await Promise.all(conns.slice(1).map((c) => c.inbox.waitFor('messages', 1)));
    await sleep(GRACE_MS);
    assert.deepEqual(conns[0].inbox.messages, [], 'the closed connection got nothing');
    for (const c of conns.slice(1)) assert.deepEqual(c.inbox.messages, [`${callerUser}: two of you left`]);
    assert.deepEqual(caller.inbox.errors, []);

    await stopAll(conns.slice(1));
    // The server learns of the closes asynchronously: ask until it reports the user offline.
    const offline = `The user '${target}' is not connected.`;
    await waitUntil(async () => {
      await invoke(caller, 'SendChatMessage', target, 'still there?');
      await sleep(50);
      return caller.inbox.errors.includes(offline);
    }, `'${offline}' after every connection of ${target} closed`);
    assert.deepEqual(caller.inbox.errors, [offline]);
    for (const c of conns) assert.deepEqual(c.inbox.messages.filter((m) => m.endsWith('still there?')), []);
    await stopAll([caller]);
  });

  test('an unknown hub method is rejected and the connection stays usable', { timeout: TEST_TIMEOUT }, async () => {
    const me = `jack-${tag()}`;
    const c = await connectAs(me);
    let closed = 0;
    c.connection.onclose(() => closed++);

    const err = await expectRejection(c.connection.invoke('NoSuchMethod', 'x'), "invoke('NoSuchMethod')");
    assert.match(err.message, /Unknown hub method 'NoSuchMethod'/);

    // Non-blocking call of an unknown method: the server must not answer (an
    // answer without invocation id would break the client's connection).
    await withTimeout(c.connection.send('NoSuchMethod', 'x'), WAIT_MS, "send('NoSuchMethod')");

    await invoke(c, 'SendChatMessage', me, 'still here');
    await c.inbox.waitFor('messages', 1);
    assert.deepEqual(c.inbox.messages, [`${me}: still here`]);
    assert.equal(c.connection.state, signalR.HubConnectionState.Connected);
    assert.equal(closed, 0);
    await stopAll([c]);
  });

  test('wrong arguments are rejected and the connection stays usable', { timeout: TEST_TIMEOUT }, async () => {
    const me = `kate-${tag()}`;
    const c = await connectAs(me);
    let closed = 0;
    c.connection.onclose(() => closed++);

    const cases = [
      ['too few arguments', [me]],
      ['no arguments', []],
      ['too many arguments', [me, 'a', 'b']],
      ['a number instead of a string', [42, 'x']],
      ['an object instead of a string', [me, { text: 'x' }]],
    ];
    for (const [what, args] of cases) {
      const err = await expectRejection(c.connection.invoke('SendChatMessage', ...args), `SendChatMessage with ${what}`);
      assert.ok(err.message.startsWith("Failed to invoke 'SendChatMessage'"), `${what}: got "${err.message}"`);
    }
    assert.equal(c.connection.state, signalR.HubConnectionState.Connected);

    await invoke(c, 'SendChatMessage', me, 'still fine');
    await c.inbox.waitFor('messages', 1);
    await sleep(GRACE_MS);
    assert.deepEqual(c.inbox.messages, [`${me}: still fine`], 'failed invocations delivered nothing');
    assert.deepEqual(c.inbox.errors, []);
    assert.equal(closed, 0);
    await stopAll([c]);
  });

  describe('unauthenticated and badly authenticated connections are refused', () => {
    const now = () => Math.floor(Date.now() / 1000);
    const badTokens = {
      'no token': () => null,
      'a token signed with another secret': () => mintToken(newSecret(), 'mallory'),
      'an expired token': () => mintToken(secret, 'mallory', { claims: { iat: now() - 7200, exp: now() - 3600 } }),
      'a token without exp': () => mintToken(secret, 'mallory', { claims: { exp: undefined } }),
      'an unsigned token (alg none)': () => mintToken(secret, 'mallory', { header: { alg: 'none' } }).replace(/[^.]+$/, ''),
      'a token that is not a JWT': () => 'not-a-jwt',
    };

    for (const [what, make] of Object.entries(badTokens)) {
      test(`${what}: negotiate and both WebSocket paths answer 401, start() rejects`, { timeout: TEST_TIMEOUT }, async () => {
        const token = make();
        const neg = await negotiate(server.hubUrl, { token });
        assert.equal(neg.status, 401, `POST /hubs/chat/negotiate: ${JSON.stringify(neg.body)}`);

        const headers = token ? { Authorization: `Bearer ${token}` } : {};
        assert.equal(await upgradeStatus(server.wsUrl, { headers }), 401, 'upgrade with the Authorization header');
        if (token) {
          assert.equal(await upgradeStatus(`${server.wsUrl}?access_token=${encodeURIComponent(token)}`), 401, 'upgrade with access_token');
        }

        const viaNegotiate = buildConnection(server.hubUrl, { token });
        const err = await expectRejection(viaNegotiate.start(), 'start()');
        assert.match(err.message, /401/, 'start() names the 401');
        assert.equal(viaNegotiate.state, signalR.HubConnectionState.Disconnected);

        const skipping = buildConnection(server.hubUrl, { token, skipNegotiation: true });
        await expectRejection(skipping.start(), 'start() with skipNegotiation');
        assert.equal(skipping.state, signalR.HubConnectionState.Disconnected);
      });
    }

    test('a forged access_token is refused on the id= path too, even with a real connection token', { timeout: TEST_TIMEOUT }, async () => {
      const neg = await negotiate(server.hubUrl, { token: mintToken(secret, `owner-${tag()}`) });
      assert.equal(neg.status, 200);
      const forged = mintToken(newSecret(), 'mallory');
      const status = await upgradeStatus(`${server.wsUrl}?id=${neg.body.connectionToken}&access_token=${encodeURIComponent(forged)}`);
      assert.equal(status, 401);
    });
  });

  test('browser style: the token in the access_token query parameter of the upgrade', { timeout: TEST_TIMEOUT }, async () => {
    const me = `lena-${tag()}`;
    const token = mintToken(secret, me);

    // As a browser does it: negotiate with the header, then the WebSocket with ?id=...&access_token=...
    const neg = await negotiate(server.hubUrl, { token });
    assert.equal(neg.status, 200, JSON.stringify(neg.body));
    assert.equal(neg.body.negotiateVersion, 1);
    assert.equal(typeof neg.body.connectionId, 'string');
    assert.match(neg.body.connectionToken, /^[A-Za-z0-9_-]+$/, 'the connection token is URL-safe');
    assert.deepEqual(
      neg.body.availableTransports.map((t) => t.transport),
      ['WebSockets'],
    );
    assert.ok(neg.body.availableTransports[0].transferFormats.includes('Text'));
    assert.equal(neg.body.useStatefulReconnect, undefined, 'no stateful reconnect unless asked for');

    const raw = await RawHubSocket.open(`${server.wsUrl}?id=${neg.body.connectionToken}&access_token=${encodeURIComponent(token)}`);
    try {
      assert.deepEqual(await raw.handshake(), {}, 'handshake answer');
      raw.send({ type: 1, invocationId: '0', target: 'SendChatMessage', arguments: [me, 'via the query string'] });
      const call = await raw.next((r) => r.type === 1, 'addChatMessage');
      assert.equal(call.target, 'addChatMessage');
      assert.deepEqual(call.arguments, [`${me}: via the query string`]);
      assert.equal(call.invocationId, undefined, 'server-to-client calls carry no invocation id');
      const completion = await raw.next((r) => r.type === 3, 'the completion');
      assert.equal(completion.invocationId, '0');
      assert.equal(completion.error, undefined);
      assert.equal(raw.binaryFrames, 0, 'JSON travels in text frames');
      assert.equal(raw.partialFrames, 0, 'every frame ends on a record boundary');
    } finally {
      raw.close();
    }

    // skipNegotiation style: no id, the token in the query.
    const direct = await RawHubSocket.open(`${server.wsUrl}?access_token=${encodeURIComponent(token)}`);
    try {
      assert.deepEqual(await direct.handshake(), {});
    } finally {
      direct.close();
    }

    // A bad access_token is refused on the upgrade.
    const forged = mintToken(newSecret(), me);
    assert.equal(await upgradeStatus(`${server.wsUrl}?access_token=${encodeURIComponent(forged)}`), 401);
  });

  test('skipNegotiation with a valid token connects and exchanges messages', { timeout: TEST_TIMEOUT }, async () => {
    const me = `mona-${tag()}`;
    const c = await connectAs(me, me, { skipNegotiation: true });
    await invoke(c, 'SendChatMessage', me, 'no negotiate');
    await c.inbox.waitFor('messages', 1);
    assert.deepEqual(c.inbox.messages, [`${me}: no negotiate`]);
    await stopAll([c]);
  });

  test('stateful reconnect: clients built with withStatefulReconnect() connect and exchange messages', { timeout: TEST_TIMEOUT }, async () => {
    const a = `olga-${tag()}`;
    const b = `pete-${tag()}`;
    const ca = await connectAs(a, a, { stateful: true });
    const cb = await connectAs(b, b, { stateful: true });
    await invoke(ca, 'SendChatMessage', b, 'ping');
    await cb.inbox.waitFor('messages', 1);
    await invoke(cb, 'SendChatMessage', a, 'pong');
    await ca.inbox.waitFor('messages', 1);
    for (let i = 0; i < 5; i++) await invoke(ca, 'SendChatMessage', b, `burst ${i}`);
    await cb.inbox.waitFor('messages', 6);
    await sleep(GRACE_MS);
    assert.deepEqual(ca.inbox.messages, [`${b}: pong`]);
    assert.deepEqual(cb.inbox.messages, [`${a}: ping`, ...[0, 1, 2, 3, 4].map((i) => `${a}: burst ${i}`)]);
    await stopAll([ca, cb]);
  });

  test('stateful reconnect: granted by negotiate when asked for, with the version 2 handshake', { timeout: TEST_TIMEOUT }, async () => {
    const me = `nora-${tag()}`;
    const token = mintToken(secret, me);
    const neg = await negotiate(server.hubUrl, { token, query: 'negotiateVersion=1&useStatefulReconnect=true' });
    assert.equal(neg.status, 200);
    assert.equal(neg.body.useStatefulReconnect, true, `negotiate answer: ${JSON.stringify(neg.body)}`);

    const raw = await RawHubSocket.open(`${server.wsUrl}?id=${neg.body.connectionToken}`, { headers: { Authorization: `Bearer ${token}` } });
    try {
      assert.deepEqual(await raw.handshake(2), {}, 'the version 2 handshake is accepted');
      raw.send({ type: 1, invocationId: '0', target: 'SendChatMessage', arguments: [me, 'numbered'] });
      const call = await raw.next((r) => r.type === 1, 'addChatMessage');
      assert.deepEqual(call.arguments, [`${me}: numbered`]);
      await raw.next((r) => r.type === 3 && r.invocationId === '0', 'the completion');
      // The server acknowledges the client's trackable record (about a second later).
      const ack = await raw.next((r) => r.type === 8, 'an Ack', 5_000);
      assert.equal(ack.sequenceId, 1);
    } finally {
      raw.close();
    }
  });

  test('stateful reconnect: a dropped socket re-attaches the same connection without losing or repeating messages', { timeout: TEST_TIMEOUT }, async () => {
    const proxy = await startProxy(server.port);
    try {
      const away = `quinn-${tag()}`;
      const friend = `rosa-${tag()}`;
      const ca = await connect(`${proxy.url}/hubs/chat`, { token: mintToken(secret, away), stateful: true, label: away });
      open.push(ca);
      const cf = await connectAs(friend);
      let reconnecting = 0;
      let closed = 0;
      ca.connection.onreconnecting(() => reconnecting++);
      ca.connection.onclose(() => closed++);
      const idBefore = ca.connection.connectionId;

      await invoke(cf, 'SendChatMessage', away, 'before the drop');
      await ca.inbox.waitFor('messages', 1);

      // Drop the network; hold the client's new socket until messages have been sent meanwhile.
      proxy.block();
      const heldBefore = proxy.heldCount;
      proxy.cut();
      await waitUntil(() => proxy.heldCount > heldBefore || closed > 0, 'the client to re-open its WebSocket');
      assert.equal(closed, 0, 'the connection closed when its socket dropped instead of re-attaching');

      await invoke(cf, 'SendChatMessage', away, 'while away');
      const pending = ca.connection.invoke('SendChatMessage', friend, 'sent while away');
      proxy.release();

      await withTimeout(pending, WAIT_MS, 'the invocation made while away');
      await ca.inbox.waitFor('messages', 2);
      await cf.inbox.waitFor('messages', 1);
      await sleep(GRACE_MS);

      assert.deepEqual(ca.inbox.messages, [`${friend}: before the drop`, `${friend}: while away`]);
      assert.deepEqual(cf.inbox.messages, [`${away}: sent while away`]);
      assert.deepEqual(cf.inbox.errors, [], 'the user was never reported offline');
      assert.deepEqual(ca.inbox.errors, []);
      assert.equal(ca.connection.connectionId, idBefore, 'same connection id');
      assert.equal(ca.connection.state, signalR.HubConnectionState.Connected);
      assert.equal(reconnecting, 0, 'no reconnecting event');
      assert.equal(closed, 0, 'no close event');

      // And the re-attached connection keeps working.
      await invoke(cf, 'SendChatMessage', away, 'after the drop');
      await ca.inbox.waitFor('messages', 3);
      assert.equal(ca.inbox.messages[2], `${friend}: after the drop`);
      await stopAll([ca, cf]);
    } finally {
      await proxy.close();
    }
  });

  test('the server sends keep-alive Pings to an idle connection', { timeout: TEST_TIMEOUT }, async () => {
    const waited = Date.now() - keepAliveOpenedAt;
    const ping = await keepAliveSocket.next((r) => r.type === 6, 'a Ping from the server', Math.max(20_000 - waited, 1_000));
    assert.deepEqual(ping, { type: 6 });
    assert.equal(keepAliveSocket.binaryFrames, 0);
  });
});
