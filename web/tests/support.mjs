// Shared helpers for the end-to-end tests: start and stop a server process,
// mint tokens, connect official SignalR clients, wait for events with deadlines.
import { spawn } from 'node:child_process';
import { createHmac, randomBytes } from 'node:crypto';
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const require = createRequire(import.meta.url);
export const signalR = require('@microsoft/signalr');

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
export const RS = '\x1e';

/** Default deadline for a single wait in a test. */
export const WAIT_MS = 10_000;
/** Quiet period after the expected deliveries, before counting what arrived. */
export const GRACE_MS = 300;

export function serverBinary() {
  const bin = process.env.SWITCHBOARD_BIN || path.join(REPO_ROOT, 'target', 'debug', 'switchboard');
  if (!existsSync(bin)) {
    throw new Error(
      `server binary not found at ${bin}: run \`cargo build -p switchboard --bin switchboard\` or set SWITCHBOARD_BIN`,
    );
  }
  return bin;
}

/** A random secret long enough for HS256 (48 bytes as hex). */
export function newSecret() {
  return randomBytes(48).toString('hex');
}

/** A free TCP port on 127.0.0.1 (listen on port 0, read it, close). */
export function freePort() {
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

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Rejects with a clear message when `promise` has not settled within `ms`. */
export function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms waiting for ${what}`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `check` (sync or async) until it returns a truthy value or the deadline passes. */
export async function waitUntil(check, what, { timeoutMs = WAIT_MS, intervalMs = 50 } = {}) {
  const deadline = Date.now() + timeoutMs;
  let lastError;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      lastError = err;
    }
    if (Date.now() >= deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}${lastError ? ` (last error: ${lastError.message})` : ''}`);
    }
    await sleep(intervalMs);
  }
}

// Every child process started by the tests, so that none outlives the test process.
const children = new Set();

/** Kills `child` with SIGKILL if it is still running when the test process exits. */
export function killOnExit(child) {
  children.add(child);
  child.on('exit', () => children.delete(child));
  return child;
}

/** Resolves true when something accepts TCP connections on 127.0.0.1:`port`. */
export function listening(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, '127.0.0.1');
    socket.setTimeout(1_000, () => {
      socket.destroy();
      resolve(false);
    });
    socket.on('connect', () => {
      socket.destroy();
      resolve(true);
    });
    socket.on('error', () => resolve(false));
  });
}
process.on('exit', () => {
  for (const child of children) {
    try {
      child.kill('SIGKILL');
    } catch (_) {
      /* already gone */
    }
  }
});

function cleanEnv(extra) {
  const env = {};
  for (const [k, v] of Object.entries(process.env)) {
    if (!k.startsWith('SWITCHBOARD_')) env[k] = v;
  }
  return { ...env, ...extra };
}

/**
 * Runs the binary with `args` and resolves with {code, signal, stdout, stderr}
 * once it exits; kills it (and rejects) when it is still running after `timeoutMs`.
 */
export function runBinary(args, { env = {}, timeoutMs = 15_000 } = {}) {
  return new Promise((resolve, reject) => {
    const child = spawn(serverBinary(), args, { cwd: REPO_ROOT, env: cleanEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (d) => (stdout += d));
    child.stderr.on('data', (d) => (stderr += d));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`\`switchboard ${args.join(' ')}\` still running after ${timeoutMs} ms; stderr:\n${stderr}`));
    }, timeoutMs);
    child.on('error', (err) => {
      clearTimeout(timer);
      children.delete(child);
      reject(err);
    });
    child.on('exit', (code, signal) => {
      clearTimeout(timer);
      children.delete(child);
      resolve({ code, signal, stdout, stderr });
    });
  });
}

/**
 * The store and backplane every end-to-end test runs against, from the
 * environment: SWITCHBOARD_E2E_STORE (default `memory`), SWITCHBOARD_E2E_BACKPLANE
 * (default `none`) and SWITCHBOARD_E2E_ARGS (extra flags for them, split on
 * spaces, such as a database URL). `scripts/test.sh` runs the suite once per
 * configuration it knows how to provide.
 */
export const TARGET = {
  store: process.env.SWITCHBOARD_E2E_STORE || 'memory',
  backplane: process.env.SWITCHBOARD_E2E_BACKPLANE || 'none',
  args: (process.env.SWITCHBOARD_E2E_ARGS || '').split(' ').filter(Boolean),
};

/**
 * Starts `switchboard serve` with the store and backplane of TARGET on a free
 * loopback port and waits for GET /healthz to answer {"status":"ok"}.
 *
 * options: dev (bool), jwtSecret (string), args (extra CLI args), env (extra
 * environment), cwd (defaults to the repository root, where the default
 * vendor directory resolves), target ({store, backplane, args} in place of
 * TARGET, for a test that needs a particular store and backplane).
 * Returns { port, url, wsUrl, hubUrl, logs(), stop() }.
 */
