/**
 * Limits hold under concurrency and across crashes: exactly N requests of a key with N
 * activations reach the upstream however many arrive at once, and `kill -9` of the broker
 * never lets a key serve more than its limit, never forgets an acknowledged request, and never
 * forgets an acknowledged revocation.
 */
import * as http from 'node:http';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterEach, describe, expect, it } from 'vitest';
import type { KeySummary } from '../src/core/events';
import type { IssuedKey } from '../src/core/runtime/controlApi';
import { addCredential, fakeCredential, runTill, spawnServe, startTill, tempHome, type ServeProcess } from './support/till';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';
import { waitFor } from './support/wait';

/** What one request through the broker came to. */
interface Outcome {
  /** HTTP status, or 0 when no response head arrived. */
  status: number;
  body: string;
  /** The whole response arrived (not cut by a dying broker). */
  complete: boolean;
  denial?: string;
  error?: string;
}

const REQUEST_TIMEOUT_MS = 20_000;

/**
 * POSTs a chat completion with a till key. Never rejects: a refused connection or a response
 * cut short is an outcome too. `tag` goes into the prompt so the upstream's log can be split by key.
 */
function chat(
  baseUrl: string,
  key: string,
  tag: string,
  options: { agent?: http.Agent; stream?: boolean; onFirstByte?: () => void } = {},
): Promise<Outcome> {
  const body = JSON.stringify({
    model: 'gpt-4o-mini',
    messages: [{ role: 'user', content: tag }],
    ...(options.stream ? { stream: true } : {}),
  });
  const url = new URL(`${baseUrl}/openai/v1/chat/completions`);
  return new Promise((resolve) => {
    let settled = false;
    const done = (o: Outcome) => {
      if (settled) return;
      settled = true;
      clearTimeout(timer);
      resolve(o);
    };
    const req = http.request({
      host: '127.0.0.1',
      port: url.port,
      path: url.pathname,
      method: 'POST',
      agent: options.agent ?? false,
      headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
    });
    const timer = setTimeout(() => {
      req.destroy(new Error('client timeout'));
    }, REQUEST_TIMEOUT_MS);
    req.on('response', (res) => {
      let text = '';
      let first = true;
      res.setEncoding('utf8');
      res.on('data', (c: string) => {
        text += c;
        if (first) {
          first = false;
          options.onFirstByte?.();
        }
      });
      res.on('end', () =>
        done({
          status: res.statusCode ?? 0,
          body: text,
          complete: res.complete,
          denial: res.headers['x-till-denial'] as string | undefined,
        }),
      );
      res.on('error', (err) => done({ status: res.statusCode ?? 0, body: text, complete: false, error: err.message }));
      res.on('aborted', () => done({ status: res.statusCode ?? 0, body: text, complete: false, error: 'aborted' }));
      res.on('close', () =>
        done({ status: res.statusCode ?? 0, body: text, complete: res.complete, error: res.complete ? undefined : 'closed' }),
      );
    });
    req.on('error', (err) => done({ status: 0, body: '', complete: false, error: err.message }));
    req.end(body);
  });
}

/** The upstream's requests that carry `tag`: what one key got through. */
function reached(up: Upstream, tag: string): number {
  return up.received.filter((r) => r.body.includes(tag)).length;
}

/** The OpenAI-shaped error message of a denial. */
function errorMessage(o: Outcome): string {
  return (JSON.parse(o.body) as { error: { message: string } }).error.message;
}

const EXHAUSTED = /^till: till key exhausted: (\d+) of (\d+) activations used(?: \((\d+) more in flight\))?$/;

/** Checks an exhaustion denial and returns used + held at the moment of refusal. */
function exhaustedAt(o: Outcome, limit: number): number {
  expect(o.status).toBe(429);
  expect(o.denial).toBe('exhausted');
  const m = EXHAUSTED.exec(errorMessage(o));
  expect(m, errorMessage(o)).not.toBeNull();
  expect(Number(m![2])).toBe(limit);
  return Number(m![1]) + Number(m![3] ?? 0);
}

