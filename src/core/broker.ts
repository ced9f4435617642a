/**
 * The broker: an HTTP server on 127.0.0.1 that takes requests carrying a till key, checks
 * them, swaps in the real credential and streams the upstream's answer back unbuffered.
 *
 * Routes: `/<provider><path>`, e.g. `/openai/v1/chat/completions`. The path after the
 * provider id is in the provider's own namespace (see {@link Provider.basePath}).
 */
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo } from 'node:net';
import { auditRecord, type AuditLog } from './audit';
import { ConnectionBudget } from './connectionBudget';
import { denialEvent, denialResponse, type Denial } from './denial';
import type { RequestInfo, RequestUsage, TillEvent, TillEvents } from './events';
import type { Admission, TillKeys } from './keys';
import type { KeyRecord } from './ledger';
import { methodViolation, modelViolation, pathViolation, type Amounts } from './policy';
import { InFlightList, type InFlightEntry } from './inFlightList';
import { isFreeRoute, KEY_HEADERS, KEY_QUERY_PARAMS, providerBaseUrl, upstreamEnvVar, type Provider, type ProviderRegistry } from './providers';
import { planBudget, settlement, type BudgetPlan } from './budget';
import type { SettleDetails } from './ledger';
import { StreamMeter, usageFormat, usageFromJson, type Usage, type UsageFormat } from './metering';
import type { PriceTable } from './pricing';
import { withDefaults } from './options';
import { BodyScrubber, CredentialForms, HOP_BY_HOP, relayedHeaders } from './scrub';
import { duplicateKey } from './duplicateKeys';
import { looksLikeTillKey } from './tillKey';
import type { Vault } from './vault';
import { VaultError } from './vault';
import { WebSocketProxy } from './websocket';

/** The broker's default port: T-I-L-L on a phone keypad. */
export const DEFAULT_PORT = 8455;

/** The defaults of {@link BrokerOptions}' limits. */
export const BROKER_DEFAULTS = {
  port: DEFAULT_PORT,
  maxBodyBytes: 32 * 1024 * 1024,
  maxHeaderBytes: 32 * 1024,
  headersTimeoutMs: 10_000,
  requestTimeoutMs: 60_000,
  upstreamIdleTimeoutMs: 600_000,
} as const;

export interface BrokerOptions {
  keys: TillKeys;
  vault: Vault;
  providers: ProviderRegistry;
  /** Prices for spend limits and metering. */
  prices: PriceTable;
  events: TillEvents;
  audit?: AuditLog;
  /** Port on 127.0.0.1; 0 picks a free one. Default: {@link DEFAULT_PORT}. */
  port?: number;
  /** Largest request body accepted. Default: 32 MiB (the largest provider limit for JSON requests). */
  maxBodyBytes?: number;
  /** Largest request head (request line + headers). Default: 32 KiB. */
  maxHeaderBytes?: number;
  /** Time a client has to send its headers. Default: 10 s. */
  headersTimeoutMs?: number;
  /** Time a client has to send its whole request. Default: 60 s. */
  requestTimeoutMs?: number;
  /** Time an upstream may stay silent (before or during a response). Default: 10 min: long reasoning is slow. */
  upstreamIdleTimeoutMs?: number;
  /** Where diagnostic lines go. Never given a secret. */
  log?: (line: string) => void;
}

/** Request headers never forwarded upstream (hop-by-hop, keys, browser context). */
export const STRIPPED_REQUEST = new Set<string>([...HOP_BY_HOP, ...KEY_HEADERS, 'origin', 'referer', 'cookie']);

let requestCounter = 0;

/** `/<provider><path>?<query>` taken apart. */
export function splitUrl(url: string | undefined): { providerId: string; path: string; query: URLSearchParams } {
  const rawUrl = url ?? '/';
  const q = rawUrl.indexOf('?');
  const rawPath = q < 0 ? rawUrl : rawUrl.slice(0, q);
  const slash = rawPath.indexOf('/', 1);
  return {
    providerId: slash < 0 ? rawPath.slice(1) : rawPath.slice(1, slash),
    path: slash < 0 ? '/' : rawPath.slice(slash),
    query: new URLSearchParams(q < 0 ? '' : rawUrl.slice(q + 1)),
  };
}

/** What {@link findTillKey} has seen so far: a till key, a second different one, some other key. */
interface KeySearch {
  key: string | undefined;
  two: boolean;
  other: boolean;
}

function considerKey(found: KeySearch, value: string | undefined): void {
  if (!value) return;
  const v = value.trim();
  if (!looksLikeTillKey(v)) found.other = true;
  else if (found.key === undefined) found.key = v;
  else if (found.key !== v) found.two = true;
}

