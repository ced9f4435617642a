/**
 * The official SDKs, pointed at the broker with a till key, against upstreams on 127.0.0.1
 * that accept only the real credential: what an agent actually does.
 */
import Anthropic from '@anthropic-ai/sdk';
import { ApiError, GoogleGenAI } from '@google/genai';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { TillService } from '../src/core/runtime/service';
import { addCredential, fakeCredential, startTill, tempHome } from './support/till';
import {
  fakeAnswer,
  startAnthropicUpstream,
  startGeminiUpstream,
  startGitHubUpstream,
  startOpenAIUpstream,
  type Upstream,
} from './support/upstreams';

let service: TillService;
let openaiUp: Upstream;
let anthropicUp: Upstream;
let geminiUp: Upstream;
let githubUp: Upstream;
const secrets = {
  openai: fakeCredential('openai'),
  anthropic: fakeCredential('anthropic'),
  gemini: fakeCredential('gemini'),
  github: fakeCredential('github'),
};

beforeAll(async () => {
  [openaiUp, anthropicUp, geminiUp, githubUp] = await Promise.all([
    startOpenAIUpstream({ credential: secrets.openai, streamDelayMs: 5 }),
    startAnthropicUpstream({ credential: secrets.anthropic, streamDelayMs: 5 }),
    startGeminiUpstream({ credential: secrets.gemini }),
    startGitHubUpstream({ credential: secrets.github }),
  ]);
  const home = tempHome();
  for (const [provider, secret] of Object.entries(secrets)) await addCredential(home, provider, provider, secret);
  service = await startTill({
    home,
    env: {
      TILL_UPSTREAM_OPENAI: `${openaiUp.url}/v1`,
      TILL_UPSTREAM_ANTHROPIC: anthropicUp.url,
      TILL_UPSTREAM_GEMINI: geminiUp.url,
      TILL_UPSTREAM_GITHUB: githubUp.url,
    },
  });
});

afterAll(async () => {
  await service?.close();
  await Promise.all([openaiUp, anthropicUp, geminiUp, githubUp].map((u) => u?.close()));
});

function used(id: string): number {
  return service.keys.list().find((k) => k.id === id)!.used.activations ?? 0;
}

describe('openai SDK through the broker', () => {
  it('completes a chat as JSON; the upstream sees the real key, never the till key', async () => {
    const issued = await service.issue({ target: 'openai', uses: 5, label: 'sdk json' });
    const client = new OpenAI({ apiKey: issued.env.OPENAI_API_KEY, baseURL: issued.env.OPENAI_BASE_URL, maxRetries: 0 });
    const answer = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
    expect(answer.choices[0]?.message.content).toBe(fakeAnswer(5));
    const seen = openaiUp.received.at(-1)!;
    expect(seen.headers.authorization).toBe(`Bearer ${secrets.openai}`);
    expect(JSON.stringify(seen)).not.toContain(issued.key);
    expect(used(issued.id)).toBe(1);
  });

  it('streams a chat event by event and counts one activation', async () => {
    const issued = await service.issue({ target: 'openai', uses: 5 });
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    const stream = await client.chat.completions.create({
      model: 'gpt-4o-mini',
      messages: [{ role: 'user', content: 'hi' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = '';
    let usage: unknown;
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta.content ?? '';
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(fakeAnswer(5));
    expect(usage).toMatchObject({ completion_tokens: 5 });
    expect(used(issued.id)).toBe(1);
  });

  it('lists models without spending an activation', async () => {
    const issued = await service.issue({ target: 'openai', uses: 1 });
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    const models = await client.models.list();
    expect(models.data.length).toBeGreaterThan(0);
    expect(used(issued.id)).toBe(0);
  });

  it('raises a rate-limit error with a readable message once the key is exhausted', async () => {
    const issued = await service.issue({ target: 'openai', uses: 1 });
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'one' }] });
    const err = await client.chat.completions
      .create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'two' }] })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    expect((err as Error).message).toContain('till key exhausted: 1 of 1 activations used');
  });

  it('raises an authentication error after revocation', async () => {
    const issued = await service.issue({ target: 'openai' });
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    await service.keys.revoke(issued.id);
    const err = await client.models.list().catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
    expect((err as Error).message).toContain('revoked');
  });

  it('ends a stream in flight the moment its key is revoked, with an error the SDK raises', async () => {
    const slow = await startOpenAIUpstream({ credential: secrets.openai, streamDelayMs: 150, streamChunks: 40 });
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', secrets.openai);
    const till = await startTill({ home, env: { TILL_UPSTREAM_OPENAI: `${slow.url}/v1` } });
    try {
      const issued = await till.issue({ target: 'openai' });
      const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
      const stream = await client.chat.completions.create({
        model: 'gpt-4o-mini',
        messages: [{ role: 'user', content: 'long' }],
        stream: true,
      });
      let chunks = 0;
      const started = Date.now();
      const consumed = (async () => {
        for await (const _ of stream) {
          if (++chunks === 2) await till.keys.revoke(issued.id);
        }
      })();
      const err = await consumed.then(
        () => undefined,
        (e: unknown) => e,
      );
      expect(err).toBeInstanceOf(Error);
      expect(String((err as Error).message)).toContain('revoked');
      expect(chunks).toBeLessThan(5);
      // 40 chunks at 150 ms would take 6 s; revocation cut it at once.
      expect(Date.now() - started).toBeLessThan(2000);
      await expect.poll(() => slow.abortedStreams()).toBe(1);
      expect(till.keys.list()[0]!.inFlight).toBe(0);
    } finally {
      await till.close();
      await slow.close();
    }
  });
});

