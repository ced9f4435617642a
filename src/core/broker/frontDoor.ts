/**
 * The front door: the checks every request and WebSocket handshake passes before the broker
 * does anything for it (Host, browser origin, headers the upstream would read otherwise), where
 * its till key is found, which paths a provider's API has, and which of the client's headers go
 * on to the upstream. Shared by the HTTP exchange and the WebSocket proxy.
 */
import type * as http from 'node:http';
import type { Denial } from '../denial';
import { KEY_HEADERS, KEY_QUERY_PARAMS, upstreamEnvVar, type Provider } from '../providers/providers';
import { HOP_BY_HOP } from './scrub';
import { looksLikeTillKey } from '../keys/tillKey';
import { VaultError } from '../credentials/vault';

/** Request headers never forwarded upstream (hop-by-hop, keys, browser context). */
export const STRIPPED_REQUEST = new Set<string>([...HOP_BY_HOP, ...KEY_HEADERS, 'origin', 'referer', 'cookie']);

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
    return {
      status: 401,
      code: 'missing_key',
      message: 'the broker accepts only till keys (till_…); this request carries some other key, which was not forwarded',
    };
  }
  return {
    status: 401,
    code: 'missing_key',
    message: 'no till key: send it the way the provider expects its API key (e.g. Authorization: Bearer till_…)',
  };
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

// A Host header that is a name or an address and at most a valid port, parsed whole.
const HOST_HEADER = /^([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?$/i;

/** True when a Host header names this machine's loopback interface, or one of a listener's allowed names (listener.ts). */
function hostAllowed(host: string | undefined, allowed: ReadonlySet<string> | undefined): boolean {
  if (hostIsLoopback(host)) return true;
  if (!allowed || !host) return false;
  const m = HOST_HEADER.exec(host);
  return m !== null && (m[2] === undefined || Number(m[2]) <= 65535) && allowed.has(m[1]!.toLowerCase());
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
export function clientDenial(req: http.IncomingMessage, allowedHosts?: ReadonlySet<string>): Denial | undefined {
  const headers = req.headers;
  if (req.rawHeaders.length > 2 * MAX_HEADERS) {
    return { status: 431, code: 'too_large', message: `the request has more than ${MAX_HEADERS} headers` };
  }
  if (!hostAllowed(headers.host, allowedHosts) || countHeader(req.rawHeaders, 'host') !== 1) {
    return {
      status: 403,
      code: 'forbidden_host',
      message: allowedHosts
        ? "the Host header is not one of the broker's names (DNS rebinding protection): add it with --allow-host"
        : 'the Host header is not one loopback name (DNS rebinding protection)',
    };
  }
  if (
    headers.origin !== undefined ||
    headers['sec-fetch-site'] !== undefined ||
    (headers.referer !== undefined && refererIsForeign(headers.referer))
  ) {
    return {
      status: 403,
      code: 'browser_origin',
      message: 'requests from web browsers are refused: the broker serves local programs only',
    };
  }
  for (const name of METHOD_OVERRIDES) {
    if (headers[name] !== undefined)
      return { status: 400, code: 'bad_request', message: `the ${name} header is refused: send the request with its real method` };
  }
  if (req.url?.includes('#'))
    return {
      status: 400,
      code: 'bad_request',
      message: 'the request URL has a fragment (#…), which the upstream would read differently: send it without one',
    };
  return undefined;
}

/**
 * The path checks, for requests and handshakes alike; undefined when it passes. Escaping a path
 * scope: `/v1/chat/../../admin` (or `%2e%2e`, or an encoded slash an upstream may decode) matches
 * `/v1/chat/*` as text but reaches another route. And the path must be inside the provider's API.
 */
export function pathDenial(provider: Provider, path: string, baseUrl: string): Denial | undefined {
  if (!isCanonicalPath(path)) {
    return {
      status: 400,
      code: 'bad_request',
      message: 'the request path has dot segments, backslashes or encoded slashes; send it in canonical form',
    };
  }
  if (
    !path.startsWith(provider.basePath) ||
    (provider.basePath && path.length > provider.basePath.length && path[provider.basePath.length] !== '/')
  ) {
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
  const connectionTokens =
    connection === undefined || connection === 'keep-alive'
      ? undefined
      : connection
          .toLowerCase()
          .split(',')
          .map((s) => s.trim());
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
  return {
    status: 502,
    code: 'upstream_unreachable',
    message: `${provider.displayName} has no upstream set: set ${upstreamEnvVar(provider.id)} to your endpoint`,
  };
}
