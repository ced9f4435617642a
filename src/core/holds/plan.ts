/**
 * Holds for one billable request on a key with a token or dollar limit: what to hold before it
 * is forwarded, and what it settles to.
 *
 * Guarantees, for the upstream's bill (everything below is priced at its highest applicable rate):
 * - The input part of a hold is an upper bound of the input the upstream can bill: the body's
 *   bytes (a byte-level tokenizer never makes more tokens than bytes; one token per byte, plus
 *   the cap Till may add) and each image at the most it can cost, or, when that would refuse the
 *   request or lower its output, the exact count for models whose tokenizer is public. What the
 *   provider adds from its own state is added as the tokens Till saw it report (a response this
 *   broker served: see contexts.ts) or, when Till saw nothing (a file by id, cached content),
 *   bounded by the model's context window; server-side tool results at the most one call adds
 *   (prices.json `toolResults`) per call held, else the context window. The plan says which.
 * - Dollars take the highest rate the request can be billed at: a cache write when it can write
 *   the cache (1-hour writes at their rate), the long-context tier when its input may cross the
 *   tier's threshold, the priority tier when it asks for it; server-side tools add their fees
 *   times the calls held: all the request allows, or, where it sets no limit on a stream that
 *   shows each call, one ahead (streamHold.ts). A spend-limited key refuses what it cannot bound,
 *   saying why and what to set.
 * - Output: a non-streaming request holds its whole cap (nothing can be cut mid-way); one that
 *   names none gets {@link NON_STREAMING_DEFAULT_OUTPUT}, or what fits. A stream holds a first
 *   slice and grows (see streamHold.ts). The client's own cap is forwarded unchanged while the key
 *   could cover it; otherwise it is lowered to what the key can cover now, a ceiling for that
 *   request alone.
 */
import type { Denial } from '../denial';
import type { RequestUsage } from '../events';
import { maxImageTokens, imageTokens } from '../estimate/imageTokens';
import type { SettleDetails, TokenCounts } from '../ledger/ledger';
import { estimateTokens, type Usage } from '../metering/usage';
import type { UsageFormat } from '../providers/wire';
import { type GeneratedText } from '../metering/streamMeter';
import { MICROS, type Amounts, type Policy } from '../policy/policy';
import { formatAmount, limitRefusal } from '../keys/present';
import { costAt, ratesFor, type ModelLimits, type ModelPrice, type PriceTable } from '../metering/pricing';
import { readRequest, type RequestFacts } from '../estimate/requestFacts';
import { counter, encodingOf, requestTokens } from '../estimate/tokenCount';

type Json = Record<string, unknown>;

/**
 * Output tokens a stream holds at first, and by how many its hold grows (streamHold.ts): a
 * 32nd of what the key could cover for it, between {@link MIN_SLICE} and this. Small enough that
 * parallel streams share a budget; large enough that a growth (a ledger write) is rare.
 */
const OUTPUT_SLICE = 1024;
/** The smallest slice: room for the cut margin and some output. */
const MIN_SLICE = 128;
/**
 * Output a non-streaming request may produce when it names no cap: enough for nearly every
 * answer, so that one request does not take a key's whole budget while others wait.
 */
const NON_STREAMING_DEFAULT_OUTPUT = 16_384;
/**
 * Bodies larger than this are held by their bytes (or the model's context window, when smaller)
 * only. The tokenizer runs on the broker's one thread: ordinary text costs it ~0.1 s per MiB,
 * text made to be slow (unseen words, long runs of CJK) up to ~1 s per MiB, which every other
 * request would wait for.
 */
const PRECISE_MAX_BYTES = 2 * 1024 * 1024;
/** Room for the output cap Till may write into a body (`,"max_completion_tokens":123456`). */
const CAP_FIELD_BYTES = 64;