async function listKeys(home: string): Promise<KeySummary[]> {
  const r = await runTill(['ls', '--json'], { home });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as KeySummary[];
}

async function keyFromCli(home: string, id: string): Promise<KeySummary> {
  const key = (await listKeys(home)).find((k) => k.id === id);
  if (!key) throw new Error(`till ls has no key ${id}`);
  return key;
}

async function issueFromCli(home: string, args: string[]): Promise<IssuedKey> {
  const r = await runTill(['issue', 'openai', ...args, '--json'], { home });
  expect(r.code, r.stderr).toBe(0);
  return JSON.parse(r.stdout) as IssuedKey;
}

async function until(what: string, check: () => boolean, timeoutMs = 15_000): Promise<void> {
  await waitFor(what, check, { timeoutMs, everyMs: 5 });
}

function count<T>(items: T[], pred: (t: T) => boolean): number {
  return items.reduce((n, t) => n + (pred(t) ? 1 : 0), 0);
}

/** Sends requests from `workers` loops until each has been refused once; returns every outcome. */
async function drain(baseUrl: string, key: string, tag: string, workers = 8, max = 2_000): Promise<Outcome[]> {
  const all: Outcome[] = [];
  const agent = new http.Agent({ keepAlive: true, maxSockets: workers });
  try {
    await Promise.all(
      Array.from({ length: workers }, async () => {
        for (;;) {
          if (all.length > max) throw new Error(`no refusal after ${max} requests`);
          const o = await chat(baseUrl, key, tag, { agent });
          all.push(o);
          if (o.status !== 200) return;
        }
      }),
    );
  } finally {
    agent.destroy();
  }
  return all;
}

const cleanups: (() => Promise<unknown> | void)[] = [];
afterEach(async () => {
  while (cleanups.length > 0) await cleanups.pop()!();
});

/**
 * A fake OpenAI accepting a fresh credential, a data folder holding that credential, and the
 * env that points Till at the fake; the upstream closes after the test.
 */
async function openAiHome(label: string, upstream: { streamDelayMs?: number; streamChunks?: number } = {}) {
  const credential = fakeCredential(label);
  const up = await startOpenAIUpstream({ credential, ...upstream });
  cleanups.push(() => up.close());
  const home = tempHome();
  await addCredential(home, 'openai', 'openai', credential);
  return { up, home, env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } };
}

