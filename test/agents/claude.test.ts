/**
 * The real Claude Code CLI (`@anthropic-ai/claude-code`), headless, through `till exec --agent
 * claude` against a 127.0.0.1 imitation of the Messages API that accepts only the real
 * credential: a prompt with one tool round trip, usage on the key, nothing sent around the
 * broker, a dollar limit, two agents at once on one dollar key, and revocation ending a live
 * answer with Till's message.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startAnthropicUpstream } from '../support/upstreams';
import {
  expectNoCredential,
  expectOnlyBroker,
  expectServedWithin,
  expectUsage,
  revokeWhileStreaming,
  startAgentBroker,
  type AgentBroker,
} from './support/agentChecks';
import { waitFor } from '../support/wait';
import { listKeys, runAgent } from './support/agentRun';

let b: AgentBroker;
beforeAll(async () => {
  b = await startAgentBroker({ provider: 'anthropic', start: startAnthropicUpstream });
});
afterAll(() => b?.close());

const messagesCalls = () => b.up.received.filter((r) => r.method === 'POST' && r.path.startsWith('/v1/messages'));
const claude = (label: string, prompt: string, limits: string[] = []) =>
  runAgent({
    home: b.home,
    agent: 'claude',
    tillArgs: [...limits, '--label', label],
    args: ['-p', prompt, '--output-format', 'text'],
    cwd: b.dir,
  });

describe('Claude Code through Till', () => {
  it('completes a prompt with a tool round trip, its usage counted on the key, with nothing sent around the broker', async () => {
    const run = claude('claude round trip', 'Please read note.txt and tell me what it says.', ['--uses', '10']);
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${b.marker}.`);

    // The round trip: Claude Code ran its Read tool and sent the note back as a tool result.
    const calls = messagesCalls();
    expect(calls.length).toBeGreaterThanOrEqual(2);
    expect(calls.some((c) => c.body.includes('"tool_result"') && c.body.includes(b.marker))).toBe(true);
    // Each call reached the upstream with the real credential, which only the broker holds.
    for (const c of calls) expect(c.headers['x-api-key']).toBe(b.credential);
    expect(b.up.rejected).toHaveLength(0);

    // The agent was given a till key and the broker's address, never the credential.
    expect(r.env.ANTHROPIC_API_KEY).toMatch(/^till_/);
    expect(r.env.ANTHROPIC_BASE_URL).toBe(`${b.serve.url}/anthropic`);
    expect(r.env.CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC).toBe('1');
    expectNoCredential(r);

    const key = (await listKeys(b.home)).find((k) => k.label === 'claude round trip');
    expectUsage(key, calls.length, b.up);
    expect(key?.spend.usd).toBeGreaterThan(0);
    expectOnlyBroker(r, b);
  });

  it('a one-dollar key: Claude Code still completes, its 128k max_tokens capped to what the dollar leaves', async () => {
    const before = messagesCalls().length;
    const run = claude('claude dollar', 'Please read note.txt and tell me what it says.', ['--max-spend', '1']);
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${b.marker}.`);
    const calls = messagesCalls().slice(before);
    expect(calls.length).toBeGreaterThanOrEqual(2);
    // Claude Code asks for 128,000 output tokens: $2.56 at claude-opus-5-5's $20 per million.
    for (const c of calls) expect((JSON.parse(c.body) as { max_tokens: number }).max_tokens).toBeLessThan(50_000);
    const key = (await listKeys(b.home)).find((k) => k.label === 'claude dollar');
    expect(key?.spend.usd).toBeGreaterThan(0);
    expect(key?.spend.usd).toBeLessThanOrEqual(1);
    expect(key?.spend.reservedUsd).toBe(0);
  });

  it('two Claude Code prompts at once on a $2 key: both served, none refused, spend within the key', async () => {
    // Each call asks for 128,000 output tokens ($2.56): held at that worst case, the first call
    // took the whole key and the other agent's calls were refused while it ran.
    // Each model call is answered once the other agent's is in flight too, so they overlap.
    const pb = await startAgentBroker({ provider: 'anthropic', start: startAnthropicUpstream, upstream: { streamDelayMs: 20, gather: 2 } });
    try {
      const label = 'claude parallel';
      const run = runAgent({
        home: pb.home,
        agent: 'claude',
        tillArgs: ['--max-spend', '2', '--label', label],
        args: ['-p', 'Please read note.txt and tell me what it says.', '--output-format', 'text'],
        cwd: pb.dir,
        parallel: 2,
      });
      const r = await run.done;
      expect(r.code, run.output()).toBe(0);
      expect(r.stdout.split(`The note says ${pb.marker}.`).length - 1, run.output()).toBe(2);
      expect(pb.up.received.filter((c) => c.method === 'POST' && c.path.startsWith('/v1/messages')).length).toBeGreaterThanOrEqual(4);
      expect(pb.up.peakInFlight()).toBeGreaterThanOrEqual(2);
      await expectServedWithin(pb.home, label, 2);
    } finally {
      await pb.close();
    }
  });

  it("revoking the key mid-answer ends Claude Code with Till's message, not a hang", async () => {
    const before = messagesCalls().length;
    const run = claude('claude revoked', 'Keep talking until I stop you.');
    const { r, afterMs } = await revokeWhileStreaming(
      b,
      run,
      'claude revoked',
      () => messagesCalls().length > before && b.up.inFlight() > 0,
    );
    expect(afterMs).toBeLessThan(30_000);
    expect(r.code, run.output()).not.toBe(0);
    expect(run.output()).toMatch(/till: till key "claude revoked" was revoked/);
    await waitFor('the upstream stream to be cut', () => b.up.inFlight() === 0, { timeoutMs: 5_000 });
  });
});
