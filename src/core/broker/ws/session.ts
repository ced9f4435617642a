/**
 * One proxied WebSocket connection, from the upstream handshake to its end.
 *
 * Each response the model generates is one request: a `response.create` (or a Gemini client turn)
 * is admitted before it is forwarded (an activation, and on budgeted keys the worst case of tokens
 * and spend, with the output capped to what is left), then metered from the upstream's final
 * event (`response.completed` / `response.done` / Gemini `turnComplete`) and settled. A prewarm
 * (`generate: false`) and the upgrade itself cost nothing. Revocation, expiry and exhaustion close
 * the socket with a 4xxx close code whose reason says why; message contents and keys are never
 * logged.
 */
import * as http from 'node:http';
import type { Duplex } from 'node:stream';
import WebSocket, { WebSocketServer, type RawData } from 'ws';
import { cutUsage, planHold, settlement, type HoldPlan, type HoldRequest } from '../../holds/plan';
import { credentialDenial, forwardedHeaders } from '../frontDoor';
import { denialBody, isDenial, type Denial } from '../../denial';
import { progressDue, progressEvent, type RequestInfo, type RequestUsage } from '../../events';
import type { Hold } from '../../keys/keys';
import type { KeyRecord, SettleDetails } from '../../ledger/ledger';
import { type Usage } from '../../metering/usage';
import type { SocketDialect, UsageFormat } from '../../providers/wire';
import { GeneratedText } from '../../metering/streamMeter';
import { type Amounts } from '../../policy/policy';
import { isFreeRoute, KEY_QUERY_PARAMS, type Provider } from '../../providers/providers';
import { duplicateKey } from '../duplicateKeys';
import { asObj, asStr } from '../../json';
import { takeRequestHold, type TakenHold } from '../../holds/requestHold';
import { relayedHeaders, type CredentialForms } from '../scrub';
import { KEY_PROTOCOL, TOKEN, writeResponse } from './handshake';
import type { ProxyOptions } from './options';
import { parseMessage, type Dialect, type DialectSession, type Turn } from './dialect';
import { GEMINI_DIALECT } from './geminiDialect';
import { OPENAI_DIALECT } from './openAiDialect';

/**
 * Close codes the broker sends when it ends a WebSocket itself (4000–4999 are for applications).
 * The close reason (at most 123 bytes) says why in words; it never holds a key.
 */
export const CLOSE_CODES = {
  /** A message the broker cannot check (not JSON). */
  badRequest: 4000,
  /** The till key was revoked or expired (or is no longer known). */
  revoked: 4001,
  /** The session asked for something outside the key's scope (Gemini: the model of `setup`). */
  forbidden: 4003,
  /** A limit of the key was reached (activations, tokens, spend), or its rate or concurrency. */
  exhausted: 4029,
  /** Standard: a message over the size limit. */
  tooBig: 1009,
  /** Standard: the broker failed. */
  internal: 1011,
} as const;

/**
 * Upstream handshake headers not relayed to the client: the broker answers its own handshake, and
 * a client following an upstream redirect would take its till key to another host.
 */
const NOT_RELAYED = new Set([
  'connection',
  'upgrade',
  'keep-alive',
  'transfer-encoding',
  'content-length',
  'set-cookie',
  'proxy-authenticate',
  'trailer',
  'location',
]);
/** Largest upstream refusal body relayed to a client. */
const MAX_REFUSAL_BODY = 64 * 1024;

function formatOf(dialect: SocketDialect): UsageFormat | undefined {
  return dialect === 'gemini' ? 'gemini' : dialect === 'generic' ? undefined : 'openai-responses';
}

/** A close code for a denial that ends a session. */
export function closeCodeFor(denial: Denial): number {
  if (denial.status === 401) return CLOSE_CODES.revoked;
  if (denial.status === 403) return CLOSE_CODES.forbidden;
  if (denial.status === 429) return CLOSE_CODES.exhausted;
  if (denial.status === 413) return CLOSE_CODES.tooBig;
  if (denial.status >= 500) return CLOSE_CODES.internal;
  return CLOSE_CODES.badRequest;
}

