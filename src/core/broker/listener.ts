/**
 * Where the broker listens, and who may reach it there.
 *
 * Guarantees, checked before the broker binds anything:
 * - The default is 127.0.0.1, plain HTTP: only this machine's programs can connect.
 * - Any other address needs TLS (a certificate and its key): a till key and the admin token would
 *   cross the network otherwise. A non-loopback address without TLS is refused at start.
 * - A listener on every address (0.0.0.0, ::) needs the host names its clients use: the Host
 *   check (DNS rebinding, frontDoor.ts) accepts loopback names, the listener's own address and
 *   those names, nothing else. Browser origins stay refused everywhere.
 */
import { isIP } from 'node:net';

/** The broker's listening address and, off this machine, its TLS certificate and names. */
export interface ListenOptions {
  /** Address to bind. Default: 127.0.0.1. */
  host?: string;
  /** PEM certificate chain and private key: the broker serves HTTPS (and WSS). */
  tls?: { cert: string | Buffer; key: string | Buffer };
  /** Host names (with or without a port) clients reach the broker by, besides loopback names and the address itself. */
  allowedHosts?: string[];
}

/** Thrown at start for a listener that would expose the broker unsafely. */
export class ListenError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ListenError';
  }
}

/** True for an address only this machine can reach: 127.0.0.0/8, ::1, localhost. */
export function isLoopbackAddress(host: string): boolean {
  const h = host.toLowerCase().replace(/^\[(.*)\]$/, '$1');
  return h === 'localhost' || h === '::1' || (isIP(h) === 4 && h.startsWith('127.'));
}

function isWildcard(host: string): boolean {
  return host === '0.0.0.0' || host === '::' || host === '[::]';
}

const HOST_NAME = /^(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*$/;

/** A Host header's name part, lowercased, brackets kept for IPv6 (`[::1]:8455` → `[::1]`). */
export function hostName(host: string): string {
  const h = host.toLowerCase();
  if (h.startsWith('[')) return h.slice(0, h.indexOf(']') + 1);
  const colon = h.indexOf(':');
  return colon < 0 ? h : h.slice(0, colon);
}

/** `name` as it goes in a URL or a Host header: IPv6 in brackets. */
function urlHost(name: string): string {
  return isIP(name) === 6 ? `[${name}]` : name;
}

/**
 * The listener, checked: its address, whether it speaks TLS, and the set of non-loopback host
 * names a Host header may carry (undefined on a loopback-only listener: only loopback names pass).
 */
export interface Listener {
  host: string;
  tls: ListenOptions['tls'];
  allowedHosts: ReadonlySet<string> | undefined;
  /** The name put in the URLs the broker hands out (base URLs of keys, `till serve`'s line). */
  publicName: string;
}

/** Checks `options` and works out the {@link Listener}; throws {@link ListenError} saying what to change. */
export function listener(options: ListenOptions = {}): Listener {
  const host = options.host ?? '127.0.0.1';
  if (isIP(host.replace(/^\[(.*)\]$/, '$1')) === 0 && host !== 'localhost') {
    throw new ListenError(`--listen needs an IP address to bind (such as 0.0.0.0 or 10.0.0.5), not "${host}"`);
  }
  const names = new Set<string>();
  for (const given of options.allowedHosts ?? []) {
    const name = hostName(given.trim());
    const bare = name.replace(/^\[(.*)\]$/, '$1');
    if (!(HOST_NAME.test(name) || isIP(bare) !== 0)) throw new ListenError(`allowed host "${given}" is not a host name or an IP address`);
    names.add(urlHost(bare));
  }
  const loopback = isLoopbackAddress(host);
  if (!loopback && !options.tls) {
    throw new ListenError(
      `the broker listens on ${host} only with TLS: give --tls-cert and --tls-key (till keys and the admin token would cross the network in the clear), or listen on 127.0.0.1`,
    );
  }
  if (isWildcard(host) && names.size === 0) {
    throw new ListenError(
      `listening on ${host} needs --allow-host NAME for each name clients reach the broker by (any other Host is refused: DNS-rebinding protection)`,
    );
  }
  if (!loopback && !isWildcard(host)) names.add(urlHost(host.replace(/^\[(.*)\]$/, '$1')));
  const own = host === 'localhost' ? host : urlHost(host.replace(/^\[(.*)\]$/, '$1'));
  // Off this machine, the first name given is the one clients know (a certificate names it).
  const first = options.tls ? names.values().next().value : undefined;
  return { host, tls: options.tls, allowedHosts: names.size > 0 ? names : undefined, publicName: first ?? own };
}
