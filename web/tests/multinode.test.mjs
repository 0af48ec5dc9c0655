// Three nodes with the official @microsoft/signalr Node client: deliveries
// across nodes, a node killed outright, and the broker restarted while
// messages are flowing. Once per deployment that spans servers: the groups
// store over Redis, the sql store on PostgreSQL over Redis, the sql store on
// PostgreSQL alone (its backplane in PostgreSQL too), and the azure store on
// Azurite over Redis and over PostgreSQL.
//
// Needs a server binary with the groups, sql and azure stores and both
// backplanes (the default features), `redis-server`, PostgreSQL's server
// binaries and Azurite (web/node_modules); it starts its own Redis, PostgreSQL
// and Azurite on free loopback ports.
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import net from 'node:net';
import { after, before, describe, test } from 'node:test';

import {
  GRACE_MS,
  WAIT_MS,
  connect,
  freePort,
  mintToken,
  newSecret,
  runBinary,
  signalR,
  sleep,
  startServer,
  stopAll,
  waitUntil,
  withTimeout,
} from './support.mjs';
import { startAzurite } from './azurite.mjs';
import { startPostgres } from './postgres.mjs';

const TEST_TIMEOUT = 90_000;
/** How long a killed node's users keep counting as online. */
const NODE_LEASE_SECONDS = 2;
const PROBE = /^[^:]+: probe \d+$/;

const redisChildren = new Set();
process.on('exit', () => {
  for (const child of redisChildren) {
    try {
      child.kill('SIGKILL');
    } catch (_) {
      /* already gone */
    }
  }
});

/** Resolves true when a Redis on 127.0.0.1:`port` answers PING with +PONG. */
function redisPing(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    let answer = '';
    const done = (ok) => {
      socket.destroy();
      resolve(ok);
    };
    socket.setTimeout(1_000, () => done(false));
    socket.on('connect', () => socket.write('PING\r\n'));
    socket.on('data', (chunk) => {
      answer += chunk;
      if (answer.includes('\r\n')) done(answer.startsWith('+PONG'));
    });
    socket.on('error', () => done(false));
  });
}

/**
 * Starts `redis-server` on 127.0.0.1:`port` without persistence and waits
 * until it answers PING. Returns { port, url, process, exited, logs(), kill(signal) }.
 */
async function startRedis(port) {
  const child = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  redisChildren.add(child);
  let log = '';
  const keep = (chunk) => {
    log += chunk;
    if (log.length > 100_000) log = log.slice(-50_000);
  };
  child.stdout.on('data', keep);
  child.stderr.on('data', keep);
  let spawnError = null;
  child.on('error', (err) => (spawnError = err));
  const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
  exited.then(() => redisChildren.delete(child));
  let early = null;
  exited.then((r) => (early = r));
  const redis = {
    port,
    url: `redis://127.0.0.1:${port}`,
    process: child,
    exited,
    logs: () => log,
    async kill(signal = 'SIGKILL') {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill(signal);
      await withTimeout(exited, 10_000, `redis-server exit after ${signal}`);
    },
  };
  await waitUntil(
    async () => {
      if (spawnError) throw new Error(`redis-server could not be started: ${spawnError.message}`);
      if (early) throw new Error(`redis-server exited (${JSON.stringify(early)}); log:\n${log}`);
      return redisPing(port);
    },
    `redis-server to answer PING on port ${port}`,
    { timeoutMs: 10_000, intervalMs: 100 },
  ).catch(async (err) => {
    child.kill('SIGKILL');
    throw err;
  });
  return redis;
}

const DEPLOYMENTS = [
  { name: 'groups store, Redis backplane', store: 'groups', backplane: 'redis', redis: true, postgres: false },
  { name: 'sql store on PostgreSQL, Redis backplane', store: 'sql', backplane: 'redis', redis: true, postgres: true },
  { name: 'sql store on PostgreSQL, PostgreSQL backplane', store: 'sql', backplane: 'postgres', redis: false, postgres: true },
  { name: 'azure store on Azurite, Redis backplane', store: 'azure', backplane: 'redis', redis: true, postgres: false, azure: true },
  { name: 'azure store on Azurite, PostgreSQL backplane', store: 'azure', backplane: 'postgres', redis: false, postgres: true, azure: true },
];

