/**
 * Fake upstream provider APIs for tests: real HTTP servers on 127.0.0.1 that answer like OpenAI,
 * Anthropic, Gemini and the GitHub REST API do (auth headers, error bodies, usage and streaming
 * shapes; see ../shared/PROVIDERS.md). They never reach the network.
 *
 * Determinism, so tests can assert exact numbers:
 * - input tokens: OpenAI's as OpenAI bills them (openAIInputTokens: the o200k_base tokens of the
 *   messages, rendered as OpenAI's cookbook documents, and of any stored conversation a Responses
 *   request continues); the others' fakeTokenCount(request body) = ceil(UTF-8 bytes / 4), at
 *   least 1 (their tokenizers are not public);
 * - the answer is fakeAnswer(n): n text chunks, one output token each (one o200k_base token
 *   each, too), where n = min(streamChunks, the request's max-tokens field if any). When the limit
 *   cuts the answer, the provider's "length" stop reason is reported;
 * - what the provider bills (`billed`): each answer's input and output, and for a stream the
 *   client left, what was streamed plus `afterDisconnectTokens` (default 50) the provider goes on
 *   generating before it notices, as real providers do.
 *
 * Agents need a model that uses tools: with `reply` set, the Messages and Responses APIs answer
 * each turn as the script says (text, a tool call, or text that goes on until the client leaves),
 * and the Responses API is also served over WebSocket (`websocket: true`) as Codex uses it.
 */
import { randomBytes } from 'node:crypto';
import { createServer, STATUS_CODES, type IncomingHttpHeaders, type IncomingMessage, type ServerResponse } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';
import { countTokens } from 'gpt-tokenizer/encoding/o200k_base';
import WebSocket, { WebSocketServer } from 'ws';

export interface ReceivedRequest {
  method: string;
  /** Path including the query string. */
  path: string;
  headers: IncomingHttpHeaders;
  body: string;
}

export interface Upstream {
  /** Origin, e.g. http://127.0.0.1:PORT (no trailing slash). */
  url: string;
  /** Every request that passed auth (or needed none, like Anthropic's `HEAD /`), in arrival order. */
  received: ReceivedRequest[];
  /** Requests refused for a bad or missing credential. */
  rejected: ReceivedRequest[];
  /** WebSocket handshakes that passed auth (Responses over WebSocket). */
  upgrades: ReceivedRequest[];
  /** Messages received over WebSockets, parsed. */
  socketMessages: Json[];
  /** WebSockets open now. */
  openSockets(): number;
  /** Usage reported in generated Messages and Responses answers (HTTP and WebSocket): what a broker should meter. */
  reported: { answers: number; inputTokens: number; outputTokens: number };
  /** What the provider bills: every answer, cut streams included (streamed plus what it generated after the cut). */
  billed: { answers: number; inputTokens: number; outputTokens: number };
  /** Number of requests currently being served (open responses). */
  inFlight(): number;
  /** The most requests it served at once, so far. */
  peakInFlight(): number;
  /**
   * Responses the client closed before the server had ended them: streams cut mid-way and
   * requests left hanging by `hang: true`.
   */
  abortedStreams(): number;
  /** Resolves when the Nth request (1-based, authenticated) has arrived. */
  waitForRequests(n: number, timeoutMs?: number): Promise<void>;
  /** Closes the server and destroys all open sockets. */
  close(): Promise<void>;
}

export interface UpstreamOptions {
  /** The ONLY credential accepted. */
  credential: string;
  /** Delay between SSE events in ms (default 0). */
  streamDelayMs?: number;
  /** Number of content chunks in a streamed answer (default 5). */
  streamChunks?: number;
  /**
   * If set, the server accepts (authenticated) requests but never answers (to test timeouts/aborts).
   * Bad credentials are still refused at once, and Anthropic still refuses a missing anthropic-version.
   */
  hang?: boolean;
  /** A scripted model for the Messages and Responses APIs (agents): answers each turn. */
  reply?: (turn: Turn) => Reply;
  /** OpenAI: serve `GET /v1/responses` upgrades (Responses over WebSocket). Without it they get 426. */
  websocket?: boolean;
  /** Tokens a stream goes on generating (and billing) after its client left (default 50). */
  afterDisconnectTokens?: number;
  /**
   * A POST waits (up to 5 s) until this many requests are (or have been, since it came) in flight
   * before it is answered, so that parallel clients' calls overlap as they do against a model
   * slower than this one.
   */
  gather?: number;
}

/** What a scripted model sees of a conversation. */
export interface Turn {
  /** Every user text of the conversation, joined by newlines (system reminders included). */
  userText: string;
  /** The output of the tool call this turn answers, when the newest input is a tool result. */
  toolResult?: string;
  /** Names of the tools the client offers. */
  tools: string[];
}

/**
 * A scripted model's answer: text, a tool call, or text that goes on (one more word every
 * 250 ms, for a minute at most) until the client leaves.
 */
export type Reply = { text: string; hold?: boolean } | { tool: string; input: Record<string, unknown> };

// ---------------------------------------------------------------------------------------------
// Deterministic content

const WORDS = ['Hello', ' from', ' a', ' fake', ' upstream'];

/** The text chunks of an answer of `chunks` tokens ("Hello from a fake upstream" for 5). */
export function fakeAnswerChunks(chunks: number): string[] {
  return Array.from({ length: chunks }, (_, i) => WORDS[i] ?? ' word');
}

/** The whole answer text of `chunks` tokens. */
export function fakeAnswer(chunks: number): string {
  return fakeAnswerChunks(chunks).join('');
}

/** Input tokens the Anthropic and Gemini fixtures report for a request body: ceil(UTF-8 bytes / 4), at least 1. */
export function fakeTokenCount(body: string): number {
  return Math.max(1, Math.ceil(Buffer.byteLength(body) / 4));
}

/** o200k_base tokens of a text, special-token text counted as text (as OpenAI bills it). */
export function o200k(text: string): number {
  return text.length === 0 ? 0 : countTokens(text, { disallowedSpecial: new Set() });
}

/** The text of a message content: a string, or its text parts. */
function contentText(content: unknown): string {
  if (typeof content === 'string') return content;
  return Array.isArray(content)
    ? content.map((p) => (['text', 'input_text', 'output_text'].includes(String(obj(p).type)) ? (str(obj(p).text) ?? '') : '')).join('')
    : '';
}

/** Tool definitions as OpenAI's cookbook counts them (function name and description, each parameter). */
function toolTokens(tools: unknown): number {
  if (!Array.isArray(tools) || tools.length === 0) return 0;
  let n = 0;
  for (const t of tools) {
    const f = obj(obj(t).function ?? t);
    n += 7 + o200k(`${str(f.name) ?? ''}:${(str(f.description) ?? '').replace(/\.$/, '')}`);
    const properties = obj(obj(f.parameters).properties);
    const keys = Object.keys(properties);
    if (keys.length > 0) n += 3;
    for (const k of keys) {
      const p = obj(properties[k]);
      n += 3 + o200k(`${k}:${str(p.type) ?? ''}:${str(p.description) ?? ''}`);
      if (Array.isArray(p.enum)) n += -3 + p.enum.reduce((m: number, e) => m + 3 + o200k(String(e)), 0);
    }
  }
  return n + 12;
}

/** Input tokens OpenAI bills for an image: a 1024×1024 one at high detail (the fixture fetches nothing). */
export const IMAGE_TOKENS = 765;
/** Input tokens OpenAI bills for a file by id (`input_file`), as if it were a long PDF. */
export const FILE_TOKENS = 40_000;
/** Input tokens a web search adds (its results), and Gemini's cached content. */
export const SEARCH_RESULT_TOKENS = 2_000;
export const CACHED_CONTENT_TOKENS = 100_000;

/** Images and files in a chat or Responses body, billed beyond its text. */
function mediaTokens(body: Json): number {
  let n = 0;
  const parts = (content: unknown) => (Array.isArray(content) ? content.map(obj) : []);
  for (const m of [...(Array.isArray(body.messages) ? body.messages : []), ...(Array.isArray(body.input) ? body.input : [])]) {
    for (const p of parts(obj(m).content)) {
      if (p.type === 'image_url' || p.type === 'input_image') n += IMAGE_TOKENS;
      if (p.type === 'input_file' || p.type === 'file') n += FILE_TOKENS;
    }
  }
  return n;
}

/**
 * OpenAI's input tokens for a chat (its cookbook's count): per message 3, plus the tokens of
 * each field's text (+1 for a name), plus 3 to prime the answer, plus its tools.
 */
