/**
 * The real Codex CLI (`@openai/codex`), headless, through `till exec --agent codex` against a
 * 127.0.0.1 imitation of the Responses API that accepts only the real credential: over the
 * Responses WebSocket (Codex's default when the provider offers it) and over HTTP streaming
 * (when the upstream refuses the upgrade with 426). Each transport: a prompt with one tool round
 * trip, usage on the key, nothing sent around the broker, the user's own Codex settings kept, a
 * dollar limit, two agents at once on one dollar key, and revocation ending a live answer with
 * Till's message.
 */
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { startOpenAIUpstream } from '../support/upstreams';
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

/** The user's own ~/.codex/config.toml, which Till layers its provider over. */
const USER_CONFIG = `# my settings
model = "gpt-5.5"
model_reasoning_effort = "low"

[tui]
notifications = false
`;

describe.each(['websocket', 'http'] as const)('Codex CLI through Till over %s', (transport) => {
  let b: AgentBroker;
  beforeAll(async () => {
    b = await startAgentBroker({
      provider: 'openai',
      start: startOpenAIUpstream,
      upstreamUrl: (origin) => `${origin}/v1`,
      upstream: { websocket: transport === 'websocket' },
    });
  });
  afterAll(() => b?.close());

  /** Generated responses the upstream was asked for (prewarms excluded), over either transport. */
  const generated = () =>
    transport === 'websocket'
      ? b.up.socketMessages.filter((m) => m.type === 'response.create' && m.generate !== false)
      : b.up.received
          .filter((r) => r.method === 'POST' && r.path === '/v1/responses')
          .map((r) => JSON.parse(r.body) as Record<string, unknown>);
  const codex = (label: string, prompt: string, limits: string[] = []) =>
    runAgent({
      home: b.home,
      agent: 'codex',
      tillArgs: [...limits, '--label', label],
      args: ['exec', '--skip-git-repo-check', prompt],
      cwd: b.dir,
      homeFiles: { '.codex/config.toml': USER_CONFIG },
    });

  it('completes a prompt with a tool round trip, its usage counted on the key, with nothing sent around the broker', async () => {
    const label = `codex ${transport} round trip`;
    const run = codex(label, 'Please read note.txt and tell me what it says.', ['--uses', '10']);
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${b.marker}.`);

    // The transport: the Responses WebSocket, or HTTP after the upstream refused the upgrade.
    if (transport === 'websocket') {
      expect(b.up.upgrades.length).toBeGreaterThanOrEqual(1);
      for (const u of b.up.upgrades) expect(u.headers.authorization).toBe(`Bearer ${b.credential}`);
      expect(b.up.socketMessages.some((m) => m.generate === false)).toBe(true); // Codex's prewarm
      // Its turns chain from the prewarm or from each other, on one socket: none was refused.
      expect(run.output()).not.toMatch(/Reconnecting|previous_response_not_found/);
    } else {
      expect(b.up.upgrades).toHaveLength(0);
      for (const c of b.up.received) expect(c.headers.authorization).toBe(`Bearer ${b.credential}`);
    }
    expect(b.up.rejected).toHaveLength(0);

    // The round trip: Codex ran its shell tool and sent the note back as the function call's output.
    const calls = generated();
    expect(calls.length).toBeGreaterThanOrEqual(2);
    expect(calls.some((c) => JSON.stringify(c.input).includes('function_call_output') && JSON.stringify(c.input).includes(b.marker))).toBe(
      true,
    );

    // The agent was given a till key and a Codex home whose provider is the broker, never the credential.
    expect(r.env.OPENAI_API_KEY).toMatch(/^till_/);
    expect(r.env.OPENAI_BASE_URL).toBeUndefined();
    const config = r.files.find((f) => f.path.endsWith('codex-home/config.toml'))?.text ?? '';
    expect(config).toContain(`base_url = "${b.serve.url}/openai/v1"`);
    expect(config).toContain('model_reasoning_effort = "low"'); // the user's settings, kept
    expect(config).toContain('[tui]');
    expectNoCredential(r);

    // One activation per generated response (the prewarm is free).
    const key = (await listKeys(b.home)).find((k) => k.label === label);
    expectUsage(key, calls.length, b.up);
    expect(key?.spend.usd).toBeGreaterThan(0);
    expectOnlyBroker(r, b); // the shell Codex ran included
  });

  it('a one-dollar key: Codex still completes, each response capped to what the dollar leaves', async () => {
    const label = `codex ${transport} dollar`;
    const before = generated().length;
    const run = codex(label, 'Please read note.txt and tell me what it says.', ['--max-spend', '1']);
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${b.marker}.`);
    const calls = generated().slice(before);
    expect(calls.length).toBeGreaterThanOrEqual(2);
    // Codex sets no output limit; the broker adds one that fits the dollar (gpt-5.5: $30 per million out).
    for (const c of calls) expect(c.max_output_tokens).toBeLessThanOrEqual(1_000_000 / 30);
    const key = (await listKeys(b.home)).find((k) => k.label === label);
    expect(key?.spend.usd).toBeGreaterThan(0);
    expect(key?.spend.usd).toBeLessThanOrEqual(1);
    expect(key?.spend.reservedUsd).toBe(0);
  });

  it('two Codex prompts at once on a $2 key: both served, none refused, spend within the key', async () => {
    // Codex names no output limit: held at the model's whole output ($3.84 for gpt-5.5), one
    // response took the key and the other agent's were refused while it ran.
    const label = `codex ${transport} parallel`;
    // Over HTTP each response is answered once the other agent's is in flight too, so they overlap.
    const pb = await startAgentBroker({
      provider: 'openai',
      start: startOpenAIUpstream,
      upstreamUrl: (origin) => `${origin}/v1`,
      upstream: { websocket: transport === 'websocket', streamDelayMs: 20, gather: 2 },
    });
    try {
      const run = runAgent({
        home: pb.home,
        agent: 'codex',
        tillArgs: ['--max-spend', '2', '--label', label],
        args: ['exec', '--skip-git-repo-check', 'Please read note.txt and tell me what it says.'],
        cwd: pb.dir,
        homeFiles: { '.codex/config.toml': USER_CONFIG },
        parallel: 2,
      });
      const r = await run.done;
      expect(r.code, run.output()).toBe(0);
      expect(r.stdout.split(`The note says ${pb.marker}.`).length - 1, run.output()).toBeGreaterThanOrEqual(2);
      const responses =
        transport === 'websocket'
          ? pb.up.socketMessages.filter((m) => m.type === 'response.create' && m.generate !== false).length
          : pb.up.received.filter((c) => c.method === 'POST' && c.path === '/v1/responses').length;
      expect(responses).toBeGreaterThanOrEqual(4);
      if (transport === 'http') expect(pb.up.peakInFlight()).toBeGreaterThanOrEqual(2);
      await expectServedWithin(pb.home, label, 2);
    } finally {
      await pb.close();
    }
  });

  it(`revoking the key mid-answer ends Codex with Till's message, not a hang`, async () => {
    const label = `codex ${transport} revoked`;
    const before = generated().length;
    const run = codex(label, 'Keep talking until I stop you.');
    const streaming = () => generated().length > before && (transport === 'websocket' ? b.up.openSockets() === 1 : b.up.inFlight() === 1);
    const { r, afterMs, inFlight } = await revokeWhileStreaming(b, run, label, streaming);
    expect(inFlight).toBe(1);
    // The broker ended the live answer at once: the upstream socket (or stream) is gone.
    await waitFor('the upstream answer to be cut', () => b.up.openSockets() === 0 && b.up.inFlight() === 0, { timeoutMs: 5_000 });
    // Codex retries a 401 five times per transport before it gives up (about 8 s over HTTP, 15 s
    // when it first retries the WebSocket); then it exits with Till's message.
    expect(afterMs).toBeLessThan(45_000);
    expect(r.code, run.output()).not.toBe(0);
    expect(run.output()).toMatch(/till: till key "[^"]+" was revoked/);
  });
});
