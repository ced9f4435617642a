/**
 * Metering on its own: which routes are metered, and what each provider's answers (JSON, SSE,
 * Gemini's streamed JSON array) meter to, whatever the chunking. A wrong number here is a key
 * that runs out too early or never runs out, so every fixture is checked byte-split too.
 * Fixtures: test/fixtures/usage/ (shapes from the providers' docs, see ../shared/PROVIDERS.md).
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { estimateTokens, usageFormat, usageFromJson, type Usage } from '../src/core/metering/usage';
import type { UsageFormat } from '../src/core/providers/wire';
import { DEFAULT_MAX_EVENT_BYTES, StreamMeter, type MeterEvent } from '../src/core/metering/streamMeter';
import { CATALOGUE } from '../src/core/providers/providers';
import {
  fakeAnswer,
  fakeTokenCount,
  openAIChatInputTokens,
  openAIResponsesInputTokens,
  startAnthropicUpstream,
  startGeminiUpstream,
  startOpenAIUpstream,
  type Upstream,
} from './support/upstreams';

const FIXTURES = join(__dirname, 'fixtures', 'usage');
const fixture = (name: string): Buffer => readFileSync(join(FIXTURES, name));

/** An expected usage; reportedCostUsd only when the provider reported one. */
function u(input: number, output: number, cached = 0, cacheWrite = 0, reasoning = 0, cost?: number): Usage {
  const usage: Usage = {
    inputTokens: input,
    outputTokens: output,
    cachedInputTokens: cached,
    cacheWriteTokens: cacheWrite,
    reasoningTokens: reasoning,
  };
  if (cost !== undefined) usage.reportedCostUsd = cost;
  return usage;
}

/** The same usage, with the service tier the answer says it ran in. */
const tier = (usage: Usage, serviceTier: string): Usage => ({ ...usage, serviceTier });

/** Deterministic PRNG (mulberry32) so a failing random split can be replayed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

/** Cuts `buf` into chunks of 1..maxSize bytes at random. */
function randomChunks(buf: Buffer, rand: () => number, maxSize: number): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < buf.length;) {
    const n = 1 + Math.floor(rand() * maxSize);
    out.push(buf.subarray(i, i + n));
    i += n;
  }
  return out;
}

const bytes = (buf: Buffer): Buffer[] => Array.from({ length: buf.length }, (_, i) => buf.subarray(i, i + 1));

function meter(format: UsageFormat, chunks: Buffer[] | Buffer, options?: { maxEventBytes?: number }): StreamMeter {
  const m = new StreamMeter(format, options);
  // Each chunk is pushed as a fresh copy that is then scribbled over: the meter must not keep
  // references to a caller's buffers (the broker reuses nothing, but a socket may).
  for (const chunk of Array.isArray(chunks) ? chunks : [chunks]) {
    const copy = Buffer.from(chunk);
    m.push(copy);
    copy.fill(0x21);
  }
  return m;
}

/** Everything a meter exposes, to compare two meters fed the same bytes differently. */
function observe(m: StreamMeter) {
  return { usage: m.usage(), textChars: m.textChars, sawUsageChunk: m.sawUsageChunk, complete: m.complete };
}

const textLength = (parts: string[]): number => parts.reduce((n, p) => n + p.length, 0);

const toCRLF = (b: Buffer): Buffer => Buffer.from(b.toString('utf8').replace(/\r?\n/g, '\r\n'));
const toCR = (b: Buffer): Buffer => Buffer.from(b.toString('utf8').replace(/\r?\n/g, '\r'));
const toLF = (b: Buffer): Buffer => Buffer.from(b.toString('utf8').replace(/\r\n?/g, '\n'));

// ---------------------------------------------------------------------------------------------