export function openAIChatInputTokens(body: Json): number {
  let n = 3;
  for (const m of Array.isArray(body.messages) ? body.messages : []) {
    n += 3;
    for (const [field, value] of Object.entries(obj(m))) {
      n +=
        field === 'content'
          ? o200k(contentText(value))
          : typeof value === 'string'
            ? o200k(value)
            : value === null || value === undefined
              ? 0
              : o200k(JSON.stringify(value));
      if (field === 'name') n += 1;
    }
  }
  return n + toolTokens(body.tools) + mediaTokens(body);
}

/** A Responses request's input tokens, counted like a chat: the instructions and each item as a message. */
export function openAIResponsesInputTokens(body: Json): number {
  let n = 3;
  if (typeof body.instructions === 'string') n += 4 + o200k(body.instructions);
  if (typeof body.input === 'string') n += 4 + o200k(body.input);
  for (const i of Array.isArray(body.input) ? body.input : []) {
    const item = obj(i);
    n +=
      4 +
      (item.type === undefined || item.type === 'message'
        ? o200k(String(item.role ?? '')) + o200k(contentText(item.content))
        : o200k(JSON.stringify(item)));
  }
  return n + toolTokens(body.tools) + mediaTokens(body);
}

/** The web searches a Responses request runs: one per web_search tool offered. */
function webSearches(body: Json): number {
  return (Array.isArray(body.tools) ? body.tools : []).filter((t) => String(obj(t).type).startsWith('web_search')).length;
}

// ---------------------------------------------------------------------------------------------
// Shared machinery

type Json = Record<string, unknown>;

/** Who is calling: enough to check a credential, for requests and WebSocket handshakes alike. */
interface Caller {
  req: IncomingMessage;
  url: URL;
  opts: Opts;
}

type Opts = Required<Omit<UpstreamOptions, 'reply' | 'gather'>> & Pick<UpstreamOptions, 'reply' | 'gather'>;

interface Exchange extends Caller {
  res: ServerResponse;
  method: string;
  body: string;
  /** Adds a generated answer's usage to `Upstream.reported`. */
  report(inputTokens: number, outputTokens: number): void;
  /** Adds what an answer costs to `Upstream.billed`. */
  bill(inputTokens: number, outputTokens: number): void;
  /** The Responses this upstream stored, by id: the tokens of the conversation each one ends. */
  stored: Map<string, { tokens: number; items: unknown[] }>;
}

/** An error answer: status and JSON body. */
class Refusal {
  constructor(
    readonly status: number,
    readonly body: unknown,
  ) {}
}

interface Route {
  method: string;
  path: RegExp;
  /** Served without a credential (and without the provider's other header checks). */
  open?: boolean;
  handle(ex: Exchange, match: RegExpExecArray): void | Promise<void>;
}

interface Provider {
  /** null when the credential is right, else the refusal to send. */
  authenticate(caller: Caller): Refusal | null;
  /** Checks made after auth on non-open routes (e.g. a required version header). */
  precheck?(ex: Exchange): Refusal | null;
  /** Headers set on every response (request ids, rate limits). */
  headers?(ex: Exchange, accepted: boolean): Record<string, string>;
  routes: Route[];
  notFound(ex: Exchange): Refusal;
  /** WebSocket endpoints by path: the socket is served after the credential was checked. */
  sockets?: Record<string, (ws: WebSocket, ex: Pick<Exchange, 'opts' | 'report' | 'bill' | 'stored'>, received: Json[]) => void>;
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'content-type': 'application/json', 'content-length': Buffer.byteLength(text) });
  res.end(text);
}

const sendRefusal = (ex: Exchange, r: Refusal): void => sendJson(ex.res, r.status, r.body);

const sseData = (data: unknown, eol = '\n'): string => `data: ${typeof data === 'string' ? data : JSON.stringify(data)}${eol}${eol}`;
/** A named SSE event whose `event:` line repeats the payload's `type`. */
type TypedEvent = { type: string } & Json;
const sseEvent = (event: TypedEvent): string => `event: ${event.type}\ndata: ${JSON.stringify(event)}\n\n`;

/**
 * Writes frames one res.write at a time, streamDelayMs apart, and stops as soon as the client
 * has gone (the core counts that as an aborted stream). With `input`, bills the answer: its input
 * and the tokens of the frames written, plus, when the client left first, up to
 * `afterDisconnectTokens` more that the provider generated before it noticed.
 */
async function writeStream(
  ex: Exchange,
  frames: Iterable<Frame> | AsyncIterable<Frame>,
  options: { contentType?: string; input?: number } = {},
): Promise<void> {
  const { res } = ex;
  res.writeHead(200, {
    'content-type': options.contentType ?? 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
    connection: 'keep-alive',
  });
  res.flushHeaders();
  const all = Array.isArray(frames) ? (frames as Frame[]) : undefined;
  const total = all?.reduce((n, f) => n + (typeof f === 'string' ? 0 : f.tokens), 0);
  let written = 0;
  let addedInput = 0;
  let first = true;
  // A provider notices the client's end of the connection (its FIN) at once; Node would only
  // tell on a failed write, which a busy process makes late.
  let gone = false;
  const leave = () => (gone = true);
  ex.req.socket.once('end', leave);
  ex.req.socket.once('close', leave);
  const settle = (cut: boolean) => {
    // Having noticed, a provider drops the connection: what it wrote before still arrives.
    if (cut) res.socket?.end();
    if (options.input === undefined) return;
    const after = cut ? Math.min(ex.opts.afterDisconnectTokens, total === undefined ? ex.opts.afterDisconnectTokens : total - written) : 0;
    ex.bill(options.input + addedInput, written + after);
  };
  for await (const f of frames) {
    if (!first && ex.opts.streamDelayMs > 0) await sleep(ex.opts.streamDelayMs);
    first = false;
    if (res.destroyed || gone) return settle(true);
    const frame = typeof f === 'string' ? f : f.frame;
    if (typeof f !== 'string') {
      written += f.tokens;
      addedInput += f.input ?? 0;
    }
    if (!res.write(frame)) {
      await new Promise<void>((resolve) => {
        res.once('drain', resolve);
        res.once('close', resolve);
      });
    }
  }
  ex.req.socket.off('end', leave);
  ex.req.socket.off('close', leave);
  if (res.destroyed || gone) return settle(true);
  settle(false);
  res.end();
}

async function* map<T, U>(items: AsyncIterable<T>, fn: (item: T) => U): AsyncGenerator<U> {
  for await (const item of items) yield fn(item);
}

function parseObject(body: string): Json | null {
  try {
    const value: unknown = JSON.parse(body);
    return value !== null && typeof value === 'object' && !Array.isArray(value) ? (value as Json) : null;
  } catch {
    return null;
  }
}

const str = (v: unknown): string | undefined => (typeof v === 'string' ? v : undefined);
const num = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) ? v : undefined);
const obj = (v: unknown): Json => (v !== null && typeof v === 'object' && !Array.isArray(v) ? (v as Json) : {});
const header = (ex: Caller, name: string): string | undefined => {
  const v = ex.req.headers[name];
  return Array.isArray(v) ? v[0] : v;
};
/** The token of `Authorization: <scheme> <token>` when the scheme is one of `schemes`. */
function authToken(ex: Caller, schemes: string[]): string | undefined {
  const m = /^(\S+)\s+(.+)$/.exec(header(ex, 'authorization') ?? '');
  return m && schemes.includes(m[1]!.toLowerCase()) ? m[2]!.trim() : undefined;
}
const newId = (prefix: string): string => `${prefix}${randomBytes(12).toString('hex')}`;
const nowSeconds = (): number => Math.floor(Date.now() / 1000);

/** A streamed frame, and the output tokens it carries (0 for frames that carry none). */
/** A frame of a stream, with the output tokens it carries and the input it adds (a web search's results, billed once the search runs). */
type Frame = string | { frame: string; tokens: number; input?: number };

/** Number of answer chunks given the configured count and an optional max-tokens limit. */
function answerLength(ex: Exchange, limit: unknown): { n: number; truncated: boolean } {
  const max = num(limit);
  const n = max === undefined ? ex.opts.streamChunks : Math.max(0, Math.min(ex.opts.streamChunks, Math.floor(max)));
  return { n, truncated: n < ex.opts.streamChunks };
}

