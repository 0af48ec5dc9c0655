// Throwaway Azurite table services for the end-to-end tests: the official
// Azure Storage emulator (npm package azurite, a devDependency of web/) on a
// loopback port, in memory, stopped, killed and started again on demand. An
// emulator started again comes back empty, as an account whose table was
// deleted would.
import { spawn } from 'node:child_process';
import { createHmac } from 'node:crypto';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

import { REPO_ROOT, freePort, killOnExit, listening, sleep, waitUntil, withTimeout } from './support.mjs';

/** The development storage account every Azurite serves, and its published key. */
export const ACCOUNT = 'devstoreaccount1';
export const ACCOUNT_KEY = 'Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==';

/** The azurite-table executable, or throws saying how to get it. */
function executable() {
  const bin = process.env.SWITCHBOARD_AZURITE_TABLE || path.join(REPO_ROOT, 'web', 'node_modules', '.bin', 'azurite-table');
  if (!existsSync(bin)) {
    throw new Error(`Azurite is not installed at ${bin}: run \`npm ci\` in web/ (scripts/test.sh does), or set SWITCHBOARD_AZURITE_TABLE`);
  }
  return bin;
}

/**
 * Starts an in-memory Azurite table service on 127.0.0.1:`port` (a free one
 * when not given) and waits until it accepts connections. Returns
 * { port, connectionString, logs(), stop(), kill(), start(), entities(table,
 * filter), remove() }: stop() is SIGTERM, kill() SIGKILL, start() brings it
 * back on the same port (empty); entities() reads a table directly.
 */
export async function startAzurite(port) {
  port ??= await freePort();
  const bin = executable();
  const dir = mkdtempSync(path.join(os.tmpdir(), 'switchboard-e2e-azurite-'));
  let child = null;
  let exited = null;
  let log = '';
  const azurite = {
    port,
    connectionString:
      `DefaultEndpointsProtocol=http;AccountName=${ACCOUNT};AccountKey=${ACCOUNT_KEY};` +
      `TableEndpoint=http://127.0.0.1:${port}/${ACCOUNT};`,
    logs: () => log,
    async start() {
      if (child) return;
      child = spawn(bin, ['--tableHost', '127.0.0.1', '--tablePort', String(port), '--inMemoryPersistence', '--disableTelemetry'], {
        cwd: dir,
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      killOnExit(child);
      const keep = (chunk) => {
        log += chunk;
        if (log.length > 100_000) log = log.slice(-50_000);
      };
      child.stdout.on('data', keep);
      child.stderr.on('data', keep);
      let spawnError = null;
      child.on('error', (err) => (spawnError = err));
      const current = child;
      exited = new Promise((resolve) => current.on('exit', (code, signal) => resolve({ code, signal })));
      exited.then(() => {
        if (child === current) child = null;
      });
      await waitUntil(
        async () => {
          if (spawnError) throw new Error(`azurite-table could not be started: ${spawnError.message}`);
          if (!child) throw new Error(`azurite-table exited at start; log:\n${log}`);
          return listening(port);
        },
        `Azurite to accept connections on port ${port}`,
        { timeoutMs: 30_000, intervalMs: 100 },
      );
    },
    async signal(sig) {
      if (!child) return;
      const done = exited;
      child.kill(sig);
      await withTimeout(done, 10_000, `azurite-table to exit after ${sig}`);
      while (await listening(port)) await sleep(20);
    },
    stop() {
      return this.signal('SIGTERM');
    },
    kill() {
      return this.signal('SIGKILL');
    },
    /**
     * Every entity of `table` that matches the OData `filter` (all when
     * omitted), read straight from the emulator's REST API (Shared Key Lite),
     * following continuations; [] when the table does not exist.
     */
    async entities(table, filter) {
      const found = [];
      let next = '';
      for (;;) {
        const query = new URLSearchParams();
        if (filter) query.set('$filter', filter);
        if (next) for (const [k, v] of next) query.set(k, v);
        const resource = `/${ACCOUNT}/${ACCOUNT}/${table}()`;
        const date = new Date().toUTCString();
        const signature = createHmac('sha256', Buffer.from(ACCOUNT_KEY, 'base64')).update(`${date}\n${resource}`).digest('base64');
        const res = await fetch(`http://127.0.0.1:${port}/${ACCOUNT}/${table}()?${query}`, {
          headers: {
            'x-ms-date': date,
            'x-ms-version': '2019-02-02',
            Accept: 'application/json;odata=nometadata',
            Authorization: `SharedKeyLite ${ACCOUNT}:${signature}`,
          },
          signal: AbortSignal.timeout(5_000),
        });
        const body = await res.text();
        if (res.status === 404) return found;
        if (res.status !== 200) throw new Error(`querying table ${table}: ${res.status} ${body}`);
        found.push(...JSON.parse(body).value);
        const partition = res.headers.get('x-ms-continuation-nextpartitionkey');
        const row = res.headers.get('x-ms-continuation-nextrowkey');
        if (!partition && !row) return found;
        next = [];
        if (partition) next.push(['NextPartitionKey', partition]);
        if (row) next.push(['NextRowKey', row]);
      }
    },
    async remove() {
      await this.kill().catch(() => {});
      rmSync(dir, { recursive: true, force: true });
    },
  };
  await azurite.start();
  return azurite;
}
