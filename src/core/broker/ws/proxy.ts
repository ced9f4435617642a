/**
 * WebSockets through the broker, under the same policy as HTTP: OpenAI Responses over WebSocket
 * (what Codex CLI tries first), OpenAI Realtime and Gemini Live, and any other WebSocket route of
 * a provider as one request per connection.
 *
 * The upgrade is checked like an HTTP request (Host, Origin, till key, provider, path scope,
 * expiry, revocation, exhaustion) and refused with an HTTP answer in the provider's error shape.
 * The upstream is connected first and the client's upgrade completed only once the upstream has
 * accepted, so the client is answered with the subprotocol the upstream chose, an upstream
 * refusal (a 426 makes Codex fall back to HTTP at once) reaches the client as it was sent, and no
 * message ever waits in the broker for the upstream to open. The connection itself is a Session
 * (session.ts).
 */
import * as http from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { WebSocketServer } from 'ws';
import { auditRecord } from '../../audit/audit';
import { clientDenial, findTillKey, noUpstreamDenial, pathDenial, splitUrl } from '../frontDoor';
import { denialResponse, outOfScope, type Denial } from '../../denial';
import type { RequestInfo } from '../../events';
import type { KeyRecord } from '../../ledger/ledger';
import { limitsOf, METERS, modelViolation, pathViolation } from '../../policy/policy';
import { formatAmount, formatUsd } from '../../keys/present';
import { apiPath, KEY_HEADERS, KEY_QUERY_PARAMS } from '../../providers/providers';
import { withDefaults } from '../../options';
import { andThen } from '../../maybe';
import { looksLikeTillKey } from '../../keys/tillKey';
import { KEY_PROTOCOL, TOKEN, writeResponse } from './handshake';
import type { ProxyOptions, WebSocketProxyOptions } from './options';
import { Session, type SessionHost } from './session';

const WS_KEY = /^[+/0-9A-Za-z]{22}==$/;
let connectionCounter = 0;

/** Why a key's limit is used up, or undefined when none is. */
function exhaustion(key: KeyRecord): Denial | undefined {
  const limits = limitsOf(key.policy);
  for (const meter of METERS) {
    const limit = limits[meter];
    const used = key.used[meter] ?? 0;
    if (limit === undefined || used < limit) continue;
    const message =
      meter === 'activations'
        ? `till key exhausted: ${used} of ${limit} activations used`
        : meter === 'tokens'
          ? `till key out of tokens: ${formatAmount('tokens', used)} of ${formatAmount('tokens', limit)} used`
          : `till key over budget: ${formatUsd(used)} of ${formatUsd(limit)} spent`;
    return { status: 429, code: 'exhausted', message };
  }
  return undefined;
}

/** The WebSocket side of the broker: give it every `upgrade` event of the HTTP server. */
export class WebSocketProxy implements SessionHost {
  readonly options: ProxyOptions;
  /** Completes client handshakes (no server of its own). */
  readonly server: WebSocketServer;
  /** Per upgrade request: the subprotocol to answer with and the upstream's handshake headers to pass on. */
  readonly answers = new WeakMap<http.IncomingMessage, { protocol: string | false; headers: string[] }>();

  constructor(options: WebSocketProxyOptions) {
    this.options = withDefaults(
      {
        maxMessageBytes: 32 * 1024 * 1024,
        maxUpstreamMessageBytes: 64 * 1024 * 1024,
        handshakeTimeoutMs: 30_000,
        highWaterBytes: 1024 * 1024,
      },
      options,
    );
    this.server = new WebSocketServer({
      noServer: true,
      clientTracking: false,
      perMessageDeflate: false,
      maxPayload: this.options.maxMessageBytes,
      // Pings and pongs are passed through, not answered by the broker.
      autoPong: false,
      handleProtocols: (_offered, req) => this.answers.get(req)?.protocol ?? false,
    });
    this.server.on('headers', (headers, req) => {
      const extra = this.answers.get(req)?.headers;
      if (extra) headers.push(...extra);
    });
  }

