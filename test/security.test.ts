/**
 * Security tests for the broker, in the manner of unjs/httpxy: real upstream fixtures on
 * 127.0.0.1:0, and assertions on what the upstream received (or that it received nothing).
 * Each test starts with a comment naming the attack it defends against.
 */
import * as http from 'node:http';
import * as net from 'node:net';
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeySummary } from '../src/core/events';
import type { ServiceOptions } from '../src/core/runtime/service';
import type { IssueInput, IssuedKey } from '../src/core/runtime/controlApi';
import { makeTillKey, newKeyId } from '../src/core/keys/tillKey';
import { serveTill, startInProcess, type Broker } from './support/served';
import { addCredential, fakeCredential, tempHome, writeConfig } from './support/till';
import { waitFor } from './support/wait';
import {
  startAnthropicUpstream,
  startGeminiUpstream,
  startGitHubUpstream,
  startOpenAIUpstream,
  type ReceivedRequest,
  type Upstream,
} from './support/upstreams';

// ---------------------------------------------------------------------------------------------
// Helpers

interface Reply {
  status: number;
  headers: http.IncomingHttpHeaders;
  text: string;
}

interface RequestInit {
  method?: string;
  headers?: Record<string, string>;
  body?: string | Buffer;
  signal?: AbortSignal;
}

/**
 * One request with node:http (fetch cannot set Host and hides some headers). No connection
 * pooling, so one test's socket never carries another's request. With `write`, the body is
 * written by the caller (a sliver, or paced chunks), told whether the answer has come, and the
 * connection is dropped once the answer is read.
 */
function send(
  base: string,
  path: string,
  init: RequestInit = {},
  write?: (req: http.ClientRequest, answered: () => boolean, fail: (err: Error) => void) => void,
): Promise<Reply> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    let answered = false;
    const req = http.request(
      { host: u.hostname, port: u.port, method: init.method ?? 'GET', path, headers: init.headers, agent: false, signal: init.signal },
      (res) => {
        answered = true;
        const chunks: Buffer[] = [];
        res.on('data', (c: Buffer) => chunks.push(c));
        res.on('end', () => {
          if (write) req.destroy();
          resolve({ status: res.statusCode ?? 0, headers: res.headers, text: Buffer.concat(chunks).toString('utf8') });
        });
        res.on('error', reject);
      },
    );
    // A body still being written when the answer came may fail to write: that is expected.
    req.on('error', (err) => {
      if (!(write && answered)) reject(err);
    });
    if (write) write(req, () => answered, reject);
    else req.end(init.body);
  });
}

const chatBody = (model = 'gpt-4o-mini') => JSON.stringify({ model, messages: [{ role: 'user', content: 'hi' }] });
const claudeBody = (model = 'claude-sonnet-5') => JSON.stringify({ model, max_tokens: 16, messages: [{ role: 'user', content: 'hi' }] });
const geminiBody = () => JSON.stringify({ contents: [{ role: 'user', parts: [{ text: 'hi' }] }] });
const JSON_TYPE = { 'content-type': 'application/json' };

/** POST /openai/v1/chat/completions with a Bearer till key. */
function chat(
  service: { url: string },
  key: string,
  init: { model?: string; headers?: Record<string, string>; signal?: AbortSignal } = {},
): Promise<Reply> {
  return send(service.url, '/openai/v1/chat/completions', {
    method: 'POST',
    headers: { ...JSON_TYPE, authorization: `Bearer ${key}`, ...init.headers },
    body: chatBody(init.model),
    signal: init.signal,
  });
}

function json(reply: Reply): Record<string, unknown> {
  return JSON.parse(reply.text) as Record<string, unknown>;
}

/** The message of a denial in any provider's shape. */
function messageOf(reply: Reply): string {
  const body = json(reply) as { message?: string; error?: { message?: string } };
  return body.error?.message ?? body.message ?? '';
}

function usage(broker: Broker, id: string): Promise<KeySummary> {
  return broker.key(id);
}

/** Everything the upstream saw of a request, as one string to search. */
const seen = (r: ReceivedRequest): string => JSON.stringify(r);

/** The secret part of a till key (what must never leak even without the prefix). */
const secretOf = (key: string): string => key.split('_')[2]!;

async function until(check: () => boolean | Promise<boolean>, what: string, timeoutMs = 5_000): Promise<void> {
  await waitFor(what, check, { timeoutMs, everyMs: 10 });
}

/** A port on 127.0.0.1 nobody listens on. */
async function closedPort(): Promise<number> {
  const server = net.createServer();
  await new Promise<void>((r) => server.listen(0, '127.0.0.1', () => r()));
  const { port } = server.address() as net.AddressInfo;
  await new Promise<void>((r) => server.close(() => r()));
  return port;
}

interface RawConnection {
  socket: net.Socket;
  /** Everything the broker sent so far. */
  received(): string;
  /** Resolves when the broker closed the connection, with what it sent. */
  closed: Promise<string>;
}

function rawConnect(base: string): Promise<RawConnection> {
  const u = new URL(base);
  return new Promise((resolve, reject) => {
    const socket = net.connect(Number(u.port), u.hostname, () => resolve({ socket, received: () => text, closed }));
    let text = '';
    socket.on('data', (c: Buffer) => (text += c.toString('latin1')));
    const closed = new Promise<string>((r) => socket.on('close', () => r(text)));
    socket.on('error', () => undefined);
    socket.once('error', reject);
  });
}

const statusLine = (text: string): number | undefined => {
  const m = /^HTTP\/1\.1 (\d{3})/.exec(text);
  return m ? Number(m[1]) : undefined;
};

interface World {
  home: string;
  /** `till serve` as users run it, unless the test needs settings only an in-process broker takes. */
  service: Broker;
  openai: Upstream;
  anthropic: Upstream;
  gemini: Upstream;
  github: Upstream;
  creds: { openai: string; anthropic: string; gemini: string; github: string };
  issue(input: IssueInput): Promise<IssuedKey>;
  /** Every request any upstream received or refused. */
  everything(): ReceivedRequest[];
  close(): Promise<void>;
}

/**
 * Four upstream fixtures, one credential for each, and a broker in front of them: `till serve`
 * with the upstreams in its environment and `config` in its data folder, as a user would run it;
 * with `inProcess` (timeouts users cannot set), a TillService built with those settings.
 */
async function world(options: { config?: object; inProcess?: ServiceOptions['broker']; hang?: boolean } = {}): Promise<World> {
  const creds = {
    openai: fakeCredential('openai'),
    anthropic: fakeCredential('anthropic'),
    gemini: fakeCredential('gemini'),
    github: fakeCredential('github'),
  };
  const hang = options.hang ?? false;
  const [openai, anthropic, gemini, github] = await Promise.all([
    startOpenAIUpstream({ credential: creds.openai, hang }),
    startAnthropicUpstream({ credential: creds.anthropic, hang }),
    startGeminiUpstream({ credential: creds.gemini, hang }),
    startGitHubUpstream({ credential: creds.github, hang }),
  ]);
  const home = tempHome();
  for (const p of ['openai', 'anthropic', 'gemini', 'github'] as const) await addCredential(home, `${p}-main`, p, creds[p]);
  if (options.config) writeConfig(home, options.config);
  const env = {
    TILL_UPSTREAM_OPENAI: `${openai.url}/v1`,
    TILL_UPSTREAM_ANTHROPIC: anthropic.url,
    TILL_UPSTREAM_GEMINI: gemini.url,
    TILL_UPSTREAM_GITHUB: github.url,
  };
  const service = options.inProcess ? await startInProcess({ home, env, broker: options.inProcess }) : await serveTill(home, { env });
  const ups = [openai, anthropic, gemini, github];
  return {
    home,
    service,
    openai,
    anthropic,
    gemini,
    github,
    creds,
    issue: (input) => service.issue(input),
    everything: () => ups.flatMap((u) => [...u.received, ...u.rejected]),
    close: async () => {
      await service.close();
      await Promise.all(ups.map((u) => u.close()));
    },
  };
}