describe('exactness under concurrency', () => {
  async function setup() {
    const { up, home, env } = await openAiHome('durability');
    const service = await startTill({ home, env });
    cleanups.push(() => service.close());
    return { up, home, service };
  }

  /** Fires `n` requests at once over a keep-alive pool of 200 sockets. */
  async function burst(url: string, key: string, tag: string, n: number): Promise<{ outcomes: Outcome[]; ms: number }> {
    const agent = new http.Agent({ keepAlive: true, maxSockets: 200 });
    try {
      const t0 = performance.now();
      const outcomes = await Promise.all(Array.from({ length: n }, () => chat(url, key, tag, { agent })));
      return { outcomes, ms: Math.round(performance.now() - t0) };
    } finally {
      agent.destroy();
    }
  }

  it('lets exactly 100 of 1,000 parallel requests through on a key with 100 activations', async () => {
    const { up, home, service } = await setup();
    const issued = await service.issue({ target: 'openai', uses: 100 });
    const tag = `burst-${issued.id}`;

    const { outcomes, ms } = await burst(service.url, issued.key, tag, 1_000);
    console.info(`1,000 parallel requests, 100 activations: ${ms} ms`);

    const ok = outcomes.filter((o) => o.status === 200);
    const refused = outcomes.filter((o) => o.status === 429);
    expect(outcomes.filter((o) => o.status !== 200 && o.status !== 429).map((o) => `${o.status} ${o.error ?? o.body}`)).toEqual([]);
    expect(ok).toHaveLength(100);
    expect(refused).toHaveLength(900);
    for (const o of ok) expect(o.complete).toBe(true);
    // Each refusal saw the whole limit spent or held: never fewer (a hole), never more (an overrun).
    for (const o of refused) expect(exhaustedAt(o, 100)).toBe(100);
    expect(reached(up, tag)).toBe(100);
    expect(up.received).toHaveLength(100);

    const summary = service.keys.list().find((k) => k.id === issued.id)!;
    expect(summary).toMatchObject({ state: 'exhausted', used: { activations: 100 }, remaining: { activations: 0 }, inFlight: 0 });
    expect(summary.reserved.activations ?? 0).toBe(0);
    const fromCli = await keyFromCli(home, issued.id);
    expect(fromCli).toMatchObject({ state: 'exhausted', used: { activations: 100 }, remaining: { activations: 0 }, inFlight: 0 });

    // Once all is settled, the message is the plain one.
    const after = await chat(service.url, issued.key, tag);
    expect(errorMessage(after)).toBe('till: till key exhausted: 100 of 100 activations used');
    expect(reached(up, tag)).toBe(100);
  });

  it('lets exactly the 100 left through on a key with 150 of 250 already used', async () => {
    const { up, home, service } = await setup();
    const issued = await service.issue({ target: 'openai', uses: 250 });
    const tag = `partial-${issued.id}`;

    // Spend 150 first, 50 at a time.
    for (let i = 0; i < 3; i++) {
      const { outcomes } = await burst(service.url, issued.key, tag, 50);
      expect(outcomes.every((o) => o.status === 200)).toBe(true);
    }
    expect(service.keys.list().find((k) => k.id === issued.id)?.used.activations).toBe(150);
    expect(reached(up, tag)).toBe(150);

    const { outcomes, ms } = await burst(service.url, issued.key, tag, 1_000);
    console.info(`1,000 parallel requests, 100 of 250 activations left: ${ms} ms`);
    expect(outcomes.filter((o) => o.status !== 200 && o.status !== 429).map((o) => `${o.status} ${o.error ?? o.body}`)).toEqual([]);
    expect(count(outcomes, (o) => o.status === 200)).toBe(100);
    const refused = outcomes.filter((o) => o.status === 429);
    expect(refused).toHaveLength(900);
    for (const o of refused) expect(exhaustedAt(o, 250)).toBe(250);
    expect(reached(up, tag)).toBe(250);

    const fromCli = await keyFromCli(home, issued.id);
    expect(fromCli).toMatchObject({ state: 'exhausted', used: { activations: 250 }, remaining: { activations: 0 }, inFlight: 0 });
  });
});