  /** Handles one `upgrade` event of the broker's HTTP server. */
  upgrade(req: http.IncomingMessage, socket: Duplex, head: Buffer): void {
    socket.on('error', () => undefined);
    if ((req.headers.upgrade ?? '').toLowerCase() !== 'websocket') return this.plainHttp(req, socket);
    const started = performance.now();
    const { providerId, path: sent, query } = splitUrl(req.url);
    const provider = this.options.providers.get(providerId);
    const path = apiPath(provider, sent);
    const info: RequestInfo = {
      requestId: `ws${++connectionCounter}`,
      keyId: '',
      label: '',
      provider: provider?.id ?? providerId,
      method: req.method ?? 'GET',
      path,
      billable: false,
    };
    const deny = (denial: Denial, key?: KeyRecord) => {
      if (key) {
        info.keyId = key.id;
        info.label = key.label;
      }
      this.refuse(socket, info, denial, started);
    };

    // The same checks as HTTP, in the same order.
    const refused = clientDenial(req, this.options.allowedHosts);
    if (refused) return deny(refused);
    if (!provider) {
      return deny({
        status: 404,
        code: 'unknown_provider',
        message: `no provider "${providerId}": use ws://127.0.0.1:<port>/<provider>/…, e.g. /openai/v1/responses`,
      });
    }
    const outside = pathDenial(provider, path, this.options.baseUrlFor(provider));
    if (outside) return deny(outside);
    // `/v1/realtime/` or `/v1/realtime;x` may be Realtime to an upstream that normalises paths,
    // while to the broker it would be a generic socket whose model and turns go unchecked.
    if (path.includes(';') || (path.length > 1 && path.endsWith('/'))) {
      return deny({
        status: 400,
        code: 'bad_request',
        message: `the WebSocket path ${path} is not in canonical form (no trailing slash, no ";")`,
      });
    }
    // Checked here (ws would too) so that a malformed handshake never reaches the upstream.
    const wsKey = req.headers['sec-websocket-key'];
    if (req.method !== 'GET' || req.headers['sec-websocket-version'] !== '13' || typeof wsKey !== 'string' || !WS_KEY.test(wsKey.trim())) {
      return deny({
        status: 400,
        code: 'bad_request',
        message: 'not a valid WebSocket handshake (GET, Sec-WebSocket-Version: 13, a Sec-WebSocket-Key)',
      });
    }
    const offered = (req.headers['sec-websocket-protocol'] ?? '')
      .split(',')
      .map((p) => p.trim())
      .filter((p) => p !== '');
    if (offered.some((p) => !TOKEN.test(p)) || new Set(offered).size !== offered.length) {
      return deny({ status: 400, code: 'bad_request', message: 'the Sec-WebSocket-Protocol header is not a list of distinct tokens' });
    }

    const presented = this.presentedKey(req, query, offered);
    if (typeof presented !== 'string') return deny(presented);
    // Asked of a team ledger first when this broker has not heard of the key (issued elsewhere a moment ago).
    const answered = andThen(this.options.keys.authenticateAnywhere(presented, provider.id), (auth) => {
      if ('denial' in auth) return deny(auth.denial, auth.key);
      const key = auth.key;
      info.keyId = key.id;
      info.label = key.label;
      const dialect = provider.wire.socketDialect(path);
      // Methods are checked per request made over the socket (a response is a POST); the upgrade
      // itself is checked for its path and, for Realtime, the model named in the URL.
      const model = dialect === 'realtime' ? (query.get('model') ?? undefined) : undefined;
      if (model !== undefined) info.model = model;
      const scope =
        pathViolation(key.policy, path) ??
        (dialect === 'realtime' ? modelViolation(key.policy.models, model, true) : undefined) ??
        (dialect === 'generic' && key.policy.models
          ? `this till key is limited to models ${key.policy.models.join(', ')} and Till cannot see the model used over ${path}`
          : undefined);
      const outOfKeyScope = outOfScope(scope);
      if (outOfKeyScope) return deny(outOfKeyScope, key);
      const spent = exhaustion(key);
      if (spent) return deny(spent, key);
      if (provider.needsUpstream) return deny(noUpstreamDenial(provider), key);
      const session = new Session(this, { req, socket, head, provider, key, info, dialect, offered, query, path, model, started });
      // A fault of Till's while connecting answers the handshake with a 500, never an unhandled rejection.
      session.connect().catch((err: unknown) => session.fail(err));
    });
    if (answered instanceof Promise) answered.catch(() => socket.destroy());
  }