describe('usageFormat', () => {
  const routes: [provider: string, method: string, path: string, format: UsageFormat | undefined][] = [
    ['openai', 'POST', '/v1/chat/completions', 'openai-chat'],
    ['openai', 'post', '/v1/chat/completions/', 'openai-chat'],
    ['openai', 'POST', '/v1/responses', 'openai-responses'],
    ['openai', 'POST', '/v1/completions', 'openai-completions'],
    ['openai', 'POST', '/v1/embeddings', 'openai-embeddings'],
    ['openai', 'GET', '/v1/models', undefined],
    ['openai', 'GET', '/v1/models/gpt-5', undefined],
    ['openai', 'GET', '/v1/responses', undefined], // Codex's WebSocket upgrade, or a retrieval
    ['openai', 'GET', '/v1/chat/completions', undefined], // stored completions list
    ['openai', 'POST', '/v1/responses/input_tokens', undefined],
    ['openai', 'POST', '/v1/audio/speech', undefined],
    ['openai', 'HEAD', '/v1/chat/completions', undefined],
    ['anthropic', 'POST', '/v1/messages', 'anthropic-messages'],
    ['anthropic', 'POST', '/v1/messages?beta=true', 'anthropic-messages'], // Claude Code
    ['anthropic', 'POST', '/v1/messages/count_tokens', undefined],
    ['anthropic', 'POST', '/v1/messages/batches', undefined],
    ['anthropic', 'GET', '/v1/models', undefined],
    ['anthropic', 'HEAD', '/', undefined],
    ['gemini', 'POST', '/v1beta/models/gemini-2.5-flash:generateContent', 'gemini'],
    ['gemini', 'POST', '/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse', 'gemini'],
    ['gemini', 'POST', '/v1/models/gemini-2.5-pro:streamGenerateContent', 'gemini'],
    ['gemini', 'POST', '/v1beta/tunedModels/my-model-7:generateContent', 'gemini'],
    ['gemini', 'POST', '/v1beta/models/gemini-2.5-flash:countTokens', undefined],
    ['gemini', 'POST', '/v1beta/openai/chat/completions', 'openai-chat'],
    ['gemini', 'POST', '/v1beta/openai/embeddings', 'openai-embeddings'],
    ['gemini', 'GET', '/v1beta/models', undefined],
    ['openrouter', 'POST', '/api/v1/chat/completions', 'openai-chat'],
    ['openrouter', 'POST', '/api/v1/completions', 'openai-completions'],
    ['openrouter', 'POST', '/api/v1/responses', 'openai-responses'],
    ['openrouter', 'POST', '/api/v1/messages', 'anthropic-messages'], // Anthropic-SDK clients
    ['openrouter', 'GET', '/api/v1/models', undefined],
    ['mistral', 'POST', '/v1/chat/completions', 'openai-chat'],
    ['mistral', 'POST', '/v1/fim/completions', 'openai-chat'],
    ['mistral', 'POST', '/v1/agents/completions', 'openai-chat'],
    ['mistral', 'POST', '/v1/embeddings', 'openai-embeddings'],
    ['groq', 'POST', '/openai/v1/chat/completions', 'openai-chat'],
    ['groq', 'POST', '/openai/v1/responses', 'openai-responses'],
    ['groq', 'POST', '/openai/v1/audio/transcriptions', undefined],
    ['together', 'POST', '/v1/chat/completions', 'openai-chat'],
    ['together', 'POST', '/v1/completions', 'openai-completions'],
    ['fireworks', 'POST', '/inference/v1/chat/completions', 'openai-chat'],
    ['fireworks', 'POST', '/inference/v1/completions', 'openai-completions'],
    ['perplexity', 'POST', '/chat/completions', 'openai-chat'],
    ['perplexity', 'POST', '/v1/responses', 'openai-responses'], // the Agent API
    ['deepseek', 'POST', '/chat/completions', 'openai-chat'],
    ['deepseek', 'POST', '/v1/chat/completions', 'openai-chat'],
    ['deepseek', 'POST', '/beta/completions', 'openai-completions'],
    ['deepseek', 'POST', '/anthropic/v1/messages', 'anthropic-messages'],
    ['xai', 'POST', '/v1/chat/completions', 'openai-chat'],
    ['xai', 'POST', '/v1/responses', 'openai-responses'],
    ['cohere', 'POST', '/v2/chat', 'cohere-chat'],
    ['cohere', 'POST', '/compatibility/v1/chat/completions', 'openai-chat'],
    ['cohere', 'POST', '/compatibility/v1/embeddings', 'openai-embeddings'],
    ['cohere', 'POST', '/v2/tokenize', undefined],
    ['cohere', 'GET', '/v1/models', undefined],
    ['azure-openai', 'POST', '/openai/deployments/gpt-4o/chat/completions?api-version=2024-10-21', 'openai-chat'],
    ['azure-openai', 'POST', '/openai/deployments/emb-3/embeddings?api-version=2024-10-21', 'openai-embeddings'],
    ['azure-openai', 'POST', '/openai/deployments/instruct/completions', 'openai-completions'],
    ['azure-openai', 'POST', '/openai/v1/chat/completions', 'openai-chat'],
    ['azure-openai', 'POST', '/openai/v1/responses', 'openai-responses'],
    ['azure-openai', 'POST', '/openai/responses?api-version=2025-04-01-preview', 'openai-responses'],
    ['azure-openai', 'GET', '/openai/deployments', undefined],
    ['github', 'POST', '/repos/o/r/issues', undefined],
    ['github', 'GET', '/user', undefined],
    ['my-local-llm', 'POST', '/v1/chat/completions', undefined], // custom providers: not guessed
    ['', 'POST', '/v1/chat/completions', undefined],
  ];
  it.each(routes)('%s %s %s → %s', (provider, method, path, format) => {
    expect(usageFormat(provider, method, path)).toBe(format);
  });

  // A main metered route per catalogue provider: a provider added to the catalogue fails here
  // until someone decides how it is metered.
  const main: Record<string, [string, UsageFormat] | null> = {
    openai: ['/v1/chat/completions', 'openai-chat'],
    anthropic: ['/v1/messages', 'anthropic-messages'],
    gemini: ['/v1beta/models/gemini-2.5-flash:streamGenerateContent', 'gemini'],
    openrouter: ['/api/v1/chat/completions', 'openai-chat'],
    mistral: ['/v1/chat/completions', 'openai-chat'],
    groq: ['/openai/v1/chat/completions', 'openai-chat'],
    together: ['/v1/chat/completions', 'openai-chat'],
    fireworks: ['/inference/v1/chat/completions', 'openai-chat'],
    perplexity: ['/chat/completions', 'openai-chat'],
    deepseek: ['/chat/completions', 'openai-chat'],
    xai: ['/v1/chat/completions', 'openai-chat'],
    cohere: ['/v2/chat', 'cohere-chat'],
    'azure-openai': ['/openai/deployments/gpt-4o/chat/completions', 'openai-chat'],
    github: null,
  };
  it('knows every catalogue provider, and meters none of its free routes', () => {
    for (const p of CATALOGUE) {
      expect(main, p.id).toHaveProperty([p.id]);
      const route = main[p.id];
      if (route) expect(usageFormat(p.id, 'POST', route[0]), p.id).toBe(route[1]);
      // Chat on the provider's own base path is metered for every OpenAI-shaped provider.
      if (route?.[1] === 'openai-chat' && p.id !== 'azure-openai')
        expect(usageFormat(p.id, 'POST', `${p.basePath}/chat/completions`), p.id).toBe('openai-chat');
      for (const free of p.freeRoutes) {
        const path = free.path.replace(/\*/g, 'v1beta');
        for (const method of free.method === '*' ? ['GET', 'POST'] : [free.method]) {
          expect(usageFormat(p.id, method, path), `${p.id} ${method} ${path}`).toBeUndefined();
        }
      }
    }
  });
});

// ---------------------------------------------------------------------------------------------

/** JSON answers: file, format, what it meters to. */
const JSON_CASES: [file: string, format: UsageFormat, usage: Usage][] = [
  ['openai-chat.json', 'openai-chat', tier(u(2006, 300, 1920, 0, 256), 'default')],
  ['openai-responses.json', 'openai-responses', u(5120, 850, 4096, 0, 640)],
  ['openai-completions.json', 'openai-completions', u(5, 7)],
  ['openai-embeddings.json', 'openai-embeddings', u(8, 0)],
  // input_tokens 25 + cache writes 2048 + cache reads 10240
  ['anthropic.json', 'anthropic-messages', tier(u(12313, 512, 10240, 2048), 'standard')],
  // prompt 9120 + tool-use prompt 160; candidates 420 + thoughts 1200
  ['gemini.json', 'gemini', u(9280, 1620, 8192, 0, 1200)],
  // the streamed array, parsed whole: the last usageMetadata, not the sum of four
  ['gemini-array.json', 'gemini', u(12, 105, 0, 0, 88)],
  ['openrouter.json', 'openai-chat', u(3000, 120, 0, 1200, 0, 0.0142)],
  ['deepseek.json', 'openai-chat', u(1100, 980, 1024, 0, 700)],
  ['groq.json', 'openai-chat', u(18, 556)],
  // deep research: citation tokens are input; reasoning (73726) is outside completion_tokens
  ['perplexity.json', 'openai-chat', u(19 + 10175, 7163 + 73726, 0, 0, 73726, 0.41887)],
  // xAI: total 135 = 32 + 9 + 94, so reasoning is outside completion_tokens
  ['xai.json', 'openai-chat', u(32, 103, 6, 0, 94)],
  ['mistral.json', 'openai-chat', u(167, 28)],
  ['together.json', 'openai-chat', u(41, 9)],
  ['fireworks.json', 'openai-chat', u(19, 49)],
  // billed units (17), not the raw 212 tokens that include Cohere's own preamble
  ['cohere.json', 'cohere-chat', u(17, 56)],
  ['azure-openai.json', 'openai-chat', u(2150, 11, 1920)],
];

