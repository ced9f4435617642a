/**
 * Limits that hold for what agents really send, tried through `till serve` with the official
 * SDKs against upstreams that bill as the providers do (test/support/upstreams.ts): holds that
 * are true upper bounds (server-side context, media, tools, premiums), that follow a stream
 * instead of taking its worst case, and that end a stream the key can no longer cover.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import Anthropic from '@anthropic-ai/sdk';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import WebSocket from 'ws';
import type { KeySummary, TillEvent } from '../src/core/events';
import { openResponsesSocket } from './support/responsesSocket';
import { serveTill, type Broker } from './support/served';
import { addCredential, fakeCredential, tempHome } from './support/till';
import {
  CACHED_CONTENT_TOKENS,
  IMAGE_TOKENS,
  openAIResponsesInputTokens,
  SEARCH_RESULT_TOKENS,
  startAnthropicUpstream,
  startGeminiUpstream,
  startOpenAIUpstream,
  type Upstream,
} from './support/upstreams';
import { waitFor } from './support/wait';

const creds = {
  openai: fakeCredential('holds-openai'),
  anthropic: fakeCredential('holds-anthropic'),
  gemini: fakeCredential('holds-gemini'),
};
/** Dear models, so that a few calls reach a small limit: USD per million tokens. */
const PRICES = {
  models: {
    anthropic: { 'pricey-claude': { input: 100, output: 1000 } },
    openai: { 'pricey-gpt': { input: 100, output: 1000 } },
  },
};

let openai: Upstream;
let anthropic: Upstream;
let gemini: Upstream;
let broker: Broker;

/** A data folder with the three credentials and PRICES, and `till serve` in front of `ups`. */
async function serveWith(ups: { openai: Upstream; anthropic: Upstream; gemini: Upstream }): Promise<Broker> {
  const home = tempHome();
  for (const p of ['openai', 'anthropic', 'gemini'] as const) await addCredential(home, p, p, creds[p]);
  writeFileSync(join(home, 'prices.json'), JSON.stringify(PRICES));
  return serveTill(home, {
    env: { TILL_UPSTREAM_OPENAI: `${ups.openai.url}/v1`, TILL_UPSTREAM_ANTHROPIC: ups.anthropic.url, TILL_UPSTREAM_GEMINI: ups.gemini.url },
  });
}

beforeAll(async () => {
  [openai, anthropic, gemini] = await Promise.all([
    startOpenAIUpstream({ credential: creds.openai, websocket: true }),
    startAnthropicUpstream({ credential: creds.anthropic }),
    startGeminiUpstream({ credential: creds.gemini }),
  ]);
  broker = await serveWith({ openai, anthropic, gemini });
});
afterAll(async () => {
  await broker?.close();
  await Promise.all([openai, anthropic, gemini].map((u) => u?.close()));
});

const openaiClient = (k: { key: string; baseUrl: string }) => new OpenAI({ apiKey: k.key, baseURL: k.baseUrl, maxRetries: 0 });
const anthropicClient = (k: { key: string; baseUrl: string }) => new Anthropic({ apiKey: k.key, baseURL: k.baseUrl, maxRetries: 0 });
/** Micro-dollars, rounded up as Till counts them, of tokens at USD-per-million rates. */
const micros = (...parts: [tokens: number, usdPerMillion: number][]) => Math.ceil(parts.reduce((sum, [n, rate]) => sum + n * rate, 0));