  /** The till key of a handshake: where HTTP looks for it, or the Realtime key subprotocol. */
  private presentedKey(req: http.IncomingMessage, query: URLSearchParams, offered: string[]): string | Denial {
    const inProtocol = [...new Set(offered.filter((p) => p.startsWith(KEY_PROTOCOL)).map((p) => p.slice(KEY_PROTOCOL.length)))];
    const found = findTillKey(req, query);
    if (inProtocol.length === 0) return found;
    if (inProtocol.length > 1)
      return { status: 400, code: 'malformed_key', message: 'the handshake carries two different keys in its subprotocols' };
    const fromProtocol = inProtocol[0]!;
    if (!looksLikeTillKey(fromProtocol)) {
      return {
        status: 401,
        code: 'missing_key',
        message: 'the broker accepts only till keys (till_…); this handshake carries some other key, which was not forwarded',
      };
    }
    if (typeof found === 'string') {
      return found === fromProtocol
        ? found
        : { status: 400, code: 'malformed_key', message: 'the handshake carries two different till keys' };
    }
    // No key anywhere else: the subprotocol's is the one. Another key elsewhere: refuse as HTTP does.
    const elsewhere = KEY_HEADERS.some((h) => req.headers[h] !== undefined) || KEY_QUERY_PARAMS.some((p) => query.has(p));
    return elsewhere ? found : fromProtocol;
  }

  /** An `Upgrade` that is not a WebSocket (curl's `h2c`): served as the plain HTTP/1.1 request it also is. */
  private plainHttp(req: http.IncomingMessage, socket: Duplex): void {
    const length = req.headers['content-length'];
    if (req.headers['transfer-encoding'] !== undefined || (length !== undefined && length !== '0')) {
      const text = 'till: only WebSocket upgrades are supported; send this request without an Upgrade header';
      return writeResponse(
        socket,
        400,
        { 'content-type': 'text/plain', 'content-length': Buffer.byteLength(text), connection: 'close' },
        text,
      );
    }
    const res = new http.ServerResponse(req);
    res.shouldKeepAlive = false;
    res.assignSocket(socket as Socket);
    res.on('finish', () => {
      res.detachSocket(socket as Socket);
      socket.end();
    });
    this.options.http(req, res);
  }

  /** Refuses a handshake with an HTTP answer in the provider's error shape (`denied`: emit request.denied). */
  refuse(socket: Duplex, info: RequestInfo, denial: Denial, started: number, denied = true): void {
    const { body, headers } = denialResponse(info.provider, denial);
    writeResponse(socket, denial.status, { ...headers, connection: 'close' }, body);
    if (!denied) return this.audit(info, denial.status, started, undefined, denial.code);
    this.options.events.emit({
      type: 'request.denied',
      at: Date.now(),
      request: { ...info },
      status: denial.status,
      reason: denial.message,
      code: denial.code,
    });
    this.audit(info, denial.status, started, denial);
  }

  audit(info: RequestInfo, status: number, started: number, denial?: Denial, reason?: string): void {
    this.options.audit?.append(auditRecord(info, status, started, denial, reason));
  }
}

/** One request made over a socket: a generated response. */
