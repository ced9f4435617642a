/**
 * One HTTP request through the broker, in named steps, each handing on to the next:
 *
 *   check    the front door, the till key, its scope (method, path)     frontDoor.ts, keys/keys.ts
 *   read     the body: whole when Till must judge it, else streamed on
 *   inspect  its model (scope), its JSON (duplicate keys refused)
 *   credential  the secret from the vault (cached: no await on the hot path)
 *   hold     plan the hold (holds/plan.ts), take it with the activation (keys/keys.ts); nothing is
 *            awaited between planning and taking, so what is left cannot move
 *   forward  once the hold is on disk: the credential in place, upstream
 *   relay    the answer back unbuffered, scrubbed of the credential (scrub.ts), metered
 *            (metering/streamMeter.ts); a stream's hold follows it (holds/streamHold.ts)
 *   finish   settle from the reported usage (or an estimate for a cut stream), events, audit
 *
 * Anything refused ends in `deny` with an answer in the provider's error shape. Revocation,
 * expiry, a hold that cannot grow and the broker closing end the exchange through `cut`/`stop`.
 */
import * as http from 'node:http';
import { auditRecord, type AuditLog } from '../audit/audit';
import { cutUsage, settlement, type HoldPlan } from '../holds/plan';
import type { ConversationSizes } from '../holds/contexts';
import { denialEvent, denialResponse, isDenial, outOfScope, type Denial } from '../denial';
import { duplicateKey } from './duplicateKeys';
import { progressDue, progressEvent, type RequestInfo, type RequestUsage, type TillEvent, type TillEvents } from '../events';
import { clientDenial, credentialDenial, findTillKey, forwardedHeaders, noUpstreamDenial, pathDenial, splitUrl } from './frontDoor';
import type { InFlightEntry, InFlightList } from '../keys/inFlightList';
import type { Authentication, Hold, TillKeys } from '../keys/keys';
import type { KeyRecord, SettleDetails } from '../ledger/ledger';
import { usageFormat, usageFromJson, type Usage } from '../metering/usage';
import type { UsageFormat } from '../providers/wire';
import { StreamMeter } from '../metering/streamMeter';
import { methodViolation, modelViolation, pathViolation, type Amounts } from '../policy/policy';
import type { PriceTable } from '../metering/pricing';
import { apiPath, isFreeRoute, KEY_QUERY_PARAMS, type Provider, type ProviderRegistry } from '../providers/providers';
import { takeRequestHold, type TakenHold } from '../holds/requestHold';
import { BodyScrubber, CredentialForms, relayedHeaders } from './scrub';
import { TICK_MS, type StreamHold } from '../holds/streamHold';
import { callUpstream, type AnswerHandler, type UpstreamCall, type UpstreamClients, type UpstreamHandler } from './upstream';

type Json = Record<string, unknown>;

/** What an exchange needs of the broker it runs in. */
export interface ExchangeContext {
  keys: TillKeys;
  providers: ProviderRegistry;
  prices: PriceTable;
  events: TillEvents;
  audit: AuditLog | undefined;
  conversations: ConversationSizes;
  maxBodyBytes: number;
  /** Non-loopback names the Host header may carry (listener.ts); undefined: loopback names only. */
  allowedHosts: ReadonlySet<string> | undefined;
  upstreamIdleTimeoutMs: number;
  /** `http://127.0.0.1:<port>`. */
  url: string;
  baseUrlFor(provider: Provider): string;
  upstream: UpstreamClients;
  /** A credential's secret when cached (synchronous), else undefined. */
  cachedSecret(name: string): string | undefined;
  secretFor(name: string): Promise<string>;
  formsOf(secret: string): CredentialForms;
  /** Exchanges in flight, ended by the broker's close. */
  requests: InFlightList<() => void>;
  log(line: string): void;
}

let requestCounter = 0;

/** How long the rest of a refused body is read and dropped before its connection is closed. */
const LINGER_MS = 2_000;

/**
 * Before refusing a request whose body is still arriving (413): the rest is read and dropped for
 * a moment instead of the connection being closed with the answer. Closing with bytes unread
 * makes the OS reset the connection, and a client still writing would get ECONNRESET instead of
 * the 413. The connection stays usable if the body ends in time; it is cut after {@link LINGER_MS}.
 */
