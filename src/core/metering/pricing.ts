/**
 * Model prices, so the broker can turn reported token usage into dollars for spend budgets.
 * The built-in table is prices.json (dated, per provider, USD per 1M tokens); a user's
 * prices.json in the data folder replaces entries model by model.
 */
import { isRecord } from '../json';
import { readPrivateFile } from '../files/privateFolder';
import { builtInProvider, CATALOGUE } from '../providers/providers';
import builtIn from './prices.json';

/** One set of rates, in USD per 1M tokens. */
export interface Rates {
  /** Plain (uncached) input tokens. */
  input: number;
  /** Output tokens, reasoning tokens included. */
  output: number;
  /** Input tokens read from the provider's prompt cache. Default: `input`. */
  cachedInput?: number;
  /** Input tokens written to the prompt cache (Anthropic cache_creation, 5-minute TTL). Default: `input`. */
  cacheWrite?: number;
  /** Input tokens written to a 1-hour cache (Anthropic `ttl: "1h"`). Default: `cacheWrite`. */
  cacheWrite1h?: number;
}

/** What a model costs: its standard rates, and what it bills beyond them. */
export interface ModelPrice extends Rates {
  /** The rates of the whole request when its input is above `above` tokens (long-context tiers). */
  longContext?: Rates & { above: number };
  /** The rates under `service_tier: "priority"`. */
  priority?: Rates;
  /** USD per request on top of tokens (Perplexity's request fees). */
  requestFee?: number;
}

/** What a model can take and give, for bounds where the request does not show its cost. */
export interface ModelLimits {
  /** Most input tokens one request can be billed: the context window. */
  context: number;
  /** Most output tokens one request can produce. */
  maxOutput: number;
  /** True when the model may generate output it does not stream (hidden reasoning). */
  hiddenOutput: boolean;
  /** An upper bound of its generation speed, in tokens per second. */
  tokensPerSecond: number;
}

/** Prices by provider id, then model id: the shape of prices.json's `models`. */
export type PriceOverrides = Record<string, Record<string, ModelPrice>>;

/**
 * Token counts of one request, in the metering module's convention: `inputTokens` is the
 * whole input, cached and cache-written parts included.
 */
export interface TokenUsage {
  inputTokens: number;
  outputTokens: number;
  /** The part of `inputTokens` read from the cache. Default: 0. */
  cachedInputTokens?: number;
  /** The part of `inputTokens` written to the cache. Default: 0. */
  cacheWriteTokens?: number;
  /** The part of `cacheWriteTokens` written to a 1-hour cache. Default: 0. */
  cacheWrite1hTokens?: number;
  /** The service tier the upstream says it served the request in (`priority` bills more). */
  serviceTier?: string;
  /** USD of fees on top of tokens (server-side tool calls, request fees). Default: 0. */
  feesUsd?: number;
}

/** The table a provider bills by: its own, or the one it shares (providers.ts `pricing.table`). */
function tableOf(provider: string): string {
  return builtInProvider(provider)?.pricing?.table ?? provider;
}

/** An aggregator whose `vendor/model` ids fall back to the vendor's own table when they have no row. */
function resellsVendors(provider: string): boolean {
  return builtInProvider(provider)?.pricing?.resellsVendors === true;
}

// The providers by the vendor names aggregators put in front of their models (`google/…`).
const VENDORS = new Map(CATALOGUE.flatMap((p) => (p.pricing?.vendorNames ?? []).map((name) => [name, p.id] as const)));

const RATE_FIELDS = ['input', 'output', 'cachedInput', 'cacheWrite', 'cacheWrite1h'] as const;
const OPTIONAL_RATES = new Set(['cachedInput', 'cacheWrite', 'cacheWrite1h']);
const PER_MILLION = 1_000_000;

function checkRates(value: unknown, where: string, extra: readonly string[]): Rates & Record<string, unknown> {
  if (!isRecord(value)) throw new Error(`${where} must be an object like {"input": 1.25, "output": 10}`);
  for (const key of Object.keys(value)) {
    // `notes` is allowed so rows can be copied from the built-in table as they are.
    if (key !== 'notes' && !(RATE_FIELDS as readonly string[]).includes(key) && !extra.includes(key)) {
      throw new Error(`${where} has an unknown field "${key}" (expected ${[...RATE_FIELDS, ...extra].join(', ')})`);
    }
  }
  const rates: Record<string, number> = {};
  for (const field of RATE_FIELDS) {
    const n = value[field];
    if (n === undefined && OPTIONAL_RATES.has(field)) continue;
    if (typeof n !== 'number' || !Number.isFinite(n) || n < 0) {
      throw new Error(`${where}.${field} must be a number of at least 0 (USD per 1M tokens)`);
    }
    rates[field] = n;
  }
  return rates as unknown as Rates & Record<string, unknown>;
}

