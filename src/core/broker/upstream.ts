/**
 * The upstream side of one HTTP exchange: one request through `node:http`'s keep-alive agents,
 * seen by the exchange as a few calls and events (no client objects in exchange.ts).
 *
 * `node:http` because a cut stream needs what it alone can do: close the request side of the
 * connection (the upstream notices and stops) and read on, so that what the upstream had sent by
 * then is still counted ({@link UpstreamCall.drain}). undici's pooled client was tried for answers
 * read whole: 27 % less CPU in a bare proxy, but no difference the bench could tell in the
 * broker (0.94x to 1.03x in two runs beside the node:http build), for 8 MiB more memory and 350 KB
 * more bundle; left out.
 */
import * as http from 'node:http';
import * as https from 'node:https';

/** The keep-alive agents of one broker, closed with it. */
export class UpstreamClients {
  readonly agents = {
    'http:': new http.Agent({ keepAlive: true, maxSockets: 256, noDelay: true }),
    'https:': new https.Agent({ keepAlive: true, maxSockets: 256, noDelay: true }),
  };

  /** Drops every connection. */
  close(): void {
    this.agents['http:'].destroy();
    this.agents['https:'].destroy();
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
   * runs `then`: our end of the connection is closed at once, which the upstream notices.
   */
  drain(ms: number, then: () => void): void;
}

/** Sends `request`. Throws when a header cannot be sent. */
export function callUpstream(clients: UpstreamClients, request: UpstreamRequest, handler: UpstreamHandler): UpstreamCall {
  return new NodeHttpCall(clients, request, handler);
}

function idleError(ms: number): Error {
  return new Error(`the upstream sent nothing for ${ms / 1000} s`);
}

/** A call through `node:http`. */
class NodeHttpCall implements UpstreamCall {
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
      agent: clients.agents[target.protocol as 'http:' | 'https:'],
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
