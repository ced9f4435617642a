/**
 * The broker judges exactly the request the upstream will read, tried against `till serve`:
 * anything an upstream could read otherwise (a fragment, a method override, a duplicate JSON key,
 * a compressed or mislabelled body, a non-canonical WebSocket path, a Host or Referer that only
 * looks local, headers past what Node counts) is refused before it is forwarded. Each test
 * starts with a comment naming the attack.
 */
import * as http from 'node:http';
import * as net from 'node:net';
import { spawn } from 'node:child_process';
import { gzipSync } from 'node:zlib';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import { serveTill, type Broker } from './support/served';
import { addCredential, fakeCredential, tempHome, TILL_JS } from './support/till';
import { startGeminiUpstream, startOpenAIUpstream, type Upstream } from './support/upstreams';
import { waitFor } from './support/wait';

let broker: Broker;
let openai: Upstream;
let gemini: Upstream;
let port: number;

beforeAll(async () => {
  const creds = { openai: fakeCredential('openai'), gemini: fakeCredential('gemini'), cohere: fakeCredential('cohere') };
  openai = await startOpenAIUpstream({ credential: creds.openai, websocket: true });
  gemini = await startGeminiUpstream({ credential: creds.gemini });
  const home = tempHome();
  for (const p of ['openai', 'gemini', 'cohere'] as const) await addCredential(home, p, p, creds[p]);
  broker = await serveTill(home, {
    env: { TILL_UPSTREAM_OPENAI: `${openai.url}/v1`, TILL_UPSTREAM_GEMINI: gemini.url, TILL_UPSTREAM_COHERE: openai.url },
  });
  port = Number(new URL(broker.url).port);
});
afterAll(async () => {
  await broker.close();
  await openai.close();
  await gemini.close();
});

const upstreamSaw = () => openai.received.length + openai.rejected.length + gemini.received.length + gemini.rejected.length;

/** A raw HTTP/1.1 request (the client writes every byte, Host included); the broker's answer. */
async function raw(head: string, body = ''): Promise<{ status: number; text: string }> {
  const socket = net.connect(port, '127.0.0.1');
  await new Promise<void>((r) => socket.once('connect', () => r()));
  let text = '';
  socket.on('data', (c: Buffer) => (text += c.toString('latin1')));
  socket.on('error', () => undefined);
  // Written, not ended: a half-closed connection may lose an answer that comes from upstream.
  socket.write(`${head}\r\n\r\n${body}`);
  await new Promise<void>((r) => socket.once('close', () => r()));
  return { status: Number(/^HTTP\/1\.1 (\d{3})/.exec(text)?.[1] ?? 0), text };
}

