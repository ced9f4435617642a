/**
 * The upstream side of one HTTP exchange, over the one of two clients that suits it:
 *
 * - **pooled** (undici's Agent): a request whose body is whole and whose answer is not a stream
 *   it asked for. Measured with the broker's processes pinned to a core of their own, beside the
 *   same broker on `node:http` alone: 8 % less CPU per request at c=1 and 13 % at c=32 (1.20× and
 *   1.08× a bare pass-through's, against 1.30× and 1.24×; 4 % and 1 % in one bench run with that
 *   build as its baseline), for 4 to 10 MiB more memory (undici's code and its WebAssembly HTTP
 *   parser) and 355 KB of bundle. An earlier measurement, unpinned, could not tell the two apart.
 *   Only in `till serve` ({@link BrokerOptions.pooledUpstream}): the extension's broker runs in VS
 *   Code's extension host, shared with other extensions, where V8's optimizing compiler would take
 *   some 27 MB at its peak compiling that parser, and `till serve` keeps it to the baseline compiler.
 * - **streamed** (`node:http`): streams and uploads. Only it can close the request side of a
 *   connection and read on, which a cut stream needs: the upstream notices and stops, and what it
 *   had sent by then is still read and counted (see {@link UpstreamCall.drain}).
 *
 * Both give the exchange the same calls and events, so it does not know which client it has.
 * Header values travel as latin1, byte for byte, as `node:http` hands them over.
 */
import * as http from 'node:http';
import * as https from 'node:https';
import type { Agent, Dispatcher } from 'undici';

/**
 * undici's dispatcher, required only by a broker that asks for it (`till serve`: the extension's
 * never loads it), and only it, not undici's index (fetch, caches, WebSocket, mocks): the bundles
 * stay some 400 KB smaller.
 */
function newAgent(): Agent {
  // eslint-disable-next-line @typescript-eslint/no-require-imports
  const AgentClass = require('undici/lib/dispatcher/agent') as typeof Agent;
  return new AgentClass({ connections: 256, keepAliveTimeout: 4_000, pipelining: 1 });
}

/** The clients of one broker, closed with it. */
export class UpstreamClients {
  /** undici's, when the broker asked for it (`till serve`); else every call goes through `node:http`. */
  readonly pooled: Agent | undefined;
  readonly streamed = {
    'http:': new http.Agent({ keepAlive: true, maxSockets: 256, noDelay: true }),
    'https:': new https.Agent({ keepAlive: true, maxSockets: 256, noDelay: true }),
  };

  constructor(pooled: boolean) {
    this.pooled = pooled ? newAgent() : undefined;
  }

  /** Drops every connection. */
  close(): void {
    void this.pooled?.destroy().catch(() => undefined);
    this.streamed['http:'].destroy();
    this.streamed['https:'].destroy();
  }
}

/** One request to send upstream. */
export interface UpstreamRequest {
  /** Its origin (`http://host:port`); `path` carries the path and query. */
  target: URL;
  method: string;
  path: string;
  headers: http.OutgoingHttpHeaders;
  /** The whole body, or the client's request to stream on (an upload), or none. */
  body: Buffer | http.IncomingMessage | undefined;
  /** How long the upstream may send nothing before the call fails. */
  idleTimeoutMs: number;
  /** The answer is expected to be a stream (or the body is an upload): the streamed client carries it. */
  streamed: boolean;
}

/** What the exchange hears from a call, in this order: sent, then response and its answer, or failed. */
export interface UpstreamHandler {
  /** The whole request is on the upstream's wire: it may bill it. */
  sent(): void;
  /** The answer's head; what it returns receives the answer's body. */
  response(status: number, headers: http.IncomingHttpHeaders): AnswerHandler;
  /** No answer: the upstream could not be reached, failed or timed out before answering. */
  failed(err: NodeJS.ErrnoException): void;
}