function checkPrice(value: unknown, where: string): ModelPrice {
  const price: ModelPrice = checkRates(value, where, ['longContext', 'priority', 'requestFee']);
  const v = value as Record<string, unknown>;
  if (v.longContext !== undefined) {
    const above = isRecord(v.longContext) ? v.longContext.above : undefined;
    if (typeof above !== 'number' || !Number.isSafeInteger(above) || above < 1)
      throw new Error(`${where}.longContext.above must be a whole number of input tokens`);
    price.longContext = { ...checkRates(v.longContext, `${where}.longContext`, ['above']), above };
  }
  if (v.priority !== undefined) price.priority = checkRates(v.priority, `${where}.priority`, []);
  if (v.requestFee !== undefined) {
    if (typeof v.requestFee !== 'number' || !Number.isFinite(v.requestFee) || v.requestFee < 0)
      throw new Error(`${where}.requestFee must be a number of at least 0 (USD per request)`);
    price.requestFee = v.requestFee;
  }
  return price;
}

function checkModels(value: unknown, where: string): PriceOverrides {
  if (!isRecord(value)) throw new Error(`${where} must be an object of provider → model → price`);
  const out: PriceOverrides = {};
  for (const [provider, models] of Object.entries(value)) {
    if (!isRecord(models)) throw new Error(`${where}.${provider} must be an object of model → price`);
    const table: Record<string, ModelPrice> = {};
    for (const [model, price] of Object.entries(models)) table[model] = checkPrice(price, `${where}.${provider}.${model}`);
    out[provider] = table;
  }
  return out;
}

function key(s: string): string {
  return s.trim().toLowerCase();
}