/** The field that caps a request's output, per format (the first one present wins). */
const MAX_OUTPUT_FIELDS: Partial<Record<UsageFormat, string[]>> = {
  'openai-chat': ['max_completion_tokens', 'max_tokens'],
  'openai-responses': ['max_output_tokens'],
  'openai-completions': ['max_tokens'],
  'anthropic-messages': ['max_tokens'],
  'cohere-chat': ['max_tokens'],
};
/** The smallest cap an upstream accepts, where it is more than 1 (Responses refuses `max_output_tokens` below 16). */
const MIN_CAP: Partial<Record<UsageFormat, number>> = { 'openai-responses': 16 };
/** Input tokens of the smallest prompt ("hi" in one user message, as OpenAI and Anthropic count it). */
const SMALLEST_PROMPT_TOKENS = 8;

/**
 * What the smallest request to `model` would hold: a one-word prompt and the smallest output cap,
 * its input counted as {@link planHold} would count it (its tokens where the tokenizer is public,
 * else the bytes of the smallest body), at the model's plain rates.
 */
function smallestHold(model: string | undefined, minCap: number, price: ModelPrice | undefined): Amounts {
  // The length of {"model":"<model>","messages":[{"role":"user","content":"hi"}]}.
  const body = (model?.length ?? 0) + 56;
  const input = encodingOf(model) ? SMALLEST_PROMPT_TOKENS : body + CAP_FIELD_BYTES;
  const amounts: Amounts = { tokens: input + minCap };
  if (price) amounts.spend = Math.ceil(input * price.input + minCap * price.output + (price.requestFee ?? 0) * MICROS);
  return amounts;
}

/**
 * A server-side tool a hold covers: per call, its fee and the input its results add at most
 * (prices.json). A tool whose calls the request does not limit is followed on a stream: one call
 * is held ahead of those the stream has started (streamHold.ts).
 */
export interface HeldTool {
  type: string;
  /** The name its calls are started under in a stream (`web_search` for every web search tool). */
  calls: string;
  feeMicros: number;
  resultTokens: number;
  /** Calls held now. */
  held: number;
  /** The most calls it may make; undefined: not limited (followed). */
  maxCalls: number | undefined;
}

/** Formats whose streams show each server-side tool call as it starts (streamMeter.ts serverToolCall). */
const TOOL_CALLS_SHOWN: ReadonlySet<UsageFormat> = new Set(['openai-responses', 'anthropic-messages']);

/** What the broker knows about a request to plan its hold. */
export interface HoldRequest {
  provider: string;
  model: string | undefined;
  format: UsageFormat | undefined;
  /** The request's JSON body, parsed (changed in place when its output cap must change). */
  json: Json | undefined;
  /** Size of the request body in bytes. */
  bodyBytes: number;
  /** The client asked for a stream (by body or route). */
  stream: boolean;
  /**
   * Tokens of stored context the request continues, by response or conversation id, as Till saw
   * them reported (undefined: not seen). Default: none seen.
   */
  knownContext?: (id: string) => number | undefined;
  /** Tokens of context the upstream adds that the caller already knows (a WebSocket's conversation). */
  carriedContext?: number;
}

/** What a hold is made of, and how to reprice it as the request goes. */
export interface HoldPlan {
  /** What to hold now. */
  amounts: Amounts;
  /** Input tokens held, what bounds them, and their micro-dollars at the hold's rates. */
  input: { tokens: number; basis: string; micros: number };
  /** Output tokens: the most the request can produce (over all its choices), the part held now, and the slice a stream's hold grows by. */
  output: { ceiling: number; held: number; slice: number };
  /** Micro-dollars per output token at the hold's rate. */
  outputRate: number;
  /** Micro-dollars of fees held (request fees, and the server-side tool calls held). */
  feesMicros: number;
  /** Micro-dollars per input token at the hold's rate (what a server-side tool's results cost). */
  inputRate: number;
  /** The server-side tools the request offers, with the calls held for each. */
  tools: HeldTool[];
  stream: boolean;
  /** The model may generate output it does not stream, at up to `limits.tokensPerSecond`. */
  hiddenOutput: boolean;
  limits: ModelLimits;
  price: ModelPrice | undefined;
  /** Which meters the key limits (the others are not held). */
  meters: { tokens: boolean; spend: boolean };
  /** Input tokens estimated, for settling a cut request the upstream never reported. */
  inputEstimate: number;
  /** The body was changed (re-serialize it). */
  bodyChanged: boolean;
  /**
   * What the smallest request to this model would hold (see {@link smallestHold}): a key left
   * with less than this, and nothing in flight, can serve nothing more.
   */
  smallest?: Amounts;
}

