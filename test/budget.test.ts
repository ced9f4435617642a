/**
 * Token and dollar budgets through the broker: metered from the upstream's own usage reports
 * (JSON and streams), reserved at the worst case before forwarding, never overrun under
 * concurrency, and billed from an estimate when a stream is cut.
 */
import { Agent, request } from 'node:http';
import OpenAI from 'openai';
import Anthropic from '@anthropic-ai/sdk';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeySummary, TillEvent } from '../src/core/events';
import type { TillService } from '../src/core/runtime/service';
import { addCredential, fakeCredential, startTill, tempHome } from './support/till';
import {
  openAIChatInputTokens,
  startAnthropicUpstream,
  startGeminiUpstream,
  startOpenAIUpstream,
  type Upstream,
} from './support/upstreams';

/** $1,000 per million input tokens, $10,000 per million output: a few calls cost real money. */
const PRICEY = { input: 1000, output: 10_000 };
const secrets = {
  openai: fakeCredential('budget-openai'),
  anthropic: fakeCredential('budget-anthropic'),
  gemini: fakeCredential('budget-gemini'),
};
let till: TillService;
let openai: Upstream;
let anthropic: Upstream;
let gemini: Upstream;
const events: TillEvent[] = [];

beforeAll(async () => {
  [openai, anthropic, gemini] = await Promise.all([
    startOpenAIUpstream({ credential: secrets.openai, streamChunks: 5 }),
    startAnthropicUpstream({ credential: secrets.anthropic, streamChunks: 5 }),
    startGeminiUpstream({ credential: secrets.gemini, streamChunks: 5 }),
  ]);
  const home = tempHome();
  for (const [p, s] of Object.entries(secrets)) await addCredential(home, p, p, s);
  till = await startTill({
    home,
    env: { TILL_UPSTREAM_OPENAI: `${openai.url}/v1`, TILL_UPSTREAM_ANTHROPIC: anthropic.url, TILL_UPSTREAM_GEMINI: gemini.url },
    prices: { openai: { 'pricey-1': PRICEY }, anthropic: { 'pricey-claude': PRICEY } },
  });
  till.events.on((e) => events.push(e));
});

afterAll(async () => {
  await till?.close();
  await Promise.all([openai, anthropic, gemini].map((u) => u?.close()));
});

function key(id: string): KeySummary {
  return till.keys.list().find((k) => k.id === id)!;
}

/** Cost in micro-dollars of a fixture answer at PRICEY rates. */
function priceyMicros(inputTokens: number, outputTokens: number): number {
  return Math.ceil(((inputTokens * PRICEY.input + outputTokens * PRICEY.output) / 1e6) * 1e6);
}

