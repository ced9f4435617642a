/**
 * The team ledger's database for the bench: a throw-away PostgreSQL cluster in a temp folder
 * (test/support/postgres.ts), one database per Till column that uses it, and the postmaster's
 * process, whose CPU time (and its children's) the bench reads from /proc.
 */
import { readdirSync, readFileSync } from 'node:fs';
import { dirname } from 'node:path';
import { startPostgres, type TestPostgres } from '../test/support/postgres';
import { familyCpuMicros } from './proc';

export interface TeamLedgerDb {
  readonly db: TestPostgres;
  /** The postmaster: every backend and helper of the cluster is its child. */
  readonly postmaster: number;
  /** The cluster's folder (data, socket, log), removed by `db.destroy()`. */
  readonly folder: string;
  /** The URL of database `name`: `till`, or one made by {@link startTeamLedgerDb}. */
  urlOf(name: string): string;
  /** CPU time (µs) the cluster has spent so far: postmaster, backends, WAL writer, checkpointer, autovacuum. */
  cpuMicros(): number;
}

/** The postmaster listening on `port` (its command line names the port), and its cluster's folder. */
function postmasterOf(port: number): { pid: number; folder: string } {
  for (const name of readdirSync('/proc')) {
    if (!/^\d+$/.test(name)) continue;
    let argv: string[];
    try {
      argv = readFileSync(`/proc/${name}/cmdline`, 'utf8').split('\0');
    } catch {
      continue;
    }
    const p = argv.indexOf('-p');
    const d = argv.indexOf('-D');
    if (argv[0]?.endsWith('/postgres') && p > 0 && argv[p + 1] === String(port) && d > 0 && argv[d + 1]) {
      return { pid: Number(name), folder: dirname(argv[d + 1]!) };
    }
  }
  throw new Error(`no postmaster on port ${port} in /proc`);
}

/**
 * Starts the cluster and makes the databases `more` in it, beside its own `till`. Each Till column gets a database of its own: PostgreSQL's notifications (which
 * every broker of a database hears) stay within their column. `started` is called as soon as the
 * cluster runs, so that the caller can stop it should anything after fail.
 */
export async function startTeamLedgerDb(more: string[], started: (db: TestPostgres) => void): Promise<TeamLedgerDb> {
  const db = await startPostgres();
  started(db);
  const { pid, folder } = postmasterOf(db.port);
  for (const name of more) db.psql(`create database ${name}`);
  const base = db.url.replace(/\/till$/, '');
  return {
    db,
    postmaster: pid,
    folder,
    urlOf: (name) => `${base}/${name}`,
    cpuMicros: () => familyCpuMicros(pid),
  };
}