function lingerThenClose(req: http.IncomingMessage, res: http.ServerResponse): void {
  if (req.complete) return;
  // Node would otherwise answer `Connection: close` and close once the answer is written.
  res.shouldKeepAlive = true;
  const timer = setTimeout(() => req.socket.destroy(), LINGER_MS);
  timer.unref();
  req.once('end', () => clearTimeout(timer));
  req.once('close', () => clearTimeout(timer));
}

/** A body the upstream could read otherwise than the broker did (duplicate keys): refused for any key. */
class AmbiguousBody extends Error {}

/**
 * The request's model (from the path for Gemini, else the JSON body) and its parsed body. A body
 * is parsed when it is declared JSON, or when the route is metered (`parseAnyType`).
 */
function inspectBody(
  provider: Provider,
  path: string,
  body: Buffer | undefined,
  contentType: string | undefined,
  parseAnyType: boolean,
): { model?: string; json?: Json } | Error {
  let json: Json | undefined;
  if (body && body.length > 0 && (parseAnyType || contentType?.includes('json'))) {
    const text = body.toString('utf8');
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch {
      return new Error('the request body is not valid JSON');
    }
    const twice = duplicateKey(text);
    if (twice !== undefined)
      return new AmbiguousBody(
        `the request body has the key "${twice}" twice in one object, which the upstream may read otherwise than Till: send it once`,
      );
    if (parsed && typeof parsed === 'object' && !Array.isArray(parsed)) json = parsed as Json;
  }
  if (provider.modelFromPath) {
    const m = provider.modelFromPath.exec(path);
    if (m) {
      // A stray `%` would make decodeURIComponent throw inside a request handler: the whole broker would go down.
      try {
        return { model: decodeURIComponent(m[1]!), json };
      } catch {
        return new Error('the model in the request path is not valid percent-encoding');
      }
    }
  }
  const model = json?.model;
  return { model: typeof model === 'string' ? model : undefined, json };
}

/** An upstream base URL, parsed once (the path of each request is appended as text). */
const upstreams = new Map<string, { url: URL; path: string }>();
function upstreamOf(baseUrl: string): { url: URL; path: string } {
  let parsed = upstreams.get(baseUrl);
  if (!parsed) {
    const url = new URL(baseUrl);
    parsed = { url, path: url.pathname.replace(/\/+$/, '') };
    upstreams.set(baseUrl, parsed);
  }
  return parsed;
}

/**
 * How long a cut request's upstream answer is still read (not relayed) for its count: what the
 * upstream sent before it noticed the cut, which buffers may still hold. An upstream notices our
 * closed connection within a round trip and drops its end, which ends the drain at once; this
 * bounds the wait for one that does not (and for a busy process), while the hold stays taken.
 */
const CUT_DRAIN_MS = 1000;

/** How much of a followed stream's answer may wait for a slow client before the upstream is paused. */
const FOLLOWED_BUFFER_BYTES = 8 * 1024 * 1024;

/** JSON answers up to this size are metered by parsing them whole. */
const SMALL_JSON = 1024 * 1024;

/** Usage from a whole JSON answer (undefined when it is not JSON or has none), and the response's id. */
function jsonAnswer(format: UsageFormat, chunks: Buffer[]): { usage?: Usage; id?: string } {
  try {
    const body: unknown = JSON.parse((chunks.length === 1 ? chunks[0]! : Buffer.concat(chunks)).toString('utf8'));
    const id = (body as { id?: unknown } | null)?.id;
    return { usage: usageFromJson(format, body), ...(typeof id === 'string' ? { id } : {}) };
  } catch {
    return {};
  }
}

const NULL_USAGE = Buffer.from('"usage":null');

/**
 * A chunk as the client would have had it without `include_usage`, which also puts
 * `"usage":null` on every chunk before the usage one: the field removed (with its comma).
 * `"usage":null` unescaped can only be a key and its value: inside a string its quotes are escaped.
 */
function withoutNullUsage(raw: Buffer): Buffer {
  const at = raw.indexOf(NULL_USAGE);
  if (at < 0) return raw;
  let from = at;
  let to = at + NULL_USAGE.length;
  if (raw[from - 1] === 0x2c) from--;
  else if (raw[to] === 0x2c) to++;
  return Buffer.concat([raw.subarray(0, from), raw.subarray(to)]);
}

