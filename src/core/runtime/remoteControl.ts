/**
 * The control API over the network, for a team broker: the same routes as the local socket
 * (control.ts), under `/_till/` on the broker's own listener, for `till --broker https://… issue`
 * from a laptop or a CI runner.
 *
 * Guarantees: every call carries the admin token (`Authorization: Bearer …`, compared in constant
 * time) and passes the broker's front door first (Host names, browser origins refused); the
 * broker answers these routes only when an admin token is configured; an address that sent ten
 * wrong tokens within a minute is refused until that minute is over (adminLockout.ts); the client
 * sends the token only over TLS, or to this machine's loopback address.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import { answerControl, ControlChannel, ControlError, reply, tokenMatches, type ControlRoutes } from './control';
import { isLoopbackAddress } from '../broker/listener';
import { ADMIN_FAILURES, AdminLockout } from './adminLockout';

/** The prefix of the control routes on the broker's listener. */
export const REMOTE_CONTROL_PREFIX = '/_till';

/** Shortest admin token accepted: a guessable token would hand out keys to anyone who can connect. */
export const MIN_ADMIN_TOKEN = 32;

/** Checks an admin token's strength; throws saying how to make one. */
export function checkAdminToken(token: string): void {
  if (token.length < MIN_ADMIN_TOKEN || /\s/.test(token)) {
    throw new Error(
      `the admin token must be at least ${MIN_ADMIN_TOKEN} characters with no spaces: make one with \`openssl rand -hex 32\``,
    );
  }
}

/**
 * The broker's handler for `/_till/…`: the admin token, then the control route. `scheme` is the
 * listener's, for the origin keys are issued with (the Host the client used, which the front door
 * has already checked). A plain-HTTP listener is on loopback: a request there saying
 * `X-Forwarded-Proto: https` came through a TLS-terminating proxy on this machine (nginx, Caddy),
 * and the client reaches the broker over https.
 */
export function remoteControlHandler(
  routes: ControlRoutes,
  token: string,
  scheme: 'http' | 'https',
  log?: (line: string) => void,
): (req: http.IncomingMessage, res: http.ServerResponse) => void {
  const lockout = new AdminLockout();
  return (req, res) => {
    const address = req.socket.remoteAddress ?? 'unknown';
    const wait = lockout.retryAfter(address);
    if (wait > 0) {
      return reply(
        res,
        429,
        { error: `too many wrong admin tokens from ${address}: try again in ${wait} s` },
        { 'retry-after': String(wait) },
      );
    }
    if (!tokenMatches(req.headers.authorization, token)) {
      if (lockout.failed(address)) log?.(`admin requests from ${address} refused for a minute: ${ADMIN_FAILURES} wrong admin tokens`);
      return reply(res, 401, { error: 'bad admin token' }, { 'www-authenticate': 'Bearer' });
    }
    const path = req.url!.slice(REMOTE_CONTROL_PREFIX.length);
    const used = scheme === 'http' && req.headers['x-forwarded-proto'] === 'https' ? 'https' : scheme;
    void answerControl(req, res, routes, path, { origin: `${used}://${req.headers.host}` });
  };
}

/** Options of a {@link RemoteControlClient}. */
export interface RemoteControlOptions {
  /** The broker, e.g. `https://till.example.com:8455`. */
  url: string;
  /** The admin token. */
  token: string;
  /** PEM certificates to trust besides the system's (a team's own CA or a self-signed certificate). */
  ca?: string | Buffer;
}

/** The control channel to a team broker over HTTPS. */
export class RemoteControlClient extends ControlChannel {
  private readonly base: URL;

  constructor(private readonly options: RemoteControlOptions) {
    super();
    let base: URL;
    try {
      base = new URL(options.url);
    } catch {
      throw new ControlError(400, `--broker needs a URL such as https://till.example.com:8455, not "${options.url}"`);
    }
    if (base.protocol !== 'https:' && !(base.protocol === 'http:' && isLoopbackAddress(base.hostname))) {
      throw new ControlError(400, `the admin token goes only over https (or to this machine): use https://${base.host}`);
    }
    this.base = base;
  }

  protected open(method: string, path: string, body?: unknown): Promise<http.IncomingMessage> {
    const url = new URL(REMOTE_CONTROL_PREFIX + path, this.base);
    const options: https.RequestOptions = {
      method,
      headers: { authorization: `Bearer ${this.options.token}`, 'content-type': 'application/json' },
    };
    if (this.options.ca !== undefined) options.ca = this.options.ca;
    const transport = url.protocol === 'https:' ? https : http;
    return new Promise((resolve, reject) => {
      const req = transport.request(url, options, resolve);
      req.on('error', (err: NodeJS.ErrnoException) => reject(new Error(reachError(this.base, err), { cause: err })));
      req.end(body === undefined ? undefined : JSON.stringify(body));
    });
  }
}

/** What to tell the user when the team broker cannot be reached. */
function reachError(base: URL, err: NodeJS.ErrnoException): string {
  const code = err.code ?? '';
  if (code === 'ECONNREFUSED' || code === 'ENOTFOUND' || code === 'EHOSTUNREACH' || code === 'ETIMEDOUT')
    return `no Till broker answers at ${base.origin} (${code})`;
  if (code.includes('CERT') || code.includes('SELF_SIGNED') || code === 'ERR_TLS_CERT_ALTNAME_INVALID')
    return `the broker at ${base.origin} has a certificate this machine does not trust (${code}): give its CA with --ca FILE (or TILL_CA)`;
  return `the broker at ${base.origin} could not be reached: ${err.message}`;
}