function readMaxOutput(format: UsageFormat | undefined, json: Json | undefined): { value: number | undefined; field: string | undefined } {
  if (!json || !format) return { value: undefined, field: undefined };
  if (format === 'gemini') {
    const config = json.generationConfig as Json | undefined;
    const v = config?.maxOutputTokens;
    return { value: typeof v === 'number' ? v : undefined, field: 'generationConfig.maxOutputTokens' };
  }
  const fields = MAX_OUTPUT_FIELDS[format] ?? [];
  for (const f of fields) if (typeof json[f] === 'number') return { value: json[f], field: f };
  return { value: undefined, field: fields[0] };
}

function writeMaxOutput(format: UsageFormat, json: Json, field: string, value: number): void {
  if (format === 'gemini') {
    const config = (json.generationConfig ??= {}) as Json;
    config.maxOutputTokens = value;
    return;
  }
  json[field] = value;
  // Anthropic's thinking budget must stay below max_tokens: shrink it with the cap (it cannot go
  // below 1,024, so a smaller cap turns thinking off).
  const thinking = format === 'anthropic-messages' ? (json.thinking as Json | undefined) : undefined;
  if (thinking?.type === 'enabled' && typeof thinking.budget_tokens === 'number' && thinking.budget_tokens >= value) {
    if (value > 1024) thinking.budget_tokens = value - 1;
    else delete json.thinking;
  }
}

/** Micro-dollars per input and output token at the highest rates the request can be billed at. */
function holdRates(price: ModelPrice, facts: RequestFacts, provider: string, inputTokens: number): { input: number; output: number } {
  const rates = ratesFor(price, inputTokens, facts.serviceTier);
  let input = rates.input;
  // A cache write bills input above the plain rate: Anthropic when the request marks content
  // for caching (1-hour marks at the 1-hour rate), others wherever the model has a write rate.
  const writes = provider === 'anthropic' ? facts.cache !== 'none' : rates.cacheWrite !== undefined;
  if (writes)
    input = Math.max(input, facts.cache === '1h' ? (rates.cacheWrite1h ?? rates.cacheWrite ?? input) : (rates.cacheWrite ?? input));
  return { input, output: rates.output };
}

/** A key's remaining amounts, with the figures a refusal gives. */
interface Left {
  tokens: number;
  spend: number;
}

/** The input bound: a number of tokens and what bounds it. */
interface InputBound {
  tokens: number;
  basis: string;
}

/** The stored context a request continues: its tokens, or why Till cannot know them. */
function storedContext(facts: RequestFacts, req: HoldRequest): { tokens: number; unseen?: string; seen?: string } {
  let tokens = req.carriedContext ?? 0;
  let seen: string | undefined;
  for (const [kind, id] of [
    ['previous_response_id', facts.previousResponse],
    ['conversation', facts.conversation],
  ] as const) {
    if (id === undefined) continue;
    const known = req.knownContext?.(id);
    if (known === undefined) return { tokens, unseen: `the stored conversation of ${kind} ${id}, which Till has not seen` };
    tokens += known;
    seen = `${known.toLocaleString('en-US')} tokens of the conversation ${id} continues`;
  }
  return { tokens, ...(seen ? { seen } : {}) };
}

/** The input server-side tools' results add: tokens for the calls held, or what Till cannot bound. */
interface ToolInput {
  tokens: number;
  unseen?: string;
}

