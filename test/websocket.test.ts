/**
 * WebSockets through the broker: OpenAI Responses over WebSocket as Codex CLI uses it, OpenAI
 * Realtime (key in a subprotocol) and Gemini Live (key in the query), against fake upstreams on
 * 127.0.0.1 that accept only the real credential. Each test asserts on what the upstream received.
 */
import { createServer, request as httpRequest, type IncomingHttpHeaders, type IncomingMessage, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { readFileSync } from 'node:fs';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket, { WebSocketServer } from 'ws';
import type { TillEvent } from '../src/core/events';
import type { TillService } from '../src/core/runtime/service';
import { makeTillKey, newKeyId } from '../src/core/keys/tillKey';
import { addCredential, fakeCredential, startTill, tempHome } from './support/till';
import { waitFor } from './support/wait';

type Json = Record<string, any>;

// ---------------------------------------------------------------------------------------------
// Fake upstreams

interface Handshake {
  path: string;
  headers: IncomingHttpHeaders;
  protocols: string[];
}

interface FakeWsUpstream {
  /** Origin, e.g. http://127.0.0.1:PORT. */
  url: string;
  /** Every handshake that passed auth. */
  handshakes: Handshake[];
  /** Handshakes refused for a bad or missing credential. */
  rejected: Handshake[];
  /** Every message received, parsed, with its raw size. */
  messages: { msg: Json; bytes: number }[];
  /** Close codes the upstream saw its sockets end with. */
  closes: { code: number; reason: string }[];
  pings: string[];
  sockets: Set<WebSocket>;
  close(): Promise<void>;
}

const tokensOf = (bytes: number) => Math.max(1, Math.ceil(bytes / 4));
const WORDS = ['Hello', ' from', ' a', ' fake', ' upstream'];

/** Starts an HTTP server whose upgrades are checked by `authorize` and then served by `serve`. */
async function startWsUpstream(
  authorize: (req: IncomingMessage, url: URL, protocols: string[]) => boolean,
  serve: (ws: WebSocket, up: FakeWsUpstream, req: IncomingMessage) => void,
  options: {
    chooseProtocol?: (offered: Set<string>) => string | false;
    http?: (req: IncomingMessage, res: import('node:http').ServerResponse) => void;
  } = {},
): Promise<FakeWsUpstream> {
  const server: Server = createServer((req, res) => {
    if (options.http) return options.http(req, res);
    res.writeHead(404).end();
  });
  const wss = new WebSocketServer({ noServer: true, handleProtocols: (offered) => options.chooseProtocol?.(offered) ?? false });
  const sockets = new Set<Socket>();
  server.on('connection', (s) => {
    sockets.add(s);
    s.on('close', () => sockets.delete(s));
  });
  const up: FakeWsUpstream = {
    url: '',
    handshakes: [],
    rejected: [],
    messages: [],
    closes: [],
    pings: [],
    sockets: new Set(),
    close: async () => {
      for (const ws of up.sockets) ws.terminate();
      for (const s of sockets) s.destroy();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
  server.on('upgrade', (req, socket, head) => {
    const url = new URL(req.url ?? '/', 'http://127.0.0.1');
    const protocols = (req.headers['sec-websocket-protocol'] ?? '')
      .split(',')
      .map((p) => p.trim())
      .filter(Boolean);
    const record: Handshake = { path: req.url ?? '/', headers: req.headers, protocols };
    const forced = req.headers['x-test-status'];
    if (typeof forced === 'string') {
      const body = JSON.stringify({ error: { message: 'WebSocket transport is not available here', type: 'invalid_request_error' } });
      socket.end(
        `HTTP/1.1 ${forced} Refused\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\nx-request-id: req_fake\r\n\r\n${body}`,
      );
      return;
    }
    if (!authorize(req, url, protocols)) {
      up.rejected.push(record);
      const body = JSON.stringify({
        error: { message: 'Incorrect API key provided', type: 'invalid_request_error', code: 'invalid_api_key' },
      });
      socket.end(`HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: ${body.length}\r\n\r\n${body}`);
      return;
    }
    up.handshakes.push(record);
    wss.handleUpgrade(req, socket, head, (ws) => {
      up.sockets.add(ws);
      ws.on('ping', (data) => up.pings.push(data.toString()));
      ws.on('close', (code, reason) => {
        up.sockets.delete(ws);
        up.closes.push({ code, reason: reason.toString() });
      });
      ws.on('message', (data) => {
        const raw = data as Buffer;
        try {
          up.messages.push({ msg: JSON.parse(raw.toString()) as Json, bytes: raw.length });
        } catch {
          up.messages.push({ msg: { unparsed: true }, bytes: raw.length });
        }
      });
      serve(ws, up, req);
    });
  });
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  up.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return up;
}

/** OpenAI: `/v1/responses` (Bearer) and `/v1/realtime` (Bearer or the key subprotocol, as browsers send it). */
function startOpenAIWs(credential: string): Promise<FakeWsUpstream> {
  let n = 0;
  const usageOf = (bytes: number, output: number) => ({
    input_tokens: tokensOf(bytes),
    output_tokens: output,
    total_tokens: tokensOf(bytes) + output,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens_details: { reasoning_tokens: 0 },
  });
  return startWsUpstream(
    (req, url, protocols) => {
      if (url.pathname === '/v1/realtime' && protocols.includes(`openai-insecure-api-key.${credential}`)) return true;
      return req.headers.authorization === `Bearer ${credential}`;
    },
    (ws, _up, req) => {
      const realtime = (req.url ?? '').startsWith('/v1/realtime');
      const send = (event: Json) => ws.send(JSON.stringify(event));
      if (realtime) send({ type: 'session.created', event_id: 'ev_0', session: { id: 'sess_1' } });
      const respond = async (bytes: number, chunks: number, hang: boolean, eventId?: string) => {
        const id = `resp_${++n}`;
        send({ type: 'response.created', ...(eventId ? { event_id: eventId } : {}), response: { id, status: 'in_progress' } });
        for (let i = 0; i < chunks; i++) {
          if (ws.readyState !== WebSocket.OPEN) return;
          send(
            realtime
              ? { type: 'response.output_text.delta', response_id: id, delta: WORDS[i] ?? ' word' }
              : { type: 'response.output_text.delta', item_id: 'msg_1', output_index: 0, content_index: 0, delta: WORDS[i] ?? ' word' },
          );
          await sleep(2);
        }
        if (hang) return;
        const usage = usageOf(bytes, chunks);
        if (realtime)
          send({
            type: 'response.done',
            response: { id, status: 'completed', usage: { ...usage, input_token_details: usage.input_tokens_details } },
          });
        else send({ type: 'response.completed', response: { id, status: 'completed', output: [], usage } });
      };
      ws.on('message', (data) => {
        const raw = data as Buffer;
        let msg: Json;
        try {
          msg = JSON.parse(raw.toString()) as Json;
        } catch {
          return send({ type: 'error', status: 400, error: { type: 'invalid_request_error', message: 'invalid JSON' } });
        }
        switch (msg.type) {
          case 'response.create':
            if (msg.generate === false) {
              // Codex's prewarm: nothing generated, nothing billed.
              const id = `resp_${++n}`;
              send({ type: 'response.created', response: { id, status: 'in_progress' } });
              send({
                type: 'response.completed',
                response: { id, status: 'completed', output: [], usage: { input_tokens: 0, output_tokens: 0, total_tokens: 0 } },
              });
              return;
            }
            if (msg.previous_response_id === 'resp_missing') {
              return send({
                type: 'error',
                status: 400,
                error: { type: 'invalid_request_error', code: 'previous_response_not_found', message: 'Previous response not found' },
              });
            }
            void respond(
              raw.length,
              typeof msg.max_output_tokens === 'number' ? Math.min(5, msg.max_output_tokens) : 5,
              msg.metadata?.test === 'hang',
              msg.event_id,
            );
            return;
          case 'input_audio_buffer.commit':
            // Server VAD: the upstream starts a response by itself.
            void respond(raw.length, 3, false);
            return;
          case 'test.echo':
            return ws.send(raw, { binary: false });
          case 'test.flood': {
            const chunk = JSON.stringify({ type: 'test.flood', pad: 'z'.repeat(64 * 1024) });
            for (let i = 0; i < (msg.count as number); i++) ws.send(chunk);
            return;
          }
          case 'test.pause':
            // Stops reading (until test.resume comes through the broker's own buffer).
            ws.pause();
            setTimeout(() => ws.resume(), msg.ms as number);
            return;
          case 'test.drop':
            return ws.terminate();
          case 'test.close':
            return ws.close(4321, 'bye from upstream');
        }
      });
    },
    {
      chooseProtocol: (offered) => (offered.has('realtime') ? 'realtime' : false),
      http: (req, res) => {
        if (req.headers.authorization !== `Bearer ${credential}`) return res.writeHead(401).end();
        const body = JSON.stringify({ object: 'list', data: [{ id: 'gpt-4o-mini', object: 'model' }] });
        res.writeHead(200, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) }).end(body);
      },
    },
  );
}

const LIVE_PATH = '/ws/google.ai.generativelanguage.v1beta.GenerativeService.BidiGenerateContent';

/** Gemini Live: key in `?key=` or `x-goog-api-key`; answers in binary frames, as Google does. */
function startGeminiLive(credential: string): Promise<FakeWsUpstream> {
  return startWsUpstream(
    (req, url) =>
      url.pathname === LIVE_PATH && (url.searchParams.get('key') === credential || req.headers['x-goog-api-key'] === credential),
    (ws) => {
      const send = (m: Json) => ws.send(Buffer.from(JSON.stringify(m)), { binary: true });
      ws.on('message', (data) => {
        const raw = data as Buffer;
        const msg = JSON.parse(raw.toString()) as Json;
        if (msg.setup) return send({ setupComplete: {} });
        if (msg.clientContent?.turnComplete) {
          void (async () => {
            for (const w of WORDS.slice(0, 4)) {
              send({ serverContent: { modelTurn: { role: 'model', parts: [{ text: w }] } } });
              await sleep(2);
            }
            send({ serverContent: { generationComplete: true } });
            send({
              serverContent: { turnComplete: true },
              usageMetadata: { promptTokenCount: tokensOf(raw.length), responseTokenCount: 4, totalTokenCount: tokensOf(raw.length) + 4 },
            });
          })();
        }
      });
    },
  );
}

// ---------------------------------------------------------------------------------------------
// Clients

interface Conn {
  ws: WebSocket;
  /** Headers of the broker's 101 answer. */
  upgrade: IncomingHttpHeaders;
  messages: Json[];
  binary: boolean[];
  closed: Promise<{ code: number; reason: string; at: number }>;
  /** The next message (after the last one returned) that matches. */
  next(match: (m: Json) => boolean, timeoutMs?: number): Promise<Json>;
  send(m: Json): void;
}

interface ConnectOptions {
  key?: string;
  headers?: Record<string, string>;
  protocols?: string[];
}

let service: TillService;
let openai: FakeWsUpstream;
let gemini: FakeWsUpstream;
const secrets = { openai: fakeCredential('openai-ws'), gemini: fakeCredential('gemini-ws') };
const events: TillEvent[] = [];
const issuedKeys: string[] = [];
const MAX_MESSAGE = 256 * 1024;

function wsUrl(path: string): string {
  return service.url.replace(/^http/, 'ws') + path;
}

function connect(path: string, options: ConnectOptions = {}): Promise<Conn> {
  const headers = { ...(options.key ? { authorization: `Bearer ${options.key}` } : {}), ...options.headers };
  const ws = new WebSocket(wsUrl(path), options.protocols ?? [], { headers });
  const messages: Json[] = [];
  const binary: boolean[] = [];
  const waiters = new Set<() => void>();
  let cursor = 0;
  ws.on('message', (data, isBinary) => {
    messages.push(JSON.parse((data as Buffer).toString()) as Json);
    binary.push(isBinary);
    for (const w of waiters) w();
  });
  const closed = new Promise<{ code: number; reason: string; at: number }>((resolve) =>
    ws.on('close', (code, reason) => resolve({ code, reason: reason.toString(), at: Date.now() })),
  );
  return new Promise((resolve, reject) => {
    let upgrade: IncomingHttpHeaders = {};
    ws.on('upgrade', (res) => (upgrade = res.headers));
    ws.on('unexpected-response', (_req, res) => reject(new Error(`refused with ${res.statusCode}`)));
    ws.on('error', reject);
    ws.on('open', () =>
      resolve({
        ws,
        upgrade,
        messages,
        binary,
        closed,
        send: (m) => ws.send(JSON.stringify(m)),
        next: (match, timeoutMs = 5_000) =>
          new Promise((res, rej) => {
            const check = () => {
              for (let i = cursor; i < messages.length; i++) {
                if (match(messages[i]!)) {
                  cursor = i + 1;
                  waiters.delete(check);
                  clearTimeout(timer);
                  res(messages[i]!);
                  return;
                }
              }
            };
            const timer = setTimeout(() => {
              waiters.delete(check);
              rej(
                new Error(
                  `no matching message within ${timeoutMs} ms; got ${JSON.stringify(messages.map((m) => m.type ?? Object.keys(m)[0]))}`,
                ),
              );
            }, timeoutMs);
            waiters.add(check);
            check();
          }),
      }),
    );
  });
}

/** Opens a handshake the broker must refuse: its status, headers and JSON body. */
function refusal(path: string, options: ConnectOptions = {}): Promise<{ status: number; headers: IncomingHttpHeaders; body: Json }> {
  const headers = { ...(options.key ? { authorization: `Bearer ${options.key}` } : {}), ...options.headers };
  const ws = new WebSocket(wsUrl(path), options.protocols ?? [], { headers });
  return new Promise((resolve, reject) => {
    ws.on('unexpected-response', (req, res) => {
      let text = '';
      res.on('data', (c) => (text += c));
      res.on('end', () => {
        req.destroy();
        resolve({ status: res.statusCode ?? 0, headers: res.headers, body: text ? (JSON.parse(text) as Json) : {} });
      });
    });
    ws.on('open', () => {
      ws.terminate();
      reject(new Error('the handshake was accepted'));
    });
    ws.on('error', () => undefined);
  });
}

async function issue(input: Record<string, unknown> & { target: string }): Promise<{ id: string; key: string }> {
  const issued = await service.issue(input);
  issuedKeys.push(issued.key);
  return { id: issued.id, key: issued.key };
}

function summary(id: string) {
  return service.keys.list().find((k) => k.id === id)!;
}

const RESPONSES = '/openai/v1/responses';
const CODEX_HEADERS = { 'openai-beta': 'responses_websockets=2026-02-06', originator: 'codex_cli_rs' };

async function turn(conn: Conn, body: Json): Promise<{ text: string; completed: Json }> {
  conn.send({ type: 'response.create', model: 'gpt-4o-mini', ...body });
  let text = '';
  for (;;) {
    const m = await conn.next((e) => e.type === 'response.output_text.delta' || e.type === 'response.completed' || e.type === 'error');
    if (m.type === 'error') throw new Error(`error event: ${JSON.stringify(m)}`);
    if (m.type === 'response.completed') return { text, completed: m };
    text += m.delta as string;
  }
}

async function until(check: () => boolean, timeoutMs = 3_000): Promise<void> {
  await waitFor('the condition', check, { timeoutMs, everyMs: 5 });
}

beforeAll(async () => {
  [openai, gemini] = await Promise.all([startOpenAIWs(secrets.openai), startGeminiLive(secrets.gemini)]);
  const home = tempHome();
  await addCredential(home, 'openai', 'openai', secrets.openai);
  await addCredential(home, 'gemini', 'gemini', secrets.gemini);
  service = await startTill({
    home,
    env: { TILL_UPSTREAM_OPENAI: `${openai.url}/v1`, TILL_UPSTREAM_GEMINI: gemini.url },
    // Short HTTP timeouts: a WebSocket must outlive them.
    broker: { maxBodyBytes: MAX_MESSAGE, requestTimeoutMs: 1_000, headersTimeoutMs: 1_000 },
  });
  service.events.on((e) => events.push(e));
});

afterAll(async () => {
  await service?.close();
  await Promise.all([openai?.close(), gemini?.close()]);
  // Attack: a till key leaking to the provider (in a header, a subprotocol, the URL or a message).
  const seen = JSON.stringify([openai?.handshakes, openai?.rejected, openai?.messages, gemini?.handshakes, gemini?.messages]);
  for (const key of issuedKeys) expect(seen).not.toContain(key);
});

// ---------------------------------------------------------------------------------------------

describe('OpenAI Responses over WebSocket (Codex CLI)', () => {
  it('a Codex-like session: the prewarm is free, two turns with previous_response_id count 2 activations and their tokens', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 10, maxTokens: 100_000, label: 'codex ws' });
    const before = openai.handshakes.length;
    const conn = await connect(RESPONSES, { key, headers: CODEX_HEADERS });
    // A 101, not a 426 that sends Codex back to HTTP.
    expect(conn.ws.readyState).toBe(WebSocket.OPEN);
    expect(openai.handshakes.length).toBe(before + 1);
    const hs = openai.handshakes.at(-1)!;
    expect(hs.path).toBe('/v1/responses');
    expect(hs.headers.authorization).toBe(`Bearer ${secrets.openai}`);
    expect(hs.headers['openai-beta']).toBe('responses_websockets=2026-02-06');
    expect(hs.headers.originator).toBe('codex_cli_rs');
    expect(JSON.stringify(hs)).not.toContain(key);

    conn.send({ type: 'response.create', model: 'gpt-4o-mini', generate: false, instructions: 'You are Codex.', input: [], tools: [] });
    const prewarm = await conn.next((e) => e.type === 'response.completed');
    expect(prewarm.response.usage.total_tokens).toBe(0);
    expect(summary(id).used.activations).toBe(0);

    const first = await turn(conn, {
      instructions: 'You are Codex.',
      input: [{ type: 'message', role: 'user', content: [{ type: 'input_text', text: 'list the files' }] }],
    });
    expect(first.text).toBe('Hello from a fake upstream');
    const second = await turn(conn, {
      previous_response_id: first.completed.response.id,
      input: [{ type: 'function_call_output', call_id: 'c1', output: 'README.md' }],
    });
    const tokens = first.completed.response.usage.total_tokens + second.completed.response.usage.total_tokens;

    const s = summary(id);
    expect(s.used.activations).toBe(2);
    expect(s.used.tokens).toBe(tokens);
    expect(s.reserved.tokens ?? 0).toBe(0);
    expect(s.inFlight).toBe(0);
    // The key covers a whole turn (the model's largest answer): the turns go on as Codex sent
    // them, uncapped; their holds follow their output instead (the prewarm is untouched too).
    const creates = openai.messages.filter((m) => m.msg.type === 'response.create').slice(-3);
    expect(creates[0]!.msg.max_output_tokens).toBeUndefined();
    expect(creates[1]!.msg.max_output_tokens).toBeUndefined();
    expect(creates[2]!.msg.previous_response_id).toBe(first.completed.response.id);

    const finished = events.filter(
      (e): e is Extract<TillEvent, { type: 'request.finished' }> => e.type === 'request.finished' && e.request.keyId === id,
    );
    expect(finished.map((e) => [e.request.method, e.request.path, e.status])).toEqual([
      ['WS', '/v1/responses', 200],
      ['WS', '/v1/responses', 200],
    ]);
    expect(finished.reduce((n, e) => n + e.usage!.tokens.input + e.usage!.tokens.output, 0)).toBe(tokens);
    expect(finished.every((e) => e.usage!.estimated === false)).toBe(true);

    // Codex drops the socket without a close frame at exit.
    conn.ws.terminate();
    await until(() => openai.closes.length > 0 && openai.sockets.size === 0);
    // The audit log is written in batches: wait for the connection's own line.
    const auditLines = () =>
      readFileSync(service.paths.audit, 'utf8')
        .trim()
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l) as Json)
        .filter((l) => l.keyId === id);
    await until(() => auditLines().some((l) => l.method === 'GET' && l.status === 101));
    const audit = readFileSync(service.paths.audit, 'utf8');
    const lines = auditLines();
    expect(lines.filter((l) => l.method === 'WS' && l.status === 200)).toHaveLength(2);
    expect(lines.some((l) => l.method === 'GET' && l.status === 101)).toBe(true);
    expect(audit).not.toContain(key);
    expect(audit).not.toContain('list the files');
  });

  it('an upstream error before the response began costs one activation and no tokens', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key });
    conn.send({ type: 'response.create', model: 'gpt-4o-mini', previous_response_id: 'resp_missing', input: [] });
    const err = await conn.next((e) => e.type === 'error');
    expect(err.error.code).toBe('previous_response_not_found');
    await until(() => summary(id).inFlight === 0);
    expect(summary(id).used.activations).toBe(1);
    conn.ws.close();
    await conn.closed;
  });

  it('refuses bad keys at the upgrade with the right status and an OpenAI-shaped body, before reaching the upstream', async () => {
    const revoked = await issue({ target: 'openai', uses: 5 });
    await service.keys.revoke(revoked.id);
    const geminiKey = await issue({ target: 'gemini', uses: 5 });
    const scoped = await issue({ target: 'openai', uses: 5, paths: ['/v1/chat/*'] });
    const good = await issue({ target: 'openai', uses: 5 });
    const unknown = makeTillKey(newKeyId());
    const before = openai.handshakes.length + openai.rejected.length;

    const cases: [string, ConnectOptions, number, string][] = [
      ['missing', {}, 401, 'till_missing_key'],
      ['unknown', { key: unknown }, 401, 'till_unknown_key'],
      ['a real key instead of a till key', { key: 'sk-not-a-till-key' }, 401, 'till_missing_key'],
      ['revoked', { key: revoked.key }, 401, 'till_revoked'],
      ['for another provider', { key: geminiKey.key }, 403, 'till_wrong_provider'],
      ['out of its path scope', { key: scoped.key }, 403, 'till_out_of_scope'],
      // Attack: a web page opening a WebSocket to the broker with a till key it stole.
      ['from a browser', { key: good.key, headers: { origin: 'https://evil.example' } }, 403, 'till_browser_origin'],
      // Attack: DNS rebinding.
      ['with a foreign Host', { key: good.key, headers: { host: 'evil.example' } }, 403, 'till_forbidden_host'],
    ];
    for (const [what, options, status, code] of cases) {
      const r = await refusal(RESPONSES, options);
      expect([what, r.status]).toEqual([what, status]);
      expect([what, r.body.error?.code]).toEqual([what, code]);
      expect(r.body.error.message).toMatch(/^till: /);
      expect(r.headers['x-should-retry']).toBe('false');
      for (const k of [revoked.key, geminiKey.key, scoped.key, good.key, unknown]) expect(JSON.stringify(r)).not.toContain(k);
    }
    expect(openai.handshakes.length + openai.rejected.length).toBe(before);
    const denied = events.filter((e) => e.type === 'request.denied' && e.request.path === '/v1/responses');
    expect(denied.length).toBeGreaterThanOrEqual(cases.length);
  });

  it('refuses an exhausted key at the upgrade with 429', async () => {
    const { key } = await issue({ target: 'openai', uses: 1 });
    const conn = await connect(RESPONSES, { key });
    await turn(conn, { input: 'hi' });
    conn.ws.close();
    await conn.closed;
    const r = await refusal(RESPONSES, { key });
    expect(r.status).toBe(429);
    expect(r.body.error.code).toBe('till_exhausted');
    expect(r.body.error.message).toContain('1 of 1 activations used');
  });

  it('revoking mid-turn closes the client socket within a second with 4001, and the upstream socket too', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 5, maxTokens: 50_000 });
    const conn = await connect(RESPONSES, { key });
    conn.send({ type: 'response.create', model: 'gpt-4o-mini', input: 'think forever', metadata: { test: 'hang' } });
    await conn.next((e) => e.type === 'response.output_text.delta');
    const upstreamSockets = openai.sockets.size;
    const revokedAt = Date.now();
    await service.keys.revoke(id);
    const closed = await conn.closed;
    expect(closed.code).toBe(4001);
    expect(closed.reason).toContain('revoked');
    expect(closed.at - revokedAt).toBeLessThan(1_000);
    expect(Buffer.byteLength(closed.reason)).toBeLessThanOrEqual(123);
    expect(closed.reason).not.toContain(key);
    // The client was told why in OpenAI's shape before the close.
    expect(conn.messages.at(-1)).toMatchObject({ type: 'error', error: { code: 'till_revoked' } });
    await until(() => openai.sockets.size < upstreamSockets);
    const s = summary(id);
    expect(s.inFlight).toBe(0);
    expect(s.reserved.tokens ?? 0).toBe(0);
    // The cut turn reached the upstream: billed from what it produced, marked as estimated.
    expect(s.used.activations).toBe(1);
    const finished = events.find((e) => e.type === 'request.finished' && e.request.keyId === id);
    expect(finished).toMatchObject({ aborted: 'revoked', usage: { estimated: true } });
  });

  it('revoking an idle session closes it too', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key });
    await turn(conn, { input: 'hi' });
    const revokedAt = Date.now();
    await service.keys.revoke(id);
    const closed = await conn.closed;
    expect(closed.code).toBe(4001);
    expect(closed.at - revokedAt).toBeLessThan(1_000);
  });

  it('a key expiring mid-session closes the socket with 4001 when it expires', async () => {
    const { key } = await issue({ target: 'openai', uses: 5, ttl: 1_200 });
    const conn = await connect(RESPONSES, { key });
    await turn(conn, { input: 'quick' });
    const closed = await conn.closed;
    expect(closed.code).toBe(4001);
    expect(closed.reason).toContain('expired');
  });

  it('exhaustion mid-session: the next response.create gets an error event, is not forwarded, and the socket closes with 4029', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 1 });
    const conn = await connect(RESPONSES, { key });
    const creates = () => openai.messages.filter((m) => m.msg.type === 'response.create').length;
    await turn(conn, { input: 'one' });
    const forwarded = creates();
    conn.send({ type: 'response.create', model: 'gpt-4o-mini', input: 'two' });
    const err = await conn.next((e) => e.type === 'error');
    expect(err).toMatchObject({ type: 'error', status: 429, error: { code: 'till_exhausted', type: 'rate_limit_error' } });
    expect(err.error.message).toContain('till key exhausted: 1 of 1 activations used');
    const closed = await conn.closed;
    expect(closed.code).toBe(4029);
    expect(closed.reason).toMatch(/^till key exhausted/);
    await sleep(50);
    expect(creates()).toBe(forwarded);
    expect(summary(id).used.activations).toBe(1);
  });

  it('rate limits apply per response.create; a refused one leaves the socket open', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 10, rpm: 2 });
    const conn = await connect(RESPONSES, { key });
    conn.send({ type: 'response.create', model: 'gpt-4o-mini', generate: false, input: [] });
    await conn.next((e) => e.type === 'response.completed');
    await turn(conn, { input: 'one' });
    await turn(conn, { input: 'two' });
    conn.send({ type: 'response.create', model: 'gpt-4o-mini', input: 'three' });
    const err = await conn.next((e) => e.type === 'error');
    expect(err.error.code).toBe('till_rate_limited');
    expect(conn.ws.readyState).toBe(WebSocket.OPEN);
    // Still usable for what costs nothing.
    conn.send({ type: 'response.create', model: 'gpt-4o-mini', generate: false, input: [] });
    await conn.next((e) => e.type === 'response.completed');
    expect(summary(id).used.activations).toBe(2);
    conn.ws.close();
  });

  it('a model outside the key scope gets an error event and is not forwarded', async () => {
    const { key } = await issue({ target: 'openai', uses: 5, models: ['gpt-4o-mini'] });
    const conn = await connect(RESPONSES, { key });
    const count = openai.messages.length;
    conn.send({ type: 'response.create', model: 'o3-pro', input: 'hi' });
    const err = await conn.next((e) => e.type === 'error');
    expect(err.error.code).toBe('till_out_of_scope');
    await sleep(30);
    expect(openai.messages.length).toBe(count);
    await turn(conn, { input: 'fine' });
    conn.ws.close();
  });

  it('a message that is not JSON is refused, not forwarded', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key });
    const count = openai.messages.length;
    conn.ws.send('{"type":"response.create", oops');
    const err = await conn.next((e) => e.type === 'error');
    expect(err.error.code).toBe('till_bad_request');
    await sleep(30);
    expect(openai.messages.length).toBe(count);
    conn.ws.close();
  });

  it('the upstream closing abruptly closes the client at once; a clean close is passed on with its code', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const a = await connect(RESPONSES, { key });
    a.send({ type: 'test.drop' });
    const abrupt = await a.closed;
    expect(abrupt.code).toBe(1006);

    const b = await connect(RESPONSES, { key });
    b.send({ type: 'test.close' });
    const clean = await b.closed;
    expect(clean).toMatchObject({ code: 4321, reason: 'bye from upstream' });
  });

  it('the client closing closes the upstream, with its code, or abruptly when the client vanished', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const a = await connect(RESPONSES, { key });
    const closes = openai.closes.length;
    a.ws.close(1000, 'done here');
    await until(() => openai.closes.length > closes);
    expect(openai.closes.at(-1)).toEqual({ code: 1000, reason: 'done here' });

    const b = await connect(RESPONSES, { key });
    b.ws.terminate();
    await until(() => openai.closes.length > closes + 1);
    expect(openai.closes.at(-1)!.code).toBe(1006);
  });

  it('a message over the size limit closes the socket with 1009 and never reaches the upstream', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key });
    const count = openai.messages.length;
    const closes = openai.closes.length;
    conn.ws.send(JSON.stringify({ type: 'response.create', model: 'gpt-4o-mini', input: 'x'.repeat(MAX_MESSAGE + 1) }));
    const closed = await conn.closed;
    expect(closed.code).toBe(1009);
    await until(() => openai.closes.length > closes);
    expect(openai.messages.length).toBe(count);
  });

  it('passes pings and pongs through, and many messages in order both ways', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key });
    const pong = new Promise<string>((r) => conn.ws.once('pong', (d) => r(d.toString())));
    conn.ws.ping('are-you-there');
    expect(await pong).toBe('are-you-there');
    expect(openai.pings).toContain('are-you-there');

    const n = 2_000;
    const pad = 'y'.repeat(2_000);
    for (let i = 0; i < n; i++) conn.send({ type: 'test.echo', i, pad });
    await until(() => conn.messages.filter((m) => m.type === 'test.echo').length === n, 10_000);
    expect(conn.messages.filter((m) => m.type === 'test.echo').map((m) => m.i)).toEqual(Array.from({ length: n }, (_, i) => i));
    conn.ws.close();
  });

  it('backpressure: a client that stops reading stops the broker reading the upstream, nothing piles up in between', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key });
    const upstream = [...openai.sockets].at(-1)!;
    conn.ws.pause();
    const count = 400; // 25 MiB
    conn.send({ type: 'test.flood', count });
    await sleep(500);
    // The broker read no more than its high-water mark plus socket buffers: the rest waits in the upstream.
    expect(upstream.bufferedAmount).toBeGreaterThan(15 * 1024 * 1024);
    conn.ws.resume();
    await until(() => conn.messages.filter((m) => m.type === 'test.flood').length === count, 10_000);
    await until(() => upstream.bufferedAmount === 0);
    conn.ws.close();
  });

  it('backpressure the other way: an upstream that stops reading stops the broker reading the client', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key });
    conn.send({ type: 'test.pause', ms: 700 });
    await sleep(50);
    const pad = 'w'.repeat(64 * 1024);
    for (let i = 0; i < 400; i++) conn.send({ type: 'test.echo', i, pad });
    await sleep(400);
    expect(conn.ws.bufferedAmount).toBeGreaterThan(15 * 1024 * 1024);
    await until(() => conn.messages.filter((m) => m.type === 'test.echo').length === 400, 10_000);
    expect(conn.messages.filter((m) => m.type === 'test.echo').map((m) => m.i)).toEqual(Array.from({ length: 400 }, (_, i) => i));
    conn.ws.close();
  });

  it('an idle session outlives the HTTP request and header timeouts', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect(RESPONSES, { key, headers: CODEX_HEADERS });
    await sleep(2_500);
    expect(conn.ws.readyState).toBe(WebSocket.OPEN);
    await turn(conn, { input: 'still there?' });
    expect(summary(id).used.activations).toBe(1);
    conn.ws.close();
  });

  it('relays an upstream refusal of the handshake (a 426 makes Codex fall back to HTTP)', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const r = await refusal(RESPONSES, { key, headers: { 'x-test-status': '426' } });
    expect(r.status).toBe(426);
    expect(r.headers['x-request-id']).toBe('req_fake');
    expect(r.body.error.message).toContain('not available');
  });

  it('still serves a plain HTTP request that asks for another upgrade (curl --http2 sends Upgrade: h2c)', async () => {
    const { key } = await issue({ target: 'openai', uses: 5 });
    const res = await new Promise<{ status: number; body: string }>((resolve, reject) => {
      const req = httpRequest(
        `${service.url}/openai/v1/models`,
        {
          headers: {
            authorization: `Bearer ${key}`,
            connection: 'Upgrade, HTTP2-Settings',
            upgrade: 'h2c',
            'http2-settings': 'AAMAAABkAAQCAAAAAAIAAAAA',
          },
        },
        (r: IncomingMessage) => {
          let body = '';
          r.on('data', (c) => (body += c));
          r.on('end', () => resolve({ status: r.statusCode ?? 0, body }));
        },
      );
      req.on('error', reject);
      req.end();
    });
    expect(res.status).toBe(200);
    expect(JSON.parse(res.body).data[0].id).toBe('gpt-4o-mini');
  });
});