describe('kill -9', () => {
  async function setup(upstream: { streamDelayMs?: number; streamChunks?: number } = {}) {
    const { up, home, env } = await openAiHome('killed', upstream);
    const serves: ServeProcess[] = [];
    cleanups.push(async () => {
      for (const s of serves) await s.stop('SIGKILL');
    });
    const serve = async (port = 0) => {
      const s = await spawnServe(home, { env, port });
      serves.push(s);
      return s;
    };
    return { up, home, serve };
  }

  it('never serves more than the limit and never forgets an acknowledged request', async () => {
    const N = 300;
    const WORKERS = 40;
    const { up, home, serve } = await setup({ streamDelayMs: 5, streamChunks: 5 });
    const first = await serve();
    const port = Number(new URL(first.url).port);
    const issued = await issueFromCli(home, ['--uses', String(N)]);
    const tag = `kill-${issued.id}`;

    // Load: WORKERS loops of requests, every other one streamed, until the broker dies.
    const before: Outcome[] = [];
    let killed = false;
    const agent = new http.Agent({ keepAlive: true, maxSockets: WORKERS });
    let n = 0;
    const load = Promise.all(
      Array.from({ length: WORKERS }, async () => {
        while (!killed) {
          const o = await chat(first.url, issued.key, tag, { agent, stream: n++ % 2 === 0 });
          before.push(o);
        }
      }),
    );
    await until('half the activations to reach the upstream', () => reached(up, tag) >= N / 2);
    first.child.kill('SIGKILL');
    killed = true;
    await load;
    await first.stop();
    agent.destroy();
    expect(first.child.signalCode).toBe('SIGKILL');

    const okBefore = count(before, (o) => o.status === 200);
    const ackedBefore = count(before, (o) => o.status === 200 && o.complete);
    const cut = count(before, (o) => !o.complete);
    // A refusal before the kill would mean the limit was reached early: it was not.
    expect(before.filter((o) => o.status !== 200 && o.status !== 0).map((o) => `${o.status} ${o.body}`)).toEqual([]);
    expect(cut).toBeGreaterThan(0); // the kill really landed mid-load
    // Let the upstream notice anything the dead broker had sent it.
    await sleep(100);
    const reachedBefore = reached(up, tag);
    expect(reachedBefore).toBeGreaterThanOrEqual(N / 2);
    expect(reachedBefore).toBeLessThanOrEqual(N);

    // Restart on the same port: clients keep their base URL.
    const second = await serve(port);
    expect(second.url).toBe(first.url);
    const afterRestart = await keyFromCli(home, issued.id);
    const used = afterRestart.used.activations ?? 0;
    console.info(
      `kill -9 at ${reachedBefore} upstream calls: ${ackedBefore} acknowledged, ${okBefore} with a 200 head, ${cut} cut, ${used} counted after restart`,
    );
    // Every request that got a 200 (whole or cut short) and every one the upstream saw is counted.
    expect(used).toBeGreaterThanOrEqual(ackedBefore);
    expect(used).toBeGreaterThanOrEqual(okBefore);
    expect(used).toBeGreaterThanOrEqual(reachedBefore);
    // What is lost is at most what was in flight at the kill.
    expect(used - reachedBefore).toBeLessThanOrEqual(WORKERS);
    expect(used).toBeLessThanOrEqual(N);
    expect(afterRestart.reserved.activations ?? 0).toBe(0);
    expect(afterRestart.state).toBe(used === N ? 'exhausted' : 'active');

    // Keep sending until refused: exactly what is left goes through, and not one more.
    const after = await drain(second.url, issued.key, tag);
    const okAfter = count(after, (o) => o.status === 200);
    expect(after.filter((o) => o.status !== 200 && o.status !== 429).map((o) => `${o.status} ${o.error ?? o.body}`)).toEqual([]);
    for (const o of after.filter((x) => x.status === 429)) exhaustedAt(o, N);
    expect(okAfter).toBe(N - used);
    expect(reached(up, tag)).toBe(reachedBefore + okAfter);
    expect(reached(up, tag)).toBeLessThanOrEqual(N);
    const final = await keyFromCli(home, issued.id);
    expect(final).toMatchObject({ state: 'exhausted', used: { activations: N }, remaining: { activations: 0 } });
    const refused = await chat(second.url, issued.key, tag);
    expect(errorMessage(refused)).toBe(`till: till key exhausted: ${N} of ${N} activations used`);
    expect(reached(up, tag)).toBeLessThanOrEqual(N);
  }, 90_000);

  it('keeps a revocation acknowledged just before the kill', async () => {
    const { up, home, serve } = await setup();
    const first = await serve();
    const issued = await issueFromCli(home, ['--uses', '10']);
    const keep = await issueFromCli(home, ['--uses', '10', '--label', 'kept']);
    const tag = `revoke-${issued.id}`;
    expect((await chat(first.url, issued.key, tag)).status).toBe(200);
    expect((await chat(first.url, keep.key, `keep-${keep.id}`)).status).toBe(200);

    const r = await runTill(['revoke', issued.id], { home });
    expect(r.code, r.stderr).toBe(0);
    expect(r.stdout.trim()).toBe(`revoked ${issued.id}`);
    // The CLI has its answer: the revocation is acknowledged. Kill at once.
    await first.stop('SIGKILL');

    const second = await serve();
    const refused = await chat(second.url, issued.key, tag);
    expect(refused.status).toBe(401);
    expect(refused.denial).toBe('revoked');
    expect(errorMessage(refused)).toMatch(/was revoked/);
    expect(reached(up, tag)).toBe(1);
    const keys = await listKeys(home);
    expect(keys.find((k) => k.id === issued.id)).toMatchObject({ state: 'revoked', used: { activations: 1 } });
    expect(keys.find((k) => k.id === issued.id)?.revokedAt).toEqual(expect.any(Number));
    // The other key was not touched.
    expect(keys.find((k) => k.id === keep.id)).toMatchObject({ state: 'active', used: { activations: 1 } });
    expect((await chat(second.url, keep.key, `keep-${keep.id}`)).status).toBe(200);
  }, 60_000);

  it('counts a streaming request that was in flight at the kill', async () => {
    // 100 chunks, 100 ms apart: the stream is still running when the broker dies.
    const { up, home, serve } = await setup({ streamDelayMs: 100, streamChunks: 100 });
    const first = await serve();
    const issued = await issueFromCli(home, ['--uses', '5']);
    const tag = `stream-${issued.id}`;

    let firstByte!: () => void;
    const gotFirstByte = new Promise<void>((r) => (firstByte = r));
    const streaming = chat(first.url, issued.key, tag, { stream: true, onFirstByte: () => firstByte() });
    await gotFirstByte;
    expect(up.inFlight()).toBe(1);
    await first.stop('SIGKILL');
    const cut = await streaming;
    expect(cut.status).toBe(200);
    expect(cut.complete).toBe(false);
    expect(cut.body).not.toContain('[DONE]');
    await until('the upstream to see the stream cut', () => up.abortedStreams() === 1);

    const second = await serve();
    const after = await keyFromCli(home, issued.id);
    expect(after).toMatchObject({ state: 'active', used: { activations: 1 }, remaining: { activations: 4 } });
    expect(after.reserved.activations ?? 0).toBe(0);
    // Exactly the 4 left go through.
    const rest = await drain(second.url, issued.key, tag, 3);
    expect(count(rest, (o) => o.status === 200)).toBe(4);
    expect(reached(up, tag)).toBe(5);
    expect(errorMessage(await chat(second.url, issued.key, tag))).toBe('till: till key exhausted: 5 of 5 activations used');
  }, 60_000);
});

