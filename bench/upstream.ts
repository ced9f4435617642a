/**
 * The fast upstream: an OpenAI-shaped chat-completions endpoint on 127.0.0.1 that answers at
 * once. It accepts only the real credential, so every path is checked to really swap keys.
 *
 * - `"stream": true` in the body: an SSE answer. Headers and the first event go out at once,
 *   then {@link SSE_EVENTS}-1 more events {@link SSE_GAP_MS} ms apart, then (like OpenAI, only
 *   when `stream_options.include_usage` asks for it) a usage chunk, then `[DONE]`. With
 *   `"bench_events": N` as well: N events as fast as the client reads them (a long answer).
 * - otherwise: a small JSON completion with usage and a content-length.
 *
 * Runs in its own child process (`bench.js upstream`), reports its port over IPC and exits
 * when the bench goes away.
 */
import { readdirSync, readFileSync, rmSync } from 'node:fs';
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';

export const SSE_EVENTS = 6;
export const SSE_GAP_MS = 20;

const COMPLETION = Buffer.from(
  JSON.stringify({
    id: 'chatcmpl-bench',
    object: 'chat.completion',
    created: 1700000000,
    model: 'gpt-4o-mini',
    choices: [{ index: 0, message: { role: 'assistant', content: 'Hello from a fast upstream.' }, finish_reason: 'stop' }],
    usage: { prompt_tokens: 14, completion_tokens: 6, total_tokens: 20 },
  }),
);

/** The SSE event with index `i` (its index is in the payload, so a client can tell them apart). */
export function sseEvent(i: number): string {
  const chunk = {
    id: 'chatcmpl-bench',
    object: 'chat.completion.chunk',
    created: 1700000000,
    model: 'gpt-4o-mini',
    choices: [{ index: 0, delta: { content: ` word${i}` }, finish_reason: null }],
    i,
  };
  return `data: ${JSON.stringify(chunk)}\n\n`;
}

const USAGE_EVENT = `data: ${JSON.stringify({ id: 'chatcmpl-bench', object: 'chat.completion.chunk', created: 1700000000, model: 'gpt-4o-mini', choices: [], usage: { prompt_tokens: 14, completion_tokens: SSE_EVENTS, total_tokens: 14 + SSE_EVENTS } })}\n\n`;

/** A long answer: `events` deltas written as fast as the client takes them, then usage and `[DONE]`. */
function longStream(res: http.ServerResponse, events: number, usage: boolean): void {
  res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
  let i = 0;
  const write = (): void => {
    while (i < events) if (!res.write(sseEvent(i++))) return void res.once('drain', write);
    const report = {
      id: 'chatcmpl-bench',
      object: 'chat.completion.chunk',
      created: 1700000000,
      model: 'gpt-4o-mini',
      choices: [],
      usage: { prompt_tokens: 14, completion_tokens: events, total_tokens: 14 + events },
    };
    res.end(`${usage ? `data: ${JSON.stringify(report)}\n\n` : ''}data: [DONE]\n\n`);
  };
  write();
}

/** What to clean up if the bench dies: `till serve`, the private keychain's daemons, the team ledger's PostgreSQL, folders. */
export interface Orphans {
  pids: number[];
  /** HOME of the private keychain: its dbus-daemon and gnome-keyring-daemon run with it. */
  keyringHome?: string;
  /** The team ledger's postmaster: stopped (immediate shutdown) before its folder, in `dirs`, goes. */
  postmaster?: number;
  dirs: string[];
}

function reap(orphans: Orphans): void {
  const kill = (pid: number) => {
    try {
      process.kill(pid, 'SIGTERM');
    } catch {
      // already gone
    }
  };
  const read = (path: string) => {
    try {
      return readFileSync(path, 'utf8');
    } catch {
      return '';
    }
  };
  for (const pid of orphans.pids) if (read(`/proc/${pid}/cmdline`).includes('till.js')) kill(pid);
  const postmaster = orphans.postmaster;
  if (postmaster !== undefined && read(`/proc/${postmaster}/cmdline`).includes('postgres')) {
    try {
      // Immediate shutdown: the postmaster ends its backends and exits without a checkpoint.
      process.kill(postmaster, 'SIGQUIT');
    } catch {
      // already gone
    }
    // Up to 5 s for it to go, so that it writes nothing into the folder once removed.
    const pause = new Int32Array(new SharedArrayBuffer(4));
    for (let i = 0; i < 100 && read(`/proc/${postmaster}/cmdline`) !== ''; i++) Atomics.wait(pause, 0, 0, 50);
  }
  if (orphans.keyringHome) {
    const mark = `\0HOME=${orphans.keyringHome}\0`;
    for (const name of readdirSync('/proc')) {
      if (/^\d+$/.test(name) && `\0${read(`/proc/${name}/environ`)}`.includes(mark)) kill(Number(name));
    }
  }
  for (const dir of orphans.dirs) rmSync(dir, { recursive: true, force: true });
}

export function runUpstream(): void {
  const expected = `Bearer ${process.env.BENCH_SECRET ?? ''}`;
  const unauthorized = Buffer.from(
    JSON.stringify({ error: { message: 'Incorrect API key provided', type: 'invalid_request_error', code: 'invalid_api_key' } }),
  );
  const server = http.createServer({ keepAliveTimeout: 60_000, noDelay: true }, (req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (req.headers.authorization !== expected || process.env.BENCH_SECRET === undefined) {
        res.writeHead(401, { 'content-type': 'application/json', 'content-length': unauthorized.length });
        res.end(unauthorized);
        return;
      }
      const body = chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks);
      const long = /"bench_events":(\d+)/.exec(body.toString('latin1'));
      if (long && body.includes('"stream":true')) return longStream(res, Number(long[1]), body.includes('"include_usage":true'));
      if (body.includes('"stream":true')) {
        const usage = body.includes('"include_usage":true');
        res.writeHead(200, { 'content-type': 'text/event-stream', 'cache-control': 'no-cache' });
        res.write(sseEvent(0));
        let i = 1;
        const timer = setInterval(() => {
          if (i < SSE_EVENTS) res.write(sseEvent(i++));
          if (i >= SSE_EVENTS) {
            clearInterval(timer);
            res.end(`${usage ? USAGE_EVENT : ''}data: [DONE]\n\n`);
          }
        }, SSE_GAP_MS);
        res.on('close', () => clearInterval(timer));
        return;
      }
      res.writeHead(200, { 'content-type': 'application/json', 'content-length': COMPLETION.length });
      res.end(COMPLETION);
    });
  });
  server.listen(0, '127.0.0.1', () => process.send?.({ port: (server.address() as AddressInfo).port }));
  // The bench tells this process what it started. Should the bench die without cleaning up
  // (kill -9), the IPC channel closes and this process stops and removes those too.
  let orphans: Orphans = { pids: [], dirs: [] };
  process.on('message', (m: { reap?: Orphans }) => {
    if (m.reap) orphans = m.reap;
  });
  process.on('disconnect', () => {
    reap(orphans);
    process.exit(0);
  });
}
