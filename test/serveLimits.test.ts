/**
 * The limits `till serve` keeps with no settings at all: what a user gets by running it. Tried
 * as an attacker would, against the built command. Each test starts with a comment naming the
 * attack.
 */
import * as http from 'node:http';
import * as net from 'node:net';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { DEFAULT_PORT } from '../src/core/broker/server';
import { serveTill, type Broker } from './support/served';
import { addCredential, fakeCredential, tempHome } from './support/till';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';
import { waitFor } from './support/wait';

const MIB = 1024 * 1024;

let credential: string;
let openai: Upstream;
let home: string;
let broker: Broker;

beforeAll(async () => {
  credential = fakeCredential('openai');
  openai = await startOpenAIUpstream({ credential, websocket: true, streamChunks: 40, streamDelayMs: 100 });
  home = tempHome();
  await addCredential(home, 'openai', 'openai', credential);
  // No --port, no config.json: every limit is the default.
  broker = await serveTill(home, { port: 'default', env: { TILL_UPSTREAM_OPENAI: `${openai.url}/v1` } });
});
afterAll(async () => {
  await broker.close();
  await openai.close();
});

/** Posts `writeBody`'s bytes to the broker and resolves with its answer (the rest of the body may be cut). */
function postStreaming(
  path: string,
  headers: Record<string, string>,
  writeBody: (req: http.ClientRequest, answered: () => boolean) => void,
): Promise<{ status: number; text: string }> {
  const u = new URL(broker.url);
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = http.request({ host: u.hostname, port: u.port, method: 'POST', path, headers, agent: false }, (res) => {
      answered = true;
      let text = '';
      res.on('data', (c: Buffer) => (text += c));
      res.on('end', () => {
        req.destroy();
        resolve({ status: res.statusCode ?? 0, text });
      });
    });
    req.on('error', (err) => {
      if (!answered) reject(err);
    });
    writeBody(req, () => answered);
  });
}