function post(
  path: string,
  key: string,
  body: string | Buffer,
  headers: Record<string, string> = {},
): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        host: '127.0.0.1',
        port,
        method: 'POST',
        path,
        agent: false,
        headers: { 'content-type': 'application/json', authorization: `Bearer ${key}`, ...headers },
      },
      (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

const chat = (model = 'gpt-4o-mini') => JSON.stringify({ model, messages: [{ role: 'user', content: 'hi' }] });

describe('requests the upstream would read otherwise', () => {
  it('refuses a fragment that would make a chat look like a free route (Cohere tokenize, Gemini countTokens)', async () => {
    // Attack: `POST /cohere/v2/chat#/tokenize` is a chat to an upstream that drops the fragment,
    // and was counted free: three chats on a one-use key, none counted.
    const c = await broker.issue({ target: 'cohere', uses: 1 });
    const g = await broker.issue({ target: 'gemini', uses: 1 });
    const before = upstreamSaw();
    for (const [path, key] of [
      ['/cohere/v2/chat#/tokenize', c.key],
      ['/gemini/v1beta/models/gemini-2.5-flash:generateContent#:countTokens', g.key],
    ] as const) {
      const r = await raw(
        `POST ${path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${key}\r\nContent-Type: application/json\r\nContent-Length: 2\r\nConnection: close`,
        '{}',
      );
      expect(r.status, path).toBe(400);
      expect(r.text).toContain('fragment');
    }
    expect(upstreamSaw()).toBe(before);
  });

  it('refuses method-override headers, and counts a GET to a generation route as billable', async () => {
    // Attack: Gemini `GET …:generateContent` with `X-HTTP-Method-Override: POST` was a free route
    // to the broker and a generation to an upstream that honours the override.
    const g = await broker.issue({ target: 'gemini', uses: 1 });
    const before = upstreamSaw();
    for (const name of ['X-HTTP-Method-Override', 'X-HTTP-Method', 'X-Method-Override']) {
      const r = await raw(
        `GET /gemini/v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: 127.0.0.1\r\nx-goog-api-key: ${g.key}\r\n${name}: POST\r\nConnection: close`,
      );
      expect(r.status, name).toBe(400);
      expect(r.text).toContain(name.toLowerCase());
    }
    expect(upstreamSaw()).toBe(before);
    // Without the override, a GET on a generation route is not mistaken for a free model lookup.
    await raw(
      `GET /gemini/v1beta/models/gemini-2.5-flash:generateContent HTTP/1.1\r\nHost: 127.0.0.1\r\nx-goog-api-key: ${g.key}\r\nConnection: close`,
    );
    expect((await broker.key(g.id)).used.activations).toBe(1);
  });

  it('refuses a JSON body with a duplicate key, whichever copy the broker would have judged', async () => {
    // Attack: `{"model":"gpt-4o-mini","model":"gpt-5"}` is judged as gpt-5 by JSON.parse and may
    // be read as gpt-4o-mini by the upstream (or the other way round), escaping a model scope.
    const k = await broker.issue({ target: 'openai', models: ['gpt-4o-mini'] });
    const before = upstreamSaw();
    for (const body of [
      '{"model":"gpt-5","model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}',
      '{"model":"gpt-4o-mini","\\u006dodel":"gpt-5","messages":[]}',
      '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi","content":"other"}]}',
      '{"model":"gpt-4o-mini","stream":false,"messages":[],"stream":true}',
    ]) {
      const r = await post('/openai/v1/chat/completions', k.key, body);
      expect(r.status, body).toBe(400);
      expect(r.text).toMatch(/twice in one object/);
    }
    expect(upstreamSaw()).toBe(before);
    expect((await post('/openai/v1/chat/completions', k.key, chat())).status).toBe(200);
  });

  it('judges a metered body whatever its declared type, and refuses one it cannot read on a budgeted key', async () => {
    // Attack: a JSON body labelled text/plain (which many upstreams parse anyway) passed unread:
    // no model check, and a token budget held only a guess.
    const tokens = await broker.issue({ target: 'openai', maxTokens: 5000, models: ['gpt-4o-mini'] });
    const before = openai.received.length;
    const hidden = await post('/openai/v1/chat/completions', tokens.key, chat('gpt-5'), { 'content-type': 'text/plain' });
    expect(hidden.status).toBe(403);
    const garbage = await post('/openai/v1/chat/completions', tokens.key, 'model=gpt-4o-mini&prompt=hi', {
      'content-type': 'application/x-www-form-urlencoded',
    });
    expect(garbage.status).toBe(400);
    expect(garbage.text).toMatch(/not valid JSON, so its model cannot be checked/);
    expect(openai.received.length).toBe(before);
    const ok = await post('/openai/v1/chat/completions', tokens.key, chat(), { 'content-type': 'text/plain' });
    expect(ok.status).toBe(200);
  });

  it('refuses a compressed body it would have to judge', async () => {
    // Attack: a gzip body (a small upload that inflates to megabytes of prompt) is bytes the
    // broker cannot read: model and budget checks would see nothing.
    const k = await broker.issue({ target: 'openai', maxTokens: 1000 });
    const before = openai.received.length;
    const r = await post('/openai/v1/chat/completions', k.key, gzipSync(chat()), { 'content-encoding': 'gzip' });
    expect(r.status).toBe(415);
    expect(r.text).toMatch(/must not be compressed/);
    expect(openai.received.length).toBe(before);
  });
});

describe('WebSockets the upstream would read otherwise', () => {
  const wsUrl = (path: string) => `${broker.url.replace('http', 'ws')}${path}`;

  /** The broker's answer to a handshake it refuses. */
  function refusal(path: string, key: string): Promise<{ status: number; body: string }> {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(wsUrl(path), { headers: { authorization: `Bearer ${key}` } });
      ws.once('unexpected-response', (_req, res) => {
        let body = '';
        res.on('data', (c: Buffer) => (body += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
      });
      ws.once('open', () => reject(new Error(`${path} was accepted`)));
      ws.once('error', () => undefined);
    });
  }

  it('refuses non-canonical Realtime paths, and a generic socket on a models-limited key', async () => {
    // Attack: `/v1/realtime/` and `/v1/realtime;x` reach Realtime on an upstream that normalises
    // paths, while the broker treated them as a generic socket: no model check, one activation in all.
    const k = await broker.issue({ target: 'openai', models: ['gpt-realtime-mini'] });
    const before = openai.upgrades.length;
    for (const path of ['/openai/v1/realtime/?model=gpt-realtime', '/openai/v1/realtime;x?model=gpt-realtime']) {
      const r = await refusal(path, k.key);
      expect(r.status, path).toBe(400);
      expect(r.body).toMatch(/not in canonical form/);
    }
    const generic = await refusal('/openai/v1/something-else', k.key);
    expect(generic.status).toBe(403);
    expect(generic.body).toMatch(/cannot see the model/);
    expect(openai.upgrades.length).toBe(before);
  });

  it('refuses a message with two `type`s instead of forwarding it', async () => {
    // Attack: `{"type":"session.update","type":"response.create"}`: the broker judges one type,
    // the upstream may act on the other (an unmetered generation).
    const k = await broker.issue({ target: 'openai' });
    const ws = new WebSocket(wsUrl('/openai/v1/responses'), { headers: { authorization: `Bearer ${k.key}` } });
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    const before = openai.socketMessages.length;
    const answer = new Promise<Record<string, unknown>>((r) =>
      ws.once('message', (d) => r(JSON.parse(d.toString()) as Record<string, unknown>)),
    );
    ws.send('{"type":"response.create","model":"gpt-5","type":"session.update"}');
    const event = await answer;
    expect(event.type).toBe('error');
    expect(JSON.stringify(event)).toMatch(/the key .{0,2}"type.{0,2}" twice in one object/);
    expect(openai.socketMessages.length).toBe(before);
    ws.close();
  });
});

describe('the front door reads each request exactly', () => {
  it('parses Host whole and refuses two of them', async () => {
    // Attack: the Host check stopped at the first `:`: `localhost:PORT@evil`, `localhost:evil`
    // and a second Host header passed as loopback (DNS rebinding).
    const k = await broker.issue({ target: 'openai' });
    const before = upstreamSaw();
    for (const host of [
      `Host: localhost:${port}@evil.example`,
      'Host: localhost:evil.example',
      `Host: 127.0.0.1:${port}\r\nHost: evil.example`,
      'Host: localhost:99999',
      'Host: localhost.',
    ]) {
      const r = await raw(`GET /openai/v1/models HTTP/1.1\r\n${host}\r\nAuthorization: Bearer ${k.key}\r\nConnection: close`);
      expect(r.status, host).toBe(403);
      expect(r.text).toContain('forbidden_host');
    }
    expect(upstreamSaw()).toBe(before);
    const ok = await raw(
      `GET /openai/v1/models HTTP/1.1\r\nHost: LOCALHOST:${port}\r\nAuthorization: Bearer ${k.key}\r\nConnection: close`,
    );
    expect(ok.status).toBe(200);
  });

  it('refuses a request whose Referer is a web page elsewhere, as it refuses Origin', async () => {
    // Attack: a browser request (an old browser, a no-cors GET) that carries no Origin but says
    // in Referer that a foreign web page sent it.
    const k = await broker.issue({ target: 'openai' });
    const before = upstreamSaw();
    const r = await raw(
      `GET /openai/v1/models HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${k.key}\r\nReferer: https://evil.example/page\r\nConnection: close`,
    );
    expect(r.status).toBe(403);
    expect(r.text).toContain('browser_origin');
    expect(upstreamSaw()).toBe(before);
    const local = await raw(
      `GET /openai/v1/models HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${k.key}\r\nReferer: http://localhost:3000/\r\nConnection: close`,
    );
    expect(local.status).toBe(200);
  });

  it('refuses a request with more headers than it counts, so none goes unseen', async () => {
    // Attack: an Origin placed after 2,000 other headers was never seen (Node stops counting
    // there), so a browser's request passed as a local program's.
    const k = await broker.issue({ target: 'openai' });
    const before = upstreamSaw();
    const filler = Array.from({ length: 2000 }, (_, i) => `x-f${i}: 1`).join('\r\n');
    const r = await raw(
      `GET /openai/v1/models HTTP/1.1\r\nHost: 127.0.0.1:${port}\r\nAuthorization: Bearer ${k.key}\r\n${filler}\r\nOrigin: https://evil.example\r\nConnection: close`,
    );
    expect(r.status).toBe(431);
    expect(r.text).toMatch(/more than 256 headers/);
    expect(upstreamSaw()).toBe(before);
  });
});

describe("what reaches the user's terminal", () => {
  it('shows request text in till watch without its control characters', async () => {
    // Attack: an agent names a "model" holding terminal escape sequences; `till watch` (and
    // `till serve --verbose`) printed it raw, letting the agent retitle or rewrite the user's terminal.
    const k = await broker.issue({ target: 'openai', models: ['gpt-4o-mini'] });
    const watch = spawn(process.execPath, [TILL_JS, 'watch'], {
      env: { ...process.env, TILL_HOME: broker.home },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let printed = '';
    watch.stdout.on('data', (c: Buffer) => (printed += c.toString('utf8')));
    try {
      await waitFor('till watch to attach', async () => {
        await post('/openai/v1/chat/completions', k.key, chat());
        return printed.includes('POST /openai/v1/chat/completions');
      });
      const evil = 'gpt-\u001b]0;pwned\u0007\u001b[2J-mini';
      expect((await post('/openai/v1/chat/completions', k.key, JSON.stringify({ model: evil, messages: [] }))).status).toBe(403);
      await waitFor('the refusal to be printed', () => printed.includes('denied (out_of_scope)'));
      expect(printed).not.toMatch(/[\u0000-\u0008\u000b-\u001f\u007f]/);
      expect(printed).toContain('gpt-\ufffd]0;pwned\ufffd\ufffd[2J-mini');
    } finally {
      watch.kill();
    }
  });
});
