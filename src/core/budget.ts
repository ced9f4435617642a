/**
 * Budgets for one billable request: what to reserve before forwarding (the worst case) and
 * what to settle after (what the upstream reported, or an estimate when a stream was cut).
 *
 * The worst case is the estimated input plus the request's maximum output. A request that
 * names no maximum, or one larger than what is left, gets one that fits what is left, so a
 * key can never spend more than its limit even with every request in flight at once.
 */
import type { Denial } from './denial';
import type { RequestUsage } from './events';
import type { SettleDetails, TokenCounts } from './ledger';
import { estimateTokens, type Usage, type UsageFormat } from './metering';
import { MICROS, type Amounts, type Policy } from './policy';
import { costAt, type ModelPrice, type PriceTable } from './pricing';

/** The field that caps a request's output, per format (the first one present wins). */
const MAX_OUTPUT_FIELDS: Partial<Record<UsageFormat, string[]>> = {
  'openai-chat': ['max_completion_tokens', 'max_tokens'],
  'openai-responses': ['max_output_tokens'],
  'openai-completions': ['max_tokens'],
  'anthropic-messages': ['max_tokens'],
  'cohere-chat': ['max_tokens'],
};

/** What the broker needs to know about a request to plan its budget. */
export interface BudgetRequest {
  provider: string;
  model: string | undefined;
  format: UsageFormat | undefined;
  /** The request's JSON body, parsed (changed in place when its output cap must change). */
  json: Record<string, unknown> | undefined;
  /** Size of the request body in bytes, as it will be sent (after any rewriting). */
  bodyBytes: number;
}

/** The plan: what to reserve, and whether the body was changed (re-serialize it). */
export interface BudgetPlan {
  amounts: Amounts;
  /**
   * Input tokens held: one per byte of the body. Byte-level tokenizers never make more tokens
   * than bytes, and the JSON around the text outweighs the chat template's few tokens, so the
   * real count cannot exceed it. (A guess such as bytes / 4 could be beaten by unusual text,
   * and then a budget could be overrun.)
   */
  inputReserve: number;
  /** Input tokens estimated (bytes / 4), for billing a cut stream the upstream never reported. */
  inputEstimate: number;
  /** The output cap in force, if any. */
  maxOutput: number | undefined;
  bodyChanged: boolean;
}

function readMaxOutput(format: UsageFormat | undefined, json: Record<string, unknown> | undefined): { value: number | undefined; field: string | undefined } {
  if (!json || !format) return { value: undefined, field: undefined };
  if (format === 'gemini') {
    const config = json.generationConfig as Record<string, unknown> | undefined;
    const v = config?.maxOutputTokens;
    return { value: typeof v === 'number' ? v : undefined, field: 'generationConfig.maxOutputTokens' };
  }
  const fields = MAX_OUTPUT_FIELDS[format] ?? [];
  for (const f of fields) if (typeof json[f] === 'number') return { value: json[f] as number, field: f };
  return { value: undefined, field: fields[0] };
}

function writeMaxOutput(format: UsageFormat, json: Record<string, unknown>, field: string, value: number): void {
  if (format === 'gemini') {
    const config = (json.generationConfig ??= {}) as Record<string, unknown>;
    config.maxOutputTokens = value;
  } else {
    json[field] = value;
  }
}

/** Micro-dollars for a number of input and output tokens at a price (rounded up). */
function costMicros(price: ModelPrice, input: number, output: number): number {
  return Math.ceil(costAt(price, { inputTokens: input, outputTokens: output }) * MICROS);
}

/**
 * Plans a billable request under the key's policy and what is left of it. Returns the plan or
 * a denial (an unpriced model on a spend-limited key, or nothing left to spend).
 */
export function planBudget(req: BudgetRequest, policy: Policy, remaining: Amounts, prices: PriceTable): BudgetPlan | Denial {
  const amounts: Amounts = { activations: 1 };
  const tokenLimited = policy.maxTokens !== undefined;
  const spendLimited = policy.maxSpendUsd !== undefined;
  const inputEstimate = estimateTokens(req.bodyBytes);
  // Room for the output cap Till may add to the body.
  const inputReserve = req.bodyBytes + 64;
  const plan: BudgetPlan = { amounts, inputReserve, inputEstimate, maxOutput: undefined, bodyChanged: false };
  if (!tokenLimited && !spendLimited) return plan;
  if (!req.format) {
    // A billable route Till cannot meter (say, audio): it cannot be held to a token or spend limit.
    return { status: 403, code: 'out_of_scope', message: `this till key has a ${spendLimited ? 'spend' : 'token'} limit and Till cannot meter this kind of request` };
  }
  const model = req.model;
  const price = model ? prices.price(req.provider, model) : undefined;
  if (spendLimited && !price) {
    return { status: 403, code: 'out_of_scope', message: `model ${model ?? '(none)'} has no price in Till's table, so a spend-limited till key refuses it rather than guess; add its price to prices.json in the data folder` };
  }
  // The largest output that still fits what is left.
  let fit = Infinity;
  if (tokenLimited) fit = Math.min(fit, (remaining.tokens ?? 0) - inputReserve);
  if (spendLimited && price) {
    const inputCost = costMicros(price, inputReserve, 0);
    const perOutputToken = price.output / 1_000_000;
    fit = Math.min(fit, Math.floor(((remaining.spend ?? 0) - inputCost) / MICROS / perOutputToken));
  }
  // Nothing fits: plan the smallest request anyway, so the reservation is refused with the
  // used and reserved figures a person needs to see why.
  if (!(fit >= 1)) fit = 1;
  const { value, field } = readMaxOutput(req.format, req.json);
  let maxOutput = value;
  if ((maxOutput === undefined || maxOutput > fit) && req.json && field && req.format !== 'openai-embeddings') {
    maxOutput = fit;
    writeMaxOutput(req.format, req.json, field, fit);
    plan.bodyChanged = true;
  }
  // Embeddings produce no output tokens.
  const output = req.format === 'openai-embeddings' ? 0 : maxOutput ?? fit;
  plan.maxOutput = maxOutput;
  if (tokenLimited) amounts.tokens = inputReserve + output;
  if (spendLimited && price) amounts.spend = costMicros(price, inputReserve, output);
  return plan;
}

/**
 * What a finished request settles to, from the reported usage or, failing that, an estimate:
 * the amounts for its key's meters, and the same as ledger details and as an event's usage.
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
  if (usd === undefined && model) {
    usd = prices.cost(provider, model, { inputTokens: u.inputTokens, outputTokens: u.outputTokens, cachedInputTokens: u.cachedInputTokens, cacheWriteTokens: u.cacheWriteTokens });
  }
  if (usd !== undefined) amounts.spend = Math.ceil(usd * MICROS);
  const spendKnown = usd !== undefined;
  return {
    amounts,
    tokens,
    estimated,
    spendKnown,
    // What the ledger records beside the meters, and what events report.
    details: { tokens, estimated },
    usage: { tokens, ...(spendKnown ? { spend: amounts.spend } : {}), estimated },
  };
}
