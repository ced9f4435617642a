/**
 * `npm run bench`: how much the Till broker costs next to the floor for a Node broker.
 *
 * One run compares, on a fast upstream on 127.0.0.1:
 *   direct        the load generator calls the upstream itself;
 *   pass-through  a minimal node:http proxy that swaps the Authorization header;
 *   till          `till serve` (dist/till.js) with a credential in a private keychain and a till key;
 *   till, limits  the same broker with a key limited in tokens and dollars: every request is
 *                 planned and held, and settled (holds/plan.ts), every stream's hold follows it;
 *   till, team ledger
 *                 `till serve --ledger postgres://…` on a throw-away PostgreSQL cluster
 *                 (test/support/postgres.ts), with a key like the till column's: every billable
 *                 request's hold and settlement are statements on the database;
 *   till, team ledger, 3 brokers
 *                 three such brokers, each with its own data folder, on one database and one key
 *                 (issued through the first, known to the others through the database); the
 *                 load goes round-robin over the three, also at c=96 (32 per broker);
 *   baseline      with BENCH_BASELINE=<an older build's till.js>: that build's `till serve`, so that
 *                 this build's cost is compared with it in the same run.
 * Then long streams (4,000 events each) through the pass-through and both till keys: the CPU a
 * stream costs, and how often a budgeted stream's hold grows. Then, in this process, the
 * tokenizer a hold uses when a body's bytes would not fit (bench/tokenizer.ts).
 * Upstream, pass-through and Till each run in their own child process, so the CPU time of each
 * proxy is read from /proc before and after each phase, and so is PostgreSQL's (its postmaster
 * and every child of it) for the team-ledger columns. The load generator runs here.
 *
 * Prints a Markdown table to stdout (progress goes to stderr) and writes it to bench/RESULTS.md.
 * Every child process, the private keychain, the PostgreSQL cluster and the temp folders go away
 * at the end, on error and on Ctrl-C.
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { startPrivateKeyring, type PrivateKeyring } from '../test/support/keyring';
import type { TestPostgres } from '../test/support/postgres';
import { LONG_STREAM_EVENTS, runLongStreams, runPhase, runSse, summarize, type PhaseRun, type Target } from './load';
import { runPassThrough } from './passthrough';
import { cpuMicros, cpuModel, machineBusyMicros, peakRssKiB, pinToCores } from './proc';
import { markdown, type Goal, type TargetResult } from './report';
import { startTeamLedgerDb, type TeamLedgerDb } from './team';
import { measureTokenizer } from './tokenizer';
import { runUpstream, SSE_EVENTS, SSE_GAP_MS, type Orphans } from './upstream';

// Bounded work per target: a warm-up, then fixed request counts.
// Long enough that V8 has grown each proxy's heap and optimized its code before the first round:
// after 2,000 at concurrency 8, Till's first round at c=32 still cost 2.1x the pass-through's.
const WARMUP_REQUESTS = 8_000;
const WARMUP_CONCURRENCY = 32;
const C1_REQUESTS = 3_000;
const C32_REQUESTS = 10_000;
// The load phases run in this many interleaved rounds (it divides both counts).
const ROUNDS = 4;
const SSE_STREAMS = 50;
const SSE_WARMUP_STREAMS = 5;
const LONG_STREAMS = 20;
// The team-ledger (PostgreSQL) columns: fewer requests, in the same rounds, so that they add
// about half a minute to the run (they serve some 300 to 500 requests a second on 2 cores).
// Counts divisible by ROUNDS.
const TEAM_WARMUP_REQUESTS = 500;
const TEAM_C1_REQUESTS = 1_000;
const TEAM_C32_REQUESTS = 2_000;
const TEAM_SSE_STREAMS = 20;
const TEAM_BROKERS = 3;
/** The three brokers' extra phase: 32 in flight on each. */
const TEAM_WIDE_CONCURRENCY = 32 * TEAM_BROKERS;
const TEAM_WIDE_REQUESTS = 2_000;

// The targets Till is held to (issue 12).
const MAX_CPU_RATIO = 1.1;
const MAX_ADDED_P50_MS = 0.2;
/** SSE time to first event, till's median over the pass-through's. */
const MAX_ADDED_SSE_FIRST_MS = 0.5;
const MAX_PEAK_RSS_MIB = 80;
// Against an older build in the same run (BENCH_BASELINE): no worse, within the rounds' noise.
const MAX_BASELINE_RATIO = 1.05;
const BASELINE_JS = process.env.BENCH_BASELINE ? resolve(process.env.BENCH_BASELINE) : undefined;

/** The machine's cores, read before the bench pins itself to some of them (which narrows what availableParallelism() says). */
const CORES = availableParallelism();

// The whole run must end by itself.
const WATCHDOG_MS = 5 * 60_000;

const TILL_JS = resolve(__dirname, 'till.js');
// BENCH_CPU_PROF=<dir>: write V8 CPU profiles of the pass-through and each `till serve` (serve-home*.cpuprofile) there.
// BENCH_NODE_ARGS="--perf-basic-prof …": extra node options for both proxies (e.g. for `perf record -p`).
const CPU_PROF_DIR = process.env.BENCH_CPU_PROF ? resolve(process.env.BENCH_CPU_PROF) : undefined;
const EXTRA_NODE_ARGS = (process.env.BENCH_NODE_ARGS ?? '').split(' ').filter(Boolean);
const profileArgs = (name: string) => [
  ...EXTRA_NODE_ARGS,
  ...(CPU_PROF_DIR ? ['--cpu-prof', `--cpu-prof-dir=${CPU_PROF_DIR}`, `--cpu-prof-name=${name}.cpuprofile`] : []),
];
const RESULTS_MD = resolve(__dirname, '..', 'bench', 'RESULTS.md');