async function startUpstream(options: UpstreamOptions, provider: Provider): Promise<Upstream> {
  const opts: Opts = { streamDelayMs: 0, streamChunks: 5, hang: false, websocket: false, afterDisconnectTokens: 50, ...options };
  const received: ReceivedRequest[] = [];
  const rejected: ReceivedRequest[] = [];
  const upgrades: ReceivedRequest[] = [];
  const socketMessages: Json[] = [];
  const reported = { answers: 0, inputTokens: 0, outputTokens: 0 };
  const report = (inputTokens: number, outputTokens: number): void => {
    reported.answers++;
    reported.inputTokens += inputTokens;
    reported.outputTokens += outputTokens;
  };
  const billed = { answers: 0, inputTokens: 0, outputTokens: 0 };
  const bill = (inputTokens: number, outputTokens: number): void => {
    billed.answers++;
    billed.inputTokens += inputTokens;
    billed.outputTokens += outputTokens;
  };
  const stored = new Map<string, { tokens: number; items: unknown[] }>();
  const wss = new WebSocketServer({ noServer: true });
  const sockets = new Set<Socket>();
  const waiters = new Set<{ n: number; resolve(): void; reject(err: Error): void }>();
  let inFlight = 0;
  let peak = 0;
  /** Times `gather` requests were in flight at once. */
  let gatherings = 0;
  let aborted = 0;
  let closing = false;

  const server = createServer((req, res) => {
    peak = Math.max(peak, ++inFlight);
    res.on('close', () => {
      inFlight--;
      if (!res.writableEnded && !closing) aborted++;
    });
    void serve(req, res).catch((err: unknown) => {
      if (!res.headersSent) sendJson(res, 500, { error: { message: `fixture error: ${String(err)}` } });
      else res.destroy();
    });
  });
  server.on('connection', (socket) => {
    sockets.add(socket);
    socket.on('close', () => sockets.delete(socket));
  });

  async function serve(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const chunks: Buffer[] = [];
    try {
      for await (const chunk of req) chunks.push(chunk as Buffer);
    } catch {
      return; // the client went away while sending
    }
    const body = Buffer.concat(chunks).toString('utf8');
    const method = req.method ?? 'GET';
    const ex: Exchange = { req, res, method, url: new URL(req.url ?? '/', 'http://127.0.0.1'), body, opts, report, bill, stored };
    const record: ReceivedRequest = { method, path: req.url ?? '/', headers: req.headers, body };

    let found: { route: Route; match: RegExpExecArray } | undefined;
    for (const route of provider.routes) {
      const match = route.method === method ? route.path.exec(ex.url.pathname) : null;
      if (match) {
        found = { route, match };
        break;
      }
    }
    const open = found?.route.open === true;
    const refusal = open ? null : provider.authenticate(ex);
    for (const [name, value] of Object.entries(provider.headers?.(ex, !refusal) ?? {})) res.setHeader(name, value);
    if (refusal) {
      rejected.push(record);
      return sendRefusal(ex, refusal);
    }
    received.push(record);
    for (const w of waiters) if (received.length >= w.n) w.resolve();
    const failure = open ? null : provider.precheck?.(ex);
    if (failure) return sendRefusal(ex, failure);
    if (opts.hang) return; // accepted, never answered
    if (!found) return sendRefusal(ex, provider.notFound(ex));
    if (opts.gather !== undefined && method === 'POST') {
      // Once that many are in flight, every one waiting goes on (the last may be answered, and
      // gone, before the others look again).
      if (inFlight >= opts.gather) gatherings++;
      const seen = gatherings;
      for (const until = Date.now() + 5_000; gatherings === seen && inFlight < opts.gather && Date.now() < until && !res.destroyed;)
        await sleep(10);
    }
    await found.route.handle(ex, found.match);
  }

  server.on('upgrade', (req: IncomingMessage, socket: Socket, head: Buffer) => {
    const caller: Caller = { req, url: new URL(req.url ?? '/', 'http://127.0.0.1'), opts };
    const record: ReceivedRequest = { method: req.method ?? 'GET', path: req.url ?? '/', headers: req.headers, body: '' };
    const serveSocket = provider.sockets?.[caller.url.pathname];
    const refuse = (status: number, body: unknown) => {
      const text = JSON.stringify(body);
      socket.end(
        `HTTP/1.1 ${status} ${STATUS_CODES[status]}\r\ncontent-type: application/json\r\ncontent-length: ${Buffer.byteLength(text)}\r\nconnection: close\r\n\r\n${text}`,
      );
    };
    const refusal = provider.authenticate(caller);
    if (refusal) {
      rejected.push(record);
      return refuse(refusal.status, refusal.body);
    }
    if (!serveSocket || !opts.websocket)
      return refuse(426, {
        error: { message: 'WebSocket is not supported on this endpoint', type: 'invalid_request_error', param: null, code: null },
      });
    upgrades.push(record);
    wss.handleUpgrade(req, socket, head, (ws) => serveSocket(ws, { opts, report, bill, stored }, socketMessages));
  });

  await new Promise<void>((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve());
  });
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}`,
    received,
    rejected,
    upgrades,
    socketMessages,
    openSockets: () => wss.clients.size,
    reported,
    billed,
    inFlight: () => inFlight,
    peakInFlight: () => peak,
    abortedStreams: () => aborted,
    waitForRequests(n, timeoutMs = 5_000) {
      if (received.length >= n) return Promise.resolve();
      return new Promise<void>((resolve, reject) => {
        const waiter = {
          n,
          resolve: () => settle(() => resolve()),
          reject: (err: Error) => settle(() => reject(err)),
        };
        const timer = setTimeout(
          () => waiter.reject(new Error(`upstream: ${received.length} of ${n} requests arrived within ${timeoutMs} ms`)),
          timeoutMs,
        );
        function settle(fn: () => void) {
          clearTimeout(timer);
          waiters.delete(waiter);
          fn();
        }
        waiters.add(waiter);
      });
    },
    close() {
      if (closing) return Promise.resolve();
      closing = true;
      for (const w of waiters) w.reject(new Error('upstream closed'));
      for (const ws of wss.clients) ws.terminate();
      return new Promise<void>((resolve) => {
        server.close(() => resolve());
        for (const socket of sockets) socket.destroy();
      });
    },
  };
}

// ---------------------------------------------------------------------------------------------
// OpenAI (clients use baseURL `${url}/v1`)

const openAIError = (status: number, message: string, code: string | null = null, param: string | null = null): Refusal =>
  new Refusal(status, { error: { message, type: 'invalid_request_error', param, code } });

/** Masks a key as OpenAI's error messages do: a few leading and trailing characters only. */
export function maskKey(key: string): string {
  if (key.length < 12) return '*'.repeat(Math.max(3, key.length));
  const shown = key.length >= 20 ? 6 : 3;
  return `${key.slice(0, shown)}${'*'.repeat(key.length - shown - 4)}${key.slice(-4)}`;
}

const OPENAI_MODELS = ['gpt-5', 'gpt-5-mini', 'gpt-4.1', 'gpt-4o-mini', 'text-embedding-3-small'];
const openAIModel = (id: string) => ({ id, object: 'model', created: 1_700_000_000, owned_by: 'system' });
const FINGERPRINT = 'fp_till_fake';

/** Parses an OpenAI request body, or the refusal OpenAI sends for it. */
function openAIBody(ex: Exchange, required: string): Json | Refusal {
  const body = parseObject(ex.body);
  if (!body)
    return openAIError(
      400,
      "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not valid JSON.)",
    );
  if (typeof body.model !== 'string') return openAIError(400, 'you must provide a model parameter');
  if (body[required] === undefined)
    return openAIError(400, `Missing required parameter: '${required}'.`, 'missing_required_parameter', required);
  return body;
}

function chatCompletions(ex: Exchange): void | Promise<void> {
  const body = openAIBody(ex, 'messages');
  if (body instanceof Refusal) return sendRefusal(ex, body);
  const model = body.model as string;
  const { n, truncated } = answerLength(ex, body.max_completion_tokens ?? body.max_tokens);
  const finish_reason = truncated ? 'length' : 'stop';
  const prompt = openAIChatInputTokens(body);
  const usage = {
    prompt_tokens: prompt,
    completion_tokens: n,
    total_tokens: prompt + n,
    prompt_tokens_details: { cached_tokens: 0, audio_tokens: 0 },
    completion_tokens_details: { reasoning_tokens: 0, audio_tokens: 0, accepted_prediction_tokens: 0, rejected_prediction_tokens: 0 },
  };
  const base = {
    id: newId('chatcmpl-'),
    created: nowSeconds(),
    model,
    service_tier: body.service_tier === 'priority' ? 'priority' : 'default',
    system_fingerprint: FINGERPRINT,
  };

  if (body.stream !== true) {
    ex.bill(prompt, n);
    return sendJson(ex.res, 200, {
      ...base,
      object: 'chat.completion',
      choices: [
        { index: 0, message: { role: 'assistant', content: fakeAnswer(n), refusal: null, annotations: [] }, logprobs: null, finish_reason },
      ],
      usage,
    });
  }
  const includeUsage = obj(body.stream_options).include_usage === true;
  const chunk = (choices: unknown[]) => ({ ...base, object: 'chat.completion.chunk', choices, ...(includeUsage ? { usage: null } : {}) });
  const choice = (delta: Json, finish: string | null = null) => ({ index: 0, delta, logprobs: null, finish_reason: finish });
  const frames: Frame[] = [
    sseData(chunk([choice({ role: 'assistant', content: '', refusal: null })])),
    ...fakeAnswerChunks(n).map((content) => ({ frame: sseData(chunk([choice({ content })])), tokens: 1 })),
    sseData(chunk([choice({}, finish_reason)])),
    ...(includeUsage ? [sseData({ ...base, object: 'chat.completion.chunk', choices: [], usage })] : []),
  ];
  return writeStream(ex, [...frames, sseData('[DONE]')], { input: prompt });
}

/** A Responses API `response` object. */
function responseObject(body: Json, id: string, createdAt: number, status: string, output: unknown[], usage: unknown): Json {
  return {
    id,
    object: 'response',
    created_at: createdAt,
    status,
    background: false,
    error: null,
    incomplete_details: status === 'incomplete' ? { reason: 'max_output_tokens' } : null,
    instructions: body.instructions ?? null,
    max_output_tokens: body.max_output_tokens ?? null,
    model: body.model,
    output,
    parallel_tool_calls: true,
    previous_response_id: body.previous_response_id ?? null,
    reasoning: { effort: null, summary: null },
    store: body.store ?? true,
    temperature: body.temperature ?? 1,
    text: { format: { type: 'text' } },
    tool_choice: 'auto',
    tools: [],
    top_p: body.top_p ?? 1,
    truncation: 'disabled',
    usage,
    user: null,
    metadata: body.metadata ?? {},
  };
}

const responsesUsage = (input: number, output: number) => ({
  input_tokens: input,
  input_tokens_details: { cached_tokens: 0 },
  output_tokens: output,
  output_tokens_details: { reasoning_tokens: 0 },
  total_tokens: input + output,
});

const outputText = (t: string) => ({ type: 'output_text', annotations: [], logprobs: [], text: t });

/**
 * The conversation a Responses request continues (`previous_response_id`), as stored, or the
 * refusal OpenAI sends for an id it does not know.
 */
function continued(ex: Pick<Exchange, 'stored'>, body: Json): { tokens: number; items: unknown[] } | Refusal {
  const previous = str(body.previous_response_id);
  if (previous === undefined) return { tokens: 0, items: [] };
  return (
    ex.stored.get(previous) ??
    openAIError(400, `Previous response with id '${previous}' not found.`, 'previous_response_not_found', 'previous_response_id')
  );
}

function responses(ex: Exchange): void | Promise<void> {
  const body = openAIBody(ex, 'input');
  if (body instanceof Refusal) return sendRefusal(ex, body);
  const before = continued(ex, body);
  if (before instanceof Refusal) return sendRefusal(ex, before);
  // The stored conversation is billed as input, as OpenAI bills it; so are web search results
  // (the unscripted model searches once per web search tool; a scripted one never does).
  const searches = ex.opts.reply ? 0 : webSearches(body);
  const inputTokens = before.tokens + openAIResponsesInputTokens(body) + searches * SEARCH_RESULT_TOKENS;
  if (ex.opts.reply) {
    const input = [
      ...before.items,
      ...(typeof body.input === 'string' ? [{ role: 'user', content: body.input }] : Array.isArray(body.input) ? body.input : []),
    ];
    const events = scriptedResponseEvents(body, input, inputTokens, ex, () => !ex.res.destroyed);
    if (body.stream === true) return writeStream(ex, map(events, sseEvent));
    return (async () => {
      let final: Json = {};
      for await (const event of events) if (event.type === 'response.completed') final = obj(event.response);
      sendJson(ex.res, 200, final);
    })();
  }
  const { n, truncated } = answerLength(ex, body.max_output_tokens);
  const usage = responsesUsage(inputTokens, n);
  const text = fakeAnswer(n);
  const msgId = newId('msg_');
  const message = (status: string, content: unknown[]) => ({ id: msgId, type: 'message', status, role: 'assistant', content });
  const responseId = newId('resp_');
  const createdAt = nowSeconds();
  const response = (status: string, output: unknown[], u: unknown) => responseObject(body, responseId, createdAt, status, output, u);
  const finalStatus = truncated ? 'incomplete' : 'completed';
  const searchCalls = Array.from({ length: searches }, () => ({
    id: newId('ws_'),
    type: 'web_search_call',
    status: 'completed',
    action: { type: 'search', query: 'weather' },
  }));
  const final = {
    ...response(finalStatus, [...searchCalls, message(finalStatus, [outputText(text)])], usage),
    service_tier: body.service_tier === 'priority' ? 'priority' : 'default',
  };
  ex.stored.set(responseId, { tokens: inputTokens + n, items: [...before.items, ...(Array.isArray(body.input) ? body.input : [])] });

  if (body.stream !== true) {
    ex.bill(inputTokens, n);
    return sendJson(ex.res, 200, final);
  }
  // The searches first, each announced as it starts (when OpenAI runs it) and done; then the answer.
  const searching = searchCalls.flatMap((call, output_index): TypedEvent[] => [
    {
      type: 'response.output_item.added',
      output_index,
      item: { id: call.id, type: 'web_search_call', status: 'in_progress' },
      input: SEARCH_RESULT_TOKENS,
    },
    { type: 'response.web_search_call.in_progress', output_index, item_id: call.id },
    { type: 'response.web_search_call.searching', output_index, item_id: call.id },
    { type: 'response.web_search_call.completed', output_index, item_id: call.id },
    { type: 'response.output_item.done', output_index, item: call },
  ]);
  const at = { item_id: msgId, output_index: searches, content_index: 0 };
  const events: TypedEvent[] = [
    { type: 'response.created', response: response('in_progress', [], null) },
    { type: 'response.in_progress', response: response('in_progress', [], null) },
    ...searching,
    { type: 'response.output_item.added', output_index: searches, item: message('in_progress', []) },
    { type: 'response.content_part.added', ...at, part: outputText('') },
    ...fakeAnswerChunks(n).map((delta) => ({ type: 'response.output_text.delta', ...at, delta, logprobs: [], tokens: 1 })),
    { type: 'response.output_text.done', ...at, text, logprobs: [] },
    { type: 'response.content_part.done', ...at, part: outputText(text) },
    { type: 'response.output_item.done', output_index: searches, item: message(finalStatus, [outputText(text)]) },
    { type: `response.${finalStatus}`, response: final },
  ];
  return writeStream(
    ex,
    events.map(({ tokens, input, ...e }, sequence_number) => ({
      frame: sseEvent({ ...e, sequence_number }),
      tokens: typeof tokens === 'number' ? tokens : 0,
      input: typeof input === 'number' ? input : 0,
    })),
    // Each search's results are billed as it runs (with its frame).
    { input: inputTokens - searches * SEARCH_RESULT_TOKENS },
  );
}

/** The text of a Responses input part list or of a tool output. */
function partsText(content: unknown): string {
  if (typeof content === 'string') return content;
  return Array.isArray(content) ? content.map((p) => str(obj(p).text) ?? '').join('') : '';
}

function toolNames(tools: unknown): string[] {
  return Array.isArray(tools) ? tools.map((t) => str(obj(t).name)).filter((n): n is string => n !== undefined) : [];
}

/** The turn a Responses request asks for, from the whole conversation (history and new input). */
function responsesTurn(body: Json, conversation: unknown[]): Turn {
  const texts = conversation
    .map(obj)
    .filter((item) => item.role === 'user' && (item.type ?? 'message') === 'message')
    .map((item) => partsText(item.content));
  const last = obj(conversation.at(-1));
  const toolResult = last.type === 'function_call_output' ? partsText(last.output) : undefined;
  return { userText: texts.join('\n'), tools: toolNames(body.tools), ...(toolResult !== undefined ? { toolResult } : {}) };
}

/**
 * The text of a scripted reply, piece by piece: its words, then for `hold` one more word every
 * 250 ms while the client is there (a minute at most).
 */
async function* replyText(reply: { text: string; hold?: boolean }, alive: () => boolean): AsyncGenerator<string> {
  for (const word of reply.text.split(/(?= )/)) yield word;
  for (let i = 0; reply.hold && i < 240 && alive(); i++) {
    await sleep(250);
    yield ' more';
  }
}

/**
 * The events of a scripted Responses answer (HTTP stream and WebSocket alike). A prewarm
 * (`generate: false`) is created and completed at once with no output and no usage; it is stored,
 * so that a response continuing it carries (and is billed for) its input.
 */
async function* scriptedResponseEvents(
  body: Json,
  conversation: unknown[],
  inputTokens: number,
  ex: Pick<Exchange, 'opts' | 'report' | 'bill' | 'stored'>,
  alive: () => boolean,
): AsyncGenerator<TypedEvent> {
  const id = newId('resp_');
  const createdAt = nowSeconds();
  const response = (status: string, output: unknown[], usage: unknown) => responseObject(body, id, createdAt, status, output, usage);
  let sequence_number = 0;
  const event = (e: TypedEvent): TypedEvent => ({ ...e, sequence_number: sequence_number++ });
  yield event({ type: 'response.created', response: response('in_progress', [], null) });
  if (body.generate === false) {
    // It bills nothing, but a response continuing it (previous_response_id) is billed for its input.
    ex.stored.set(id, { tokens: inputTokens, items: conversation });
    yield event({ type: 'response.completed', response: response('completed', [], responsesUsage(0, 0)) });
    return;
  }
  yield event({ type: 'response.in_progress', response: response('in_progress', [], null) });
  const reply = ex.opts.reply?.(responsesTurn(body, conversation)) ?? { text: fakeAnswer(ex.opts.streamChunks) };
  let item: Json;
  let outputTokens: number;
  if ('tool' in reply) {
    const args = JSON.stringify(reply.input);
    const at = { item_id: newId('fc_'), output_index: 0 };
    item = { id: at.item_id, type: 'function_call', status: 'completed', arguments: args, call_id: newId('call_'), name: reply.tool };
    yield event({ type: 'response.output_item.added', output_index: 0, item: { ...item, status: 'in_progress', arguments: '' } });
    yield event({ type: 'response.function_call_arguments.delta', ...at, delta: args });
    yield event({ type: 'response.function_call_arguments.done', ...at, arguments: args });
    outputTokens = o200k(args);
  } else {
    const at = { item_id: newId('msg_'), output_index: 0, content_index: 0 };
    const message = (status: string, content: unknown[]) => ({ id: at.item_id, type: 'message', status, role: 'assistant', content });
    yield event({ type: 'response.output_item.added', output_index: 0, item: message('in_progress', []) });
    yield event({ type: 'response.content_part.added', ...at, part: outputText('') });
    let text = '';
    for await (const delta of replyText(reply, alive)) {
      text += delta;
      yield event({ type: 'response.output_text.delta', ...at, delta, logprobs: [] });
    }
    yield event({ type: 'response.output_text.done', ...at, text, logprobs: [] });
    yield event({ type: 'response.content_part.done', ...at, part: outputText(text) });
    item = message('completed', [outputText(text)]);
    outputTokens = o200k(text);
  }
  yield event({ type: 'response.output_item.done', output_index: 0, item });
  ex.report(inputTokens, outputTokens);
  ex.bill(inputTokens, outputTokens);
  ex.stored.set(id, { tokens: inputTokens + outputTokens, items: [...conversation, item] });
  yield event({ type: 'response.completed', response: response('completed', [item], responsesUsage(inputTokens, outputTokens)) });
}

/**
 * Responses over WebSocket, as Codex uses it: each `response.create` is answered with the same
 * events as the HTTP stream, one message each, in order; `previous_response_id` continues a
 * response made earlier on this socket (the conversation is kept, so only new input is sent).
 */
function responsesSocket(ws: WebSocket, ex: Pick<Exchange, 'opts' | 'report' | 'bill' | 'stored'>, received: Json[]): void {
  const open = () => ws.readyState === WebSocket.OPEN;
  const send = async (event: Json) => {
    if (!open()) return;
    await new Promise<void>((resolve) => ws.send(JSON.stringify(event), () => resolve()));
  };
  const fail = (status: number, message: string, code: string | null = null, param: string | null = null) =>
    send({ type: 'error', status, error: { type: 'invalid_request_error', code, message, param } });

  async function serve(text: string): Promise<void> {
    const msg = parseObject(text);
    if (!msg) return fail(400, 'We could not parse the JSON body of your request.');
    received.push(msg);
    if (msg.type !== 'response.create') return fail(400, `Unsupported event type '${String(msg.type)}'.`, 'unknown_event_type', 'type');
    if (typeof msg.model !== 'string') return fail(400, 'you must provide a model parameter');
    const before = continued(ex, msg);
    if (before instanceof Refusal)
      return fail(400, obj(obj(before.body).error).message as string, 'previous_response_not_found', 'previous_response_id');
    const conversation = [...before.items, ...(Array.isArray(msg.input) ? msg.input : [])];
    // The model reads the whole conversation, so that is the input billed.
    const inputTokens = before.tokens + openAIResponsesInputTokens(msg);
    for await (const event of scriptedResponseEvents(msg, conversation, inputTokens, ex, open)) {
      if (!open()) return;
      await send(event);
    }
  }

  let queue = Promise.resolve();
  ws.on('message', (data) => {
    const text = String(data);
    queue = queue.then(() => serve(text)).catch(() => ws.terminate());
  });
}

const openAI: Provider = {
  authenticate(ex) {
    const key = authToken(ex, ['bearer']);
    if (key === ex.opts.credential) return null;
    if (!key)
      return openAIError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY). You can obtain an API key from https://platform.openai.com/account/api-keys.",
      );
    return openAIError(
      401,
      `Incorrect API key provided: ${maskKey(key)}. You can find your API key at https://platform.openai.com/account/api-keys.`,
      'invalid_api_key',
    );
  },
  headers: () => ({ 'x-request-id': newId('req_'), 'openai-version': '2020-10-01' }),
  routes: [
    {
      method: 'GET',
      path: /^\/v1\/models$/,
      handle: (ex) => sendJson(ex.res, 200, { object: 'list', data: OPENAI_MODELS.map(openAIModel) }),
    },
    {
      method: 'GET',
      path: /^\/v1\/models\/([^/]+)$/,
      handle: (ex, m) => {
        const id = decodeURIComponent(m[1]!);
        if (OPENAI_MODELS.includes(id)) return sendJson(ex.res, 200, openAIModel(id));
        sendRefusal(ex, openAIError(404, `The model '${id}' does not exist`, 'model_not_found', 'model'));
      },
    },
    { method: 'POST', path: /^\/v1\/chat\/completions$/, handle: chatCompletions },
    { method: 'POST', path: /^\/v1\/responses$/, handle: responses },
  ],
  notFound: (ex) => openAIError(404, `Invalid URL (${ex.method} ${ex.url.pathname})`),
  sockets: { '/v1/responses': responsesSocket },
};

