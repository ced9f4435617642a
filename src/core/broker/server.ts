/**
 * The broker: an HTTP server on 127.0.0.1 (or, with TLS, another address: listener.ts) that
 * takes requests carrying a till key, checks them, swaps in the real credential and streams the
 * upstream's answer back unbuffered.
 *
 * Routes: `/<provider><path>`, e.g. `/openai/v1/chat/completions`. The path after the
 * provider id is in the provider's own namespace (see {@link Provider.basePath}). `/_till/…` is
 * the control API for remote admins (runtime/remoteControl.ts), when the service offers it.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import type { AddressInfo, Socket } from 'node:net';
import type { AuditLog } from '../audit/audit';
import { ConnectionBudget } from './connectionBudget';
import { ConversationSizes } from '../holds/contexts';
import type { TillEvents } from '../events';
import { Exchange, type ExchangeContext } from './exchange';
import { clientDenial, MAX_HEADERS } from './frontDoor';
import { InFlightList } from '../keys/inFlightList';
import { listener, type Listener, type ListenOptions } from './listener';
import type { TillKeys } from '../keys/keys';
import { withDefaults } from '../options';
import type { PriceTable } from '../metering/pricing';
import { providerBaseUrl, type Provider, type ProviderRegistry } from '../providers/providers';
import { CredentialForms } from './scrub';
import type { Vault } from '../credentials/vault';
import { WebSocketProxy } from './ws/proxy';
import { UpstreamClients } from './upstream';

/** Answers one HTTP request. */
type RequestHandler = (req: http.IncomingMessage, res: http.ServerResponse) => void;

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
  /** What the upstream's stored conversations weigh (contexts.ts). Default: remembered in memory only. */
  conversations?: ConversationSizes;
  /** Port; 0 picks a free one. Default: {@link DEFAULT_PORT}. */
  port?: number;
  /** Address, TLS and host names. Default: 127.0.0.1, plain HTTP, loopback names only. */
  listen?: ListenOptions;
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
  /**
   * Answers read whole go through undici's pooled client (less CPU per request, a few MiB more
   * memory; upstream.ts), streams and uploads through `node:http`. Default: false, `node:http` for
   * all (the extension's broker, in VS Code's shared extension host); `till serve` sets it.
   */
  pooledUpstream?: boolean;
  /** Where diagnostic lines go. Never given a secret. */
  log?: (line: string) => void;
}

/** The local broker. */
export class Broker {
  private server: http.Server | undefined;
  private readonly listener: Listener;
  /** A TLS listener's connections, handshakes included (plain HTTP: the server's own list does). */
  private readonly connections = new Set<Socket>();
  /** The control API over the network, once the service offers it. */
  private controlHandler: RequestHandler | undefined;
  private readonly upstream: UpstreamClients;
  /** Credential reads, shared by every request that needs one (a burst reads the keychain once). */
  private readonly secrets = new Map<string, Promise<string>>();
  private readonly cachedSecrets = new Map<string, string>();
  /** What to scrub from answers, per credential secret (see scrub.ts). */
  private readonly credentialForms = new Map<string, CredentialForms>();
  private readonly options: BrokerOptions & { [K in keyof typeof BROKER_DEFAULTS]: number };
  private port = 0;
  /** Ends each admitted request still open; close() runs them so no hold outlives the ledger. */
  private readonly requests = new InFlightList<() => void>();
  /** The same for WebSocket sessions (few and long-lived, so a Set does: see inFlightList.ts). */
  private readonly open = new Set<() => void>();

  /** What each exchange uses of this broker (built once: exchanges are many). */
  private readonly context: ExchangeContext;

  constructor(options: BrokerOptions) {
    this.options = withDefaults(BROKER_DEFAULTS, options);
    const o = this.options;
    this.listener = listener(o.listen);
    this.upstream = new UpstreamClients(o.pooledUpstream === true);
    // eslint-disable-next-line @typescript-eslint/no-this-alias
    const broker = this;
    this.context = {
      keys: o.keys,
      providers: o.providers,
      prices: o.prices,
      events: o.events,
      audit: o.audit,
      conversations: o.conversations ?? new ConversationSizes(undefined),
      maxBodyBytes: o.maxBodyBytes,
      allowedHosts: this.listener.allowedHosts,
      upstreamIdleTimeoutMs: o.upstreamIdleTimeoutMs,
      get url() {
        return broker.url;
      },
      baseUrlFor: (p) => this.baseUrlFor(p),
      upstream: this.upstream,
      cachedSecret: (name) => this.cachedSecrets.get(name),
      secretFor: (name) => this.secretFor(name),
      formsOf: (secret) => this.formsOf(secret),
      requests: this.requests,
      log: (line) => this.log(line),
    };
  }

  /** `http://127.0.0.1:<port>` once listening (`https://<name>:<port>` on a TLS listener). */
  get url(): string {
    return `${this.listener.tls ? 'https' : 'http'}://${this.listener.publicName}:${this.port}`;
  }

  /** The base URL a client of `provider` should use, e.g. `http://127.0.0.1:8455/openai/v1`. */
  baseUrlFor(provider: Provider): string {
    return providerBaseUrl(this.url, provider);
  }