describe('anthropic SDK through the broker', () => {
  it('sends a message with ANTHROPIC_API_KEY; the upstream gets the credential in x-api-key', async () => {
    const issued = await service.issue({ target: 'anthropic', uses: 3 });
    expect(issued.env.ANTHROPIC_BASE_URL).toBe(`${service.url}/anthropic`);
    const client = new Anthropic({ apiKey: issued.env.ANTHROPIC_API_KEY, baseURL: issued.env.ANTHROPIC_BASE_URL, maxRetries: 0 });
    const message = await client.messages.create({ model: 'claude-sonnet-5', max_tokens: 64, messages: [{ role: 'user', content: 'hi' }] });
    expect(message.content[0]).toMatchObject({ type: 'text', text: fakeAnswer(5) });
    const seen = anthropicUp.received.at(-1)!;
    expect(seen.headers['x-api-key']).toBe(secrets.anthropic);
    expect(seen.headers.authorization).toBeUndefined();
    expect(JSON.stringify(seen)).not.toContain(issued.key);
    expect(used(issued.id)).toBe(1);
  });

  it('streams a message; the final usage arrives; count_tokens is free', async () => {
    const issued = await service.issue({ target: 'anthropic', uses: 3 });
    const client = new Anthropic({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    const stream = client.messages.stream({ model: 'claude-sonnet-5', max_tokens: 64, messages: [{ role: 'user', content: 'hi' }] });
    const final = await stream.finalMessage();
    expect(final.usage.output_tokens).toBe(5);
    const count = await client.messages.countTokens({ model: 'claude-sonnet-5', messages: [{ role: 'user', content: 'hi' }] });
    expect(count.input_tokens).toBeGreaterThan(0);
    expect(used(issued.id)).toBe(1);
  });

  it('refuses a model outside the key scope with a permission error', async () => {
    const issued = await service.issue({ target: 'anthropic', models: ['claude-haiku-*'] });
    const client = new Anthropic({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 0 });
    const err = await client.messages
      .create({ model: 'claude-opus-5', max_tokens: 10, messages: [{ role: 'user', content: 'hi' }] })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Anthropic.PermissionDeniedError);
    expect((err as Error).message).toContain('model claude-opus-5 is not allowed');
    const ok = await client.messages.create({
      model: 'claude-haiku-4-5-20251001',
      max_tokens: 10,
      messages: [{ role: 'user', content: 'hi' }],
    });
    expect(ok.type).toBe('message');
  });
});

describe('@google/genai SDK through the broker', () => {
  it('reads the till key and the base URL from the env vars Till sets: a call, a stream, usage metered, then revocation', async () => {
    const issued = await service.issue({ target: 'gemini', uses: 5 });
    const saved = { ...process.env };
    // Both key variables are set (tools read either); the SDK then warns once that it uses GOOGLE_API_KEY.
    const warn = console.warn;
    console.warn = () => undefined;
    Object.assign(process.env, issued.env);
    let ai: GoogleGenAI;
    try {
      ai = new GoogleGenAI({});
    } finally {
      process.env = saved;
      console.warn = warn;
    }
    const answer = await ai.models.generateContent({ model: 'gemini-2.5-flash', contents: 'hi' });
    expect(answer.text).toBe(fakeAnswer(5));
    let streamed = '';
    for await (const chunk of await ai.models.generateContentStream({ model: 'gemini-2.5-flash', contents: 'hi' }))
      streamed += chunk.text ?? '';
    expect(streamed).toBe(fakeAnswer(5));
    expect(geminiUp.received.at(-1)!.headers['x-goog-api-key']).toBe(secrets.gemini);
    expect(used(issued.id)).toBe(2);
    const key = service.keys.list().find((k) => k.id === issued.id)!;
    expect(key.tokens.output).toBe(10); // five tokens each, from the cumulative usageMetadata

    await service.keys.revoke(issued.id);
    const refused = await ai.models.generateContent({ model: 'gemini-2.5-flash', contents: 'hi' }).catch((err: unknown) => err);
    expect(refused).toBeInstanceOf(ApiError);
    expect((refused as ApiError).status).toBe(401);
    expect((refused as ApiError).message).toMatch(/till: till key .* was revoked/);
  });
});

describe('other providers through the broker', () => {
  it('Gemini: a key in ?key= is swapped for the credential in x-goog-api-key; the model in the path is scoped', async () => {
    const issued = await service.issue({ target: 'gemini', models: ['gemini-2.5-flash'] });
    const body = JSON.stringify({ contents: [{ parts: [{ text: 'hi' }] }] });
    const ok = await fetch(`${issued.baseUrl}/v1beta/models/gemini-2.5-flash:generateContent?key=${issued.key}`, {
      method: 'POST',
      body,
      headers: { 'content-type': 'application/json' },
    });
    expect(ok.status).toBe(200);
    expect(((await ok.json()) as { usageMetadata: unknown }).usageMetadata).toBeDefined();
    const seen = geminiUp.received.at(-1)!;
    expect(seen.headers['x-goog-api-key']).toBe(secrets.gemini);
    expect(seen.path).not.toContain('key=');
    const denied = await fetch(`${issued.baseUrl}/v1beta/models/gemini-2.5-pro:generateContent`, {
      method: 'POST',
      body,
      headers: { 'content-type': 'application/json', 'x-goog-api-key': issued.key },
    });
    expect(denied.status).toBe(403);
    expect(((await denied.json()) as { error: { status: string } }).error.status).toBe('PERMISSION_DENIED');
  });

  it('GitHub REST: GH_TOKEN works, scoped to GET', async () => {
    const issued = await service.issue({ target: 'github', methods: ['GET'], uses: 10 });
    expect(Object.keys(issued.env)).toEqual(expect.arrayContaining(['GH_TOKEN', 'GITHUB_TOKEN', 'GITHUB_API_URL']));
    const user = await fetch(`${issued.env.GITHUB_API_URL}/user`, { headers: { authorization: `token ${issued.env.GH_TOKEN}` } });
    expect(user.status).toBe(200);
    expect(githubUp.received.at(-1)!.headers.authorization).toBe(`Bearer ${secrets.github}`);
    const post = await fetch(`${issued.baseUrl}/repos/o/r/issues`, {
      method: 'POST',
      body: '{"title":"x"}',
      headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
    });
    expect(post.status).toBe(403);
    expect(((await post.json()) as { message: string }).message).toContain('method POST is not allowed');
  });
});

describe('retries', () => {
  it('an exhausted key fails at once: the SDK is told not to retry (x-should-retry: false)', async () => {
    const issued = await service.issue({ target: 'openai', uses: 1 });
    const client = new OpenAI({ apiKey: issued.key, baseURL: issued.baseUrl, maxRetries: 3 });
    await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'one' }] });
    const before = openaiUp.received.length;
    const started = Date.now();
    const err = await client.chat.completions
      .create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'two' }] })
      .catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.RateLimitError);
    // Three retries with the SDK's backoff would take well over a second.
    expect(Date.now() - started).toBeLessThan(500);
    expect(openaiUp.received.length).toBe(before);
  });
});
