/**
 * One broker per OS user: connections attach to a running broker, and take over from the
 * same ledger when its host goes away, with no key or count lost.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { TillConnection, type TillRole } from '../src/core/runtime/connection';
import type { TillEvent } from '../src/core/events';
import { addCredential, fakeCredential, logFile, spawnServe, tempHome } from './support/till';
import { appendFileSync } from 'node:fs';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';

let up: Upstream;
const secret = fakeCredential('connection');

beforeAll(async () => {
  up = await startOpenAIUpstream({ credential: secret });
});
afterAll(() => up?.close());

function connection(home: string): TillConnection {
  const log = logFile('connection');
  return new TillConnection({
    home,
    port: 0,
    env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` },
    log: (l) => appendFileSync(log, l + '\n'),
    retryMs: 50,
  });
}

async function call(baseUrl: string, key: string): Promise<number> {
  const res = await fetch(`${baseUrl}/chat/completions`, {
    method: 'POST',
    body: '{"model":"gpt-4o-mini","messages":[]}',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
  });
  await res.text();
  return res.status;
}

function waitForRole(c: TillConnection, role: TillRole, ms = 15_000): Promise<number> {
  const started = Date.now();
  return new Promise((resolve, reject) => {
    if (c.role === role) return resolve(0);
    const timer = setTimeout(() => reject(new Error(`still ${c.role} after ${ms} ms`)), ms);
    const off = c.onRole((r) => {
      if (r === role) {
        clearTimeout(timer);
        off();
        resolve(Date.now() - started);
      }
    });
  });
}

describe('one broker per OS user', () => {
  it('a second connection attaches to the first, sees the same keys and its events', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', secret);
    const a = connection(home);
    const b = connection(home);
    try {
      await a.connect();
      await b.connect();
      expect(a.role).toBe('host');
      expect(b.role).toBe('attached');
      expect(b.url).toBe(a.url);
      const seen: TillEvent[] = [];
      b.onEvent((e) => seen.push(e));
      const issued = await b.issue({ target: 'openai', uses: 3, label: 'from b' });
      expect((await a.list()).map((k) => k.label)).toContain('from b');
      expect(await call(issued.baseUrl, issued.key)).toBe(200);
      await expect.poll(() => seen.map((e) => e.type)).toEqual(expect.arrayContaining(['key.issued', 'request.finished']));
      // A view opened later still sees what happened: the host keeps the last requests.
      const recent = await b.recent();
      expect(recent.at(-1)).toMatchObject({ type: 'request.finished', status: 200, request: { keyId: issued.id, model: 'gpt-4o-mini' } });
      expect(await b.revoke(issued.id)).toBe(true);
      expect((await a.list()).find((k) => k.id === issued.id)?.state).toBe('revoked');
    } finally {
      await b.dispose();
      await a.dispose();
    }
  });

  it('takes over when the hosting window closes, from the same ledger, on the same port', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', secret);
    const a = connection(home);
    const b = connection(home);
    try {
      await a.connect();
      await b.connect();
      const issued = await a.issue({ target: 'openai', uses: 5 });
      expect(await call(issued.baseUrl, issued.key)).toBe(200);
      const url = a.url;
      await a.dispose();
      await waitForRole(b, 'host');
      const key = (await b.list()).find((k) => k.id === issued.id)!;
      expect(key.used.activations).toBe(1);
      // The new host keeps the old one's port (chosen by the OS here, port 0), so the URLs that
      // keys, terminals and agents already hold keep working.
      expect(b.url).toBe(url);
      expect(await call(issued.baseUrl, issued.key)).toBe(200);
      expect((await b.list()).find((k) => k.id === issued.id)!.used.activations).toBe(2);
    } finally {
      await b.dispose();
      await a.dispose();
    }
  });

  it('takes over from a `till serve` killed with SIGKILL', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', secret);
    const serve = await spawnServe(home, { env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
    const b = connection(home);
    try {
      await b.connect();
      expect(b.role).toBe('attached');
      const issued = await b.issue({ target: 'openai', uses: 2 });
      expect(await call(issued.baseUrl, issued.key)).toBe(200);
      await serve.stop('SIGKILL');
      await waitForRole(b, 'host');
      const key = (await b.list()).find((k) => k.id === issued.id)!;
      expect(key.used.activations).toBe(1);
      expect(key.remaining.activations).toBe(1);
    } finally {
      await b.dispose();
      await serve.stop();
    }
  });

  it('of several connections racing to take over, exactly one hosts', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', secret);
    const host = connection(home);
    await host.connect();
    const others = [connection(home), connection(home), connection(home)];
    try {
      await Promise.all(others.map((c) => c.connect()));
      await host.dispose();
      await Promise.all(others.map((c) => expect.poll(() => c.role, { timeout: 5000 }).not.toBe('down')));
      await new Promise((r) => setTimeout(r, 300));
      expect(others.filter((c) => c.role === 'host')).toHaveLength(1);
      expect(others.filter((c) => c.role === 'attached')).toHaveLength(2);
      const urls = new Set(others.map((c) => c.url));
      expect(urls.size).toBe(1);
      const issued = await others[0]!.issue({ target: 'openai', uses: 1 });
      for (const c of others) expect((await c.list()).some((k) => k.id === issued.id)).toBe(true);
    } finally {
      await Promise.all(others.map((c) => c.dispose()));
    }
  });
});