function toolInput(tools: HeldTool[], unbounded: string | undefined): ToolInput {
  if (unbounded !== undefined) return { tokens: 0, unseen: unbounded };
  let tokens = 0;
  for (const t of tools) tokens += t.held * t.resultTokens;
  return { tokens };
}

/**
 * The input bound from the body's bytes (precise: false) or its exact token count (precise: true,
 * public tokenizers only), plus the results of the server-side tool calls held.
 */
function inputBound(
  req: HoldRequest,
  facts: RequestFacts,
  limits: ModelLimits,
  tools: ToolInput,
  precise: boolean,
): InputBound | undefined {
  const context = storedContext(facts, req);
  const window = limits.context;
  const unseen = facts.unseen[0] ?? context.unseen ?? tools.unseen;
  if (unseen !== undefined)
    return {
      tokens: window,
      basis: `the context window of ${req.model ?? 'the model'} (${window.toLocaleString('en-US')} tokens): the request brings in ${unseen}`,
    };
  let text: number;
  let images = 0;
  let basis: string;
  if (precise) {
    const encoding = encodingOf(req.model);
    const counted = encoding && req.json && req.format ? requestTokens(req.format, req.json, counter(encoding)) : undefined;
    if (counted === undefined) return undefined;
    text = counted;
    for (const image of facts.images) images += imageTokens(req.provider, req.model, image);
    basis = `its tokens, counted with ${encoding}`;
  } else {
    text = req.bodyBytes + CAP_FIELD_BYTES;
    const most = maxImageTokens(req.provider, req.model);
    images = facts.images.length * most;
    basis = 'its body (one token per byte at most)';
  }
  if (facts.images.length > 0) basis += ` and ${facts.images.length} image${facts.images.length === 1 ? '' : 's'}`;
  if (context.seen) basis += `, plus ${context.seen}`;
  if (tools.tokens > 0) basis += `, plus up to ${tools.tokens.toLocaleString('en-US')} tokens of server-side tool results`;
  const tokens = text + images + context.tokens + tools.tokens;
  if (tokens >= window)
    return { tokens: window, basis: `the context window of ${req.model ?? 'the model'} (${window.toLocaleString('en-US')} tokens)` };
  return { tokens, basis };
}

/**
 * The most input tokens a request brings in: its body (counted with the model's public tokenizer
 * when `precise`, else one token per byte) plus the stored conversation it continues; undefined
 * when it brings in what Till cannot bound. What a prewarm (`generate: false`), which bills
 * nothing, leaves to the response that continues it.
 */
export function inputTokensAtMost(req: HoldRequest, prices: PriceTable, precise: boolean): number | undefined {
  if (!req.format) return undefined;
  const facts = readRequest(req.format, req.json);
  if (facts.unseen.length > 0 || storedContext(facts, req).unseen !== undefined) return undefined;
  const limits = prices.limits(req.provider, req.model);
  const noTools = toolInput([], undefined);
  const counted = precise && req.bodyBytes <= PRECISE_MAX_BYTES ? inputBound(req, facts, limits, noTools, true) : undefined;
  return (counted ?? inputBound(req, facts, limits, noTools, false)!).tokens;
}

/** The words of a budget refusal: used, held and left, then what this request needs and why. */
function budgetRefusal(meter: 'tokens' | 'spend', limit: number, used: number, held: number, needs: number, why: string): Denial {
  return limitRefusal(meter, { limit, used, held }, `this request needs at least ${formatAmount(meter, needs)} (${why})`, needs);
}

/**
 * Plans the hold of a billable request under the key's policy and what is left of it
 * (`remaining`; `held` are the amounts held by other requests now, for the refusal's words).
 * Returns the plan, or a denial that says why (an unpriced model or tool fee on a spend-limited
 * key, a response Till cannot meter, or too little left).
 */
