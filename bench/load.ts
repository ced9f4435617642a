/**
 * The load generator: runs in the bench process, over a keep-alive agent, against 127.0.0.1.
 * A phase sends a fixed number of requests from `concurrency` workers, each one request at a
 * time, and records every latency (request start to the last byte of the answer).
 */
import * as http from 'node:http';
import { SSE_EVENTS, SSE_GAP_MS } from './upstream';

/** One way to reach the upstream: direct, through the pass-through, through Till. */
export interface Target {
  name: string;
  port: number;
  /** Path of the chat-completions route on this target. */
  path: string;
  /** Authorization header the client sends (the real key, a placeholder, or a till key). */
  authorization: string;
  /**
   * Several brokers behind one ledger: request i goes to ports[i % ports.length] (round-robin),
   * instead of `port`.
   */
  ports?: readonly number[];
}

/** The port request `i` of a phase goes to. */
function portOf(target: Target, i: number): number {
  return target.ports ? target.ports[i % target.ports.length]! : target.port;
}

export const CHAT_BODY = Buffer.from(
  JSON.stringify({
    model: 'gpt-4o-mini',
    messages: [
      { role: 'system', content: 'You are a terse assistant.' },
      { role: 'user', content: 'Say hello in five words.' },
    ],
    max_tokens: 32,
  }),
);

export const STREAM_BODY = Buffer.from(
  JSON.stringify({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'Say hello in five words.' }],
    stream: true,
  }),
);

export interface PhaseResult {
  requests: number;
  concurrency: number;
  elapsedMs: number;
  reqPerSec: number;
  p50Ms: number;
  p99Ms: number;
}

function percentile(sorted: Float64Array, p: number): number {
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p * sorted.length) - 1));
  return sorted[i]!;
}

function post(agent: http.Agent, target: Target, port: number, body: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method: 'POST',
        path: target.path,
        agent,
        headers: { 'content-type': 'application/json', 'content-length': body.length, authorization: target.authorization },
      },
      (res) => {
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          if (res.statusCode !== 200) {
            reject(new Error(`${target.name}: HTTP ${res.statusCode}: ${Buffer.concat(chunks).toString('utf8').slice(0, 300)}`));
            return;
          }
          resolve();
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

/** One bounded run of requests: its wall time and every latency. */
export interface PhaseRun {
  requests: number;
  concurrency: number;
  elapsedMs: number;
  latencies: Float64Array;
}

/** Pools runs of the same concurrency: total requests over total time, percentiles over all latencies. */
export function summarize(runs: PhaseRun[]): PhaseResult {
  const requests = runs.reduce((n, r) => n + r.requests, 0);
  const elapsedMs = runs.reduce((t, r) => t + r.elapsedMs, 0);
  const all = new Float64Array(requests);
  let at = 0;
  for (const r of runs) {
    all.set(r.latencies, at);
    at += r.latencies.length;
  }
  all.sort();
  return {
    requests,
    concurrency: runs[0]?.concurrency ?? 0,
    elapsedMs,
    reqPerSec: (requests * 1000) / elapsedMs,
    p50Ms: percentile(all, 0.5),
    p99Ms: percentile(all, 0.99),
  };
}

/** Sends `total` requests with `concurrency` in flight (over all of the target's ports). */
export async function runPhase(target: Target, concurrency: number, total: number): Promise<PhaseRun> {
  // maxSockets is per port: `concurrency` workers never open more than `concurrency` in all.
  const agent = new http.Agent({ keepAlive: true, maxSockets: concurrency, noDelay: true });
  const latencies = new Float64Array(total);
  let next = 0;
  const worker = async () => {
    while (next < total) {
      const i = next++;
      const t0 = performance.now();
      await post(agent, target, portOf(target, i), CHAT_BODY);
      latencies[i] = performance.now() - t0;
    }
  };
  const started = performance.now();
  try {
    await Promise.all(Array.from({ length: concurrency }, worker));
  } finally {
    agent.destroy();
  }
  return { requests: total, concurrency, elapsedMs: performance.now() - started, latencies };
}

export interface StreamTiming {
  /** Request start to the first body byte (the first event). */
  ttfbMs: number;
  /** Request start to the end of the stream. */
  endMs: number;
  /** Reads of the body: more than one means events arrived separately. */
  reads: number;
  /** The first read held exactly the first event, nothing later. */
  firstReadIsFirstEventOnly: boolean;
}

/** Opens one SSE stream and times it. */
function stream(agent: http.Agent, target: Target, port: number): Promise<StreamTiming> {
  return new Promise((resolve, reject) => {
    const t0 = performance.now();
    let ttfbMs = -1;
    let reads = 0;
    let firstOnly = false;
    let text = '';
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method: 'POST',
        path: target.path,
        agent,
        headers: {
          'content-type': 'application/json',
          'content-length': STREAM_BODY.length,
          authorization: target.authorization,
          accept: 'text/event-stream',
        },
      },
      (res) => {
        res.setEncoding('utf8');
        res.on('data', (chunk: string) => {
          if (reads++ === 0) {
            ttfbMs = performance.now() - t0;
            firstOnly = chunk.startsWith('data: ') && chunk.includes('"i":0}') && !chunk.includes('"i":1}') && chunk.endsWith('\n\n');
          }
          text += chunk;
        });
        res.on('end', () => {
          const endMs = performance.now() - t0;
          if (res.statusCode !== 200) return reject(new Error(`${target.name}: SSE HTTP ${res.statusCode}: ${text.slice(0, 300)}`));
          const events = text.split('\n\n').filter((e) => e.startsWith('data: '));
          if (events.length !== SSE_EVENTS + 1 || !text.endsWith('data: [DONE]\n\n'))
            return reject(
              new Error(`${target.name}: SSE stream has ${events.length} events, expected ${SSE_EVENTS + 1} ending with [DONE]`),
            );
          resolve({ ttfbMs, endMs, reads, firstReadIsFirstEventOnly: firstOnly });
        });
        res.on('error', reject);
      },
    );
    req.on('error', reject);
    req.end(STREAM_BODY);
  });
}

