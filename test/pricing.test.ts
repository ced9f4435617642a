import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import prices from '../src/core/metering/prices.json';
import { PriceTable, readPriceOverrides, type ModelPrice } from '../src/core/metering/pricing';
import { CATALOGUE } from '../src/core/providers/providers';

const table = new PriceTable();
const models = prices.models as unknown as Record<string, Record<string, ModelPrice & { notes?: string }>>;
const dir = mkdtempSync(join(tmpdir(), 'till-pricing-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('the built-in price table', () => {
  it('is dated and knows at least 80 models', () => {
    expect(table.asOf).toMatch(/^2026-11-\d{2}$/);
    expect(prices.currency).toBe('USD');
    expect(prices.unit).toBe('per 1M tokens');
    expect(table.size()).toBeGreaterThanOrEqual(80);
    const rows = Object.values(models).reduce((n, m) => n + Object.keys(m).length, 0);
    expect(table.size()).toBe(rows);
  });

  it('prices every catalogue provider that bills tokens (all but github)', () => {
    for (const provider of CATALOGUE) {
      if (provider.id === 'github' || provider.id === 'azure-openai') continue;
      expect(Object.keys(models[provider.id] ?? {}).length, provider.id).toBeGreaterThan(0);
    }
    expect(models.github).toBeUndefined();
    expect(table.price('github', 'anything')).toBeUndefined();
    // Azure has no rows of its own: it bills by the request's model in OpenAI's table.
    expect(table.price('azure-openai', 'gpt-4o')).toEqual(table.price('openai', 'gpt-4o'));
  });

  it('holds positive finite prices that make sense together', () => {
    for (const [provider, rows] of Object.entries(models)) {
      for (const [model, p] of Object.entries(rows)) {
        const where = `${provider}/${model}`;
        for (const n of [p.input, p.output, p.cachedInput, p.cacheWrite]) {
          if (n === undefined) continue;
          expect(Number.isFinite(n) && n > 0, where).toBe(true);
        }
        // True of every chat model in the real table: output never costs less than input,
        // a cache hit costs less than plain input, and a cache write no less.
        expect(p.output, where).toBeGreaterThanOrEqual(p.input);
        if (p.cachedInput !== undefined) expect(p.cachedInput, where).toBeLessThan(p.input);
        if (p.cacheWrite !== undefined) expect(p.cacheWrite, where).toBeGreaterThanOrEqual(p.input);
        if (p.notes !== undefined) expect(typeof p.notes, where).toBe('string');
        // A lookup by the row's own id finds the row (its notes aside).
        const { notes: _notes, ...row } = p;
        expect(table.price(provider, model), where).toEqual(row);
        // Tiers bill more than the standard rates, never less.
        for (const tier of [p.longContext, p.priority]) {
          if (!tier) continue;
          expect(tier.input, where).toBeGreaterThanOrEqual(p.input);
          expect(tier.output, where).toBeGreaterThanOrEqual(p.output);
        }
      }
    }
  });

  it('has aliases that all point at rows', () => {
    for (const [provider, aliases] of Object.entries(prices.aliases as Record<string, Record<string, string>>)) {
      for (const [alias, target] of Object.entries(aliases)) {
        expect(models[provider]?.[target], `${provider}: ${alias} → ${target}`).toBeDefined();
        expect(table.price(provider, alias)).toEqual(table.price(provider, target));
      }
    }
  });
});