const children: ChildProcess[] = [];
let keyring: PrivateKeyring | undefined;
let scratch: string | undefined;
let teamDb: TestPostgres | undefined;

const sum = (values: number[]) => values.reduce((a, b) => a + b, 0);

function progress(line: string): void {
  process.stderr.write(`bench: ${line}\n`);
}

function alive(child: ChildProcess): boolean {
  return child.exitCode === null && child.signalCode === null;
}

/** Synchronous, so it also runs from process.on('exit'). Idempotent. */
function cleanup(): void {
  for (const child of children) {
    if (alive(child)) {
      try {
        child.kill('SIGKILL');
      } catch {
        // already gone
      }
    }
  }
  children.length = 0;
  // After the brokers: a fast shutdown (pg_ctl, synchronous), then its folder goes.
  try {
    teamDb?.destroy();
  } catch (err) {
    progress(`could not stop the PostgreSQL cluster: ${(err as Error).message}`);
  }
  teamDb = undefined;
  keyring?.stop();
  keyring = undefined;
  if (scratch) rmSync(scratch, { recursive: true, force: true });
  scratch = undefined;
}

/** Starts this same bundle in another role (`upstream`, `passthrough`) and waits for its port. */
async function forkRole(role: string, env: Record<string, string>): Promise<{ child: ChildProcess; port: number }> {
  const child = fork(__filename, [role], {
    execArgv: role === 'passthrough' ? profileArgs(role) : [],
    cwd: scratch,
    env: { ...process.env, ...env },
    stdio: ['ignore', 'inherit', 'inherit', 'ipc'],
  });
  children.push(child);
  const port = await new Promise<number>((resolvePort, reject) => {
    const timer = setTimeout(() => reject(new Error(`${role} did not start within 10 s`)), 10_000);
    child.once('message', (m: { port?: number }) => {
      clearTimeout(timer);
      if (typeof m.port === 'number') resolvePort(m.port);
      else reject(new Error(`${role} sent ${JSON.stringify(m)}`));
    });
    child.once('exit', (code) => {
      clearTimeout(timer);
      reject(new Error(`${role} exited with ${code}`));
    });
  });
  return { child, port };
}

/** Runs the built `till` command (`js`: another build's) to completion; rejects on a non-zero exit. */
function till(args: string[], env: NodeJS.ProcessEnv, input = '', js = TILL_JS): Promise<string> {
  return new Promise((resolveRun, reject) => {
    const child = spawn(process.execPath, [js, ...args], { env, stdio: ['pipe', 'pipe', 'pipe'] });
    children.push(child);
    let stdout = '';
    let stderr = '';
    child.stdout.on('data', (c) => (stdout += c));
    child.stderr.on('data', (c) => (stderr += c));
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`till ${args[0]} ${args[1] ?? ''} did not finish within 20 s: ${stderr}`));
    }, 20_000);
    child.on('close', (code) => {
      clearTimeout(timer);
      if (code === 0) resolveRun(stdout);
      else reject(new Error(`till ${args.slice(0, 2).join(' ')} exited with ${code}: ${stderr.trim()}`));
    });
    child.stdin.end(input);
  });
}

/**
 * Starts `till serve` with its output in a file (as a terminal or a log file would take it;
 * nothing here reads it during the load) and waits for its URL.
 */
async function startServe(
  env: NodeJS.ProcessEnv,
  logFile: string,
  js = TILL_JS,
  serveArgs: string[] = [],
): Promise<{ child: ChildProcess; port: number }> {
  const fd = openSync(logFile, 'w', 0o600);
  const node = js === TILL_JS ? profileArgs(basename(logFile, '.log')) : [];
  const child = spawn(process.execPath, [...node, js, 'serve', '--port', '0', ...serveArgs], {
    cwd: scratch,
    env,
    stdio: ['ignore', fd, fd],
  });
  closeSync(fd);
  children.push(child);
  const deadline = Date.now() + 15_000;
  for (;;) {
    const text = readFileSync(logFile, 'utf8');
    const m = /listening on http:\/\/127\.0\.0\.1:(\d+)/.exec(text);
    if (m) return { child, port: Number(m[1]) };
    if (!alive(child)) throw new Error(`till serve exited with ${child.exitCode ?? child.signalCode}: ${text.trim()}`);
    if (Date.now() > deadline) throw new Error(`till serve did not start within 15 s: ${text.trim()}`);
    await sleep(50);
  }
}

async function stopChild(child: ChildProcess, signal: NodeJS.Signals = 'SIGTERM'): Promise<void> {
  if (!alive(child)) return;
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  child.kill(signal);
  const timedOut = await Promise.race([exited.then(() => false), sleep(5_000).then(() => true)]);
  if (timedOut) {
    child.kill('SIGKILL');
    await exited;
  }
}