export function planHold(req: HoldRequest, policy: Policy, remaining: Amounts, held: Amounts, prices: PriceTable): HoldPlan | Denial {
  const meters = { tokens: policy.maxTokens !== undefined, spend: policy.maxSpendUsd !== undefined };
  const limits = prices.limits(req.provider, req.model);
  const base: HoldPlan = {
    amounts: { activations: 1 },
    input: { tokens: 0, basis: '', micros: 0 },
    output: { ceiling: 0, held: 0, slice: OUTPUT_SLICE },
    outputRate: 0,
    feesMicros: 0,
    inputRate: 0,
    tools: [],
    stream: req.stream,
    hiddenOutput: false,
    limits,
    price: undefined,
    meters,
    // The conversation a WebSocket turn carries is input too (it is not in the turn's bytes).
    inputEstimate: estimateTokens(req.bodyBytes) + (req.carriedContext ?? 0),
    bodyChanged: false,
  };
  if (!meters.tokens && !meters.spend) return base;
  const kind = meters.spend ? 'spend' : 'token';
  if (!req.format)
    return { status: 403, code: 'out_of_scope', message: `this till key has a ${kind} limit and Till cannot meter this kind of request` };
  const model = req.model;
  const price = model ? prices.price(req.provider, model) : undefined;
  if (meters.spend && !price) {
    return {
      status: 403,
      code: 'out_of_scope',
      message: `model ${model ?? '(none)'} has no price in Till's table, so a spend-limited till key refuses it rather than guess; add its price to prices.json in the data folder`,
    };
  }
  const facts = readRequest(req.format, req.json);
  if (facts.background)
    return {
      status: 403,
      code: 'out_of_scope',
      message: `this till key has a ${kind} limit and a background response is billed after Till has answered, so Till cannot meter it: send it without "background": true`,
    };

  // Server-side tools: a fee per call, and results billed as input. Calls the request limits are
  // held in full; on a stream that shows each call as it starts, unlimited calls are followed
  // (one held ahead); elsewhere a fee-charging tool with no limit cannot be bounded.
  const followsCalls = req.stream && TOOL_CALLS_SHOWN.has(req.format);
  const tools: HeldTool[] = [];
  let unbounded: string | undefined;
  for (const tool of facts.serverTools) {
    const fee = prices.toolFee(req.provider, tool.type);
    if (meters.spend && fee === undefined)
      return {
        status: 403,
        code: 'out_of_scope',
        message: `the request uses the server-side tool ${tool.type}, whose fee Till does not know, so a spend-limited till key refuses it`,
      };
    if (meters.spend && fee! > 0 && tool.maxCalls === undefined && !followsCalls) {
      const knob = req.provider === 'anthropic' ? 'max_uses on the tool' : 'max_tool_calls';
      return {
        status: 403,
        code: 'out_of_scope',
        message: `the request uses the server-side tool ${tool.type}, billed $${fee} per call, with no limit on its calls: set ${knob} (or stream the request) so that a spend-limited till key can bound its fees`,
      };
    }
    const resultTokens = prices.toolResults(req.provider, tool.type);
    if (resultTokens === undefined || (tool.maxCalls === undefined && !followsCalls)) unbounded ??= `${tool.type} results`;
    const held: HeldTool = {
      type: tool.type,
      calls: tool.type.startsWith('web_search') ? 'web_search' : tool.type,
      feeMicros: Math.ceil((fee ?? 0) * MICROS),
      resultTokens: resultTokens ?? 0,
      held: 0,
      maxCalls: tool.maxCalls,
    };
    // Tools whose calls start under one name (two web search tools) are one: each call at the dearer's price.
    const same = tools.find((t) => t.calls === held.calls);
    if (same) {
      same.feeMicros = Math.max(same.feeMicros, held.feeMicros);
      same.resultTokens = Math.max(same.resultTokens, held.resultTokens);
      same.maxCalls = same.maxCalls === undefined || held.maxCalls === undefined ? undefined : same.maxCalls + held.maxCalls;
    } else tools.push(held);
  }
  for (const t of tools) t.held = t.maxCalls ?? (followsCalls ? 1 : 0);
  const feesMicros = Math.ceil((price?.requestFee ?? 0) * MICROS) + tools.reduce((sum, t) => sum + t.held * t.feeMicros, 0);
  const fromTools = toolInput(tools, unbounded);
  const left: Left = { tokens: remaining.tokens ?? Infinity, spend: remaining.spend ?? Infinity };
  const hiddenOutput = facts.hiddenOutput ?? (req.provider === 'anthropic' ? false : limits.hiddenOutput);
  const { value: clientCap, field } = readMaxOutput(req.format, req.json);
  const embeddings = req.format === 'openai-embeddings';
  const n = facts.n;

  /** The rates, input cost and output that fits per choice for one input bound (below the smallest cap: nothing fits). */
  const attempt = (bound: InputBound) => {
    const rates = price ? holdRates(price, facts, req.provider, bound.tokens) : { input: 0, output: 0 };
    const inputMicros = Math.ceil(bound.tokens * rates.input);
    let fit = Infinity;
    if (meters.tokens) fit = Math.min(fit, left.tokens - bound.tokens);
    if (meters.spend && rates.output > 0) fit = Math.min(fit, Math.floor((left.spend - inputMicros - feesMicros) / rates.output));
    if (meters.spend && left.spend - inputMicros - feesMicros < 0) fit = -1;
    return { bound, rates, inputMicros, perChoice: fit === Infinity ? Infinity : Math.floor(fit / n) };
  };
  const want = embeddings ? 0 : (clientCap ?? (req.stream ? limits.maxOutput : Math.min(limits.maxOutput, NON_STREAMING_DEFAULT_OUTPUT)));
  const minCap = embeddings ? 0 : (MIN_CAP[req.format] ?? 1);
  const coarse = inputBound(req, facts, limits, fromTools, false)!;
  let a = attempt(coarse);
  // Tokenize only when the coarse bound would refuse the request or lower its output (the
  // common case costs nothing), and only bodies up to PRECISE_MAX_BYTES.
  if (a.perChoice < want && req.bodyBytes <= PRECISE_MAX_BYTES) {
    const precise = inputBound(req, facts, limits, fromTools, true);
    if (precise && precise.tokens < coarse.tokens) a = attempt(precise);
  }
  if (a.perChoice < minCap) {
    const meter = meters.tokens && left.tokens - a.bound.tokens < minCap * n ? 'tokens' : 'spend';
    const limit = meter === 'tokens' ? policy.maxTokens! : Math.round(policy.maxSpendUsd! * MICROS);
    const needs = meter === 'tokens' ? a.bound.tokens + minCap * n : a.inputMicros + feesMicros + Math.ceil(minCap * n * a.rates.output);
    const used = limit - (meter === 'tokens' ? left.tokens : left.spend) - (held[meter] ?? 0);
    return budgetRefusal(
      meter,
      limit,
      used,
      held[meter] ?? 0,
      needs,
      `input up to ${a.bound.tokens.toLocaleString('en-US')} tokens, bound by ${a.bound.basis}`,
    );
  }

  let ceilingPerChoice = clientCap ?? limits.maxOutput;
  let bodyChanged = false;
  if (!embeddings && req.json && field) {
    if (want > a.perChoice) {
      // Lowered to what the key can cover now: a ceiling for this request alone.
      ceilingPerChoice = a.perChoice;
      writeMaxOutput(req.format, req.json, field, ceilingPerChoice);
      bodyChanged = true;
    } else if (clientCap === undefined && !req.stream) {
      ceilingPerChoice = want;
      writeMaxOutput(req.format, req.json, field, want);
      bodyChanged = true;
    }
  } else if (want > a.perChoice) {
    // No field to cap (Gemini Live turns, or a format without one): hold what fits; a stream is
    // cut when its hold cannot grow.
    ceilingPerChoice = a.perChoice;
  }
  const ceiling = embeddings ? 0 : ceilingPerChoice * n;
  const fits = a.perChoice === Infinity ? Infinity : a.perChoice * n;
  const slice = Math.min(OUTPUT_SLICE, Math.max(MIN_SLICE, Math.floor(fits / 32)));
  const heldOutput = req.stream ? Math.min(ceiling, slice) : ceiling;
  // A stream held in slices is settled by counting its text if it is cut (cutUsage). Loading the
  // tokenizer takes this one thread some 50 ms (more on a busy machine): done at the first cut,
  // it would leave every other stream unread and unchecked that long, generating past its hold.
  // Loaded now, before this stream is forwarded, no followed stream is in flight while it loads.
  if (heldOutput < ceiling) counter(encodingOf(req.model) ?? 'o200k_base');
  // Filled in, not spread: this runs for every request on a limited key.
  const plan = base;
  plan.input = { tokens: a.bound.tokens, basis: a.bound.basis, micros: a.inputMicros };
  plan.output = { ceiling, held: heldOutput, slice };
  plan.outputRate = a.rates.output;
  plan.feesMicros = feesMicros;
  plan.inputRate = a.rates.input;
  plan.tools = tools;
  plan.hiddenOutput = hiddenOutput;
  plan.price = price;
  plan.bodyChanged = bodyChanged;
  plan.smallest = smallestHold(model, minCap, price);
  plan.amounts = holdAmounts(plan, a.bound.tokens, a.inputMicros, heldOutput);
  return plan;
}