export const startOpenAIUpstream = (opts: UpstreamOptions): Promise<Upstream> => startUpstream(opts, openAI);

// ---------------------------------------------------------------------------------------------
// Anthropic (clients use baseURL `${url}`)

const anthropicError = (status: number, type: string, message: string): Refusal =>
  new Refusal(status, { type: 'error', error: { type, message } });

const ANTHROPIC_MODELS = [
  { id: 'claude-opus-5', display_name: 'Claude Opus 5', created_at: '2026-01-01T00:00:00Z' },
  { id: 'claude-sonnet-5', display_name: 'Claude Sonnet 5', created_at: '2026-01-01T00:00:00Z' },
  { id: 'claude-haiku-4-5-20251001', display_name: 'Claude Haiku 4.5', created_at: '2025-10-01T00:00:00Z' },
].map((m) => ({ type: 'model', ...m }));

/** Parses a Messages API body, or the refusal Anthropic sends for it. */
function anthropicBody(ex: Exchange, required: string[]): Json | Refusal {
  const body = parseObject(ex.body);
  if (!body) return anthropicError(400, 'invalid_request_error', 'There was an issue with the format of your request body: invalid JSON');
  const missing = required.find((field) => body[field] === undefined);
  if (missing) return anthropicError(400, 'invalid_request_error', `${missing}: Field required`);
  return body;
}