describe('parallel agents on a dollar key', () => {
  it('serves four Claude-Code-shaped streams at once on $5, and counts exactly what the upstream billed', async () => {
    // Four subagents: a 48 KB cached system prompt, max_tokens 128,000 each (Claude Code's),
    // Opus 5.5. Held at their worst case, the first took the whole budget and two were refused.
    const k = await broker.issue({ target: 'anthropic', maxSpend: 5 });
    const system = [
      {
        type: 'text' as const,
        text: `You are Claude Code. ${'Follow the repository conventions; read before you write. '.repeat(850)}`,
        cache_control: { type: 'ephemeral' as const },
      },
    ];
    expect(Buffer.byteLength(system[0]!.text)).toBeGreaterThan(48_000);
    const client = anthropicClient(k);
    const answers = await Promise.all(
      Array.from({ length: 4 }, (_, i) =>
        client.messages
          .stream({
            model: 'claude-opus-5-5',
            max_tokens: 128_000,
            system,
            thinking: { type: 'adaptive' } as never,
            messages: [{ role: 'user', content: `subagent ${i}: look at the tests` }],
          })
          .finalMessage(),
      ),
    );
    expect(answers).toHaveLength(4);
    // Each went on with the client's own cap: the key could cover it.
    for (const r of anthropic.received.slice(-4)) expect((JSON.parse(r.body) as { max_tokens: number }).max_tokens).toBe(128_000);
    // Opus 5.5: $4 input, $5 cache write, $0.20 cache read, $20 output per million.
    const billed = answers.reduce(
      (sum, a) =>
        sum +
        micros(
          [a.usage.input_tokens, 4],
          [a.usage.cache_creation_input_tokens ?? 0, 5],
          [a.usage.cache_read_input_tokens ?? 0, 0.2],
          [a.usage.output_tokens, 20],
        ),
      0,
    );
    const key = await broker.key(k.id);
    expect(key.used.spend).toBe(billed);
    expect(key.estimatedSpend).toBe(0);
    expect(key.reserved.spend ?? 0).toBe(0);
  });

  it('asks a request refused for what others hold to retry, and serves it once they end (the SDK retries on its own)', async () => {
    // Parallel agents on one budget: what the others hold is at its most and settles at what they
    // used. A request refused for it used to be told not to retry, though it fits once they end.
    const gathered = await startOpenAIUpstream({ credential: creds.openai, gather: 2 });
    const b = await serveWith({ openai: gathered, anthropic, gemini });
    try {
      const k = await b.issue({ target: 'openai', maxTokens: 3_000 });
      const other = await b.issue({ target: 'openai' });
      const ask = (key: typeof k, maxTokens: number, maxRetries: number, content = 'hi') =>
        new OpenAI({ apiKey: key.key, baseURL: key.baseUrl, maxRetries }).chat.completions.create({
          model: 'gpt-5',
          max_tokens: maxTokens,
          messages: [{ role: 'user', content }],
        });
      // About 200 tokens of input: more than the first leaves, a fraction of the key.
      const context = 'look at the tests '.repeat(50);
      // The first holds its whole cap: nearly all of the key, until the upstream answers.
      const first = ask(k, 2_950, 0);
      await gathered.waitForRequests(1);
      // The second does not fit beside it, not even with its output lowered: refused at once with
      // Retry-After (the SDK waits and tries again).
      const raw = await fetch(`${k.baseUrl}/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${k.key}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'gpt-5', max_tokens: 100, messages: [{ role: 'user', content: context }] }),
      });
      expect(raw.status).toBe(429);
      expect(raw.headers.get('retry-after')).toBe('1');
      expect(raw.headers.get('x-should-retry')).toBeNull();
      expect(await raw.text()).toMatch(/held by requests in flight.*it may fit once the requests in flight end: retry/);
      const denied = () => b.events().filter((e) => e.type === 'request.denied' && e.request.keyId === k.id).length;
      const second = ask(k, 100, 2, context);
      await waitFor('the second to be refused once', async () => denied() === 2);
      // Another key's request lets the upstream answer both in flight: the first settles small.
      await ask(other, 10, 0);
      const a = await first;
      // The retry reached the upstream (which answers it beside another request).
      await gathered.waitForRequests(3);
      await ask(other, 10, 0);
      const c = await second;
      expect(a.choices.length).toBe(1);
      expect(c.choices.length).toBe(1);
      const key = await b.key(k.id);
      expect(key.used.activations).toBe(2);
      expect(key.used.tokens).toBe(a.usage!.total_tokens + c.usage!.total_tokens);
      expect(key.reserved.tokens ?? 0).toBe(0);
    } finally {
      await b.close();
      await gathered.close();
    }
  });

  it('over a WebSocket, refuses only the turn that what others hold leaves no room for: the session goes on', async () => {
    const gathered = await startOpenAIUpstream({ credential: creds.openai, gather: 2, websocket: true });
    const b = await serveWith({ openai: gathered, anthropic, gemini });
    try {
      const k = await b.issue({ target: 'openai', maxTokens: 3_000 });
      const other = await b.issue({ target: 'openai' });
      const client = (key: typeof k) => new OpenAI({ apiKey: key.key, baseURL: key.baseUrl, maxRetries: 0 });
      const first = client(k).chat.completions.create({ model: 'gpt-5', max_tokens: 2_950, messages: [{ role: 'user', content: 'hi' }] });
      await gathered.waitForRequests(1);
      const socket = await openResponsesSocket(`${b.url.replace('http', 'ws')}/openai/v1/responses`, k.key);
      const turn = () => socket.create({ model: 'gpt-5', input: 'look at the tests '.repeat(50) });
      const refused = await turn();
      expect(refused.type).toBe('error');
      expect(JSON.stringify(refused)).toMatch(/held by requests in flight.*it may fit once the requests in flight end: retry/);
      expect(socket.ws.readyState).toBe(WebSocket.OPEN);
      // The other request ends (another key's request lets the upstream answer both): the next turn goes through.
      await client(other).chat.completions.create({ model: 'gpt-5', max_tokens: 10, messages: [{ role: 'user', content: 'hi' }] });
      await first;
      expect((await turn()).type).toBe('response.completed');
      socket.ws.close();
    } finally {
      await b.close();
      await gathered.close();
    }
  });

  it('tells a request the key can no longer cover, with nothing in flight, not to retry', async () => {
    const k = await broker.issue({ target: 'openai', maxTokens: 40 });
    const r = await fetch(`${k.baseUrl}/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${k.key}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'gpt-5', messages: [{ role: 'user', content: 'hi '.repeat(200) }] }),
    });
    expect(r.status).toBe(429);
    expect(r.headers.get('x-should-retry')).toBe('false');
    expect(r.headers.get('retry-after')).toBeNull();
    expect(await r.text()).toMatch(/0 held by requests in flight/);
  });

  it('holds a stream at its input and a first slice of output, and the hold follows it', async () => {
    // Held whole, a 128,000-token cap on a $2 key left room for nothing else.
    const slow = await startAnthropicUpstream({ credential: creds.anthropic, streamChunks: 3000, streamDelayMs: 1 });
    const b = await serveWith({ openai, anthropic: slow, gemini });
    try {
      const k = await b.issue({ target: 'anthropic', maxSpend: 2 });
      const client = anthropicClient(k);
      const stream = client.messages.stream({
        model: 'claude-sonnet-5',
        max_tokens: 128_000,
        messages: [{ role: 'user', content: 'write a long story' }],
      });
      const held: number[] = [];
      let n = 0;
      for await (const e of stream) {
        if (e.type !== 'content_block_delta') continue;
        if (++n % 500 === 0) held.push((await b.key(k.id)).reserved.spend ?? 0);
      }
      const final = await stream.finalMessage();
      // Sonnet 5: the first hold is far below the $1.28 of its whole cap, and it grows as the story does.
      const started = b
        .events()
        .find((e): e is Extract<TillEvent, { type: 'request.started' }> => e.type === 'request.started' && e.request.keyId === k.id)!;
      expect(started.held!.spend!).toBeLessThan(100_000);
      expect(held.at(-1)!).toBeGreaterThan(held[0]!);
      const key = await b.key(k.id);
      expect(key.used.spend).toBe(micros([final.usage.input_tokens, 2], [final.usage.output_tokens, 10]));
      expect(key.reserved.spend ?? 0).toBe(0);
    } finally {
      await b.close();
      await slow.close();
    }
  });
});

