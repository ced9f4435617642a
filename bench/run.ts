/**
 * `npm run bench`: how much the Till broker costs next to the floor for a Node broker.
 *
 * One run compares, on a fast upstream on 127.0.0.1:
 *   direct        the load generator calls the upstream itself;
 *   pass-through  a minimal node:http proxy that swaps the Authorization header;
 *   till          `till serve` (dist/till.js) with a credential in a private keychain and a till key;
 *   till, limits  the same broker with a key limited in tokens and dollars: every request is
 *                 planned and held, and settled (holds/plan.ts), every stream's hold follows it;
 *   baseline      with BENCH_BASELINE=<an older build's till.js>: that build's `till serve`, so that
 *                 this build's cost is compared with it in the same run.
 * Then long streams (4,000 events each) through the pass-through and both till keys: the CPU a
 * stream costs, and how often a budgeted stream's hold grows. Then, in this process, the
 * tokenizer a hold uses when a body's bytes would not fit (bench/tokenizer.ts).
 * Upstream, pass-through and Till each run in their own child process, so the CPU time of each
 * proxy is read from /proc before and after each phase. The load generator runs here.
 *
 * Prints a Markdown table to stdout (progress goes to stderr) and writes it to bench/RESULTS.md.
 * Every child process, the private keychain and the temp folder go away at the end, on error
 * and on Ctrl-C.
 */