/** Events of each long stream: enough text for a budgeted key's hold to grow many times. */
export const LONG_STREAM_EVENTS = 4_000;
const LONG_STREAM_BODY = Buffer.from(
  JSON.stringify({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: 'Tell me everything.' }],
    stream: true,
    bench_events: LONG_STREAM_EVENTS,
  }),
);

/** Reads `count` long streams one after another; resolves with their total wall time (ms). */
export async function runLongStreams(target: Target, count: number): Promise<number> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1, noDelay: true });
  const t0 = performance.now();
  try {
    for (let i = 0; i < count; i++) {
      await new Promise<void>((resolve, reject) => {
        const req = http.request(
          {
            host: '127.0.0.1',
            port: target.port,
            method: 'POST',
            path: target.path,
            agent,
            headers: { 'content-type': 'application/json', 'content-length': LONG_STREAM_BODY.length, authorization: target.authorization },
          },
          (res) => {
            let tail = '';
            res.setEncoding('utf8');
            res.on('data', (chunk: string) => (tail = (tail + chunk).slice(-64)));
            res.on('end', () =>
              res.statusCode === 200 && tail.endsWith('data: [DONE]\n\n')
                ? resolve()
                : reject(new Error(`${target.name}: long stream HTTP ${res.statusCode} ending ${JSON.stringify(tail)}`)),
            );
            res.on('error', reject);
          },
        );
        req.on('error', reject);
        req.end(LONG_STREAM_BODY);
      });
    }
  } finally {
    agent.destroy();
  }
  return performance.now() - t0;
}

export interface SseResult {
  streams: number;
  ttfbMedianMs: number;
  ttfbMaxMs: number;
  endMedianMs: number;
  /** Smallest gap, over all streams, between the first event and the end of its stream. */
  minLeadMs: number;
  readsMedian: number;
  /** Share of streams whose first read held the first event and nothing later. */
  firstEventAlone: number;
  /** The verdict: see {@link runSse}. */
  unbuffered: boolean;
}

function median(values: number[]): number {
  const s = [...values].sort((a, b) => a - b);
  return s[Math.floor((s.length - 1) / 2)]!;
}

/** Times `count` SSE streams one after another (round-robin over the target's ports). */
export async function runSse(target: Target, count: number): Promise<SseResult> {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1, noDelay: true });
  const timings: StreamTiming[] = [];
  try {
    for (let i = 0; i < count; i++) timings.push(await stream(agent, target, portOf(target, i)));
  } finally {
    agent.destroy();
  }
  const leads = timings.map((t) => t.endMs - t.ttfbMs);
  const minLeadMs = Math.min(...leads);
  // The upstream spends (SSE_EVENTS - 1) * SSE_GAP_MS after the first event.
  const expectedLead = (SSE_EVENTS - 1) * SSE_GAP_MS;
  // Unbuffered: the first event typically arrives before the upstream sends the second, alone
  // in its read, and in every stream it arrives at least half the upstream's remaining time
  // before the end (slack for a scheduler hiccup on a busy machine). A path that buffers the
  // answer shows a lead of about 0.
  const ttfbMedianMs = median(timings.map((t) => t.ttfbMs));
  const alone = timings.filter((t) => t.firstReadIsFirstEventOnly).length / timings.length;
  const unbuffered = ttfbMedianMs < SSE_GAP_MS && alone >= 0.9 && minLeadMs >= 0.5 * expectedLead;
  return {
    streams: count,
    ttfbMedianMs,
    ttfbMaxMs: Math.max(...timings.map((t) => t.ttfbMs)),
    endMedianMs: median(timings.map((t) => t.endMs)),
    minLeadMs,
    readsMedian: median(timings.map((t) => t.reads)),
    firstEventAlone: alone,
    unbuffered,
  };
}