export async function startServer({ dev = false, jwtSecret, args = [], env = {}, cwd = REPO_ROOT, startTimeoutMs = 30_000, target = TARGET } = {}) {
  const bin = serverBinary();
  let lastFailure;
  for (let attempt = 0; attempt < 3; attempt++) {
    const port = await freePort();
    const fullArgs = ['serve', '--store', target.store, '--backplane', target.backplane, ...(target.args || []), '--listen', `127.0.0.1:${port}`];
    if (dev) fullArgs.push('--dev');
    if (jwtSecret) fullArgs.push('--jwt-secret', jwtSecret);
    fullArgs.push(...args);

    const child = spawn(bin, fullArgs, { cwd, env: cleanEnv(env), stdio: ['ignore', 'pipe', 'pipe'] });
    children.add(child);
    let log = '';
    const keep = (chunk) => {
      log += chunk;
      if (log.length > 200_000) log = log.slice(-100_000);
      if (process.env.SWITCHBOARD_TEST_LOGS) process.stderr.write(chunk);
    };
    child.stdout.on('data', keep);
    child.stderr.on('data', keep);
    const exited = new Promise((resolve) => child.on('exit', (code, signal) => resolve({ code, signal })));
    exited.then(() => children.delete(child));
    let spawnError = null;
    child.on('error', (err) => (spawnError = err));

    const url = `http://127.0.0.1:${port}`;
    const server = {
      port,
      url,
      hubUrl: `${url}/hubs/chat`,
      wsUrl: `ws://127.0.0.1:${port}/hubs/chat`,
      process: child,
      exited,
      logs: () => log,
      async stop() {
        if (child.exitCode !== null || child.signalCode !== null) return;
        child.kill('SIGTERM');
        const done = await withTimeout(exited, 5_000, 'server exit').catch(() => null);
        if (!done) {
          child.kill('SIGKILL');
          await withTimeout(exited, 5_000, 'server exit after SIGKILL').catch(() => {});
        }
      },
    };

    const deadline = Date.now() + startTimeoutMs;
    let early = null;
    exited.then((r) => (early = r));
    for (;;) {
      if (spawnError) throw spawnError;
      if (early) break;
      try {
        const res = await fetch(`${url}/healthz`, { signal: AbortSignal.timeout(2_000) });
        if (res.status === 200) {
          const body = await res.json().catch(() => null);
          if (body && body.status === 'ok') return server;
        }
      } catch (_) {
        /* not listening yet */
      }
      if (Date.now() >= deadline) {
        await server.stop();
        throw new Error(`server did not become healthy within ${startTimeoutMs} ms; log:\n${log}`);
      }
      await sleep(100);
    }
    lastFailure = `server exited early (${JSON.stringify(early)}); log:\n${log}`;
    if (!/in use|AddrInUse|address already/i.test(log)) break; // only a port race is worth a retry
  }
  throw new Error(lastFailure);
}

function base64url(data) {
  return Buffer.from(data).toString('base64url');
}

/**
 * An HS256 JWT for `user` signed with `secret`. `claims` override or add
 * claims (pass exp: undefined to leave exp out); `header` overrides the header.
 */
export function mintToken(secret, user, { claims = {}, header = {} } = {}) {
  const now = Math.floor(Date.now() / 1000);
  const body = { sub: user, iat: now, exp: now + 3600, ...claims };
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  const head = { alg: 'HS256', typ: 'JWT', ...header };
  const signingInput = `${base64url(JSON.stringify(head))}.${base64url(JSON.stringify(body))}`;
  const signature = createHmac('sha256', secret).update(signingInput).digest('base64url');
  return `${signingInput}.${signature}`;
}

/** POST /auth/dev-token {"user": user}; resolves with the token. */
export async function devToken(baseUrl, user) {
  const res = await fetch(`${baseUrl}/auth/dev-token`, {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ user }),
    signal: AbortSignal.timeout(WAIT_MS),
  });
  if (res.status !== 200) throw new Error(`POST /auth/dev-token answered ${res.status}: ${await res.text()}`);
  const body = await res.json();
  if (typeof body.token !== 'string') throw new Error(`POST /auth/dev-token sent no token: ${JSON.stringify(body)}`);
  return body.token;
}

/** A logger for the SignalR client that keeps warnings and errors for diagnostics. */
export function captureLogger() {
  const lines = [];
  return {
    lines,
    log(level, message) {
      if (level >= signalR.LogLevel.Warning) lines.push(`[${signalR.LogLevel[level]}] ${message}`);
      if (process.env.SWITCHBOARD_TEST_CLIENT_LOGS) process.stderr.write(`[client ${signalR.LogLevel[level]}] ${message}\n`);
    },
  };
}