import { fork, spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, copyFileSync, existsSync, mkdirSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { availableParallelism, tmpdir } from 'node:os';
import { basename, join, resolve } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { startPrivateKeyring, type PrivateKeyring } from '../test/support/keyring';
import { LONG_STREAM_EVENTS, runLongStreams, runPhase, runSse, summarize, type PhaseRun, type Target } from './load';
import { runPassThrough } from './passthrough';
import { cpuMicros, cpuModel, machineBusyMicros, peakRssKiB } from './proc';
import { markdown, type Goal, type TargetResult } from './report';
import { measureTokenizer } from './tokenizer';
import { runUpstream, SSE_EVENTS, SSE_GAP_MS, type Orphans } from './upstream';

// Bounded work per target: a warm-up, then fixed request counts.
const WARMUP_REQUESTS = 2_000;
const WARMUP_CONCURRENCY = 8;
const C1_REQUESTS = 3_000;
const C32_REQUESTS = 10_000;
// The load phases run in this many interleaved rounds (it divides both counts).
const ROUNDS = 4;
const SSE_STREAMS = 50;
const SSE_WARMUP_STREAMS = 5;
const LONG_STREAMS = 20;

// The targets Till is held to (issue 12).
const MAX_CPU_RATIO = 1.1;
const MAX_ADDED_P50_MS = 0.2;
/** SSE time to first event, till's median over the pass-through's. */
const MAX_ADDED_SSE_FIRST_MS = 0.5;
const MAX_PEAK_RSS_MIB = 80;
// Against an older build in the same run (BENCH_BASELINE): no worse, within the rounds' noise.
const MAX_BASELINE_RATIO = 1.05;
const BASELINE_JS = process.env.BENCH_BASELINE ? resolve(process.env.BENCH_BASELINE) : undefined;

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
async function startServe(env: NodeJS.ProcessEnv, logFile: string, js = TILL_JS): Promise<{ child: ChildProcess; port: number }> {
  const fd = openSync(logFile, 'w', 0o600);
  const child = spawn(process.execPath, [...(js === TILL_JS ? profileArgs(basename(logFile, '.log')) : []), js, 'serve', '--port', '0'], {
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

// Share of the machine's CPU that other processes may take during the load phases before the
// figures are flagged as unreliable.
const MAX_OTHER_LOAD = 0.1;

interface Path {
  target: Target;
  /** The proxy's process (none for the direct path). */
  pid: number | undefined;
  c1: PhaseRun[];
  c32: PhaseRun[];
  /** Proxy CPU (µs) per round, at c=1 and c=32. */
  cpuC1: number[];
  cpuC32: number[];
  /** CPU time other processes took while this path was loaded, and the wall time (µs). */
  otherCpu: number;
  wall: number;
}

/**
 * The load phases, in rounds: each round runs a slice of the c=1 and c=32 requests on every
 * path, in a rotating order, so a machine that slows down or speeds up over the run weighs on
 * every path alike.
 */
async function load(paths: Path[], upstreamPid: number): Promise<void> {
  const cpu = (p: Path) => (p.pid === undefined ? 0 : cpuMicros(p.pid));
  const ours = (p: Path) => {
    const self = process.cpuUsage();
    return cpu(p) + cpuMicros(upstreamPid) + self.user + self.system;
  };
  for (let round = 0; round < ROUNDS; round++) {
    for (let i = 0; i < paths.length; i++) {
      const p = paths[(i + round) % paths.length]!;
      const machine0 = machineBusyMicros();
      const ours0 = ours(p);
      const t0 = performance.now();
      const cpu0 = cpu(p);
      p.c1.push(await runPhase(p.target, 1, C1_REQUESTS / ROUNDS));
      const cpu1 = cpu(p);
      p.c32.push(await runPhase(p.target, 32, C32_REQUESTS / ROUNDS));
      const cpu2 = cpu(p);
      p.otherCpu += Math.max(0, machineBusyMicros() - machine0 - (ours(p) - ours0));
      p.wall += (performance.now() - t0) * 1000;
      p.cpuC1.push(cpu1 - cpu0);
      p.cpuC32.push(cpu2 - cpu1);
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
  const startTill = async (home: string, issueArgs: string[], js = TILL_JS) => {
    const env = tillEnvOf(home);
    await till(['credential', 'add', 'openai'], env, `${secret}\n`, js);
    const started = await startServe(env, join(scratch!, `serve-${home}.log`), js);
    serves.push(started.child);
    orphans.pids.push(started.child.pid!);
    upstream.child.send({ reap: orphans });
    const issued = JSON.parse(await till(['issue', 'openai', '--json', ...issueArgs], env, '', js)) as {
      key: string;
      baseUrl: string;
      policy: { maxActivations?: number };
    };
    return { ...started, env, issued };
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

  const paths: Path[] = [
    { target: { name: 'direct', port: upstream.port, path: '/v1/chat/completions', authorization: `Bearer ${secret}` }, pid: undefined },
    {
      target: { name: 'pass-through', port: pass.port, path: '/v1/chat/completions', authorization: 'Bearer sk-placeholder' },
      pid: pass.child.pid,
    },
    { target: { name: 'till', port: serve.port, path: tillPath, authorization: `Bearer ${issued.key}` }, pid: serve.child.pid },
    // The same broker on a billable route Till does not meter: the difference is metering's cost.
    {
      target: {
        name: 'till, unmetered route',
        port: unmeteredServe.port,
        path: `${new URL(unmeteredServe.issued.baseUrl).pathname}/audio/speech`,
        authorization: `Bearer ${unmeteredServe.issued.key}`,
      },
      pid: unmeteredServe.child.pid,
    },
    {
      target: { name: 'till, limits', port: limitsServe.port, path: tillPath, authorization: `Bearer ${budgeted.key}` },
      pid: limitsServe.child.pid,
    },
    ...(baseline
      ? [
          {
            target: { name: 'baseline', port: baseline.port, path: tillPath, authorization: `Bearer ${baseline.key}` },
            pid: baseline.child.pid,
          },
        ]
      : []),
  ].map((p) => ({ ...p, c1: [], c32: [], cpuC1: [], cpuC32: [], otherCpu: 0, wall: 0 }));

  const metered = (p: Path) => p.target.name !== 'till, unmetered route';
  for (const p of paths) {
    progress(`${p.target.name}: warm-up`);
    await runPhase(p.target, WARMUP_CONCURRENCY, WARMUP_REQUESTS);
    if (metered(p)) await runSse(p.target, SSE_WARMUP_STREAMS);
  }
  await load(paths, upstream.child.pid!);
  const results: TargetResult[] = [];
  let unmetered: { c1: number; c32: number } | undefined;
  for (const p of paths) {
    if (!metered(p)) {
      unmetered = { c1: sum(p.cpuC1) / C1_REQUESTS, c32: sum(p.cpuC32) / C32_REQUESTS };
      continue;
    }
    const sse = await runSse(p.target, SSE_STREAMS);
    progress(`${p.target.name}: SSE first event ${sse.ttfbMedianMs.toFixed(2)} ms, end ${sse.endMedianMs.toFixed(1)} ms`);
    const result: TargetResult = {
      name: p.target.name,
      c1: summarize(p.c1),
      c32: summarize(p.c32),
      sse,
      otherLoad: p.otherCpu / (p.wall * availableParallelism()),
    };
    if (p.pid !== undefined) {
      result.cpuC1 = sum(p.cpuC1) / C1_REQUESTS;
      result.cpuC32 = sum(p.cpuC32) / C32_REQUESTS;
      result.peakRssKiB = peakRssKiB(p.pid);
    }
    results.push(result);
  }
  // Long streams: the CPU one costs, and how often a budgeted stream's hold grows (ledger 'adj' lines).
  const ledgerFile = join(limitsServe.env.TILL_HOME!, 'ledger.jsonl');
  const growths = () => (readFileSync(ledgerFile, 'utf8').match(/"t":"adj"/g) ?? []).length;
  const long: { name: string; cpuPerStream: number; msPerStream: number; growthsPerStream?: number }[] = [];
  for (const p of paths.filter((x) => x.pid !== undefined && x.target.name !== 'till, unmetered route' && x.target.name !== 'baseline')) {
    const adj0 = growths();
    const cpu0 = cpuMicros(p.pid!);
    const ms = await runLongStreams(p.target, LONG_STREAMS);
    const cpuPerStream = (cpuMicros(p.pid!) - cpu0) / LONG_STREAMS;
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
      cores: availableParallelism(),
      platform: `${process.platform} ${process.arch}`,
      counts: `Per path: ${WARMUP_REQUESTS.toLocaleString('en-US')} warm-up requests, then ${C1_REQUESTS.toLocaleString('en-US')} at concurrency 1 and ${C32_REQUESTS.toLocaleString('en-US')} at concurrency 32 (POST of a small JSON chat-completions body over keep-alive), in ${ROUNDS} rounds that alternate the paths, then ${SSE_STREAMS} SSE streams one at a time.`,
    },
    results,
    goals,
    [
      ...warnings,
      `Latency: request start to the last byte of the answer, measured by the load generator, which shares the machine (${availableParallelism()} cores) with the upstream and the proxy.`,
      `Proxy CPU: user + system time of the proxy process (/proc/<pid>/stat) over the phase, divided by its requests; the upstream and the load generator are not counted. Till ÷ pass-through in each round (µs per request, till/pass-through): c=1 ${roundsC1}; c=32 ${roundsC32}.`,
      `SSE: the upstream sends headers and the first event at once, then ${SSE_EVENTS - 1} more events ${SSE_GAP_MS} ms apart. "Ahead of stream end" is the smallest gap, over all streams, between the first event and the end: a buffering path would show about 0. Unbuffered = median first event under ${SSE_GAP_MS} ms, first read holding the first event alone in ≥ 90 % of streams, and every first event ≥ ${((SSE_EVENTS - 1) * SSE_GAP_MS) / 2} ms ahead of its end.`,
      '`till serve` runs as shipped: it checks and counts every request in its ledger, meters it and appends the audit log; its console shows key events and refusals (a file here).',
      ...(unmetered
        ? [
            `Metering's cost: the same till key on a billable route Till does not meter (\`/audio/speech\`) used ${Math.round(unmetered.c1)} µs at c=1 and ${Math.round(unmetered.c32)} µs at c=32, so reading usage from the answer and settling tokens and spend costs ${Math.round(t.cpuC1! - unmetered.c1)} µs and ${Math.round(t.cpuC32! - unmetered.c32)} µs per request (${(unmetered.c1 / p.cpuC1!).toFixed(2)}× and ${(unmetered.c32 / p.cpuC32!).toFixed(2)}× the pass-through without it).`,
          ]
        : []),
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
