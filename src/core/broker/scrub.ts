/**
 * The credential never goes back to a client: an upstream (or a proxy in front of it) that echoes
 * request headers, or a redirect whose `Location` carries `?key=<credential>`, would otherwise
 * hand the real key to the agent the broker exists to keep it from.
 *
 * - Response headers holding the credential are dropped; a `Location` is kept with the
 *   credential taken out (its query parameter removed, any other trace masked) and, when it
 *   points into the upstream's API, rewritten to the same place through the broker, so a client
 *   that follows it keeps its till key away from the upstream.
 * - Bodies (HTTP and WebSocket messages) have every occurrence masked with `*` of the same length,
 *   so a declared Content-Length stays true. A stream is scrubbed across chunk boundaries by
 *   holding back only a tail that could begin the credential, which real streams never end with.
 */
import type { IncomingHttpHeaders, OutgoingHttpHeaders } from 'node:http';

/** The forms a credential can take in text: as is, JSON-escaped and percent-encoded (when they differ). */
export class CredentialForms {
  readonly forms: Buffer[];
  private readonly text: string[];

  constructor(secret: string) {
    const text = [...new Set([secret, JSON.stringify(secret).slice(1, -1), encodeURIComponent(secret)])].filter((t) => t.length > 0);
    this.text = text;
    this.forms = text.map((t) => Buffer.from(t));
  }

  /** True when `value` holds the credential in any form. */
  in(value: string): boolean {
    for (const t of this.text) if (value.includes(t)) return true;
    return false;
  }

  /** `value` with every form of the credential masked. */
  mask(value: string): string {
    let out = value;
    for (const t of this.text) if (out.includes(t)) out = out.split(t).join('*'.repeat(t.length));
    return out;
  }

  /** True when `bytes` holds a whole form of the credential. */
  foundIn(bytes: Buffer): boolean {
    for (const form of this.forms) if (bytes.includes(form)) return true;
    return false;
  }

  /** Masks every whole occurrence in `bytes`, in place. Returns whether any was found. */
  maskBytes(bytes: Buffer): boolean {
    let found = false;
    for (const form of this.forms) {
      for (let at = bytes.indexOf(form); at >= 0; at = bytes.indexOf(form, at + form.length)) {
        bytes.fill(0x2a, at, at + form.length);
        found = true;
      }
    }
    return found;
  }

  /** How many bytes at the end of `bytes` could be the start of a form (0 nearly always). */
  partialTail(bytes: Buffer): number {
    let longest = 0;
    for (const form of this.forms) {
      const first = form[0]!;
      const from = Math.max(0, bytes.length - form.length + 1);
      for (let at = bytes.indexOf(first, from); at >= 0 && at < bytes.length; at = bytes.indexOf(first, at + 1)) {
        const n = bytes.length - at;
        if (n > longest && bytes.subarray(at).equals(form.subarray(0, n))) {
          longest = n;
          break;
        }
      }
    }
    return longest;
  }
}

/** Scrubs one response body as it streams: push each chunk, then `end()` for what was held back. */
export class BodyScrubber {
  private held: Buffer | undefined;

  constructor(private readonly forms: CredentialForms) {}

  /** The bytes to send now for `chunk` (possibly fewer: a tail that may begin the credential waits). */
  push(chunk: Buffer): Buffer {
    let bytes = chunk;
    if (this.held) {
      bytes = Buffer.concat([this.held, chunk]);
      this.held = undefined;
    }
    // Copy before masking: the chunk may be shared with the meter, which must see the upstream's bytes.
    if (this.forms.foundIn(bytes)) {
      bytes = Buffer.from(bytes);
      this.forms.maskBytes(bytes);
    }
    const tail = this.forms.partialTail(bytes);
    if (tail === 0) return bytes;
    this.held = Buffer.from(bytes.subarray(bytes.length - tail));
    return bytes.subarray(0, bytes.length - tail);
  }

  /** What is still held back (a partial match that never completed: not the credential). */
  end(): Buffer | undefined {
    const held = this.held;
    this.held = undefined;
    return held;
  }
}

/** Headers that describe one connection, not the message; content-length is set per side. */
export const HOP_BY_HOP = new Set([
  'connection',
  'keep-alive',
  'proxy-connection',
  'proxy-authorization',
  'proxy-authenticate',
  'te',
  'trailer',
  'trailers',
  'transfer-encoding',
  'upgrade',
  'host',
  'content-length',
]);

/** Where an upstream's API lives and where the broker serves it, for rewriting `Location`. */
export interface LocationMap {
  /** The URL the upstream request went to (relative Locations resolve against it). */
  requestUrl: string;
  /** The upstream base URL, e.g. `https://api.github.com`. */
  upstreamBase: string;
  /** The same API through the broker, e.g. `http://127.0.0.1:8455/github`. */
  brokerBase: string;
}

/** A `Location` with the credential removed, pointed through the broker when it is in the upstream's API. */
export function scrubLocation(value: string, forms: CredentialForms, map: LocationMap): string {
  let url: URL;
  try {
    url = new URL(value, map.requestUrl);
  } catch {
    return forms.mask(value);
  }
  for (const [name, v] of [...url.searchParams]) if (forms.in(v)) url.searchParams.delete(name);
  const upstream = new URL(map.upstreamBase);
  const basePath = upstream.pathname.replace(/\/+$/, '');
  let out = url.href;
  if (url.origin === upstream.origin && (url.pathname === basePath || url.pathname.startsWith(`${basePath}/`))) {
    out = map.brokerBase + url.pathname.slice(basePath.length) + url.search + url.hash;
  }
  return forms.mask(out);
}

/**
 * The upstream's response headers as relayed to the client: without hop-by-hop headers and
 * without any header that holds the credential (`dropped` hears their names), `Location` scrubbed
 * (and, given `map`, pointed through the broker).
 * `skip` names more headers the caller sets itself.
 */
export function relayedHeaders(
  headers: IncomingHttpHeaders,
  forms: CredentialForms,
  map: LocationMap | undefined,
  dropped?: (name: string) => void,
  skip: ReadonlySet<string> = HOP_BY_HOP,
): OutgoingHttpHeaders {
  const out: OutgoingHttpHeaders = {};
  for (const name of Object.keys(headers)) {
    const value = headers[name];
    if (value === undefined || skip.has(name)) continue;
    if (name === 'location' && typeof value === 'string') {
      out[name] = map ? scrubLocation(value, forms, map) : forms.mask(value);
      continue;
    }
    if (Array.isArray(value) ? value.some((v) => forms.in(v)) : forms.in(value)) {
      dropped?.(name);
      continue;
    }
    out[name] = value;
  }
  return out;
}
