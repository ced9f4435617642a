/**
 * Checks the fake upstreams themselves, with the official SDKs (and plain fetch) pointed straight
 * at them: if these pass, a broker test failing against a fixture is the broker's fault.
 */
import Anthropic from '@anthropic-ai/sdk';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it, vi } from 'vitest';
import {
  fakeAnswer,
  fakeTokenCount,
  openAIChatInputTokens,
  openAIResponsesInputTokens,
  startAnthropicUpstream,
  startGeminiUpstream,
  startGitHubUpstream,
  startOpenAIUpstream,
  type Upstream,
} from './support/upstreams';

const KEY = 'sk-test-upstream-cred-0123';
const WRONG = 'sk-wrong-cred-abcdefghij';

/** Body of the last authenticated request: the input the token counts derive from. */
const lastBody = (u: Upstream): string => u.received.at(-1)?.body ?? '';

/** Splits an SSE body into frames (either line ending). */
const frames = (text: string): string[] => text.split(/\r?\n\r?\n/).filter((f) => f.trim() !== '');
const dataOf = (frame: string): string =>
  frame
    .split(/\r?\n/)
    .find((l) => l.startsWith('data: '))
    ?.slice(6) ?? '';
const eventOf = (frame: string): string | undefined =>
  frame
    .split(/\r?\n/)
    .find((l) => l.startsWith('event: '))
    ?.slice(7);

