/**
 * The provider catalogue is complete: every entry carries all Till needs to broker, meter, price
 * and refuse for it, so a new provider is one entry (providers/providers.ts) and its rows in
 * prices.json. Adding one without its wire, prices or limits fails here, not in a user's terminal.
 */
import { describe, expect, it } from 'vitest';
import prices from '../src/core/metering/prices.json';
import { denialBody } from '../src/core/denial';
import { PriceTable } from '../src/core/metering/pricing';
import { usageFormat } from '../src/core/metering/usage';
import { CATALOGUE, builtInProvider, ProviderRegistry, type Provider } from '../src/core/providers/providers';

/**
 * A route of each provider that answers with token usage, in its own namespace (none: its API has
 * none). A new catalogue entry must be added here, which is the point.
 */
const METERED_ROUTE: Record<string, string | null> = {
  openai: '/v1/chat/completions',
  anthropic: '/v1/messages',
  gemini: '/v1beta/models/gemini-2.5-flash:generateContent',
  openrouter: '/api/v1/chat/completions',
  mistral: '/v1/chat/completions',
  groq: '/openai/v1/chat/completions',
  together: '/v1/chat/completions',
  fireworks: '/inference/v1/chat/completions',
  perplexity: '/chat/completions',
  deepseek: '/chat/completions',
  xai: '/v1/chat/completions',
  cohere: '/v2/chat',
  'azure-openai': '/openai/deployments/d/chat/completions',
  github: null,
};

const tables = prices.models as Record<string, Record<string, unknown>>;
const limitRows = prices.limits.providers as Record<string, unknown>;
const table = new PriceTable();

/** The price table a provider bills by. */
const tableOf = (p: Provider) => p.pricing?.table ?? p.id;

describe('every catalogue provider', () => {
  it('is listed in this test with a route it meters (or none)', () => {
    expect(Object.keys(METERED_ROUTE).sort()).toEqual(CATALOGUE.map((p) => p.id).sort());
  });

  it.each(CATALOGUE.map((p) => [p.id, p] as const))(
    '%s: has a base URL, key and endpoint variables, and free routes that parse',
    (_, p) => {
      expect(p.id).toMatch(/^[a-z][a-z0-9-]{0,31}$/);
      expect(p.displayName.length).toBeGreaterThan(0);
      const url = new URL(p.baseUrl);
      expect(url.protocol).toBe('https:');
      expect(p.basePath).toBe(url.pathname.replace(/\/+$/, ''));
      expect(p.keyEnv.length).toBeGreaterThan(0);
      expect(p.baseUrlEnv.length).toBeGreaterThan(0);
      for (const r of p.freeRoutes) {
        expect(r.method).toMatch(/^(\*|GET|POST|PUT|PATCH|DELETE)$/);
        expect(r.path.startsWith('/')).toBe(true);
      }
      expect(builtInProvider(p.id)).toBe(p);
    },
  );

  it.each(CATALOGUE.map((p) => [p.id, p] as const))('%s: meters its route, and prices and bounds what it meters', (_, p) => {
    const route = METERED_ROUTE[p.id]!;
    if (route === null) {
      expect(usageFormat(p.id, 'POST', '/anything')).toBeUndefined();
      expect(tables[p.id]).toBeUndefined();
      return;
    }
    expect(usageFormat(p.id, 'POST', route), route).toBeDefined();
    // Not metered: the same route read, or anything not a POST.
    expect(usageFormat(p.id, 'GET', route)).toBeUndefined();
    // Its table (own or shared) has models, and its limits (context, output, speed) a row.
    const own = tableOf(p);
    expect(builtInProvider(own), `${p.id} bills by ${own}`).toBeDefined();
    expect(Object.keys(tables[own] ?? {}).length, `${own} in prices.json models`).toBeGreaterThan(0);
    expect(limitRows[own], `${own} in prices.json limits.providers`).toBeDefined();
    // A model of its table is priced through the provider itself.
    const model = Object.keys(tables[own]!)[0]!;
    expect(table.price(p.id, model), `${p.id} ${model}`).toBeDefined();
  });

  it.each(CATALOGUE.map((p) => [p.id, p] as const))('%s: refuses in its own error shape, and knows its WebSocket dialects', (_, p) => {
    const body = denialBody(p.id, { status: 429, code: 'exhausted', message: 'no more' }) as Record<string, unknown>;
    expect(JSON.stringify(body)).toContain('no more');
    expect(['openai', 'anthropic', 'google', 'github', 'cohere']).toContain(p.wire.errorShape);
    expect(['responses', 'realtime', 'gemini', 'generic']).toContain(p.wire.socketDialect('/v1/anything'));
  });
});

describe('the catalogue as a whole', () => {
  it('gives every key and endpoint variable to one provider only', () => {
    const owner = new Map<string, string>();
    for (const p of CATALOGUE)
      for (const name of [...p.keyEnv, ...p.baseUrlEnv]) {
        expect(owner.get(name), `${name}: ${owner.get(name)} and ${p.id}`).toBeUndefined();
        owner.set(name, p.id);
      }
  });

  it('names each vendor once, and prices.json has rows for catalogue providers only', () => {
    const vendors = CATALOGUE.flatMap((p) => p.pricing?.vendorNames ?? []);
    expect(new Set(vendors).size).toBe(vendors.length);
    const ids = new Set(CATALOGUE.map((p) => p.id));
    const sections = [tables, limitRows, prices.aliases, prices.toolFees, prices.toolResults] as Record<string, unknown>[];
    for (const section of sections)
      for (const id of Object.keys(section)) if (id !== '*' && id !== 'notes') expect(ids.has(id), `prices.json names ${id}`).toBe(true);
  });

  it('asks for stream usage only from OpenAI-shaped APIs', () => {
    for (const p of CATALOGUE) if (p.wire.asksStreamUsage) expect(p.wire.usageFormat('/v1/chat/completions'), p.id).toBe('openai-chat');
  });

  it('gives a custom provider no metering and the OpenAI error shape', () => {
    const custom = new ProviderRegistry([{ id: 'mine', baseUrl: 'https://llm.example.com/v1' }], {}, {}).get('mine')!;
    expect(custom.wire.usageFormat('/v1/chat/completions')).toBeUndefined();
    expect(custom.wire.errorShape).toBe('openai');
    expect(usageFormat('mine', 'POST', '/v1/chat/completions')).toBeUndefined();
  });
});