/** What a hold's amounts are priced from (a {@link HoldPlan}, or a stream's hold as it goes). */
export type HoldPricing = Pick<HoldPlan, 'meters' | 'outputRate' | 'feesMicros'>;

/** The amounts of a hold of `input` tokens (costing `inputMicros`) and `output` tokens, on the meters the key limits. */
export function holdAmounts(pricing: HoldPricing, input: number, inputMicros: number, output: number): Amounts {
  const amounts: Amounts = { activations: 1 };
  if (pricing.meters.tokens) amounts.tokens = input + output;
  if (pricing.meters.spend) amounts.spend = Math.ceil(inputMicros + output * pricing.outputRate + pricing.feesMicros);
  return amounts;
}

/**
 * Output tokens an upstream goes on generating (and billing) after a request is cut, as Till
 * counts them: about one round trip (under 100 ms) at a fast model's 300 to 600 tokens a second
 * (see streamHold.ts, which holds a little more than this, {@link CUT_MARGIN_TOKENS}).
 */
export const AFTER_CUT_TOKENS = 50;
/** What a stream's hold keeps beyond what it has produced, so that a cut never bills past it (streamHold.ts). */
export const CUT_MARGIN_TOKENS = 64;

/**
 * The usage to settle a request cut before it ended: what it produced (reported so far, else the
 * tokens of the text it streamed, counted with the model's tokenizer when public, else o200k_base,
 * the closest public count) plus {@link AFTER_CUT_TOKENS} the upstream may generate before it
 * notices, within its ceiling; a request cut with no stream to follow (a JSON answer not yet
 * complete) at its whole ceiling, which the upstream may have produced. Input: reported, else
 * counted the same way for OpenAI-shaped bodies, else `inputEstimate`. Marked estimated.
 */
