/**
 * A throw-away PostgreSQL server for the team-ledger tests: Debian's `postgresql` package, a new
 * cluster in a temp folder, password authentication on 127.0.0.1, run as an unprivileged user
 * (`postgres` when the tests run as root, as CI does; the test's own user otherwise). It can be
 * stopped and started again on the same port and data, to test a database outage.
 */
import { execFileSync, spawnSync } from 'node:child_process';
import { chmodSync, chownSync, existsSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/** Where Debian installs the server's programs (the newest version present). */
function binDir(): string | undefined {
  const root = '/usr/lib/postgresql';
  if (!existsSync(root)) return undefined;
  const versions = readdirSync(root)
    .filter((v) => existsSync(join(root, v, 'bin', 'postgres')))
    .sort((a, b) => Number(b) - Number(a));
  return versions[0] ? join(root, versions[0], 'bin') : undefined;
}

/** True when this machine can run the PostgreSQL tests (`.ci/run` installs the package). */
export function postgresAvailable(): boolean {
  return binDir() !== undefined;
}

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const server = createServer();
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => {
      const port = (server.address() as { port: number }).port;
      server.close(() => resolve(port));
    });
  });
}

export interface TestPostgres {
  /** `postgres://till:…@127.0.0.1:<port>/till` */
  readonly url: string;
  readonly port: number;
  /** Stops the server (fast shutdown: open connections are cut). */
  stop(): void;
  /** Starts it again on the same port and data. */
  start(): void;
  /** Runs SQL through psql, returning its unaligned output. */
  psql(sql: string): string;
  /** Stops the server and removes its folder. */
  destroy(): void;
}

/** Starts a new cluster. Throws when the package is not installed. */
export async function startPostgres(): Promise<TestPostgres> {
  const bin = binDir();
  if (!bin) throw new Error('PostgreSQL is not installed: apt-get install postgresql (.ci/run does)');
  const asRoot = process.getuid?.() === 0;
  const folder = mkdtempSync(join(tmpdir(), 'till-pg-'));
  const data = join(folder, 'data');
  const password = `pw-${Math.random().toString(36).slice(2)}`;
  writeFileSync(join(folder, 'pw'), password);
  chmodSync(folder, 0o755);
  if (asRoot) {
    const uid = Number(execFileSync('id', ['-u', 'postgres'], { encoding: 'utf8' }).trim());
    const gid = Number(execFileSync('id', ['-g', 'postgres'], { encoding: 'utf8' }).trim());
    chownSync(folder, uid, gid);
    chownSync(join(folder, 'pw'), uid, gid);
  }
  const run = (program: string, args: string[], input?: string) => {
    const command = asRoot ? 'runuser' : join(bin, program);
    const argv = asRoot ? ['-u', 'postgres', '--', join(bin, program), ...args] : args;
    const result = spawnSync(command, argv, { encoding: 'utf8', input, cwd: folder });
    if (result.status !== 0) throw new Error(`${program} failed: ${result.stderr || result.stdout}`);
    return result.stdout;
  };
  run('initdb', ['-D', data, '-U', 'till', '-A', 'scram-sha-256', `--pwfile=${join(folder, 'pw')}`, '--no-sync', '-E', 'UTF8']);
  const port = await freePort();
  const options = `-p ${port} -k ${folder} -c listen_addresses=127.0.0.1 -c max_connections=200 -c fsync=on`;
  const start = () => void run('pg_ctl', ['-D', data, '-o', options, '-l', join(folder, 'log'), '-w', '-t', '30', 'start']);
  const stop = () => void run('pg_ctl', ['-D', data, '-m', 'fast', '-w', 'stop']);
  start();
  const url = `postgres://till:${password}@127.0.0.1:${port}/till`;
  const created = spawnSync(join(bin, 'psql'), ['-X', '-q', '-d', url.replace(/\/till$/, '/postgres'), '-c', 'create database till'], {
    encoding: 'utf8',
  });
  if (created.status !== 0) throw new Error(`create database failed: ${created.stderr}`);
  let stopped = false;
  return {
    url,
    port,
    stop: () => {
      stop();
      stopped = true;
    },
    start: () => {
      start();
      stopped = false;
    },
    psql: (sql) => {
      const result = spawnSync(join(bin, 'psql'), ['-X', '-A', '-t', '-q', '-v', 'ON_ERROR_STOP=1', '-d', url, '-c', sql], {
        encoding: 'utf8',
      });
      if (result.status !== 0) throw new Error(`psql failed: ${result.stderr}`);
      return result.stdout.trim();
    },
    destroy: () => {
      if (!stopped) {
        try {
          stop();
        } catch {
          // Already gone: the folder goes anyway.
        }
      }
      rmSync(folder, { recursive: true, force: true });
    },
  };
}