/**
 * Records what the hub calls on a connection (addChatMessage, showErrorMessage)
 * and lets a test wait for a number of calls with a deadline.
 */
export class Inbox {
  constructor(connection, label = '') {
    this.label = label;
    this.messages = [];
    this.errors = [];
    this._waiters = new Set();
    connection.on('addChatMessage', (m) => this._push(this.messages, m));
    connection.on('showErrorMessage', (m) => this._push(this.errors, m));
  }

  _push(list, value) {
    list.push(value);
    for (const w of [...this._waiters]) w();
  }

  /** Resolves once `this[kind].length >= count`; rejects after `timeoutMs`. */
  waitFor(kind, count = 1, timeoutMs = WAIT_MS) {
    return new Promise((resolve, reject) => {
      const check = () => {
        if (this[kind].length >= count) {
          this._waiters.delete(check);
          clearTimeout(timer);
          resolve(this[kind]);
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        this._waiters.delete(check);
        reject(new Error(`${this.label}: timed out after ${timeoutMs} ms waiting for ${count} ${kind}, got ${JSON.stringify(this[kind])}`));
      }, timeoutMs);
      if (!check()) this._waiters.add(check);
    });
  }

  clear() {
    this.messages.length = 0;
    this.errors.length = 0;
  }
}

/**
 * Builds (does not start) an official SignalR HubConnection to `hubUrl`.
 * options: token (string or null), stateful (bool), skipNegotiation (bool),
 * automaticReconnect (bool).
 */
export function buildConnection(hubUrl, { token, stateful = false, skipNegotiation = false, automaticReconnect = false, logger } = {}) {
  const httpOptions = {};
  if (token) httpOptions.accessTokenFactory = () => token;
  if (skipNegotiation) {
    httpOptions.skipNegotiation = true;
    httpOptions.transport = signalR.HttpTransportType.WebSockets;
  }
  let builder = new signalR.HubConnectionBuilder().withUrl(hubUrl, httpOptions).configureLogging(logger || captureLogger());
  if (stateful) builder = builder.withStatefulReconnect();
  if (automaticReconnect) builder = builder.withAutomaticReconnect();
  return builder.build();
}

/**
 * Builds and starts a connection; resolves with { connection, inbox, logger }.
 */
export async function connect(hubUrl, options = {}) {
  const logger = captureLogger();
  const connection = buildConnection(hubUrl, { ...options, logger });
  const inbox = new Inbox(connection, options.label || 'connection');
  await withTimeout(connection.start(), WAIT_MS, `start() of ${options.label || 'connection'}`).catch((err) => {
    connection.stop().catch(() => {});
    throw err;
  });
  return { connection, inbox, logger };
}

/** Stops connections, never throwing, each bounded in time. */
export async function stopAll(connections) {
  await Promise.all(
    connections.map((c) => withTimeout((c.connection || c).stop(), 5_000, 'stop()').catch(() => {})),
  );
}

/**
 * Expects `promise` (a start() or invoke()) to reject within the deadline;
 * resolves with the rejection error, throws if it fulfilled.
 */
export async function expectRejection(promise, what, timeoutMs = WAIT_MS) {
  let value;
  try {
    value = await withTimeout(promise, timeoutMs, what);
  } catch (err) {
    if (/^timed out after/.test(err.message)) throw err;
    return err;
  }
  throw new Error(`${what} was expected to fail but succeeded (${JSON.stringify(value)})`);
}

/**
 * A TCP proxy on a free loopback port in front of `targetPort`. It can cut every
 * live connection (a dropped network) and hold new connections until released.
 */
export async function startProxy(targetPort) {
  const live = new Set();
  const held = [];
  let blocked = false;
  let accepted = 0;

  const forward = (client) => {
    const upstream = net.connect(targetPort, '127.0.0.1');
    const pair = { client, upstream };
    live.add(pair);
    const drop = () => {
      live.delete(pair);
      client.destroy();
      upstream.destroy();
    };
    client.on('error', drop);
    upstream.on('error', drop);
    client.on('close', drop);
    upstream.on('close', drop);
    client.pipe(upstream);
    upstream.pipe(client);
    client.resume();
  };

  const server = net.createServer({ pauseOnConnect: true }, (client) => {
    accepted++;
    if (blocked) {
      client.on('error', () => {});
      held.push(client);
    } else {
      forward(client);
    }
  });
  await new Promise((resolve, reject) => {
    server.on('error', reject);
    server.listen(0, '127.0.0.1', resolve);
  });
  const port = server.address().port;

  return {
    port,
    url: `http://127.0.0.1:${port}`,
    get accepted() {
      return accepted;
    },
    get heldCount() {
      return held.length;
    },
    /** New connections wait (unanswered) until release(). */
    block() {
      blocked = true;
    },
    release() {
      blocked = false;
      for (const client of held.splice(0)) if (!client.destroyed) forward(client);
    },
    /** Abruptly ends every forwarded connection, both sides. */
    cut() {
      for (const { client, upstream } of [...live]) {
        client.destroy();
        upstream.destroy();
      }
      live.clear();
    },
    async close() {
      this.cut();
      for (const client of held.splice(0)) client.destroy();
      await new Promise((resolve) => server.close(() => resolve()));
    },
  };
}