describe('what the provider adds from its own state', () => {
  /** A first Responses answer carrying about 100,000 tokens of input, made through `via`. */
  async function bigConversation(via: OpenAI): Promise<{ id: string; tokens: number }> {
    const r = await via.responses.create({ model: 'gpt-5', input: ' word'.repeat(100_000) });
    return { id: r.id, tokens: r.usage!.input_tokens + r.usage!.output_tokens };
  }

  it('refuses a continuation (previous_response_id) of 100K tokens on a 20K key, over HTTP and WebSocket, whether Till saw the conversation or not', async () => {
    // A 40-byte body that continues a stored conversation is billed for all of it as input.
    const open = await broker.issue({ target: 'openai' });
    const seen = await bigConversation(openaiClient(open));
    expect(seen.tokens).toBeGreaterThan(100_000);
    const unseen = await bigConversation(new OpenAI({ apiKey: creds.openai, baseURL: `${openai.url}/v1`, maxRetries: 0 }));
    const k = await broker.issue({ target: 'openai', maxTokens: 20_000 });
    const before = openai.received.length;
    await expect(openaiClient(k).responses.create({ model: 'gpt-5', input: 'go on', previous_response_id: seen.id })).rejects.toThrow(
      new RegExp(`till key out of tokens: 0 of 20,000 tokens used.*plus ${seen.tokens.toLocaleString('en-US')} tokens of the conversation`),
    );
    await expect(openaiClient(k).responses.create({ model: 'gpt-5', input: 'go on', previous_response_id: unseen.id })).rejects.toThrow(
      /context window of gpt-5.*which Till has not seen/,
    );
    expect(openai.received.length).toBe(before);

    const ws = new WebSocket(`${broker.url.replace('http', 'ws')}/openai/v1/responses`, { headers: { authorization: `Bearer ${k.key}` } });
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    const messages = openai.socketMessages.length;
    const refused = new Promise<Record<string, unknown>>((resolve) =>
      ws.on('message', (d) => resolve(JSON.parse(d.toString()) as Record<string, unknown>)),
    );
    ws.send(
      JSON.stringify({
        type: 'response.create',
        model: 'gpt-5',
        previous_response_id: seen.id,
        input: [{ type: 'message', role: 'user', content: [{ type: 'input_text', text: 'go on' }] }],
      }),
    );
    expect(JSON.stringify(await refused)).toMatch(/till key out of tokens/);
    expect(openai.socketMessages.length).toBe(messages);
    ws.close();
    expect((await broker.key(k.id)).used.tokens ?? 0).toBe(0);
  });

  it('serves a continuation the key can cover, holding the whole conversation, never over', async () => {
    const open = await broker.issue({ target: 'openai' });
    const seen = await bigConversation(openaiClient(open));
    const k = await broker.issue({ target: 'openai', maxTokens: 150_000 });
    const r = await openaiClient(k).responses.create({ model: 'gpt-5', input: 'go on', previous_response_id: seen.id });
    expect(r.usage!.input_tokens).toBeGreaterThan(seen.tokens);
    const started = broker
      .events()
      .find((e): e is Extract<TillEvent, { type: 'request.started' }> => e.type === 'request.started' && e.request.keyId === k.id)!;
    expect(started.held!.tokens!).toBeGreaterThanOrEqual(r.usage!.input_tokens + r.usage!.output_tokens);
    expect(started.basis).toMatch(/tokens of the conversation .* continues/);
    const key = await broker.key(k.id);
    expect(key.used.tokens).toBe(r.usage!.input_tokens + r.usage!.output_tokens);
  });

  it('carries a WebSocket prewarm into the response that continues it: held for its input, never over', async () => {
    // Codex prewarms (generate: false) with its instructions and tools, then continues from the
    // prewarm with previous_response_id: the prewarm bills nothing, the continuation its input.
    // Remembered as the prewarm's zero tokens, the continuation was held for its few bytes only.
    const instructions = `You are Codex. ${'Read the code before you change it, and run the tests. '.repeat(2_500)}`;
    const prewarmTokens = openAIResponsesInputTokens({ model: 'gpt-5', instructions, input: [] });
    expect(prewarmTokens).toBeGreaterThan(25_000);
    const url = `${broker.url.replace('http', 'ws')}/openai/v1/responses`;
    const chain = async (maxTokens: number) => {
      const k = await broker.issue({ target: 'openai', maxTokens });
      const socket = await openResponsesSocket(url, k.key);
      const prewarm = await socket.create({ model: 'gpt-5', generate: false, instructions, input: [] });
      expect(prewarm.type).toBe('response.completed');
      const next = await socket.create({
        model: 'gpt-5',
        previous_response_id: (prewarm.response as { id: string }).id,
        input: [{ type: 'message', role: 'user', content: [{ type: 'input_text', text: 'go on' }] }],
      });
      socket.ws.close();
      return { k, next };
    };

    const small = await chain(20_000);
    expect(small.next.type).toBe('error');
    expect(JSON.stringify(small.next)).toMatch(/till key out of tokens: 0 of 20,000 tokens used.*tokens of the conversation/);
    expect((await broker.key(small.k.id)).used.tokens ?? 0).toBe(0);

    const large = await chain(100_000);
    expect(large.next.type).toBe('response.completed');
    const usage = (large.next.response as { usage: { input_tokens: number; total_tokens: number } }).usage;
    expect(usage.input_tokens).toBeGreaterThan(prewarmTokens);
    const started = broker
      .events()
      .find((e): e is Extract<TillEvent, { type: 'request.started' }> => e.type === 'request.started' && e.request.keyId === large.k.id)!;
    expect(started.held!.tokens!).toBeGreaterThanOrEqual(usage.total_tokens);
    expect((await broker.key(large.k.id)).used.tokens).toBe(usage.total_tokens);
  });

  it('bounds an image by URL by the most an image can cost; refuses a file by id and cached content on a small key', async () => {
    // Their tokens are counted by the provider after it fetches them: the body does not show them.
    const small = await broker.issue({ target: 'openai', maxTokens: 1_000 });
    const image = {
      role: 'user' as const,
      content: [
        { type: 'text' as const, text: 'what is this?' },
        { type: 'image_url' as const, image_url: { url: 'https://example.com/cat.png' } },
      ],
    };
    await expect(openaiClient(small).chat.completions.create({ model: 'gpt-5', messages: [image] })).rejects.toThrow(
      /till key out of tokens.*and 1 image/,
    );
    const k = await broker.issue({ target: 'openai', maxTokens: 20_000 });
    const answer = await openaiClient(k).chat.completions.create({ model: 'gpt-5', messages: [image] });
    expect(answer.usage!.prompt_tokens).toBeGreaterThan(IMAGE_TOKENS);
    expect((await broker.key(k.id)).used.tokens).toBe(answer.usage!.total_tokens);

    const before = openai.received.length + gemini.received.length;
    await expect(
      openaiClient(k).responses.create({
        model: 'gpt-5',
        input: [
          {
            type: 'message',
            role: 'user',
            content: [
              { type: 'input_file', file_id: 'file-abc123' },
              { type: 'input_text', text: 'summarise' },
            ],
          },
        ],
      }),
    ).rejects.toThrow(/context window of gpt-5.*a file by id/);
    const g = await broker.issue({ target: 'gemini', maxTokens: 20_000 });
    const cached = await fetch(`${g.baseUrl}/v1beta/models/gemini-2.5-flash:generateContent`, {
      method: 'POST',
      headers: { 'x-goog-api-key': g.key, 'content-type': 'application/json' },
      body: JSON.stringify({ cachedContent: 'cachedContents/abc', contents: [{ role: 'user', parts: [{ text: 'and then?' }] }] }),
    });
    expect(cached.status).toBe(429);
    expect(((await cached.json()) as { error: { message: string } }).error.message).toMatch(/cached content/);
    expect(openai.received.length + gemini.received.length).toBe(before);
    // On a key large enough, cached content is held for the context window and billed as reported.
    const big = await broker.issue({ target: 'gemini', maxTokens: 2_000_000 });
    const ok = await fetch(`${big.baseUrl}/v1beta/models/gemini-2.5-flash:generateContent`, {
      method: 'POST',
      headers: { 'x-goog-api-key': big.key, 'content-type': 'application/json' },
      body: JSON.stringify({ cachedContent: 'cachedContents/abc', contents: [{ role: 'user', parts: [{ text: 'and then?' }] }] }),
    });
    const usage = ((await ok.json()) as { usageMetadata: { promptTokenCount: number; totalTokenCount: number } }).usageMetadata;
    expect(usage.promptTokenCount).toBeGreaterThan(CACHED_CONTENT_TOKENS);
    expect((await broker.key(big.id)).used.tokens).toBe(usage.totalTokenCount);
  });

  it("follows a stream's web searches call by call when the request does not limit them (Codex sends web_search so)", async () => {
    const k = await broker.issue({ target: 'openai', maxSpend: 2 });
    const stream = await openaiClient(k).responses.create({
      model: 'gpt-5.4',
      input: 'weather in Paris',
      tools: [{ type: 'web_search' }],
      stream: true,
    });
    let searched = false;
    let usage: OpenAI.Responses.ResponseUsage | undefined;
    for await (const e of stream) {
      if (e.type === 'response.output_item.added' && e.item.type === 'web_search_call') searched = true;
      if (e.type === 'response.completed') usage = e.response.usage ?? undefined;
    }
    expect(searched).toBe(true);
    // Held at first: the body, one search's results (16,000 tokens) and its fee, and a slice of output.
    const started = broker
      .events()
      .find((e): e is Extract<TillEvent, { type: 'request.started' }> => e.type === 'request.started' && e.request.keyId === k.id)!;
    expect(started.basis).toMatch(/plus up to 16,000 tokens of server-side tool results/);
    expect(started.held!.spend).toBeGreaterThanOrEqual(16_000 * 2.5 + 10_000);
    // Settled as billed: tokens at GPT-5.4's rates and $0.01 for the search.
    const key = await broker.key(k.id);
    expect(key.used.spend).toBe(micros([usage!.input_tokens, 2.5], [usage!.output_tokens, 15]) + 10_000);
    expect(key.reserved.spend ?? 0).toBe(0);
  });

  it('follows Anthropic web searches too: the prompt reported first, the results after', async () => {
    const k = await broker.issue({ target: 'anthropic', maxSpend: 1 });
    const stream = anthropicClient(k).messages.stream({
      model: 'claude-sonnet-5',
      max_tokens: 256,
      tools: [{ type: 'web_search_20250305', name: 'web_search' }],
      messages: [{ role: 'user', content: 'weather in Paris' }],
    });
    const final = await stream.finalMessage();
    expect(final.content.some((b) => b.type === 'server_tool_use')).toBe(true);
    const searches = final.usage.server_tool_use?.web_search_requests ?? 0;
    expect(searches).toBe(1);
    // Sonnet 5: $2 input, $10 output per million; $0.01 a search.
    expect((await broker.key(k.id)).used.spend).toBe(micros([final.usage.input_tokens, 2], [final.usage.output_tokens, 10]) + 10_000);
  });

  it('ends a stream before another web search the key cannot cover, and bills what ran', async () => {
    const up = await startOpenAIUpstream({ credential: creds.openai, streamChunks: 50, streamDelayMs: 5 });
    const b = await serveWith({ openai: up, anthropic, gemini });
    try {
      // pricey-gpt: $100 input per million, so one search's results (held at 16,000 tokens) cost
      // $1.60: $2.50 holds the first search ahead, not a second one.
      const k = await b.issue({ target: 'openai', maxSpend: 2.5 });
      const stream = await openaiClient(k).responses.create({
        model: 'pricey-gpt',
        input: 'weather in Paris and in Rome',
        tools: [{ type: 'web_search' }, { type: 'web_search' }],
        stream: true,
      });
      const seen: string[] = [];
      let error: OpenAI.Responses.ResponseErrorEvent | undefined;
      for await (const e of stream) {
        seen.push(e.type === 'response.output_item.added' ? `added ${e.item.type}` : e.type);
        if (e.type === 'error') error = e;
      }
      // Ended with the Responses API's own error event, numbered after the last event sent.
      expect(seen.at(-1)).toBe('error');
      expect(error).toMatchObject({
        code: 'till_exhausted',
        param: null,
        message: expect.stringMatching(
          /^till: till key over budget: .* the stream was ended: the key cannot cover another server-side tool call/,
        ),
      });
      expect(error!.sequence_number).toBeGreaterThan(0);
      expect(seen).not.toContain('response.completed');
      await waitFor('the cut stream to settle', async () => (await b.key(k.id)).inFlight === 0 && up.inFlight() === 0);
      // The first search ran, the second never started.
      expect(up.billed.inputTokens).toBe(
        openAIResponsesInputTokens(JSON.parse(up.received.at(-1)!.body) as Record<string, unknown>) + SEARCH_RESULT_TOKENS,
      );
      // One search ran (its results and fee billed); the bill stays within the key, and so does the count.
      const billed = Math.ceil(up.billed.inputTokens * 100 + up.billed.outputTokens * 1000) + 10_000;
      expect(billed).toBeLessThanOrEqual(2_500_000);
      const key = await b.key(k.id);
      expect(key.used.spend!).toBeGreaterThanOrEqual(billed);
      expect(key.used.spend!).toBeLessThanOrEqual(2_500_000);
    } finally {
      await b.close();
      await up.close();
    }
  });

  it('bills a web search tool its fee; refuses one whose calls are not limited on a spend key, not streamed', async () => {
    // Server-side tools add their results as input and a fee per call.
    const k = await broker.issue({ target: 'openai', maxSpend: 5 });
    const tools = [{ type: 'web_search' as const }];
    // Not streamed, the calls cannot be followed: limit them.
    await expect(openaiClient(k).responses.create({ model: 'gpt-5.4', input: 'weather in Paris', tools })).rejects.toThrow(
      /web_search, billed \$0\.01 per call, with no limit on its calls: set max_tool_calls \(or stream the request\)/,
    );
    const r = await openaiClient(k).responses.create({
      model: 'gpt-5.4',
      input: 'weather in Paris',
      tools,
      max_tool_calls: 1,
    } as OpenAI.Responses.ResponseCreateParamsNonStreaming);
    expect(r.output.some((o) => o.type === 'web_search_call')).toBe(true);
    // GPT-5.4: $2.50 input, $15 output per million, and $0.01 per search.
    expect((await broker.key(k.id)).used.spend).toBe(micros([r.usage!.input_tokens, 2.5], [r.usage!.output_tokens, 15]) + 10_000);
  });
});

