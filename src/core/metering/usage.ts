/**
 * Usage: how many tokens a request used, read from the provider's own usage fields (a JSON
 * body, or one event of a stream: streamMeter.ts feeds those in), and which format each route
 * answers in. Facts per provider: ../shared/PROVIDERS.md. No I/O here.
 *
 * The normalised {@link Usage} follows one convention whatever the provider reported:
 * - `inputTokens` is the TOTAL input: uncached + cache reads + cache writes (+ Gemini's tool-use
 *   prompt, + Perplexity's citation tokens). Providers differ here (OpenAI's `prompt_tokens`
 *   already includes cached tokens, Anthropic's `input_tokens` excludes both cache fields), so
 *   a limit on "input tokens" means the same thing for every provider.
 * - `cachedInputTokens` (cache reads) and `cacheWriteTokens` are the parts of `inputTokens` that
 *   are priced differently. Uncached input = input − cached − cache writes.
 * - `outputTokens` is the TOTAL output, reasoning included; `reasoningTokens` is the reasoning
 *   part. Where a provider reports reasoning outside its output count (Gemini's
 *   `thoughtsTokenCount`; xAI, whose `total_tokens` = prompt + completion + reasoning), it is
 *   added, so output is what the provider bills as output.
 * - Cumulative counters (Anthropic `message_delta.usage`, Gemini `usageMetadata`, Perplexity's
 *   usage in every chunk) are taken as the LAST value seen, never summed.
 */
import { asArray, asObj, asStr, type Json } from '../json';
import { builtInProvider } from '../providers/providers';
import type { UsageFormat } from '../providers/wire';

/** Tokens one request used, normalised across providers (see the module comment for the convention). */
export interface Usage {
  /** Total input tokens: uncached + cache reads + cache writes. */
  inputTokens: number;
  /** Total output tokens, reasoning included. */
  outputTokens: number;
  /** The part of `inputTokens` read from a prompt cache. */
  cachedInputTokens: number;
  /** The part of `inputTokens` written to a prompt cache (Anthropic, OpenRouter). */
  cacheWriteTokens: number;
  /** The part of `cacheWriteTokens` written to a 1-hour cache (Anthropic `ttl: "1h"`), when reported. */
  cacheWrite1hTokens?: number;
  /** The service tier the upstream says it used (`priority` bills more), when reported. */
  serviceTier?: string;
  /** Server-side tool calls by tool type (`web_search`, …), which bill per call, when reported. */
  toolCalls?: Record<string, number>;
  /** The part of `outputTokens` spent on reasoning / thinking, when the provider says. */
  reasoningTokens: number;
  /** USD the provider itself reported (OpenRouter `usage.cost`, Perplexity cost breakdown), when it did. */
  reportedCostUsd?: number;
  /** True when some of it was estimated (interrupted stream). */
  estimated?: boolean;
}

/**
 * Which usage format a request's response has, from provider id + method + path (the path in the
 * provider's own namespace, e.g. `/v1/chat/completions`; a query string is ignored).
 * undefined = not metered: not a POST (e.g. GET /models), a free route (token counting), a route
 * without token usage (GitHub), or a provider this module does not know (custom providers).
 *
 * The format does not depend on the request's `stream` flag: one format covers both the JSON and
 * the streamed answer. Use {@link usageFromJson} on a parsed JSON body, or feed any response body
 * (SSE, streamed JSON array, or plain JSON) to a {@link StreamMeter}.
 */
export function usageFormat(provider: string, method: string, path: string): UsageFormat | undefined {
  if (method !== 'POST' && method.toUpperCase() !== 'POST') return undefined;
  let byPath = formatCache.get(provider);
  if (!byPath) formatCache.set(provider, (byPath = new Map<string, UsageFormat | null>()));
  let format = byPath.get(path);
  if (format === undefined) {
    format = postFormat(provider, path) ?? null;
    if (byPath.size >= 1000) byPath.clear();
    byPath.set(path, format);
  }
  return format ?? undefined;
}