describe('OpenAI upstream', () => {
  let up: Upstream;
  let client: OpenAI;
  beforeAll(async () => {
    up = await startOpenAIUpstream({ credential: KEY });
    client = new OpenAI({ apiKey: KEY, baseURL: `${up.url}/v1`, maxRetries: 0 });
  });
  afterAll(() => up.close());

  it('binds 127.0.0.1 and lists models', async () => {
    expect(up.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
    const ids: string[] = [];
    for await (const m of client.models.list()) ids.push(m.id);
    expect(ids).toContain('gpt-4o-mini');
    expect(up.received.at(-1)?.headers.authorization).toBe(`Bearer ${KEY}`);
  });

  it('answers a chat completion with deterministic usage and the requested model', async () => {
    const r = await client.chat.completions.create({ model: 'gpt-4.1', messages: [{ role: 'user', content: 'hi' }] });
    expect(r.model).toBe('gpt-4.1');
    expect(r.choices[0]?.message.content).toBe(fakeAnswer(5));
    expect(r.choices[0]?.finish_reason).toBe('stop');
    // As OpenAI counts it: 3 for the message, its role and content (1 o200k token each), 3 to prime the answer.
    const prompt = openAIChatInputTokens(JSON.parse(lastBody(up)) as Record<string, unknown>);
    expect(prompt).toBe(3 + 1 + 1 + 3);
    expect(r.usage).toMatchObject({ prompt_tokens: prompt, completion_tokens: 5, total_tokens: prompt + 5 });
    expect(r.usage?.prompt_tokens_details?.cached_tokens).toBe(0);
    expect(r.usage?.completion_tokens_details?.reasoning_tokens).toBe(0);
  });

  it('cuts the answer at max_tokens with finish_reason length', async () => {
    const r = await client.chat.completions.create({ model: 'gpt-4.1', messages: [{ role: 'user', content: 'hi' }], max_tokens: 2 });
    expect(r.choices[0]?.message.content).toBe('Hello from');
    expect(r.choices[0]?.finish_reason).toBe('length');
    expect(r.usage?.completion_tokens).toBe(2);
  });

  it('streams chat with usage in an extra final chunk only when include_usage is set', async () => {
    const stream = await client.chat.completions.create({
      model: 'gpt-5-mini',
      messages: [{ role: 'user', content: 'stream please' }],
      stream: true,
      stream_options: { include_usage: true },
    });
    const chunks = [];
    for await (const c of stream) chunks.push(c);
    const last = chunks.at(-1)!;
    const prompt = openAIChatInputTokens(JSON.parse(lastBody(up)) as Record<string, unknown>);
    expect(last.choices).toEqual([]);
    expect(last.usage).toMatchObject({ prompt_tokens: prompt, completion_tokens: 5, total_tokens: prompt + 5 });
    expect(chunks.slice(0, -1).every((c) => c.usage === null && c.choices.length === 1)).toBe(true);
    expect(chunks.every((c) => c.model === 'gpt-5-mini' && c.object === 'chat.completion.chunk')).toBe(true);
    expect(chunks.map((c) => c.choices[0]?.delta.content ?? '').join('')).toBe(fakeAnswer(5));
    expect(chunks.at(-2)?.choices[0]?.finish_reason).toBe('stop');

    const plain = await client.chat.completions.create({ model: 'gpt-5-mini', messages: [{ role: 'user', content: 'x' }], stream: true });
    const plainChunks = [];
    for await (const c of plain) plainChunks.push(c);
    expect(plainChunks.some((c) => 'usage' in c)).toBe(false);
  });

  it('sends raw chat SSE as data frames ending in [DONE]', async () => {
    const res = await fetch(`${up.url}/v1/chat/completions`, {
      method: 'POST',
      headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'gpt-4o-mini', messages: [], stream: true }),
    });
    expect(res.headers.get('content-type')).toMatch(/^text\/event-stream/);
    const f = frames(await res.text());
    expect(f.at(-1)).toBe('data: [DONE]');
    expect(f.every((x) => x.startsWith('data: '))).toBe(true);
  });

  it('answers the Responses API, JSON and streamed, with usage in response.completed', async () => {
    const json = await client.responses.create({ model: 'gpt-5', input: 'hello' });
    expect(json.model).toBe('gpt-5');
    expect(json.output_text).toBe(fakeAnswer(5));
    const input = openAIResponsesInputTokens(JSON.parse(lastBody(up)) as Record<string, unknown>);
    expect(json.usage).toEqual({
      input_tokens: input,
      input_tokens_details: { cached_tokens: 0 },
      output_tokens: 5,
      output_tokens_details: { reasoning_tokens: 0 },
      total_tokens: input + 5,
    });

    const stream = client.responses.stream({ model: 'gpt-5', input: [{ role: 'user', content: 'stream' }] });
    const types: string[] = [];
    let deltas = '';
    for await (const e of stream) {
      types.push(e.type);
      if (e.type === 'response.output_text.delta') deltas += e.delta;
    }
    const final = await stream.finalResponse();
    expect(types[0]).toBe('response.created');
    expect(types.at(-1)).toBe('response.completed');
    expect(types.filter((t) => t === 'response.output_text.delta')).toHaveLength(5);
    expect(deltas).toBe(fakeAnswer(5));
    expect(final.output_text).toBe(fakeAnswer(5));
    expect(final.usage?.output_tokens).toBe(5);
    expect(final.usage?.input_tokens).toBe(openAIResponsesInputTokens(JSON.parse(lastBody(up)) as Record<string, unknown>));
  });

  it('bills a Responses request that continues a stored conversation for all of it, and refuses an unknown one', async () => {
    const first = await client.responses.create({ model: 'gpt-5', input: 'remember this' });
    const second = await client.responses.create({ model: 'gpt-5', input: 'and this', previous_response_id: first.id });
    expect(second.usage?.input_tokens).toBe(
      first.usage!.input_tokens +
        first.usage!.output_tokens +
        openAIResponsesInputTokens(JSON.parse(lastBody(up)) as Record<string, unknown>),
    );
    await expect(client.responses.create({ model: 'gpt-5', input: 'x', previous_response_id: 'resp_unknown' })).rejects.toThrow(
      /Previous response with id 'resp_unknown' not found/,
    );
  });

  it('bills a stream its client left: what it streamed plus what it generated before it noticed', async () => {
    const slow = await startOpenAIUpstream({ credential: KEY, streamChunks: 200, streamDelayMs: 5 });
    try {
      const c = new OpenAI({ apiKey: KEY, baseURL: `${slow.url}/v1`, maxRetries: 0 });
      const stream = await c.chat.completions.create({ model: 'gpt-5', messages: [{ role: 'user', content: 'hi' }], stream: true });
      let n = 0;
      for await (const chunk of stream) if (chunk.choices[0]?.delta.content && ++n === 10) break;
      await expect.poll(() => slow.billed.answers).toBe(1);
      // Up to 10 streamed (and a few in flight when the client left), plus 50 after.
      expect(slow.billed.outputTokens).toBeGreaterThanOrEqual(10 + 50);
      expect(slow.billed.outputTokens).toBeLessThan(10 + 50 + 20);
      expect(slow.billed.inputTokens).toBe(8);
    } finally {
      await slow.close();
    }
  });

  it('refuses a wrong key with 401 invalid_api_key and a masked key', async () => {
    const before = up.received.length;
    const bad = new OpenAI({ apiKey: WRONG, baseURL: `${up.url}/v1`, maxRetries: 0 });
    const err = await bad.chat.completions.create({ model: 'gpt-4.1', messages: [] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(OpenAI.AuthenticationError);
    const e = err as InstanceType<typeof OpenAI.AuthenticationError>;
    expect(e.status).toBe(401);
    expect(e.code).toBe('invalid_api_key');
    expect(e.type).toBe('invalid_request_error');
    expect(e.message).toContain('Incorrect API key provided: sk-wro');
    expect(e.message).not.toContain(WRONG);
    expect(up.received.length).toBe(before);
    expect(up.rejected.at(-1)?.headers.authorization).toBe(`Bearer ${WRONG}`);

    const missing = await fetch(`${up.url}/v1/models`);
    expect(missing.status).toBe(401);
    expect(((await missing.json()) as { error: { message: string } }).error.message).toMatch(/didn't provide an API key/);
  });

  it('answers unknown paths with an OpenAI-shaped 404', async () => {
    const res = await fetch(`${up.url}/v1/nope?x=1`, { headers: { authorization: `Bearer ${KEY}` } });
    expect(res.status).toBe(404);
    expect(await res.json()).toEqual({
      error: { message: 'Invalid URL (GET /v1/nope)', type: 'invalid_request_error', param: null, code: null },
    });
    expect(up.received.at(-1)?.path).toBe('/v1/nope?x=1');
  });
});

describe('Anthropic upstream', () => {
  let up: Upstream;
  let client: Anthropic;
  beforeAll(async () => {
    up = await startAnthropicUpstream({ credential: KEY });
    client = new Anthropic({ apiKey: KEY, baseURL: up.url, maxRetries: 0 });
  });
  afterAll(() => up.close());

  const params = { model: 'claude-sonnet-5', max_tokens: 1024, messages: [{ role: 'user' as const, content: 'hi' }] };

  it('answers messages with usage and the requested model', async () => {
    const m = await client.messages.create(params);
    expect(m.model).toBe(params.model);
    expect(m.content).toEqual([{ type: 'text', text: fakeAnswer(5) }]);
    expect(m.stop_reason).toBe('end_turn');
    expect(m.usage).toMatchObject({
      input_tokens: fakeTokenCount(lastBody(up)),
      output_tokens: 5,
      cache_read_input_tokens: 0,
      cache_creation_input_tokens: 0,
    });
    expect(up.received.at(-1)?.headers['anthropic-version']).toBeTruthy();
  });

  it('streams messages; finalMessage carries input and cumulative output usage', async () => {
    const stream = client.messages.stream({ ...params, max_tokens: 3 });
    const final = await stream.finalMessage();
    expect(final.content).toEqual([{ type: 'text', text: 'Hello from a' }]);
    expect(final.stop_reason).toBe('max_tokens');
    expect(final.usage.input_tokens).toBe(fakeTokenCount(lastBody(up)));
    expect(final.usage.output_tokens).toBe(3);
  });

  it('sends the documented SSE event sequence', async () => {
    const res = await fetch(`${up.url}/v1/messages?beta=true`, {
      method: 'POST',
      headers: { 'x-api-key': KEY, 'anthropic-version': '2023-06-01', 'content-type': 'application/json' },
      body: JSON.stringify({ ...params, stream: true }),
    });
    const f = frames(await res.text());
    const names = f.map(eventOf);
    expect(names).toEqual([
      'message_start',
      'content_block_start',
      'ping',
      ...Array<string>(5).fill('content_block_delta'),
      'content_block_stop',
      'message_delta',
      'message_stop',
    ]);
    for (const frame of f) expect(JSON.parse(dataOf(frame)).type).toBe(eventOf(frame));
    const start = JSON.parse(dataOf(f[0]!));
    expect(start.message.usage.input_tokens).toBe(fakeTokenCount(lastBody(up)));
    expect(JSON.parse(dataOf(f.at(-2)!)).usage).toEqual({ output_tokens: 5 });
  });

  it('counts tokens and lists models', async () => {
    const { input_tokens } = await client.messages.countTokens({ model: params.model, messages: params.messages });
    expect(input_tokens).toBe(fakeTokenCount(lastBody(up)));
    const models = await client.models.list();
    expect(models.data.map((m) => m.id)).toContain('claude-sonnet-5');
  });

  it('accepts the credential as x-api-key or as an auth token (Bearer)', async () => {
    const tokenClient = new Anthropic({ authToken: KEY, baseURL: up.url, maxRetries: 0 });
    await expect(tokenClient.messages.create(params)).resolves.toMatchObject({ type: 'message' });
    expect(up.received.at(-1)?.headers.authorization).toBe(`Bearer ${KEY}`);
    const res = await fetch(`${up.url}/v1/messages`, {
      method: 'POST',
      headers: { 'x-api-key': KEY, 'anthropic-version': '2023-06-01', 'content-type': 'application/json' },
      body: JSON.stringify(params),
    });
    expect(res.status).toBe(200);
    expect(res.headers.get('request-id')).toMatch(/^req_/);
  });

  it('refuses a wrong key with 401 authentication_error', async () => {
    const bad = new Anthropic({ apiKey: WRONG, baseURL: up.url, maxRetries: 0 });
    const err = await bad.messages.create(params).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(Anthropic.AuthenticationError);
    expect((err as InstanceType<typeof Anthropic.AuthenticationError>).status).toBe(401);

    const res = await fetch(`${up.url}/v1/messages`, {
      method: 'POST',
      headers: { 'x-api-key': WRONG, 'anthropic-version': '2023-06-01' },
      body: '{}',
    });
    expect(res.status).toBe(401);
    expect(await res.json()).toEqual({ type: 'error', error: { type: 'authentication_error', message: 'invalid x-api-key' } });
    expect(up.rejected.at(-1)?.headers['x-api-key']).toBe(WRONG);
  });

  it('requires anthropic-version and answers HEAD / without a key', async () => {
    const res = await fetch(`${up.url}/v1/messages`, { method: 'POST', headers: { 'x-api-key': KEY }, body: JSON.stringify(params) });
    expect(res.status).toBe(400);
    expect(await res.json()).toMatchObject({
      type: 'error',
      error: { type: 'invalid_request_error', message: 'anthropic-version: header is required' },
    });
    expect((await fetch(up.url, { method: 'HEAD' })).status).toBe(200);
  });
});

describe('Gemini upstream', () => {
  let up: Upstream;
  beforeAll(async () => {
    up = await startGeminiUpstream({ credential: KEY });
  });
  afterAll(() => up.close());

  const body = JSON.stringify({ contents: [{ role: 'user', parts: [{ text: 'hi' }] }] });
  const post = (path: string, headers: Record<string, string> = {}) =>
    fetch(`${up.url}${path}`, { method: 'POST', headers: { 'content-type': 'application/json', ...headers }, body });

  it('generates content with the key in x-goog-api-key', async () => {
    const res = await post('/v1beta/models/gemini-2.5-flash:generateContent', { 'x-goog-api-key': KEY });
    expect(res.status).toBe(200);
    const json = (await res.json()) as {
      candidates: { content: { parts: { text: string }[] }; finishReason: string }[];
      usageMetadata: unknown;
      modelVersion: string;
    };
    expect(json.candidates[0]?.content.parts[0]?.text).toBe(fakeAnswer(5));
    expect(json.candidates[0]?.finishReason).toBe('STOP');
    expect(json.modelVersion).toBe('gemini-2.5-flash');
    const prompt = fakeTokenCount(body);
    expect(json.usageMetadata).toMatchObject({ promptTokenCount: prompt, candidatesTokenCount: 5, totalTokenCount: prompt + 5 });
  });

  it('streams SSE with ?key= and cumulative usageMetadata', async () => {
    const res = await post(`/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse&key=${KEY}`);
    expect(res.status).toBe(200);
    const text = await res.text();
    expect(text).toContain('\r\n\r\n');
    const chunks = frames(text).map((f) => JSON.parse(dataOf(f)));
    expect(chunks.map((c) => c.usageMetadata.candidatesTokenCount)).toEqual([1, 2, 3, 4, 5]);
    expect(chunks.map((c) => c.candidates[0].content.parts[0].text).join('')).toBe(fakeAnswer(5));
    expect(chunks.at(-1).candidates[0].finishReason).toBe('STOP');
    expect(up.received.at(-1)?.path).toContain(`key=${KEY}`);
  });

  it('counts tokens and lists models', async () => {
    const count = await post('/v1beta/models/gemini-2.5-flash:countTokens', { 'x-goog-api-key': KEY });
    expect(await count.json()).toMatchObject({ totalTokens: fakeTokenCount(body) });
    const models = await fetch(`${up.url}/v1beta/models?key=${KEY}`);
    expect(((await models.json()) as { models: { name: string }[] }).models.map((m) => m.name)).toContain('models/gemini-2.5-flash');
  });

  it('refuses a wrong key with 400 INVALID_ARGUMENT and a missing one with 403', async () => {
    const wrong = await post('/v1beta/models/gemini-2.5-flash:generateContent', { 'x-goog-api-key': WRONG });
    expect(wrong.status).toBe(400);
    expect(await wrong.json()).toMatchObject({
      error: { code: 400, message: 'API key not valid. Please pass a valid API key.', status: 'INVALID_ARGUMENT' },
    });
    const wrongQuery = await post(`/v1beta/models/gemini-2.5-flash:generateContent?key=${WRONG}`);
    expect(wrongQuery.status).toBe(400);
    const missing = await post('/v1beta/models/gemini-2.5-flash:generateContent');
    expect(missing.status).toBe(403);
    expect(up.rejected).toHaveLength(3);
  });
});

describe('GitHub upstream', () => {
  let up: Upstream;
  beforeAll(async () => {
    up = await startGitHubUpstream({ credential: KEY });
  });
  afterAll(() => up.close());

  it('serves /user with Bearer or token auth and counts rate-limit use', async () => {
    const a = await fetch(`${up.url}/user`, { headers: { authorization: `Bearer ${KEY}` } });
    expect(a.status).toBe(200);
    expect(((await a.json()) as { login: string }).login).toBe('till-test');
    const b = await fetch(`${up.url}/user`, { headers: { authorization: `token ${KEY}` } });
    expect(b.status).toBe(200);
    expect(b.headers.get('x-ratelimit-limit')).toBe('5000');
    expect(Number(b.headers.get('x-ratelimit-remaining'))).toBe(Number(a.headers.get('x-ratelimit-remaining')) - 1);
    expect(b.headers.get('x-ratelimit-used')).toBe('2');
    expect(b.headers.get('x-ratelimit-resource')).toBe('core');
    expect(Number(b.headers.get('x-ratelimit-reset'))).toBeGreaterThan(Date.now() / 1000);
  });

  it('serves repos and creates issues', async () => {
    const repo = await fetch(`${up.url}/repos/octo/hello`, { headers: { authorization: `Bearer ${KEY}` } });
    expect(await repo.json()).toMatchObject({ full_name: 'octo/hello', owner: { login: 'octo' } });
    const issue = await fetch(`${up.url}/repos/octo/hello/issues`, {
      method: 'POST',
      headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
      body: JSON.stringify({ title: 'Bug', body: 'details' }),
    });
    expect(issue.status).toBe(201);
    expect(await issue.json()).toMatchObject({ number: 1, title: 'Bug', body: 'details', state: 'open' });
    const noTitle = await fetch(`${up.url}/repos/octo/hello/issues`, {
      method: 'POST',
      headers: { authorization: `Bearer ${KEY}` },
      body: '{}',
    });
    expect(noTitle.status).toBe(422);
  });

  it('refuses bad credentials with 401', async () => {
    const res = await fetch(`${up.url}/user`, { headers: { authorization: `Bearer ${WRONG}` } });
    expect(res.status).toBe(401);
    expect(await res.json()).toEqual({ message: 'Bad credentials', documentation_url: 'https://docs.github.com/rest', status: '401' });
    expect(res.headers.get('x-ratelimit-limit')).toBe('60');
    expect(up.rejected).toHaveLength(1);
  });
});

describe('fixture mechanics', () => {
  it('writes streams event by event and notices a client that leaves mid-stream', async () => {
    const up = await startOpenAIUpstream({ credential: KEY, streamDelayMs: 40, streamChunks: 20 });
    try {
      const ac = new AbortController();
      const started = Date.now();
      const res = await fetch(`${up.url}/v1/chat/completions`, {
        method: 'POST',
        headers: { authorization: `Bearer ${KEY}`, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'gpt-4o-mini', messages: [], stream: true }),
        signal: ac.signal,
      });
      const reader = res.body!.getReader();
      const first = await reader.read();
      expect(new TextDecoder().decode(first.value)).toMatch(/^data: /);
      expect(Date.now() - started).toBeLessThan(20 * 40); // long before the whole stream
      expect(up.inFlight()).toBe(1);
      ac.abort();
      await vi.waitFor(() => expect(up.inFlight()).toBe(0));
      expect(up.abortedStreams()).toBe(1);
    } finally {
      await up.close();
    }
  });

  it('hangs on request, counts it in flight and waits for requests', async () => {
    const up = await startAnthropicUpstream({ credential: KEY, hang: true });
    try {
      const ac = new AbortController();
      const pending = fetch(`${up.url}/v1/messages`, {
        method: 'POST',
        headers: { 'x-api-key': KEY, 'anthropic-version': '2023-06-01' },
        body: '{}',
        signal: ac.signal,
      }).catch((e: unknown) => e);
      await up.waitForRequests(1, 2_000);
      expect(up.received).toHaveLength(1);
      expect(up.inFlight()).toBe(1);
      await expect(up.waitForRequests(2, 50)).rejects.toThrow(/1 of 2 requests/);
      ac.abort();
      expect(await pending).toBeInstanceOf(Error);
      await vi.waitFor(() => expect(up.inFlight()).toBe(0));
      expect(up.abortedStreams()).toBe(1);
    } finally {
      await up.close();
    }
  });

  it('close() destroys open sockets, even of hung requests', async () => {
    const up = await startGeminiUpstream({ credential: KEY, hang: true });
    const pending = fetch(`${up.url}/v1beta/models?key=${KEY}`).catch((e: unknown) => e);
    await up.waitForRequests(1);
    const t = Date.now();
    await up.close();
    expect(Date.now() - t).toBeLessThan(1_000);
    expect(await pending).toBeInstanceOf(Error);
    expect(up.abortedStreams()).toBe(0);
  });
});
