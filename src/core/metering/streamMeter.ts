/**
 * Metering a streamed answer as it passes: SSE events (sseParser.ts) or Gemini's streamed JSON
 * array and plain JSON bodies (jsonScanner.ts), the usage in them read per format (usage.ts), the
 * generated text kept for counting a cut stream. No I/O here: the broker feeds bytes in and reads
 * numbers out.
 */
import { asObj, asStr, type Json } from '../json';
import type { UsageFormat } from '../providers/wire';
import { JsonScanner, type JsonCapture, type JsonScanListener } from './jsonScanner';
import { SseParser } from './sseParser';
import {
  type AnthropicCounts,
  type Usage,
  estimateTokens,
  fromAnthropicCounts,
  fromCohereUsage,
  fromGeminiUsage,
  fromOpenAiUsage,
  mergeAnthropic,
  responsesServerTool,
  usageFromJson,
  withGeminiExtras,
  withOpenAiExtras,
} from './usage';
/**
 * The server-side tool whose call a stream event starts, by the name it bills under
 * (Responses `response.output_item.added` of a `web_search_call` → `web_search`; Anthropic
 * `content_block_start` of a `server_tool_use` → its name), or undefined. Function and custom
 * tool calls run in the client and bill nothing.
 */
export function serverToolCall(format: UsageFormat, type: string | undefined, o: Json): string | undefined {
  if (format === 'openai-responses' && type === 'response.output_item.added') return responsesServerTool(asStr(asObj(o.item)?.type));
  if (format === 'anthropic-messages' && type === 'content_block_start') {
    const block = asObj(o.content_block);
    if (block?.type !== 'server_tool_use') return undefined;
    const name = asStr(block.name);
    return name?.endsWith('code_execution') ? 'code_execution' : name;
  }
  return undefined;
}

/** Characters of generated text kept for counting a cut stream's tokens. */
const KEPT_TEXT = 256 * 1024;

/**
 * The text a response has generated so far (deltas of text, reasoning and tool arguments): its
 * size, an upper bound of its tokens (its UTF-8 bytes), and its first characters, for counting
 * what a stream cut before the upstream reported its usage produced; and the server-side tool
 * calls it started (see {@link serverToolCall}), which bill a fee and their results.
 */
export class GeneratedText {
  chars = 0;
  bytes = 0;
  /** Server-side tool calls started so far, by tool (`web_search`, …). */
  readonly toolCalls: Record<string, number> = {};
  private kept: string[] = [];
  private keptChars = 0;

  /** Notes the start of a call of server-side tool `tool`, if any. */
  toolCall(tool: string | undefined): void {
    if (tool !== undefined) this.toolCalls[tool] = (this.toolCalls[tool] ?? 0) + 1;
  }

  add(value: unknown): void {
    if (typeof value !== 'string' || value.length === 0) return;
    this.chars += value.length;
    this.bytes += Buffer.byteLength(value);
    if (this.keptChars < KEPT_TEXT) {
      this.kept.push(value);
      this.keptChars += value.length;
    }
  }

  /** The text kept (its first {@link KEPT_TEXT} characters), and the share of all of it that is. */
  sample(): { text: string; share: number } {
    return { text: this.kept.join(''), share: this.chars === 0 ? 1 : this.keptChars / this.chars };
  }
}

/** Default cap on one buffered event (or JSON value) in a {@link StreamMeter}: 1 MiB. */
export const DEFAULT_MAX_EVENT_BYTES = 1024 * 1024;

export interface StreamMeterOptions {
  /** Largest event kept for parsing; larger ones are skipped for metering. Default: 1 MiB. */
  maxEventBytes?: number;
}

/** One parsed SSE event (or one element of a streamed JSON array). */
export interface MeterEvent {
  /** The `event:` name, when the event had one. */
  event?: string;
  /** The event's `data:` lines joined with `\n`. */
  data: string;
  /**
   * The event's bytes as received: everything after the previous block through the blank line
   * that ends this event (comment lines inside it included). Forwarding the raws of the events
   * one keeps gives a valid stream. In no raw: comment-only blocks (keep-alives), events too
   * large to meter, and bytes after the last event (an unfinished event, or the LF of a final
   * CRLF that arrived after its CR had ended the event). May be a view of a pushed chunk: copy
   * it to keep it.
   */
  raw: Buffer;
}

const LBRACE = 0x7b;
const LBRACKET = 0x5b;
const isSpace = (b: number): boolean => b === 0x20 || b === 0x09 || b === 0x0a || b === 0x0d;
/** UTF-8 byte-order mark bytes: skipped while sniffing the body's kind. */
const isBomByte = (b: number): boolean => b === 0xef || b === 0xbb || b === 0xbf;

