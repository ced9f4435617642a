/**
 * The control channel: how `till issue/ls/revoke/watch` and other VS Code windows talk to
 * the one broker of this OS user. HTTP over a unix socket (a named pipe on Windows) in the
 * owner-only data folder, plus a bearer token from a 0600 file, so only the same OS user
 * can open it. Binding the socket is also the lock that keeps a second broker off the ledger.
 */
import { randomBytes, timingSafeEqual } from 'node:crypto';
import { chmodSync, existsSync, statSync, unlinkSync } from 'node:fs';
import * as http from 'node:http';
import { connect } from 'node:net';
import type { TillPaths } from './home';
import { checkOwnSocket, claimPrivateFolder, PrivateFolderError, readPrivateFile, writePrivateFile } from '../files/privateFolder';

/** Thrown when another broker already serves this data folder. */
export class AlreadyRunningError extends Error {
  constructor(readonly url: string | undefined) {
    super(`a Till broker is already running for this data folder${url ? ` at ${url}` : ''}`);
    this.name = 'AlreadyRunningError';
  }
}

/** Thrown by the client when no broker answers. */
export class NotRunningError extends Error {
  constructor(home: string) {
    super(`no Till broker is running for ${home}: start one with \`till serve\` (or open VS Code with Till)`);
    this.name = 'NotRunningError';
  }
}

/** A control request that failed, with the broker's message. */
export class ControlError extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
    this.name = 'ControlError';
  }
}

/** How a control request arrived: over the network (remoteControl.ts), the origin its client used. */
export interface ControlVia {
  /** `https://<host>`, as the client reached the broker; absent on the local socket. */
  origin?: string;
}

/** Handles one control request; throw {@link ControlError} for a refusal. */
export type ControlRoute = (body: unknown, params: string[], via: ControlVia) => unknown;

/** Streams server-sent lines to a client until it leaves; returns the cleanup, run when it has gone. */
export type ControlStream = (send: (value: unknown) => void, params: string[]) => () => void;

export interface ControlRoutes {
  routes: Record<string, ControlRoute>;
  streams: Record<string, ControlStream>;
}

/** Compares a presented `Bearer <token>` with the token in constant time. */
export function tokenMatches(presented: string | undefined, token: string): boolean {
  const expected = Buffer.from(`Bearer ${token}`);
  const given = Buffer.from(presented ?? '');
  return given.length === expected.length && timingSafeEqual(given, expected);
}

function isAlive(socketPath: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(socketPath);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** Answers a control request with `value` as JSON (and `headers`, when given). */
export function reply(res: http.ServerResponse, status: number, value: unknown, headers?: http.OutgoingHttpHeaders): void {
  const body = JSON.stringify(value);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body), ...headers });
  res.end(body);
}

/**
 * Answers one authenticated control request (`path` is the route and its parameters, e.g.
 * `/keys/k_1/extend`), on the local socket and over the network alike.
 */
export async function answerControl(
  req: http.IncomingMessage,
  res: http.ServerResponse,
  handlers: ControlRoutes | undefined,
  path: string,
  via: ControlVia,
): Promise<void> {
  if (!handlers) return reply(res, 503, { error: 'the broker is starting' });
  const url = new URL(path, 'http://control');
  const [, first = '', ...params] = url.pathname.split('/');
  const route = `${req.method} /${first}`;
  let decoded: string[];
  try {
    decoded = params.map(decodeURIComponent);
  } catch {
    return reply(res, 400, { error: 'bad percent-encoding in the control path' });
  }
  const stream = handlers.streams[route];
  if (stream) {
    res.writeHead(200, { 'content-type': 'application/x-ndjson' });
    res.flushHeaders();
    const stop = stream((value) => res.write(JSON.stringify(value) + '\n'), decoded);
    res.on('close', stop);
    return;
  }
  const handler = handlers.routes[route];
  if (!handler) return reply(res, 404, { error: `no control route ${route}` });
  let text = '';
  try {
    for await (const chunk of req) {
      text += chunk;
      if (text.length > 1_000_000) return reply(res, 413, { error: 'control request too large' });
    }
  } catch {
    // The client went away mid-request (over the network, a dropped connection): nothing to answer.
    return;
  }
  let body: unknown;
  try {
    body = text ? JSON.parse(text) : undefined;
  } catch {
    return reply(res, 400, { error: `control request ${route}: its body must be JSON and its path percent-encoded` });
  }
  try {
    reply(res, 200, (await handler(body, decoded, via)) ?? {});
  } catch (err) {
    reply(res, err instanceof ControlError ? err.status : 500, { error: (err as Error).message });
  }
}

/** The broker side. `claim()` first (it is the lock), `serve()` once the broker is up. */
export class ControlServer {
  private server: http.Server | undefined;
  private token = '';
  private handlers: ControlRoutes | undefined;

  constructor(private readonly paths: TillPaths) {}