/** The table the azure store keeps its records in (the server's default). */
const AZURE_TABLE = 'connection';

for (const deployment of DEPLOYMENTS) scenario(deployment);

function scenario(deployment) {
describe(`three nodes, ${deployment.name}`, { timeout: 300_000 }, () => {
  const secret = newSecret();
  const nodes = [];
  const open = [];
  let redis;
  let redisPort;
  let postgres;
  let azurite;
  // Redis instances stopped during the tests, for their logs.
  const stoppedRedis = [];
  // alice on node 1 and node 2, bob on node 3, connected before the tests.
  let aliceOn1;
  let aliceOn2;
  let bob;
  let probes = 0;

  before(async () => {
    const args = [];
    if (deployment.redis) {
      const found = spawnSync('redis-server', ['--version'], { encoding: 'utf8' });
      if (found.error) {
        throw new Error(
          `redis-server is not available (${found.error.message}): these tests start their own Redis; ` +
            'install it (apt-get install -y redis-server) or run scripts/test.sh, which does',
        );
      }
      redisPort = await freePort();
      redis = await startRedis(redisPort);
      args.push('--redis-url', redis.url);
    }
    if (deployment.postgres) {
      postgres = await startPostgres(await freePort());
      args.push('--database-url', postgres.url);
    }
    if (deployment.azure) {
      azurite = await startAzurite();
      args.push('--azure-connection-string', azurite.connectionString);
    }
    const target = { store: deployment.store, backplane: deployment.backplane, args };
    for (let i = 0; i < 3; i++) {
      nodes.push(await startServer({ jwtSecret: secret, target, args: ['--node-lease', String(NODE_LEASE_SECONDS)] }));
    }
    aliceOn1 = await connectAs(0, 'alice', 'alice@node1');
    aliceOn2 = await connectAs(1, 'alice', 'alice@node2');
    bob = await connectAs(2, 'bob', 'bob@node3');
  });

  after(async () => {
    await stopAll(open);
    await Promise.all(nodes.map((n) => n.stop()));
    await redis?.kill('SIGTERM').catch(() => redis.kill('SIGKILL'));
    await postgres?.remove();
    await azurite?.remove();
  });

  async function connectAs(node, user, label) {
    const c = await connect(nodes[node].hubUrl, { token: mintToken(secret, user), label });
    open.push(c);
    return c;
  }

  function invoke(c, who, text, timeoutMs = WAIT_MS) {
    return withTimeout(c.connection.invoke('SendChatMessage', who, text), timeoutMs, `SendChatMessage(${JSON.stringify(who)}, ${JSON.stringify(text)})`);
  }

  /** `switchboard <args> --store azure ... --json`, read straight from the table; its JSON answer. */
  async function operator(...args) {
    const r = await runBinary([...args, '--store', 'azure', '--azure-connection-string', azurite.connectionString, '--json']);
    assert.equal(r.code, 0, `switchboard ${args.join(' ')} failed: ${r.stderr}`);
    return JSON.parse(r.stdout);
  }

  /** Carol's entities in the azure store's table, whatever their node's lease. */
  const carolEntities = () => azurite.entities(AZURE_TABLE, "User eq 'carol'");

  /** Messages other than the reachability probes. */
  const chat = (c) => c.inbox.messages.filter((m) => !PROBE.test(m));

  /**
   * Sends probes from `sender` to `who` until every connection in `receivers`
   * has one: a user's connection may count on another node only a moment
   * after start() resolves. Clears the inboxes of all of them afterwards.
   */
  async function waitReachable(sender, who, receivers) {
    await waitUntil(
      async () => {
        await invoke(sender, who, `probe ${++probes}`);
        await sleep(100);
        return receivers.every((r) => r.inbox.messages.some((m) => PROBE.test(m)));
      },
      `a probe from ${sender.inbox.label} to reach every connection of ${who}`,
      { timeoutMs: 15_000, intervalMs: 100 },
    );
    await sleep(GRACE_MS);
    for (const c of [sender, ...receivers]) c.inbox.clear();
  }

  /** Runs `body`; when it fails, prints the logs of the nodes and of Redis first. */
  async function withLogs(body) {
    try {
      await body();
    } catch (err) {
      for (const [i, n] of nodes.entries()) console.error(`--- node ${i + 1} (port ${n.port}) log ---\n${n.logs()}`);
      for (const r of [...stoppedRedis, redis].filter(Boolean)) console.error(`--- redis-server log ---\n${r.logs()}`);
      if (postgres) console.error(`--- postgres log ---\n${postgres.logs()}`);
      if (azurite) console.error(`--- azurite log ---\n${azurite.logs()}`);
      throw err;
    }
  }

  test('a message from bob on node 3 reaches both of alice’s connections, on nodes 1 and 2, exactly once and in order', { timeout: TEST_TIMEOUT }, () =>
    withLogs(async () => {
      await waitReachable(bob, 'alice', [aliceOn1, aliceOn2]);
      const texts = ['hi', 'hi 1', 'hi 2', 'hi 3', 'hi 4', 'hi 5', 'end of a'];
      for (const text of texts) await invoke(bob, 'alice', text);
      for (const c of [aliceOn1, aliceOn2]) {
        await waitUntil(() => chat(c).includes('bob: end of a'), `the marker at ${c.inbox.label}`);
      }
      await sleep(GRACE_MS);
      const expected = texts.map((t) => `bob: ${t}`);
      assert.deepEqual(chat(aliceOn1), expected, 'messages at alice@node1');
      assert.deepEqual(chat(aliceOn2), expected, 'messages at alice@node2');
      assert.deepEqual(bob.inbox.messages, [], 'bob receives none of his messages to alice');
      assert.deepEqual(bob.inbox.errors, [], 'bob gets no error: alice is connected');
    }));

  test('node 2 killed: alice on node 1 still gets messages, and carol (only on node 2) stops counting after the lease', { timeout: TEST_TIMEOUT }, () =>
    withLogs(async () => {
      const carol = await connectAs(1, 'carol', 'carol@node2');
      await waitReachable(bob, 'carol', [carol]);
      aliceOn1.inbox.clear();
      if (deployment.azure) {
        // The operators' view and the table itself hold carol's one connection.
        const rows = await operator('connections', 'carol');
        assert.deepEqual(rows.map((r) => r.id), [carol.connection.connectionId], 'carol’s connection, read from the store');
        assert.ok((await operator('users')).includes('carol'), 'carol is listed');
        assert.equal((await carolEntities()).length, 1, 'carol’s entity in the table');
      }

      nodes[1].process.kill('SIGKILL');
      const killedAt = Date.now();
      const exit = await withTimeout(nodes[1].exited, WAIT_MS, 'node 2 to exit after SIGKILL');
      assert.equal(exit.signal, 'SIGKILL', 'node 2 was killed');

      const texts = ['after kill 1', 'after kill 2', 'after kill 3', 'end of b'];
      for (const text of texts) await invoke(bob, 'alice', text);
      await waitUntil(() => chat(aliceOn1).includes('bob: end of b'), 'the marker at alice@node1');
      await sleep(GRACE_MS);
      assert.deepEqual(chat(aliceOn1), texts.map((t) => `bob: ${t}`), 'messages at alice@node1 after node 2 died');
      assert.deepEqual(bob.inbox.errors, [], 'alice still counts as connected (node 1)');

      // Within the lease carol may still count as online; after it she must not.
      // Each attempt is a distinct message; the error is sent before the
      // invocation completes, so one short wait after each is enough.
      const expectedError = "The user 'carol' is not connected.";
      let attempts = 0;
      await waitUntil(
        async () => {
          await invoke(bob, 'carol', `are you there ${++attempts}`);
          if (bob.inbox.errors.length === 0) await sleep(200);
          return bob.inbox.errors.length > 0;
        },
        `showErrorMessage about carol, ${NODE_LEASE_SECONDS} s lease after node 2 died`,
        { timeoutMs: 20_000, intervalMs: 250 },
      );
      await sleep(GRACE_MS);
      assert.ok(bob.inbox.errors.length >= 1);
      for (const e of bob.inbox.errors) assert.equal(e, expectedError, 'the only error bob gets is that carol is not connected');
      assert.deepEqual(bob.inbox.messages, [], 'bob receives nothing else');

      if (deployment.azure) {
        // Lookups and listings leave carol out from the lease's expiry on; the sweep of a
        // surviving node then deletes her entity from the table (within a third of the lease
        // after expiry, plus a margin for a 2-core machine).
        assert.deepEqual(await operator('connections', 'carol'), [], 'carol has no live connection');
        assert.ok(!(await operator('users')).includes('carol'), 'carol is not listed');
        await waitUntil(async () => (await carolEntities()).length === 0, 'carol’s entity to be swept from the table', {
          timeoutMs: NODE_LEASE_SECONDS * 3 * 1000 + 5_000,
          intervalMs: 200,
        });
        const sweptAfter = Date.now() - killedAt;
        assert.ok(sweptAfter >= (NODE_LEASE_SECONDS * 1000) / 3, `swept ${sweptAfter} ms after the kill: the entity outlived the process until the lease ran out`);
        assert.deepEqual((await operator('users')).filter((u) => u === 'alice' || u === 'bob'), ['alice', 'bob'], 'the live users are still listed');
      }
    }));

  if (deployment.backplane === 'redis') test('Redis restarted while bob streams to alice: every message arrives once and in order, and same-node delivery goes on during the outage', { timeout: TEST_TIMEOUT }, () =>
    withLogs(async () => {
      // dave and erin both on node 1: erin's messages to dave never need Redis.
      const dave = await connectAs(0, 'dave', 'dave@node1');
      const erin = await connectAs(0, 'erin', 'erin@node1');
      await waitReachable(erin, 'dave', [dave]);
      await waitReachable(bob, 'alice', [aliceOn1]);

      const COUNT = 150;
      const invocations = [];
      const streaming = (async () => {
        for (let i = 1; i <= COUNT; i++) {
          // Not awaited one by one: the pace stays steady while sends wait for Redis.
          invocations.push(
            invoke(bob, 'alice', `m ${i}`, 60_000).then(
              () => null,
              (err) => `m ${i}: ${err.message}`,
            ),
          );
          await sleep(20);
        }
      })();

      await waitUntil(() => chat(aliceOn1).length >= 30, 'the first 30 streamed messages at alice@node1', { timeoutMs: 20_000 });
      await redis.kill('SIGKILL');
      stoppedRedis.push(redis);
      const downAt = Date.now();
      assert.equal(await redisPing(redisPort), false, 'Redis is down');

      // Redis stays down until a message between two users of node 1 has been
      // delivered: were that delivery waiting for Redis, this wait would run out.
      // The invocation itself may wait for Redis (for other nodes' sake), so its
      // completion is only awaited once Redis is back.
      const localSend = invoke(erin, 'dave', 'during the outage', 60_000).then(
        () => null,
        (err) => err.message,
      );
      await waitUntil(() => chat(dave).length >= 1, 'the message during the outage at dave@node1, Redis down');
      assert.deepEqual(chat(dave), ['erin: during the outage'], 'same-node delivery during the outage');

      await sleep(Math.max(0, 1_000 - (Date.now() - downAt)));
      redis = await startRedis(redisPort);
      assert.equal(await localSend, null, 'erin’s send during the outage completes');
      assert.deepEqual(erin.inbox.errors, [], 'erin gets no error: dave is connected');

      await withTimeout(streaming, 30_000, 'the stream of sends');
      const failures = (await withTimeout(Promise.all(invocations), 60_000, 'every streamed send to complete')).filter(Boolean);
      assert.deepEqual(failures, [], 'every streamed send completes');
      await waitUntil(() => chat(aliceOn1).includes(`bob: m ${COUNT}`), `bob: m ${COUNT} at alice@node1`, { timeoutMs: 20_000 });
      await sleep(GRACE_MS);
      const expected = Array.from({ length: COUNT }, (_, i) => `bob: m ${i + 1}`);
      assert.deepEqual(chat(aliceOn1), expected, 'every streamed message once, in order');
      assert.deepEqual(bob.inbox.errors, [], 'bob gets no error: alice stayed connected');

      // After the outage: same node and across nodes again.
      await invoke(erin, 'dave', 'after the outage');
      await waitUntil(() => chat(dave).includes('erin: after the outage'), 'the message after the outage at dave@node1');
      assert.deepEqual(chat(dave), ['erin: during the outage', 'erin: after the outage']);
      for (const i of [0, 2]) assert.equal(nodes[i].process.exitCode, null, `node ${i + 1} kept running`);
      assert.equal(aliceOn1.connection.state, signalR.HubConnectionState.Connected, 'alice@node1 stayed connected');
      assert.equal(bob.connection.state, signalR.HubConnectionState.Connected, 'bob@node3 stayed connected');
    }));

  if (deployment.backplane === 'postgres') test('PostgreSQL restarted while bob streams to alice: no send hangs, each is delivered once or answered with an error, and everything works again after', { timeout: TEST_TIMEOUT }, () =>
    withLogs(async () => {
      await waitReachable(bob, 'alice', [aliceOn1]);
      bob.inbox.clear();
      const COUNT = 100;
      const invocations = [];
      const streaming = (async () => {
        for (let i = 1; i <= COUNT; i++) {
          invocations.push(
            invoke(bob, 'alice', `m ${i}`, 30_000).then(
              () => null,
              (err) => `m ${i}: ${err.message}`,
            ),
          );
          await sleep(20);
        }
      })();
      await waitUntil(() => chat(aliceOn1).length >= 20, 'the first 20 streamed messages at alice@node1', { timeoutMs: 20_000 });
      await postgres.crash();
      await sleep(1_000);
      await postgres.start();
      await withTimeout(streaming, 30_000, 'the stream of sends');
      // Every invocation settles: none hangs on the database that went away.
      const failures = (await withTimeout(Promise.all(invocations), 45_000, 'every streamed send to settle')).filter(Boolean);
      await sleep(GRACE_MS);
      const got = chat(aliceOn1);
      const numbers = got.map((m) => Number(m.replace('bob: m ', '')));
      assert.deepEqual(numbers, [...new Set(numbers)], 'no message arrives twice');
      assert.deepEqual(numbers, [...numbers].sort((a, b) => a - b), 'messages arrive in order');
      const answered = got.length + bob.inbox.errors.length + failures.length;
      assert.ok(answered >= COUNT, `each send was delivered or answered with an error (${got.length} delivered, ${bob.inbox.errors.length} errors, ${failures.length} failed invocations)`);
      for (const e of bob.inbox.errors) assert.match(e, /not connected|could not|try again|unavailable|store/i, 'errors say what happened');

      // Once PostgreSQL is back, deliveries work again without restarting anything (node 2
      // was killed by the test before).
      await waitReachable(bob, 'alice', [aliceOn1]);
      for (const i of [0, 2]) assert.equal(nodes[i].process.exitCode, null, `node ${i + 1} kept running`);
      assert.equal(aliceOn1.connection.state, signalR.HubConnectionState.Connected, 'alice@node1 stayed connected');
      assert.equal(bob.connection.state, signalR.HubConnectionState.Connected, 'bob@node3 stayed connected');
    }));
});
}