/** A till key found in a request, or why none could be used. */
export function findTillKey(req: http.IncomingMessage, query: URLSearchParams): string | Denial {
  // Runs on every request: a plain state object rather than a Set and a closure.
  const found: KeySearch = { key: undefined, two: false, other: false };
  const auth = req.headers.authorization;
  // What nearly every client sends, without the regular expression (same result: one space, then the key).
  if (auth?.startsWith('Bearer till_')) considerKey(found, auth.slice(7));
  else if (auth) considerKey(found, auth.replace(/^(bearer|token)\s+/i, ''));
  for (const name of KEY_HEADERS) if (name !== 'authorization') considerKey(found, req.headers[name] as string | undefined);
  for (const name of KEY_QUERY_PARAMS) if (query.has(name)) for (const v of query.getAll(name)) considerKey(found, v);
  if (found.two) return { status: 400, code: 'malformed_key', message: 'the request carries two different till keys' };
  const { key, other } = found;
  if (key) return key;
  if (other) {
    return { status: 401, code: 'missing_key', message: 'the broker accepts only till keys (till_…); this request carries some other key, which was not forwarded' };
  }
  return { status: 401, code: 'missing_key', message: 'no till key: send it the way the provider expects its API key (e.g. Authorization: Bearer till_…)' };
}

const canonicalCache = new Map<string, boolean>();

/** True when a path means exactly what it says: no dot segments, backslashes or encoded slashes. */
export function isCanonicalPath(path: string): boolean {
  if (!/[.%\\]/.test(path)) return true;
  if (/%2f|%5c|\\/i.test(path)) return false;
  let ok = canonicalCache.get(path);
  if (ok === undefined) {
    ok = new URL(path, 'http://x').pathname === path;
    if (canonicalCache.size > 1000) canonicalCache.clear();
    canonicalCache.set(path, ok);
  }
  return ok;
}

// A Host header as it must be: a loopback name and at most a port, nothing else (parsed whole:
// `localhost:1@evil`, `localhost:evil` and `localhost.evil` are not loopback).
const LOOPBACK_HOST = /^(?:127\.0\.0\.1|localhost|\[::1\])(?::(\d{1,5}))?$/i;
const LOOPBACK_NAMES = new Set(['127.0.0.1', 'localhost', '[::1]']);

/** True when a Host header names this machine's loopback interface, with at most a valid port. */
export function hostIsLoopback(host: string | undefined): boolean {
  if (!host) return false;
  const m = LOOPBACK_HOST.exec(host);
  return m !== null && (m[1] === undefined || Number(m[1]) <= 65535);
}

/** Headers with which a client asks the upstream to read the request as another method. */
const METHOD_OVERRIDES = ['x-http-method-override', 'x-http-method', 'x-method-override'] as const;

/**
 * Most headers a request may carry. Node would silently drop those past its own count (2,000), and a
 * header it drops is one the broker cannot check (an `Origin` after 2,000 others): requests with more
 * are refused instead. Real clients send a few dozen.
 */
export const MAX_HEADERS = 256;

/** True when a Referer names a web page that is not on this machine. */
function refererIsForeign(referer: string): boolean {
  let url: URL;
  try {
    url = new URL(referer);
  } catch {
    return false;
  }
  return (url.protocol === 'http:' || url.protocol === 'https:') && !LOOPBACK_NAMES.has(url.hostname.toLowerCase());
}

/** How many times a header was sent (Node keeps only one Host in `headers`). */
function countHeader(raw: string[], name: string): number {
  let n = 0;
  for (let i = 0; i < raw.length; i += 2) if (raw[i]!.length === name.length && raw[i]!.toLowerCase() === name) n++;
  return n;
}

/**
 * The checks every request and WebSocket handshake passes before anything else; undefined when
 * it passes. DNS rebinding: a web page on evil.example whose name now resolves to 127.0.0.1 sends
 * Host: evil.example, and only loopback names are ours (exactly one Host, parsed whole). A web page
 * using the broker through the user's browser: browsers mark their requests with Sec-Fetch-Site,
 * cross-origin ones (every WebSocket handshake) with Origin, and older ones only with the page in
 * Referer. (Node's fetch sends Sec-Fetch-Mode too, so that header alone proves nothing.) A request
 * the upstream would read otherwise than the broker: one asking for another method through an
 * override header, or one with a fragment (`/v2/chat#/tokenize` is a chat to an upstream that
 * drops the fragment, and looks like a free route to a broker that does not).
 */