/** A close reason: `till…` text cut to the 123 bytes a close frame allows. */
export function closeReason(message: string): string {
  let text = message.startsWith('till') ? message : `till: ${message}`;
  if (Buffer.byteLength(text) <= 123) return text;
  while (Buffer.byteLength(text) > 120) text = text.slice(0, -1).replace(/[\uD800-\uDBFF]$/, '');
  return `${text}…`;
}

/** A close code that may be sent in a close frame (1005, 1006 and 1015 only describe what happened). */
function sendable(code: number): boolean {
  return (code >= 1000 && code <= 1014 && code !== 1004 && code !== 1005 && code !== 1006) || (code >= 3000 && code <= 4999);
}

function toBuffer(data: RawData): Buffer {
  if (Buffer.isBuffer(data)) return data;
  if (Array.isArray(data)) return Buffer.concat(data);
  return Buffer.from(data);
}

/** What a session needs of the proxy that accepted its upgrade. */
export interface SessionHost {
  readonly options: ProxyOptions;
  /** Completes client handshakes. */
  readonly server: WebSocketServer;
  /** Per upgrade request: the subprotocol to answer with and the upstream's handshake headers to pass on. */
  readonly answers: WeakMap<http.IncomingMessage, { protocol: string | false; headers: string[] }>;
  refuse(socket: Duplex, info: RequestInfo, denial: Denial, started: number, denied?: boolean): void;
  audit(info: RequestInfo, status: number, started: number, denial?: Denial, reason?: string): void;
}

export interface SessionSetup {
  req: http.IncomingMessage;
  socket: Duplex;
  head: Buffer;
  provider: Provider;
  key: KeyRecord;
  info: RequestInfo;
  dialect: SocketDialect;
  offered: string[];
  query: URLSearchParams;
  path: string;
  model: string | undefined;
  started: number;
}

/** How each dialect's messages are read; a generic socket's are not (the connection is the request). */
const READERS: Record<SocketDialect, Dialect | undefined> = {
  responses: OPENAI_DIALECT,
  realtime: OPENAI_DIALECT,
  gemini: GEMINI_DIALECT,
  generic: undefined,
};

/** One proxied WebSocket: its upstream, its requests, its end. */
export class Session implements DialectSession {
  private phase: 'connecting' | 'open' | 'ended' = 'connecting';
  private client: WebSocket | undefined;
  private upstream: WebSocket | undefined;
  readonly turns: Turn[] = [];
  private untrack: () => void = () => undefined;
  /** The connection's own hold, for routes whose requests Till cannot see (generic). */
  private admission: Hold | undefined;
  private finalized = false;
  /** Why the connection ended, for its audit line. */
  private endNote: string | undefined;
  /** Reading of [client, upstream] paused while the other side's queue drains. */
  private readonly paused = [false, false];
  /** Client messages that arrived while a turn's hold was on its way from a team ledger. */
  private held: [Buffer, boolean][] | undefined;
  /** Tokens of the last response (Realtime, Gemini): the conversation the next one carries. */
  lastTotal = 0;
  model: string | undefined;
  private readonly format: UsageFormat | undefined;
  private readonly reader: Dialect | undefined;
  readonly options: ProxyOptions;
  private readonly stop = () => this.shutdown();
  /** The credential's forms, to scrub from what the upstream sends (set once it is read). */
  private forms: CredentialForms | undefined;
  private readonly dropped = (name: string) =>
    this.options.log?.(`dropped the upstream's ${name} handshake header: it held the credential`);

  constructor(
    private readonly proxy: SessionHost,
    private readonly s: SessionSetup,
  ) {
    this.options = proxy.options;
    this.model = s.model;
    this.format = formatOf(s.dialect);
    this.reader = READERS[s.dialect];
  }

  private get openAi(): boolean {
    return this.s.dialect === 'responses' || this.s.dialect === 'realtime';
  }