/** The turn a Messages request asks for. */
function messagesTurn(body: Json): Turn {
  const messages = Array.isArray(body.messages) ? body.messages.map(obj) : [];
  const texts: string[] = [];
  let toolResult: string | undefined;
  messages.forEach((m, i) => {
    if (m.role !== 'user') return;
    const blocks = typeof m.content === 'string' ? [{ type: 'text', text: m.content }] : Array.isArray(m.content) ? m.content.map(obj) : [];
    for (const block of blocks) {
      if (block.type === 'text') texts.push(str(block.text) ?? '');
      if (block.type === 'tool_result' && i === messages.length - 1) toolResult = partsText(block.content);
    }
  });
  return { userText: texts.join('\n'), tools: toolNames(body.tools), ...(toolResult !== undefined ? { toolResult } : {}) };
}

/** The stream of a scripted Messages answer: a tool_use block or text, with usage at the end. */
async function* scriptedMessageEvents(ex: Exchange, body: Json, reply: Reply, usage: (output: number) => Json): AsyncGenerator<TypedEvent> {
  yield {
    type: 'message_start',
    message: {
      id: newId('msg_'),
      type: 'message',
      role: 'assistant',
      model: body.model,
      content: [],
      stop_reason: null,
      stop_sequence: null,
      usage: usage(1),
    },
  };
  let output: number;
  if ('tool' in reply) {
    const json = JSON.stringify(reply.input);
    yield { type: 'content_block_start', index: 0, content_block: { type: 'tool_use', id: newId('toolu_'), name: reply.tool, input: {} } };
    // Partial JSON arrives in pieces that are not valid JSON on their own.
    const half = Math.ceil(json.length / 2);
    for (const partial_json of [json.slice(0, half), json.slice(half)])
      yield { type: 'content_block_delta', index: 0, delta: { type: 'input_json_delta', partial_json } };
    output = fakeTokenCount(json);
  } else {
    yield { type: 'content_block_start', index: 0, content_block: { type: 'text', text: '' } };
    let text = '';
    for await (const piece of replyText(reply, () => !ex.res.destroyed)) {
      text += piece;
      yield { type: 'content_block_delta', index: 0, delta: { type: 'text_delta', text: piece } };
    }
    output = fakeTokenCount(text);
  }
  yield { type: 'content_block_stop', index: 0 };
  ex.report(fakeTokenCount(ex.body), output);
  ex.bill(fakeTokenCount(ex.body), output);
  yield {
    type: 'message_delta',
    delta: { stop_reason: 'tool' in reply ? 'tool_use' : 'end_turn', stop_sequence: null },
    usage: { output_tokens: output },
  };
  yield { type: 'message_stop' };
}

