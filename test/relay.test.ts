/**
 * The credential is never relayed back to a client, tried against `till serve` with upstreams
 * that echo what they were sent: headers, bodies, redirects, WebSocket handshakes and messages.
 * Each test starts with a comment naming the attack.
 */
import * as http from 'node:http';
import type { AddressInfo } from 'node:net';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import { serveTill, type Broker } from './support/served';
import { addCredential, fakeCredential, tempHome, writeConfig } from './support/till';

/**
 * An upstream that accepts only `credential` (as a Bearer token or `?key=`) and hands it back:
 * in response headers, in the body (whole, or streamed with the credential split across
 * chunks), in a redirect's Location, in a WebSocket 101 and in WebSocket messages.
 */
async function startEchoUpstream(credential: string): Promise<{ url: string; hits: () => number; close(): Promise<void> }> {
  let hits = 0;
  const authorized = (req: http.IncomingMessage): boolean => {
    const url = new URL(req.url ?? '/', 'http://x');
    return req.headers.authorization === `Bearer ${credential}` || url.searchParams.get('key') === credential;
  };
  const server = http.createServer((req, res) => {
    if (!authorized(req)) {
      res.writeHead(401, { 'content-type': 'application/json' });
      return res.end('{"error":{"message":"bad key"}}');
    }
    hits++;
    const url = new URL(req.url ?? '/', 'http://x');
    const seen = JSON.stringify({ headers: req.headers, url: req.url });
    if (url.pathname.endsWith('/echo')) {
      res.writeHead(200, {
        'content-type': 'application/json',
        'x-echo-authorization': req.headers.authorization ?? '',
        'x-echo-url': req.url ?? '',
        'x-kept': 'yes',
        'content-length': Buffer.byteLength(seen),
      });
      return res.end(seen);
    }
    if (url.pathname.endsWith('/stream')) {
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const event = `data: ${JSON.stringify({ said: `your key is ${credential}` })}\n\n`;
      // Split inside the credential, so no single chunk holds it whole.
      const cut = event.indexOf(credential) + 5;
      res.write(event.slice(0, cut));
      setTimeout(() => res.end(event.slice(cut) + 'data: [DONE]\n\n'), 20);
      return;
    }
    if (url.pathname.endsWith('/redirect')) {
      const self = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
      res.writeHead(302, {
        location: `${self}${url.pathname.replace(/redirect$/, 'moved')}?key=${encodeURIComponent(credential)}&page=2`,
        'content-length': 0,
      });
      return res.end();
    }
    res.writeHead(404).end();
  });
  const wss = new WebSocketServer({ noServer: true });
  wss.on('headers', (headers, req) => headers.push(`X-Echo-Authorization: ${req.headers.authorization ?? ''}`));
  server.on('upgrade', (req, socket, head) => {
    if (!authorized(req) || req.url?.includes('refuse')) {
      const body = JSON.stringify({ error: { message: `refused ${req.headers.authorization ?? ''}` } });
      socket.end(
        `HTTP/1.1 403 Forbidden\r\ncontent-type: application/json\r\nx-echo-authorization: ${req.headers.authorization ?? ''}\r\ncontent-length: ${Buffer.byteLength(body)}\r\n\r\n${body}`,
      );
      return;
    }
    hits++;
    wss.handleUpgrade(req, socket, head, (ws) => {
      ws.on('message', () =>
        ws.send(JSON.stringify({ type: 'response.created', response: { id: 'resp_1', note: `you sent ${credential}` } })),
      );
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  return {
    url: `http://127.0.0.1:${(server.address() as AddressInfo).port}`,
    hits: () => hits,
    close: () =>
      new Promise<void>((r) => {
        wss.close();
        server.closeAllConnections();
        server.close(() => r());
      }),
  };
}

let credential: string;
let echo: Awaited<ReturnType<typeof startEchoUpstream>>;
let broker: Broker;
let openaiKey: string;
let echoKey: string;

beforeAll(async () => {
  credential = fakeCredential('openai');
  echo = await startEchoUpstream(credential);
  const home = tempHome();
  await addCredential(home, 'openai', 'openai', credential);
  await addCredential(home, 'echo', 'echo', credential);
  // A custom provider that takes its key in the query string, as some APIs do.
  writeConfig(home, { providers: [{ id: 'echo', baseUrl: `${echo.url}/api`, auth: 'query:key' }] });
  broker = await serveTill(home, { env: { TILL_UPSTREAM_OPENAI: `${echo.url}/v1` } });
  openaiKey = (await broker.issue({ target: 'openai' })).key;
  echoKey = (await broker.issue({ target: 'echo' })).key;
});
afterAll(async () => {
  await broker.close();
  await echo.close();
});

async function get(path: string, key: string): Promise<{ status: number; headers: http.IncomingHttpHeaders; text: string }> {
  const res = await fetch(`${broker.url}${path}`, { headers: { authorization: `Bearer ${key}` }, redirect: 'manual' });
  return { status: res.status, headers: Object.fromEntries(res.headers), text: await res.text() };
}

describe('the credential is never relayed to the client', () => {
  it('drops response headers that echo it and masks it in the body, keeping the rest of the answer', async () => {
    // Attack: an upstream (or a debugging proxy in front of it) that echoes the request's headers
    // back: the agent would read the real key from the answer.
    const r = await get('/openai/v1/echo', openaiKey);
    expect(r.status).toBe(200);
    expect(r.headers['x-echo-authorization']).toBeUndefined();
    expect(r.headers['x-kept']).toBe('yes');
    expect(JSON.stringify(r.headers)).not.toContain(credential);
    expect(r.text).not.toContain(credential);
    // Masked in place: the body is the upstream's, same length, still valid JSON.
    const body = JSON.parse(r.text) as { headers: { authorization: string } };
    expect(body.headers.authorization).toBe(`Bearer ${'*'.repeat(credential.length)}`);
    expect(Number(r.headers['content-length'])).toBe(Buffer.byteLength(r.text));
    expect(broker.log()).toMatch(/dropped the upstream's x-echo-authorization response header: it held the credential/);
  });

  it('masks it in a stream even when it is split across chunks', async () => {
    // Attack: the same echo in a server-sent event stream, the key cut between two writes.
    const r = await get('/openai/v1/stream', openaiKey);
    expect(r.status).toBe(200);
    expect(r.text).not.toContain(credential);
    expect(r.text).toContain(`your key is ${'*'.repeat(credential.length)}`);
    expect(r.text).toContain('data: [DONE]');
  });

  it("takes it out of a redirect's Location and points the redirect back through the broker", async () => {
    // Attack: a provider with its key in the query string redirects to `…?key=<credential>`; the
    // client would read the key, and following the redirect would take its till key to the upstream.
    const r = await get('/echo/api/redirect', echoKey);
    expect(r.status).toBe(302);
    const location = r.headers.location!;
    expect(location).not.toContain(credential);
    expect(location).toBe(`${broker.url}/echo/api/moved?page=2`);
    // The query-placed credential went upstream: the echo shows it only masked.
    const e = await get('/echo/api/echo', echoKey);
    expect(e.status).toBe(200);
    expect(e.text).not.toContain(credential);
    expect(JSON.stringify(e.headers)).not.toContain(credential);
  });

  it('never hands it back over WebSocket: not in the 101, not in a refusal, not in a message', async () => {
    // Attack: the echo in a WebSocket handshake answer (relayed headers), in an upstream's
    // refusal of the handshake, and in a message the upstream sends.
    const ws = new WebSocket(`${broker.url.replace('http', 'ws')}/openai/v1/responses`, {
      headers: { authorization: `Bearer ${openaiKey}` },
    });
    let upgradeHeaders: http.IncomingHttpHeaders = {};
    ws.once('upgrade', (res) => (upgradeHeaders = res.headers));
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    expect(JSON.stringify(upgradeHeaders)).not.toContain(credential);
    expect(upgradeHeaders['x-echo-authorization']).toBeUndefined();
    const message = new Promise<string>((r) => ws.once('message', (d) => r(d.toString())));
    ws.send(JSON.stringify({ type: 'response.create', model: 'gpt-5', generate: false }));
    const text = await message;
    expect(text).not.toContain(credential);
    expect(text).toContain('*'.repeat(credential.length));
    ws.close();

    const refused = new WebSocket(`${broker.url.replace('http', 'ws')}/openai/v1/refuse`, {
      headers: { authorization: `Bearer ${openaiKey}` },
    });
    const answer = await new Promise<{ status: number; headers: http.IncomingHttpHeaders; body: string }>((resolve) => {
      refused.once('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (c: Buffer) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, headers: res.headers, body }));
      });
      refused.once('error', () => undefined);
    });
    expect(answer.status).toBe(403);
    expect(JSON.stringify(answer.headers)).not.toContain(credential);
    expect(answer.body).not.toContain(credential);
    expect(answer.body).toContain('refused Bearer ***');
  });
});
