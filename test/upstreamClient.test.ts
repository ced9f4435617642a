/**
 * The two upstream clients (src/core/broker/upstream.ts) behave as one, tried through `till serve`
 * against a raw 127.0.0.1 upstream: answers read whole go through the pooled client, streams
 * through `node:http`. What a client sees must not depend on which one carried its request, nor on
 * whether the broker has the pooled client at all (the extension's, in VS Code's process, does not).
 */
import * as http from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { serveTill, startInProcess, type Broker } from './support/served';
import { addCredential, fakeCredential, tempHome } from './support/till';
import { waitFor } from './support/wait';

const CHAT = JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
const STREAM = JSON.stringify({ model: 'gpt-4o-mini', stream: true, messages: [{ role: 'user', content: 'hi' }] });
const ANSWER = JSON.stringify({
  id: 'chatcmpl-1',
  object: 'chat.completion',
  model: 'gpt-4o-mini',
  choices: [{ index: 0, message: { role: 'assistant', content: 'hello' }, finish_reason: 'stop' }],
  usage: { prompt_tokens: 8, completion_tokens: 1, total_tokens: 9 },
});

/** An OpenAI-shaped upstream whose answer each test picks by the path. */
async function startUpstream(credential: string) {
  const sockets = new Set<Socket>();
  const server = http.createServer((req, res) => {
    if (req.headers.authorization !== `Bearer ${credential}`) return res.writeHead(401).end();
    sockets.add(req.socket);
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      const path = req.url ?? '';
      if (path.includes('/headers/')) {
        res.setHeader('set-cookie', ['a=1', 'b=2']);
        res.setHeader('x-many', ['one', 'two']);
        res.setHeader('content-type', 'application/json');
        return res.end(ANSWER);
      }
      if (path.includes('/dies/')) {
        // Half the answer, then the connection drops.
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(ANSWER) });
        res.write(ANSWER.slice(0, 20));
        return setTimeout(() => req.socket.destroy(), 20);
      }
      if (path.includes('/silent/')) return; // never answers
      if (path.includes('/echo/'))
        return res.writeHead(200, { 'content-type': 'application/json' }).end(JSON.stringify({ ...JSON.parse(ANSWER), got: req.headers }));
      res.writeHead(200, { 'content-type': 'application/json' }).end(ANSWER);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    sockets: () => sockets.size,
    close: () =>
      new Promise<void>((r) => {
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

let credential: string;
let upstream: Awaited<ReturnType<typeof startUpstream>>;
let broker: Broker;
let key: { id: string; key: string };

beforeAll(async () => {
  credential = fakeCredential('openai');
  upstream = await startUpstream(credential);
  const home = tempHome();
  await addCredential(home, 'openai', 'openai', credential);
  broker = await serveTill(home, { env: { TILL_UPSTREAM_OPENAI: `${upstream.url}/v1` } });
  key = await broker.issue({ target: 'openai' });
});
afterAll(async () => {
  await broker.close();
  await upstream.close();
});

/** A raw POST, so the test sees the wire (repeated headers, a broken answer) as a client would. */
function post(path: string, body: string, headers: http.OutgoingHttpHeaders = {}, to = { url: broker.url, key: key.key }) {
  return new Promise<{ status: number; headers: http.IncomingHttpHeaders; text: string }>((resolve, reject) => {
    const url = new URL(`${to.url}/openai/v1${path}`);
    const req = http.request(
      url,
      { method: 'POST', headers: { authorization: `Bearer ${to.key}`, 'content-type': 'application/json', ...headers } },
      (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (c: string) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, text }));
        res.on('error', reject);
        res.on('aborted', () => reject(new Error('the answer broke off')));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

describe('the upstream clients', () => {
  it('relay repeated response headers as node:http gives them', async () => {
    const r = await post('/headers/chat/completions', CHAT);
    expect(r.status).toBe(200);
    expect(r.headers['set-cookie']).toEqual(['a=1', 'b=2']);
    expect(r.headers['x-many']).toBe('one, two');
    expect(JSON.parse(r.text)).toMatchObject({ usage: { total_tokens: 9 } });
  });

  it('forward a request sent with Expect: 100-continue (curl does for bodies over 1 KB)', async () => {
    const big = JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'x'.repeat(4000) }] });
    const r = await post('/echo/chat/completions', big, { expect: '100-continue' });
    expect(r.status).toBe(200);
    const got = (JSON.parse(r.text) as { got: Record<string, string> }).got;
    // The credential reached the upstream (masked in the echo: it is never relayed back).
    expect(got.authorization).toBe(`Bearer ${'*'.repeat(credential.length)}`);
    expect(got.expect).toBeUndefined();
  });

  it('reuse their connections: 50 requests one after another open few', async () => {
    const before = upstream.sockets();
    for (let i = 0; i < 25; i++) {
      expect((await post('/chat/completions', CHAT)).status).toBe(200);
      expect((await post('/chat/completions', STREAM)).status).toBe(200);
    }
    expect(upstream.sockets() - before).toBeLessThanOrEqual(4);
  });

  it('break the answer off for the client when the upstream dies mid-answer, and settle the request', async () => {
    await expect(post('/dies/chat/completions', CHAT)).rejects.toThrow();
    await waitFor('the request to settle', async () => (await broker.key(key.id)).inFlight === 0);
    const ended = broker.events().filter((e) => e.type === 'request.finished' && e.request.path.includes('/dies/'));
    expect(ended).toHaveLength(1);
    expect(ended[0]).toMatchObject({ aborted: 'upstream_error' });
    // The broker still serves.
    expect((await post('/chat/completions', CHAT)).status).toBe(200);
  });
});

describe('an upstream that never answers', () => {
  it('fails after the idle timeout with the same 502 whichever client carries the request', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', credential);
    const inProcess = await startInProcess({
      home,
      broker: { upstreamIdleTimeoutMs: 300, pooledUpstream: true },
      env: { ...process.env, TILL_UPSTREAM_OPENAI: `${upstream.url}/v1` },
    });
    try {
      const k = await inProcess.issue({ target: 'openai' });
      for (const body of [CHAT, STREAM]) {
        const res = await fetch(`${inProcess.url}/openai/v1/silent/chat/completions`, {
          method: 'POST',
          headers: { authorization: `Bearer ${k.key}`, 'content-type': 'application/json' },
          body,
        });
        expect(res.status).toBe(502);
        expect(await res.text()).toMatch(/the upstream sent nothing for 0\.3 s/);
      }
    } finally {
      await inProcess.close();
    }
  });
});

