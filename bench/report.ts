/** The Markdown report: one table of figures, one of targets. */
import type { PhaseResult, SseResult } from './load';

export interface TargetResult {
  name: string;
  c1: PhaseResult;
  c32: PhaseResult;
  sse: SseResult;
  /** Proxy CPU per request in µs (none for the direct path). */
  cpuC1?: number;
  cpuC32?: number;
  /** Share of the machine's CPU that other processes used during the load phases (0–1). */
  otherLoad: number;
  /** Peak RSS of the proxy process in KiB (of several brokers: the largest). */
  peakRssKiB?: number;
  /** PostgreSQL's CPU per request in µs (team ledger only): every process of its cluster. */
  dbCpuC1?: number;
  dbCpuC32?: number;
}

export interface Goal {
  name: string;
  value: string;
  limit: string;
  pass: boolean;
}

export interface Environment {
  date: string;
  node: string;
  cpu: string;
  cores: number;
  platform: string;
  counts: string;
}

const rate = (n: number) => Math.round(n).toLocaleString('en-US');
const ms = (n: number) => n.toFixed(2);
const us = (n: number | undefined) => (n === undefined ? '–' : Math.round(n).toLocaleString('en-US'));
const mib = (kib: number | undefined) => (kib === undefined ? '–' : (kib / 1024).toFixed(1));

function row(cells: string[]): string {
  return `| ${cells.join(' | ')} |`;
}

export function figuresTable(results: TargetResult[]): string {
  const lines = [row(['', ...results.map((r) => r.name)]), row(['---', ...results.map(() => '---:')])];
  const add = (label: string, f: (r: TargetResult) => string) => lines.push(row([label, ...results.map(f)]));
  add('req/s, c=1', (r) => rate(r.c1.reqPerSec));
  add('p50 / p99 latency, c=1 (ms)', (r) => `${ms(r.c1.p50Ms)} / ${ms(r.c1.p99Ms)}`);
  add('req/s, c=32', (r) => rate(r.c32.reqPerSec));
  add('p50 / p99 latency, c=32 (ms)', (r) => `${ms(r.c32.p50Ms)} / ${ms(r.c32.p99Ms)}`);
  add('proxy CPU per request, c=1 (µs)', (r) => us(r.cpuC1));
  add('proxy CPU per request, c=32 (µs)', (r) => us(r.cpuC32));
  if (results.some((r) => r.dbCpuC1 !== undefined)) {
    add('PostgreSQL CPU per request, c=1 (µs)', (r) => us(r.dbCpuC1));
    add('PostgreSQL CPU per request, c=32 (µs)', (r) => us(r.dbCpuC32));
  }
  add('SSE time to first event, median / max (ms)', (r) => `${ms(r.sse.ttfbMedianMs)} / ${ms(r.sse.ttfbMaxMs)}`);
  add('SSE stream end, median (ms)', (r) => ms(r.sse.endMedianMs));
  add('SSE first event ahead of stream end, min (ms)', (r) => ms(r.sse.minLeadMs));
  add('SSE streams whose first read was the first event alone', (r) => `${Math.round(r.sse.firstEventAlone * 100)} %`);
  add('SSE unbuffered', (r) => (r.sse.unbuffered ? 'yes' : '**no**'));
  add('proxy peak RSS (MiB)', (r) => mib(r.peakRssKiB));
  add('CPU taken by other processes during the load phases', (r) => `${Math.round(r.otherLoad * 100)} %`);
  return lines.join('\n');
}

export function targetsTable(targets: Goal[]): string {
  const lines = [row(['target', 'measured', 'limit', 'result']), row(['---', '---:', '---:', '---'])];
  for (const t of targets) lines.push(row([t.name, t.value, t.limit, t.pass ? 'PASS' : '**FAIL**']));
  return lines.join('\n');
}

export function markdown(env: Environment, results: TargetResult[], targets: Goal[], notes: string[]): string {
  return [
    '# Till broker benchmark',
    '',
    `${env.date} · Node ${env.node} · ${env.cpu} (${env.cores} cores) · ${env.platform}`,
    '',
    `Fast upstream on 127.0.0.1, reached directly, through a minimal node:http pass-through proxy, and through \`till serve\`. ${env.counts}`,
    '',
    figuresTable(results),
    '',
    targetsTable(targets),
    '',
    ...notes.map((n) => `- ${n}`),
    '',
  ].join('\n');
}