describe('restart after a graceful stop', () => {
  it('keeps keys, counts and revocations across till serve stopped with SIGTERM', async () => {
    const { up, home, env } = await openAiHome('graceful');

    const first = await spawnServe(home, { env });
    cleanups.push(() => first.stop('SIGKILL'));
    const a = await issueFromCli(home, ['--uses', '10', '--label', 'agent a']);
    const b = await issueFromCli(home, ['--uses', '10', '--label', 'agent b']);
    const c = await issueFromCli(home, ['--label', 'unlimited']);
    for (let i = 0; i < 3; i++) expect((await chat(first.url, a.key, `a-${a.id}`, { stream: i === 0 })).status).toBe(200);
    for (let i = 0; i < 7; i++) expect((await chat(first.url, c.key, `c-${c.id}`)).status).toBe(200);
    expect((await runTill(['revoke', b.id], { home })).code).toBe(0);
    const beforeStop = await listKeys(home);

    await first.stop('SIGTERM');
    expect(first.child.exitCode).toBe(0);
    // Stopped cleanly: the control channel is gone, so the CLI says no broker runs.
    const down = await runTill(['ls'], { home });
    expect(down.code).toBe(1);
    expect(down.stderr).toMatch(/no Till broker is running/);

    const second = await spawnServe(home, { env });
    cleanups.push(() => second.stop('SIGKILL'));
    const afterRestart = await listKeys(home);
    const strip = (ks: KeySummary[]) =>
      ks.map(({ id, label, state, used, remaining, policy, createdAt, revokedAt }) => ({
        id,
        label,
        state,
        used,
        remaining,
        policy,
        createdAt,
        revokedAt,
      }));
    expect(strip(afterRestart)).toEqual(strip(beforeStop));
    expect(afterRestart.find((k) => k.id === a.id)).toMatchObject({
      state: 'active',
      used: { activations: 3 },
      remaining: { activations: 7 },
    });
    expect(afterRestart.find((k) => k.id === b.id)).toMatchObject({ state: 'revoked' });
    expect(afterRestart.find((k) => k.id === c.id)).toMatchObject({ state: 'active', used: { activations: 7 } });

    // The keys still work, on the new broker's port, with their counts carried over.
    const rest = await drain(second.url, a.key, `a-${a.id}`, 4);
    expect(count(rest, (o) => o.status === 200)).toBe(7);
    expect(reached(up, `a-${a.id}`)).toBe(10);
    expect((await chat(second.url, b.key, `b-${b.id}`)).denial).toBe('revoked');
    expect(reached(up, `b-${b.id}`)).toBe(0);
    expect((await chat(second.url, c.key, `c-${c.id}`)).status).toBe(200);
    expect((await keyFromCli(home, c.id)).used.activations).toBe(8);
  }, 60_000);

  it('keeps keys and counts across an in-process service closed and started again', async () => {
    const { up, home, env } = await openAiHome('inproc');

    const first = await startTill({ home, env });
    const issued = await first.issue({ target: 'openai', uses: 20 });
    const tag = `inproc-${issued.id}`;
    const agent = new http.Agent({ keepAlive: true, maxSockets: 5 });
    const outcomes = await Promise.all(Array.from({ length: 12 }, () => chat(first.url, issued.key, tag, { agent })));
    agent.destroy();
    expect(outcomes.every((o) => o.status === 200)).toBe(true);
    await first.close();

    const second = await startTill({ home, env });
    cleanups.push(() => second.close());
    expect(second.keys.list().find((k) => k.id === issued.id)).toMatchObject({
      state: 'active',
      used: { activations: 12 },
      remaining: { activations: 8 },
    });
    const rest = await drain(second.url, issued.key, tag, 4);
    expect(count(rest, (o) => o.status === 200)).toBe(8);
    expect(reached(up, tag)).toBe(20);
  });
});