describe('what providers bill beyond the list price', () => {
  it('prices a 1-hour cache write at its rate', async () => {
    const k = await broker.issue({ target: 'anthropic', maxSpend: 5 });
    const system = [
      {
        type: 'text' as const,
        text: `Stable instructions ${Date.now()}. ${'Keep answers short. '.repeat(300)}`,
        cache_control: { type: 'ephemeral' as const, ttl: '1h' as const },
      },
    ];
    const r = await anthropicClient(k).messages.create({
      model: 'claude-sonnet-5',
      max_tokens: 64,
      system: system,
      messages: [{ role: 'user', content: 'hi' }],
    });
    const hour = (r.usage as unknown as { cache_creation: { ephemeral_1h_input_tokens: number } }).cache_creation.ephemeral_1h_input_tokens;
    expect(hour).toBeGreaterThan(0);
    // Sonnet 5: $2 input, $4 per million for 1-hour writes (twice the input), $10 output.
    expect((await broker.key(k.id)).used.spend).toBe(micros([r.usage.input_tokens, 2], [hour, 4], [r.usage.output_tokens, 10]));
  });

  it('holds a request whose input may cross a long-context tier at the higher rate, and settles at the rate it was billed', async () => {
    // Gemini 2.5 Pro bills the whole request at $2.50 / $15 above 200K input tokens ($1.25 / $10 below).
    const k = await broker.issue({ target: 'gemini', maxSpend: 5 });
    const text = ' lorem'.repeat(90_000);
    const res = await fetch(`${k.baseUrl}/v1beta/models/gemini-2.5-pro:generateContent`, {
      method: 'POST',
      headers: { 'x-goog-api-key': k.key, 'content-type': 'application/json' },
      body: JSON.stringify({ contents: [{ role: 'user', parts: [{ text }] }] }),
    });
    const usage = ((await res.json()) as { usageMetadata: { promptTokenCount: number; candidatesTokenCount: number } }).usageMetadata;
    const started = broker
      .events()
      .find((e): e is Extract<TillEvent, { type: 'request.started' }> => e.type === 'request.started' && e.request.keyId === k.id)!;
    // The body's 540 KB may be 540K tokens: held at the tier's $2.50.
    expect(started.held!.spend!).toBeGreaterThanOrEqual(540_000 * 2.5);
    // It was 135K tokens: billed, and counted, at the standard rates.
    expect(usage.promptTokenCount).toBeLessThan(200_000);
    expect((await broker.key(k.id)).used.spend).toBe(micros([usage.promptTokenCount, 1.25], [usage.candidatesTokenCount, 10]));
  });

  it('prices the priority tier as billed', async () => {
    const k = await broker.issue({ target: 'openai', maxSpend: 5 });
    const r = await openaiClient(k).chat.completions.create({
      model: 'gpt-5.4',
      service_tier: 'priority',
      messages: [{ role: 'user', content: 'quick' }],
    });
    expect(r.service_tier).toBe('priority');
    // GPT-5.4 priority: twice $2.50 / $15.
    expect((await broker.key(k.id)).used.spend).toBe(micros([r.usage!.prompt_tokens, 5], [r.usage!.completion_tokens, 30]));
  });
});