/**
 * The top-level values of a plain JSON body that carry usage (objects), or price it (the tier the
 * answer ran in, a string); only these are buffered.
 */
const USAGE_VALUES: JsonCapture = {
  objects: new Set(['usage', 'usageMetadata', 'meta', 'x_groq']),
  strings: new Set(['service_tier']),
};

/** Responses API events that end a response (HTTP stream and WebSocket alike). */
export const RESPONSES_FINAL = new Set(['response.completed', 'response.incomplete', 'response.failed', 'response.done']);

/** A Responses or Realtime event that carries generated text (audio deltas are base64, not text). */
export const isTextDelta = (type: string): boolean => type.endsWith('.delta') && !type.endsWith('audio.delta');

/**
 * A streamed answer's meter: feed raw chunks as they pass (never holding them back), read usage
 * at any time. Bounded memory: keeps at most one partial event (capped by `maxEventBytes`,
 * default 1 MiB; an event larger than that is skipped for metering, not buffered). Events are
 * framed by sseParser.ts and jsonScanner.ts; this reads each format's events.
 *
 * The body's kind is sniffed from its first byte, so one meter serves every response of a format:
 * `[` is Gemini's streamed JSON array (`streamGenerateContent` without `alt=sse`), whose elements
 * are metered like SSE events; `{` is a plain JSON body, of which only the top-level usage values
 * are buffered (so a large embeddings answer costs no memory); anything else is SSE.
 */
export class StreamMeter {
  /**
   * Each complete event as it is parsed, for callers that must act per event (e.g. drop one).
   * Optional listener, called inside {@link push} after the meter has read the event (so
   * `sawUsageChunk` already reflects it). If it throws, push() still finishes the chunk, then
   * rethrows.
   */
  onEvent?: (e: MeterEvent) => void;

  private readonly maxEventBytes: number;
  /** Frames the body once its first byte tells its kind. */
  private framing: SseParser | JsonScanner | undefined;

  // Metering state
  private reported: Usage | undefined;
  /** The generated text seen so far. */
  readonly generated = new GeneratedText();
  private id: string | undefined;
  private sequence = -1;
  private readonly anthropic: AnthropicCounts = {};
  private usageChunk = false;
  private serviceTier: string | undefined;
  private finished = false;
  private listenerError: { error: unknown } | undefined;

  private readonly topValues: Json = {};

  constructor(
    private readonly format: UsageFormat,
    options: StreamMeterOptions = {},
  ) {
    this.maxEventBytes = Math.max(1, options.maxEventBytes ?? DEFAULT_MAX_EVENT_BYTES);
  }

  /** Characters of generated text seen so far (deltas), for estimating output when a stream is cut before usage arrives. */
  get textChars(): number {
    return this.generated.chars;
  }

  /** UTF-8 bytes of generated text seen so far: an upper bound of the output tokens it encodes. */
  get textBytes(): number {
    return this.generated.bytes;
  }

  /** Server-side tool calls the answer started so far, by tool. */
  get toolCalls(): Readonly<Record<string, number>> {
    return this.generated.toolCalls;
  }

  /** The id of the response the stream answers with (OpenAI Responses), once seen. */
  get responseId(): string | undefined {
    return this.id;
  }

  /** The `sequence_number` of the last Responses event seen (-1 before any). */
  get lastSequence(): number {
    return this.sequence;
  }

  private text(value: unknown): void {
    this.generated.add(value);
  }

  /** For OpenAI chat streams: whether the usage-only final chunk (`choices: []`, `usage` set) has been seen. */
  get sawUsageChunk(): boolean {
    return this.usageChunk;
  }

  /**
   * True once the provider has reported its final usage (OpenAI usage chunk or a usage-bearing
   * finish chunk, Responses `response.completed`/`incomplete`/`failed`, Anthropic stop, Gemini
   * finish, Cohere `message-end`, the end of a JSON body). Until then {@link usage} is partial:
   * what a cut stream reported before it was cut.
   */
  get complete(): boolean {
    return this.finished && this.usage() !== undefined;
  }

  /** Bytes held for the event being parsed: never more than `maxEventBytes`. */
  get bufferedBytes(): number {
    return this.framing?.bufferedBytes ?? 0;
  }

  /**
   * Best usage known so far: reported usage when seen (cumulative fields taken as the LAST
   * value, never summed: Anthropic message_delta, Gemini usageMetadata), else undefined.
   */
  usage(): Usage | undefined {
    const u = this.format === 'anthropic-messages' ? fromAnthropicCounts(this.anthropic) : this.reported;
    return u && { ...u };
  }