  // What a dialect sees of its session (dialect.ts).
  get key(): KeyRecord {
    return this.s.key;
  }
  get provider(): Provider {
    return this.s.provider;
  }
  get path(): string {
    return this.s.path;
  }
  get dialect(): SocketDialect {
    return this.s.dialect;
  }
  get isOpen(): boolean {
    return this.phase === 'open';
  }
  addTurn(turn: Turn): void {
    this.turns.push(turn);
  }

  async connect(): Promise<void> {
    const { key, socket, info, provider } = this.s;
    this.untrack = this.options.keys.track(key, { cut: (d) => this.cut(d) });
    this.options.open.add(this.stop);
    socket.once('close', this.earlyClose);
    if (this.s.dialect === 'generic') {
      // Till cannot see requests inside this protocol: the connection is the request.
      const billable = !isFreeRoute(provider, 'GET', this.s.path);
      info.billable = billable;
      let amounts: Amounts | undefined;
      if (billable) {
        const planned = planHold(
          { provider: provider.id, model: undefined, format: undefined, json: undefined, bodyBytes: 0, stream: true },
          key.policy,
          this.options.keys.remaining(key),
          this.options.keys.heldFor(key),
          this.options.prices,
        );
        if (isDenial(planned)) return this.refuse(planned);
        amounts = planned.amounts;
      }
      let admitted = this.options.keys.hold(key, amounts, { cut: (d) => this.cut(d) });
      if (admitted instanceof Promise) {
        // A team ledger answers after a round trip: the session may have ended meanwhile.
        admitted = await admitted;
        if (this.phase !== 'connecting') {
          if (!isDenial(admitted)) admitted.settle();
          return;
        }
      }
      if (isDenial(admitted)) return this.refuse(admitted);
      this.admission = admitted;
      this.options.events.emit({ type: 'request.started', at: Date.now(), request: info });
    }
    let secret: string;
    try {
      secret = await this.options.secretFor(key.credential);
    } catch (err) {
      return this.refuse(credentialDenial(key.credential, err, this.options.log));
    }
    if (this.phase !== 'connecting') return;
    this.open(secret);
  }

  /** Opens the upstream WebSocket with the credential where the provider expects it. */
  private open(secret: string): void {
    const { provider, req, query, path, offered } = this.s;
    this.forms = this.options.formsOf(secret);
    const target = new URL(provider.baseUrl + path.slice(provider.basePath.length));
    target.protocol = target.protocol === 'https:' ? 'wss:' : 'ws:';
    const search = new URLSearchParams(query);
    const keyInQuery = KEY_QUERY_PARAMS.some((p) => search.has(p));
    for (const name of KEY_QUERY_PARAMS) search.delete(name);
    const headers = forwardedHeaders(req.headers, provider);
    const placement = provider.placement;
    if (placement.kind === 'query') search.set(placement.name, secret);
    // The Live API documents its key in the URL; a client that put its till key there gets the credential there.
    else if (provider.id === 'gemini' && keyInQuery) search.set('key', secret);
    else if (placement.kind === 'bearer') headers.authorization = `Bearer ${secret}`;
    else headers[placement.name] = secret;
    target.search = search.toString();
    // The key subprotocol carries the credential upstream (the Authorization header does too for
    // OpenAI; a credential that is not a valid token can only go there).
    const protocols = offered.flatMap((p) => (!p.startsWith(KEY_PROTOCOL) ? [p] : TOKEN.test(secret) ? [KEY_PROTOCOL + secret] : []));
    const where = `${target.protocol}//${target.host}`;

    let upstream: WebSocket;
    try {
      upstream = new WebSocket(target, protocols, {
        headers,
        handshakeTimeout: this.options.handshakeTimeoutMs,
        maxPayload: this.options.maxUpstreamMessageBytes,
        perMessageDeflate: false,
        followRedirects: false,
        autoPong: false,
      });
    } catch (err) {
      return this.refuse({ status: 400, code: 'bad_request', message: `the WebSocket cannot be forwarded: ${(err as Error).message}` });
    }
    this.upstream = upstream;
    let relayed: string[] = [];
    upstream.on('upgrade', (res) => {
      res.socket.setKeepAlive(true, 30_000);
      relayed = [];
      for (const [name, value] of Object.entries(relayedHeaders(res.headers, this.forms!, undefined, this.dropped, NOT_RELAYED))) {
        if (value === undefined || name.startsWith('sec-websocket-')) continue;
        for (const v of Array.isArray(value) ? value : [value]) relayed.push(`${name}: ${v}`);
      }
    });
    upstream.on('unexpected-response', (request, res) => this.relayRefusal(request, res));
    upstream.once('open', () => this.accept(relayed));
    upstream.on('error', (err: NodeJS.ErrnoException) => {
      if (this.phase !== 'connecting') return;
      const detail = err.code ?? err.message;
      this.options.log?.(`upstream WebSocket ${where} failed: ${detail}`);
      this.refuse({ status: 502, code: 'upstream_unreachable', message: `cannot reach ${provider.displayName} at ${where} (${detail})` });
    });
  }