describe('the whole limit, exactly', () => {
  it('serves 200 tokens in and 1,800 out on a 2,000-token key, and says it is spent', async () => {
    // Held at one token per body byte, the prompt took four times its tokens and the answer was
    // lowered to fit: the key could never reach 100 %, so its alert never fired.
    const up = await startOpenAIUpstream({ credential: creds.openai, streamChunks: 1800 });
    const b = await serveWith({ openai: up, anthropic, gemini });
    try {
      const k = await b.issue({ target: 'openai', maxTokens: 2000 });
      // 3 per message + role + 193 words + 3 to prime the answer: 200 tokens, as OpenAI counts them.
      const messages = [{ role: 'user' as const, content: ' word'.repeat(193) }];
      const r = await openaiClient(k).chat.completions.create({ model: 'gpt-5', max_tokens: 1800, messages });
      expect(r.usage!.prompt_tokens).toBe(200);
      expect(r.usage!.completion_tokens).toBe(1800);
      expect((JSON.parse(up.received.at(-1)!.body) as { max_tokens: number }).max_tokens).toBe(1800);
      const key = await b.key(k.id);
      expect(key.used.tokens).toBe(2000);
      expect(key.state).toBe('exhausted');
      await waitFor('the 100 % alert', () =>
        b.events().some((e) => e.type === 'key.exhausted' && e.key.id === k.id && e.meter === 'tokens'),
      );
    } finally {
      await b.close();
      await up.close();
    }
  });
  it('says a key is spent once it cannot serve the smallest request, though its figures are short of the limit', async () => {
    const up = await startOpenAIUpstream({ credential: creds.openai, streamChunks: 1795 });
    const b = await serveWith({ openai: up, anthropic, gemini });
    try {
      const k = await b.issue({ target: 'openai', maxTokens: 2000 });
      const messages = [{ role: 'user' as const, content: ' word'.repeat(193) }];
      await openaiClient(k).chat.completions.create({ model: 'gpt-5', max_tokens: 1795, messages });
      // 1,995 of 2,000 used: 5 tokens cannot carry even "hi" (8) and one token of answer.
      expect((await b.key(k.id)).used.tokens).toBe(1995);
      await waitFor('the 100 % alert', () =>
        b.events().some((e) => e.type === 'key.exhausted' && e.key.id === k.id && e.meter === 'tokens'),
      );
      await expect(
        openaiClient(k).chat.completions.create({ model: 'gpt-5', messages: [{ role: 'user', content: 'hi' }] }),
      ).rejects.toThrow(/1,995 of 2,000 tokens used, 0 held by requests in flight, 5 left; this request needs at least 9 tokens/);
    } finally {
      await b.close();
      await up.close();
    }
  });
});