/** Model ids worth trying for one requested id, most specific first. */
function candidates(provider: string, model: string): string[] {
  // Gemini puts `models/` in paths; Claude Code appends a context marker such as `[1m]`.
  const base = model.replace(/^models\//, '').replace(/\[[^\]]*\]$/, '');
  const out = [base];
  const undated = base.replace(/[-@](\d{4}-\d{2}-\d{2}|\d{8})$/, '');
  if (undated !== base) out.push(undated);
  for (const id of [...out]) if (id.endsWith('-latest')) out.push(id.slice(0, -'-latest'.length));
  const others = builtInProvider(provider)?.pricing?.modelIds;
  if (others) for (const id of [...out]) out.push(...others(id));
  return out;
}

type LimitsRow = Partial<ModelLimits> & { models?: string };

interface PriceFile {
  asOf: string;
  models: unknown;
  aliases?: Record<string, Record<string, string>>;
  limits?: { providers: Record<string, LimitsRow>; models: Record<string, LimitsRow[]> };
  toolFees?: Record<string, Record<string, number> | string>;
  toolResults?: Record<string, Record<string, number> | string>;
}

/** `*` in a limits row matches any run of characters. */
function globMatch(pattern: string, value: string): boolean {
  if (!pattern.includes('*')) return pattern === value;
  return new RegExp(
    `^${pattern
      .split('*')
      .map((p) => p.replace(/[.+?^${}()|[\]\\]/g, '\\$&'))
      .join('.*')}$`,
  ).test(value);
}

/**
 * The price table in force: the built-in table, with user overrides layered on top.
 * Lookups are case-insensitive and resolve dated snapshots and aliases.
 */
export class PriceTable {
  /** Resolved prices by provider and model as asked (undefined: no price). */
  private readonly memo = new Map<string, ModelPrice | undefined>();
  /** The date the built-in prices were checked (YYYY-MM-DD). */
  readonly asOf: string;
  private readonly tables = new Map<string, Map<string, ModelPrice>>();
  private readonly aliases = new Map<string, Map<string, string>>();
  private readonly limitRows: PriceFile['limits'];
  private readonly fees: Record<string, Record<string, number>> = {};
  private readonly results: Record<string, Record<string, number>> = {};
  private readonly limitsMemo = new Map<string, ModelLimits>();

  /**
   * @param overrides user prices, same shape as prices.json's `models` (provider → model →
   *   price); a user entry replaces the built-in one for that model. Default: `{}`.
   */
  constructor(overrides: PriceOverrides = {}) {
    const file = builtIn as PriceFile;
    this.asOf = file.asOf;
    this.setOverrides(overrides);
    for (const [provider, aliases] of Object.entries(file.aliases ?? {})) {
      this.aliases.set(key(provider), new Map(Object.entries(aliases).map(([from, to]) => [key(from), key(to)])));
    }
    this.limitRows = file.limits;
    for (const [provider, fees] of Object.entries(file.toolFees ?? {})) if (typeof fees === 'object') this.fees[provider] = fees;
    for (const [provider, tokens] of Object.entries(file.toolResults ?? {}))
      if (typeof tokens === 'object') this.results[provider] = tokens;
  }

  /**
   * What a model can take and give (context window, output limit, hidden output, speed): the
   * first matching row of the model's provider (OpenRouter's `vendor/model` ids also by the
   * vendor's rows), then the provider's defaults, then the table's. Always answers: an unknown
   * model gets the largest values, the safe side for a bound.
   */
  limits(provider: string, model: string | undefined): ModelLimits {
    const memo = `${provider}\u0000${model ?? ''}`;
    const hit = this.limitsMemo.get(memo);
    if (hit) return hit;
    const rows = this.limitRows;
    const p = key(provider);
    const base = tableOf(p);
    const m = model === undefined ? '' : key(model).replace(/^models\//, '');
    const slash = m.indexOf('/');
    const vendor = resellsVendors(p) && slash > 0 ? VENDORS.get(m.slice(0, slash)) : undefined;
    const found: Partial<ModelLimits> = {};
    const take = (row: LimitsRow | undefined) => {
      if (!row) return;
      for (const field of ['context', 'maxOutput', 'hiddenOutput', 'tokensPerSecond'] as const)
        if (found[field] === undefined && row[field] !== undefined) (found as Record<string, unknown>)[field] = row[field];
    };
    take(rows?.models[base]?.find((r) => r.models !== undefined && globMatch(r.models, m)));
    if (vendor) take(rows?.models[vendor]?.find((r) => r.models !== undefined && globMatch(r.models, m.slice(slash + 1))));
    take(rows?.providers[base]);
    take(rows?.providers['*']);
    const limits: ModelLimits = {
      context: found.context ?? 2_000_000,
      maxOutput: found.maxOutput ?? 131_072,
      hiddenOutput: found.hiddenOutput ?? true,
      tokensPerSecond: found.tokensPerSecond ?? 5000,
    };
    if (this.limitsMemo.size >= 10_000) this.limitsMemo.clear();
    this.limitsMemo.set(memo, limits);
    return limits;
  }

  /** Input tokens one call of a provider's server-side tool adds at most (its results), or undefined when Till cannot bound them. */
  toolResults(provider: string, tool: string): number | undefined {
    return this.results[tableOf(provider)]?.[tool];
  }

  /** USD per call of a provider's server-side tool, or undefined when Till does not know its fee. */
  toolFee(provider: string, tool: string): number | undefined {
    return this.fees[tableOf(provider)]?.[tool];
  }

  /**
   * Replaces the user's prices (a settings change applied to a running broker): lookups from
   * now on use them; a request already settled keeps what it was charged. Throws, changing
   * nothing, when `overrides` is malformed.
   */
  setOverrides(overrides: PriceOverrides): void {
    const checked = checkModels(overrides, 'price overrides');
    this.tables.clear();
    this.memo.clear();
    this.layer(checkModels((builtIn as PriceFile).models, 'prices.json models'));
    this.layer(checked);
  }

  private layer(prices: PriceOverrides): void {
    for (const [provider, models] of Object.entries(prices)) {
      let table = this.tables.get(key(provider));
      if (!table) this.tables.set(key(provider), (table = new Map<string, ModelPrice>()));
      for (const [model, price] of Object.entries(models)) table.set(key(model), { ...price });
    }
  }

  /**
   * The price of a model for a provider, or `undefined` when unknown. Resolves dated snapshots
   * (`gpt-4o-2024-08-06` → `gpt-4o`, `claude-sonnet-4-5-20250929` → `claude-sonnet-4-5`),
   * `-latest` and listed aliases, `models/` prefixes (`models/gemini-2.5-pro`), Fireworks'
   * `accounts/fireworks/models/` prefix, and case. `azure-openai` uses OpenAI's table (after its
   * own overrides); unknown OpenRouter and Perplexity `vendor/model` ids fall back to the vendor.
   */
  price(provider: string, model: string): ModelPrice | undefined {
    // Resolving aliases and snapshots takes a few string passes: every request asks, so remember.
    const memo = `${provider}\u0000${model}`;
    if (this.memo.has(memo)) {
      const hit = this.memo.get(memo);
      return hit && { ...hit };
    }
    const m = key(model);
    const found = m ? this.resolve(key(provider), m, true) : undefined;
    if (this.memo.size >= 10_000) this.memo.clear();
    this.memo.set(memo, found);
    return found && { ...found };
  }

  private resolve(provider: string, model: string, viaVendor: boolean): ModelPrice | undefined {
    const shared = tableOf(provider);
    for (const name of shared !== provider ? [provider, shared] : [provider]) {
      const found = this.inTable(name, model);
      if (found) return found;
    }
    const slash = model.indexOf('/');
    if (viaVendor && resellsVendors(provider) && slash > 0) {
      const vendor = VENDORS.get(model.slice(0, slash));
      if (vendor && vendor !== provider) return this.resolve(vendor, model.slice(slash + 1), false);
    }
    return undefined;
  }

  private inTable(provider: string, model: string): ModelPrice | undefined {
    const table = this.tables.get(provider);
    if (!table) return undefined;
    const aliases = this.aliases.get(provider);
    for (const id of candidates(provider, model)) {
      const target = aliases?.get(id);
      const found = table.get(id) ?? (target === undefined ? undefined : table.get(target));
      if (found) return found;
    }
    return undefined;
  }

  /** Cost in USD of one request's usage (see {@link costAt}), or `undefined` when the model is unpriced. */
  cost(provider: string, model: string, usage: TokenUsage): number | undefined {
    const price = this.price(provider, model);
    return price && costAt(price, usage);
  }

  /** How many models the table knows, overrides included (aliases not counted). */
  size(): number {
    let n = 0;
    for (const table of this.tables.values()) n += table.size;
    return n;
  }
}

/**
 * Reads user price overrides from a JSON file in the data folder (`prices.json`, shaped like
 * the built-in one: `{"models": {"<provider>": {"<model>": {"input": n, "output": n}}}}`).
 * A missing file gives `{}`; an unreadable or malformed one throws an Error naming the file.
 */
export function readPriceOverrides(file: string): PriceOverrides {
  let text: string | undefined;
  try {
    text = readPrivateFile(file);
  } catch (err) {
    throw new Error(`${file} could not be read (${(err as Error).message})`, { cause: err });
  }
  if (text === undefined) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new Error(`${file} is not valid JSON (${(err as Error).message})`, { cause: err });
  }
  if (!isRecord(parsed) || !('models' in parsed)) {
    throw new Error(`${file} must look like {"models": {"<provider>": {"<model>": {"input": 1.25, "output": 10}}}} (USD per 1M tokens)`);
  }
  return checkModels(parsed.models, `${file}: models`);
}

/**
 * The rates a request is billed at: the long-context tier when its input is above the tier's
 * threshold (the whole request, as providers bill it), else the priority rates when it ran in
 * the priority tier, else the standard ones.
 */
export function ratesFor(price: ModelPrice, inputTokens: number, serviceTier: string | undefined): Rates {
  if (price.longContext && inputTokens > price.longContext.above) return price.longContext;
  if (serviceTier === 'priority' && price.priority) return price.priority;
  return price;
}

/**
 * Cost in USD of one request's usage at a price: plain input (`inputTokens` − cached −
 * cache-written, never below zero) × `input` + cached × `cachedInput` + cache-written ×
 * `cacheWrite` (the 1-hour part × `cacheWrite1h`) + output × `output`, at the rates of its tier
 * ({@link ratesFor}), plus its fees. Reasoning tokens are part of `outputTokens`. Negative or
 * non-finite counts count as 0.
 */
export function costAt(price: ModelPrice, usage: TokenUsage): number {
  const count = (n: number | undefined): number => (n !== undefined && Number.isFinite(n) && n > 0 ? n : 0);
  const input = count(usage.inputTokens);
  const rates = ratesFor(price, input, usage.serviceTier);
  const cached = count(usage.cachedInputTokens);
  const written = count(usage.cacheWriteTokens);
  const written1h = Math.min(written, count(usage.cacheWrite1hTokens));
  const plain = Math.max(0, input - cached - written);
  const writeRate = rates.cacheWrite ?? rates.input;
  const dollars =
    plain * rates.input +
    cached * (rates.cachedInput ?? rates.input) +
    (written - written1h) * writeRate +
    written1h * (rates.cacheWrite1h ?? writeRate) +
    count(usage.outputTokens) * rates.output;
  return dollars / PER_MILLION + count(usage.feesUsd) + (price.requestFee ?? 0);
}