describe('revocation of a request still arriving', () => {
  it('stops a request whose body was still arriving when the revocation was acknowledged', async () => {
    // Attack: a leaked key's holder starts a request, the user revokes the key, the holder
    // then finishes sending; the key was checked at the headers, before the revocation.
    const { up, home, env } = await openAiHome('slowbody');
    const service = await startTill({ home, env });
    cleanups.push(() => service.close());
    const issued = await service.issue({ target: 'openai', uses: 10 });
    const tag = `slow-${issued.id}`;
    expect((await chat(service.url, issued.key, tag)).status).toBe(200);

    const body = JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: tag }] });
    const port = new URL(service.url).port;
    let send!: () => void;
    const result = new Promise<Outcome>((resolve, reject) => {
      const req = http.request(
        {
          host: '127.0.0.1',
          port,
          path: '/openai/v1/chat/completions',
          method: 'POST',
          agent: false,
          headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) },
        },
        (res) => {
          let text = '';
          res.setEncoding('utf8');
          res.on('data', (c: string) => (text += c));
          res.on('end', () =>
            resolve({
              status: res.statusCode ?? 0,
              body: text,
              complete: true,
              denial: res.headers['x-till-denial'] as string | undefined,
            }),
          );
        },
      );
      req.on('error', reject);
      req.setTimeout(REQUEST_TIMEOUT_MS, () => req.destroy(new Error('client timeout')));
      req.write(body.slice(0, 10));
      send = () => req.end(body.slice(10));
    });
    // Give the broker time to parse the headers and authenticate the key before the revocation.
    await sleep(150);
    const r = await runTill(['revoke', issued.id], { home });
    expect(r.stdout.trim()).toBe(`revoked ${issued.id}`);
    send();
    const o = await result;
    expect(o.status).toBe(401);
    expect(o.denial).toBe('revoked');
    expect(reached(up, tag)).toBe(1);
    expect(service.keys.list().find((k) => k.id === issued.id)).toMatchObject({ state: 'revoked', used: { activations: 1 } });
  });
});