export function clientDenial(req: http.IncomingMessage): Denial | undefined {
  const headers = req.headers;
  if (req.rawHeaders.length > 2 * MAX_HEADERS) {
    return { status: 431, code: 'too_large', message: `the request has more than ${MAX_HEADERS} headers` };
  }
  if (!hostIsLoopback(headers.host) || countHeader(req.rawHeaders, 'host') !== 1) {
    return { status: 403, code: 'forbidden_host', message: 'the Host header is not one loopback name (DNS rebinding protection)' };
  }
  if (headers.origin !== undefined || headers['sec-fetch-site'] !== undefined || (headers.referer !== undefined && refererIsForeign(headers.referer))) {
    return { status: 403, code: 'browser_origin', message: 'requests from web browsers are refused: the broker serves local programs only' };
  }
  for (const name of METHOD_OVERRIDES) {
    if (headers[name] !== undefined) return { status: 400, code: 'bad_request', message: `the ${name} header is refused: send the request with its real method` };
  }
  if (req.url?.includes('#')) return { status: 400, code: 'bad_request', message: 'the request URL has a fragment (#…), which the upstream would read differently: send it without one' };
  return undefined;
}

/**
 * The path checks, for requests and handshakes alike; undefined when it passes. Escaping a path
 * scope: `/v1/chat/../../admin` (or `%2e%2e`, or an encoded slash an upstream may decode) matches
 * `/v1/chat/*` as text but reaches another route. And the path must be inside the provider's API.
 */
export function pathDenial(provider: Provider, path: string, baseUrl: string): Denial | undefined {
  if (!isCanonicalPath(path)) {
    return { status: 400, code: 'bad_request', message: 'the request path has dot segments, backslashes or encoded slashes; send it in canonical form' };
  }
  if (!path.startsWith(provider.basePath) || (provider.basePath && path.length > provider.basePath.length && path[provider.basePath.length] !== '/')) {
    return { status: 404, code: 'bad_request', message: `${path} is outside the ${provider.displayName} API: use the base URL ${baseUrl}` };
  }
  return undefined;
}

/**
 * The client's headers that go on to the upstream, for requests and handshakes alike: without
 * hop-by-hop headers (those named in Connection too), the keys the client sent (its till key),
 * Origin, Referer, Cookie and the browser's and WebSocket's sec-* headers; with the provider's
 * default headers where the client sent none. The credential is placed by the caller.
 */
export function forwardedHeaders(incoming: http.IncomingHttpHeaders, provider: Provider): Record<string, string | string[]> {
  const headers: Record<string, string | string[]> = {};
  // `keep-alive` (what most clients send) is stripped anyway.
  const connection = incoming.connection;
  const connectionTokens = connection === undefined || connection === 'keep-alive' ? undefined : connection.toLowerCase().split(',').map((s) => s.trim());
  // Object.keys, not Object.entries: one array per request, not one per header.
  for (const name of Object.keys(incoming)) {
    const value = incoming[name];
    if (value === undefined || STRIPPED_REQUEST.has(name) || connectionTokens?.includes(name) || name.startsWith('sec-')) continue;
    headers[name] = value;
  }
  const defaults = provider.defaultHeaders;
  if (defaults) for (const name of Object.keys(defaults)) if (headers[name] === undefined) headers[name] = defaults[name]!;
  return headers;
}

/** The denial for a credential the keychain would not give (locked, missing, failing), logged without the secret. */
export function credentialDenial(credential: string, err: unknown, log: ((line: string) => void) | undefined): Denial {
  const message = err instanceof VaultError ? err.message : `the credential could not be read (${(err as Error).message})`;
  log?.(`credential "${credential}": ${message}`);
  return { status: 503, code: 'credential_unavailable', message: `credential "${credential}" unavailable: ${message}` };
}

/** The denial for a provider that has no upstream until the user names one (e.g. Azure). */
export function noUpstreamDenial(provider: Provider): Denial {
  return { status: 502, code: 'upstream_unreachable', message: `${provider.displayName} has no upstream set: set ${upstreamEnvVar(provider.id)} to your endpoint` };
}

/** How long the rest of a refused body is read and dropped before its connection is closed. */
const LINGER_MS = 2_000;

/**
 * Before refusing a request whose body is still arriving (413): the rest is read and dropped for
 * a moment instead of the connection being closed with the answer. Closing with bytes unread
 * makes the OS reset the connection, and a client still writing would get ECONNRESET instead of
 * the 413. The connection stays usable if the body ends in time; it is cut after {@link LINGER_MS}.
 */
function lingerThenClose(req: http.IncomingMessage, res: http.ServerResponse): void {
  if (req.complete) return;
  // Node would otherwise answer `Connection: close` and close once the answer is written.
  res.shouldKeepAlive = true;
  const timer = setTimeout(() => req.socket.destroy(), LINGER_MS);
  timer.unref();
  req.once('end', () => clearTimeout(timer));
  req.once('close', () => clearTimeout(timer));
}

/** A JSON request body, parsed once: for its model, the budget and (if needed) rewriting. */
type Json = Record<string, unknown>;

/** A body the upstream could read otherwise than the broker did (duplicate keys): refused for any key. */
class AmbiguousBody extends Error {}

/**
 * The request's model (from the path for Gemini, else the JSON body) and its parsed body. A body
 * is parsed when it is declared JSON, or when the route is metered (`parseAnyType`).
 */