  /** Takes the socket, or throws {@link AlreadyRunningError}. */
  async claim(): Promise<void> {
    // A socket outside the data folder goes in a folder of this user's alone: in a folder anyone
    // can write, another user could bind the name first and pose as the broker.
    if (this.paths.socketFolder !== undefined) claimPrivateFolder(this.paths.socketFolder, 'the control socket folder');
    if (process.platform !== 'win32' && existsSync(this.paths.socket)) {
      if (await isAlive(this.paths.socket)) throw new AlreadyRunningError(await this.peerUrl());
      unlinkSync(this.paths.socket); // left by a broker that was killed
    }
    this.token = randomBytes(32).toString('hex');
    const server = http.createServer((req, res) => void this.handle(req, res));
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) => reject(err.code === 'EADDRINUSE' ? new AlreadyRunningError(undefined) : err));
      server.listen(this.paths.socket, () => resolve());
    });
    if (process.platform !== 'win32') {
      chmodSync(this.paths.socket, 0o600);
      // Two would-be brokers may both find a dead broker's socket: one can unlink the socket the
      // other has just bound. The one whose socket is gone after a moment steps back.
      const ino = statSync(this.paths.socket).ino;
      await new Promise((r) => setTimeout(r, 100));
      if (statSync(this.paths.socket, { throwIfNoEntry: false })?.ino !== ino) {
        // Not close(): closing unlinks the path, which is now the other broker's socket.
        server.removeAllListeners('request');
        server.unref();
        throw new AlreadyRunningError(undefined);
      }
    }
    writePrivateFile(this.paths.token, this.token);
    this.server = server;
  }

  private async peerUrl(): Promise<string | undefined> {
    try {
      const status = (await new ControlClient(this.paths).request('GET', '/status')) as { url?: string };
      return status.url;
    } catch {
      return undefined;
    }
  }

  /** Starts answering requests. */
  serve(handlers: ControlRoutes): void {
    this.handlers = handlers;
  }

  private handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    if (!tokenMatches(req.headers.authorization, this.token)) return Promise.resolve(reply(res, 401, { error: 'bad control token' }));
    return answerControl(req, res, this.handlers, req.url ?? '/', {});
  }

  async close(): Promise<void> {
    const server = this.server;
    this.server = undefined;
    if (!server) return;
    await new Promise<void>((resolve) => {
      server.close(() => resolve());
      server.closeAllConnections();
    });
    try {
      unlinkSync(this.paths.token);
    } catch {
      // already gone
    }
  }
}

/**
 * A control client's calls, whatever carries them: the local socket ({@link ControlClient}) or
 * HTTPS to a team broker (remoteControl.ts).
 */
export abstract class ControlChannel {
  /** Sends one request; resolves with the answer's head (its body still to read). */
  protected abstract open(method: string, path: string, body?: unknown): Promise<http.IncomingMessage>;

  /** One request; resolves with the parsed answer or rejects with {@link ControlError}. */
  async request(method: string, path: string, body?: unknown): Promise<unknown> {
    const res = await this.open(method, path, body);
    let text = '';
    for await (const chunk of res) text += chunk;
    const value = (text ? JSON.parse(text) : {}) as { error?: string };
    if ((res.statusCode ?? 500) >= 400)
      throw new ControlError(res.statusCode ?? 500, value.error ?? `control request failed (${res.statusCode})`);
    return value;
  }

  /**
   * Calls `onValue` for each streamed line until `signal` aborts or the broker goes away.
   * `onOpen` runs once the broker streams (nothing it sends after that is missed).
   */
  async stream(path: string, onValue: (value: unknown) => void, signal?: AbortSignal, onOpen?: () => void): Promise<void> {
    const res = await this.open('GET', path);
    if ((res.statusCode ?? 500) >= 400) throw new ControlError(res.statusCode ?? 500, `control stream ${path} failed (${res.statusCode})`);
    onOpen?.();
    signal?.addEventListener('abort', () => res.destroy());
    let buffer = '';
    await new Promise<void>((resolve) => {
      res.on('data', (chunk: Buffer) => {
        buffer += chunk.toString('utf8');
        let nl: number;
        while ((nl = buffer.indexOf('\n')) >= 0) {
          const line = buffer.slice(0, nl);
          buffer = buffer.slice(nl + 1);
          if (line) onValue(JSON.parse(line));
        }
      });
      res.on('close', () => resolve());
      res.on('error', () => resolve());
    });
  }
}

/** The client side on this machine, for the `till` command and other VS Code windows. */
export class ControlClient extends ControlChannel {
  constructor(private readonly paths: TillPaths) {
    super();
  }

  private token(): string {
    let token: string | undefined;
    try {
      token = readPrivateFile(this.paths.token);
    } catch (err) {
      if (err instanceof PrivateFolderError) throw err;
    }
    if (token === undefined) throw new NotRunningError(this.paths.home);
    return token.trim();
  }

  protected open(method: string, path: string, body?: unknown): Promise<http.IncomingMessage> {
    const paths = this.paths;
    const token = this.token();
    // The token goes only to a socket this user bound: anything else may be posing as the broker.
    checkOwnSocket(paths.socket);
    return new Promise((resolve, reject) => {
      const req = http.request(
        { socketPath: paths.socket, method, path, headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' } },
        resolve,
      );
      req.on('error', (err: NodeJS.ErrnoException) => {
        reject(err.code === 'ENOENT' || err.code === 'ECONNREFUSED' ? new NotRunningError(paths.home) : err);
      });
      req.end(body === undefined ? undefined : JSON.stringify(body));
    });
  }
}