/** Prompt prefixes cached by the Anthropic fixture (as the API caches them: by their exact content). */
const anthropicCache = new Set<string>();

/**
 * How Anthropic bills a request's input: the prefix up to its last `cache_control` mark is
 * read from the cache when cached before, else written (5 minutes, or 1 hour with `ttl: "1h"`);
 * the rest is plain input. A web search tool runs one search, whose results are input too.
 */
function anthropicInput(
  ex: Exchange,
  body: Json,
): { input_tokens: number; cache_creation_input_tokens: number; cache_read_input_tokens: number; cache_creation: Json; searches: number } {
  const blocks: Json[] = [];
  const add = (v: unknown) => {
    for (const b of Array.isArray(v) ? v : []) blocks.push(obj(b));
  };
  add(body.tools);
  add(body.system);
  for (const m of Array.isArray(body.messages) ? body.messages : []) add(obj(m).content);
  let last = -1;
  for (let i = 0; i < blocks.length; i++) if (blocks[i]!.cache_control !== undefined) last = i;
  const total = fakeTokenCount(ex.body);
  const searches = (Array.isArray(body.tools) ? body.tools : []).filter((t) => String(obj(t).type).startsWith('web_search_')).length;
  const results = searches * SEARCH_RESULT_TOKENS;
  if (last < 0)
    return {
      input_tokens: total + results,
      cache_creation_input_tokens: 0,
      cache_read_input_tokens: 0,
      cache_creation: { ephemeral_5m_input_tokens: 0, ephemeral_1h_input_tokens: 0 },
      searches,
    };
  const prefix = JSON.stringify(blocks.slice(0, last + 1));
  const cached = Math.min(total - 1, fakeTokenCount(prefix));
  const hour = obj(blocks[last]!.cache_control).ttl === '1h';
  const read = anthropicCache.has(prefix);
  anthropicCache.add(prefix);
  return {
    input_tokens: total - cached + results,
    cache_creation_input_tokens: read ? 0 : cached,
    cache_read_input_tokens: read ? cached : 0,
    cache_creation: { ephemeral_5m_input_tokens: read || hour ? 0 : cached, ephemeral_1h_input_tokens: read || !hour ? 0 : cached },
    searches,
  };
}

function messages(ex: Exchange): void | Promise<void> {
  const body = anthropicBody(ex, ['model', 'max_tokens', 'messages']);
  if (body instanceof Refusal) return sendRefusal(ex, body);
  const { searches, ...input } = anthropicInput(ex, body);
  const billedInput = input.input_tokens + input.cache_creation_input_tokens + input.cache_read_input_tokens;
  const usage = (output_tokens: number) => ({
    ...input,
    output_tokens,
    service_tier: 'standard',
    ...(searches > 0 ? { server_tool_use: { web_search_requests: searches } } : {}),
  });
  if (ex.opts.reply) {
    const reply = ex.opts.reply(messagesTurn(body));
    if (body.stream === true) return writeStream(ex, map(scriptedMessageEvents(ex, body, reply, usage), sseEvent));
    const json = 'tool' in reply ? JSON.stringify(reply.input) : reply.text;
    const content =
      'tool' in reply
        ? [{ type: 'tool_use', id: newId('toolu_'), name: reply.tool, input: reply.input }]
        : [{ type: 'text', text: reply.text }];
    ex.report(fakeTokenCount(ex.body), fakeTokenCount(json));
    ex.bill(fakeTokenCount(ex.body), fakeTokenCount(json));
    return sendJson(ex.res, 200, {
      id: newId('msg_'),
      type: 'message',
      role: 'assistant',
      model: body.model,
      content,
      stop_reason: 'tool' in reply ? 'tool_use' : 'end_turn',
      stop_sequence: null,
      usage: usage(fakeTokenCount(json)),
    });
  }
  const { n, truncated } = answerLength(ex, body.max_tokens);
  const stop_reason = truncated ? 'max_tokens' : 'end_turn';
  const message = { id: newId('msg_'), type: 'message', role: 'assistant', model: body.model };

  if (body.stream !== true) {
    ex.bill(billedInput, n);
    return sendJson(ex.res, 200, {
      ...message,
      content: [{ type: 'text', text: fakeAnswer(n) }],
      stop_reason,
      stop_sequence: null,
      usage: usage(n),
    });
  }
  // message_start reports the prompt; the searches' results come after it, and the final
  // message_delta reports the input again with them (cumulative), as Anthropic does.
  const prompt = { ...usage(1), input_tokens: input.input_tokens - searches * SEARCH_RESULT_TOKENS };
  delete (prompt as Json).server_tool_use;
  const searching = Array.from({ length: searches }, (_, i): Frame[] => {
    const id = newId('srvtoolu_');
    return [
      {
        frame: sseEvent({
          type: 'content_block_start',
          index: 2 * i,
          content_block: { type: 'server_tool_use', id, name: 'web_search', input: {} },
        }),
        tokens: 0,
        input: SEARCH_RESULT_TOKENS,
      },
      sseEvent({ type: 'content_block_delta', index: 2 * i, delta: { type: 'input_json_delta', partial_json: '{"query":"weather"}' } }),
      sseEvent({ type: 'content_block_stop', index: 2 * i }),
      sseEvent({
        type: 'content_block_start',
        index: 2 * i + 1,
        content_block: {
          type: 'web_search_tool_result',
          tool_use_id: id,
          content: [
            {
              type: 'web_search_result',
              title: 'Weather',
              url: 'https://example.com/weather',
              encrypted_content: 'eyJ4IjoxfQ==',
              page_age: null,
            },
          ],
        },
      }),
      sseEvent({ type: 'content_block_stop', index: 2 * i + 1 }),
    ];
  }).flat();
  const text = 2 * searches;
  const frames: Frame[] = [
    sseEvent({ type: 'message_start', message: { ...message, content: [], stop_reason: null, stop_sequence: null, usage: prompt } }),
    ...searching,
    sseEvent({ type: 'content_block_start', index: text, content_block: { type: 'text', text: '' } }),
    sseEvent({ type: 'ping' }),
    ...fakeAnswerChunks(n).map((t) => ({
      frame: sseEvent({ type: 'content_block_delta', index: text, delta: { type: 'text_delta', text: t } }),
      tokens: 1,
    })),
    sseEvent({ type: 'content_block_stop', index: text }),
    sseEvent({ type: 'message_delta', delta: { stop_reason, stop_sequence: null }, usage: searches > 0 ? usage(n) : { output_tokens: n } }),
    sseEvent({ type: 'message_stop' }),
  ];
  // Each search's results are billed as it runs (with its frame).
  return writeStream(ex, frames, { input: billedInput - searches * SEARCH_RESULT_TOKENS });
}