/** What a team ledger's database holds: keys, activations used and held over them, holds open. */
async function ledgerCounts(url: string): Promise<{ keys: number; used: number; held: number; holds: number }> {
  const client = new pg.Client({ connectionString: url, connectionTimeoutMillis: 5_000, query_timeout: 5_000 });
  client.on('error', () => undefined);
  await client.connect();
  try {
    const k = await client.query<{ keys: string; used: string; held: string }>(
      'select count(*) as keys, coalesce(sum(used_activations), 0) as used, coalesce(sum(held_activations), 0) as held from till_keys',
    );
    const h = await client.query<{ holds: string }>('select count(*) as holds from till_holds');
    const row = k.rows[0]!;
    return { keys: Number(row.keys), used: Number(row.used), held: Number(row.held), holds: Number(h.rows[0]!.holds) };
  } finally {
    await client.end().catch(() => undefined);
  }
}

// Share of the machine's CPU that other processes may take during the load phases before the
// figures are flagged as unreliable.
const MAX_OTHER_LOAD = 0.1;

interface Path {
  target: Target;
  /** The proxy's processes: none for the direct path, three for three brokers (their CPU is summed). */
  pids: number[];
  /** Requests over the whole run (c1 and c32 spread evenly over the rounds), and SSE streams. */
  counts: { warmup: number; c1: number; c32: number; sse: number };
  /** Long streams through it too (the local ledger's columns). */
  longStreams: boolean;
  /** The team ledger's cluster, whose CPU is read beside the proxy's. */
  db?: TeamLedgerDb;
  c1: PhaseRun[];
  c32: PhaseRun[];
  /** Proxy CPU (µs) per round, at c=1 and c=32. */
  cpuC1: number[];
  cpuC32: number[];
  /** PostgreSQL's CPU (µs) per round, at c=1 and c=32 (team ledger only). */
  dbCpuC1: number[];
  dbCpuC32: number[];
  /** A third phase in each round, after c=32: the three brokers at 32 each. */
  wide?: { concurrency: number; requests: number; runs: PhaseRun[]; cpu: number[]; dbCpu: number[] };
  /** CPU time other processes took while this path was loaded, and the wall time (µs). */
  otherCpu: number;
  wall: number;
}

/**
 * The load phases, in rounds: each round runs a slice of the c=1 and c=32 requests on every
 * path, in a rotating order, so a machine that slows down or speeds up over the run weighs on
 * every path alike.
 */
async function load(paths: Path[], upstreamPid: number, warmUp: (p: Path) => Promise<void>): Promise<void> {
  const cpu = (p: Path) => sum(p.pids.map(cpuMicros));
  const dbCpu = (p: Path) => p.db?.cpuMicros() ?? 0;
  const ours = (p: Path) => {
    const self = process.cpuUsage();
    return cpu(p) + dbCpu(p) + cpuMicros(upstreamPid) + self.user + self.system;
  };
  for (let round = 0; round < ROUNDS; round++) {
    for (let i = 0; i < paths.length; i++) {
      const p = paths[(i + round) % paths.length]!;
      // Each path's warm-up right before its first measured turn: warmed before the others' warm-ups,
      // a proxy idled long enough for V8 to shrink its heap again (its memory reducer).
      if (round === 0) await warmUp(p);
      const machine0 = machineBusyMicros();
      const ours0 = ours(p);
      const t0 = performance.now();
      const cpu0 = cpu(p);
      const db0 = dbCpu(p);
      p.c1.push(await runPhase(p.target, 1, p.counts.c1 / ROUNDS));
      const cpu1 = cpu(p);
      const db1 = dbCpu(p);
      p.c32.push(await runPhase(p.target, 32, p.counts.c32 / ROUNDS));
      const cpu2 = cpu(p);
      const db2 = dbCpu(p);
      if (p.wide) {
        p.wide.runs.push(await runPhase(p.target, p.wide.concurrency, p.wide.requests / ROUNDS));
        p.wide.cpu.push(cpu(p) - cpu2);
        p.wide.dbCpu.push(dbCpu(p) - db2);
      }
      p.otherCpu += Math.max(0, machineBusyMicros() - machine0 - (ours(p) - ours0));
      p.wall += (performance.now() - t0) * 1000;
      p.cpuC1.push(cpu1 - cpu0);
      p.cpuC32.push(cpu2 - cpu1);
      p.dbCpuC1.push(db1 - db0);
      p.dbCpuC32.push(db2 - db1);
    }
    progress(`load round ${round + 1}/${ROUNDS} done`);
  }
}

