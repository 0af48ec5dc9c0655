// Throwaway PostgreSQL clusters for the end-to-end tests: initdb in a
// temporary directory, the server on a loopback port, stopped, crashed and
// started again on demand. PostgreSQL refuses to run as root, so as root the
// cluster belongs to the `postgres` user Debian's package creates and the
// server runs as that user.
import { spawn, spawnSync } from 'node:child_process';
import { chownSync, existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { listening, sleep, waitUntil, withTimeout } from './support.mjs';

const children = new Set();
process.on('exit', () => {
  for (const child of children) {
    try {
      child.kill('SIGQUIT');
    } catch (_) {
      /* already gone */
    }
  }
});

/** The directory with PostgreSQL's server binaries, or throws saying how to get them. */
function binDir() {
  if (process.env.SWITCHBOARD_PG_BIN) return process.env.SWITCHBOARD_PG_BIN;
  const root = '/usr/lib/postgresql';
  const versions = existsSync(root)
    ? readdirSync(root)
        .filter((v) => /^\d+$/.test(v))
        .sort((a, b) => Number(b) - Number(a))
    : [];
  for (const v of versions) {
    const dir = path.join(root, v, 'bin');
    if (existsSync(path.join(dir, 'postgres'))) return dir;
  }
  throw new Error(
    'PostgreSQL is not installed: install Debian\'s postgresql (apt-get install -y postgresql) or run scripts/test.sh, which does',
  );
}

/** {uid, gid} of the postgres user when running as root, else null. */
function owner() {
  if (process.getuid() !== 0) return null;
  const line = readFileSync('/etc/passwd', 'utf8')
    .split('\n')
    .find((l) => l.startsWith('postgres:'));
  if (!line) throw new Error('running as root and there is no `postgres` user to run PostgreSQL as');
  const fields = line.split(':');
  return { uid: Number(fields[2]), gid: Number(fields[3]) };
}

/**
 * Initialises a cluster and starts it on 127.0.0.1:`port`. Returns
 * { port, url, logs(), stop(), crash(), start(), psql(sql), remove() }:
 * stop() is a fast shutdown, crash() an immediate one (SIGQUIT, crash
 * recovery at the next start), start() brings it back with its data.
 */
export async function startPostgres(port) {
  const bin = binDir();
  const who = owner();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'switchboard-e2e-pg-'));
  if (who) chownSync(dir, who.uid, who.gid);
  const ids = who ? { uid: who.uid, gid: who.gid } : {};
  const data = path.join(dir, 'data');
  const init = spawnSync(
    path.join(bin, 'initdb'),
    ['-D', data, '-U', 'postgres', '--auth=trust', '--no-sync', '-E', 'UTF8', '--locale=C'],
    { ...ids, encoding: 'utf8', env: { ...process.env, HOME: dir } },
  );
  if (init.status !== 0) throw new Error(`initdb failed: ${init.stderr || init.error}`);

  let child = null;
  let exited = null;
  let log = '';
  const pg = {
    port,
    url: `postgres://postgres@127.0.0.1:${port}/postgres`,
    logs: () => log,
    async start() {
      if (child) return;
      child = spawn(
        path.join(bin, 'postgres'),
        ['-D', data, '-p', String(port), '-c', 'listen_addresses=127.0.0.1', '-c', `unix_socket_directories=${dir}`,
          '-c', 'fsync=off', '-c', 'max_connections=300'],
        { ...ids, stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, HOME: dir } },
      );
      children.add(child);
      const keep = (chunk) => {
        log += chunk;
        if (log.length > 100_000) log = log.slice(-50_000);
      };
      child.stdout.on('data', keep);
      child.stderr.on('data', keep);
      const current = child;
      exited = new Promise((resolve) => current.on('exit', (code, signal) => resolve({ code, signal })));
      exited.then(() => {
        children.delete(current);
        if (child === current) child = null;
      });
      await waitUntil(
        async () => {
          if (!child) throw new Error(`postgres exited at start; log:\n${log}`);
          return (await listening(port)) && this.psql('SELECT 1').ok;
        },
        `PostgreSQL to accept connections on port ${port}`,
        { timeoutMs: 30_000, intervalMs: 100 },
      );
    },
    async signal(sig) {
      if (!child) return;
      const done = exited;
      child.kill(sig);
      await withTimeout(done, 20_000, `postgres to exit after ${sig}`);
      while (await listening(port)) await sleep(20);
    },
    stop() {
      return this.signal('SIGINT');
    },
    crash() {
      return this.signal('SIGQUIT');
    },
    /** Runs `sql` with psql; {ok, out}. */
    psql(sql) {
      const r = spawnSync(
        path.join(bin, 'psql'),
        ['-X', '-q', '-A', '-t', '-v', 'ON_ERROR_STOP=1', '-h', '127.0.0.1', '-p', String(port), '-U', 'postgres', '-d', 'postgres', '-c', sql],
        { encoding: 'utf8' },
      );
      return { ok: r.status === 0, out: r.status === 0 ? r.stdout : r.stderr || String(r.error) };
    },
    async remove() {
      await this.crash().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await pg.start();
  return pg;
}