describe("the extension's broker, on node:http alone", () => {
  it('answers a client as till serve does: repeated headers, Expect: 100-continue, a broken answer', async () => {
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', credential);
    // As the extension starts it: no pooledUpstream.
    const inProcess = await startInProcess({ home, env: { ...process.env, TILL_UPSTREAM_OPENAI: `${upstream.url}/v1` } });
    try {
      const to = { url: inProcess.url, key: (await inProcess.issue({ target: 'openai' })).key };
      const repeated = await post('/headers/chat/completions', CHAT, {}, to);
      expect(repeated.status).toBe(200);
      expect(repeated.headers['set-cookie']).toEqual(['a=1', 'b=2']);
      expect(repeated.headers['x-many']).toBe('one, two');
      expect(JSON.parse(repeated.text)).toMatchObject({ usage: { total_tokens: 9 } });
      const big = JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'x'.repeat(4000) }] });
      const echoed = await post('/echo/chat/completions', big, { expect: '100-continue' }, to);
      expect(echoed.status).toBe(200);
      const got = (JSON.parse(echoed.text) as { got: Record<string, string> }).got;
      expect(got.authorization).toBe(`Bearer ${'*'.repeat(credential.length)}`);
      await expect(post('/dies/chat/completions', CHAT, {}, to)).rejects.toThrow();
      expect((await post('/chat/completions', CHAT, {}, to)).status).toBe(200);
    } finally {
      await inProcess.close();
    }
  });
});