const WebSocket = require('ws');

/**
 * Tries a WebSocket upgrade and resolves with the HTTP status: 101 when the
 * upgrade succeeded (the socket is closed again at once), else the status of
 * the refusal.
 */
export function upgradeStatus(url, { headers = {}, timeoutMs = WAIT_MS } = {}) {
  return withTimeout(
    new Promise((resolve, reject) => {
      const ws = new WebSocket(url, { headers });
      ws.on('open', () => {
        resolve(101);
        ws.terminate();
      });
      ws.on('unexpected-response', (req, res) => {
        resolve(res.statusCode);
        res.resume();
        req.destroy();
      });
      ws.on('error', reject);
    }),
    timeoutMs,
    `WebSocket upgrade of ${url.replace(/access_token=[^&]*/, 'access_token=…')}`,
  );
}

/**
 * A raw hub WebSocket speaking the JSON hub protocol by hand: records are
 * parsed as they arrive and can be awaited with a deadline.
 */
export class RawHubSocket {
  static open(url, { headers = {}, timeoutMs = WAIT_MS } = {}) {
    return withTimeout(
      new Promise((resolve, reject) => {
        const ws = new WebSocket(url, { headers });
        const raw = new RawHubSocket(ws);
        ws.once('open', () => resolve(raw));
        ws.on('unexpected-response', (req, res) => {
          reject(new Error(`upgrade refused with HTTP ${res.statusCode}`));
          res.resume();
          req.destroy();
        });
        ws.once('error', reject);
      }),
      timeoutMs,
      'raw WebSocket open',
    );
  }

  constructor(ws) {
    this.ws = ws;
    this.records = [];
    this.binaryFrames = 0;
    this.partialFrames = 0;
    this.closed = null;
    this._waiters = new Set();
    ws.on('message', (data, isBinary) => {
      if (isBinary) this.binaryFrames++;
      const text = data.toString('utf8');
      if (!text.endsWith(RS)) this.partialFrames++;
      for (const part of text.split(RS)) {
        if (part.length === 0) continue;
        this.records.push(JSON.parse(part));
      }
      this._notify();
    });
    ws.on('close', (code) => {
      this.closed = { code };
      this._notify();
    });
    ws.on('error', () => {});
  }

  _notify() {
    for (const w of [...this._waiters]) w();
  }

  send(record) {
    this.ws.send(JSON.stringify(record) + RS);
  }

  /** Sends the JSON handshake and resolves with the server's handshake answer. */
  async handshake(version = 1) {
    this.ws.send(JSON.stringify({ protocol: 'json', version }) + RS);
    const first = await this.next(() => true, 'the handshake response');
    return first;
  }

  /**
   * Resolves with the first not-yet-consumed record matching `predicate`
   * (records before it stay available); rejects after `timeoutMs`.
   */
  next(predicate, what, timeoutMs = WAIT_MS) {
    return new Promise((resolve, reject) => {
      const check = () => {
        const index = this.records.findIndex((r) => !r.__seen && predicate(r));
        if (index >= 0) {
          const record = this.records[index];
          Object.defineProperty(record, '__seen', { value: true, enumerable: false });
          this._waiters.delete(check);
          clearTimeout(timer);
          resolve(record);
          return true;
        }
        if (this.closed) {
          this._waiters.delete(check);
          clearTimeout(timer);
          reject(new Error(`socket closed (code ${this.closed.code}) while waiting for ${what}; got ${JSON.stringify(this.records)}`));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        this._waiters.delete(check);
        reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}; got ${JSON.stringify(this.records)}`));
      }, timeoutMs);
      if (!check()) this._waiters.add(check);
    });
  }

  close() {
    try {
      this.ws.terminate();
    } catch (_) {
      /* already closed */
    }
  }
}

/** POST <hub>/negotiate as the JS client does; resolves with {status, body}. */
export async function negotiate(hubUrl, { token, query = 'negotiateVersion=1', headers = {} } = {}) {
  const h = { 'X-Requested-With': 'XMLHttpRequest', ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  const res = await fetch(`${hubUrl}/negotiate?${query}`, { method: 'POST', headers: h, signal: AbortSignal.timeout(WAIT_MS) });
  const text = await res.text();
  let body = text;
  try {
    body = JSON.parse(text);
  } catch (_) {
    /* not JSON */
  }
  return { status: res.status, body };
}