async function main(): Promise<void> {
  if (process.platform !== 'linux') throw new Error('the bench reads /proc: it runs on Linux only');
  if (!existsSync(TILL_JS)) throw new Error(`${TILL_JS} is missing: run \`npm run build\` first`);
  const watchdog = setTimeout(() => {
    progress(`did not finish within ${WATCHDOG_MS / 60_000} min: stopping`);
    cleanup();
    process.exit(1);
  }, WATCHDOG_MS);
  watchdog.unref();
  const began = performance.now();

  // The profiles name functions by line in the bundle: keep the bundle they were taken of.
  if (CPU_PROF_DIR) {
    mkdirSync(CPU_PROF_DIR, { recursive: true });
    copyFileSync(TILL_JS, join(CPU_PROF_DIR, 'till.js'));
    if (existsSync(`${TILL_JS}.map`)) copyFileSync(`${TILL_JS}.map`, join(CPU_PROF_DIR, 'till.js.map'));
    copyFileSync(__filename, join(CPU_PROF_DIR, 'bench.js'));
  }
  const secret = `sk-bench-${randomBytes(18).toString('hex')}`;
  scratch = mkdtempSync(join(tmpdir(), 'till-bench-'));

  progress('starting a private keychain, the upstream and the pass-through');
  const keychain = (keyring = await startPrivateKeyring());
  const upstream = await forkRole('upstream', { BENCH_SECRET: secret });
  const pass = await forkRole('passthrough', { BENCH_SECRET: secret, BENCH_UPSTREAM_PORT: String(upstream.port) });

  // Each Till column gets a `till serve` of its own, as the pass-through has a process of its own:
  // a process serving several columns warms up (and sizes its heap) on all of their traffic, which
  // made the one it shared read 20 to 45 % cheaper than the same build alone.
  const tillEnvOf = (home: string): NodeJS.ProcessEnv => ({
    ...process.env,
    ...keychain.env,
    TILL_HOME: join(scratch!, home),
    TILL_UPSTREAM_OPENAI: `http://127.0.0.1:${upstream.port}/v1`,
  });
  const orphans: Orphans = { pids: [], keyringHome: keychain.env.HOME, dirs: [scratch, keychain.env.HOME!] };
  const serves: ChildProcess[] = [];
  /** Adds the credential and starts `till serve` (`ledger`: on that team ledger). */
  const startBroker = async (home: string, js = TILL_JS, ledger?: string) => {
    const env = tillEnvOf(home);
    await till(['credential', 'add', 'openai'], env, `${secret}\n`, js);
    const log = join(scratch!, `serve-${home}.log`);
    const started = await startServe(env, log, js, ledger ? ['--ledger', ledger] : []);
    serves.push(started.child);
    orphans.pids.push(started.child.pid!);
    upstream.child.send({ reap: orphans });
    // It names its team ledger just after its URL.
    for (let waited = 0; ledger && !readFileSync(log, 'utf8').includes('team ledger: postgres://'); waited += 50) {
      if (waited >= 2_000)
        throw new Error(`${home}: till serve does not say it is on the team ledger: ${readFileSync(log, 'utf8').trim()}`);
      await sleep(50);
    }
    return { ...started, env };
  };
  const issueKey = async (env: NodeJS.ProcessEnv, issueArgs: string[], js = TILL_JS) =>
    JSON.parse(await till(['issue', 'openai', '--json', ...issueArgs], env, '', js)) as {
      id: string;
      key: string;
      baseUrl: string;
      policy: { maxActivations?: number; maxTokens?: number; maxSpendUsd?: number };
    };
  /** A broker and a key issued through it with `issueArgs`. */
  const startTill = async (home: string, issueArgs: string[], js = TILL_JS, ledger?: string) => {
    const started = await startBroker(home, js, ledger);
    return { ...started, issued: await issueKey(started.env, issueArgs, js) };
  };
  progress('starting till serve (one per Till column)');
  const serve = await startTill('home', ['--label', 'bench']);
  const issued = serve.issued;
  if (issued.policy.maxActivations !== undefined) throw new Error('the bench key must have no uses limit');
  const unmeteredServe = await startTill('home-unmetered', ['--label', 'bench unmetered']);
  // Limits no run reaches: what is measured is the planning, holding and settling of every request.
  const limitsServe = await startTill('home-limits', ['--label', 'bench limits', '--max-tokens', '1000000000', '--max-spend', '100000']);
  const budgeted = limitsServe.issued;
  const tillPath = `${new URL(issued.baseUrl).pathname}/chat/completions`;

  let baseline: { child: ChildProcess; port: number; key: string } | undefined;
  if (BASELINE_JS) {
    progress(`starting the baseline: ${BASELINE_JS}`);
    const started = await startTill('home-baseline', ['--label', 'bench'], BASELINE_JS);
    baseline = { ...started, key: started.issued.key };
  }

  // The team ledger: one cluster, a database for each of its two columns.
  progress('starting PostgreSQL and the team-ledger brokers');
  const team = await startTeamLedgerDb(['till_three'], (db) => {
    teamDb = db;
  });
  orphans.postmaster = team.postmaster;
  orphans.dirs.push(team.folder);
  upstream.child.send({ reap: orphans });
  // A key like the till column's (no limits): every billable request is still held and settled
  // on the database (one activation), as on a key with a uses limit.
  const teamServe = await startTill('home-team', ['--label', 'bench team'], TILL_JS, team.urlOf('till'));
  const threes = await Promise.all(
    Array.from({ length: TEAM_BROKERS }, (_, i) => startBroker(`home-team3-${i + 1}`, TILL_JS, team.urlOf('till_three'))),
  );
  // One key, issued through the first broker: the others learn it from the database (a notification).
  const shared = await issueKey(threes[0]!.env, ['--label', 'bench team, 3 brokers']);
  for (const b of threes.slice(1)) {
    const deadline = Date.now() + 10_000;
    while (!(JSON.parse(await till(['ls', '--json'], b.env)) as { id: string }[]).some((k) => k.id === shared.id)) {
      if (Date.now() > deadline) throw new Error(`a broker on the team ledger did not learn key ${shared.id} within 10 s`);
      await sleep(100);
    }
  }
  for (const k of [teamServe.issued, shared]) {
    const { maxActivations, maxTokens, maxSpendUsd } = k.policy;
    if (maxActivations !== undefined || maxTokens !== undefined || maxSpendUsd !== undefined)
      throw new Error('the team keys must have no limits');
  }
  const teamCounts = { warmup: TEAM_WARMUP_REQUESTS, c1: TEAM_C1_REQUESTS, c32: TEAM_C32_REQUESTS, sse: TEAM_SSE_STREAMS };
  const counts = { warmup: WARMUP_REQUESTS, c1: C1_REQUESTS, c32: C32_REQUESTS, sse: SSE_STREAMS };

  const paths: Path[] = [
    { target: { name: 'direct', port: upstream.port, path: '/v1/chat/completions', authorization: `Bearer ${secret}` }, pids: [] },
    {
      target: { name: 'pass-through', port: pass.port, path: '/v1/chat/completions', authorization: 'Bearer sk-placeholder' },
      pids: [pass.child.pid!],
      longStreams: true,
    },
    {
      target: { name: 'till', port: serve.port, path: tillPath, authorization: `Bearer ${issued.key}` },
      pids: [serve.child.pid!],
      longStreams: true,
    },
    // The same broker on a billable route Till does not meter: the difference is metering's cost.
    {
      target: {
        name: 'till, unmetered route',
        port: unmeteredServe.port,
        path: `${new URL(unmeteredServe.issued.baseUrl).pathname}/audio/speech`,
        authorization: `Bearer ${unmeteredServe.issued.key}`,
      },
      pids: [unmeteredServe.child.pid!],
    },
    {
      target: { name: 'till, limits', port: limitsServe.port, path: tillPath, authorization: `Bearer ${budgeted.key}` },
      pids: [limitsServe.child.pid!],
      longStreams: true,
    },
    ...(baseline
      ? [
          {
            target: { name: 'baseline', port: baseline.port, path: tillPath, authorization: `Bearer ${baseline.key}` },
            pids: [baseline.child.pid!],
          },
        ]
      : []),
    {
      target: { name: 'till, team ledger', port: teamServe.port, path: tillPath, authorization: `Bearer ${teamServe.issued.key}` },
      pids: [teamServe.child.pid!],
      counts: teamCounts,
      db: team,
    },
    {
      target: {
        name: `till, team ledger, ${TEAM_BROKERS} brokers`,
        port: threes[0]!.port,
        ports: threes.map((b) => b.port),
        path: tillPath,
        authorization: `Bearer ${shared.key}`,
      },
      pids: threes.map((b) => b.child.pid!),
      counts: teamCounts,
      db: team,
      wide: { concurrency: TEAM_WIDE_CONCURRENCY, requests: TEAM_WIDE_REQUESTS, runs: [], cpu: [], dbCpu: [] },
    },
  ].map((p): Path => ({
    counts,
    longStreams: false,
    ...p,
    c1: [],
    c32: [],
    cpuC1: [],
    cpuC32: [],
    dbCpuC1: [],
    dbCpuC32: [],
    otherCpu: 0,
    wall: 0,
  }));
  const [teamPath, threePath] = paths.filter((x) => x.db !== undefined) as [Path, Path];

  // The local ledger's proxies (the pass-through and each `till serve` compared with it) get a core
  // of their own, the load generator and the upstream the others: unpinned, the scheduler's lasting
  // choices of where each process runs beside them made two identical `till serve`s of one run read
  // up to 7 % apart. The team-ledger brokers and PostgreSQL run anywhere (they are loaded alone).
  const proxyCore = String(CORES - 1);
  const loadCores = CORES === 2 ? '0' : `0-${CORES - 2}`;
  const pinnedProxies = paths.filter((p) => p.db === undefined && p.pids.length > 0);
  const pinned =
    CORES >= 2 &&
    [process.pid, upstream.child.pid!].every((pid) => pinToCores(pid, loadCores)) &&
    pinnedProxies.every((p) => p.pids.every((pid) => pinToCores(pid, proxyCore)));
  if (!pinned) progress('could not pin the proxies to a core of their own (taskset): the CPU figures are noisier');

  const metered = (p: Path) => p.target.name !== 'till, unmetered route';
  await load(paths, upstream.child.pid!, async (p) => {
    progress(`${p.target.name}: warm-up`);
    if (metered(p)) await runSse(p.target, SSE_WARMUP_STREAMS);
    await runPhase(p.target, WARMUP_CONCURRENCY, p.counts.warmup);
  });
  const results: TargetResult[] = [];
  let unmetered: { c1: number; c32: number } | undefined;
  for (const p of paths) {
    if (!metered(p)) {
      unmetered = { c1: sum(p.cpuC1) / p.counts.c1, c32: sum(p.cpuC32) / p.counts.c32 };
      continue;
    }
    const sse = await runSse(p.target, p.counts.sse);
    progress(`${p.target.name}: SSE first event ${sse.ttfbMedianMs.toFixed(2)} ms, end ${sse.endMedianMs.toFixed(1)} ms`);
    const result: TargetResult = {
      name: p.target.name,
      c1: summarize(p.c1),
      c32: summarize(p.c32),
      sse,
      otherLoad: p.otherCpu / (p.wall * CORES),
    };
    if (p.pids.length > 0) {
      result.cpuC1 = sum(p.cpuC1) / p.counts.c1;
      result.cpuC32 = sum(p.cpuC32) / p.counts.c32;
      // Three brokers: the largest of the three.
      result.peakRssKiB = Math.max(...p.pids.map(peakRssKiB));
    }
    if (p.db) {
      result.dbCpuC1 = sum(p.dbCpuC1) / p.counts.c1;
      result.dbCpuC32 = sum(p.dbCpuC32) / p.counts.c32;
    }
    results.push(result);
  }
  // Long streams: the CPU one costs, and how often a budgeted stream's hold grows (ledger 'adj' lines).
  const ledgerFile = join(limitsServe.env.TILL_HOME!, 'ledger.jsonl');
  const growths = () => (readFileSync(ledgerFile, 'utf8').match(/"t":"adj"/g) ?? []).length;
  const long: { name: string; cpuPerStream: number; msPerStream: number; growthsPerStream?: number }[] = [];
  for (const p of paths.filter((x) => x.longStreams)) {
    const adj0 = growths();
    const cpu0 = cpuMicros(p.pids[0]!);
    const ms = await runLongStreams(p.target, LONG_STREAMS);
    const cpuPerStream = (cpuMicros(p.pids[0]!) - cpu0) / LONG_STREAMS;
    long.push({
      name: p.target.name,
      cpuPerStream,
      msPerStream: ms / LONG_STREAMS,
      ...(p.target.name === 'till, limits' ? { growthsPerStream: (growths() - adj0) / LONG_STREAMS } : {}),
    });
    progress(`${p.target.name}: long streams ${(cpuPerStream / 1000).toFixed(1)} ms CPU each`);
  }

  // The CPU ratio in each round, to show how stable it is.
  const [, passRun, tillRun] = paths as [Path, Path, Path];
  // With each side's µs per request, so a drift can be told apart from one proxy warming up.
  const perRound = (a: number[], b: number[], n: number) =>
    a.map((x, i) => `${(x / b[i]!).toFixed(2)}× (${Math.round(x / n)}/${Math.round(b[i]! / n)})`).join(', ');
  const roundsC1 = perRound(tillRun.cpuC1, passRun.cpuC1, C1_REQUESTS / ROUNDS);
  const roundsC32 = perRound(tillRun.cpuC32, passRun.cpuC32, C32_REQUESTS / ROUNDS);

  for (const child of serves) {
    await stopChild(child);
    if (child.exitCode !== 0) progress(`a till serve exited with ${child.exitCode ?? child.signalCode}`);
  }
  const pgVersion = team.db.psql('show server_version').split(' ')[0];
  // What the team ledger counted, once its brokers are stopped (every settlement written): one
  // activation for each billable request sent, nothing left held.
  const ledgerChecks: string[] = [];
  for (const [p, database] of [
    [teamPath, 'till'],
    [threePath, 'till_three'],
  ] as const) {
    const sent = p.counts.warmup + SSE_WARMUP_STREAMS + p.counts.c1 + p.counts.c32 + (p.wide?.requests ?? 0) + p.counts.sse;
    const c = await ledgerCounts(team.urlOf(database));
    const fine = c.keys === 1 && c.used === sent && c.held === 0 && c.holds === 0;
    if (!fine) progress(`warning: ${p.target.name}: ${JSON.stringify(c)} for ${sent} requests sent`);
    ledgerChecks.push(
      `${p.target.name}: ${c.used.toLocaleString('en-US')} activations used of ${sent.toLocaleString('en-US')} requests sent, ${c.held} held, ${c.holds} holds open${fine ? '' : ` (**not what was sent**: ${c.keys} keys)`}`,
    );
  }
  upstream.child.send({ reap: { ...orphans, pids: [] } });
  await stopChild(pass.child);
  await stopChild(upstream.child);
  cleanup();

  progress('tokenizer');
  const tokenizer = measureTokenizer();
  const [, p, t] = results as [TargetResult, TargetResult, TargetResult];
  const limited = results.find((r) => r.name === 'till, limits')!;
  const base = results.find((r) => r.name === 'baseline');
  const ratioC1 = t.cpuC1! / p.cpuC1!;
  const ratioC32 = t.cpuC32! / p.cpuC32!;
  const addedP50 = t.c1.p50Ms - p.c1.p50Ms;
  const goals: Goal[] = [
    {
      name: 'till CPU per request ÷ pass-through, c=1',
      value: `${ratioC1.toFixed(2)}× (${Math.round(t.cpuC1!)} vs ${Math.round(p.cpuC1!)} µs)`,
      limit: `≤ ${MAX_CPU_RATIO}×`,
      pass: ratioC1 <= MAX_CPU_RATIO,
    },
    {
      name: 'till CPU per request ÷ pass-through, c=32',
      value: `${ratioC32.toFixed(2)}× (${Math.round(t.cpuC32!)} vs ${Math.round(p.cpuC32!)} µs)`,
      limit: `≤ ${MAX_CPU_RATIO}×`,
      pass: ratioC32 <= MAX_CPU_RATIO,
    },
    {
      name: 'added p50 latency, till − pass-through, c=1',
      value: `${addedP50.toFixed(3)} ms`,
      limit: `≤ ${MAX_ADDED_P50_MS} ms`,
      pass: addedP50 <= MAX_ADDED_P50_MS,
    },
    {
      name: 'till CPU per request with token and dollar limits ÷ pass-through, c=1',
      value: `${(limited.cpuC1! / p.cpuC1!).toFixed(2)}× (${Math.round(limited.cpuC1!)} vs ${Math.round(p.cpuC1!)} µs)`,
      limit: `≤ ${MAX_CPU_RATIO}×`,
      pass: limited.cpuC1! / p.cpuC1! <= MAX_CPU_RATIO,
    },
    {
      name: 'till CPU per request with token and dollar limits ÷ pass-through, c=32',
      value: `${(limited.cpuC32! / p.cpuC32!).toFixed(2)}× (${Math.round(limited.cpuC32!)} vs ${Math.round(p.cpuC32!)} µs)`,
      limit: `≤ ${MAX_CPU_RATIO}×`,
      pass: limited.cpuC32! / p.cpuC32! <= MAX_CPU_RATIO,
    },
    ...(base
      ? (['c1', 'c32'] as const).map((c): Goal => {
          const key = c === 'c1' ? 'cpuC1' : 'cpuC32';
          const ratio = t[key]! / base[key]!;
          return {
            name: `till CPU per request ÷ the baseline build, ${c === 'c1' ? 'c=1' : 'c=32'}`,
            value: `${ratio.toFixed(2)}× (${Math.round(t[key]!)} vs ${Math.round(base[key]!)} µs)`,
            limit: `≤ ${MAX_BASELINE_RATIO}×`,
            pass: ratio <= MAX_BASELINE_RATIO,
          };
        })
      : []),
    {
      name: 'SSE first event, till − pass-through (median)',
      value: `${(t.sse.ttfbMedianMs - p.sse.ttfbMedianMs).toFixed(2)} ms (${t.sse.ttfbMedianMs.toFixed(2)} vs ${p.sse.ttfbMedianMs.toFixed(2)})`,
      limit: `≤ ${MAX_ADDED_SSE_FIRST_MS} ms`,
      pass: t.sse.ttfbMedianMs - p.sse.ttfbMedianMs <= MAX_ADDED_SSE_FIRST_MS,
    },
    ...[t, limited].map((r): Goal => ({
      name: `peak RSS, ${r.name}`,
      value: `${(r.peakRssKiB! / 1024).toFixed(1)} MiB`,
      limit: `≤ ${MAX_PEAK_RSS_MIB} MiB`,
      pass: r.peakRssKiB! / 1024 <= MAX_PEAK_RSS_MIB,
    })),
    {
      name: 'SSE through till unbuffered',
      value: `first event at ${t.sse.ttfbMedianMs.toFixed(2)} ms, ≥ ${t.sse.minLeadMs.toFixed(0)} ms before the end`,
      limit: 'first event alone, long before the end',
      pass: t.sse.unbuffered,
    },
  ];

  const teamResults = results.filter((r) => r.dbCpuC1 !== undefined);
  const wide = threePath.wide!;
  const wideRun = summarize(wide.runs);
  const seconds = (performance.now() - began) / 1000;
  const busiest = Math.max(...results.map((r) => r.otherLoad));
  const warnings: string[] = [];
  if (busiest > MAX_OTHER_LOAD) {
    warnings.push(
      `**Warning: other processes took up to ${Math.round(busiest * 100)} % of the machine's CPU during the load phases: these figures are unreliable; run again on a quiet machine.**`,
    );
    progress(`warning: other processes took up to ${Math.round(busiest * 100)} % of the CPU during the load phases`);
  }
  const md = markdown(
    {
      date: new Date().toISOString().replace(/\.\d+Z$/, 'Z'),
      node: process.version,
      cpu: cpuModel(),
      cores: CORES,
      platform: `${process.platform} ${process.arch}`,
      counts: `Per path: ${WARMUP_REQUESTS.toLocaleString('en-US')} warm-up requests at concurrency ${WARMUP_CONCURRENCY}, then ${C1_REQUESTS.toLocaleString('en-US')} at concurrency 1 and ${C32_REQUESTS.toLocaleString('en-US')} at concurrency 32 (POST of a small JSON chat-completions body over keep-alive), in ${ROUNDS} rounds that alternate the paths, then ${SSE_STREAMS} SSE streams one at a time. The team-ledger columns, in the same rounds, fewer to bound the run (each request is two statements on the database): ${TEAM_WARMUP_REQUESTS.toLocaleString('en-US')} warm-up, ${TEAM_C1_REQUESTS.toLocaleString('en-US')} at c=1, ${TEAM_C32_REQUESTS.toLocaleString('en-US')} at c=32 (the three brokers: then ${TEAM_WIDE_REQUESTS.toLocaleString('en-US')} at c=${TEAM_WIDE_CONCURRENCY}), ${TEAM_SSE_STREAMS} SSE streams.`,
    },
    results,
    goals,
    [
      ...warnings,
      `Latency: request start to the last byte of the answer, measured by the load generator, which shares the machine (${CORES} cores) with the upstream and the proxy.`,
      `Proxy CPU: user + system time of the proxy process (/proc/<pid>/stat) over the phase, divided by its requests; the upstream and the load generator are not counted. Till ÷ pass-through in each round (µs per request, till/pass-through): c=1 ${roundsC1}; c=32 ${roundsC32}.`,
      pinned
        ? `Cores: the pass-through and the local ledger's \`till serve\`s ran on core ${proxyCore}, the load generator and the upstream on ${CORES === 2 ? 'core' : 'cores'} ${loadCores} (taskset); the team-ledger brokers and PostgreSQL on any. The direct column's load generator and upstream had only their own ${CORES === 2 ? 'core' : 'cores'}, so a proxy's column can serve more than it.`
        : 'Cores: not pinned (taskset missing, not permitted, or one core): the proxies shared cores with the load generator and the upstream as the scheduler chose, which moves CPU figures by several percent.',
      `SSE: the upstream sends headers and the first event at once, then ${SSE_EVENTS - 1} more events ${SSE_GAP_MS} ms apart. "Ahead of stream end" is the smallest gap, over all streams, between the first event and the end: a buffering path would show about 0. Unbuffered = median first event under ${SSE_GAP_MS} ms, first read holding the first event alone in ≥ 90 % of streams, and every first event ≥ ${((SSE_EVENTS - 1) * SSE_GAP_MS) / 2} ms ahead of its end.`,
      '`till serve` runs as shipped: it checks and counts every request in its ledger, meters it and appends the audit log; its console shows key events and refusals (a file here).',
      ...(unmetered
        ? [
            `Metering's cost: the same till key on a billable route Till does not meter (\`/audio/speech\`) used ${Math.round(unmetered.c1)} µs at c=1 and ${Math.round(unmetered.c32)} µs at c=32, so reading usage from the answer and settling tokens and spend costs ${Math.round(t.cpuC1! - unmetered.c1)} µs and ${Math.round(t.cpuC32! - unmetered.c32)} µs per request (${(unmetered.c1 / p.cpuC1!).toFixed(2)}× and ${(unmetered.c32 / p.cpuC32!).toFixed(2)}× the pass-through without it).`,
          ]
        : []),
      `Team ledger: \`till serve --ledger postgres://…\` on a throw-away PostgreSQL ${pgVersion} cluster on this machine (fsync on, synchronous commit; the broker's default pool of 8 connections), each column on a database of its own, with an unlimited key like the till column's. Every billable request is a hold statement (a conditional UPDATE of the key's row that inserts a hold row) and, once answered, a settlement statement (deletes the hold, adds to the row's counters, notifies every broker of the database), each committed on its own; all requests use one key, so they take turns on its one row. A key with a uses limit is held alike: an unlimited key's request holds one activation too, only the UPDATE's limit test differs. Proxy CPU counts the broker processes only (three brokers: their CPU summed, over all requests; peak RSS: the largest of the three); PostgreSQL's CPU (postmaster, backends, WAL writer, checkpointer, autovacuum: every process of the cluster, from /proc) is its own row and is not in the proxy CPU. At c=32 the broker(s) and PostgreSQL kept ${teamResults.map((r) => `${((r.c32.reqPerSec * (r.cpuC32! + r.dbCpuC32!)) / 1e6).toFixed(1)}`).join(' and ')} of the ${CORES} cores busy (one broker, three), beside the upstream and the load generator. No targets apply to these columns: issue 12's are the local ledger's.`,
      `${threePath.target.name}: the load goes round-robin over the three; the key was issued through the first and learnt by the others from the database. At c=${wide.concurrency} (${wide.concurrency / TEAM_BROKERS} per broker): ${Math.round(wideRun.reqPerSec).toLocaleString('en-US')} req/s, p50 / p99 ${wideRun.p50Ms.toFixed(2)} / ${wideRun.p99Ms.toFixed(2)} ms, proxy CPU ${Math.round(sum(wide.cpu) / wide.requests)} µs per request (three summed), PostgreSQL ${Math.round(sum(wide.dbCpu) / wide.requests)} µs.`,
      `What the team ledger counted after the run, its brokers stopped: ${ledgerChecks.join('; ')}.`,
      `Long streams (${LONG_STREAM_EVENTS.toLocaleString('en-US')} events each, as fast as read, ${LONG_STREAMS} one after another), proxy CPU per stream: ${long.map((l) => `${l.name} ${(l.cpuPerStream / 1000).toFixed(1)} ms`).join(', ')}. The limited key's hold grew ${long.find((l) => l.growthsPerStream !== undefined)?.growthsPerStream?.toFixed(1) ?? '?'} times per stream (a ledger write each), which costs ${((long.find((l) => l.name === 'till, limits')!.cpuPerStream - long.find((l) => l.name === 'till')!.cpuPerStream) / 1000).toFixed(1)} ms per stream over the unlimited key.`,
      `Tokenizer (o200k_base: Till's counter over tiktoken's rank file, in this process; loaded by a broker's first stream on a key with token or spend limits, whose text it counts if the stream is cut, and by a body whose bytes would refuse a request or lower its output): loading it ${tokenizer.loadMs.toFixed(0)} ms and ${tokenizer.loadRssMiB.toFixed(0)} MiB; counting ${tokenizer.sizes.map((z) => `a ${z.label} (${(z.bytes / 1000).toFixed(0)} kB, ${z.tokens.toLocaleString('en-US')} tokens) ${z.ms.toFixed(1)} ms`).join('; ')}. The requests above are held by their bytes; the limited column's first stream loads it, which the peak RSS shows.`,
      ...(base ? [`Baseline: ${BASELINE_JS}, its \`till serve\` run alongside in the same rounds.`] : []),
      `Run time: ${seconds.toFixed(0)} s.`,
    ],
  );
  process.stdout.write(md);
  if (CPU_PROF_DIR || EXTRA_NODE_ARGS.length > 0) {
    progress(`profiling run: RESULTS.md left as it was${CPU_PROF_DIR ? `; profiles in ${CPU_PROF_DIR}` : ''}`);
  } else {
    writeFileSync(RESULTS_MD, md);
    progress(`wrote ${RESULTS_MD}`);
  }
  clearTimeout(watchdog);
}

const role = process.argv[2];
if (role === 'upstream') {
  runUpstream();
} else if (role === 'passthrough') {
  runPassThrough();
} else {
  process.on('exit', cleanup);
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    process.once(signal, () => {
      progress(`${signal}: stopping`);
      cleanup();
      process.exit(130);
    });
  }
  main().then(
    () => {
      process.exitCode = 0;
    },
    (err: unknown) => {
      progress(`failed: ${(err as Error).stack ?? String(err)}`);
      cleanup();
      process.exitCode = 1;
    },
  );
}