describe('other WebSocket routes', () => {
  it('count one request per connection; a token-limited key refuses them as unmeterable', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 5 });
    const conn = await connect('/openai/v1/some/socket', { key });
    expect(openai.handshakes.at(-1)!.path).toBe('/v1/some/socket');
    conn.send({ type: 'test.echo', n: 1 });
    await conn.next((m) => m.type === 'test.echo');
    expect(summary(id).inFlight).toBe(1);
    conn.ws.close();
    await conn.closed;
    await until(() => summary(id).inFlight === 0);
    expect(summary(id).used.activations).toBe(1);
    expect(events.filter((e) => e.type === 'request.finished' && e.request.keyId === id)).toHaveLength(1);

    const budgeted = await issue({ target: 'openai', maxTokens: 10_000 });
    const r = await refusal('/openai/v1/some/socket', { key: budgeted.key });
    expect(r.status).toBe(403);
    expect(r.body.error.message).toContain('cannot meter');
  });
});

describe('OpenAI Realtime', () => {
  it('takes the till key from the browser-style subprotocol, swaps in the credential, and answers with the subprotocol the upstream chose', async () => {
    const { id, key } = await issue({ target: 'openai', uses: 5, models: ['gpt-realtime*'] });
    const conn = await connect('/openai/v1/realtime?model=gpt-realtime', {
      protocols: ['realtime', `openai-insecure-api-key.${key}`, 'openai-beta.realtime-v1'],
    });
    expect(conn.ws.protocol).toBe('realtime');
    expect(conn.upgrade['sec-websocket-protocol']).toBe('realtime');
    expect(JSON.stringify(conn.upgrade)).not.toContain(key);
    const hs = openai.handshakes.at(-1)!;
    expect(hs.path).toBe('/v1/realtime?model=gpt-realtime');
    expect(hs.protocols).toEqual(['realtime', `openai-insecure-api-key.${secrets.openai}`, 'openai-beta.realtime-v1']);
    expect(JSON.stringify(hs)).not.toContain(key);
    await conn.next((e) => e.type === 'session.created');

    conn.send({ type: 'response.create', event_id: 'client_1', response: { instructions: 'say hi' } });
    const done = await conn.next((e) => e.type === 'response.done');
    expect(summary(id).used.activations).toBe(1);
    expect(summary(id).used.tokens).toBe(done.response.usage.total_tokens);

    // Server VAD: the upstream starts a response without a response.create; it is a request too.
    conn.send({ type: 'input_audio_buffer.commit' });
    const vad = await conn.next((e) => e.type === 'response.done');
    await until(() => summary(id).used.activations === 2);
    expect(summary(id).used.tokens).toBe(done.response.usage.total_tokens + vad.response.usage.total_tokens);
    conn.ws.close();
    await conn.closed;
  });

  it('checks the model in the URL against the key scope at the upgrade', async () => {
    const { key } = await issue({ target: 'openai', uses: 5, models: ['gpt-4o-mini'] });
    const r = await refusal('/openai/v1/realtime?model=gpt-realtime', { protocols: ['realtime', `openai-insecure-api-key.${key}`] });
    expect(r.status).toBe(403);
    expect(r.body.error.code).toBe('till_out_of_scope');
  });

  it('refuses a real key in the subprotocol without forwarding it', async () => {
    const before = openai.handshakes.length + openai.rejected.length;
    const r = await refusal('/openai/v1/realtime?model=gpt-realtime', {
      protocols: ['realtime', 'openai-insecure-api-key.sk-proj-abc123'],
    });
    expect(r.status).toBe(401);
    expect(JSON.stringify(r)).not.toContain('sk-proj-abc123');
    expect(openai.handshakes.length + openai.rejected.length).toBe(before);
  });
});