export function cutUsage(
  req: Pick<HoldRequest, 'model' | 'format' | 'json' | 'bodyBytes'>,
  plan: HoldPlan,
  reported: Usage | undefined,
  produced: GeneratedText | undefined,
  reachedUpstream: boolean,
): Usage {
  const ceiling = plan.output.ceiling || Infinity;
  const count = counter(encodingOf(req.model) ?? 'o200k_base');
  let output = reported?.outputTokens ?? 0;
  if (produced) {
    const { text, share } = produced.sample();
    output = Math.max(output, Math.ceil(count(text) / share));
  } else if (reachedUpstream) {
    output = plan.output.ceiling;
  }
  if (reachedUpstream) output = Math.min(ceiling, output + AFTER_CUT_TOKENS);
  let input = reported?.inputTokens ?? 0;
  if (input <= 0) {
    // The closest count there is: the model's own tokenizer, or o200k_base for an OpenAI-shaped
    // body; the same size cap as planning (the broker's one thread would wait for a huge body).
    const counted = req.json && req.format && req.bodyBytes <= PRECISE_MAX_BYTES ? requestTokens(req.format, req.json, count) : undefined;
    input = counted ?? plan.inputEstimate;
  }
  // Server-side tool calls it started that no usage reported yet: their fees, and their results at the most they add.
  const toolCalls = { ...reported?.toolCalls };
  for (const t of plan.tools) {
    const started = produced?.toolCalls[t.calls] ?? 0;
    const unreported = started - (toolCalls[t.calls] ?? 0);
    if (unreported <= 0) continue;
    toolCalls[t.calls] = started;
    input += unreported * t.resultTokens;
  }
  const cut: Usage = {
    cachedInputTokens: 0,
    cacheWriteTokens: 0,
    reasoningTokens: 0,
    ...reported,
    inputTokens: input,
    outputTokens: output,
    estimated: true,
  };
  if (Object.keys(toolCalls).length > 0) cut.toolCalls = toolCalls;
  return cut;
}