/** A streaming request by its body (`stream: true`) or route (Gemini's `streamGenerateContent`). */
function asksStream(format: UsageFormat | undefined, path: string, json: Json | undefined): boolean {
  return format === 'gemini' ? path.includes(':streamGenerateContent') : json?.stream === true;
}

/** One HTTP request through the broker (see the module comment for its steps). */
export class Exchange implements UpstreamHandler {
  private readonly started = performance.now();
  private readonly info: RequestInfo;
  private provider: Provider | undefined;
  private key: KeyRecord | undefined;
  private query: URLSearchParams;
  private path: string;
  private body: Buffer | undefined;
  private json: Json | undefined;
  /** The body streams on to the upstream (an upload) instead of being read whole. */
  private streamBody = false;
  private format: UsageFormat | undefined;
  private plan: HoldPlan | undefined;
  private hold: Hold | undefined;
  private streamHold: StreamHold | undefined;
  private secret = '';
  private upstream: UpstreamCall | undefined;
  /** The upstream URL asked (origin and path), for rewriting a `Location` it answers with. */
  private requestUrl = '';
  private registered: InFlightEntry<() => void> | undefined;
  private ended = false;
  /** The whole request is on the upstream's wire: it may bill it. */
  private onWire = false;
  private upstreamStatus = 0;
  private isSse = false;
  /** The last byte relayed ended an SSE event: an error event can be appended cleanly. */
  private sseBoundary = true;
  private jsonBody: Buffer[] | undefined;
  private jsonId: string | undefined;
  private meter: StreamMeter | undefined;
  /** The answer began (its head came): what it produced from then on is billed. */
  private answering = false;
  private stripUsage = false;
  /** The answer may be a stream Till meters (a metered request that asks for one, or whose body it could not read as JSON). */
  private meteredStream = false;
  private readonly lastProgress = { at: 0 };
  private tick: NodeJS.Timeout | undefined;
  /** Cut short: the upstream's answer is read for the count, no longer relayed. */
  private draining = false;

  constructor(
    private readonly c: ExchangeContext,
    private readonly req: http.IncomingMessage,
    private readonly res: http.ServerResponse,
  ) {
    const { providerId, path, query } = splitUrl(req.url);
    this.provider = c.providers.get(providerId);
    this.path = apiPath(this.provider, path);
    this.query = query;
    this.info = {
      requestId: String(++requestCounter),
      keyId: '',
      label: '',
      provider: this.provider?.id ?? providerId,
      method: req.method ?? 'GET',
      path: this.path,
      billable: false,
    };
  }

  // -------------------------------------------------------------------------------------------
  // check

  /** Runs the exchange: the front door, then each step in turn. */
  start(): void {
    const { req, c, info } = this;
    const refused = clientDenial(req, c.allowedHosts);
    if (refused) return this.deny(refused);
    const provider = this.provider;
    if (!provider)
      return this.deny({
        status: 404,
        code: 'unknown_provider',
        message: `no provider "${info.provider}": use ${c.url}/<provider>/…, e.g. ${c.url}/openai/v1`,
      });
    const outside = pathDenial(provider, this.path, c.baseUrlFor(provider));
    if (outside) return this.deny(outside);
    const presented = findTillKey(req, this.query);
    if (typeof presented !== 'string') return this.deny(presented);
    const auth = c.keys.authenticateAnywhere(presented, provider.id);
    if (!(auth instanceof Promise)) return this.authenticated(auth);
    // A team ledger asked for a key this broker had not heard of.
    void auth.then((answer) => {
      try {
        this.authenticated(answer);
      } catch (err) {
        this.fail(err);
      }
    });
  }

  /** The key checked: its scope so far (method, path), then the body. */
  private authenticated(auth: Authentication): void {
    const { info } = this;
    const provider = this.provider!;
    if ('denial' in auth) return this.deny(auth.denial, auth.key);
    const key = (this.key = auth.key);
    info.keyId = key.id;
    info.label = key.label;
    info.billable = !isFreeRoute(provider, info.method, this.path);
    // Methods and paths now; models once the body is read.
    const early = outOfScope(methodViolation(key.policy, info.method) ?? pathViolation(key.policy, this.path));
    if (early) return this.deny(early);
    this.format = info.billable ? usageFormat(provider.id, info.method, this.path) : undefined;
    this.read();
  }