  /** The upstream answered the handshake with something other than 101: the client gets that answer. */
  private relayRefusal(request: http.ClientRequest, res: http.IncomingMessage): void {
    if (this.phase !== 'connecting') {
      request.destroy();
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let done = false;
    const finish = () => {
      if (done) return;
      done = true;
      request.destroy();
      if (this.phase !== 'connecting') return;
      const status = res.statusCode ?? 502;
      const body = Buffer.concat(chunks);
      this.forms!.maskBytes(body);
      const headers: Record<string, string | number> = {};
      for (const [name, value] of Object.entries(relayedHeaders(res.headers, this.forms!, undefined, this.dropped, NOT_RELAYED))) {
        if (value === undefined || name.startsWith('sec-websocket-')) continue;
        headers[name] = Array.isArray(value) ? value.join(', ') : String(value);
      }
      headers['content-length'] = body.length;
      headers.connection = 'close';
      this.end('upstream_refused');
      this.s.socket.off('close', this.earlyClose);
      writeResponse(this.s.socket, status, headers, body);
      this.proxy.audit(this.s.info, status, this.s.started, undefined, `upstream answered the WebSocket handshake with ${status}`);
      this.finalize(status, true);
    };
    res.on('data', (chunk: Buffer) => {
      if (size + chunk.length > MAX_REFUSAL_BODY) return finish();
      size += chunk.length;
      chunks.push(chunk);
    });
    res.on('end', finish);
    res.on('error', finish);
    res.on('aborted', finish);
  }

  /** The upstream accepted: completes the client's handshake with the subprotocol it chose. */
  private accept(relayed: string[]): void {
    const upstream = this.upstream!;
    if (this.phase !== 'connecting') {
      upstream.terminate();
      return;
    }
    const { req, socket, head, offered } = this.s;
    const chosen = upstream.protocol;
    let protocol: string | false = false;
    if (chosen && !chosen.startsWith(KEY_PROTOCOL) && offered.includes(chosen)) protocol = chosen;
    // Never echo a key: an upstream that picked the key subprotocol gets none named back.
    else if (chosen) this.options.log?.(`upstream WebSocket chose a subprotocol the client cannot be answered with; answering none`);
    this.proxy.answers.set(req, { protocol, headers: relayed });
    socket.off('close', this.earlyClose);
    let attached = false;
    this.proxy.server.handleUpgrade(req, socket, head, (client) => {
      attached = true;
      this.attach(client);
    });
    if (!attached) {
      // ws refused the handshake itself (it answered the client): nothing to proxy.
      this.end('the client handshake failed');
      upstream.terminate();
      this.finalize(400);
    }
  }

  private attach(client: WebSocket): void {
    const upstream = this.upstream!;
    this.client = client;
    this.phase = 'open';
    this.admission?.reachedUpstream();
    client.on('message', (data, isBinary) => this.fromClient(toBuffer(data), isBinary));
    upstream.on('message', (data, isBinary) => this.fromUpstream(toBuffer(data), isBinary));
    client.on('ping', (data) => upstream.ping(data));
    client.on('pong', (data) => upstream.pong(data));
    upstream.on('ping', (data) => client.ping(data));
    upstream.on('pong', (data) => client.pong(data));
    client.on('close', (code, reason) => this.closed('client', code, reason));
    upstream.on('close', (code, reason) => this.closed('upstream', code, reason));
    client.on('error', (err) => {
      this.endNote ??= `client WebSocket error: ${err.message}`;
    });
    upstream.on('error', (err: NodeJS.ErrnoException) => {
      this.endNote ??= `upstream WebSocket error: ${err.code ?? err.message}`;
    });
  }

  // -------------------------------------------------------------------------------------------
  // Messages

  /** Sends towards one side; stops reading the other while this side's queue is over the high-water mark. */
  send(direction: 0 | 1, data: Buffer | string, binary: boolean, sent?: () => void): void {
    const to = direction === 0 ? this.upstream : this.client;
    const from = direction === 0 ? this.client : this.upstream;
    if (!to || !from || to.readyState !== WebSocket.OPEN) return;
    to.send(data, { binary }, (err) => {
      if (!err) sent?.();
      if (this.paused[direction] && to.bufferedAmount <= this.options.highWaterBytes / 2) {
        this.paused[direction] = false;
        from.resume();
      }
    });
    if (!this.paused[direction] && to.bufferedAmount > this.options.highWaterBytes) {
      this.paused[direction] = true;
      from.pause();
    }
  }

  private fromClient(data: Buffer, binary: boolean): void {
    if (this.phase !== 'open') return;
    // A turn's hold is on its way from a team ledger: what follows it waits, in order.
    if (this.held) return void this.held.push([data, binary]);
    if (this.s.dialect === 'generic') return this.send(0, data, binary);
    // Every message is read: a request hidden in one Till did not read would go unmetered.
    const text = data.toString('utf8');
    const msg = parseMessage(text);
    if (msg === null) {
      return this.refuseMessage(
        { status: 400, code: 'bad_request', message: 'messages on this WebSocket must be JSON, so that Till can check them' },
        undefined,
      );
    }
    // `{"type":"session.update","type":"response.create"}`: the broker would judge one, the upstream may act on the other.
    const twice = duplicateKey(text);
    if (twice !== undefined) {
      return this.refuseMessage(
        {
          status: 400,
          code: 'bad_request',
          message: `the message has the key "${twice}" twice in one object, which the upstream may read otherwise than Till: send it once`,
        },
        asStr(msg?.event_id),
      );
    }
    if (msg === undefined || !this.reader) return this.send(0, data, binary);
    this.reader.fromClient(this, msg, data, binary);
  }

  /**
   * Plans and takes the hold of a turn (the one place every dialect does), and starts it; the
   * denial when the key cannot cover it. Known conversations come from the shared store.
   */
  holdTurn(turn: Turn, request: HoldRequest, then: (planned: HoldPlan | Denial) => void): void {
    const taken = takeRequestHold(this.options, this.s.key, turn.info, request, { cut: (d) => this.cut(d) }, false);
    if (!(taken instanceof Promise)) return then(this.startTurn(turn, request, taken));
    this.held = [];
    taken
      .then((answer) => {
        if (this.phase !== 'open') {
          if (!isDenial(answer)) answer.hold.settle();
          return;
        }
        then(this.startTurn(turn, request, answer));
        const waiting = this.held ?? [];
        this.held = undefined;
        for (const [data, binary] of waiting) this.fromClient(data, binary);
      })
      .catch((err: unknown) => this.fail(err));
  }

  /** A turn's hold was taken: the turn starts. */
  private startTurn(turn: Turn, request: HoldRequest, taken: TakenHold | Denial): HoldPlan | Denial {
    if (isDenial(taken)) return taken;
    if (turn.early) {
      // Running before its hold arrived (the upstream started it): it reached the upstream. One
      // that already ended, its usage come before its hold, is settled at what the hold holds.
      taken.hold.reachedUpstream();
      if (!this.turns.includes(turn)) {
        taken.hold.settle();
        return taken.plan!;
      }
    }
    turn.hold = taken.hold;
    turn.plan = taken.plan;
    turn.streamHold = taken.streamHold;
    turn.request = { model: request.model, format: request.format, json: request.json, bodyBytes: request.bodyBytes };
    if (!turn.early) this.turns.push(turn);
    return taken.plan!;
  }

  private fromUpstream(data: Buffer, binary: boolean): void {
    if (this.phase !== 'open') return;
    // Never relay the credential, even in a message that echoes it (masked in place: same length).
    this.forms!.maskBytes(data);
    this.reader?.fromUpstream(this, data);
    if (this.phase === 'open') this.send(1, data, binary);
  }

  // -------------------------------------------------------------------------------------------
  // Requests (turns)

  newTurn(model: string | undefined, billable: boolean, streamId?: string, eventId?: string): Turn {
    const { info } = this.s;
    const turnInfo: RequestInfo = {
      requestId: `${info.requestId}.${this.turnCount++}`,
      keyId: info.keyId,
      label: info.label,
      provider: info.provider,
      method: 'WS',
      path: info.path,
      billable,
    };
    if (model !== undefined) turnInfo.model = model;
    return {
      info: turnInfo,
      started: performance.now(),
      reached: false,
      begun: false,
      streamId,
      eventId,
      generated: new GeneratedText(),
      lastProgress: { at: 0 },
    };
  }
  private turnCount = 1;

  reached(turn: Turn): void {
    if (turn.reached) return;
    turn.reached = true;
    turn.hold?.reachedUpstream();
  }

  /**
   * The upstream started a response: it belongs to the oldest request not yet started. One the
   * upstream started by itself (Realtime server VAD, a Gemini turn after audio input or a tool
   * response) is admitted now; if the key cannot afford it the session ends.
   */
  begin(responseId: string | undefined, streamId: string | undefined): Turn | undefined {
    let turn = this.turns.find((t) => !t.begun && (streamId === undefined || t.streamId === undefined || t.streamId === streamId));
    if (!turn && (this.s.dialect === 'realtime' || this.s.dialect === 'gemini')) {
      const fresh = this.newTurn(this.model, true, streamId);
      let answered = false;
      let refused = false;
      const request = {
        provider: this.s.provider.id,
        model: this.model,
        format: this.format,
        json: undefined,
        bodyBytes: 0,
        stream: true,
        carriedContext: this.lastTotal,
      };
      this.holdTurn(fresh, request, (planned) => {
        answered = true;
        if (!isDenial(planned)) return;
        refused = true;
        this.cut(planned);
      });
      if (refused) return undefined;
      if (!answered) {
        // A team ledger's answer is on its way: the turn runs meanwhile (the upstream started it).
        fresh.early = true;
        this.turns.push(fresh);
      }
      turn = fresh;
    }
    if (!turn) return undefined;
    turn.begun = true;
    if (responseId !== undefined) turn.responseId = responseId;
    this.reached(turn);
    return turn;
  }

  /** The request an upstream event belongs to: by response id, else the oldest (started, when `begunOnly`). */
  turnFor(responseId: string | undefined, streamId: string | undefined, begunOnly = false): Turn | undefined {
    if (responseId !== undefined) {
      const byId = this.turns.find((t) => t.responseId === responseId);
      if (byId) return byId;
    }
    return this.turns.find(
      (t) => (!begunOnly || t.begun) && (streamId === undefined || t.streamId === undefined || t.streamId === streamId),
    );
  }

  /** A turn produced `text`: its hold follows it (the session ends if the key cannot cover it), and views hear of it. */
  progress(turn: Turn, text: string | undefined, usage?: Usage): void {
    turn.generated.add(text);
    if (!turn.info.billable) return;
    if (turn.streamHold) {
      const denial = turn.streamHold.follow({
        textBytes: turn.generated.bytes,
        toolCalls: turn.generated.toolCalls,
        usage: () => usage ?? turn.usage,
      });
      if (denial) return this.cut(denial);
    }
    if (!progressDue(turn.lastProgress)) return;
    this.options.events.emit(progressEvent(turn.info, this.settleTurn(turn, undefined).usage, turn.hold?.held()));
  }

  /** What a turn has spent, priced, from `usage` (undefined: estimated from what it produced so far). */
  private settleTurn(turn: Turn, usage: Usage | undefined): ReturnType<typeof settlement> {
    const estimates = { inputEstimate: turn.plan?.inputEstimate ?? 0, outputChars: turn.generated.chars };
    return settlement(this.s.provider.id, turn.info.model, usage, estimates, this.options.prices);
  }

  /**
   * Ends a request: settles what it spent (reported usage; for one cut before it ended, what it
   * produced plus what the upstream may still generate, marked estimated), events, audit.
   */
  finishTurn(turn: Turn, status: number, usage: Usage | undefined, aborted?: string): void {
    const i = this.turns.indexOf(turn);
    if (i < 0) return;
    this.turns.splice(i, 1);
    const reported = usage && !usage.estimated ? usage.inputTokens + usage.outputTokens : undefined;
    if (reported !== undefined) this.lastTotal = reported;
    // What the next response continuing this one (previous_response_id) carries, for HTTP too. A
    // prewarm reports no tokens, yet leaves its input to the next: that is what it carries.
    const carries = turn.info.billable ? reported : turn.carries === undefined ? undefined : Math.max(turn.carries, reported ?? 0);
    if (carries !== undefined && turn.responseId !== undefined && this.s.dialect === 'responses')
      this.options.conversations.record(turn.responseId, carries);
    if (!turn.hold) return;
    let amounts: Amounts | undefined;
    let details: SettleDetails | undefined;
    let used: RequestUsage | undefined;
    if (!usage && !aborted && status >= 400) {
      // The upstream refused it: an activation, no tokens (as HTTP).
      amounts = { activations: 1, tokens: 0, spend: 0 };
    } else if (turn.reached) {
      const settled = aborted && turn.plan && turn.request ? cutUsage(turn.request, turn.plan, usage, turn.generated, true) : usage;
      const s = this.settleTurn(turn, settled);
      amounts = s.amounts;
      details = s.details;
      used = s.usage;
    }
    turn.hold.settle(amounts, details);
    const latencyMs = Math.round((performance.now() - turn.started) * 10) / 10;
    this.options.events.emit({
      type: 'request.finished',
      at: Date.now(),
      request: turn.info,
      status,
      latencyMs,
      ...(aborted ? { aborted } : {}),
      ...(used ? { usage: used } : {}),
    });
    this.proxy.audit(turn.info, status, turn.started, undefined, aborted);
  }

  /**
   * A request over the socket was refused. OpenAI's protocols get an `error` event in OpenAI's
   * shape and the message is not forwarded; Gemini Live has no error event, so its session ends.
   * A revoked, expired or used-up key ends the session either way.
   */
  refuseMessage(denial: Denial, eventId: string | undefined, model?: string): void {
    const info: RequestInfo = { ...this.s.info, method: 'WS', billable: true };
    if (model !== undefined) info.model = model;
    else delete info.model;
    this.options.events.emit({
      type: 'request.denied',
      at: Date.now(),
      request: info,
      status: denial.status,
      reason: denial.message,
      code: denial.code,
    });
    this.proxy.audit(info, denial.status, performance.now(), denial);
    // A key that is spent ends the session; one whose budget is held by requests in flight
    // (retry once they end) refuses this turn only, as a rate limit does.
    const ended = denial.code === 'revoked' || denial.code === 'expired' || denial.code === 'exhausted' || denial.code === 'unknown_key';
    const fatal = ended && denial.retryAfter === undefined;
    // Gemini Live has no error event: a refused message ends the session.
    if (this.s.dialect === 'gemini' || fatal) return this.cut(denial, eventId);
    this.sendError(denial, eventId);
  }

  private sendError(denial: Denial, eventId: string | undefined): void {
    const error = { ...(asObj(asObj(denialBody(this.s.provider.id, denial))?.error) ?? {}) };
    if (eventId !== undefined) error.event_id = eventId;
    const event = this.s.dialect === 'responses' ? { type: 'error', status: denial.status, error } : { type: 'error', error };
    this.send(1, JSON.stringify(event), false);
  }

  // -------------------------------------------------------------------------------------------
  // Ends

  /** Ends the session at once for a reason of Till's (revocation, exhaustion, expiry, scope). */
  cut(denial: Denial, eventId?: string): void {
    if (this.phase === 'connecting') return this.refuse(denial);
    if (this.phase !== 'open') return;
    if (this.openAi) this.sendError(denial, eventId);
    this.end(denial.code);
    this.endTurns(denial.code, denial.status);
    this.client?.close(closeCodeFor(denial), closeReason(denial.message));
    // Stop generating (and billing) now; the upstream needs no polite close.
    this.upstream?.terminate();
  }

  /** A fault of Till's while connecting: logged, and the handshake refused with a 500. */
  fail(err: unknown): void {
    this.options.log?.(`websocket ${this.s.path}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    this.refuse({ status: 500, code: 'internal_error', message: 'Till failed to open the WebSocket (see the broker log)' });
  }

  /** Refuses the handshake while the upstream is still being connected. */
  private refuse(denial: Denial): void {
    if (this.phase !== 'connecting') return;
    this.end(denial.code);
    this.s.socket.off('close', this.earlyClose);
    this.upstream?.terminate();
    // A connection already admitted as a request (generic routes) ends as one, not as a denial.
    const admitted = this.admission !== undefined;
    this.finishConnection(denial.status, denial.code);
    this.proxy.refuse(this.s.socket, this.s.info, denial, this.s.started, !admitted);
    this.finalize(denial.status, true);
  }

  /** The client went away before its handshake was answered. */
  private readonly earlyClose = () => {
    if (this.phase !== 'connecting') return;
    this.end('client_closed');
    this.upstream?.terminate();
    this.finalize(499);
  };

  /** One side closed: the other is closed the same way (a close frame, or none). */
  private closed(side: 'client' | 'upstream', code: number, reason: Buffer): void {
    if (this.phase === 'open') {
      this.end(`${side} closed (${code})`);
      this.endTurns(side === 'client' ? 'client_closed' : 'upstream_closed');
      const other = side === 'client' ? this.upstream : this.client;
      if (other && other.readyState !== WebSocket.CLOSED) {
        if (code === 1006) other.terminate();
        else if (sendable(code)) other.close(code, reason);
        else other.close();
      }
    }
    if (side === 'client') {
      if (this.upstream && this.upstream.readyState !== WebSocket.CLOSED && this.upstream.readyState !== WebSocket.CLOSING)
        this.upstream.terminate();
      this.finalize(101);
    }
  }

  /** The broker is closing: end everything now, settling while the ledger is still open. */
  private shutdown(): void {
    if (this.phase === 'connecting') {
      this.end('broker_closed');
      this.upstream?.terminate();
      this.s.socket.destroy();
    } else if (this.phase === 'open') {
      this.end('broker_closed');
      this.endTurns('broker_closed');
      this.client?.terminate();
      this.upstream?.terminate();
    }
    this.finalize(this.client ? 101 : 499);
  }

  private end(note: string): void {
    if (this.phase === 'ended') return;
    this.phase = 'ended';
    this.endNote ??= note;
  }

  /** Settles every open request: they were cut, and are billed from what they produced. */
  private endTurns(aborted: string, status = 499): void {
    for (const turn of [...this.turns]) this.finishTurn(turn, turn.begun ? 200 : status, turn.usage, aborted);
  }

  private finishConnection(status: number, aborted?: string): void {
    const admission = this.admission;
    if (!admission) return;
    this.admission = undefined;
    admission.settle();
    const latencyMs = Math.round((performance.now() - this.s.started) * 10) / 10;
    this.options.events.emit({
      type: 'request.finished',
      at: Date.now(),
      request: this.s.info,
      status,
      latencyMs,
      ...(aborted ? { aborted } : {}),
    });
  }

  /** Unregisters the session and writes its connection's audit line (once). */
  private finalize(status: number, audited = false): void {
    if (this.finalized) return;
    this.finalized = true;
    this.untrack();
    this.options.open.delete(this.stop);
    this.finishConnection(status, this.endNote);
    if (!audited)
      this.proxy.audit(this.s.info, status, this.s.started, undefined, this.endNote ? `websocket: ${this.endNote}` : 'websocket closed');
  }
}