const anthropic: Provider = {
  authenticate(ex) {
    const apiKey = header(ex, 'x-api-key');
    const bearer = authToken(ex, ['bearer']);
    if (apiKey === ex.opts.credential || bearer === ex.opts.credential) return null;
    if (apiKey !== undefined) return anthropicError(401, 'authentication_error', 'invalid x-api-key');
    if (bearer !== undefined) return anthropicError(401, 'authentication_error', 'Invalid bearer token');
    return anthropicError(401, 'authentication_error', 'x-api-key header is required');
  },
  precheck: (ex) =>
    header(ex, 'anthropic-version') ? null : anthropicError(400, 'invalid_request_error', 'anthropic-version: header is required'),
  headers: () => ({ 'request-id': newId('req_') }),
  routes: [
    // Claude Code's warm-up: answered without a credential, like the real API root.
    { method: 'HEAD', path: /^\/$/, open: true, handle: (ex) => void ex.res.writeHead(200, { 'content-type': 'text/plain' }).end() },
    { method: 'POST', path: /^\/v1\/messages$/, handle: messages },
    {
      method: 'POST',
      path: /^\/v1\/messages\/count_tokens$/,
      handle: (ex) => {
        const body = anthropicBody(ex, ['model', 'messages']);
        if (body instanceof Refusal) return sendRefusal(ex, body);
        sendJson(ex.res, 200, { input_tokens: fakeTokenCount(ex.body) });
      },
    },
    {
      method: 'GET',
      path: /^\/v1\/models$/,
      handle: (ex) =>
        sendJson(ex.res, 200, {
          data: ANTHROPIC_MODELS,
          has_more: false,
          first_id: ANTHROPIC_MODELS[0]?.id ?? null,
          last_id: ANTHROPIC_MODELS.at(-1)?.id ?? null,
        }),
    },
    {
      method: 'GET',
      path: /^\/v1\/models\/([^/]+)$/,
      handle: (ex, m) => {
        const model = ANTHROPIC_MODELS.find((x) => x.id === decodeURIComponent(m[1]!));
        if (model) return sendJson(ex.res, 200, model);
        sendRefusal(ex, anthropicError(404, 'not_found_error', `model: ${decodeURIComponent(m[1]!)}`));
      },
    },
  ],
  notFound: () => anthropicError(404, 'not_found_error', 'Not Found'),
};

export const startAnthropicUpstream = (opts: UpstreamOptions): Promise<Upstream> => startUpstream(opts, anthropic);

// ---------------------------------------------------------------------------------------------
// Google Gemini (clients use `${url}/v1beta/...`)

const googleError = (code: number, status: string, message: string, details?: unknown[]): Refusal =>
  new Refusal(code, { error: { code, message, status, ...(details ? { details } : {}) } });

const GEMINI_MODELS = ['gemini-2.5-pro', 'gemini-2.5-flash', 'gemini-2.5-flash-lite'];
const geminiModel = (id: string) => ({
  name: `models/${id}`,
  version: '001',
  displayName: id,
  inputTokenLimit: 1_048_576,
  outputTokenLimit: 65_536,
  supportedGenerationMethods: ['generateContent', 'countTokens', 'createCachedContent', 'batchGenerateContent'],
});

function gemini(ex: Exchange, m: RegExpExecArray): void | Promise<void> {
  const model = decodeURIComponent(m[2]!);
  const action = m[3]!;
  const body = parseObject(ex.body);
  if (!body) return sendRefusal(ex, googleError(400, 'INVALID_ARGUMENT', 'Invalid JSON payload received. Unexpected token.'));
  // Cached content is part of the prompt, billed at the cached rate.
  const cachedContent = body.cachedContent !== undefined ? CACHED_CONTENT_TOKENS : 0;
  const prompt = fakeTokenCount(ex.body) + cachedContent;
  const promptTokensDetails = [{ modality: 'TEXT', tokenCount: prompt }];
  if (action === 'countTokens') return sendJson(ex.res, 200, { totalTokens: prompt, promptTokensDetails });
  if (body.contents === undefined)
    return sendRefusal(ex, googleError(400, 'INVALID_ARGUMENT', '* GenerateContentRequest.contents: contents is not specified\n'));

  if (ex.opts.reply) return scriptedGemini(ex, body, model, action);
  const { n, truncated } = answerLength(ex, obj(body.generationConfig).maxOutputTokens);
  const finishReason = truncated ? 'MAX_TOKENS' : 'STOP';
  const responseId = newId('');
  const reply = (text: string, produced: number, finished: boolean) => ({
    candidates: [{ content: { parts: [{ text }], role: 'model' }, ...(finished ? { finishReason } : {}), index: 0 }],
    usageMetadata: {
      promptTokenCount: prompt,
      candidatesTokenCount: produced,
      totalTokenCount: prompt + produced,
      promptTokensDetails,
      ...(cachedContent ? { cachedContentTokenCount: cachedContent } : {}),
    },
    modelVersion: model,
    responseId,
  });
  if (action === 'generateContent') {
    ex.bill(prompt, n);
    return sendJson(ex.res, 200, reply(fakeAnswer(n), n, true));
  }

  // streamGenerateContent: usageMetadata in every chunk, cumulative.
  const chunks = fakeAnswerChunks(n).map((text, i) => reply(text, i + 1, i === n - 1));
  if (chunks.length === 0) chunks.push(reply('', 0, true));
  const tokens = n === 0 ? 0 : 1;
  if (ex.url.searchParams.get('alt') === 'sse')
    return writeStream(
      ex,
      chunks.map((c) => ({ frame: sseData(c, '\r\n'), tokens })),
      { input: prompt },
    );
  // Without alt=sse the stream is one JSON array, written element by element.
  const parts: Frame[] = chunks.map((c, i) => ({ frame: `${i === 0 ? '[' : ',\r\n'}${JSON.stringify(c)}`, tokens }));
  return writeStream(ex, [...parts, ']'], { contentType: 'application/json; charset=UTF-8', input: prompt });
}

/** A minimal value that satisfies a JSON schema (OpenAPI-style Gemini schemas too): what a model in JSON mode would fill in. */
function schemaExample(schema: unknown): unknown {
  const s = obj(schema);
  if (Array.isArray(s.enum) && s.enum.length > 0) return s.enum[0];
  switch (String(s.type ?? '').toLowerCase()) {
    case 'object':
      return Object.fromEntries(Object.entries(obj(s.properties)).map(([name, property]) => [name, schemaExample(property)]));
    case 'array':
      return [];
    case 'string':
      return '';
    case 'number':
    case 'integer':
      return num(s.minimum) ?? 1;
    case 'boolean':
      return false;
    default:
      return null;
  }
}

/** The turn a Gemini request asks for. */
function geminiTurn(body: Json): Turn {
  const contents = Array.isArray(body.contents) ? body.contents.map(obj) : [];
  const parts = (c: Json) => (Array.isArray(c.parts) ? c.parts.map(obj) : []);
  const userText = contents
    .filter((c) => c.role === 'user')
    .flatMap((c) => parts(c).map((p) => str(p.text) ?? ''))
    .join('\n');
  const results = parts(contents.at(-1) ?? {}).filter((p) => p.functionResponse !== undefined);
  const tools = (Array.isArray(body.tools) ? body.tools : []).flatMap((t) => toolNames(obj(t).functionDeclarations));
  return {
    userText,
    tools,
    ...(results.length > 0 ? { toolResult: results.map((p) => JSON.stringify(obj(p.functionResponse).response ?? {})).join('\n') } : {}),
  };
}