/** Receives one answer's body. */
export interface AnswerHandler {
  data(chunk: Buffer): void;
  end(): void;
  /** The answer broke off (the upstream closed or failed mid-answer). */
  error(): void;
}

/** A request in flight. */
export interface UpstreamCall {
  /** Stops reading the answer (a slow client) until {@link resume}. */
  pause(): void;
  resume(): void;
  /** Drops the call: nothing more is delivered. */
  destroy(): void;
  /**
   * Ends the call but reads on for up to `ms` (delivering data, not `end`), then destroys it and
   * runs `then`. The streamed client closes its end of the connection at once, which the upstream
   * notices; the pooled one cannot, and reads its (whole, held) answer on.
   */
  drain(ms: number, then: () => void): void;
}

/** Sends `request` with the client that suits it. Throws when a header cannot be sent. */
export function callUpstream(clients: UpstreamClients, request: UpstreamRequest, handler: UpstreamHandler): UpstreamCall {
  const pooled = clients.pooled;
  return !pooled || request.streamed || !(request.body === undefined || Buffer.isBuffer(request.body))
    ? new StreamedCall(clients, request, handler)
    : new PooledCall(pooled, request, handler);
}

function idleError(ms: number): Error {
  return new Error(`the upstream sent nothing for ${ms / 1000} s`);
}

/** A call through `node:http`. */
class StreamedCall implements UpstreamCall {
  private readonly req: http.ClientRequest;
  private res: http.IncomingMessage | undefined;

  constructor(clients: UpstreamClients, r: UpstreamRequest, handler: UpstreamHandler) {
    const { target } = r;
    const transport = target.protocol === 'https:' ? https : http;
    const req = transport.request({
      protocol: target.protocol,
      hostname: target.hostname,
      port: target.port,
      method: r.method,
      path: r.path,
      headers: r.headers,
      agent: clients.streamed[target.protocol as 'http:' | 'https:'],
      timeout: r.idleTimeoutMs,
    });
    this.req = req;
    // Sent once connected and the whole request is on the wire.
    let connected = false;
    req.on('socket', (socket) => {
      if (socket.connecting) socket.once('connect', () => (connected = true));
      else connected = true;
    });
    req.on('finish', () => {
      if (connected) handler.sent();
    });
    req.on('timeout', () => req.destroy(idleError(r.idleTimeoutMs)));
    req.on('error', (err: NodeJS.ErrnoException) => {
      if (!this.res) handler.failed(err);
    });
    req.on('response', (res) => {
      this.res = res;
      const answer = handler.response(res.statusCode ?? 502, res.headers);
      res.on('data', (chunk: Buffer) => answer.data(chunk));
      res.on('end', () => answer.end());
      res.on('error', () => answer.error());
      // A socket closed mid-answer: Node ends the response with 'aborted' and 'close', no error.
      res.on('close', () => {
        if (!res.complete) answer.error();
      });
    });
    if (Buffer.isBuffer(r.body)) req.end(r.body);
    else if (r.body) r.body.pipe(req);
    else req.end();
  }

  pause(): void {
    this.res?.pause();
  }

  resume(): void {
    this.res?.resume();
  }

  destroy(): void {
    this.req.destroy();
  }

  drain(ms: number, then: () => void): void {
    const res = this.res;
    if (!res || res.complete || res.destroyed) {
      this.req.destroy();
      return then();
    }
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      clearTimeout(timer);
      this.req.destroy();
      then();
    };
    const timer = setTimeout(finish, ms);
    res.once('end', finish);
    res.once('close', finish);
    res.once('error', finish);
    res.resume();
    this.req.socket?.end();
  }
}

/** A call through undici's pooled client (its handler interface: no stream objects per request). */
class PooledCall implements UpstreamCall, Dispatcher.DispatchHandler {
  private abortCall: ((err?: Error) => void) | undefined;
  private resumeCall: (() => void) | undefined;
  private paused = false;
  private answer: AnswerHandler | undefined;
  private ended = false;
  /** Set while draining: runs once the answer ends or fails. */
  private drained: (() => void) | undefined;
  /** An error the dispatch reported before it returned (an argument undici refused). */
  private early: Error | undefined;
  private dispatching = true;
  private readonly idleTimeoutMs: number;