describe('streams cut mid-answer', () => {
  /** 200 streams at once on `key`, each left by its client after a random number of deltas. */
  async function cutStreams(start: (signal: AbortSignal) => Promise<AsyncIterable<unknown>>): Promise<void> {
    let seed = 7;
    const random = () => (seed = (seed * 1103515245 + 12345) % 2 ** 31) / 2 ** 31;
    await Promise.all(
      Array.from({ length: 200 }, async () => {
        const stop = new AbortController();
        const after = 20 + Math.floor(random() * 200);
        try {
          let n = 0;
          for await (const _ of await start(stop.signal)) if (++n >= after) stop.abort();
        } catch {
          // refused, or cut by the abort: both expected
        }
      }),
    );
  }

  it('never lets 200 cut streams bill more than $1, and counts what the upstream billed', async () => {
    // Clients leave mid-answer; the upstream goes on generating 50 tokens after each and bills
    // them. An aborted stream was settled at the usage its first event reported.
    const up = await startAnthropicUpstream({
      credential: creds.anthropic,
      streamChunks: 600,
      streamDelayMs: 2,
      afterDisconnectTokens: 50,
    });
    const b = await serveWith({ openai, anthropic: up, gemini });
    try {
      const k = await b.issue({ target: 'anthropic', maxSpend: 1 });
      const client = anthropicClient(k);
      await cutStreams(async (signal) =>
        client.messages.stream(
          { model: 'pricey-claude', max_tokens: 1000, messages: [{ role: 'user', content: 'tell me everything' }] },
          { signal },
        ),
      );
      await waitFor('every stream to settle', async () => (await b.key(k.id)).inFlight === 0 && up.inFlight() === 0);
      const key = await b.key(k.id);
      // pricey-claude: $100 input, $1,000 output per million.
      const billed = Math.ceil(up.billed.inputTokens * 100 + up.billed.outputTokens * 1000);
      expect(billed).toBeLessThanOrEqual(1_000_000);
      expect(key.used.spend!).toBeLessThanOrEqual(1_000_000);
      expect(Math.abs(key.used.spend! - billed) / billed).toBeLessThan(0.03);
      expect(key.estimatedSpend).toBeGreaterThan(0);
      console.log(
        `cut streams, $1: ${up.billed.answers} served, billed $${(billed / 1e6).toFixed(4)}, counted $${(key.used.spend! / 1e6).toFixed(4)} (${key.estimatedSpend > 0 ? 'estimated' : 'reported'})`,
      );
    } finally {
      await b.close();
      await up.close();
    }
  });

  it('never lets 200 cut streams bill more than 15,500 tokens, and counts what the upstream billed', async () => {
    const up = await startOpenAIUpstream({ credential: creds.openai, streamChunks: 600, streamDelayMs: 2, afterDisconnectTokens: 50 });
    const b = await serveWith({ openai: up, anthropic, gemini });
    try {
      const k = await b.issue({ target: 'openai', maxTokens: 15_500 });
      const client = openaiClient(k);
      await cutStreams(async (signal) =>
        client.chat.completions.create(
          { model: 'gpt-4o-mini', stream: true, messages: [{ role: 'user', content: 'tell me everything' }] },
          { signal },
        ),
      );
      await waitFor('every stream to settle', async () => (await b.key(k.id)).inFlight === 0 && up.inFlight() === 0);
      const key = await b.key(k.id);
      const billed = up.billed.inputTokens + up.billed.outputTokens;
      expect(billed).toBeLessThanOrEqual(15_500);
      expect(key.used.tokens!).toBeLessThanOrEqual(15_500);
      expect(Math.abs(key.used.tokens! - billed) / billed).toBeLessThan(0.03);
      console.log(`cut streams, 15,500 tokens: ${up.billed.answers} served, billed ${billed}, counted ${key.used.tokens}`);
    } finally {
      await b.close();
      await up.close();
    }
  });
});