describe('till serve with no settings', () => {
  it('listens on the default port 8455, so base URLs handed out survive a restart', async () => {
    // Attack: none; a default lost in wiring (undefined over 8455) made `till serve` pick a random
    // port, and every base URL handed out before a restart stopped working.
    expect(broker.url).toBe(`http://127.0.0.1:${DEFAULT_PORT}`);
    const k = await broker.issue({ target: 'openai', uses: 1 });
    expect(k.baseUrl).toBe(`http://127.0.0.1:${DEFAULT_PORT}/openai/v1`);
  });

  it('answers 413 to a declared body over 32 MiB before anything is sent upstream', async () => {
    // Attack: the 32 MiB default replaced by `undefined` (no limit): a 34 MiB JSON body was
    // buffered whole and forwarded.
    const k = await broker.issue({ target: 'openai', uses: 1 });
    const before = openai.received.length + openai.rejected.length;
    const r = await postStreaming(
      '/openai/v1/chat/completions',
      { 'content-type': 'application/json', authorization: `Bearer ${k.key}`, 'content-length': String(34 * MIB) },
      (req) => req.write('{"model":"gpt-4o-mini","messages":['),
    );
    expect(r.status).toBe(413);
    expect(r.text).toMatch(/request body of 35651584 bytes is over the broker's limit of 33554432/);
    expect(openai.received.length + openai.rejected.length).toBe(before);
    expect((await broker.key(k.id)).used.activations).toBe(0);
  });

  it('answers 413 to a chunked upload crossing 32 MiB and aborts the upstream request unbilled', async () => {
    // Attack: an upload of undeclared length streams on to the upstream past any limit.
    const k = await broker.issue({ target: 'openai', uses: 1 });
    const before = openai.received.length;
    const chunk = Buffer.alloc(512 * 1024, 0x61);
    let sent = 0;
    const r = await postStreaming(
      '/openai/v1/audio/transcriptions',
      { 'content-type': 'application/octet-stream', authorization: `Bearer ${k.key}`, 'transfer-encoding': 'chunked' },
      (req, answered) => {
        const pump = () => {
          if (answered() || req.destroyed || sent > 40 * MIB) return;
          sent += chunk.length;
          req.write(chunk, () => setTimeout(pump, 2));
        };
        pump();
      },
    );
    expect(r.status).toBe(413);
    expect(r.text).toMatch(/over the broker's limit of 33554432 bytes/);
    expect(sent).toBeLessThan(40 * MIB);
    await waitFor('the upstream to drop the cut upload', () => openai.inFlight() === 0);
    expect(openai.received.length).toBe(before);
    const s = await broker.key(k.id);
    expect(s.used.activations).toBe(0);
    expect(s.remaining.activations).toBe(1);
  });

  it('closes a WebSocket whose frame claims 1 GiB, at once and without reading it', async () => {
    // Attack: WebSocket maxPayload became unlimited with the lost default: a frame claiming 1 GiB
    // was read into memory.
    const k = await broker.issue({ target: 'openai' });
    const ws = new WebSocket(`${broker.url.replace('http', 'ws')}/openai/v1/responses`, { headers: { authorization: `Bearer ${k.key}` } });
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    const before = openai.socketMessages.length;
    const closed = new Promise<number>((r) => ws.once('close', (code) => r(code)));
    ws.on('error', () => undefined);
    // A masked binary frame whose 64-bit length says 1 GiB, and nothing after it.
    const socket = (ws as unknown as { _socket: net.Socket })._socket;
    socket.write(Buffer.from([0x82, 0xff, 0, 0, 0, 0, 0x40, 0, 0, 0, 1, 2, 3, 4]));
    const started = Date.now();
    expect([1009, 1006]).toContain(await closed);
    expect(Date.now() - started).toBeLessThan(2000);
    expect(openai.socketMessages.length).toBe(before);
  });

  it('ends an HTTP stream already running when its key expires', async () => {
    // Attack: an expired key whose stream keeps going (and billing): expiry ended WebSockets but
    // not HTTP streams in flight.
    const k = await broker.issue({ target: 'openai', ttl: '1s' });
    const client = new OpenAI({ apiKey: k.key, baseURL: k.baseUrl, maxRetries: 0 });
    const started = Date.now();
    const stream = await client.chat.completions.create({
      model: 'gpt-4o-mini',
      stream: true,
      messages: [{ role: 'user', content: 'a long answer' }],
    });
    let chunks = 0;
    const failure = await (async () => {
      try {
        for await (const _ of stream) chunks++;
      } catch (err) {
        return err as Error;
      }
      return undefined;
    })();
    const took = Date.now() - started;
    expect(failure?.message).toMatch(/till: till key ".*" expired at/);
    expect(took).toBeGreaterThanOrEqual(900);
    // The whole answer takes 4 s: it was cut at the expiry, not left to finish.
    expect(took).toBeLessThan(2500);
    expect(chunks).toBeLessThan(40);
    await waitFor('the upstream stream to be aborted', () => openai.inFlight() === 0);
  });
});

describe('connections', () => {
  it('keeps serving real requests while 2,000 idle connections are open under a 1,024-descriptor limit', async () => {
    // Attack: a local process opens 2,000 connections and sends nothing; the broker ran out of
    // descriptors and could serve no one.
    const limited = await serveTill(tempHome(), { fileLimit: 1024, env: { TILL_UPSTREAM_OPENAI: `${openai.url}/v1` } });
    const sockets: net.Socket[] = [];
    try {
      await addCredential(limited.home, 'openai', 'openai', credential);
      const k = await limited.issue({ target: 'openai' });
      const port = Number(new URL(limited.url).port);
      for (let batch = 0; batch < 20; batch++) {
        await Promise.all(
          Array.from({ length: 100 }, () => {
            const s = net.connect(port, '127.0.0.1');
            s.on('error', () => undefined);
            sockets.push(s);
            return new Promise<void>((r) => {
              s.once('connect', () => r());
              s.once('close', () => r());
            });
          }),
        );
      }
      const client = new OpenAI({ apiKey: k.key, baseURL: k.baseUrl, maxRetries: 0 });
      for (let i = 0; i < 5; i++) {
        const answer = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
        expect(answer.choices[0]?.message.content).toBeTruthy();
      }
      // The oldest idle ones were closed to make room; the broker never hit its descriptor limit.
      expect(sockets.filter((s) => s.destroyed || s.readyState === 'closed').length).toBeGreaterThan(1000);
      expect(limited.log()).not.toMatch(/EMFILE/);
    } finally {
      for (const s of sockets) s.destroy();
      await limited.close();
    }
  });
});