function inspectBody(provider: Provider, path: string, body: Buffer | undefined, contentType: string | undefined, parseAnyType: boolean): { model?: string; json?: Json } | Error {
  let json: Json | undefined;
  if (body && body.length > 0 && (parseAnyType || contentType?.includes('json'))) {
    const text = body.toString('utf8');
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      return new Error('the request body is not valid JSON');
    }
    const twice = duplicateKey(text);
    if (twice !== undefined) return new AmbiguousBody(`the request body has the key "${twice}" twice in one object, which the upstream may read otherwise than Till: send it once`);
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) json = parsed as Json;
  }
  if (provider.modelFromPath) {
    const m = provider.modelFromPath.exec(path);
    if (m) {
      // A stray `%` would make decodeURIComponent throw inside a request handler: the whole broker would go down.
      try {
        return { model: decodeURIComponent(m[1]!), json };
      } catch {
        return new Error('the model in the request path is not valid percent-encoding');
      }
    }
  }
  const model = json?.model;
  return { model: typeof model === 'string' ? model : undefined, json };
}

/** An upstream base URL, parsed once (the path of each request is appended as text). */
const upstreams = new Map<string, { url: URL; path: string }>();
function upstreamOf(baseUrl: string): { url: URL; path: string } {
  let parsed = upstreams.get(baseUrl);
  if (!parsed) {
    const url = new URL(baseUrl);
    parsed = { url, path: url.pathname.replace(/\/+$/, '') };
    upstreams.set(baseUrl, parsed);
  }
  return parsed;
}

/** JSON answers up to this size are metered by parsing them whole. */
const SMALL_JSON = 1024 * 1024;

/** Usage from a whole JSON answer (undefined when it is not JSON or has none). */
function jsonUsage(format: UsageFormat, chunks: Buffer[]): Usage | undefined {
  try {
    return usageFromJson(format, JSON.parse((chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks)).toString('utf8')));
  } catch {
    return undefined;
  }
}

/**
 * OpenAI-shaped providers that accept `stream_options.include_usage`: when a streaming client
 * did not ask for usage, Till asks for it (to meter) and removes the extra chunk it did not expect.
 */
const USAGE_INJECTABLE = new Set(['openai', 'azure-openai', 'deepseek', 'groq', 'together', 'fireworks', 'xai']);

/** The local broker. */
export class Broker {
  private server: http.Server | undefined;
  private readonly agents = {
    'http:': new http.Agent({ keepAlive: true, maxSockets: 256, noDelay: true } as http.AgentOptions),
    'https:': new https.Agent({ keepAlive: true, maxSockets: 256, noDelay: true } as https.AgentOptions),
  };
  /** Credential reads, shared by every request that needs one (a burst reads the keychain once). */
  private readonly secrets = new Map<string, Promise<string>>();
  private readonly cachedSecrets = new Map<string, string>();
  /** What to scrub from answers, per credential secret (see scrub.ts). */
  private readonly credentialForms = new Map<string, CredentialForms>();
  private readonly options: BrokerOptions & { [K in keyof typeof BROKER_DEFAULTS]: number };
  private port = 0;
  /** Ends each admitted request still open; close() runs them so no reservation outlives the ledger. */
  private readonly requests = new InFlightList<() => void>();
  /** The same for WebSocket sessions (few and long-lived, so a Set does: see inFlightList.ts). */
  private readonly open = new Set<() => void>();

  constructor(options: BrokerOptions) {
    this.options = withDefaults(BROKER_DEFAULTS, options);
  }

  /** `http://127.0.0.1:<port>` once listening. */
  get url(): string {
    return `http://127.0.0.1:${this.port}`;
  }

  /** The base URL a client of `provider` should use, e.g. `http://127.0.0.1:8455/openai/v1`. */
  baseUrlFor(provider: Provider): string {
    return providerBaseUrl(this.url, provider);
  }