  /** Starts listening. Rejects with a clear message when the port is taken. */
  async start(): Promise<string> {
    const o = this.options;
    const { host, tls } = this.listener;
    const settings: http.ServerOptions = {
      maxHeaderSize: o.maxHeaderBytes,
      headersTimeout: o.headersTimeoutMs,
      requestTimeout: o.requestTimeoutMs,
      // Node checks both timeouts only every connectionsCheckingInterval (default 30 s), which
      // would let a slowloris client hold a connection for up to 30 s past either limit.
      connectionsCheckingInterval: Math.max(
        10,
        Math.floor(Math.min(4_000, ...[o.headersTimeoutMs, o.requestTimeoutMs].filter((t) => t > 0)) / 4),
      ),
      noDelay: true,
      keepAliveTimeout: 5_000,
    };
    // A client that connects and never finishes the TLS handshake is dropped as one that never
    // sends its headers is (Node's default waits 120 s, time enough to pile up descriptors).
    const server = tls
      ? https.createServer({ ...settings, cert: tls.cert, key: tls.key, handshakeTimeout: o.headersTimeoutMs })
      : http.createServer(settings);
    // Over TLS, every connection from its first byte (see close()).
    if (tls) {
      server.on('connection', (socket: Socket) => {
        this.connections.add(socket);
        socket.once('close', () => this.connections.delete(socket));
      });
    }
    // One past the limit, so a request over it is seen and refused rather than cut short (clientDenial).
    server.maxHeadersCount = MAX_HEADERS + 1;
    server.on('request', (req, res) => this.handle(req, res));
    // Thousands of idle connections must not use up the descriptors real requests need.
    new ConnectionBudget().watch(server);
    // WebSockets (Codex's Responses transport, Realtime, Gemini Live): same checks, see ws/proxy.ts.
    const websockets = new WebSocketProxy({
      keys: o.keys,
      providers: o.providers,
      prices: o.prices,
      events: o.events,
      audit: o.audit,
      log: o.log,
      maxMessageBytes: o.maxBodyBytes,
      open: this.open,
      conversations: this.context.conversations,
      secretFor: (name) => this.secretFor(name),
      formsOf: (secret) => this.formsOf(secret),
      baseUrlFor: (p) => this.baseUrlFor(p),
      http: (req, res) => this.handle(req, res),
      allowedHosts: this.listener.allowedHosts,
    });
    server.on('upgrade', (req: http.IncomingMessage, socket, head: Buffer) => websockets.upgrade(req, socket, head));
    server.on('clientError', (err: NodeJS.ErrnoException, socket) => {
      // A TLS handshake that failed or timed out has no HTTP to answer in: an answer written to
      // it would wait there, keeping the connection open.
      if (!socket.writable || err.code?.startsWith('ERR_TLS') || err.code?.startsWith('ERR_SSL')) return socket.destroy();
      const status = err.code === 'HPE_HEADER_OVERFLOW' ? 431 : err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : 400;
      const text = status === 431 ? 'till: request headers too large' : status === 408 ? 'till: request timed out' : 'till: bad request';
      socket.end(
        `HTTP/1.1 ${status} ${http.STATUS_CODES[status]}\r\nContent-Type: text/plain\r\nContent-Length: ${text.length}\r\nConnection: close\r\n\r\n${text}`,
      );
    });
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => {
        if (err.code !== 'EADDRINUSE') return reject(err);
        const inUse: NodeJS.ErrnoException = new Error(
          `port ${o.port} on ${host} is already in use (another program, or another till broker): choose another with --port`,
        );
        inUse.code = 'EADDRINUSE';
        reject(inUse);
      });
      server.listen(o.port, host, () => resolve());
    });
    this.server = server;
    this.port = (server.address() as AddressInfo).port;
    return this.url;
  }

  /**
   * Answers `/_till/…` (the control API over the network) with `handler`, after the front door's
   * checks. Until then (and without it) those paths are no provider's: 404.
   */
  serveControl(handler: RequestHandler): void {
    this.controlHandler = handler;
  }

  private control(handler: RequestHandler, req: http.IncomingMessage, res: http.ServerResponse): void {
    const refused = clientDenial(req, this.listener.allowedHosts);
    if (!refused) return handler(req, res);
    const body = JSON.stringify({ error: refused.message });
    res.writeHead(refused.status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) });
    res.end(body);
  }

  /** Whether `/_till/…` is answered (see {@link serveControl}). */
  get servesControl(): boolean {
    return this.controlHandler !== undefined;
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
      // Connections still in their TLS handshake are no HTTP server's yet: closeAllConnections
      // leaves them, and close() would wait for them (a `till serve` that SIGTERM did not stop).
      for (const socket of this.connections) socket.destroy();
    });
    this.upstream.close();
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
    // `/_` is no provider's: one character compare keeps the control route off the hot path.
    const control = this.controlHandler;
    if (control && req.url?.charCodeAt(1) === 95 && req.url.startsWith('/_till/')) return this.control(control, req, res);
    const exchange = new Exchange(this.context, req, res);
    try {
      exchange.start();
    } catch (err) {
      exchange.fail(err);
    }
  }
}