describe('resolving a request model', () => {
  it('strips dated snapshots', () => {
    expect(table.price('openai', 'gpt-4o-2024-08-06')).toEqual(table.price('openai', 'gpt-4o'));
    expect(table.price('openai', 'gpt-6.1-sol-2026-09-29')).toEqual(table.price('openai', 'gpt-6.1-sol'));
    expect(table.price('anthropic', 'claude-sonnet-4-5-20250929')).toEqual(table.price('anthropic', 'claude-sonnet-4-5'));
    expect(table.price('anthropic', 'claude-sonnet-4-5@20250929')).toEqual(table.price('anthropic', 'claude-sonnet-4-5'));
    expect(table.price('openai', 'gpt-4o')).toMatchObject({ input: 2.5, output: 10, cachedInput: 1.25 });
  });

  it('resolves aliases, -latest, models/ prefixes, context markers and Fireworks paths', () => {
    expect(table.price('gemini', 'models/gemini-2.5-pro')).toEqual(table.price('gemini', 'gemini-2.5-pro'));
    expect(table.price('gemini', 'models/gemini-2.5-pro')).toMatchObject({ input: 1.25, output: 10 });
    expect(table.price('mistral', 'mistral-large-latest')).toEqual(table.price('mistral', 'mistral-large-2512'));
    expect(table.price('deepseek', 'deepseek-chat')).toEqual(table.price('deepseek', 'deepseek-flash'));
    expect(table.price('openai', 'gpt-5.6')).toEqual(table.price('openai', 'gpt-5.6-sol'));
    expect(table.price('xai', 'grok-4.20')).toEqual(table.price('xai', 'grok-4.20-0309-reasoning'));
    expect(table.price('anthropic', 'claude-opus-5-5[1m]')).toEqual(table.price('anthropic', 'claude-opus-5-5'));
    expect(table.price('anthropic', 'claude-sonnet-4-6-latest')).toEqual(table.price('anthropic', 'claude-sonnet-4-6'));
    expect(table.price('fireworks', 'kimi-k2p6')).toEqual(table.price('fireworks', 'accounts/fireworks/models/kimi-k2p6'));
  });

  it('ignores case', () => {
    expect(table.price('OpenAI', 'GPT-4O-2024-08-06')).toEqual(table.price('openai', 'gpt-4o'));
    expect(table.price('together', 'deepseek-ai/deepseek-v4-pro')).toEqual(table.price('together', 'deepseek-ai/DeepSeek-V4-Pro'));
    expect(table.price('together', 'deepseek-ai/DeepSeek-V4-Pro')).toMatchObject({ input: 2.1, output: 4.4 });
  });

  it('prices azure-openai by the request model in OpenAI’s table', () => {
    expect(table.price('azure-openai', 'gpt-4o-2024-08-06')).toEqual(table.price('openai', 'gpt-4o'));
    expect(table.price('Azure-OpenAI', 'gpt-5.4-mini')).toEqual(table.price('openai', 'gpt-5.4-mini'));
    // A deployment name that is not a model name stays unpriced rather than guessed.
    expect(table.price('azure-openai', 'my-prod-deployment')).toBeUndefined();
  });

  it('falls back to the vendor’s table for unlisted OpenRouter and Perplexity ids', () => {
    expect(table.price('openrouter', 'anthropic/claude-opus-5.5')).toEqual(table.price('anthropic', 'claude-opus-5-5'));
    expect(table.price('openrouter', 'google/gemini-3.5-flash')).toEqual(table.price('gemini', 'gemini-3.5-flash'));
    expect(table.price('perplexity', 'openai/gpt-6.1-sol')).toEqual(table.price('openai', 'gpt-6.1-sol'));
    // OpenRouter's own row wins over the vendor's.
    expect(table.price('openrouter', 'google/gemini-3.8-flash')).toMatchObject({ input: 1.5 });
    expect(table.price('gemini', 'gemini-3.8-flash')).toMatchObject({ input: 0.75 });
    expect(table.price('openrouter', 'nobody/some-model')).toBeUndefined();
    expect(table.price('groq', 'openai/gpt-5.5')).toBeUndefined();
  });

  it('returns undefined for unknown models and providers, and copies it hands out', () => {
    expect(table.price('openai', 'gpt-99-ultra')).toBeUndefined();
    expect(table.price('openai', '')).toBeUndefined();
    expect(table.price('my-custom', 'gpt-4o')).toBeUndefined();
    const p = table.price('openai', 'gpt-4o')!;
    p.input = 0;
    expect(table.price('openai', 'gpt-4o')?.input).toBe(2.5);
  });
});