  /** Starts listening on 127.0.0.1. Rejects with a clear message when the port is taken. */
  async start(): Promise<string> {
    const o = this.options;
    const server = http.createServer({
      maxHeaderSize: o.maxHeaderBytes,
      headersTimeout: o.headersTimeoutMs,
      requestTimeout: o.requestTimeoutMs,
      // Node checks both timeouts only every connectionsCheckingInterval (default 30 s), which
      // would let a slowloris client hold a connection for up to 30 s past either limit.
      connectionsCheckingInterval: Math.max(10, Math.floor(Math.min(4_000, ...[o.headersTimeoutMs, o.requestTimeoutMs].filter((t) => t > 0)) / 4)),
      noDelay: true,
      keepAliveTimeout: 5_000,
    });
    // One past the limit, so a request over it is seen and refused rather than cut short (clientDenial).
    server.maxHeadersCount = MAX_HEADERS + 1;
    server.on('request', (req, res) => this.handle(req, res));
    // Thousands of idle connections must not use up the descriptors real requests need.
    new ConnectionBudget().watch(server);
    // WebSockets (Codex's Responses transport, Realtime, Gemini Live): same checks, see websocket.ts.
    const websockets = new WebSocketProxy({
      keys: o.keys, providers: o.providers, prices: o.prices, events: o.events, audit: o.audit, log: o.log,
      maxMessageBytes: o.maxBodyBytes, open: this.open,
      secretFor: (name) => this.secretFor(name), baseUrlFor: (p) => this.baseUrlFor(p), http: (req, res) => this.handle(req, res),
    });
    server.on('upgrade', (req: http.IncomingMessage, socket, head: Buffer) => websockets.upgrade(req, socket, head));
    server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
      if (!socket.writable) return socket.destroy();
      const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
      const text = status === 431 ? 'till: request headers too large' : status === 408 ? 'till: request timed out' : 'till: bad request';
      socket.end(`HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nContent-Type: text/plain\r\nContent-Length: ${text.length}\r\nConnection: close\r\n\r\n${text}`);
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => {
        if (err.code !== 'EADDRINUSE') return reject(err);
        const inUse: NodeJS.ErrnoException = new Error(`port ${o.port} on 127.0.0.1 is already in use (another program, or another till broker): choose another with --port`);
        inUse.code = 'EADDRINUSE';
        reject(inUse);
      });
      server.listen(o.port, '127.0.0.1', () => resolve());
    });
    this.server = server;
    this.port = (server.address() as AddressInfo).port;
    return this.url;
  }

  /** Forgets cached secrets (after a credential was replaced or removed). */
  forgetCredential(name?: string): void {
    this.credentialForms.clear();
    if (name === undefined) {
      this.secrets.clear();
      this.cachedSecrets.clear();
    } else {
      this.secrets.delete(name);
      this.cachedSecrets.delete(name);
    }
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    // Settle or release in-flight requests now, while the ledger is still open (their sockets'
    // close events would otherwise arrive after the service has closed it).
    for (const stop of [...this.requests.values(), ...this.open]) stop();
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
    this.agents['http:'].destroy();
    this.agents['https:'].destroy();
  }

  private log(line: string): void {
    this.options.log?.(line);
  }

  private formsOf(secret: string): CredentialForms {
    let forms = this.credentialForms.get(secret);
    if (!forms) {
      forms = new CredentialForms(secret);
      this.credentialForms.set(secret, forms);
    }
    return forms;
  }

  private secretFor(name: string): Promise<string> {
    let pending = this.secrets.get(name);
    if (!pending) {
      pending = this.options.vault.get(name);
      this.secrets.set(name, pending);
      pending.then(
        (secret) => {
          if (this.secrets.get(name) === pending) this.cachedSecrets.set(name, secret);
        },
        // A failed read is not cached: the next request asks the keychain again (it may be unlocked by then).
        () => {
          if (this.secrets.get(name) === pending) this.secrets.delete(name);
        },
      );
    }
    return pending;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): void {
    const started = performance.now();
    const method = req.method ?? 'GET';
    const { providerId, path, query } = splitUrl(req.url);
    const provider = this.options.providers.get(providerId);
    const info: RequestInfo = { requestId: String(++requestCounter), keyId: '', label: '', provider: provider?.id ?? providerId, method, path, billable: false };

    const deny = (denial: Denial, key?: KeyRecord) => {
      if (key) {
        info.keyId = key.id;
        info.label = key.label;
      }
      this.sendDenial(res, provider?.id, denial);
      req.resume();
      const reason = denial.message;
      this.options.events.emit({ type: 'request.denied', at: Date.now(), request: { ...info }, status: denial.status, reason, code: denial.code });
      this.audit(info, denial.status, started, denial);
    };

    const refused = clientDenial(req);
    if (refused) return deny(refused);
    if (!provider) {
      return deny({ status: 404, code: 'unknown_provider', message: `no provider "${providerId}": use ${this.url}/<provider>/…, e.g. ${this.url}/openai/v1` });
    }
    const outside = pathDenial(provider, path, this.baseUrlFor(provider));
    if (outside) return deny(outside);
    const presented = findTillKey(req, query);
    if (typeof presented !== 'string') return deny(presented);
    const auth = this.options.keys.authenticateFor(presented, provider.id);
    if ('denial' in auth) return deny(auth.denial, auth.key);
    const key = auth.key;
    info.keyId = key.id;
    info.label = key.label;
    const billable = !isFreeRoute(provider, method, path);
    info.billable = billable;
    // Methods and paths now; models once the body is read.
    const early = methodViolation(key.policy, method) ?? pathViolation(key.policy, path);
    if (early) return deny({ status: 403, code: 'out_of_scope', message: early }, key);

    const declared = Number(req.headers['content-length'] ?? 0);
    if (declared > this.options.maxBodyBytes) {
      lingerThenClose(req, res);
      return deny({ status: 413, code: 'too_large', message: `request body of ${declared} bytes is over the broker's limit of ${this.options.maxBodyBytes}` }, key);
    }

    const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined;
    const contentType = req.headers['content-type'];
    // JSON bodies are read whole (they are small next to the answers) so the model can be
    // checked and logged; so is any body of a metered route, whatever its declared type (an
    // upstream may parse JSON sent as text/plain). Anything else (uploads) streams through.
    const metered = billable && usageFormat(provider.id, method, path) !== undefined;
    const readWhole = hasBody && (contentType === undefined || contentType.includes('json') || metered);
    // A body the broker must judge is judged as sent: it cannot read a compressed one.
    const encoding = req.headers['content-encoding'];
    if (readWhole && encoding !== undefined && encoding.trim().toLowerCase() !== 'identity') {
      return deny({ status: 415, code: 'bad_request', message: `request bodies must not be compressed (Content-Encoding: ${encoding}): Till checks them before forwarding` }, key);
    }
    const judged = key.policy.models !== undefined || key.policy.maxTokens !== undefined || key.policy.maxSpendUsd !== undefined;
    const proceed = (body: Buffer | undefined) => {
      const inspected = inspectBody(provider, path, body, contentType, metered);
      let json: Json | undefined;
      if (inspected instanceof Error) {
        if (inspected instanceof AmbiguousBody) return deny({ status: 400, code: 'bad_request', message: inspected.message }, key);
        if (judged && billable) return deny({ status: 400, code: 'bad_request', message: `${inspected.message}, so ${key.policy.models ? 'its model' : 'what it may cost'} cannot be checked` }, key);
      } else {
        json = inspected.json;
        if (inspected.model !== undefined) info.model = inspected.model;
      }
      const late = modelViolation(key.policy.models, info.model, billable);
      if (late) return deny({ status: 403, code: 'out_of_scope', message: late }, key);
      this.forward(req, res, provider, key, info, query, body, json, readWhole ? undefined : hasBody, started, deny);
    };
    if (!readWhole) return proceed(undefined);
    const chunks: Buffer[] = [];
    let size = 0;
    let over = false;
    req.on('data', (chunk: Buffer) => {
      if (over) return;
      size += chunk.length;
      if (size > this.options.maxBodyBytes) {
        over = true;
        lingerThenClose(req, res);
        deny({ status: 413, code: 'too_large', message: `request body is over the broker's limit of ${this.options.maxBodyBytes} bytes` }, key);
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (!over) proceed(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks));
    });
    req.on('error', () => undefined);
  }

  private forward(
    req: http.IncomingMessage,
    res: http.ServerResponse,
    provider: Provider,
    key: KeyRecord,
    info: RequestInfo,
    query: URLSearchParams,
    body: Buffer | undefined,
    json: Json | undefined,
    streamBody: boolean | undefined,
    started: number,
    deny: (d: Denial, key?: KeyRecord) => void,
  ): void {
    if (provider.needsUpstream) return deny(noUpstreamDenial(provider), key);
    let upstreamReq: http.ClientRequest | undefined;
    let registered: InFlightEntry<() => void> | undefined;
    let admission: Admission | undefined;
    let ended = false;
    let sseBoundary = true;
    let isSse = false;
    let upstreamStatus = 0;
    let jsonBody: Buffer[] | undefined;
    let lastProgress = 0;
    let meter: StreamMeter | undefined;
    let plan: BudgetPlan | undefined;
    const format = info.billable ? usageFormat(provider.id, info.method, info.path) : undefined;
    /** What the request spent: reported usage, an estimate for a cut stream, nothing for an upstream error. */
    const settle = (aborted: string | undefined): { amounts: Amounts; details?: SettleDetails; usage?: RequestUsage } | undefined => {
      if (!info.billable || !format || !plan) return undefined;
      const usage = jsonBody ? jsonUsage(format, jsonBody) : meter?.usage();
      if (!usage && !aborted && upstreamStatus >= 400) return { amounts: { activations: 1, tokens: 0, spend: 0 } };
      const s = settlement(provider.id, info.model, usage, { inputEstimate: plan.inputEstimate, outputChars: meter?.textChars ?? 0 }, this.options.prices);
      return { amounts: s.amounts, details: s.details, usage: s.usage };
    };
    const stop = () => {
      upstreamReq?.destroy();
      res.destroy();
      finish(res.statusCode, 'broker_closed');
    };
    const finish = (status: number, aborted?: string) => {
      if (ended) return;
      ended = true;
      if (registered) this.requests.delete(registered);
      const spent = settle(aborted);
      admission?.done(spent?.amounts, spent?.details);
      const latencyMs = Math.round((performance.now() - started) * 10) / 10;
      // Built field by field: spreads allocate, and this runs for every request.
      const event: Extract<TillEvent, { type: 'request.finished' }> = { type: 'request.finished', at: Date.now(), request: info, status, latencyMs };
      if (aborted) event.aborted = aborted;
      if (spent?.usage) event.usage = spent.usage;
      this.options.events.emit(event);
      this.audit(info, status, started, undefined, aborted);
    };
    const flight = {
      cut: (denial: Denial) => {
        upstreamReq?.destroy();
        if (!res.headersSent) {
          this.sendDenial(res, provider.id, denial);
        } else if (isSse && sseBoundary && !res.writableEnded) {
          res.end(denialEvent(provider.id, denial));
        } else {
          res.destroy();
        }
        finish(res.statusCode, denial.code);
      },
    };

    const go = (secret: string) => {
      if (res.writableEnded || res.destroyed) return;
      let stripUsage = false;
      if (format === 'openai-chat' && json?.stream === true && USAGE_INJECTABLE.has(provider.id)) {
        const options = (json.stream_options ?? {}) as Json;
        if (options.include_usage !== true) {
          json.stream_options = { ...options, include_usage: true };
          stripUsage = true;
        }
      }
      if (json && stripUsage) body = Buffer.from(JSON.stringify(json));
      // Planned and admitted with nothing awaited in between: the remaining budget cannot move.
      if (info.billable) {
        const planned = planBudget({ provider: provider.id, model: info.model, format, json, bodyBytes: body?.length ?? 0 }, key.policy, this.options.keys.remaining(key), this.options.prices);
        if ('status' in planned) return deny(planned, key);
        plan = planned;
      }
      if (json && plan?.bodyChanged) body = Buffer.from(JSON.stringify(json));
      const admitted = this.options.keys.admit(key, plan?.amounts, flight, true);
      if ('status' in admitted) return deny(admitted, key);
      admission = admitted;
      this.options.events.emit({ type: 'request.started', at: Date.now(), request: info });

      // Forwarded only once its reservation is on disk (batched with this turn's others).
      const send = () => {
        if (ended) return;
        if (res.destroyed) return finish(499, 'client_closed');
        const upstreamBase = upstreamOf(provider.baseUrl);
        const target = upstreamBase.url;
        const targetPath = upstreamBase.path + info.path.slice(provider.basePath.length);
        for (const name of KEY_QUERY_PARAMS) query.delete(name);
        const headers: http.OutgoingHttpHeaders = forwardedHeaders(req.headers, provider);
        const placement = provider.placement;
        if (placement.kind === 'bearer') headers.authorization = `Bearer ${secret}`;
        else if (placement.kind === 'header') headers[placement.name] = secret;
        else query.set(placement.name, secret);
        const search = query.toString();
        // Answers must be readable on the way through: to meter them, and to scrub the credential from them.
        headers['accept-encoding'] = 'identity';
        if (body) headers['content-length'] = body.length;
        else if (streamBody && req.headers['content-length'] !== undefined) headers['content-length'] = req.headers['content-length'];

        const transport = target.protocol === 'https:' ? https : http;
        let upstream: http.ClientRequest;
        try {
          upstream = transport.request({
            protocol: target.protocol,
            hostname: target.hostname,
            port: target.port,
            method: info.method,
            path: targetPath + (search ? `?${search}` : ''),
            headers,
            agent: this.agents[target.protocol as 'http:' | 'https:'],
            timeout: this.options.upstreamIdleTimeoutMs,
          });
        } catch (err) {
          // A header Node will not send (it was accepted on the way in, but not valid on the way out).
          admission?.done();
          admission = undefined;
          return deny({ status: 400, code: 'bad_request', message: `the request cannot be forwarded: ${(err as Error).message}` }, key);
        }
        upstreamReq = upstream;
        registered = this.requests.add(stop);
        // Once connected and the whole request is on the wire, the upstream may bill it.
        let connected = false;
        let sent = false;
        upstream.on('socket', (socket) => {
          if (socket.connecting) socket.once('connect', () => (connected = true));
          else connected = true;
        });
        upstream.on('finish', () => {
          if (!connected) return;
          sent = true;
          admission?.reachedUpstream();
        });
        upstream.on('timeout', () => upstream.destroy(new Error(`the upstream sent nothing for ${this.options.upstreamIdleTimeoutMs / 1000} s`)));
        upstream.on('error', (err: NodeJS.ErrnoException) => {
          if (ended) return;
          if (!res.headersSent) {
            const where = `${target.protocol}//${target.host}`;
            const detail = err.code ?? err.message;
            this.log(`upstream ${where} failed: ${detail}`);
            if (!sent) {
              // Never reached the upstream: give the activation back.
              admission?.done();
              admission = undefined;
            }
            this.sendDenial(res, provider.id, { status: 502, code: 'upstream_unreachable', message: `cannot reach ${provider.displayName} at ${where} (${detail})` });
            finish(502, 'upstream_error');
          } else {
            res.destroy();
            finish(res.statusCode, 'upstream_error');
          }
        });
        upstream.on('response', (upRes) => {
          admission?.reachedUpstream();
          const forms = this.formsOf(secret);
          // Never relay the credential: an upstream that echoes request headers, a Location with ?key=.
          const locationMap = upRes.headers.location === undefined ? undefined : { requestUrl: `${target.origin}${targetPath}`, upstreamBase: provider.baseUrl, brokerBase: this.baseUrlFor(provider) };
          const out = relayedHeaders(upRes.headers, forms, locationMap, (name) => this.log(`dropped the upstream's ${name} response header: it held the credential`));
          if (upRes.headers['content-length'] !== undefined) out['content-length'] = upRes.headers['content-length'];
          const scrubber = new BodyScrubber(forms);
          isSse = (upRes.headers['content-type'] ?? '').includes('text/event-stream');
          upstreamStatus = upRes.statusCode ?? 502;
          if (format && !upRes.headers['content-encoding']) {
            // A small JSON answer is cheaper to parse once at the end than to scan byte by byte.
            const length = Number(upRes.headers['content-length'] ?? NaN);
            if (!isSse && length <= SMALL_JSON && (upRes.headers['content-type'] ?? '').includes('json')) jsonBody = [];
            else meter = new StreamMeter(format);
          }
          const strip = stripUsage && isSse && meter !== undefined;
          if (strip) delete out['content-length'];
          res.writeHead(upstreamStatus, out);
          let writable = true;
          if (strip) {
            // Forward event by event, minus the usage chunk Till asked for and the client did not.
            let seen = false;
            meter!.onEvent = (e) => {
              if (!seen && meter!.sawUsageChunk) {
                seen = true;
                return;
              }
              writable = res.write(scrubber.push(e.raw)) && writable;
            };
          }
          upRes.on('data', (chunk: Buffer) => {
            if (isSse) {
              const n = chunk.length;
              sseBoundary = n >= 2 ? (chunk[n - 1] === 10 && (chunk[n - 2] === 10 || chunk[n - 2] === 13)) : sseBoundary && chunk[0] === 10;
            }
            writable = true;
            if (jsonBody) jsonBody.push(chunk);
            else meter?.push(chunk);
            if (meter && isSse && plan) {
              const now = performance.now();
              if (now - lastProgress >= 500) {
                lastProgress = now;
                const s = settle('progress');
                if (s?.usage) this.options.events.emit({ type: 'request.progress', at: Date.now(), request: info, usage: s.usage });
              }
            }
            if (!strip) writable = res.write(scrubber.push(chunk));
            if (!writable) upRes.pause();
          });
          res.on('drain', () => upRes.resume());
          upRes.on('end', () => {
            res.end(scrubber.end());
            finish(upRes.statusCode ?? 502);
          });
          upRes.on('error', () => {
            res.destroy();
            finish(upRes.statusCode ?? 502, 'upstream_error');
          });
        });
        // The client went away: stop the upstream (and its bill) too.
        res.on('close', () => {
          if (!res.writableFinished) {
            upstream.destroy();
            finish(res.statusCode, 'client_closed');
          }
        });
        if (body) upstream.end(body);
        else if (streamBody) {
          let size = 0;
          req.on('data', (chunk: Buffer) => {
            size += chunk.length;
            if (size > this.options.maxBodyBytes && !ended) {
              // Cut before the upstream had the whole request: it cannot bill it, and neither does Till.
              upstream.destroy();
              admission?.done();
              admission = undefined;
              lingerThenClose(req, res);
              this.sendDenial(res, provider.id, { status: 413, code: 'too_large', message: `request body is over the broker's limit of ${this.options.maxBodyBytes} bytes` });
              finish(413, 'too_large');
            }
          });
          req.pipe(upstream);
        }
        else upstream.end();
      };
      this.options.keys.whenDurable(send);
    };

    // The cached secret is used synchronously: no await between admission and forwarding.
    const cached = this.cachedSecrets.get(key.credential);
    if (cached !== undefined) return go(cached);
    this.secretFor(key.credential).then(go, (err: unknown) => deny(credentialDenial(key.credential, err, this.options.log), key));
  }

  private sendDenial(res: http.ServerResponse, providerId: string | undefined, denial: Denial): void {
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const { body, headers } = denialResponse(providerId, denial);
    res.writeHead(denial.status, headers);
    res.end(body);
  }

  private audit(info: RequestInfo, status: number, started: number, denial?: Denial, aborted?: string): void {
    this.options.audit?.append(auditRecord(info, status, started, denial, aborted));
  }
}