/** USD of the server-side tool calls a usage reports, at the table's fees (unknown tools: nothing). */
function toolFees(provider: string, usage: Usage, prices: PriceTable): number {
  let fees = 0;
  for (const [tool, calls] of Object.entries(usage.toolCalls ?? {})) fees += calls * (prices.toolFee(provider, tool) ?? 0);
  return fees;
}

/**
 * What a finished request settles to, from the reported usage or, failing that, an estimate:
 * the amounts for its key's meters, and the same as ledger details and as an event's usage.
 * `spendKnown` is false for a model without a price: its tokens count, its dollars are unknown.
 */
export function settlement(
  provider: string,
  model: string | undefined,
  usage: Usage | undefined,
  fallback: { inputEstimate: number; outputChars: number },
  prices: PriceTable,
): { amounts: Amounts; tokens: TokenCounts; estimated: boolean; spendKnown: boolean; details: SettleDetails; usage: RequestUsage } {
  const estimated = !usage || usage.estimated === true;
  const u: Usage = usage ?? {
    inputTokens: fallback.inputEstimate,
    outputTokens: estimateTokens(fallback.outputChars),
    cachedInputTokens: 0,
    cacheWriteTokens: 0,
    reasoningTokens: 0,
    estimated: true,
  };
  const tokens: TokenCounts = { input: u.inputTokens, output: u.outputTokens, cached: u.cachedInputTokens, reasoning: u.reasoningTokens };
  const amounts: Amounts = { activations: 1, tokens: u.inputTokens + u.outputTokens };
  let usd = u.reportedCostUsd;
  const price = usd === undefined && model ? prices.price(provider, model) : undefined;
  if (price) {
    usd = costAt(price, {
      inputTokens: u.inputTokens,
      outputTokens: u.outputTokens,
      cachedInputTokens: u.cachedInputTokens,
      cacheWriteTokens: u.cacheWriteTokens,
      cacheWrite1hTokens: u.cacheWrite1hTokens,
      serviceTier: u.serviceTier,
      feesUsd: toolFees(provider, u, prices),
    });
  }
  if (usd !== undefined) amounts.spend = Math.ceil(usd * MICROS);
  const spendKnown = usd !== undefined;
  return {
    amounts,
    tokens,
    estimated,
    spendKnown,
    // What the ledger records beside the meters, and what events report.
    details: { tokens, estimated, ...(spendKnown ? {} : { unpriced: true }) },
    usage: { tokens, ...(spendKnown ? { spend: amounts.spend } : {}), estimated },
  };
}