describe('cost', () => {
  it('multiplies plain input and output', () => {
    // gpt-4o: $2.50 in, $10 out per 1M.
    expect(table.cost('openai', 'gpt-4o', { inputTokens: 1_000_000, outputTokens: 1_000_000 })).toBeCloseTo(12.5, 10);
    expect(table.cost('openai', 'gpt-4o', { inputTokens: 1000, outputTokens: 500 })).toBeCloseTo(0.0025 + 0.005, 12);
    expect(table.cost('openai', 'gpt-4o', { inputTokens: 0, outputTokens: 0 })).toBe(0);
  });

  it('bills the cached part of the input at the cached rate', () => {
    // gpt-5.4: $2.50 in, $0.25 cached, $15 out. 10,000 input of which 8,000 cached, 2,000 out.
    const expected = (2000 * 2.5 + 8000 * 0.25 + 2000 * 15) / 1e6;
    expect(table.cost('openai', 'gpt-5.4', { inputTokens: 10_000, outputTokens: 2000, cachedInputTokens: 8000 })).toBeCloseTo(expected, 12);
    expect(expected).toBeCloseTo(0.037, 12);
  });

  it('bills cache writes at the write rate (Anthropic, input normalised to the total)', () => {
    // claude-sonnet-4-6: $3 in, $0.30 cache read, $3.75 cache write (5m), $15 out.
    // 100,000 total input = 20,000 plain + 50,000 read + 30,000 written; 4,000 out (reasoning included).
    const cost = table.cost('anthropic', 'claude-sonnet-4-6-20260217', {
      inputTokens: 100_000,
      outputTokens: 4000,
      cachedInputTokens: 50_000,
      cacheWriteTokens: 30_000,
    });
    expect(cost).toBeCloseTo((20_000 * 3 + 50_000 * 0.3 + 30_000 * 3.75 + 4000 * 15) / 1e6, 12);
    expect(cost).toBeCloseTo(0.2475, 12);
  });

  it('defaults cached and cache-write rates to the input price', () => {
    // sonar: $1 in, $1 out, no cache rates; plus its $0.012 request fee.
    expect(
      table.cost('perplexity', 'sonar', { inputTokens: 3000, outputTokens: 1000, cachedInputTokens: 1000, cacheWriteTokens: 1000 }),
    ).toBeCloseTo(0.004 + 0.012, 12);
    const priced = new PriceTable({ custom: { m: { input: 2, output: 4 } } });
    expect(priced.cost('custom', 'm', { inputTokens: 10, outputTokens: 0, cachedInputTokens: 4, cacheWriteTokens: 3 })).toBeCloseTo(
      (3 * 2 + 4 * 2 + 3 * 2) / 1e6,
      15,
    );
  });

  it('never bills negative plain input when cached and written exceed the reported input', () => {
    // Anthropic's raw input_tokens excludes cache reads and writes; if it slips through un-normalised,
    // the plain part floors at zero instead of going negative.
    const cost = table.cost('anthropic', 'claude-haiku-4-5', {
      inputTokens: 10,
      outputTokens: 0,
      cachedInputTokens: 1000,
      cacheWriteTokens: 1000,
    });
    expect(cost).toBeCloseTo((1000 * 0.1 + 1000 * 1.25) / 1e6, 15);
    expect(table.cost('openai', 'gpt-4o', { inputTokens: -5, outputTokens: Number.NaN })).toBe(0);
  });

  it('returns undefined for an unpriced model', () => {
    expect(table.cost('openai', 'gpt-99-ultra', { inputTokens: 1, outputTokens: 1 })).toBeUndefined();
    expect(table.cost('github', 'repos', { inputTokens: 1, outputTokens: 1 })).toBeUndefined();
  });
});

