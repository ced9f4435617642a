/**
 * Model prices, so the broker can turn reported token usage into dollars for spend budgets.
 * The built-in table is prices.json (dated, per provider, USD per 1M tokens); a user's
 * prices.json in the data folder replaces entries model by model.
 */
import { readPrivateFile } from './privateFolder';
import builtIn from './prices.json';

/** What a model costs, in USD per 1M tokens. */
export interface ModelPrice {
  /** Plain (uncached) input tokens. */
  input: number;
  /** Output tokens, reasoning tokens included. */
  output: number;
  /** Input tokens read from the provider's prompt cache. Default: `input`. */
  cachedInput?: number;
  /** Input tokens written to the prompt cache (Anthropic cache_creation). Default: `input`. */
  cacheWrite?: number;
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
}

// Providers without a table of their own that bill as another (Azure resells OpenAI's models).
const SHARED_TABLE: Record<string, string> = { 'azure-openai': 'openai' };

// Aggregators whose `vendor/model` ids fall back to the vendor's own table when they have no
// row: OpenRouter passes provider prices through, Perplexity's Agent API bills at them.
const VENDOR_FALLBACK = new Set(['openrouter', 'perplexity']);
const VENDORS: Record<string, string> = {
  openai: 'openai',
  anthropic: 'anthropic',
  google: 'gemini',
  'x-ai': 'xai',
  xai: 'xai',
  mistralai: 'mistral',
  deepseek: 'deepseek',
  cohere: 'cohere',
};

const PRICE_FIELDS = ['input', 'output', 'cachedInput', 'cacheWrite'] as const;
const PER_MILLION = 1_000_000;

function isRecord(value: unknown): value is Record<string, unknown> {
  return typeof value === 'object' && value !== null && !Array.isArray(value);
}

function checkPrice(value: unknown, where: string): ModelPrice {
  if (!isRecord(value)) throw new Error(`${where} must be an object like {"input": 1.25, "output": 10}`);
  for (const key of Object.keys(value)) {
    // `notes` is allowed so rows can be copied from the built-in table as they are.
    if (key !== 'notes' && !(PRICE_FIELDS as readonly string[]).includes(key)) {
      throw new Error(`${where} has an unknown field "${key}" (expected input, output, cachedInput, cacheWrite)`);
    }
  }
  const price: Partial<ModelPrice> = {};
  for (const field of PRICE_FIELDS) {
    const n = value[field];
    if (n === undefined && (field === 'cachedInput' || field === 'cacheWrite')) continue;
    if (typeof n !== 'number' || !Number.isFinite(n) || n < 0) {
      throw new Error(`${where}.${field} must be a number of at least 0 (USD per 1M tokens)`);
    }
    price[field] = n;
  }
  return price as ModelPrice;
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
  // OpenRouter-style `claude-opus-4.8` names the same model as Anthropic's `claude-opus-4-8`.
  if (provider === 'anthropic') for (const id of [...out]) if (id.includes('.')) out.push(id.replace(/\./g, '-'));
  if (provider === 'fireworks') for (const id of [...out]) if (!id.startsWith('accounts/')) out.push(`accounts/fireworks/models/${id}`);
  return out;
}

interface PriceFile {
  asOf: string;
  models: unknown;
  aliases?: Record<string, Record<string, string>>;
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

  /**
   * @param overrides user prices, same shape as prices.json's `models` (provider → model →
   *   price); a user entry replaces the built-in one for that model. Default: `{}`.
   */
  constructor(overrides: PriceOverrides = {}) {
    const file = builtIn as PriceFile;
    this.asOf = file.asOf;
    this.layer(checkModels(file.models, 'prices.json models'));
    this.layer(checkModels(overrides, 'price overrides'));
    for (const [provider, aliases] of Object.entries(file.aliases ?? {})) {
      this.aliases.set(key(provider), new Map(Object.entries(aliases).map(([from, to]) => [key(from), key(to)])));
    }
  }

  private layer(prices: PriceOverrides): void {
    for (const [provider, models] of Object.entries(prices)) {
      let table = this.tables.get(key(provider));
      if (!table) this.tables.set(key(provider), (table = new Map()));
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
    const shared = SHARED_TABLE[provider];
    for (const name of shared ? [provider, shared] : [provider]) {
      const found = this.inTable(name, model);
      if (found) return found;
    }
    const slash = model.indexOf('/');
    if (viaVendor && VENDOR_FALLBACK.has(provider) && slash > 0) {
      const vendor = VENDORS[model.slice(0, slash)];
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
    throw new Error(`${file} could not be read (${(err as Error).message})`);
  }
  if (text === undefined) return {};
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new Error(`${file} is not valid JSON (${(err as Error).message})`);
  }
  if (!isRecord(parsed) || !('models' in parsed)) {
    throw new Error(`${file} must look like {"models": {"<provider>": {"<model>": {"input": 1.25, "output": 10}}}} (USD per 1M tokens)`);
  }
  return checkModels(parsed.models, `${file}: models`);
}

/**
 * Cost in USD of one request's usage at a price: plain input (`inputTokens` − cached −
 * cache-written, never below zero) × `input` + cached × `cachedInput` + cache-written ×
 * `cacheWrite` + output × `output`. Reasoning tokens are part of `outputTokens`. Negative or
 * non-finite counts count as 0.
 */
export function costAt(price: ModelPrice, usage: TokenUsage): number {
  const count = (n: number | undefined): number => (n !== undefined && Number.isFinite(n) && n > 0 ? n : 0);
  const cached = count(usage.cachedInputTokens);
  const written = count(usage.cacheWriteTokens);
  const plain = Math.max(0, count(usage.inputTokens) - cached - written);
  const dollars =
    plain * price.input +
    cached * (price.cachedInput ?? price.input) +
    written * (price.cacheWrite ?? price.input) +
    count(usage.outputTokens) * price.output;
  return dollars / PER_MILLION;
}