  // -------------------------------------------------------------------------------------------
  // read

  private read(): void {
    const { req, res, c } = this;
    const declared = Number(req.headers['content-length'] ?? 0);
    if (declared > c.maxBodyBytes) {
      lingerThenClose(req, res);
      return this.deny({
        status: 413,
        code: 'too_large',
        message: `request body of ${declared} bytes is over the broker's limit of ${c.maxBodyBytes}`,
      });
    }
    const hasBody = req.headers['content-length'] !== undefined || req.headers['transfer-encoding'] !== undefined;
    const contentType = req.headers['content-type'];
    // JSON bodies are read whole (they are small next to the answers) so the model can be
    // checked and logged; so is any body of a metered route, whatever its declared type (an
    // upstream may parse JSON sent as text/plain). Anything else (uploads) streams through.
    const readWhole = hasBody && (contentType === undefined || contentType.includes('json') || this.format !== undefined);
    // A body the broker must judge is judged as sent: it cannot read a compressed one.
    const encoding = req.headers['content-encoding'];
    if (readWhole && encoding !== undefined && encoding.trim().toLowerCase() !== 'identity') {
      return this.deny({
        status: 415,
        code: 'bad_request',
        message: `request bodies must not be compressed (Content-Encoding: ${encoding}): Till checks them before forwarding`,
      });
    }
    if (!readWhole) {
      this.streamBody = hasBody;
      return this.inspect(undefined);
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let over = false;
    req.on('data', (chunk: Buffer) => {
      if (over) return;
      size += chunk.length;
      if (size > c.maxBodyBytes) {
        over = true;
        lingerThenClose(req, res);
        this.deny({ status: 413, code: 'too_large', message: `request body is over the broker's limit of ${c.maxBodyBytes} bytes` });
        return;
      }
      chunks.push(chunk);
    });
    req.on('end', () => {
      if (!over) this.inspect(chunks.length === 1 ? chunks[0] : Buffer.concat(chunks));
    });
    req.on('error', () => undefined);
  }

  // -------------------------------------------------------------------------------------------
  // inspect

  private inspect(body: Buffer | undefined): void {
    const provider = this.provider!;
    const key = this.key!;
    const { info } = this;
    this.body = body;
    const inspected = inspectBody(provider, this.path, body, this.req.headers['content-type'], this.format !== undefined);
    if (inspected instanceof Error) {
      if (inspected instanceof AmbiguousBody) return this.deny({ status: 400, code: 'bad_request', message: inspected.message });
      const judged = key.policy.models !== undefined || key.policy.maxTokens !== undefined || key.policy.maxSpendUsd !== undefined;
      if (judged && info.billable)
        return this.deny({
          status: 400,
          code: 'bad_request',
          message: `${inspected.message}, so ${key.policy.models ? 'its model' : 'what it may cost'} cannot be checked`,
        });
    } else {
      this.json = inspected.json;
      if (inspected.model !== undefined) info.model = inspected.model;
    }
    const late = outOfScope(modelViolation(key.policy.models, info.model, info.billable));
    if (late) return this.deny(late);
    if (provider.needsUpstream) return this.deny(noUpstreamDenial(provider));
    this.credential();
  }

  // -------------------------------------------------------------------------------------------
  // credential

  private credential(): void {
    const key = this.key!;
    // The cached secret is used synchronously: no await between the hold and forwarding.
    const cached = this.c.cachedSecret(key.credential);
    if (cached !== undefined) return this.takeHold(cached);
    this.c
      .secretFor(key.credential)
      .then(
        (secret) => this.takeHold(secret),
        (err: unknown) => this.deny(credentialDenial(key.credential, err, (line) => this.c.log(line))),
      )
      .catch((err: unknown) => this.fail(err));
  }

  // -------------------------------------------------------------------------------------------
  // hold

  private takeHold(secret: string): void {
    const { res, c, info } = this;
    if (res.writableEnded || res.destroyed) return;
    const provider = this.provider!;
    const key = this.key!;
    this.secret = secret;
    const format = this.format;
    const json = this.json;
    if (format === 'openai-chat' && json?.stream === true && provider.wire.asksStreamUsage) {
      const options = (json.stream_options ?? {}) as Json;
      if (options.include_usage !== true) {
        json.stream_options = { ...options, include_usage: true };
        this.stripUsage = true;
      }
    }
    if (json && this.stripUsage) this.body = Buffer.from(JSON.stringify(json));
    const stream = asksStream(format, this.path, json);
    this.meteredStream = format !== undefined && (json === undefined || stream);
    const request = info.billable
      ? { provider: provider.id, model: info.model, format, json, bodyBytes: this.body?.length ?? 0, stream }
      : undefined;
    const taken = takeRequestHold(c, key, info, request, this, true);
    if (!(taken instanceof Promise)) return this.held(taken);
    // A team ledger: its answer arrives after a round trip to the database.
    void taken.then(
      (answer) => {
        // A client gone meanwhile is told apart at forwarding, which ends the hold with the request.
        if (!this.ended) return this.held(answer);
        if (!isDenial(answer)) answer.hold.settle();
      },
      (err: unknown) => this.fail(err),
    );
  }

  /** The hold was taken (or refused): forward the request once it is durable. */
  private held(taken: TakenHold | Denial): void {
    const { c } = this;
    const json = this.json;
    if (isDenial(taken)) return this.deny(taken);
    ({ plan: this.plan, hold: this.hold, streamHold: this.streamHold } = taken);
    // The plan may have capped the answer in the body: send that body.
    if (json && this.plan?.bodyChanged) this.body = Buffer.from(JSON.stringify(json));
    // Forwarded only once its hold is on disk (batched with this turn's others).
    c.keys.whenDurable(() => this.forward());
  }

  // -------------------------------------------------------------------------------------------
  // forward

  private forward(): void {
    const { req, res, c, info } = this;
    if (this.ended) return;
    if (res.destroyed) return this.finish(499, 'client_closed');
    const provider = this.provider!;
    const upstreamBase = upstreamOf(provider.baseUrl);
    const target = upstreamBase.url;
    const targetPath = upstreamBase.path + info.path.slice(provider.basePath.length);
    const query = this.query;
    for (const name of KEY_QUERY_PARAMS) query.delete(name);
    const headers: http.OutgoingHttpHeaders = forwardedHeaders(req.headers, provider);
    const placement = provider.placement;
    if (placement.kind === 'bearer') headers.authorization = `Bearer ${this.secret}`;
    else if (placement.kind === 'header') headers[placement.name] = this.secret;
    else query.set(placement.name, this.secret);
    const search = query.toString();
    // Answers must be readable on the way through: to meter them, and to scrub the credential from them.
    headers['accept-encoding'] = 'identity';
    if (this.body) headers['content-length'] = this.body.length;
    else if (this.streamBody && req.headers['content-length'] !== undefined) headers['content-length'] = req.headers['content-length'];

    // Watched before the body is piped on: the chunk that crosses the limit is not forwarded.
    if (this.streamBody) this.limitUpload();
    let upstream: UpstreamCall;
    try {
      upstream = callUpstream(
        c.upstream,
        {
          target,
          method: info.method,
          path: targetPath + (search ? `?${search}` : ''),
          headers,
          body: this.body ?? (this.streamBody ? req : undefined),
          idleTimeoutMs: c.upstreamIdleTimeoutMs,
          // Pooled unless the answer may be a stream Till meters (whose cut needs node:http, upstream.ts).
          streamed: this.body === undefined || this.meteredStream,
        },
        this,
      );
    } catch (err) {
      // A header Node will not send (it was accepted on the way in, but not valid on the way out).
      this.releaseHold();
      return this.deny({ status: 400, code: 'bad_request', message: `the request cannot be forwarded: ${(err as Error).message}` });
    }
    this.upstream = upstream;
    this.requestUrl = `${target.origin}${targetPath}`;
    this.registered = c.requests.add(this.stop);
    // The client went away: stop the upstream (and its bill) too.
    res.on('close', () => {
      if (!res.writableFinished && !this.ended) this.stopUpstream(() => this.finish(res.statusCode, 'client_closed'));
    });
  }

  /** The whole request is on the upstream's wire (an {@link UpstreamHandler} event). */
  sent(): void {
    this.onWire = true;
    this.hold?.reachedUpstream();
  }

  /** Cuts an upload streaming on (413, unbilled) if it grows past the limit. */
  private limitUpload(): void {
    const { req, res, c } = this;
    let size = 0;
    req.on('data', (chunk: Buffer) => {
      size += chunk.length;
      if (size > c.maxBodyBytes && !this.ended) {
        // Cut before the upstream had the whole request: it cannot bill it, and neither does Till.
        this.upstream?.destroy();
        this.releaseHold();
        lingerThenClose(req, res);
        this.sendDenial({ status: 413, code: 'too_large', message: `request body is over the broker's limit of ${c.maxBodyBytes} bytes` });
        this.finish(413, 'too_large');
      }
    });
  }

  /** No answer came (an {@link UpstreamHandler} event). */
  failed(err: NodeJS.ErrnoException): void {
    if (this.ended) return;
    const target = upstreamOf(this.provider!.baseUrl).url;
    const where = `${target.protocol}//${target.host}`;
    if (this.res.headersSent) {
      this.res.destroy();
      return this.finish(this.res.statusCode, 'upstream_error');
    }
    const detail = err.code ?? err.message;
    this.c.log(`upstream ${where} failed: ${detail}`);
    // Never reached the upstream: give the activation back.
    if (!this.onWire) this.releaseHold();
    this.sendDenial({
      status: 502,
      code: 'upstream_unreachable',
      message: `cannot reach ${this.provider!.displayName} at ${where} (${detail})`,
    });
    this.finish(502, 'upstream_error');
  }

  // -------------------------------------------------------------------------------------------
  // relay

  /** The answer's head (an {@link UpstreamHandler} event): relays it, and returns what relays its body. */
  response(status: number, upHeaders: http.IncomingHttpHeaders): AnswerHandler {
    const { res, c } = this;
    const provider = this.provider!;
    const upstream = this.upstream!;
    this.hold?.reachedUpstream();
    this.answering = true;
    const forms = c.formsOf(this.secret);
    // Never relay the credential: an upstream that echoes request headers, a Location with ?key=.
    const locationMap =
      upHeaders.location === undefined
        ? undefined
        : { requestUrl: this.requestUrl, upstreamBase: provider.baseUrl, brokerBase: c.baseUrlFor(provider) };
    const out = relayedHeaders(upHeaders, forms, locationMap, (name) =>
      c.log(`dropped the upstream's ${name} response header: it held the credential`),
    );
    if (upHeaders['content-length'] !== undefined) out['content-length'] = upHeaders['content-length'];
    const scrubber = new BodyScrubber(forms);
    const type = upHeaders['content-type'] ?? '';
    this.isSse = type.includes('text/event-stream');
    this.upstreamStatus = status;
    const format = this.format;
    if (format && !upHeaders['content-encoding']) {
      // A small JSON answer is cheaper to parse once at the end than to scan byte by byte.
      const length = Number(upHeaders['content-length'] ?? NaN);
      if (!this.isSse && length <= SMALL_JSON && type.includes('json')) this.jsonBody = [];
      else this.meter = new StreamMeter(format);
    }
    const strip = this.stripUsage && this.isSse && this.meter !== undefined;
    if (strip) delete out['content-length'];
    res.writeHead(this.upstreamStatus, out);
    // A write that fails (the client went away) ends in 'close', handled below; never in a crash.
    res.on('error', () => undefined);
    let writable = true;
    if (strip) {
      // Forward event by event, minus the usage chunk Till asked for and the client did not.
      let seen = false;
      this.meter!.onEvent = (e) => {
        if (!seen && this.meter!.sawUsageChunk) {
          seen = true;
          return;
        }
        // Cut short (draining), the answer is only counted.
        if (!this.draining && !res.writableEnded) writable = res.write(scrubber.push(withoutNullUsage(e.raw))) && writable;
      };
    }
    if (this.streamHold && this.plan?.hiddenOutput) {
      // Output the model does not stream still grows the bound: check between chunks too.
      this.tick = setInterval(() => this.followStream(), TICK_MS);
      this.tick.unref();
    }
    res.on('drain', () => upstream.resume());
    return {
      data: (chunk) => {
        if (this.ended) return;
        if (this.draining) return this.meter?.push(chunk);
        if (this.isSse) {
          const n = chunk.length;
          this.sseBoundary =
            n >= 2 ? chunk[n - 1] === 10 && (chunk[n - 2] === 10 || chunk[n - 2] === 13) : this.sseBoundary && chunk[0] === 10;
        }
        writable = true;
        if (this.jsonBody) this.jsonBody.push(chunk);
        else this.meter?.push(chunk);
        if (this.meter && this.isSse && this.plan) {
          if (!this.followStream()) return;
          this.progress();
        }
        if (!strip) writable = res.write(scrubber.push(chunk));
        // Backpressure: a slow client pauses the upstream. Not a stream whose hold follows it, up to
        // a point: paused, the upstream would go on generating into its buffers where Till cannot
        // count it, so Till keeps reading (and holding) and queues the answer for the client.
        if (!writable && (!this.streamHold || res.writableLength > FOLLOWED_BUFFER_BYTES)) upstream.pause();
      },
      end: () => {
        if (this.draining) return;
        res.end(scrubber.end());
        this.finish(status);
      },
      error: () => {
        if (this.draining) return;
        res.destroy();
        this.finish(status, 'upstream_error');
      },
    };
  }

  /** Keeps a stream's hold in step with it; false when the key could not cover it and the stream was cut. */
  private followStream(): boolean {
    if (!this.streamHold || !this.meter || this.ended) return true;
    const denial = this.streamHold.follow(this.meter);
    if (!denial) return true;
    this.cut(denial);
    return false;
  }

  /** An open stream's running usage and hold, at most twice a second, for views. */
  private progress(): void {
    if (!progressDue(this.lastProgress)) return;
    const usage = this.settle('progress')?.usage;
    if (usage) this.c.events.emit(progressEvent(this.info, usage, this.hold?.held()));
  }

  // -------------------------------------------------------------------------------------------
  // finish

  /**
   * What the request spent: reported usage; for one cut before it ended, what it produced
   * (reported so far, else counted from its text) plus what the upstream may still generate
   * after the cut, marked estimated; for an upstream error with no usage, its activation.
   */
  private settle(aborted: string | undefined): { amounts: Amounts; details?: SettleDetails; usage?: RequestUsage } | undefined {
    const { c, info, format, plan } = this;
    // No hold (never taken, or given back because nothing reached the upstream): nothing was
    // counted, so the event reports nothing either (views total what the ledger has).
    if (!info.billable || !format || !plan || !this.hold) return undefined;
    let usage: Usage | undefined;
    if (this.jsonBody) {
      const answer = jsonAnswer(format, this.jsonBody);
      usage = answer.usage;
      this.jsonId = answer.id;
    } else usage = this.meter?.usage();
    const complete = this.jsonBody ? usage !== undefined : this.meter?.complete === true;
    if (!usage && !aborted && this.upstreamStatus >= 400) return { amounts: { activations: 1, tokens: 0, spend: 0 } };
    if (aborted && aborted !== 'progress' && !complete)
      usage = cutUsage(
        { model: info.model, format, json: this.json, bodyBytes: this.body?.length ?? 0 },
        plan,
        usage,
        this.meter?.generated,
        this.answering || this.onWire,
      );
    const s = settlement(
      this.provider!.id,
      info.model,
      usage,
      { inputEstimate: plan.inputEstimate, outputChars: this.meter?.textChars ?? 0 },
      c.prices,
    );
    return { amounts: s.amounts, details: s.details, usage: s.usage };
  }

  private finish(status: number, aborted?: string): void {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.tick);
    const { c, info } = this;
    if (this.registered) c.requests.delete(this.registered);
    const spent = this.settle(aborted);
    this.hold?.settle(spent?.amounts, spent?.details);
    this.remember(spent);
    const latencyMs = Math.round((performance.now() - this.started) * 10) / 10;
    // Built field by field: spreads allocate, and this runs for every request.
    const event: Extract<TillEvent, { type: 'request.finished' }> = {
      type: 'request.finished',
      at: Date.now(),
      request: info,
      status,
      latencyMs,
    };
    if (aborted) event.aborted = aborted;
    if (spent?.usage) event.usage = spent.usage;
    if (info.billable && !this.hold) event.uncounted = true;
    c.events.emit(event);
    this.audit(status, undefined, aborted);
  }