describe('overrides', () => {
  it('replace the built-in entry for that model only', () => {
    const t = new PriceTable({ openai: { 'GPT-4o': { input: 1, output: 2 } } });
    expect(t.price('openai', 'gpt-4o')).toEqual({ input: 1, output: 2 });
    // The whole entry is replaced: no cached rate survives from the built-in row.
    expect(t.cost('openai', 'gpt-4o-2024-08-06', { inputTokens: 1000, outputTokens: 1000, cachedInputTokens: 1000 })).toBeCloseTo(
      0.003,
      12,
    );
    expect(t.price('openai', 'gpt-4o-mini')).toEqual(table.price('openai', 'gpt-4o-mini'));
    expect(t.size()).toBe(table.size());
  });

  it('add models and providers the built-in table does not know', () => {
    const t = new PriceTable({ openai: { 'ft:gpt-4o:acme': { input: 3.75, output: 15 } }, 'my-llm': { local: { input: 0, output: 0 } } });
    expect(t.price('openai', 'ft:gpt-4o:acme')).toEqual({ input: 3.75, output: 15 });
    expect(t.cost('my-llm', 'local', { inputTokens: 1e6, outputTokens: 1e6 })).toBe(0);
    expect(t.size()).toBe(table.size() + 2);
  });

  it('let azure-openai carry its own prices ahead of OpenAI’s', () => {
    const t = new PriceTable({ 'azure-openai': { 'gpt-5.6-sol': { input: 5, output: 30, cachedInput: 0.5 } } });
    expect(t.price('azure-openai', 'gpt-5.6-sol')).toEqual({ input: 5, output: 30, cachedInput: 0.5 });
    expect(t.price('openai', 'gpt-5.6-sol')).toEqual(table.price('openai', 'gpt-5.6-sol'));
    expect(t.price('azure-openai', 'gpt-4o')).toEqual(table.price('openai', 'gpt-4o'));
  });

  it('are checked when passed in code', () => {
    expect(() => new PriceTable({ openai: { x: { input: -1, output: 2 } } })).toThrow(/openai\.x\.input must be a number of at least 0/);
    expect(() => new PriceTable({ openai: { x: { input: 1 } as ModelPrice } })).toThrow(/openai\.x\.output/);
  });
});

describe('readPriceOverrides', () => {
  it('gives {} when the file is missing', () => {
    expect(readPriceOverrides(join(dir, 'absent.json'))).toEqual({});
  });

  it('reads the models shape, notes allowed', () => {
    const file = join(dir, 'prices.json');
    writeFileSync(
      file,
      JSON.stringify({ models: { anthropic: { 'claude-opus-5-5': { input: 3, output: 15, cacheWrite: 3.75, notes: 'negotiated' } } } }),
    );
    const overrides = readPriceOverrides(file);
    expect(overrides).toEqual({ anthropic: { 'claude-opus-5-5': { input: 3, output: 15, cacheWrite: 3.75 } } });
    expect(new PriceTable(overrides).price('anthropic', 'claude-opus-5-5[1m]')).toEqual({ input: 3, output: 15, cacheWrite: 3.75 });
  });

  it('throws a clear error naming the file when it is malformed', () => {
    const cases: Array<[string, RegExp]> = [
      ['{ "models": ', /is not valid JSON/],
      ['[]', /must look like \{"models"/],
      ['{ "openai": { "gpt-4o": { "input": 1, "output": 2 } } }', /must look like \{"models"/],
      ['{ "models": { "openai": [] } }', /models\.openai must be an object/],
      ['{ "models": { "openai": { "gpt-4o": { "input": "2.5", "output": 10 } } } }', /models\.openai\.gpt-4o\.input must be a number/],
      ['{ "models": { "openai": { "gpt-4o": { "input": 2.5, "output": 10, "cached_input": 1 } } } }', /unknown field "cached_input"/],
    ];
    for (const [i, [text, message]] of cases.entries()) {
      const file = join(dir, `bad-${i}.json`);
      writeFileSync(file, text);
      expect(() => readPriceOverrides(file)).toThrow(message);
      expect(() => readPriceOverrides(file)).toThrow(file);
    }
  });

  it('throws naming the file when it cannot be read', () => {
    const folder = join(dir, 'a-folder.json');
    mkdirSync(folder);
    expect(() => readPriceOverrides(folder)).toThrow(new RegExp(`${folder.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')} could not be read`));
  });
});

describe("prices changed in a running broker (the editor's till.prices setting)", () => {
  it('apply to the next lookup, and a malformed change changes nothing', () => {
    const table = new PriceTable({});
    const before = table.price('openai', 'gpt-5-mini');
    table.setOverrides({ openai: { 'gpt-5-mini': { input: 9, output: 99 } } });
    expect(table.price('openai', 'gpt-5-mini')).toMatchObject({ input: 9, output: 99 });
    expect(() => table.setOverrides({ openai: { 'gpt-5-mini': { input: -1 } } } as never)).toThrow();
    expect(table.price('openai', 'gpt-5-mini')).toMatchObject({ input: 9, output: 99 });
    table.setOverrides({});
    expect(table.price('openai', 'gpt-5-mini')).toEqual(before);
  });
});