describe('usageFromJson', () => {
  it.each(JSON_CASES)('%s (%s)', (file, format, expected) => {
    expect(usageFromJson(format, JSON.parse(fixture(file).toString('utf8')))).toEqual(expected);
  });

  it.each(JSON_CASES)('%s (%s) metered as a stream of bytes, a byte at a time', (file, format, expected) => {
    // A StreamMeter sniffs a plain JSON body and buffers only its usage values.
    const body = fixture(file);
    const whole = meter(format, body);
    expect(whole.usage()).toEqual(expected);
    expect(whole.complete).toBe(true);
    expect(observe(meter(format, bytes(body)))).toEqual(observe(whole));
  });

  it('reads Responses events (Responses over WebSocket) and Perplexity Agent API costs', () => {
    const event = {
      type: 'response.completed',
      sequence_number: 9,
      response: {
        id: 'resp_1',
        object: 'response',
        status: 'completed',
        usage: {
          input_tokens: 900,
          input_tokens_details: { cached_tokens: 512 },
          output_tokens: 40,
          output_tokens_details: { reasoning_tokens: 0 },
          total_tokens: 940,
        },
      },
    };
    expect(usageFromJson('openai-responses', event)).toEqual(u(900, 40, 512));
    const perplexityResponse = {
      id: 'resp_pplx',
      object: 'response',
      status: 'completed',
      usage: {
        input_tokens: 1200,
        output_tokens: 300,
        total_tokens: 1500,
        cost: { currency: 'USD', input_cost: 0.0012, output_cost: 0.0045, tool_calls_cost: 0.005, total_cost: 0.0107 },
      },
    };
    expect(usageFromJson('openai-responses', perplexityResponse)).toEqual(u(1200, 300, 0, 0, 0, 0.0107));
    const otherCurrency = { usage: { ...perplexityResponse.usage, cost: { ...perplexityResponse.usage.cost, currency: 'EUR' } } };
    expect(usageFromJson('openai-responses', otherCurrency)?.reportedCostUsd).toBeUndefined();
  });

  it('reads single stream events and legacy shapes', () => {
    expect(
      usageFromJson('anthropic-messages', {
        type: 'message_start',
        message: { usage: { input_tokens: 10, cache_read_input_tokens: 5, output_tokens: 1 } },
      }),
    ).toEqual(u(15, 1, 5));
    // cache_creation by TTL when the total is absent; the 1-hour part bills at its own rate
    expect(
      usageFromJson('anthropic-messages', {
        usage: { input_tokens: 3, cache_creation: { ephemeral_5m_input_tokens: 100, ephemeral_1h_input_tokens: 20 }, output_tokens: 7 },
      }),
    ).toEqual({ ...u(123, 7, 0, 120), cacheWrite1hTokens: 20 });
    expect(
      usageFromJson('cohere-chat', { type: 'message-end', delta: { usage: { billed_units: { input_tokens: 3, output_tokens: 4 } } } }),
    ).toEqual(u(3, 4));
    // Cohere v1 reports under meta
    expect(usageFromJson('cohere-chat', { text: 'hi', meta: { billed_units: { input_tokens: 6, output_tokens: 2 } } })).toEqual(u(6, 2));
    // raw tokens when nothing is billed separately
    expect(usageFromJson('cohere-chat', { usage: { tokens: { input_tokens: 8, output_tokens: 1 }, cached_tokens: 4 } })).toEqual(
      u(8, 1, 4),
    );
    // Groq once answered with usage only under x_groq
    expect(
      usageFromJson('openai-chat', {
        choices: [],
        x_groq: { id: 'req_1', usage: { prompt_tokens: 2, completion_tokens: 3, total_tokens: 5 } },
      }),
    ).toEqual(u(2, 3));
  });

  it('returns undefined for anything that reports no usage', () => {
    const formats: UsageFormat[] = [
      'openai-chat',
      'openai-responses',
      'openai-completions',
      'openai-embeddings',
      'anthropic-messages',
      'gemini',
      'cohere-chat',
    ];
    const bodies: unknown[] = [
      null,
      undefined,
      'usage',
      42,
      [],
      {},
      { usage: null },
      { usage: 'lots' },
      { usage: {} },
      { usage: { prompt_tokens: 'ten', completion_tokens: null } },
      { usage: { prompt_tokens: -1, completion_tokens: Number.NaN } },
      { error: { message: 'Incorrect API key provided', type: 'invalid_request_error' } },
      { type: 'error', error: { type: 'overloaded_error', message: 'Overloaded' } },
      [{ candidates: [] }],
    ];
    for (const format of formats)
      for (const body of bodies) expect(usageFromJson(format, body), `${format} ${JSON.stringify(body)}`).toBeUndefined();
  });
});

// ---------------------------------------------------------------------------------------------

interface StreamCase {
  file: string;
  format: UsageFormat;
  usage: Usage | undefined;
  /** The generated text deltas, whose length textChars must equal. */
  text: string[];
  usageChunk: boolean;
  complete: boolean;
}