// usageFormat's answers by provider, then path (null: not metered). A broker sees few distinct
// routes, and the providers' route patterns (providers/wire.ts) ran on every request.
const formatCache = new Map<string, Map<string, UsageFormat | null>>();

/** The format a built-in provider's wire gives the route; custom providers are not metered. */
function postFormat(provider: string, path: string): UsageFormat | undefined {
  return builtInProvider(provider)?.wire.usageFormat(path.replace(/[?#].*$/, '').replace(/\/+$/, ''));
}

// ---------------------------------------------------------------------------------------------
// Reading usage objects

/** A token count: a finite, non-negative number. Anything else (null, strings) counts as absent. */
const count = (v: unknown): number | undefined => (typeof v === 'number' && Number.isFinite(v) && v >= 0 ? v : undefined);

/** `usage.cost`: a number (OpenRouter, in USD credits) or a breakdown with `total_cost` (Perplexity). */
function reportedCost(cost: unknown): number | undefined {
  const n = count(cost);
  if (n !== undefined) return n;
  const breakdown = asObj(cost);
  if (!breakdown) return undefined;
  // Perplexity's Responses cost names its currency; never mistake another currency for USD.
  const currency = breakdown.currency;
  if (typeof currency === 'string' && currency.toUpperCase() !== 'USD') return undefined;
  return count(breakdown.total_cost);
}

function withCost(u: Usage, cost: number | undefined): Usage {
  if (cost !== undefined) u.reportedCostUsd = cost;
  return u;
}

/**
 * OpenAI-style usage: Chat/Completions/Embeddings (`prompt_tokens`…) and Responses
 * (`input_tokens`…, also Realtime's `input_token_details`), with each compatible provider's extras.
 */
export function fromOpenAiUsage(u: Json): Usage | undefined {
  const prompt = count(u.prompt_tokens) ?? count(u.input_tokens);
  const completion = count(u.completion_tokens) ?? count(u.output_tokens);
  if (prompt === undefined && completion === undefined) return undefined;
  const inDetails = asObj(u.prompt_tokens_details) ?? asObj(u.input_tokens_details) ?? asObj(u.input_token_details);
  const outDetails = asObj(u.completion_tokens_details) ?? asObj(u.output_tokens_details) ?? asObj(u.output_token_details);
  const input = prompt ?? 0;
  let output = completion ?? 0;
  // DeepSeek reports cache hits as prompt_cache_hit_tokens (prompt_tokens = hit + miss).
  const cached = Math.max(count(inDetails?.cached_tokens) ?? 0, count(u.prompt_cache_hit_tokens) ?? 0);
  const cacheWrite = count(inDetails?.cache_write_tokens) ?? 0;
  // Perplexity puts reasoning_tokens at the top level of usage.
  const reasoning = count(outDetails?.reasoning_tokens) ?? count(u.reasoning_tokens) ?? 0;
  // Perplexity deep research bills citation tokens (sources read) at input rates, apart from prompt_tokens.
  const citation = count(u.citation_tokens) ?? 0;
  if (reasoning > 0) {
    // OpenAI counts reasoning inside completion_tokens; xAI does not (total = prompt + completion
    // + reasoning). A part larger than its whole is also a sign it is counted outside.
    const total = count(u.total_tokens);
    const outside =
      total !== undefined &&
      total !== input + output &&
      (total === input + output + reasoning || total === input + citation + output + reasoning);
    if (outside || reasoning > output) output += reasoning;
  }
  return withCost(
    {
      inputTokens: input + citation,
      outputTokens: output,
      cachedInputTokens: cached,
      cacheWriteTokens: cacheWrite,
      reasoningTokens: reasoning,
    },
    reportedCost(u.cost),
  );
}

/**
 * What an OpenAI-shaped answer (a chat completion, a Responses response) says beyond its token
 * counts: the service tier it ran in, and its server-side tool calls (Responses output items
 * such as `web_search_call`), which bill per call.
 */
export function withOpenAiExtras(u: Usage, r: Json): Usage {
  if (typeof r.service_tier === 'string') u.serviceTier = r.service_tier;
  for (const item of asArray(r.output)) {
    const tool = responsesServerTool(asStr(asObj(item)?.type));
    if (tool !== undefined) (u.toolCalls ??= {})[tool] = (u.toolCalls[tool] ?? 0) + 1;
  }
  return u;
}

/**
 * The server-side tool a Responses output item of type `item` is a call of (`web_search_call` →
 * `web_search`), or undefined: function and custom tool calls run in the client and bill nothing.
 */
export function responsesServerTool(item: string | undefined): string | undefined {
  if (item === undefined || !item.endsWith('_call') || item === 'function_call' || item === 'custom_tool_call') return undefined;
  return item.slice(0, -'_call'.length);
}

/** Gemini grounding: each web search query the model ran bills as a `google_search` call. */
export function withGeminiExtras(u: Usage, o: Json): Usage {
  let queries = 0;
  if (Array.isArray(o.candidates))
    for (const c of o.candidates) queries += asArray(asObj(asObj(c)?.groundingMetadata)?.webSearchQueries).length;
  if (queries > 0) u.toolCalls = { google_search: queries };
  return u;
}

/** Anthropic's counters, kept apart because a stream updates them field by field. */
export interface AnthropicCounts {
  input?: number;
  cacheWrite?: number;
  cacheWrite1h?: number;
  cacheRead?: number;
  output?: number;
  serviceTier?: string;
  toolCalls?: Record<string, number>;
}

/** Anthropic's `server_tool_use` counters, by the tool type they bill as. */
const ANTHROPIC_TOOL_COUNTS: Record<string, string> = {
  web_search_requests: 'web_search',
  web_fetch_requests: 'web_fetch',
  code_execution_requests: 'code_execution',
};

/** Overwrites the counters present in `u`: Anthropic's counts are cumulative, so the latest wins. */
export function mergeAnthropic(into: AnthropicCounts, u: Json): void {
  const input = count(u.input_tokens);
  if (input !== undefined) into.input = input;
  let write = count(u.cache_creation_input_tokens);
  const byTtl = asObj(u.cache_creation);
  if (write === undefined && byTtl) write = (count(byTtl.ephemeral_5m_input_tokens) ?? 0) + (count(byTtl.ephemeral_1h_input_tokens) ?? 0);
  if (write !== undefined) into.cacheWrite = write;
  const hour = count(byTtl?.ephemeral_1h_input_tokens);
  if (hour !== undefined) into.cacheWrite1h = hour;
  if (typeof u.service_tier === 'string') into.serviceTier = u.service_tier;
  const tools = asObj(u.server_tool_use);
  if (tools) {
    into.toolCalls = {};
    for (const [field, tool] of Object.entries(ANTHROPIC_TOOL_COUNTS)) {
      const n = count(tools[field]);
      if (n) into.toolCalls[tool] = n;
    }
  }
  const read = count(u.cache_read_input_tokens);
  if (read !== undefined) into.cacheRead = read;
  const output = count(u.output_tokens);
  if (output !== undefined) into.output = output;
}

export function fromAnthropicCounts(c: AnthropicCounts): Usage | undefined {
  if (c.input === undefined && c.output === undefined && c.cacheRead === undefined && c.cacheWrite === undefined) return undefined;
  const cacheRead = c.cacheRead ?? 0;
  const cacheWrite = c.cacheWrite ?? 0;
  // Anthropic's input_tokens excludes both cache fields; add them for the total.
  const u: Usage = {
    inputTokens: (c.input ?? 0) + cacheRead + cacheWrite,
    outputTokens: c.output ?? 0,
    cachedInputTokens: cacheRead,
    cacheWriteTokens: cacheWrite,
    reasoningTokens: 0,
  };
  if (c.cacheWrite1h) u.cacheWrite1hTokens = c.cacheWrite1h;
  if (c.serviceTier !== undefined) u.serviceTier = c.serviceTier;
  if (c.toolCalls && Object.keys(c.toolCalls).length > 0) u.toolCalls = { ...c.toolCalls };
  return u;
}

export function fromGeminiUsage(m: Json): Usage | undefined {
  const prompt = count(m.promptTokenCount);
  // The Live API (WebSocket) names the output count responseTokenCount.
  const candidates = count(m.candidatesTokenCount) ?? count(m.responseTokenCount);
  const thoughts = count(m.thoughtsTokenCount);
  const toolUse = count(m.toolUsePromptTokenCount);
  if (prompt === undefined && candidates === undefined && thoughts === undefined && toolUse === undefined) return undefined;
  // candidatesTokenCount excludes thoughts, which are billed as output; tool-use prompts are input.
  return {
    inputTokens: (prompt ?? 0) + (toolUse ?? 0),
    outputTokens: (candidates ?? 0) + (thoughts ?? 0),
    cachedInputTokens: count(m.cachedContentTokenCount) ?? 0,
    cacheWriteTokens: 0,
    reasoningTokens: thoughts ?? 0,
  };
}

/** Cohere v2 `usage` (or v1 `meta`): billed units are what is charged, raw `tokens` the fallback. */
export function fromCohereUsage(u: Json): Usage | undefined {
  const billed = asObj(u.billed_units);
  const tokens = asObj(u.tokens);
  const input = count(billed?.input_tokens) ?? count(tokens?.input_tokens);
  const output = count(billed?.output_tokens) ?? count(tokens?.output_tokens);
  if (input === undefined && output === undefined) return undefined;
  return {
    inputTokens: input ?? 0,
    outputTokens: output ?? 0,
    cachedInputTokens: count(u.cached_tokens) ?? 0,
    cacheWriteTokens: 0,
    reasoningTokens: 0,
  };
}

/**
 * Usage from a whole JSON response body (already parsed). undefined when the body reports none
 * (an error body, a body of another format).
 *
 * Also accepts the JSON of single stream events where that is how usage arrives outside SSE:
 * OpenAI Responses over WebSocket (`response.completed` etc.), Anthropic `message_start` /
 * `message_delta`, Cohere `message-end`; and Gemini's streamed JSON array (the last
 * `usageMetadata` wins, as it is cumulative).
 */
export function usageFromJson(format: UsageFormat, body: unknown): Usage | undefined {
  if (format === 'gemini' && Array.isArray(body)) {
    for (let i = body.length - 1; i >= 0; i--) {
      const m = asObj(asObj(body[i])?.usageMetadata);
      const u = m && fromGeminiUsage(m);
      if (u) return u;
    }
    return undefined;
  }
  const o = asObj(body);
  if (!o) return undefined;
  switch (format) {
    case 'openai-chat':
    case 'openai-completions':
    case 'openai-embeddings':
    case 'openai-responses': {
      // A Responses event (WebSocket message) carries the response object inside.
      const r = format === 'openai-responses' && typeof o.type === 'string' ? (asObj(o.response) ?? o) : o;
      // Groq put usage under x_groq in some answers.
      const u = asObj(r.usage) ?? asObj(asObj(r.x_groq)?.usage);
      const parsed = u && fromOpenAiUsage(u);
      return parsed && withOpenAiExtras(parsed, r);
    }
    case 'anthropic-messages': {
      const u = asObj(o.usage) ?? asObj(asObj(o.message)?.usage);
      if (!u) return undefined;
      const c: AnthropicCounts = {};
      mergeAnthropic(c, u);
      return fromAnthropicCounts(c);
    }
    case 'gemini': {
      const m = asObj(o.usageMetadata);
      const parsed = m && fromGeminiUsage(m);
      return parsed && withGeminiExtras(parsed, o);
    }
    case 'cohere-chat': {
      const u = asObj(o.usage) ?? asObj(asObj(o.delta)?.usage) ?? asObj(o.meta);
      return u && fromCohereUsage(u);
    }
  }
}

/** Rough token estimate for text or a request body when the provider reported nothing: ceil(chars / 4). */
export function estimateTokens(chars: number): number {
  return Number.isFinite(chars) && chars > 0 ? Math.ceil(chars / 4) : 0;
}