  /** A Responses answer is a conversation the next request may continue: remember what it weighs. */
  private remember(spent: { usage?: RequestUsage } | undefined): void {
    if (this.format !== 'openai-responses' || !spent?.usage || spent.usage.estimated) return;
    const tokens = spent.usage.tokens.input + spent.usage.tokens.output;
    const id = this.meter?.responseId ?? this.jsonId;
    if (id) this.c.conversations.record(id, tokens);
    const conversation = this.json?.conversation;
    const conversationId = typeof conversation === 'string' ? conversation : (conversation as { id?: unknown } | undefined)?.id;
    if (typeof conversationId === 'string') this.c.conversations.record(conversationId, tokens);
  }

  private releaseHold(): void {
    this.hold?.settle();
    this.hold = undefined;
  }

  // -------------------------------------------------------------------------------------------
  // ends

  /** Ends the request at once, telling the client why when it still can (revocation, expiry, a hold that cannot grow). */
  cut(denial: Denial): void {
    const { res } = this;
    if (this.ended || this.draining) return;
    if (!res.headersSent) this.sendDenial(denial);
    else if (this.isSse && this.sseBoundary && !res.writableEnded)
      res.end(
        denialEvent(this.provider?.id, denial, {
          responses: this.format === 'openai-responses',
          sequence: (this.meter?.lastSequence ?? -1) + 1,
        }),
      );
    else res.destroy();
    this.stopUpstream(() => this.finish(res.statusCode, denial.code));
  }