describe('a crash while holds grow', () => {
  it('loses no settled usage and never overruns after kill -9 and a restart', async () => {
    const slow = await startOpenAIUpstream({ credential: creds.openai, streamChunks: 100_000, streamDelayMs: 1 });
    const b = await serveWith({ openai: slow, anthropic, gemini });
    const k = await b.issue({ target: 'openai', maxTokens: 200_000 });
    const client = openaiClient(k);
    // Settled first: three short answers.
    for (let i = 0; i < 3; i++)
      await client.chat.completions.create({ model: 'gpt-5-mini', max_tokens: 5, messages: [{ role: 'user', content: 'hi' }] });
    const settled = (await b.key(k.id)).used.tokens!;
    // Then streams whose holds grow.
    const streams = Array.from({ length: 3 }, () =>
      (async () => {
        try {
          for await (const _ of await client.chat.completions.create({
            model: 'gpt-4o-mini',
            stream: true,
            messages: [{ role: 'user', content: 'go' }],
          }));
        } catch {
          // cut by the kill
        }
      })(),
    );
    let grown: KeySummary | undefined;
    await waitFor('the holds to grow', async () => {
      grown = await b.key(k.id);
      return (grown.reserved.tokens ?? 0) > 3 * 5000;
    });
    await b.close('kill');
    await Promise.all(streams);
    await waitFor('the upstream to notice', () => slow.inFlight() === 0);
    const again = await serveTill(b.home, { env: { TILL_UPSTREAM_OPENAI: `${slow.url}/v1` } });
    try {
      const after = await again.key(k.id);
      // What was settled is still there, the open holds count as spent, and together they cover
      // what the upstream billed (the cut streams included), within the limit.
      expect(after.used.tokens!).toBeGreaterThanOrEqual(settled + (grown!.reserved.tokens ?? 0));
      expect(after.used.tokens!).toBeGreaterThanOrEqual(slow.billed.inputTokens + slow.billed.outputTokens);
      expect(after.used.tokens!).toBeLessThanOrEqual(200_000);
      expect(after.reserved.tokens ?? 0).toBe(0);
    } finally {
      await again.close();
      await slow.close();
    }
  });
});