describe('Gemini Live', () => {
  it('takes the till key from ?key=, puts the credential there, and meters each turn from usageMetadata', async () => {
    const { id, key } = await issue({ target: 'gemini', uses: 5, maxTokens: 100_000 });
    const conn = await connect(`/gemini${LIVE_PATH}?key=${key}`);
    const hs = gemini.handshakes.at(-1)!;
    expect(new URL(hs.path, 'http://x').searchParams.get('key')).toBe(secrets.gemini);
    expect(hs.headers['x-goog-api-key']).toBeUndefined();
    expect(JSON.stringify(hs)).not.toContain(key);

    conn.send({ setup: { model: 'models/gemini-2.0-flash-live-001', generationConfig: { responseModalities: ['TEXT'] } } });
    await conn.next((m) => m.setupComplete !== undefined);
    expect(conn.binary.at(-1)).toBe(true);
    // The key covers a whole turn (the model's largest answer): the setup goes on unchanged; each
    // turn's hold follows its output instead.
    expect(gemini.messages.at(-1)!.msg.setup.generationConfig.maxOutputTokens).toBeUndefined();

    conn.send({ clientContent: { turns: [{ role: 'user', parts: [{ text: 'hello' }] }], turnComplete: true } });
    const last = await conn.next((m) => m.serverContent?.turnComplete === true);
    const usage = last.usageMetadata as Json;
    expect(summary(id).used.activations).toBe(1);
    expect(summary(id).used.tokens).toBe(usage.promptTokenCount + usage.responseTokenCount);
    const finished = events.filter((e) => e.type === 'request.finished' && e.request.keyId === id);
    expect(finished).toHaveLength(1);
    expect(finished[0]).toMatchObject({ request: { method: 'WS', model: 'gemini-2.0-flash-live-001' }, usage: { estimated: false } });
    conn.ws.close();
  });

  it('accepts the till key in x-goog-api-key too, and sends the credential the same way', async () => {
    const { id, key } = await issue({ target: 'gemini', uses: 5 });
    const conn = await connect(`/gemini${LIVE_PATH}`, { headers: { 'x-goog-api-key': key } });
    const hs = gemini.handshakes.at(-1)!;
    expect(hs.headers['x-goog-api-key']).toBe(secrets.gemini);
    expect(hs.path).toBe(LIVE_PATH);
    conn.send({ setup: { model: 'models/gemini-2.0-flash-live-001' } });
    await conn.next((m) => m.setupComplete !== undefined);
    conn.send({ clientContent: { turns: [{ role: 'user', parts: [{ text: 'hello' }] }], turnComplete: true } });
    await conn.next((m) => m.serverContent?.turnComplete === true);
    expect(summary(id).used.activations).toBe(1);
    conn.ws.close();
  });

  it('a setup naming a model outside the key scope closes the session with 4003', async () => {
    const { key } = await issue({ target: 'gemini', uses: 5, models: ['gemini-2.5-*'] });
    const conn = await connect(`/gemini${LIVE_PATH}?key=${key}`);
    conn.send({ setup: { model: 'models/gemini-2.0-flash-live-001' } });
    const closed = await conn.closed;
    expect(closed.code).toBe(4003);
    expect(closed.reason).toContain('gemini-2.0-flash-live-001');
  });

  it("refuses a wrong key at the upgrade in Google's error shape", async () => {
    const r = await refusal(`/gemini${LIVE_PATH}?key=${makeTillKey(newKeyId())}`);
    expect(r.status).toBe(401);
    expect(r.body.error).toMatchObject({ code: 401, status: 'UNAUTHENTICATED' });
  });
});

describe('broker shutdown', () => {
  it('ends open WebSockets and settles their requests when the broker closes', async () => {
    const home = tempHome();
    const secret = fakeCredential('openai-ws2');
    const up = await startOpenAIWs(secret);
    await addCredential(home, 'openai', 'openai', secret);
    const other = await startTill({ home, env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
    try {
      const issued = await other.issue({ target: 'openai', uses: 5 });
      const ws = new WebSocket(`${other.url.replace(/^http/, 'ws')}/openai/v1/responses`, {
        headers: { authorization: `Bearer ${issued.key}` },
      });
      await new Promise((r, j) => {
        ws.once('open', r);
        ws.once('error', j);
      });
      const closed = new Promise<number>((r) => ws.once('close', (code) => r(code)));
      ws.send(JSON.stringify({ type: 'response.create', model: 'gpt-4o-mini', input: 'x', metadata: { test: 'hang' } }));
      await until(() => up.messages.length > 0);
      await sleep(20);
      const started = Date.now();
      await other.close();
      expect(Date.now() - started).toBeLessThan(2_000);
      expect(await closed).toBe(1006);
    } finally {
      await other.close();
      await up.close();
    }
  });
});
