/**
 * Token and dollar budgets from the `till` command: issue with --max-tokens/--max-spend, see
 * tokens, spend and reservations in `till ls --json`, each request's usage in `till watch
 * --json`, and raise a limit with `till extend`.
 */
import { spawn } from 'node:child_process';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeySummary, TillEvent } from '../src/core/events';
import type { IssuedKey } from '../src/core/runtime/controlApi';
import { addCredential, fakeCredential, runTill, spawnServe, tempHome, TILL_JS, type ServeProcess } from './support/till';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';

let up: Upstream;
let serve: ServeProcess;
let home: string;
const secret = fakeCredential('cli-budget');

beforeAll(async () => {
  up = await startOpenAIUpstream({ credential: secret });
  home = tempHome();
  await addCredential(home, 'openai', 'openai', secret);
  serve = await spawnServe(home, { env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
});

afterAll(async () => {
  await serve?.stop();
  await up?.close();
});

const chat = (k: IssuedKey) =>
  fetch(`${k.baseUrl}/chat/completions`, {
    method: 'POST',
    body: '{"model":"gpt-5-mini","max_tokens":5,"messages":[]}',
    headers: { authorization: `Bearer ${k.key}`, 'content-type': 'application/json' },
  }).then(async (r) => ({ status: r.status, text: await r.text() }));

describe('budgets from the till command', () => {
  it('issue --max-tokens --max-spend; ls --json shows tokens, spend and reservations; watch --json carries usage', async () => {
    const watcher = spawn(process.execPath, [TILL_JS, 'watch', '--json'], {
      env: { ...process.env, TILL_HOME: home },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let lines = '';
    watcher.stdout.on('data', (c) => (lines += c));
    try {
      // till watch prints what happens once it is attached: wait until it prints a key being issued.
      await expect
        .poll(async () => (await runTill(['issue', 'openai', '--label', 'watch probe'], { home })) && lines.includes('"watch probe"'), {
          timeout: 10_000,
        })
        .toBe(true);
      const r = await runTill(['issue', 'openai', '--max-tokens', '5000', '--max-spend', '1.50', '--json'], { home });
      expect(r.code).toBe(0);
      const issued = JSON.parse(r.stdout) as IssuedKey;
      expect(issued.policy).toMatchObject({ maxTokens: 5000, maxSpendUsd: 1.5 });
      expect((await chat(issued)).status).toBe(200);
      const ls = JSON.parse((await runTill(['ls', '--json'], { home })).stdout) as KeySummary[];
      const k = ls.find((x) => x.id === issued.id)!;
      expect(k.tokens.output).toBe(5);
      expect(k.used.tokens).toBe(k.tokens.input + k.tokens.output);
      expect(k.used.spend).toBeGreaterThan(0);
      expect(k.reserved).toEqual({ activations: 0, tokens: 0, spend: 0 });
      expect(k.remaining.tokens).toBe(5000 - k.used.tokens!);
      expect(k.spend).toMatchObject({ estimatedUsd: 0, reservedUsd: 0, limitUsd: 1.5 });
      expect(k.spend.usd).toBeCloseTo(k.used.spend! / 1e6, 9);
      await expect.poll(() => lines.includes('"request.finished"')).toBe(true);
      const finished = lines
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as TillEvent)
        .find((e) => e.type === 'request.finished');
      expect(finished).toMatchObject({ usage: { tokens: { output: 5 }, estimated: false } });
      const human = (await runTill(['ls'], { home })).stdout;
      expect(human).toMatch(/TOKENS \/ SPEND/);
      expect(human).toMatch(/\/5000 tok <?\$0\.\d+\/\$1\.50/);
    } finally {
      watcher.kill('SIGINT');
    }
  });

  it('shows the spend of a model without a price as unknown, its tokens counted', async () => {
    const issued = JSON.parse((await runTill(['issue', 'openai', '--max-tokens', '5000', '--json'], { home })).stdout) as IssuedKey;
    const unpriced = await fetch(`${issued.baseUrl}/chat/completions`, {
      method: 'POST',
      body: '{"model":"no-such-model-z","max_tokens":5,"messages":[{"role":"user","content":"hi"}]}',
      headers: { authorization: `Bearer ${issued.key}`, 'content-type': 'application/json' },
    });
    expect(unpriced.status).toBe(200);
    await unpriced.text();
    const k = (JSON.parse((await runTill(['ls', '--json'], { home })).stdout) as KeySummary[]).find((x) => x.id === issued.id)!;
    expect(k.tokens.output).toBe(5);
    expect(k.used.tokens).toBe(k.tokens.input + 5);
    // Unknown, not $0.00: a script summing dollars must not count it as free.
    expect(k.spend).toMatchObject({ usd: null, pricedUsd: 0, unpricedRequests: 1 });
    // A priced request after it: the known part, and still unknown in all.
    expect((await chat(issued)).status).toBe(200);
    const after = (JSON.parse((await runTill(['ls', '--json'], { home })).stdout) as KeySummary[]).find((x) => x.id === issued.id)!;
    expect(after.spend.usd).toBeNull();
    expect(after.spend.pricedUsd).toBeGreaterThan(0);
    const line = (await runTill(['ls'], { home })).stdout.split('\n').find((l) => l.startsWith(issued.id))!;
    expect(line).toMatch(/\$0\.\d+ \+ unknown/);
  });

  it('rejects a malformed --max-spend with a usage error', async () => {
    const r = await runTill(['issue', 'openai', '--max-spend', 'lots'], { home });
    expect(r.code).toBe(2);
    expect(r.stderr).toMatch(/--max-spend needs an amount of US dollars/);
  });

  it('a spent budget is refused with the limit, used and reserved; till extend raises it', async () => {
    const issued = JSON.parse((await runTill(['issue', 'openai', '--max-tokens', '300', '--json'], { home })).stdout) as IssuedKey;
    let last = await chat(issued);
    for (let i = 0; i < 50 && last.status === 200; i++) last = await chat(issued);
    expect(last.status).toBe(429);
    expect(last.text).toMatch(/till key out of tokens: \d+ of 300 tokens used/);
    const ext = await runTill(['extend', issued.id, '--max-tokens', '1000'], { home });
    expect(ext.code).toBe(0);
    expect(ext.stdout).toMatch(/1,300 tokens/);
    expect((await chat(issued)).status).toBe(200);
    // till serve's console: key events and refusals, not a line per served request (that is --verbose, or till watch).
    await expect.poll(() => serve.output()).toMatch(/key issued: .* \(openai/);
    expect(serve.output()).toMatch(/429 POST \/openai\/v1\/chat\/completions denied \(exhausted\)/);
    expect(serve.output()).not.toMatch(/ 200 POST /);
  });
});