/**
 * A scripted Gemini answer: a JSON-mode request (a response schema) gets a value of that schema,
 * as the model would give; anything else is answered by the script, with a function call or text.
 * Streams are SSE (`alt=sse`, as Gemini CLI asks).
 */
function scriptedGemini(ex: Exchange, body: Json, model: string, action: string): void | Promise<void> {
  const config = obj(body.generationConfig);
  const schema = config.responseJsonSchema ?? config.responseSchema;
  const reply: Reply = schema !== undefined ? { text: JSON.stringify(schemaExample(schema)) } : ex.opts.reply!(geminiTurn(body));
  const prompt = fakeTokenCount(ex.body);
  const responseId = newId('');
  const chunk = (parts: Json[], produced: number, finished: boolean) => ({
    candidates: [{ content: { parts, role: 'model' }, ...(finished ? { finishReason: 'STOP' } : {}), index: 0 }],
    usageMetadata: { promptTokenCount: prompt, candidatesTokenCount: produced, totalTokenCount: prompt + produced },
    modelVersion: model,
    responseId,
  });
  if ('tool' in reply) {
    const produced = fakeTokenCount(JSON.stringify(reply.input));
    const answer = chunk([{ functionCall: { name: reply.tool, args: reply.input } }], produced, true);
    ex.report(prompt, produced);
    ex.bill(prompt, produced);
    if (action === 'generateContent') return sendJson(ex.res, 200, answer);
    return writeStream(ex, [sseData(answer, '\r\n')]);
  }
  if (action === 'generateContent') {
    ex.report(prompt, fakeTokenCount(reply.text));
    ex.bill(prompt, fakeTokenCount(reply.text));
    return sendJson(ex.res, 200, chunk([{ text: reply.text }], fakeTokenCount(reply.text), true));
  }
  // Streamed text: usageMetadata in every chunk, cumulative; the last chunk carries the finish reason.
  async function* chunks(): AsyncGenerator<string> {
    let text = '';
    let previous: string | undefined;
    for await (const piece of replyText(reply as { text: string; hold?: boolean }, () => !ex.res.destroyed)) {
      if (previous !== undefined) yield sseData(chunk([{ text: previous }], fakeTokenCount(text), false), '\r\n');
      text += piece;
      previous = piece;
    }
    ex.report(prompt, fakeTokenCount(text));
    ex.bill(prompt, fakeTokenCount(text));
    yield sseData(chunk([{ text: previous ?? '' }], fakeTokenCount(text), true), '\r\n');
  }
  return writeStream(ex, chunks());
}

const geminiProvider: Provider = {
  authenticate(ex) {
    const keys = [header(ex, 'x-goog-api-key'), ex.url.searchParams.get('key') ?? undefined].filter((k): k is string => k !== undefined);
    if (keys.includes(ex.opts.credential)) return null;
    if (keys.length === 0)
      return googleError(
        403,
        'PERMISSION_DENIED',
        "Method doesn't allow unregistered callers (callers without established identity). Please use API Key or other form of API consumer identity to call this API.",
      );
    return googleError(400, 'INVALID_ARGUMENT', 'API key not valid. Please pass a valid API key.', [
      {
        '@type': 'type.googleapis.com/google.rpc.ErrorInfo',
        reason: 'API_KEY_INVALID',
        domain: 'googleapis.com',
        metadata: { service: 'generativelanguage.googleapis.com' },
      },
    ]);
  },
  routes: [
    { method: 'GET', path: /^\/(v1beta|v1)\/models$/, handle: (ex) => sendJson(ex.res, 200, { models: GEMINI_MODELS.map(geminiModel) }) },
    {
      method: 'GET',
      path: /^\/(v1beta|v1)\/models\/([^/:]+)$/,
      handle: (ex, m) => {
        const id = decodeURIComponent(m[2]!);
        if (GEMINI_MODELS.includes(id)) return sendJson(ex.res, 200, geminiModel(id));
        sendRefusal(ex, googleError(404, 'NOT_FOUND', `models/${id} is not found for API version ${m[1]}`));
      },
    },
    { method: 'POST', path: /^\/(v1beta|v1)\/models\/([^/:]+):(generateContent|streamGenerateContent|countTokens)$/, handle: gemini },
  ],
  notFound: () => googleError(404, 'NOT_FOUND', 'Requested entity was not found.'),
};

export const startGeminiUpstream = (opts: UpstreamOptions): Promise<Upstream> => startUpstream(opts, geminiProvider);

// ---------------------------------------------------------------------------------------------
// GitHub REST (clients use `${url}` as the API root)

const githubError = (status: number, message: string, documentation_url = 'https://docs.github.com/rest'): Refusal =>
  new Refusal(status, { message, documentation_url, status: String(status) });

const githubUser = (login: string, id: number) => ({
  login,
  id,
  node_id: Buffer.from(`04:User${id}`).toString('base64'),
  type: 'User',
  site_admin: false,
  url: `https://api.github.com/users/${login}`,
  html_url: `https://github.com/${login}`,
});

function startGitHub(opts: UpstreamOptions): Promise<Upstream> {
  const limit = 5_000;
  const reset = nowSeconds() + 3_600;
  let used = 0;
  let issueNumber = 0;
  const me = githubUser('till-test', 1);
  const repo = (owner: string, name: string) => ({
    id: 1_000 + name.length,
    node_id: Buffer.from(`010:Repository${owner}/${name}`).toString('base64'),
    name,
    full_name: `${owner}/${name}`,
    private: false,
    owner: githubUser(owner, 2),
    html_url: `https://github.com/${owner}/${name}`,
    url: `https://api.github.com/repos/${owner}/${name}`,
    default_branch: 'main',
    visibility: 'public',
  });
  const rate = () => ({ limit, used, remaining: limit - used, reset, resource: 'core' });

  const provider: Provider = {
    authenticate(ex) {
      const token = authToken(ex, ['bearer', 'token']);
      if (token === ex.opts.credential) return null;
      return token === undefined ? githubError(401, 'Requires authentication') : githubError(401, 'Bad credentials');
    },
    headers(ex, accepted) {
      if (accepted && ex.url.pathname !== '/rate_limit') used++;
      const r = accepted ? rate() : { limit: 60, used: 1, remaining: 59, reset, resource: 'core' };
      return {
        'x-ratelimit-limit': String(r.limit),
        'x-ratelimit-remaining': String(r.remaining),
        'x-ratelimit-used': String(r.used),
        'x-ratelimit-reset': String(r.reset),
        'x-ratelimit-resource': r.resource,
        'x-github-request-id': newId('').slice(0, 20).toUpperCase(),
        'x-github-api-version-selected': header(ex, 'x-github-api-version') ?? '2022-11-28',
      };
    },
    routes: [
      { method: 'GET', path: /^\/user$/, handle: (ex) => sendJson(ex.res, 200, me) },
      { method: 'GET', path: /^\/rate_limit$/, handle: (ex) => sendJson(ex.res, 200, { resources: { core: rate() }, rate: rate() }) },
      { method: 'GET', path: /^\/repos\/([^/]+)\/([^/]+)$/, handle: (ex, m) => sendJson(ex.res, 200, repo(m[1]!, m[2]!)) },
      {
        method: 'POST',
        path: /^\/repos\/([^/]+)\/([^/]+)\/issues$/,
        handle: (ex, m) => {
          const body = parseObject(ex.body);
          if (!body)
            return sendRefusal(ex, githubError(400, 'Problems parsing JSON', 'https://docs.github.com/rest/issues/issues#create-an-issue'));
          if (typeof body.title !== 'string' && typeof body.title !== 'number')
            return sendRefusal(
              ex,
              githubError(
                422,
                'Invalid request.\n\n"title" wasn\'t supplied.',
                'https://docs.github.com/rest/issues/issues#create-an-issue',
              ),
            );
          const number = ++issueNumber;
          const full = `${m[1]}/${m[2]}`;
          sendJson(ex.res, 201, {
            id: 10_000 + number,
            number,
            title: String(body.title),
            body: str(body.body) ?? null,
            state: 'open',
            user: me,
            labels: [],
            url: `https://api.github.com/repos/${full}/issues/${number}`,
            html_url: `https://github.com/${full}/issues/${number}`,
            created_at: new Date().toISOString(),
          });
        },
      },
    ],
    notFound: () => githubError(404, 'Not Found'),
  };
  return startUpstream(opts, provider);
}

export const startGitHubUpstream = (opts: UpstreamOptions): Promise<Upstream> => startGitHub(opts);