  /**
   * Stops the upstream of a request cut short, then runs `then` (which settles it). For a
   * metered answer, the call drains (upstream.ts): a stream's connection is half-closed at once,
   * which the upstream notices, and what it had already sent (waiting in buffers Till had not read
   * yet) is still read and metered for up to {@link CUT_DRAIN_MS}, so that a cut request is counted
   * for all it produced; then the connection is destroyed. Nothing more reaches the client.
   */
  private stopUpstream(then: () => void): void {
    // Already stopping (a cut, then the client's close): the first stop settles.
    if (this.draining) return;
    const upstream = this.upstream;
    if (!upstream || !this.meter) {
      upstream?.destroy();
      return then();
    }
    this.draining = true;
    upstream.drain(CUT_DRAIN_MS, then);
  }

  /** The broker is closing: end now, settling while the ledger is still open. */
  private readonly stop = (): void => {
    this.upstream?.destroy();
    this.res.destroy();
    this.finish(this.res.statusCode, 'broker_closed');
  };

  /**
   * A fault of Till's own (a bug, not a refusal): logged, and the request answered with a 500
   * (ended as a cut once it holds or was forwarded), never an uncaught exception in the broker.
   */
  fail(err: unknown): void {
    this.c.log(`request ${this.info.method} ${this.path}: ${err instanceof Error ? (err.stack ?? err.message) : String(err)}`);
    const denial: Denial = { status: 500, code: 'internal_error', message: 'Till failed to handle this request (see the broker log)' };
    if (this.hold || this.upstream) this.cut(denial);
    else this.deny(denial);
  }

  private deny(denial: Denial, key: KeyRecord | undefined = this.key): void {
    const { info, c } = this;
    if (key) {
      info.keyId = key.id;
      info.label = key.label;
    }
    this.sendDenial(denial);
    this.req.resume();
    c.events.emit({
      type: 'request.denied',
      at: Date.now(),
      request: { ...info },
      status: denial.status,
      reason: denial.message,
      code: denial.code,
    });
    this.audit(denial.status, denial);
  }

  private sendDenial(denial: Denial): void {
    const { res } = this;
    if (res.headersSent) {
      res.destroy();
      return;
    }
    const { body, headers } = denialResponse(this.provider?.id, denial);
    res.writeHead(denial.status, headers);
    res.end(body);
  }

  private audit(status: number, denial?: Denial, aborted?: string): void {
    this.c.audit?.append(auditRecord(this.info, status, this.started, denial, aborted));
  }
}
