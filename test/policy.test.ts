import { describe, expect, it } from 'vitest';
import { buildPolicy, parseDuration, scopeViolation } from '../src/core/policy/policy';
import { describePolicy } from '../src/core/keys/present';
import { CATALOGUE, isFreeRoute, matchPattern, ProviderRegistry, upstreamEnvVar } from '../src/core/providers/providers';

describe('policy', () => {
  it('parses durations people write', () => {
    expect(parseDuration('90s')).toBe(90_000);
    expect(parseDuration('30m')).toBe(1_800_000);
    expect(parseDuration('1h30m')).toBe(5_400_000);
    expect(parseDuration('7d')).toBe(604_800_000);
    expect(parseDuration('45')).toBe(45_000);
    expect(() => parseDuration('soon')).toThrow(/not a duration/);
    expect(() => parseDuration('5 minutes')).toThrow(/not a duration/);
  });

  it('builds a policy and refuses nonsense with a readable message', () => {
    const p = buildPolicy(
      { uses: 50, ttl: '1h', rpm: 10, concurrency: 2, methods: ['get', 'post'], paths: ['/v1/chat/*'], models: ['gpt-4o*'] },
      1000,
    );
    expect(p).toEqual({
      maxActivations: 50,
      expiresAt: 1000 + 3_600_000,
      rpm: 10,
      concurrency: 2,
      methods: ['GET', 'POST'],
      paths: ['/v1/chat/*'],
      models: ['gpt-4o*'],
    });
    expect(() => buildPolicy({ uses: 0 })).toThrow(/uses must be a whole number of at least 1/);
    expect(() => buildPolicy({ uses: 1.5 })).toThrow(/uses/);
    expect(() => buildPolicy({ paths: ['v1/chat'] })).toThrow(/paths/);
    expect(() => buildPolicy({ models: [' '] })).toThrow(/models needs at least one value/);
    expect(describePolicy(p, 1000)).toContain('50 calls');
  });

  it('checks scope: method, path, model', () => {
    const p = buildPolicy({ methods: ['POST'], paths: ['/v1/chat/*'], models: ['gpt-4o-mini'] });
    expect(scopeViolation(p, 'POST', '/v1/chat/completions', 'gpt-4o-mini', true)).toBeUndefined();
    expect(scopeViolation(p, 'GET', '/v1/chat/completions', 'gpt-4o-mini', true)).toMatch(/method GET is not allowed/);
    expect(scopeViolation(p, 'POST', '/v1/embeddings', 'gpt-4o-mini', true)).toMatch(/path \/v1\/embeddings is not allowed/);
    expect(scopeViolation(p, 'POST', '/v1/chat/completions', 'o1-pro', true)).toMatch(/model o1-pro is not allowed/);
    expect(scopeViolation(p, 'POST', '/v1/chat/completions', undefined, true)).toMatch(/names no model/);
  });
});

describe('providers', () => {
  it('cover the catalogue with base URLs, key placement and env vars', () => {
    const ids = CATALOGUE.map((p) => p.id);
    expect(ids).toEqual([
      'openai',
      'anthropic',
      'gemini',
      'openrouter',
      'mistral',
      'groq',
      'together',
      'fireworks',
      'perplexity',
      'deepseek',
      'xai',
      'cohere',
      'azure-openai',
      'github',
    ]);
    for (const p of CATALOGUE) {
      expect(p.baseUrl).toMatch(/^https:\/\//);
      expect(p.keyEnv.length).toBeGreaterThan(0);
      expect(p.baseUrlEnv.length).toBeGreaterThan(0);
    }
    const reg = new ProviderRegistry([], {}, {});
    expect(reg.get('anthropic')!.placement).toEqual({ kind: 'header', name: 'x-api-key' });
    expect(reg.get('azure-openai')!.placement).toEqual({ kind: 'header', name: 'api-key' });
    expect(reg.get('gemini')!.placement).toEqual({ kind: 'header', name: 'x-goog-api-key' });
  });

  it('take upstream overrides from TILL_UPSTREAM_<ID> over the config file', () => {
    expect(upstreamEnvVar('azure-openai')).toBe('TILL_UPSTREAM_AZURE_OPENAI');
    const reg = new ProviderRegistry(
      [],
      { openai: 'http://127.0.0.1:1/v1', groq: 'http://127.0.0.1:2/openai/v1/' },
      { TILL_UPSTREAM_OPENAI: 'http://127.0.0.1:9000/v1' },
    );
    expect(reg.get('openai')!.baseUrl).toBe('http://127.0.0.1:9000/v1');
    expect(reg.get('openai')!.basePath).toBe('/v1');
    expect(reg.get('groq')!.baseUrl).toBe('http://127.0.0.1:2/openai/v1');
    expect(() => new ProviderRegistry([], { openai: 'ftp://x' }, {})).toThrow(/must be http/);
  });

  it('accept custom providers and refuse clashes', () => {
    const reg = new ProviderRegistry([{ id: 'acme', baseUrl: 'https://llm.acme.test/api', auth: 'header:X-Acme-Key' }], {}, {});
    expect(reg.get('acme')).toMatchObject({
      basePath: '/api',
      placement: { kind: 'header', name: 'x-acme-key' },
      keyEnv: ['ACME_API_KEY'],
      baseUrlEnv: ['ACME_BASE_URL'],
    });
    expect(() => new ProviderRegistry([{ id: 'openai', baseUrl: 'https://x.test' }], {}, {})).toThrow(/clashes/);
    expect(() => new ProviderRegistry([{ id: 'Bad Id', baseUrl: 'https://x.test' }], {}, {})).toThrow(/lower-case/);
  });

  it('know which routes are free', () => {
    const reg = new ProviderRegistry([], {}, {});
    expect(isFreeRoute(reg.get('openai')!, 'GET', '/v1/models')).toBe(true);
    expect(isFreeRoute(reg.get('openai')!, 'POST', '/v1/chat/completions')).toBe(false);
    expect(isFreeRoute(reg.get('anthropic')!, 'POST', '/v1/messages/count_tokens')).toBe(true);
    expect(isFreeRoute(reg.get('anthropic')!, 'HEAD', '/')).toBe(true);
    expect(isFreeRoute(reg.get('gemini')!, 'POST', '/v1beta/models/gemini-2.5-pro:countTokens')).toBe(true);
    expect(isFreeRoute(reg.get('gemini')!, 'POST', '/v1beta/models/gemini-2.5-pro:generateContent')).toBe(false);
    expect(matchPattern('/v1/chat/*', '/v1/chat/completions')).toBe(true);
    expect(matchPattern('gpt-4o', 'gpt-4o-mini')).toBe(false);
    expect(matchPattern('a.b', 'axb')).toBe(false);
  });
});

describe("upstreams changed in a running broker (the editor's till.upstreams setting)", () => {
  it('apply to the next lookup, and a malformed address changes nothing', () => {
    const reg = new ProviderRegistry([], {}, {});
    reg.setUpstreams({}, { TILL_UPSTREAM_OPENAI: 'http://127.0.0.1:9001/v1' });
    expect(reg.get('openai')?.baseUrl).toBe('http://127.0.0.1:9001/v1');
    expect(() => reg.setUpstreams({}, { TILL_UPSTREAM_OPENAI: 'not a url' })).toThrow();
    expect(reg.get('openai')?.baseUrl).toBe('http://127.0.0.1:9001/v1');
    reg.setUpstreams({}, {});
    expect(reg.get('openai')?.baseUrl).toBe('https://api.openai.com/v1');
  });
});