  constructor(
    pooled: Agent,
    r: UpstreamRequest,
    private readonly handler: UpstreamHandler,
  ) {
    this.idleTimeoutMs = r.idleTimeoutMs;
    const headers: Record<string, string | string[]> = {};
    for (const name of Object.keys(r.headers)) {
      const value = r.headers[name];
      // A whole body is sent at once: there is nothing to wait for a 100 Continue for (undici refuses the header).
      if (value === undefined || name === 'expect') continue;
      headers[name] = typeof value === 'number' ? String(value) : value;
    }
    pooled.dispatch(
      {
        origin: r.target.origin,
        method: r.method,
        path: r.path,
        headers,
        body: r.body,
        headersTimeout: r.idleTimeoutMs,
        bodyTimeout: r.idleTimeoutMs,
      },
      this,
    );
    this.dispatching = false;
    if (this.early) throw this.early;
  }

  // --- undici's handler

  onConnect(abort: (err?: Error) => void): void {
    this.abortCall = abort;
  }

  onRequestSent(): void {
    this.handler.sent();
  }

  onHeaders(status: number, raw: Buffer[], resume: () => void): boolean {
    this.resumeCall = resume;
    this.answer = this.handler.response(status, parseHeaders(raw));
    return !this.paused;
  }

  onData(chunk: Buffer): boolean {
    if (!this.ended) this.answer?.data(chunk);
    return !this.paused;
  }

  onComplete(): void {
    if (this.ended) return;
    if (this.drained) return this.finishDrain();
    this.ended = true;
    this.answer?.end();
  }

  onError(err: Error): void {
    if (this.dispatching) {
      this.early = err;
      return;
    }
    if (this.ended) return;
    if (this.drained) return this.finishDrain();
    this.ended = true;
    if (!this.answer) return this.handler.failed(isTimeout(err) ? idleError(this.idleTimeoutMs) : err);
    this.answer.error();
  }

  // --- the call

  pause(): void {
    this.paused = true;
  }

  resume(): void {
    if (!this.paused) return;
    this.paused = false;
    this.resumeCall?.();
  }

  destroy(): void {
    if (this.ended) return;
    this.ended = true;
    this.abortCall?.(new Error('the exchange ended'));
  }

  drain(ms: number, then: () => void): void {
    if (this.ended || !this.answer) {
      this.destroy();
      return then();
    }
    const timer = setTimeout(() => this.finishDrain(), ms);
    this.drained = () => {
      clearTimeout(timer);
      then();
    };
    this.resume();
  }

  private finishDrain(): void {
    const then = this.drained;
    this.drained = undefined;
    this.destroy();
    then?.();
  }
}

/** One of undici's timeouts (worded as the streamed client's idle timeout is, {@link idleError}). */
function isTimeout(err: Error & { code?: string }): boolean {
  return err.code === 'UND_ERR_HEADERS_TIMEOUT' || err.code === 'UND_ERR_BODY_TIMEOUT';
}

/** Raw header pairs as `node:http` gives them: lower-case names, `set-cookie` a list, repeats joined. */
function parseHeaders(raw: Buffer[]): http.IncomingHttpHeaders {
  const headers: http.IncomingHttpHeaders = {};
  for (let i = 0; i + 1 < raw.length; i += 2) {
    const name = raw[i]!.toString('latin1').toLowerCase();
    const value = raw[i + 1]!.toString('latin1');
    const had = headers[name];
    if (name === 'set-cookie') (headers['set-cookie'] ??= []).push(value);
    else headers[name] = had === undefined ? value : `${had as string}, ${value}`;
  }
  return headers;
}