describe('metering', () => {
  it('counts tokens from a JSON answer, and prices them', async () => {
    const issued = await till.issue({ target: 'openai' });
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    const answer = await client.chat.completions.create({ model: 'gpt-5-mini', messages: [{ role: 'user', content: 'hi' }] });
    const k = key(issued.id);
    expect(k.tokens.input).toBe(answer.usage!.prompt_tokens);
    expect(k.tokens.output).toBe(answer.usage!.completion_tokens);
    expect(k.used.tokens).toBe(answer.usage!.total_tokens);
    // gpt-5-mini: $0.25 / $2 per million.
    expect(k.used.spend).toBe(Math.ceil(answer.usage!.prompt_tokens * 0.25 + answer.usage!.completion_tokens * 2));
    expect(k.estimatedSpend).toBe(0);
  });

  it('asks a stream for usage when the client did not, and hides that extra chunk from the client', async () => {
    const issued = await till.issue({ target: 'openai' });
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    const stream = await client.chat.completions.create({ model: 'gpt-5-mini', messages: [{ role: 'user', content: 'hi' }], stream: true });
    const chunks = [];
    for await (const c of stream) chunks.push(c);
    // The client never sees a usage-only chunk it did not ask for, nor the `"usage": null`
    // include_usage puts on every other chunk: the chunks are as it would have had them.
    expect(chunks.every((c) => c.choices.length > 0 && !('usage' in c))).toBe(true);
    const sent = JSON.parse(openai.received.at(-1)!.body) as { stream_options?: { include_usage?: boolean } };
    expect(sent.stream_options?.include_usage).toBe(true);
    const k = key(issued.id);
    expect(k.tokens.output).toBe(5);
    expect(k.tokens.input).toBe(openAIChatInputTokens(JSON.parse(openai.received.at(-1)!.body) as Record<string, unknown>));
  });

  it('Anthropic streams: message_delta usage is cumulative, taken once, not summed', async () => {
    const issued = await till.issue({ target: 'anthropic' });
    const client = new Anthropic({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    const final = await client.messages
      .stream({ model: 'claude-sonnet-5', max_tokens: 100, messages: [{ role: 'user', content: 'hi' }] })
      .finalMessage();
    const k = key(issued.id);
    expect(k.tokens.output).toBe(final.usage.output_tokens);
    expect(k.tokens.input).toBe(final.usage.input_tokens);
  });

  it('Gemini streams: cumulative usageMetadata, the last one counts', async () => {
    const issued = await till.issue({ target: 'gemini' });
    const res = await fetch(`${issued.baseUrl}/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse`, {
      method: 'POST',
      body: JSON.stringify({ contents: [{ parts: [{ text: 'hi' }] }] }),
      headers: { 'content-type': 'application/json', 'x-goog-api-key': issued.key },
    });
    const text = await res.text();
    const last = text
      .trim()
      .split(/\r?\n\r?\n/)
      .at(-1)!
      .replace(/^data: /, '');
    const meta = (JSON.parse(last) as { usageMetadata: { promptTokenCount: number; candidatesTokenCount: number } }).usageMetadata;
    const k = key(issued.id);
    expect(k.tokens.output).toBe(meta.candidatesTokenCount);
    expect(k.tokens.input).toBe(meta.promptTokenCount);
  });

  it("carries each finished request's usage on its event", async () => {
    const issued = await till.issue({ target: 'openai' });
    await fetch(`${issued.baseUrl}/chat/completions`, {
      method: 'POST',
      body: '{"model":"gpt-5-mini","messages":[]}',
      headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
    }).then((r) => r.text());
    const finished = events.filter(
      (e): e is Extract<TillEvent, { type: 'request.finished' }> => e.type === 'request.finished' && e.request.keyId === issued.id,
    );
    expect(finished.at(-1)?.usage).toMatchObject({ tokens: { output: 5 }, estimated: false });
    expect(finished.at(-1)?.usage?.spend).toBeGreaterThan(0);
  });
});

describe('limits that cannot be overrun', () => {
  it('200 parallel streaming requests against a $1 budget never spend more than $1', async () => {
    const issued = await till.issue({ target: 'openai', maxSpend: 1 });
    const agent = new Agent({ keepAlive: true, maxSockets: 200 });
    const body = JSON.stringify({ model: 'pricey-1', max_tokens: 5, stream: true, messages: [{ role: 'user', content: 'go' }] });
    const before = openai.received.length;
    const billedBefore = { ...openai.billed };
    const statuses = await Promise.all(
      Array.from(
        { length: 200 },
        () =>
          new Promise<number>((resolve, reject) => {
            const u = new URL(`${issued.baseUrl}/chat/completions`);
            const req = request(
              {
                host: u.hostname,
                port: u.port,
                path: u.pathname,
                method: 'POST',
                agent,
                headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
              },
              (res) => {
                res.resume();
                res.on('end', () => resolve(res.statusCode ?? 0));
              },
            );
            req.on('error', reject);
            req.end(body);
          }),
      ),
    );
    agent.destroy();
    const served = statuses.filter((s) => s === 200).length;
    const k = key(issued.id);
    expect(served).toBeGreaterThan(0);
    expect(statuses.filter((s) => s !== 200).every((s) => s === 429)).toBe(true);
    expect(openai.received.length - before).toBe(served);
    expect(k.used.spend!).toBeLessThanOrEqual(1_000_000);
    expect(k.reserved.spend ?? 0).toBe(0);
    // What the upstream billed, priced: never more than the budget either, and what Till counted.
    // (The last requests may have had their cap lowered to fit what was left.)
    const produced = priceyMicros(
      openai.billed.inputTokens - billedBefore.inputTokens,
      openai.billed.outputTokens - billedBefore.outputTokens,
    );
    expect(produced).toBeLessThanOrEqual(1_000_000);
    expect(k.used.spend).toBe(produced);
    console.log(`overrun test: ${served} of 200 served, $${(k.used.spend! / 1e6).toFixed(4)} spent of $1.00`);
  });

  it('sets an output cap that fits what is left when the client gave none', async () => {
    const issued = await till.issue({ target: 'openai', maxTokens: 200 });
    await fetch(`${issued.baseUrl}/chat/completions`, {
      method: 'POST',
      body: '{"model":"gpt-5-mini","messages":[]}',
      headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
    }).then((r) => r.text());
    const sent = JSON.parse(openai.received.at(-1)!.body) as { max_completion_tokens?: number };
    // GPT-5 mini's tokenizer is public: the input is held at its exact count.
    const input = openAIChatInputTokens({ model: 'gpt-5-mini', messages: [] });
    expect(sent.max_completion_tokens).toBeGreaterThan(0);
    expect(sent.max_completion_tokens! + input).toBeLessThanOrEqual(200);
  });

  it('lowers a cap larger than what is left (Claude Code asks for 64,000)', async () => {
    const issued = await till.issue({ target: 'anthropic', maxTokens: 1000 });
    const client = new Anthropic({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    await client.messages
      .stream({ model: 'claude-sonnet-5', max_tokens: 64_000, messages: [{ role: 'user', content: 'hi' }] })
      .finalMessage();
    const sent = JSON.parse(anthropic.received.at(-1)!.body) as { max_tokens: number };
    expect(sent.max_tokens).toBeLessThan(1000);
  });

  it('refuses once spent, saying which limit, how much is used and how much is reserved', async () => {
    const issued = await till.issue({ target: 'openai', maxTokens: 400 });
    const call = () =>
      fetch(`${issued.baseUrl}/chat/completions`, {
        method: 'POST',
        body: '{"model":"gpt-5-mini","max_tokens":5,"messages":[]}',
        headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
      });
    let last: Response | undefined;
    for (let i = 0; i < 100; i++) {
      last = await call();
      if (last.status !== 200) break;
      await last.text();
    }
    expect(last!.status).toBe(429);
    const body = (await last!.json()) as { error: { message: string } };
    expect(body.error.message).toMatch(
      /till key out of tokens: \d+ of 400 tokens used, 0 held by requests in flight, \d+ left; this request needs at least \d+ tokens \(input up to \d+ tokens, bound by .+\)/,
    );
    expect(key(issued.id).used.tokens!).toBeGreaterThan(0);
    expect(key(issued.id).used.tokens!).toBeLessThanOrEqual(400);
  });

  it('a spend-limited key refuses a model without a price instead of guessing', async () => {
    const issued = await till.issue({ target: 'openai', maxSpend: 5 });
    const res = await fetch(`${issued.baseUrl}/chat/completions`, {
      method: 'POST',
      body: '{"model":"no-such-model-x","messages":[]}',
      headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
    });
    expect(res.status).toBe(403);
    expect(((await res.json()) as { error: { message: string } }).error.message).toMatch(/no-such-model-x has no price/);
  });

  it('an unpriced model still has its tokens counted on a key without a spend limit; spend stays unknown', async () => {
    const issued = await till.issue({ target: 'openai' });
    await fetch(`${issued.baseUrl}/chat/completions`, {
      method: 'POST',
      body: '{"model":"no-such-model-y","messages":[]}',
      headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
    }).then((r) => r.text());
    const k = key(issued.id);
    expect(k.tokens.output).toBe(5);
    expect(k.used.spend ?? 0).toBe(0);
    expect(k.spend).toMatchObject({ usd: null, unpricedRequests: 1 });
  });

  it('warns at 50 % and 80 %, and says which limit ran out at 100 %', async () => {
    const issued = await till.issue({ target: 'openai', maxTokens: 1000 });
    for (let i = 0; i < 100; i++) {
      const r = await fetch(`${issued.baseUrl}/chat/completions`, {
        method: 'POST',
        body: '{"model":"gpt-5-mini","max_tokens":5,"messages":[]}',
        headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
      });
      await r.text();
      if (r.status !== 200) break;
    }
    const mine = events.filter((e) => 'key' in e && e.key.id === issued.id);
    const near = mine
      .filter((e): e is Extract<TillEvent, { type: 'limit.near' }> => e.type === 'limit.near')
      .map((e) => `${e.meter}:${e.percent}`);
    expect(near).toEqual(['tokens:50', 'tokens:80']);
    const extended = await till.keys.extend(issued.id, { maxTokens: 1000 });
    expect(extended.policy.maxTokens).toBe(2000);
    expect(extended.state).toBe('active');
  });
});

describe('interrupted streams', () => {
  it('a stream cut by revocation is billed from what was produced, marked estimated', async () => {
    const slow = await startOpenAIUpstream({ credential: secrets.openai, streamDelayMs: 100, streamChunks: 300 });
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', secrets.openai);
    const t = await startTill({ home, env: { TILL_UPSTREAM_OPENAI: `${slow.url}/v1` }, prices: { openai: { 'pricey-1': PRICEY } } });
    try {
      const issued = await t.issue({ target: 'openai', maxSpend: 10 });
      const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
      const stream = await client.chat.completions.create({
        model: 'pricey-1',
        max_tokens: 300,
        messages: [{ role: 'user', content: 'long' }],
        stream: true,
      });
      let n = 0;
      await (async () => {
        for await (const _ of stream) if (++n === 3) await t.keys.revoke(issued.id);
      })().catch(() => undefined);
      // Settled once the upstream has dropped the cut stream and what it had sent is read.
      await expect.poll(() => t.keys.list().find((x) => x.id === issued.id)!.inFlight).toBe(0);
      const k = t.keys.list().find((x) => x.id === issued.id)!;
      expect(k.used.spend!).toBeGreaterThan(0);
      // Far less than the 300-token ceiling: what was streamed, plus what the upstream may still
      // generate before it notices the cut. Never less than the upstream bills.
      expect(k.used.spend!).toBeLessThan(
        priceyMicros(openAIChatInputTokens(JSON.parse(slow.received[0]!.body) as Record<string, unknown>), 300),
      );
      expect(k.estimatedSpend).toBe(k.used.spend);
      expect(k.reserved.spend ?? 0).toBe(0);
      await expect.poll(() => slow.abortedStreams()).toBe(1);
      await expect.poll(() => slow.billed.answers).toBe(1);
      expect(k.tokens.input).toBe(slow.billed.inputTokens);
      expect(k.tokens.output).toBeGreaterThanOrEqual(slow.billed.outputTokens);
      expect(k.tokens.output).toBeLessThanOrEqual(slow.billed.outputTokens + 20);
    } finally {
      await t.close();
      await slow.close();
    }
  });
});
