/**
 * Path scopes mean what they say: a request cannot reach a route outside its key's path scope
 * by dot segments, percent-encoded dots or slashes, or backslashes.
 */
import { request } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TillService } from '../src/core/runtime/service';
import { addCredential, fakeCredential, startTill, tempHome } from './support/till';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';

let till: TillService;
let up: Upstream;

beforeAll(async () => {
  const secret = fakeCredential('paths');
  up = await startOpenAIUpstream({ credential: secret });
  const home = tempHome();
  await addCredential(home, 'openai', 'openai', secret);
  till = await startTill({ home, env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
});

afterAll(async () => {
  await till?.close();
  await up?.close();
});

/** Sends a raw path, unnormalised (fetch and URL would clean it up first). */
function rawGet(path: string, key: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const u = new URL(till.url);
    const req = request({ host: u.hostname, port: u.port, path, headers: { authorization: `Bearer ${key}` } }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    req.end();
  });
}

describe('path scope', () => {
  // Attack: escaping a path scope with dot segments or encodings that the upstream resolves.
  it.each([
    '/openai/v1/chat/../models',
    '/openai/v1/chat/%2e%2e/models',
    '/openai/v1/chat/.%2E/models',
    '/openai/v1/chat/%2F..%2Fmodels',
    '/openai/v1/chat/..%5cmodels',
    '/openai/v1/chat/./../models',
  ])('refuses %s with 400 and forwards nothing', async (path) => {
    const issued = await till.issue({ target: 'openai', paths: ['/v1/chat/*'] });
    const before = up.received.length;
    expect(await rawGet(path, issued.key)).toBe(400);
    expect(up.received.length).toBe(before);
  });

  it('still serves paths with dots in names (Gemini-style models, versions)', async () => {
    const issued = await till.issue({ target: 'openai' });
    await rawGet('/openai/v1/models/gpt-4.1-mini', issued.key);
    expect(up.received.at(-1)?.path).toBe('/v1/models/gpt-4.1-mini');
  });
});