const STREAM_CASES: StreamCase[] = [
  {
    file: 'openai-chat.sse',
    format: 'openai-chat',
    usage: tier(u(1200, 9, 1024), 'default'),
    text: ['Paris', ' — la Ville', ' Lumière 🌟, 巴黎'],
    usageChunk: true,
    complete: true,
  },
  // no stream_options.include_usage: text only, nothing reported
  {
    file: 'openai-chat-no-usage.sse',
    format: 'openai-chat',
    usage: undefined,
    text: ['{"city":', '"Paris"}'],
    usageChunk: false,
    complete: false,
  },
  {
    file: 'openai-completions.sse',
    format: 'openai-completions',
    usage: u(5, 5),
    text: ['\n\n', 'This is', ' a test'],
    usageChunk: true,
    complete: true,
  },
  {
    file: 'openai-responses.sse',
    format: 'openai-responses',
    usage: u(8320, 180, 7936, 0, 128),
    text: ['**Checking the file**', '{"command":["ls",', '"-la"]}', 'Listing', ' the files…'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'openai-responses-incomplete.sse',
    format: 'openai-responses',
    usage: u(40, 64, 0, 0, 61),
    text: ['Once upon'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'anthropic.sse',
    format: 'anthropic-messages',
    usage: tier(u(472 + 1800, 89, 1800), 'standard'),
    text: ['The user wants the weather; ', 'call the tool.', 'Let me check ', 'São Paulo.', '{"location": "São', ' Paulo"}'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'anthropic-server-tools.sse',
    format: 'anthropic-messages',
    usage: { ...tier(u(10682, 510), 'standard'), toolCalls: { web_search: 1 } },
    text: ["I'll search for that.", '{"query": "weather NYC today"}', 'It is 12 °C and cloudy in New York.'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'gemini.sse',
    format: 'gemini',
    usage: u(12, 17 + 88, 0, 0, 88),
    text: ['**Planning the answer**', 'Why did the', ' scarecrow win an award? ', 'He was outstanding in his field. 🌾'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'gemini-array.json',
    format: 'gemini',
    usage: u(12, 17 + 88, 0, 0, 88),
    text: ['**Planning the answer**', 'Why did the', ' scarecrow win an award? ', 'He was outstanding in his field. 🌾'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'openrouter.sse',
    format: 'openai-chat',
    usage: u(1934, 377, 1536, 0, 256, 0.0098745),
    text: ['Thinking about ', 'the question.', 'Forty-two.'],
    usageChunk: true,
    complete: true,
  },
  {
    file: 'deepseek.sse',
    format: 'openai-chat',
    usage: u(64, 300, 48, 0, 220),
    text: ['Hmm, 9.11 vs 9.8', '9.8', ' is larger.'],
    usageChunk: true,
    complete: true,
  },
  { file: 'groq.sse', format: 'openai-chat', usage: u(23, 19), text: ['Happy Starlight Day!'], usageChunk: false, complete: true },
  {
    file: 'perplexity.sse',
    format: 'openai-chat',
    usage: u(14, 23, 0, 0, 0, 0.005037),
    text: ['There', ' are', ' about 100 billion stars.'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'xai.sse',
    format: 'openai-chat',
    usage: u(150, 4 + 147, 128, 0, 147),
    text: ['Greeting back.', 'Hello! 😊'],
    usageChunk: true,
    complete: true,
  },
  {
    file: 'mistral.sse',
    format: 'openai-chat',
    usage: u(167, 32),
    text: ['Bonjour ! Je vais', ' vérifier.', '{"transaction_id": "T1001"}'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'together.sse',
    format: 'openai-chat',
    usage: u(41, 9),
    text: ['Rome', " wasn't built", ' in a day.'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'fireworks.sse',
    format: 'openai-chat',
    usage: u(19, 49),
    text: ['Autumn moonlight—', '\na worm digs silently'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'cohere.sse',
    format: 'cohere-chat',
    usage: u(3, 25),
    text: ['I will look up the weather.', '{"location":"Toronto"}', 'It is', ' sunny in Toronto.'],
    usageChunk: false,
    complete: true,
  },
  {
    file: 'azure-openai.sse',
    format: 'openai-chat',
    usage: u(2150, 3, 1920),
    text: ['Hello', ' from Azure.'],
    usageChunk: true,
    complete: true,
  },
];

describe('StreamMeter on each provider stream', () => {
  describe.each(STREAM_CASES)('$file ($format)', (c) => {
    const body = fixture(c.file);
    const expected = { usage: c.usage, textChars: textLength(c.text), sawUsageChunk: c.usageChunk, complete: c.complete };

    it('whole', () => {
      expect(observe(meter(c.format, body))).toEqual(expected);
    });

    it('a byte at a time', () => {
      expect(observe(meter(c.format, bytes(body)))).toEqual(expected);
    });

    it('at random boundaries', () => {
      const rand = prng(body.length);
      for (let trial = 0; trial < 40; trial++) {
        const chunks = randomChunks(body, rand, trial < 20 ? 16 : 512);
        expect(observe(meter(c.format, chunks)), `trial ${trial}`).toEqual(expected);
      }
    });

    it('with any line ending', () => {
      if (c.file.endsWith('.json')) return; // JSON whitespace is not SSE framing
      for (const variant of [toLF(body), toCRLF(body), toCR(body)]) {
        expect(observe(meter(c.format, variant))).toEqual(expected);
        expect(observe(meter(c.format, randomChunks(variant, prng(variant.length), 7)))).toEqual(expected);
      }
    });
  });

  // Every two-way split of a few fixtures: every byte, including the middle of each UTF-8
  // sequence, each CRLF and each "\n\n", lands on a chunk boundary once.
  it.each(['openai-chat.sse', 'anthropic.sse', 'gemini.sse', 'gemini-array.json', 'cohere.sse', 'openrouter.sse'])(
    '%s split at every byte boundary',
    (file) => {
      const c = STREAM_CASES.find((s) => s.file === file)!;
      const body = fixture(file);
      const whole = observe(meter(c.format, body));
      for (let k = 1; k < body.length; k++) {
        const got = observe(meter(c.format, [body.subarray(0, k), body.subarray(k)]));
        if (JSON.stringify(got) !== JSON.stringify(whole)) expect(got, `split at ${k}`).toEqual(whole);
      }
    },
  );

  it('every CRLF fixture split at every byte boundary, including between CR and LF', () => {
    const body = toCRLF(fixture('azure-openai.sse'));
    const whole = observe(meter('openai-chat', body));
    expect(whole.usage).toEqual(u(2150, 3, 1920));
    for (let k = 1; k < body.length; k++) {
      const got = observe(meter('openai-chat', [body.subarray(0, k), body.subarray(k)]));
      if (JSON.stringify(got) !== JSON.stringify(whole)) expect(got, `split at ${k}`).toEqual(whole);
    }
  });
});

// ---------------------------------------------------------------------------------------------

describe('cumulative usage is taken as the last value, never summed', () => {
  it('Anthropic: several message_delta events (server tools)', () => {
    const m = meter('anthropic-messages', fixture('anthropic-server-tools.sse'));
    // summed it would be 2679 + 2679 + 10682 input and 3 + 41 + 510 output
    expect(m.usage()).toEqual({ ...tier(u(10682, 510), 'standard'), toolCalls: { web_search: 1 } });
  });

  it('Anthropic: usage moves as each event arrives', () => {
    const seen: (Usage | undefined)[] = [];
    const m = new StreamMeter('anthropic-messages');
    m.onEvent = (e) => {
      if (e.event === 'message_start' || e.event === 'message_delta') seen.push(m.usage());
    };
    m.push(fixture('anthropic-server-tools.sse'));
    expect(seen).toEqual([
      tier(u(2679, 3), 'standard'),
      { ...tier(u(2679, 41), 'standard'), toolCalls: { web_search: 1 } },
      { ...tier(u(10682, 510), 'standard'), toolCalls: { web_search: 1 } },
    ]);
  });

  it('Gemini: usageMetadata in every chunk', () => {
    const outputs: number[] = [];
    const m = new StreamMeter('gemini');
    m.onEvent = () => outputs.push(m.usage()?.outputTokens ?? -1);
    m.push(fixture('gemini.sse'));
    expect(outputs).toEqual([88, 91, 97, 105]);
    expect(m.usage()?.inputTokens).toBe(12); // not 48
  });

  it('Perplexity and xAI: usage repeated in several chunks', () => {
    expect(meter('openai-chat', fixture('perplexity.sse')).usage()).toEqual(u(14, 23, 0, 0, 0, 0.005037));
    expect(meter('openai-chat', fixture('xai.sse')).usage()).toEqual(u(150, 151, 128, 0, 147));
  });
});

describe('interrupted streams', () => {
  /** The stream cut after the first `events` events (and `extra` bytes of the next). */
  function cut(file: string, events: number, extra = 0): Buffer {
    const body = fixture(file);
    const text = body.toString('latin1');
    let at = 0;
    for (let i = 0; i < events; i++) at = text.indexOf('\n\n', at) + 2;
    return body.subarray(0, at + extra);
  }

  it('OpenAI chat cut before the usage chunk: no usage, but the text seen so far', () => {
    const m = meter('openai-chat', cut('openai-chat.sse', 4, 30));
    expect(m.usage()).toBeUndefined();
    expect(m.textChars).toBe(textLength(['Paris', ' — la Ville', ' Lumière 🌟, 巴黎']));
    expect(m.sawUsageChunk).toBe(false);
    expect(m.complete).toBe(false);
    expect(m.finalUsage(4000)).toEqual({ ...u(1000, estimateTokens(m.textChars)), estimated: true });
  });

  it('OpenAI chat cut after the finish chunk but before usage: still not complete', () => {
    const m = meter('openai-chat', cut('openai-chat.sse', 5));
    expect(m.usage()).toBeUndefined();
    expect(m.complete).toBe(false);
    expect(m.finalUsage(10).estimated).toBe(true);
  });

  it('a half-received event is not metered', () => {
    const body = fixture('openai-chat.sse');
    const usageEvent = body.indexOf('"choices":[]');
    const m = meter('openai-chat', body.subarray(0, usageEvent + 200)); // into the usage chunk
    expect(m.usage()).toBeUndefined();
    expect(m.bufferedBytes).toBeGreaterThan(0);
  });

  it('Anthropic cut mid-answer: the input reported at message_start, output estimated', () => {
    const m = meter('anthropic-messages', cut('anthropic.sse', 10));
    expect(m.usage()).toEqual(tier(u(2272, 2, 1800), 'standard'));
    expect(m.complete).toBe(false);
    expect(m.textChars).toBe(textLength(['The user wants the weather; ', 'call the tool.', 'Let me check ', 'São Paulo.']));
    const settled = m.finalUsage(100_000);
    expect(settled).toEqual({ ...tier(u(2272, estimateTokens(m.textChars), 1800), 'standard'), estimated: true });
  });

  it('Gemini cut after two chunks: the last cumulative counts, not complete', () => {
    const m = meter('gemini', toLF(fixture('gemini.sse')).subarray(0, toLF(fixture('gemini.sse')).indexOf('scarecrow') - 40));
    expect(m.usage()).toEqual(u(12, 91, 0, 0, 88));
    expect(m.complete).toBe(false);
    expect(m.finalUsage(0)).toEqual({ ...u(12, 91, 0, 0, 88), estimated: true });
  });

  it('Responses cut before response.completed', () => {
    const m = meter('openai-responses', cut('openai-responses.sse', 16));
    expect(m.usage()).toBeUndefined();
    expect(m.textChars).toBe(textLength(['**Checking the file**', '{"command":["ls",', '"-la"]}', 'Listing', ' the files…']));
  });

  it('a completed stream settles to exactly what was reported', () => {
    const m = meter('openai-chat', fixture('openai-chat.sse'));
    expect(m.finalUsage(1_000_000)).toEqual(tier(u(1200, 9, 1024), 'default'));
  });
});

describe('Azure OpenAI', () => {
  it('the prompt_filter_results first chunk (choices: [], no usage) is not the usage chunk', () => {
    const body = fixture('azure-openai.sse');
    const m = new StreamMeter('openai-chat');
    const flags: boolean[] = [];
    m.onEvent = () => flags.push(m.sawUsageChunk);
    m.push(body);
    expect(flags).toEqual([false, false, false, false, false, true, true]);
  });

  it('without include_usage: text, but no usage chunk and no usage', () => {
    const text = fixture('azure-openai.sse').toString('utf8');
    const withoutUsage = text.replace(/data: \{"choices":\[\],"created":1764001001[^\n]*\n\n/, '');
    expect(withoutUsage).not.toBe(text);
    const m = meter('openai-chat', Buffer.from(withoutUsage));
    expect(m.sawUsageChunk).toBe(false);
    expect(m.usage()).toBeUndefined();
    expect(m.textChars).toBe('Hello from Azure.'.length);
  });

  it('also when usage: null is sent in the filter chunk', () => {
    const m = meter(
      'openai-chat',
      Buffer.from('data: {"choices":[],"created":0,"id":"","model":"","object":"","prompt_filter_results":[],"usage":null}\n\n'),
    );
    expect(m.sawUsageChunk).toBe(false);
    expect(m.usage()).toBeUndefined();
  });
});

// ---------------------------------------------------------------------------------------------

describe('SSE framing', () => {
  const usageData = '{"choices":[],"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}';

  it('comments, keep-alives and unknown fields are ignored', () => {
    const body = [
      ': OPENROUTER PROCESSING',
      '',
      ':',
      '',
      'id: 1',
      'retry: 3000',
      ': a comment inside an event',
      'data: {"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}',
      '',
      `data: ${usageData}`,
      '',
      '',
    ].join('\n');
    const events: MeterEvent[] = [];
    const m = new StreamMeter('openai-chat');
    m.onEvent = (e) => events.push(e);
    m.push(Buffer.from(body));
    expect(events.map((e) => e.data)).toEqual(['{"choices":[{"index":0,"delta":{"content":"hi"},"finish_reason":null}]}', usageData]);
    expect(m.usage()).toEqual(u(7, 3));
    expect(m.textChars).toBe(2);
  });

  it('multi-line data is joined with newlines', () => {
    const body =
      'event: message-end\ndata: {"type":"message-end",\ndata: "delta":{"usage":{"billed_units":\ndata:{"input_tokens":5,"output_tokens":6}}}}\n\n';
    const events: MeterEvent[] = [];
    const m = new StreamMeter('cohere-chat');
    m.onEvent = (e) => events.push(e);
    m.push(Buffer.from(body));
    expect(events).toHaveLength(1);
    expect(events[0]!.event).toBe('message-end');
    expect(events[0]!.data).toBe('{"type":"message-end",\n"delta":{"usage":{"billed_units":\n{"input_tokens":5,"output_tokens":6}}}}');
    expect(m.usage()).toEqual(u(5, 6));
  });

  it('event names stand in for a missing type field', () => {
    const body =
      'event: message_start\ndata: {"message":{"usage":{"input_tokens":9,"output_tokens":1}}}\n\nevent: message_delta\ndata: {"delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":4}}\n\n';
    const m = meter('anthropic-messages', Buffer.from(body));
    expect(m.usage()).toEqual(u(9, 4));
    expect(m.complete).toBe(true);
  });

  it('"data:" without a space, a BOM, and blank lines before the first event', () => {
    const body = Buffer.concat([Buffer.from([0xef, 0xbb, 0xbf]), Buffer.from(`\n\n\ndata:${usageData}\n\n`)]);
    expect(meter('openai-chat', body).usage()).toEqual(u(7, 3));
    expect(meter('openai-chat', bytes(body)).usage()).toEqual(u(7, 3));
  });

  it('CR-only and mixed line endings, split anywhere', () => {
    const body = Buffer.from(
      `data: {"choices":[{"delta":{"content":"ab"}}]}\r\rdata: {"choices":[{"delta":{"content":"c"}}]}\r\n\ndata: ${usageData}\n\r\n`,
    );
    for (let k = 1; k < body.length; k++) {
      const m = meter('openai-chat', [body.subarray(0, k), body.subarray(k)]);
      expect(m.usage(), `split at ${k}`).toEqual(u(7, 3));
      expect(m.textChars, `split at ${k}`).toBe(3);
    }
  });

  it('the stream ends without the final blank line: that event is incomplete and not metered', () => {
    // As in the SSE spec: an event is dispatched by a blank line.
    expect(meter('openai-chat', Buffer.from(`data: ${usageData}\n`)).usage()).toBeUndefined();
    expect(meter('openai-chat', Buffer.from(`data: ${usageData}\n\n`)).usage()).toEqual(u(7, 3));
  });

  it('data that is not JSON ([DONE], text) is skipped', () => {
    const m = meter('openai-chat', Buffer.from(`data: [DONE]\n\ndata: hello\n\ndata: {not json\n\ndata: [1,2]\n\ndata: ${usageData}\n\n`));
    expect(m.usage()).toEqual(u(7, 3));
  });

  it('an upstream error page or an unknown body meters to nothing', () => {
    for (const body of ['<html><body>502 Bad Gateway</body></html>', 'upstream connect error', '\n\n\n', '']) {
      const m = meter('openai-chat', Buffer.from(body));
      expect(m.usage()).toBeUndefined();
      expect(m.textChars).toBe(0);
      expect(m.complete).toBe(false);
    }
    const error = 'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n';
    expect(meter('anthropic-messages', Buffer.from(error)).usage()).toBeUndefined();
  });
});

describe('onEvent', () => {
  it('raw bytes of the events add up to the stream, however it was chunked', () => {
    for (const body of [fixture('openai-chat.sse'), toCRLF(fixture('openai-chat.sse')), toCR(fixture('openai-chat.sse'))]) {
      for (const chunks of [[body], bytes(body), randomChunks(body, prng(7), 33)]) {
        const raws: Buffer[] = [];
        const m = new StreamMeter('openai-chat');
        m.onEvent = (e) => raws.push(Buffer.from(e.raw));
        for (const chunk of chunks) m.push(chunk);
        expect(raws).toHaveLength(7);
        // All of it, but for the LF of a final CRLF that arrived after its CR had ended the event.
        const joined = Buffer.concat(raws);
        expect(body.subarray(0, joined.length).equals(joined)).toBe(true);
        expect(['', '\n']).toContain(body.subarray(joined.length).toString());
      }
    }
  });

  it('lets a caller drop the usage chunk it asked for on the client’s behalf', () => {
    // The broker may add stream_options.include_usage; a client that did not ask must not see
    // the extra chunk. Forward every event but the one that made sawUsageChunk true.
    const body = fixture('openai-chat.sse');
    const kept: Buffer[] = [];
    const m = new StreamMeter('openai-chat');
    let seen = false;
    m.onEvent = (e) => {
      const isUsage = m.sawUsageChunk && !seen;
      seen = m.sawUsageChunk;
      if (!isUsage) kept.push(Buffer.from(e.raw));
    };
    for (const chunk of randomChunks(body, prng(3), 64)) m.push(chunk);
    expect(m.usage()).toEqual(tier(u(1200, 9, 1024), 'default'));
    const forwarded = Buffer.concat(kept);
    expect(forwarded.toString()).not.toContain('"usage":{');
    expect(forwarded.toString()).toContain('data: [DONE]');
    const client = meter('openai-chat', forwarded);
    expect(client.usage()).toBeUndefined();
    expect(client.textChars).toBe(m.textChars);
  });

  it('streamed JSON array elements are events too', () => {
    const events: MeterEvent[] = [];
    const m = new StreamMeter('gemini');
    m.onEvent = (e) => events.push(e);
    for (const chunk of randomChunks(fixture('gemini-array.json'), prng(11), 50)) m.push(chunk);
    expect(events).toHaveLength(4);
    expect(events.every((e) => e.event === undefined && e.raw.toString() === e.data)).toBe(true);
    expect(JSON.parse(events[3]!.data)).toHaveProperty('usageMetadata.candidatesTokenCount', 17);
  });

  it('a listener that throws does not derail the meter', () => {
    const m = new StreamMeter('openai-chat');
    let calls = 0;
    m.onEvent = () => {
      calls++;
      throw new Error('listener bug');
    };
    const body = fixture('openai-chat.sse');
    expect(() => m.push(body.subarray(0, 600))).toThrow('listener bug');
    m.onEvent = undefined;
    m.push(body.subarray(600));
    expect(calls).toBeGreaterThan(0);
    expect(observe(m)).toEqual(observe(meter('openai-chat', body)));
  });
});

// ---------------------------------------------------------------------------------------------

describe('bounded memory', () => {
  const MiB = 1024 * 1024;
  const usageEvent = 'data: {"choices":[],"usage":{"prompt_tokens":11,"completion_tokens":22,"total_tokens":33}}\n\n';

  function pushAll(m: StreamMeter, body: Buffer, chunkSize: number): number {
    let peak = 0;
    for (let i = 0; i < body.length; i += chunkSize) {
      m.push(body.subarray(i, i + chunkSize));
      peak = Math.max(peak, m.bufferedBytes);
    }
    return peak;
  }

  it('a 10 MiB SSE event is skipped, not buffered; the stream goes on being metered', () => {
    const huge = `data: {"choices":[{"index":0,"delta":{"content":"${'x'.repeat(10 * MiB)}"}}]}\n\n`;
    const body = Buffer.from(
      `data: {"choices":[{"index":0,"delta":{"content":"before"}}]}\n\n${huge}data: {"choices":[{"index":0,"delta":{"content":"after"}}]}\n\n${usageEvent}`,
    );
    for (const chunkSize of [64 * 1024, 1_000_003]) {
      const m = new StreamMeter('openai-chat');
      const events: string[] = [];
      m.onEvent = (e) => events.push(e.data.slice(0, 20));
      const peak = pushAll(m, body, chunkSize);
      expect(peak).toBeLessThanOrEqual(DEFAULT_MAX_EVENT_BYTES);
      expect(m.usage()).toEqual(u(11, 22));
      expect(m.textChars).toBe('before'.length + 'after'.length);
      expect(events).toHaveLength(3); // the huge one never reaches the listener either
      expect(m.bufferedBytes).toBe(0);
    }
  });

  it('a huge event in a single chunk', () => {
    const body = Buffer.from(`data: {"x":"${'y'.repeat(10 * MiB)}"}\n\n${usageEvent}`);
    const m = meter('openai-chat', body);
    expect(m.usage()).toEqual(u(11, 22));
    expect(m.bufferedBytes).toBe(0);
  });

  it('the cap is exact and configurable', () => {
    const event = Buffer.from(usageEvent);
    expect(meter('openai-chat', event, { maxEventBytes: event.length }).usage()).toEqual(u(11, 22));
    expect(meter('openai-chat', event, { maxEventBytes: event.length - 1 }).usage()).toBeUndefined();
    expect(meter('openai-chat', bytes(event), { maxEventBytes: event.length - 1 }).usage()).toBeUndefined();
    // …and the next event is metered again
    const two = Buffer.concat([Buffer.from(`data: {"pad":"${'p'.repeat(200)}"}\n\n`), event]);
    expect(meter('openai-chat', bytes(two), { maxEventBytes: event.length }).usage()).toEqual(u(11, 22));
  });

  it('hours of keep-alive comments hold nothing', () => {
    const pings = Buffer.from(': ping\n\n'.repeat(300_000)); // 2.4 MB
    const m = new StreamMeter('openai-chat');
    const peak = pushAll(m, Buffer.concat([pings, Buffer.from(usageEvent)]), 16 * 1024);
    expect(peak).toBeLessThan(64);
    expect(m.usage()).toEqual(u(11, 22));
  });

  it('a 10 MiB line that never ends holds at most the cap', () => {
    const m = new StreamMeter('openai-chat');
    const peak = pushAll(m, Buffer.from(`data: ${'z'.repeat(10 * MiB)}`), 256 * 1024);
    expect(peak).toBeLessThanOrEqual(DEFAULT_MAX_EVENT_BYTES);
    expect(m.bufferedBytes).toBe(0); // dropped once over the cap
  });

  it('a 10 MiB JSON body (embeddings) buffers only its usage', () => {
    const vectors = Array.from({ length: 700 }, (_, i) => ({
      object: 'embedding',
      index: i,
      embedding: Array.from({ length: 1536 }, (_, j) => ((i * 31 + j) % 997) / 997 - 0.5),
    }));
    const body = Buffer.from(
      JSON.stringify({
        object: 'list',
        data: vectors,
        model: 'text-embedding-3-small',
        usage: { prompt_tokens: 4321, total_tokens: 4321 },
      }),
    );
    expect(body.length).toBeGreaterThan(10 * MiB);
    const m = new StreamMeter('openai-embeddings');
    const peak = pushAll(m, body, 64 * 1024);
    expect(peak).toBeLessThan(1024);
    expect(m.usage()).toEqual(u(4321, 0));
    expect(m.complete).toBe(true);
  });

  it('a 10 MiB Gemini array element (inline image) is skipped; the others are metered', () => {
    const elements = [
      {
        candidates: [{ content: { parts: [{ text: 'Here:' }], role: 'model' }, index: 0 }],
        usageMetadata: { promptTokenCount: 5, candidatesTokenCount: 2, totalTokenCount: 7 },
      },
      {
        candidates: [
          { content: { parts: [{ inlineData: { mimeType: 'image/png', data: 'A'.repeat(10 * MiB) } }], role: 'model' }, index: 0 },
        ],
        usageMetadata: { promptTokenCount: 5, candidatesTokenCount: 1290, totalTokenCount: 1295 },
      },
      {
        candidates: [{ content: { parts: [{ text: ' done' }], role: 'model' }, finishReason: 'STOP', index: 0 }],
        usageMetadata: { promptTokenCount: 5, candidatesTokenCount: 1300, totalTokenCount: 1305 },
      },
    ];
    const body = Buffer.from(`[${elements.map((e) => JSON.stringify(e, null, 2)).join(',\r\n')}]`);
    const m = new StreamMeter('gemini');
    const peak = pushAll(m, body, 64 * 1024);
    expect(peak).toBeLessThanOrEqual(DEFAULT_MAX_EVENT_BYTES);
    expect(m.usage()).toEqual(u(5, 1300));
    expect(m.textChars).toBe('Here: done'.length);
    expect(m.complete).toBe(true);
  });
});

// ---------------------------------------------------------------------------------------------

describe('against the fake upstreams', () => {
  const KEY = 'sk-test-metering-cred-0123';
  let openai: Upstream;
  let anthropic: Upstream;
  let gemini: Upstream;
  beforeAll(async () => {
    [openai, anthropic, gemini] = await Promise.all([
      startOpenAIUpstream({ credential: KEY, streamChunks: 7 }),
      startAnthropicUpstream({ credential: KEY, streamChunks: 7 }),
      startGeminiUpstream({ credential: KEY, streamChunks: 7 }),
    ]);
  });
  afterAll(() => Promise.all([openai.close(), anthropic.close(), gemini.close()]));

  /** POSTs `body` and feeds the response to a meter chunk by chunk, as the broker would. */
  async function metered(
    provider: string,
    base: string,
    path: string,
    headers: Record<string, string>,
    body: string,
  ): Promise<StreamMeter> {
    const format = usageFormat(provider, 'POST', path);
    if (!format) throw new Error(`${provider} ${path} is not metered`);
    const res = await fetch(`${base}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });
    expect(res.status).toBe(200);
    const m = new StreamMeter(format);
    for await (const chunk of res.body!) m.push(Buffer.from(chunk as Uint8Array));
    return m;
  }

  it('OpenAI chat, streamed with include_usage and as JSON', async () => {
    const auth = { authorization: `Bearer ${KEY}` };
    const streamed = JSON.stringify({
      model: 'gpt-5',
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    const m = await metered('openai', openai.url, '/v1/chat/completions', auth, streamed);
    const chatTokens = (body: string) => openAIChatInputTokens(JSON.parse(body) as Record<string, unknown>);
    expect(observe(m)).toEqual({
      usage: tier(u(chatTokens(streamed), 7), 'default'),
      textChars: fakeAnswer(7).length,
      sawUsageChunk: true,
      complete: true,
    });
    const plain = JSON.stringify({ model: 'gpt-5', messages: [{ role: 'user', content: 'hi' }] });
    expect((await metered('openai', openai.url, '/v1/chat/completions', auth, plain)).usage()).toEqual(
      tier(u(chatTokens(plain), 7), 'default'),
    );
  });

  it('OpenAI chat streamed without include_usage: text only', async () => {
    const body = JSON.stringify({ model: 'gpt-5', messages: [{ role: 'user', content: 'hi' }], stream: true });
    const m = await metered('openai', openai.url, '/v1/chat/completions', { authorization: `Bearer ${KEY}` }, body);
    expect(m.usage()).toBeUndefined();
    expect(m.textChars).toBe(fakeAnswer(7).length);
    expect(m.finalUsage(body.length)).toEqual({ ...u(estimateTokens(body.length), estimateTokens(fakeAnswer(7).length)), estimated: true });
  });

  it('OpenAI Responses, streamed (complete and incomplete)', async () => {
    const auth = { authorization: `Bearer ${KEY}` };
    const body = JSON.stringify({ model: 'gpt-5', input: 'hi', stream: true });
    const m = await metered('openai', openai.url, '/v1/responses', auth, body);
    const responsesTokens = (b: string) => openAIResponsesInputTokens(JSON.parse(b) as Record<string, unknown>);
    expect(observe(m)).toEqual({
      usage: tier(u(responsesTokens(body), 7), 'default'),
      textChars: fakeAnswer(7).length,
      sawUsageChunk: false,
      complete: true,
    });
    const limited = JSON.stringify({ model: 'gpt-5', input: 'hi', stream: true, max_output_tokens: 3 });
    expect((await metered('openai', openai.url, '/v1/responses', auth, limited)).usage()).toEqual(
      tier(u(responsesTokens(limited), 3), 'default'),
    );
  });

  it('Anthropic messages, streamed and as JSON', async () => {
    const headers = { 'x-api-key': KEY, 'anthropic-version': '2023-06-01' };
    const streamed = JSON.stringify({
      model: 'claude-sonnet-5',
      max_tokens: 64,
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
    });
    const m = await metered('anthropic', anthropic.url, '/v1/messages', headers, streamed);
    expect(observe(m)).toEqual({
      usage: tier(u(fakeTokenCount(streamed), 7), 'standard'),
      textChars: fakeAnswer(7).length,
      sawUsageChunk: false,
      complete: true,
    });
    const plain = JSON.stringify({ model: 'claude-sonnet-5', max_tokens: 4, messages: [{ role: 'user', content: 'hi' }] });
    expect((await metered('anthropic', anthropic.url, '/v1/messages', headers, plain)).usage()).toEqual(
      tier(u(fakeTokenCount(plain), 4), 'standard'),
    );
  });

  it('Gemini, as SSE (CRLF), as a streamed JSON array and as JSON', async () => {
    const headers = { 'x-goog-api-key': KEY };
    const body = JSON.stringify({ contents: [{ role: 'user', parts: [{ text: 'hi' }] }] });
    const expected = { usage: u(fakeTokenCount(body), 7), textChars: fakeAnswer(7).length, sawUsageChunk: false, complete: true };
    expect(
      observe(await metered('gemini', gemini.url, '/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse', headers, body)),
    ).toEqual(expected);
    expect(observe(await metered('gemini', gemini.url, '/v1beta/models/gemini-2.5-flash:streamGenerateContent', headers, body))).toEqual(
      expected,
    );
    expect((await metered('gemini', gemini.url, '/v1beta/models/gemini-2.5-flash:generateContent', headers, body)).usage()).toEqual(
      expected.usage,
    );
  });
});

// ---------------------------------------------------------------------------------------------

describe('estimateTokens', () => {
  it('is ceil(chars / 4), and 0 for nothing', () => {
    expect([0, 1, 4, 5, 8, 9, 4000].map(estimateTokens)).toEqual([0, 1, 1, 2, 2, 3, 1000]);
    expect([-3, Number.NaN, Number.POSITIVE_INFINITY].map(estimateTokens)).toEqual([0, 0, 0]);
  });
});

describe('performance (smoke check, not a benchmark)', () => {
  /** Best of five runs, so one GC pause or a busy CI neighbour does not fail the suite. */
  function bestMs(run: () => void): number {
    let best = Number.POSITIVE_INFINITY;
    for (let i = 0; i < 5; i++) {
      const t0 = performance.now();
      run();
      best = Math.min(best, performance.now() - t0);
    }
    return best;
  }

  it('a 1 MiB SSE stream parses in well under 50 ms', () => {
    const events: string[] = [];
    let size = 0;
    for (let i = 0; size < 1024 * 1024; i++) {
      const e = `data: ${JSON.stringify({ id: 'chatcmpl-perf', object: 'chat.completion.chunk', created: 1764000000, model: 'gpt-4.1', choices: [{ index: 0, delta: { content: ` token${i}` }, logprobs: null, finish_reason: null }], usage: null })}\n\n`;
      events.push(e);
      size += e.length;
    }
    events.push('data: {"choices":[],"usage":{"prompt_tokens":1,"completion_tokens":2,"total_tokens":3}}\n\ndata: [DONE]\n\n');
    const body = Buffer.from(events.join(''));
    const chunks = randomChunks(body, prng(1), 16 * 1024);
    let m = new StreamMeter('openai-chat');
    const ms = bestMs(() => {
      m = new StreamMeter('openai-chat');
      for (const c of chunks) m.push(c);
    });
    expect(m.usage()).toEqual(u(1, 2));
    expect(ms).toBeLessThan(50);
  });

  it('a 1 MiB JSON body scans in well under 50 ms', () => {
    const body = Buffer.from(
      JSON.stringify({
        data: [{ embedding: Array.from({ length: 70_000 }, (_, i) => i / 7) }],
        usage: { prompt_tokens: 3, total_tokens: 3 },
      }),
    );
    expect(body.length).toBeGreaterThan(1024 * 1024);
    const chunks = randomChunks(body, prng(2), 16 * 1024);
    let m = new StreamMeter('openai-embeddings');
    const ms = bestMs(() => {
      m = new StreamMeter('openai-embeddings');
      for (const c of chunks) m.push(c);
    });
    expect(m.usage()).toEqual(u(3, 0));
    expect(ms).toBeLessThan(50);
  });
});