// ---------------------------------------------------------------------------------------------

describe('broker security', () => {
  let w: World;
  beforeAll(async () => {
    // A small body limit, set the way users set it (config.json); the header limit is the default.
    w = await world({ config: { maxBodyBytes: 16 * 1024 } });
  });
  afterAll(() => w.close());

  describe('DNS rebinding', () => {
    it('refuses a Host header that is not a loopback name, before anything reaches the upstream', async () => {
      // Attack: DNS rebinding. A page on evil.example re-resolves its name to 127.0.0.1 and
      // calls the broker from the browser; the request then carries Host: evil.example.
      const k = await w.issue({ target: 'openai', uses: 5 });
      const port = new URL(w.service.url).port;
      const before = w.openai.received.length + w.openai.rejected.length;
      for (const host of [
        'evil.example',
        `evil.example:${port}`,
        `127.0.0.1.evil.example:${port}`,
        `localhost.evil.example:${port}`,
        `0.0.0.0:${port}`,
        `192.168.1.10:${port}`,
        `[::2]:${port}`,
      ]) {
        const r = await chat(w.service, k.key, { headers: { host: host } });
        expect(r.status, host).toBe(403);
        expect(r.headers['x-till-denial'], host).toBe('forbidden_host');
        expect(messageOf(r)).toMatch(/^till: .*Host/);
      }
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it('refuses a request without any Host header', async () => {
      // Attack: DNS rebinding variant that hopes a missing Host skips the check.
      const before = w.openai.received.length;
      const conn = await rawConnect(w.service.url);
      conn.socket.write('GET /openai/v1/models HTTP/1.0\r\nAuthorization: Bearer till_x\r\n\r\n');
      const text = await conn.closed;
      expect(statusLine(text)).toBeGreaterThanOrEqual(400);
      expect(w.openai.received.length).toBe(before);
    });

    it('accepts the loopback names 127.0.0.1, localhost and [::1], with a port', async () => {
      // Attack: none; the guard against DNS rebinding must not lock out legitimate local clients.
      const k = await w.issue({ target: 'openai' });
      const port = new URL(w.service.url).port;
      for (const host of [`127.0.0.1:${port}`, `localhost:${port}`, `[::1]:${port}`, `LocalHost:${port}`, '127.0.0.1', 'localhost']) {
        const r = await chat(w.service, k.key, { headers: { host } });
        expect(r.status, host).toBe(200);
      }
    });
  });

  describe('browser origin', () => {
    it('refuses any request carrying Origin or Sec-Fetch-Site', async () => {
      // Attack: a web page using the broker through the user's browser (a CORS or no-cors
      // request, or a form post). Browsers add Sec-Fetch-Site to every request (and Origin to
      // cross-origin ones); SDKs never do.
      const k = await w.issue({ target: 'openai' });
      const before = w.openai.received.length + w.openai.rejected.length;
      const variants: Record<string, string>[] = [
        { origin: 'https://evil.example' },
        { origin: 'null' },
        { origin: w.service.url },
        { 'sec-fetch-site': 'cross-site' },
        { 'sec-fetch-site': 'same-origin' },
        { 'sec-fetch-site': 'none', 'sec-fetch-mode': 'navigate' },
        { 'sec-fetch-site': 'cross-site', 'sec-fetch-mode': 'no-cors', 'sec-fetch-dest': 'image' },
        { origin: 'https://evil.example', 'sec-fetch-mode': 'cors' },
      ];
      for (const headers of variants) {
        const r = await chat(w.service, k.key, { headers });
        expect(r.status, JSON.stringify(headers)).toBe(403);
        expect(r.headers['x-till-denial']).toBe('browser_origin');
        expect(r.headers['access-control-allow-origin']).toBeUndefined();
        expect(messageOf(r)).toMatch(/^till: requests from web browsers are refused/);
      }
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it("accepts Sec-Fetch-Mode alone, which Node's own fetch (and so the OpenAI SDK) sends", async () => {
      // Attack: none; Node's fetch sends `Sec-Fetch-Mode: cors` on every request, without
      // Sec-Fetch-Site or Origin. Refusing it would lock out SDK clients, not browsers.
      const k = await w.issue({ target: 'openai' });
      const r = await chat(w.service, k.key, { headers: { 'sec-fetch-mode': 'cors' } });
      expect(r.status).toBe(200);
      expect(w.openai.received.at(-1)!.headers['sec-fetch-mode']).toBeUndefined();
      const viaFetch = await fetch(`${w.service.url}/openai/v1/chat/completions`, {
        method: 'POST',
        headers: { ...JSON_TYPE, authorization: `Bearer ${k.key}` },
        body: chatBody(),
      });
      expect(viaFetch.status).toBe(200);
      await viaFetch.text();
    });

    it('refuses a CORS preflight (OPTIONS) without granting anything', async () => {
      // Attack: a web page asking the browser for permission to send Authorization to the broker.
      const before = w.openai.received.length + w.openai.rejected.length;
      const r = await send(w.service.url, '/openai/v1/chat/completions', {
        method: 'OPTIONS',
        headers: {
          origin: 'https://evil.example',
          'access-control-request-method': 'POST',
          'access-control-request-headers': 'authorization, content-type',
          'sec-fetch-mode': 'cors',
        },
      });
      expect(r.status).toBe(403);
      for (const name of Object.keys(r.headers)) expect(name).not.toMatch(/^access-control-/);
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
    });
  });

  describe('oversized requests', () => {
    it('answers 431 to oversized headers', async () => {
      // Attack: memory exhaustion through huge request headers.
      const k = await w.issue({ target: 'openai', uses: 3 });
      const before = w.openai.received.length;
      // Over the default limit of 32 KiB.
      const r = await chat(w.service, k.key, { headers: { 'x-padding': 'a'.repeat(33 * 1024) } });
      expect(r.status).toBe(431);
      expect(w.openai.received.length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it('answers 413 to a declared Content-Length over the limit, before reading it or calling the upstream', async () => {
      // Attack: memory exhaustion (and a forwarded bill) through a huge request body.
      const k = await w.issue({ target: 'openai', uses: 3 });
      const before = w.openai.received.length + w.openai.rejected.length;
      const headers = { ...JSON_TYPE, authorization: `Bearer ${k.key}`, 'content-length': String(50 * 1024 * 1024) };
      // Only a sliver of the declared 50 MiB: the answer must come without waiting for the rest.
      const r = await send(w.service.url, '/openai/v1/chat/completions', { method: 'POST', headers }, (req) =>
        req.write('{"model":"gpt-4o-mini","messages":['),
      );
      expect(r.status).toBe(413);
      expect(r.headers['x-till-denial']).toBe('too_large');
      expect(messageOf(r)).toMatch(/^till: request body of 52428800 bytes is over the broker's limit of 16384/);
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
      expect(w.openai.inFlight()).toBe(0);
      const s = await usage(w.service, k.id);
      expect(s.used.activations).toBe(0);
      expect(s.remaining.activations).toBe(3);
    });

    /** Streams a chunked body, 4 KiB at a time, until the broker answers; returns the answer. */
    function chunkedUntilAnswered(key: string, contentType: string, path = '/openai/v1/chat/completions'): Promise<Reply> {
      const headers = { 'content-type': contentType, authorization: `Bearer ${key}`, 'transfer-encoding': 'chunked' };
      return send(w.service.url, path, { method: 'POST', headers }, (req, answered, fail) => {
        let sent = 0;
        // Paced, so the answer is read before the broker closes the connection: writing into a
        // closed connection would lose the answer to EPIPE/ECONNRESET.
        const pump = () => {
          if (answered() || req.destroyed) return;
          if (sent > 1024 * 1024) return fail(new Error(`the broker took ${sent} bytes of a chunked body without answering`));
          sent += 4096;
          req.write(Buffer.alloc(4096, 0x20), () => setTimeout(pump, 20));
        };
        pump();
      });
    }

    it('answers 413 to a chunked JSON body that grows over the limit; nothing reaches the upstream', async () => {
      // Attack: memory exhaustion with a body of undeclared length (Transfer-Encoding: chunked).
      const k = await w.issue({ target: 'openai', uses: 3 });
      const before = w.openai.received.length + w.openai.rejected.length;
      const r = await chunkedUntilAnswered(k.key, 'application/json');
      expect(r.status).toBe(413);
      expect(messageOf(r)).toMatch(/^till: request body is over the broker's limit of 16384 bytes/);
      await sleep(50);
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
      const s = await usage(w.service, k.id);
      expect(s.used.activations).toBe(0);
      expect(s.remaining.activations).toBe(3);
    });

    it('answers 413 to a chunked non-JSON upload that grows over the limit; the activation is not spent', async () => {
      // Attack: the same undeclared-length body, with a content type that is streamed through
      // instead of read whole, to slip past the body limit.
      const k = await w.issue({ target: 'openai', uses: 3 });
      const before = w.openai.received.length + w.openai.rejected.length;
      // An upload route (not metered): its body streams through rather than being read whole.
      const r = await chunkedUntilAnswered(k.key, 'application/octet-stream', '/openai/v1/audio/transcriptions');
      expect(r.status).toBe(413);
      expect(r.headers['x-till-denial']).toBe('too_large');
      expect(messageOf(r)).toMatch(/^till: request body is over the broker's limit of 16384 bytes/);
      await until(() => w.openai.inFlight() === 0, 'the upstream to drop the cut request');
      // The fixture records only requests whose body arrived whole: a cut upload never does.
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
      await until(async () => (await usage(w.service, k.id)).inFlight === 0, 'the key to have nothing in flight');
      const s = await usage(w.service, k.id);
      expect(s.used.activations).toBe(0);
      expect(s.remaining.activations).toBe(3);
    });
  });

  describe('till key handling', () => {
    it('answers 401 when no key is sent', async () => {
      // Attack: calling the broker with no credential at all, hoping it falls back to a default.
      const before = w.openai.received.length + w.openai.rejected.length;
      const r = await send(w.service.url, '/openai/v1/chat/completions', { method: 'POST', headers: JSON_TYPE, body: chatBody() });
      expect(r.status).toBe(401);
      expect(r.headers['x-till-denial']).toBe('missing_key');
      expect(messageOf(r)).toMatch(/^till: no till key/);
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
    });

    it('answers 400 to a malformed till key (bad checksum, wrong length), without echoing it', async () => {
      // Attack: guessing or tampering with keys; a typo must be told apart without a lookup.
      const k = await w.issue({ target: 'openai' });
      const last = k.key.at(-1)!;
      const badChecksum = k.key.slice(0, -1) + (last === 'A' ? 'B' : 'A');
      const cases: [string, RegExp][] = [
        [badChecksum, /checksum mismatch/],
        [k.key.slice(0, -1), /expected \d+ characters/],
        [k.key + 'x', /expected \d+ characters/],
        ['till_', /expected \d+ characters/],
      ];
      for (const [presented, why] of cases) {
        const r = await chat(w.service, presented);
        expect(r.status, presented).toBe(400);
        expect(r.headers['x-till-denial']).toBe('malformed_key');
        expect(messageOf(r)).toMatch(/^till: malformed till key/);
        expect(messageOf(r)).toMatch(why);
        if (presented.length > 10) expect(r.text).not.toContain(presented);
        expect(r.text).not.toContain(secretOf(k.key));
      }
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it('answers 401 to a well-formed key that was never issued, or whose secret is wrong', async () => {
      // Attack: forging a key: a valid shape and checksum for an unknown id, or for a known id
      // with a guessed secret.
      const k = await w.issue({ target: 'openai', uses: 2 });
      const before = w.openai.received.length + w.openai.rejected.length;
      for (const forged of [makeTillKey(newKeyId()), makeTillKey(k.id)]) {
        const r = await chat(w.service, forged);
        expect(r.status).toBe(401);
        expect(r.headers['x-till-denial']).toBe('unknown_key');
        expect(messageOf(r)).toMatch(/^till: unknown till key/);
        expect(r.text).not.toContain(forged);
      }
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it('refuses a real (non-till) key with 401 and never forwards it, wherever it is put', async () => {
      // Attack: using the broker as an open relay with a real key, or leaking a real key that an
      // agent sent by mistake to the upstream through the broker.
      const stray = fakeCredential('stray');
      const attempts: [string, RequestInit][] = [
        ['/openai/v1/chat/completions', { method: 'POST', headers: { ...JSON_TYPE, authorization: `Bearer ${stray}` }, body: chatBody() }],
        [
          '/anthropic/v1/messages',
          { method: 'POST', headers: { ...JSON_TYPE, 'x-api-key': stray, 'anthropic-version': '2023-06-01' }, body: claudeBody() },
        ],
        [`/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=${stray}`, { method: 'POST', headers: JSON_TYPE, body: geminiBody() }],
        [
          '/gemini/v1beta/models/gemini-2.5-flash:generateContent',
          { method: 'POST', headers: { ...JSON_TYPE, 'x-goog-api-key': stray }, body: geminiBody() },
        ],
        ['/github/user', { headers: { authorization: `token ${stray}` } }],
        ['/openai/v1/chat/completions', { method: 'POST', headers: { ...JSON_TYPE, 'api-key': stray }, body: chatBody() }],
      ];
      for (const [path, init] of attempts) {
        const r = await send(w.service.url, path, init);
        expect(r.status, path).toBe(401);
        expect(r.headers['x-till-denial']).toBe('missing_key');
        expect(messageOf(r)).toMatch(/^till: the broker accepts only till keys .* not forwarded/);
        expect(r.text).not.toContain(stray);
        expect(JSON.stringify(r.headers)).not.toContain(stray);
      }
      for (const req of w.everything()) expect(seen(req)).not.toContain(stray);
    });

    it('drops a real key sent next to a till key instead of forwarding it', async () => {
      // Attack: smuggling a second credential past the broker alongside a valid till key.
      const stray = fakeCredential('smuggled');
      const k = await w.issue({ target: 'openai' });
      const r = await send(w.service.url, `/openai/v1/chat/completions?key=${stray}`, {
        method: 'POST',
        headers: { ...JSON_TYPE, authorization: `Bearer ${k.key}`, 'x-api-key': stray, 'x-goog-api-key': stray, 'api-key': stray },
        body: chatBody(),
      });
      expect(r.status).toBe(200);
      const got = w.openai.received.at(-1)!;
      expect(seen(got)).not.toContain(stray);
      expect(got.headers.authorization).toBe(`Bearer ${w.creds.openai}`);
    });

    it('answers 400 to a request carrying two different till keys', async () => {
      // Attack: confusing which key is charged (authorize with one, bill another).
      const a = await w.issue({ target: 'openai', uses: 1 });
      const b = await w.issue({ target: 'openai', uses: 1 });
      const before = w.openai.received.length;
      const r = await chat(w.service, a.key, { headers: { 'x-api-key': b.key } });
      expect(r.status).toBe(400);
      expect(r.headers['x-till-denial']).toBe('malformed_key');
      expect(messageOf(r)).toMatch(/^till: the request carries two different till keys/);
      expect(r.text).not.toContain(a.key);
      expect(r.text).not.toContain(b.key);
      expect(w.openai.received.length).toBe(before);
      // The same key twice is fine.
      const same = await chat(w.service, a.key, { headers: { 'x-api-key': a.key } });
      expect(same.status).toBe(200);
    });

    it("finds the till key wherever a provider SDK sends it, swaps in the credential in the provider's place, and never forwards the till key", async () => {
      // Attack: the till key leaking to a model provider (into their logs, and thereby to
      // anyone who reads them), and the credential landing in a place the provider ignores.
      const openai = await w.issue({ target: 'openai' });
      const anthropic = await w.issue({ target: 'anthropic' });
      const gemini = await w.issue({ target: 'gemini' });
      const github = await w.issue({ target: 'github' });
      const cases: { name: string; key: IssuedKey; up: Upstream; path: string; init: RequestInit; check(r: ReceivedRequest): void }[] = [
        {
          name: 'openai, Authorization: Bearer',
          key: openai,
          up: w.openai,
          path: '/openai/v1/chat/completions',
          init: { method: 'POST', headers: { ...JSON_TYPE, authorization: `Bearer ${openai.key}` }, body: chatBody() },
          check: (r) => expect(r.headers.authorization).toBe(`Bearer ${w.creds.openai}`),
        },
        {
          name: 'openai, api-key (Azure style)',
          key: openai,
          up: w.openai,
          path: '/openai/v1/chat/completions',
          init: { method: 'POST', headers: { ...JSON_TYPE, 'api-key': openai.key }, body: chatBody() },
          check: (r) => {
            expect(r.headers.authorization).toBe(`Bearer ${w.creds.openai}`);
            expect(r.headers['api-key']).toBeUndefined();
          },
        },
        {
          name: 'openai, ?key=',
          key: openai,
          up: w.openai,
          path: `/openai/v1/chat/completions?key=${openai.key}&trace=1`,
          init: { method: 'POST', headers: JSON_TYPE, body: chatBody() },
          check: (r) => {
            expect(r.headers.authorization).toBe(`Bearer ${w.creds.openai}`);
            expect(r.path).toBe('/v1/chat/completions?trace=1');
          },
        },
        {
          name: 'anthropic, x-api-key',
          key: anthropic,
          up: w.anthropic,
          path: '/anthropic/v1/messages',
          init: {
            method: 'POST',
            headers: { ...JSON_TYPE, 'x-api-key': anthropic.key, 'anthropic-version': '2023-06-01' },
            body: claudeBody(),
          },
          check: (r) => {
            expect(r.headers['x-api-key']).toBe(w.creds.anthropic);
            expect(r.headers.authorization).toBeUndefined();
          },
        },
        {
          name: 'anthropic, Authorization: Bearer (ANTHROPIC_AUTH_TOKEN)',
          key: anthropic,
          up: w.anthropic,
          path: '/anthropic/v1/messages',
          init: { method: 'POST', headers: { ...JSON_TYPE, authorization: `Bearer ${anthropic.key}` }, body: claudeBody() },
          check: (r) => {
            expect(r.headers['x-api-key']).toBe(w.creds.anthropic);
            expect(r.headers.authorization).toBeUndefined();
            expect(r.headers['anthropic-version']).toBe('2023-06-01');
          },
        },
        {
          name: 'gemini, x-goog-api-key',
          key: gemini,
          up: w.gemini,
          path: '/gemini/v1beta/models/gemini-2.5-flash:generateContent',
          init: { method: 'POST', headers: { ...JSON_TYPE, 'x-goog-api-key': gemini.key }, body: geminiBody() },
          check: (r) => expect(r.headers['x-goog-api-key']).toBe(w.creds.gemini),
        },
        {
          name: 'gemini, ?key=',
          key: gemini,
          up: w.gemini,
          path: `/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=${gemini.key}&alt=json`,
          init: { method: 'POST', headers: JSON_TYPE, body: geminiBody() },
          check: (r) => {
            expect(r.headers['x-goog-api-key']).toBe(w.creds.gemini);
            expect(r.path).toBe('/v1beta/models/gemini-2.5-flash:generateContent?alt=json');
            expect(new URL(r.path, 'http://x').searchParams.has('key')).toBe(false);
          },
        },
        {
          name: 'github, Authorization: token',
          key: github,
          up: w.github,
          path: '/github/user',
          init: { headers: { authorization: `token ${github.key}` } },
          check: (r) => expect(r.headers.authorization).toBe(`Bearer ${w.creds.github}`),
        },
        {
          name: 'github, Authorization: Bearer',
          key: github,
          up: w.github,
          path: '/github/user',
          init: { headers: { authorization: `Bearer ${github.key}` } },
          check: (r) => expect(r.headers.authorization).toBe(`Bearer ${w.creds.github}`),
        },
      ];
      for (const c of cases) {
        const before = c.up.received.length;
        const r = await send(w.service.url, c.path, c.init);
        expect(r.status, `${c.name}: ${r.text}`).toBe(200);
        expect(c.up.received.length, c.name).toBe(before + 1);
        const got = c.up.received.at(-1)!;
        c.check(got);
        expect(seen(got), c.name).not.toContain(c.key.key);
        expect(seen(got), c.name).not.toContain(secretOf(c.key.key));
        expect(seen(got), c.name).not.toContain('till_');
        // And the answer does not hand the credential back to the agent.
        expect(r.text).not.toContain(w.creds.openai);
        expect(JSON.stringify(r.headers)).not.toMatch(/REALCRED/);
      }
      for (const req of w.everything()) {
        for (const k of [openai, anthropic, gemini, github]) expect(seen(req)).not.toContain(secretOf(k.key));
      }
    });

    it('does not forward hop-by-hop headers, cookies or the referer', async () => {
      // Attack: request smuggling and credential leakage through connection-scoped headers
      // (Proxy-Authorization, headers named in Connection) and browser state (Cookie).
      const k = await w.issue({ target: 'openai' });
      const r = await chat(w.service, k.key, {
        headers: {
          connection: 'keep-alive, x-hop-secret',
          'x-hop-secret': 'hop',
          'keep-alive': 'timeout=5',
          'proxy-authorization': 'Basic cHJveHk6c2VjcmV0',
          'proxy-connection': 'keep-alive',
          te: 'trailers',
          upgrade: 'h2c',
          cookie: 'session=browser-session',
          // A foreign Referer marks a browser and is refused (see "browser origin"); a loopback one is only dropped.
          referer: 'http://127.0.0.1:3000/page',
          'x-end-to-end': 'kept',
        },
      });
      expect(r.status).toBe(200);
      const got = w.openai.received.at(-1)!.headers;
      for (const name of [
        'x-hop-secret',
        'keep-alive',
        'proxy-authorization',
        'proxy-connection',
        'te',
        'upgrade',
        'cookie',
        'referer',
        'origin',
      ]) {
        expect(got[name], name).toBeUndefined();
      }
      expect(JSON.stringify(got)).not.toMatch(/browser-session|cHJveHk6c2VjcmV0/);
      // Ordinary end-to-end headers still go through.
      expect(got['x-end-to-end']).toBe('kept');
    });
  });

  describe('provider-shaped denials', () => {
    it("speaks OpenAI's error shape, with a message a person understands", async () => {
      // Attack: a runaway agent; it must get a hard, clear stop in the shape its SDK understands.
      const k = await w.issue({ target: 'openai', uses: 2 });
      expect((await chat(w.service, k.key)).status).toBe(200);
      expect((await chat(w.service, k.key)).status).toBe(200);
      const before = w.openai.received.length;
      const r = await chat(w.service, k.key);
      expect(r.status).toBe(429);
      expect(r.headers['content-type']).toMatch(/application\/json/);
      expect(json(r)).toEqual({
        error: {
          message: 'till: till key exhausted: 2 of 2 activations used',
          type: 'rate_limit_error',
          param: null,
          code: 'till_exhausted',
        },
      });
      expect(w.openai.received.length).toBe(before);
      const s = await usage(w.service, k.id);
      expect(s.used.activations).toBe(2);
      expect(s.remaining.activations).toBe(0);
    });

    it("speaks Anthropic's error shape", async () => {
      // Attack: none; an Anthropic SDK must surface the refusal as its own error type.
      const r = await send(w.service.url, '/anthropic/v1/messages', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'anthropic-version': '2023-06-01' },
        body: claudeBody(),
      });
      expect(r.status).toBe(401);
      const body = json(r) as { type: string; error: { type: string; message: string } };
      expect(body.type).toBe('error');
      expect(body.error.type).toBe('authentication_error');
      expect(body.error.message).toMatch(/^till: no till key: send it the way the provider expects/);
      expect(Object.keys(body).sort()).toEqual(['error', 'type']);
    });

    it("speaks Gemini's error shape", async () => {
      // Attack: none; a Gemini client must surface the refusal as its own error type.
      const k = await w.issue({ target: 'gemini', models: ['gemini-2.5-flash'] });
      const r = await send(w.service.url, '/gemini/v1beta/models/gemini-2.5-pro:generateContent', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'x-goog-api-key': k.key },
        body: geminiBody(),
      });
      expect(r.status).toBe(403);
      const body = json(r) as { error: { code: number; message: string; status: string } };
      expect(body.error.code).toBe(403);
      expect(body.error.status).toBe('PERMISSION_DENIED');
      expect(body.error.message).toBe('till: model gemini-2.5-pro is not allowed for this till key (allowed: gemini-2.5-flash)');
    });

    it("speaks GitHub's error shape", async () => {
      // Attack: none; gh and Octokit read `message`.
      const r = await send(w.service.url, '/github/user');
      expect(r.status).toBe(401);
      const body = json(r) as { message: string; status: string };
      expect(body.message).toMatch(/^till: no till key/);
      expect(body.status).toBe('401');
    });
  });

  describe('routing', () => {
    it("refuses a key for one provider on another provider's route with 403", async () => {
      // Attack: a key scoped to one provider used to spend another provider's credential.
      const k = await w.issue({ target: 'openai', uses: 3 });
      const before = w.everything().length;
      const r = await send(w.service.url, '/anthropic/v1/messages', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'x-api-key': k.key, 'anthropic-version': '2023-06-01' },
        body: claudeBody(),
      });
      expect(r.status).toBe(403);
      expect(r.headers['x-till-denial']).toBe('wrong_provider');
      expect((json(r) as { type: string }).type).toBe('error');
      expect(messageOf(r)).toMatch(/^till: till key ".*" is for openai, not anthropic$/);
      expect(w.everything().length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it('answers 404 for an unknown provider', async () => {
      // Attack: probing for routes that might forward somewhere unchecked.
      const k = await w.issue({ target: 'openai' });
      const r = await send(w.service.url, '/evil/v1/chat/completions', {
        method: 'POST',
        headers: { ...JSON_TYPE, authorization: `Bearer ${k.key}` },
        body: chatBody(),
      });
      expect(r.status).toBe(404);
      expect(r.headers['x-till-denial']).toBe('unknown_provider');
      expect(messageOf(r)).toContain(`${w.service.url}/openai/v1`);
      expect(r.text).not.toContain(k.key);
    });

    it("answers 404 naming the right base URL for a path outside the provider's base path", async () => {
      // Attack: reaching upstream paths outside the API's namespace (and a clear hint for a
      // client configured without /v1).
      const k = await w.issue({ target: 'openai', uses: 2 });
      const before = w.openai.received.length + w.openai.rejected.length;
      for (const path of ['/openai/chat/completions', '/openai/v1x/chat/completions', '/openai', '/openai/']) {
        const r = await send(w.service.url, path, {
          method: 'POST',
          headers: { ...JSON_TYPE, authorization: `Bearer ${k.key}` },
          body: chatBody(),
        });
        expect(r.status, path).toBe(404);
        expect(messageOf(r), path).toContain(`use the base URL ${w.service.url}/openai/v1`);
      }
      expect(w.openai.received.length + w.openai.rejected.length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it('refuses dot segments that would climb out of an allowed path scope', async () => {
      // Attack: path traversal. `/v1/chat/../../admin` matches the scope `/v1/chat/*` as text,
      // but URL resolution turns it into `/admin` on the way upstream.
      const k = await w.issue({ target: 'github', paths: ['/repos/me/*'], uses: 5 });
      const before = w.github.received.length + w.github.rejected.length;
      for (const path of [
        '/github/repos/me/../../user',
        '/github/repos/me/%2e%2e/%2E%2E/user',
        '/github/repos/me/x/..',
        '/github/repos/me/.%2e/.%2E/user',
        '/github/repos/me/..\\..\\user',
      ]) {
        const r = await send(w.service.url, path, { headers: { authorization: `Bearer ${k.key}` } });
        expect([400, 403], `${path}: ${r.status} ${r.text}`).toContain(r.status);
      }
      expect(w.github.received.length + w.github.rejected.length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
      // In scope, it works.
      const ok = await send(w.service.url, '/github/repos/me/project', { headers: { authorization: `Bearer ${k.key}` } });
      expect(ok.status).toBe(200);
      expect(w.github.received.at(-1)!.path).toBe('/repos/me/project');
    });

    it('refuses dot segments that would swap the Gemini model named in the path', async () => {
      // Attack: model-scope bypass. The scope check reads `gemini-2.5-flash` from the path, the
      // upstream resolves the dots and runs gemini-2.5-pro.
      const k = await w.issue({ target: 'gemini', models: ['gemini-2.5-flash'] });
      const before = w.gemini.received.length + w.gemini.rejected.length;
      for (const path of [
        '/gemini/v1beta/models/gemini-2.5-flash:x/../gemini-2.5-pro:generateContent',
        '/gemini/v1beta/models/gemini-2.5-flash:x/%2e%2e/gemini-2.5-pro:generateContent',
      ]) {
        const r = await send(w.service.url, path, {
          method: 'POST',
          headers: { ...JSON_TYPE, 'x-goog-api-key': k.key },
          body: geminiBody(),
        });
        expect([400, 403], `${path}: ${r.status} ${r.text}`).toContain(r.status);
      }
      expect(w.gemini.received.length + w.gemini.rejected.length).toBe(before);
    });

    it('survives a malformed percent-encoding in the Gemini model path', async () => {
      // Attack: crashing the broker (denial of service for every agent) with a path that
      // cannot be percent-decoded.
      const k = await w.issue({ target: 'gemini', models: ['gemini-2.5-flash'] });
      const r = await send(w.service.url, '/gemini/v1beta/models/gemini-%E0%A4%A:generateContent', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'x-goog-api-key': k.key },
        body: geminiBody(),
      });
      expect(r.status).toBe(400);
      expect(messageOf(r)).toMatch(/^till: /);
      // Still serving.
      const ok = await send(w.service.url, '/gemini/v1beta/models/gemini-2.5-flash:generateContent', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'x-goog-api-key': k.key },
        body: geminiBody(),
      });
      expect(ok.status).toBe(200);
    });
  });

  describe('scope', () => {
    it("refuses methods outside the key's scope with 403", async () => {
      // Attack: a read-only key used to write (e.g. create issues on GitHub).
      const k = await w.issue({ target: 'github', methods: ['GET'] });
      const before = w.github.received.length;
      const r = await send(w.service.url, '/github/repos/me/project/issues', {
        method: 'POST',
        headers: { ...JSON_TYPE, authorization: `Bearer ${k.key}` },
        body: JSON.stringify({ title: 'pwned' }),
      });
      expect(r.status).toBe(403);
      expect(r.headers['x-till-denial']).toBe('out_of_scope');
      expect(messageOf(r)).toBe('till: method POST is not allowed for this till key (allowed: GET)');
      expect(w.github.received.length).toBe(before);
      expect((await send(w.service.url, '/github/user', { headers: { authorization: `Bearer ${k.key}` } })).status).toBe(200);
    });

    it("refuses paths outside the key's scope with 403", async () => {
      // Attack: a chat-only key used for other endpoints (files, fine-tuning, batches).
      const k = await w.issue({ target: 'openai', paths: ['/v1/chat/*'] });
      const before = w.openai.received.length;
      const r = await send(w.service.url, '/openai/v1/responses', {
        method: 'POST',
        headers: { ...JSON_TYPE, authorization: `Bearer ${k.key}` },
        body: JSON.stringify({ model: 'gpt-4o-mini', input: 'hi' }),
      });
      expect(r.status).toBe(403);
      expect(messageOf(r)).toBe('till: path /v1/responses is not allowed for this till key (allowed: /v1/chat/*)');
      expect(w.openai.received.length).toBe(before);
      expect((await chat(w.service, k.key)).status).toBe(200);
    });

    it("refuses models outside the key's scope, from the JSON body and from the Gemini path", async () => {
      // Attack: a key meant for a cheap model used for an expensive one.
      const k = await w.issue({ target: 'openai', models: ['gpt-4o-mini', 'gpt-4.1*'] });
      const before = w.openai.received.length;
      const r = await chat(w.service, k.key, { model: 'gpt-5' });
      expect(r.status).toBe(403);
      expect(messageOf(r)).toBe('till: model gpt-5 is not allowed for this till key (allowed: gpt-4o-mini, gpt-4.1*)');
      expect(w.openai.received.length).toBe(before);
      expect((await chat(w.service, k.key, { model: 'gpt-4o-mini' })).status).toBe(200);
      expect((await chat(w.service, k.key, { model: 'gpt-4.1' })).status).toBe(200);

      const g = await w.issue({ target: 'gemini', models: ['gemini-2.5-flash'] });
      const gBefore = w.gemini.received.length;
      const pro = await send(w.service.url, '/gemini/v1beta/models/gemini-2.5-pro:generateContent', {
        method: 'POST',
        // A body `model` naming the allowed one does not override the path.
        headers: { ...JSON_TYPE, 'x-goog-api-key': g.key },
        body: JSON.stringify({ model: 'gemini-2.5-flash', contents: [{ role: 'user', parts: [{ text: 'hi' }] }] }),
      });
      expect(pro.status).toBe(403);
      expect(w.gemini.received.length).toBe(gBefore);
      const flash = await send(w.service.url, '/gemini/v1beta/models/gemini-2.5-flash:generateContent', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'x-goog-api-key': g.key },
        body: geminiBody(),
      });
      expect(flash.status).toBe(200);
    });

    it('answers 400 to a JSON body that does not parse on a models-limited key', async () => {
      // Attack: a body the broker cannot read (but a lenient upstream might) to hide the model.
      const k = await w.issue({ target: 'openai', models: ['gpt-4o-mini'] });
      const before = w.openai.received.length;
      const r = await send(w.service.url, '/openai/v1/chat/completions', {
        method: 'POST',
        headers: { ...JSON_TYPE, authorization: `Bearer ${k.key}` },
        body: '{"model":"gpt-5", "messages": [',
      });
      expect(r.status).toBe(400);
      expect(messageOf(r)).toBe('till: the request body is not valid JSON, so its model cannot be checked');
      expect(w.openai.received.length).toBe(before);
      expect((await usage(w.service, k.id)).used.activations).toBe(0);
    });

    it('refuses a billable request whose model is hidden behind a non-JSON content type', async () => {
      // Attack: model-scope bypass by declaring the JSON body as text/plain (many upstreams
      // parse the body whatever the content type).
      const k = await w.issue({ target: 'openai', models: ['gpt-4o-mini'] });
      const before = w.openai.received.length;
      for (const contentType of ['text/plain', 'application/x-www-form-urlencoded']) {
        const r = await send(w.service.url, '/openai/v1/chat/completions', {
          method: 'POST',
          headers: { 'content-type': contentType, authorization: `Bearer ${k.key}` },
          body: chatBody('gpt-5'),
        });
        expect(r.status, contentType).toBe(403);
      }
      expect(w.openai.received.length).toBe(before);
    });

    it('does not spend activations on non-billable routes (model lists, HEAD, token counting)', async () => {
      // Attack: bookkeeping calls burning a use-limited key (HashiCorp Vault's lookup-self).
      const o = await w.issue({ target: 'openai', uses: 1 });
      for (let i = 0; i < 3; i++) {
        const r = await send(w.service.url, '/openai/v1/models', { headers: { authorization: `Bearer ${o.key}` } });
        expect(r.status).toBe(200);
      }
      const head = await send(w.service.url, '/openai/v1/models', { method: 'HEAD', headers: { authorization: `Bearer ${o.key}` } });
      expect(head.status).toBeLessThan(500);
      expect((await usage(w.service, o.id)).used.activations).toBe(0);
      expect((await usage(w.service, o.id)).remaining.activations).toBe(1);
      expect((await chat(w.service, o.key)).status).toBe(200);
      expect((await usage(w.service, o.id)).used.activations).toBe(1);
      expect((await usage(w.service, o.id)).remaining.activations).toBe(0);
      // Listing models still works on an exhausted key; a billable call does not.
      expect((await send(w.service.url, '/openai/v1/models', { headers: { authorization: `Bearer ${o.key}` } })).status).toBe(200);
      expect((await chat(w.service, o.key)).status).toBe(429);

      const a = await w.issue({ target: 'anthropic', uses: 1 });
      const headers = { ...JSON_TYPE, 'x-api-key': a.key, 'anthropic-version': '2023-06-01' };
      for (let i = 0; i < 2; i++) {
        const r = await send(w.service.url, '/anthropic/v1/messages/count_tokens', {
          method: 'POST',
          headers,
          body: JSON.stringify({ model: 'claude-sonnet-5', messages: [{ role: 'user', content: 'hi' }] }),
        });
        expect(r.status).toBe(200);
      }
      const warmup = await send(w.service.url, '/anthropic/', { method: 'HEAD', headers });
      expect(warmup.status).toBe(200);
      expect((await usage(w.service, a.id)).used.activations).toBe(0);
      expect((await usage(w.service, a.id)).remaining.activations).toBe(1);
    });
  });

  describe('limits', () => {
    it('answers 429 with Retry-After over the rpm limit', async () => {
      // Attack: a runaway agent hammering the API.
      const k = await w.issue({ target: 'openai', rpm: 2 });
      expect((await chat(w.service, k.key)).status).toBe(200);
      expect((await chat(w.service, k.key)).status).toBe(200);
      const before = w.openai.received.length;
      const r = await chat(w.service, k.key);
      expect(r.status).toBe(429);
      expect(r.headers['x-till-denial']).toBe('rate_limited');
      const retry = Number(r.headers['retry-after']);
      expect(retry).toBeGreaterThanOrEqual(1);
      expect(retry).toBeLessThanOrEqual(60);
      expect(messageOf(r)).toMatch(/^till: till key ".*" is limited to 2 requests per minute; retry in \d+ s$/);
      expect(w.openai.received.length).toBe(before);
    });

    it('answers 401 expired once the ttl has passed (ms number or duration text)', async () => {
      // Attack: a leaked key used after its intended lifetime.
      const short = await w.issue({ target: 'openai', ttl: 200 });
      const text = await w.issue({ target: 'openai', ttl: '1s' });
      expect((await chat(w.service, short.key)).status).toBe(200);
      expect((await chat(w.service, text.key)).status).toBe(200);
      await sleep(300);
      const before = w.openai.received.length;
      const r = await chat(w.service, short.key);
      expect(r.status).toBe(401);
      expect(r.headers['x-till-denial']).toBe('expired');
      expect(messageOf(r)).toMatch(/^till: till key ".*" expired at \d{4}-\d\d-\d\dT/);
      expect((await usage(w.service, short.id)).state).toBe('expired');
      await sleep(1_100 - 300);
      expect((await chat(w.service, text.key)).status).toBe(401);
      expect(w.openai.received.length).toBe(before);
    });

    it('answers 401 to a revoked key', async () => {
      // Attack: a leaked key used after the user revoked it.
      const k = await w.issue({ target: 'openai' });
      expect((await chat(w.service, k.key)).status).toBe(200);
      await w.service.revoke(k.id);
      const before = w.openai.received.length;
      const r = await chat(w.service, k.key);
      expect(r.status).toBe(401);
      expect(messageOf(r)).toMatch(/^till: till key ".*" was revoked$/);
      expect(w.openai.received.length).toBe(before);
    });
  });
});

describe('secrets in denials, logs and the ledger', () => {
  it('never writes the presented key or the credential into a denial, an event, the audit log or the broker log', async () => {
    // Attack: a key leaking through error messages, logs or the UI after issue (the broker
    // echoing what it rejected, or logging the credential it swapped in).
    const x = await world();
    const replies: Reply[] = [];
    try {
      const k = await x.issue({ target: 'openai', uses: 1, models: ['gpt-4o-mini'], paths: ['/v1/chat/*', '/v1/models'] });
      const g = await x.issue({ target: 'gemini' });
      const stray = fakeCredential('stray');
      const bearer = { ...JSON_TYPE, authorization: `Bearer ${k.key}` };
      const post = (path: string, headers: Record<string, string>, body = chatBody()) =>
        send(x.service.url, path, { method: 'POST', headers, body });
      replies.push(await post('/openai/v1/chat/completions', bearer)); // 200
      replies.push(await post('/openai/v1/chat/completions', bearer)); // exhausted
      replies.push(await post('/openai/v1/chat/completions', bearer, chatBody('gpt-5'))); // model out of scope
      replies.push(await post('/openai/v1/responses', bearer)); // path out of scope
      replies.push(await post('/openai/chat/completions', bearer)); // outside base path
      replies.push(await post('/anthropic/v1/messages', { ...JSON_TYPE, 'x-api-key': k.key })); // wrong provider
      replies.push(
        await post('/openai/v1/chat/completions', {
          ...JSON_TYPE,
          authorization: `Bearer ${k.key.slice(0, -1)}${k.key.endsWith('Z') ? 'Y' : 'Z'}`,
        }),
      ); // checksum
      replies.push(await post('/openai/v1/chat/completions', { ...JSON_TYPE, authorization: `Bearer ${k.key}x` })); // length
      replies.push(await post('/openai/v1/chat/completions', { ...JSON_TYPE, authorization: `Bearer ${stray}` })); // real key
      replies.push(await post(`/openai/v1/chat/completions?key=${stray}`, JSON_TYPE)); // real key in query
      replies.push(await post('/openai/v1/chat/completions', { ...bearer, origin: 'https://evil.example' })); // browser
      replies.push(await post('/openai/v1/chat/completions', { ...bearer, host: 'evil.example' })); // rebinding
      replies.push(await post(`/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=${g.key}`, JSON_TYPE, geminiBody())); // 200 via ?key=
      await x.gemini.close();
      replies.push(await post(`/gemini/v1beta/models/gemini-2.5-flash:generateContent?key=${g.key}`, JSON_TYPE, geminiBody())); // 502
      expect(replies.map((r) => r.status)).toEqual([200, 429, 403, 403, 404, 403, 400, 400, 401, 401, 403, 403, 200, 502]);

      const secrets = [k.key, secretOf(k.key), g.key, secretOf(g.key), stray, ...Object.values(x.creds)];
      for (const r of replies.slice(1)) {
        const all = r.text + JSON.stringify(r.headers);
        for (const s of secrets) expect(all).not.toContain(s);
        if (r.status !== 200) expect(messageOf(r)).toMatch(/^till: /);
      }
      await until(() => x.service.events().filter((e) => e.type === 'request.denied').length >= 11, 'the denials to be streamed');
      for (const s of secrets) {
        expect(JSON.stringify(x.service.events())).not.toContain(s);
        expect(x.service.log()).not.toContain(s);
      }
    } finally {
      await x.close();
    }
    // Closing flushed the audit log. Nothing in the data folder holds a key or a credential.
    const secretsAfter = [...Object.values(x.creds)];
    const files = readdirSync(x.home)
      .map((f) => join(x.home, f))
      .filter((f) => statSync(f).isFile());
    const audit = readFileSync(join(x.home, 'audit.jsonl'), 'utf8');
    expect(audit.split('\n').filter(Boolean).length).toBeGreaterThanOrEqual(12);
    expect(audit).not.toMatch(/till_[0-9A-Za-z]{10}_[0-9A-Za-z]{30}/);
    for (const f of files) {
      const text = readFileSync(f, 'latin1');
      expect(text, f).not.toMatch(/till_[0-9A-Za-z]{10}_[0-9A-Za-z]{30}/);
      expect(text, f).not.toContain('REALCRED');
      for (const s of secretsAfter) expect(text, f).not.toContain(s);
    }
  });
});

describe('slow clients', () => {
  let w: World;
  beforeAll(async () => {
    w = await world({ inProcess: { headersTimeoutMs: 300, requestTimeoutMs: 800 } });
  });
  afterAll(() => w.close());

  it('closes a connection whose headers dribble in slower than headersTimeoutMs, and keeps serving others', async () => {
    // Attack: slowloris. Headers sent one byte-line at a time hold a connection (and its
    // memory) open for as long as the attacker likes.
    const k = await w.issue({ target: 'openai', uses: 5 });
    const conn = await rawConnect(w.service.url);
    const started = Date.now();
    conn.socket.write('POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n');
    let n = 0;
    const drip = setInterval(() => {
      if (!conn.socket.destroyed) conn.socket.write(`X-Drip-${n++}: x\r\n`);
    }, 100);
    try {
      // Meanwhile, an honest client is served.
      await sleep(150);
      expect((await chat(w.service, k.key)).status).toBe(200);
      const text = await Promise.race([conn.closed, sleep(5_000).then(() => 'still open')]);
      expect(text).not.toBe('still open');
      expect(Date.now() - started).toBeLessThan(3_000);
      if (text !== '') expect(statusLine(text)).toBe(408);
    } finally {
      clearInterval(drip);
      conn.socket.destroy();
    }
    expect((await usage(w.service, k.id)).used.activations).toBe(1);
  });

  it('closes a connection whose body stalls past requestTimeoutMs; nothing is forwarded or spent', async () => {
    // Attack: slow POST (R.U.D.Y.): a complete head, then a body that never finishes.
    const k = await w.issue({ target: 'openai', uses: 5 });
    const before = w.openai.received.length + w.openai.rejected.length;
    const conn = await rawConnect(w.service.url);
    const started = Date.now();
    conn.socket.write(
      `POST /openai/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${k.key}\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model":`,
    );
    const other = await w.issue({ target: 'openai' });
    await sleep(100);
    expect((await chat(w.service, other.key)).status).toBe(200);
    const text = await Promise.race([conn.closed, sleep(5_000).then(() => 'still open')]);
    conn.socket.destroy();
    expect(text).not.toBe('still open');
    expect(Date.now() - started).toBeLessThan(3_000);
    if (text !== '') expect(statusLine(text)).toBe(408);
    expect(w.openai.received.length + w.openai.rejected.length).toBe(before + 1); // only the honest one
    const s = await usage(w.service, k.id);
    expect(s.used.activations).toBe(0);
    expect(s.remaining.activations).toBe(5);
    expect(s.inFlight).toBe(0);
  });

  it('closes a stalled streamed upload and aborts its upstream request', async () => {
    // Attack: slow POST on a streamed (non-JSON) upload, which is already on its way upstream.
    const k = await w.issue({ target: 'openai', uses: 5 });
    const conn = await rawConnect(w.service.url);
    const started = Date.now();
    conn.socket.write(
      // An upload (not metered, so it streams through; a metered route's body is read whole first).
      `POST /openai/v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${k.key}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\nabc`,
    );
    const text = await Promise.race([conn.closed, sleep(5_000).then(() => 'still open')]);
    conn.socket.destroy();
    expect(text).not.toBe('still open');
    expect(Date.now() - started).toBeLessThan(3_000);
    await until(() => w.openai.inFlight() === 0, 'the upstream request to end');
    await until(async () => (await usage(w.service, k.id)).inFlight === 0, 'the key to have nothing in flight');
    expect((await usage(w.service, k.id)).used.activations).toBe(0);
  });
});

describe('upstream failures', () => {
  it("answers 502 in the provider's shape when the upstream is down, and gives the activation back", async () => {
    // Attack: none; an outage must not burn a use-limited key, and must not hang the agent.
    const w = await world();
    try {
      const o = await w.issue({ target: 'openai', uses: 3 });
      const a = await w.issue({ target: 'anthropic', uses: 3 });
      expect((await chat(w.service, o.key)).status).toBe(200);
      await w.openai.close();
      await w.anthropic.close();
      const r = await chat(w.service, o.key);
      expect(r.status).toBe(502);
      const body = json(r) as { error: { message: string; type: string; code: string } };
      expect(body.error.message).toMatch(/^till: cannot reach OpenAI at http:\/\/127\.0\.0\.1:\d+ \(/);
      expect(body.error.code).toBe('till_upstream_unreachable');
      const so = await usage(w.service, o.id);
      expect(so.used.activations).toBe(1);
      expect(so.remaining.activations).toBe(2);
      expect(so.inFlight).toBe(0);

      const ra = await send(w.service.url, '/anthropic/v1/messages', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'x-api-key': a.key },
        body: claudeBody(),
      });
      expect(ra.status).toBe(502);
      const ab = json(ra) as { type: string; error: { type: string; message: string } };
      expect(ab.type).toBe('error');
      expect(ab.error.message).toMatch(/^till: cannot reach Anthropic/);
      expect((await usage(w.service, a.id)).remaining.activations).toBe(3);
    } finally {
      await w.close();
    }
  });

  it('answers 502 when the upstream points at a closed port', async () => {
    // Attack: none; a misconfigured upstream must fail fast and cost nothing.
    const home = tempHome();
    await addCredential(home, 'gem', 'gemini', fakeCredential('gemini'));
    const port = await closedPort();
    const service = await serveTill(home, { env: { TILL_UPSTREAM_GEMINI: `http://127.0.0.1:${port}` } });
    try {
      const k = await service.issue({ target: 'gemini', uses: 2 });
      const r = await send(service.url, '/gemini/v1beta/models/gemini-2.5-flash:generateContent', {
        method: 'POST',
        headers: { ...JSON_TYPE, 'x-goog-api-key': k.key },
        body: geminiBody(),
      });
      expect(r.status).toBe(502);
      const body = json(r) as { error: { code: number; message: string; status: string } };
      expect(body.error.code).toBe(502);
      expect(body.error.message).toContain(`till: cannot reach Google Gemini at http://127.0.0.1:${port} (ECONNREFUSED)`);
      const s = await usage(service, k.id);
      expect(s.used.activations).toBe(0);
      expect(s.remaining.activations).toBe(2);
      expect(s.inFlight).toBe(0);
      // What views total (the Usage view's "today") is what the ledger counted: nothing.
      const ended = await waitFor('the request.finished event', () =>
        service.events().find((e) => e.type === 'request.finished' && e.request.keyId === k.id),
      );
      expect(ended).toMatchObject({ status: 502, uncounted: true });
      expect(ended).not.toHaveProperty('usage');
    } finally {
      await service.close();
    }
  });

  it("aborts the upstream request when the client goes away, and frees the key's slot", async () => {
    // Attack: a client that disconnects while the upstream keeps working (and billing).
    const w = await world({ hang: true });
    try {
      const k = await w.issue({ target: 'openai', concurrency: 1 });
      const ctl = new AbortController();
      const pending = chat(w.service, k.key, { signal: ctl.signal }).catch((e: Error) => e);
      await w.openai.waitForRequests(1);
      expect((await usage(w.service, k.id)).inFlight).toBe(1);
      expect(w.openai.inFlight()).toBe(1);
      ctl.abort();
      expect(await pending).toBeInstanceOf(Error);
      await until(() => w.openai.abortedStreams() === 1, 'the upstream request to be aborted');
      await until(() => w.openai.inFlight() === 0, 'the upstream to have nothing in flight');
      await until(async () => (await usage(w.service, k.id)).inFlight === 0, 'the key to have nothing in flight');
    } finally {
      await w.close();
    }
  });

  it('answers 429 past the concurrency limit while requests hang upstream', async () => {
    // Attack: a runaway agent fanning out parallel requests.
    const w = await world({ hang: true });
    try {
      const k = await w.issue({ target: 'openai', concurrency: 2, uses: 10 });
      const ctl = new AbortController();
      const hanging = [
        chat(w.service, k.key, { signal: ctl.signal }).catch((e: Error) => e),
        chat(w.service, k.key, { signal: ctl.signal }).catch((e: Error) => e),
      ];
      await w.openai.waitForRequests(2);
      expect((await usage(w.service, k.id)).inFlight).toBe(2);
      const r = await chat(w.service, k.key);
      expect(r.status).toBe(429);
      expect(r.headers['x-till-denial']).toBe('concurrency');
      expect(Number(r.headers['retry-after'])).toBeGreaterThanOrEqual(1);
      expect(messageOf(r)).toMatch(/^till: till key ".*" allows 2 requests at once and 2 are in flight$/);
      expect(w.openai.received.length).toBe(2);
      ctl.abort();
      await Promise.all(hanging);
      await until(async () => (await usage(w.service, k.id)).inFlight === 0, 'the key to have nothing in flight');
      await until(() => w.openai.inFlight() === 0, 'the upstream to have nothing in flight');
      expect(w.openai.abortedStreams()).toBe(2);
    } finally {
      await w.close();
    }
  });

  it('settles in-flight requests when the broker closes, without crashing it', async () => {
    // Attack: none (robustness). Shutting down (till serve on SIGTERM, VS Code closing) while
    // agents have requests open must neither throw from late socket events after the ledger
    // closed, nor leave reservations behind.
    const w = await world({ hang: true });
    const k = await w.issue({ target: 'openai', uses: 3 });
    const hanging = chat(w.service, k.key).catch((e: Error) => e);
    await w.openai.waitForRequests(1);
    const conn = await rawConnect(w.service.url);
    conn.socket.write(
      // An upload (not metered, so it streams through; a metered route's body is read whole first).
      `POST /openai/v1/audio/transcriptions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${k.key}\r\nContent-Type: application/octet-stream\r\nContent-Length: 1000\r\n\r\nabc`,
    );
    await until(async () => (await usage(w.service, k.id)).inFlight === 2, 'both requests to be in flight');
    await w.service.close();
    expect(await hanging).toBeInstanceOf(Error);
    await conn.closed;
    // Late socket events would surface here as unhandled errors.
    await sleep(200);
    const again = await serveTill(w.home, { env: { TILL_UPSTREAM_OPENAI: `${w.openai.url}/v1` } });
    try {
      const s = await usage(again, k.id);
      // The hanging one reached the upstream (spent); the upload never finished (released).
      expect(s.used.activations).toBe(1);
      expect(s.reserved.activations ?? 0).toBe(0);
      expect(s.remaining.activations).toBe(2);
    } finally {
      await again.close();
      await Promise.all([w.openai, w.anthropic, w.gemini, w.github].map((u) => u.close()));
    }
  });

  it('cuts a request hanging upstream when its key is revoked', async () => {
    // Attack: a revoked key whose in-flight requests keep running (and billing).
    const w = await world({ hang: true });
    try {
      const k = await w.issue({ target: 'openai' });
      const pending = chat(w.service, k.key);
      await w.openai.waitForRequests(1);
      await w.service.revoke(k.id);
      const r = await pending;
      expect(r.status).toBe(401);
      expect(messageOf(r)).toMatch(/^till: till key ".*" was revoked$/);
      await until(() => w.openai.abortedStreams() === 1, 'the upstream request to be aborted');
      expect((await usage(w.service, k.id)).inFlight).toBe(0);
    } finally {
      await w.close();
    }
  });
});