  /**
   * Usage to settle a request with once its body has ended or been cut. When the provider
   * reported final usage, that. Otherwise what it reported topped up with estimates, marked
   * `estimated`: input from `requestChars` (the request body's size) when none was reported,
   * output at least {@link estimateTokens}(textChars).
   */
  finalUsage(requestChars: number): Usage {
    const u = this.usage();
    if (u && this.complete) return u;
    const output = estimateTokens(this.generated.chars);
    if (!u)
      return {
        inputTokens: estimateTokens(requestChars),
        outputTokens: output,
        cachedInputTokens: 0,
        cacheWriteTokens: 0,
        reasoningTokens: 0,
        estimated: true,
      };
    return {
      ...u,
      inputTokens: u.inputTokens > 0 ? u.inputTokens : estimateTokens(requestChars),
      outputTokens: Math.max(u.outputTokens, output),
      estimated: true,
    };
  }

  /** Feeds the next bytes of the response body. Never keeps a reference to `chunk`. */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    if (this.framing) this.framing.push(chunk);
    else {
      let i = 0;
      while (i < chunk.length && (isSpace(chunk[i]!) || isBomByte(chunk[i]!))) i++;
      if (i === chunk.length) return; // blank so far: meaningless in every kind
      const b = chunk[i]!;
      this.framing =
        b === LBRACE || b === LBRACKET
          ? new JsonScanner(this.maxEventBytes, USAGE_VALUES, this.jsonListener)
          : new SseParser(this.maxEventBytes, this.sseEvent);
      this.framing.push(chunk, i);
    }
    // A throwing listener must not leave the parser half way through a chunk: rethrow after.
    const failure = this.listenerError;
    if (failure) {
      this.listenerError = undefined;
      throw failure.error;
    }
  }

  private readonly sseEvent = (event: string | undefined, data: string, raw: Buffer): void => {
    this.handleData(event, data);
    this.emit(event ? { event, data, raw } : { data, raw });
  };

  private emit(e: MeterEvent): void {
    if (!this.onEvent) return;
    try {
      this.onEvent(e);
    } catch (error) {
      this.listenerError ??= { error };
    }
  }

  private handleData(event: string | undefined, data: string): void {
    const first = data.charCodeAt(0);
    if (first !== LBRACE && first !== LBRACKET) return; // [DONE], keep-alive text, …
    let value: unknown;
    try {
      value = JSON.parse(data);
    } catch {
      return;
    }
    const o = asObj(value);
    if (o) this.handleEvent(event, o);
  }

  // -------------------------------------------------------------------------------------------
  // Per-format event handling

  private handleEvent(event: string | undefined, o: Json): void {
    switch (this.format) {
      case 'openai-chat':
      case 'openai-completions':
      case 'openai-embeddings':
        return this.openAiChunk(o);
      case 'openai-responses':
        return this.responsesEvent(typeof o.type === 'string' ? o.type : event, o);
      case 'anthropic-messages':
        return this.anthropicEvent(typeof o.type === 'string' ? o.type : event, o);
      case 'gemini':
        return this.geminiChunk(o);
      case 'cohere-chat':
        return this.cohereEvent(typeof o.type === 'string' ? o.type : event, o);
    }
  }

  private openAiChunk(o: Json): void {
    const choices = o.choices;
    if (Array.isArray(choices)) {
      for (const c of choices) {
        const choice = asObj(c);
        if (!choice) continue;
        if (typeof choice.finish_reason === 'string') this.finished = true;
        const delta = asObj(choice.delta);
        if (!delta) {
          this.text(choice.text); // legacy completions
          continue;
        }
        // Together repeats a chat delta's text in `choice.text`: with a delta, only the delta counts.
        // DeepSeek streams reasoning as reasoning_content, OpenRouter and Groq as reasoning; a
        // provider sending both sends the same text twice, so count one.
        this.text(delta.content);
        this.text(delta.refusal);
        this.text(typeof delta.reasoning_content === 'string' ? delta.reasoning_content : delta.reasoning);
        if (Array.isArray(delta.tool_calls)) {
          for (const call of delta.tool_calls) this.text(asObj(asObj(call)?.function)?.arguments);
        }
        this.text(asObj(delta.function_call)?.arguments);
      }
    }
    if (typeof o.service_tier === 'string') this.serviceTier = o.service_tier;
    const top = asObj(o.usage);
    const u = top ?? asObj(asObj(o.x_groq)?.usage);
    const parsed = u && fromOpenAiUsage(u);
    if (!parsed) return;
    if (this.serviceTier !== undefined) parsed.serviceTier = this.serviceTier;
    this.reported = parsed; // the latest wins: some providers repeat cumulative usage in every chunk
    // Azure's first chunk also has `choices: []` but carries prompt_filter_results, not usage.
    if (top && Array.isArray(choices) && choices.length === 0) {
      this.usageChunk = true;
      this.finished = true;
    }
  }

  private responsesEvent(type: string | undefined, o: Json): void {
    if (type === undefined) return;
    if (typeof o.sequence_number === 'number') this.sequence = o.sequence_number;
    if (RESPONSES_FINAL.has(type)) {
      this.finished = true;
      const response = asObj(o.response);
      const u = asObj(response?.usage);
      const parsed = u && fromOpenAiUsage(u);
      if (parsed) this.reported = withOpenAiExtras(parsed, response!);
      return;
    }
    // Text, reasoning, refusal and tool-argument deltas.
    if (type === 'response.created') {
      const id = asObj(o.response)?.id;
      if (typeof id === 'string') this.id = id;
    }
    if (isTextDelta(type)) this.text(o.delta);
    else this.generated.toolCall(serverToolCall(this.format, type, o));
  }

  private anthropicEvent(type: string | undefined, o: Json): void {
    switch (type) {
      case 'message_start': {
        const u = asObj(asObj(o.message)?.usage);
        if (u) mergeAnthropic(this.anthropic, u);
        return;
      }
      case 'message_delta': {
        // Cumulative: with server tools there can be several; each overwrites.
        const u = asObj(o.usage);
        if (u) mergeAnthropic(this.anthropic, u);
        if (typeof asObj(o.delta)?.stop_reason === 'string') this.finished = true;
        return;
      }
      case 'message_stop':
        this.finished = true;
        return;
      case 'content_block_start': {
        const block = asObj(o.content_block);
        this.text(block?.text);
        this.text(block?.thinking);
        this.generated.toolCall(serverToolCall(this.format, type, o));
        return;
      }
      case 'content_block_delta': {
        const d = asObj(o.delta);
        this.text(d?.text);
        this.text(d?.thinking);
        this.text(d?.partial_json);
        return;
      }
    }
  }

  private geminiChunk(o: Json): void {
    const candidates = o.candidates;
    if (Array.isArray(candidates)) {
      for (const c of candidates) {
        const candidate = asObj(c);
        if (!candidate) continue;
        if (typeof candidate.finishReason === 'string') this.finished = true;
        const parts = asObj(candidate.content)?.parts;
        if (!Array.isArray(parts)) continue;
        for (const p of parts) {
          const part = asObj(p);
          if (!part) continue;
          this.text(part.text);
          this.text(asObj(part.executableCode)?.code);
          if (part.functionCall !== undefined) this.text(JSON.stringify(part.functionCall));
        }
      }
    }
    // A blocked prompt ends the answer without candidates.
    if (typeof asObj(o.promptFeedback)?.blockReason === 'string') this.finished = true;
    const m = asObj(o.usageMetadata);
    const parsed = m && fromGeminiUsage(m);
    if (parsed) {
      // Cumulative: the latest wins. Grounding queries come with the chunk that used them.
      const queries = withGeminiExtras(parsed, o).toolCalls?.google_search ?? this.reported?.toolCalls?.google_search;
      if (queries) parsed.toolCalls = { google_search: queries };
      this.reported = parsed;
    }
  }

  private cohereEvent(type: string | undefined, o: Json): void {
    const delta = asObj(o.delta);
    const message = asObj(delta?.message);
    switch (type) {
      case 'content-delta': {
        const content = asObj(message?.content);
        this.text(content?.text);
        this.text(content?.thinking);
        return;
      }
      case 'tool-plan-delta':
        this.text(message?.tool_plan);
        return;
      case 'tool-call-start':
      case 'tool-call-delta':
        this.text(asObj(asObj(message?.tool_calls)?.function)?.arguments);
        return;
      case 'message-end': {
        this.finished = true;
        const u = asObj(delta?.usage);
        const parsed = u && fromCohereUsage(u);
        if (parsed) this.reported = parsed;
        return;
      }
    }
  }

  // -------------------------------------------------------------------------------------------
  // JSON bodies: Gemini's streamed array, or one plain object

  private readonly jsonListener: JsonScanListener = {
    // An element of Gemini's streamed array: metered exactly like an SSE event.
    element: (raw) => {
      const text = raw.toString('utf8');
      this.handleData(undefined, text);
      this.emit({ data: text, raw });
    },
    value: (key, raw) => {
      try {
        this.topValues[key] = JSON.parse(raw.toString('utf8')) as unknown;
      } catch {
        return;
      }
      const u = usageFromJson(this.format, this.topValues);
      if (u) {
        this.reported = u;
        if (this.format === 'anthropic-messages') mergeAnthropic(this.anthropic, asObj(this.topValues.usage) ?? {});
      }
    },
    // The body is complete.
    end: () => {
      this.finished = true;
    },
  };
}
