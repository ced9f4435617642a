/**
 * The real Codex CLI (`@openai/codex`), headless, through `till exec --agent codex` against a
 * 127.0.0.1 imitation of the Responses API that accepts only the real credential: over the
 * Responses WebSocket (Codex's default when the provider offers it) and over HTTP streaming
 * (when the upstream refuses the upgrade with 426). Each transport: a prompt with one tool round
 * trip, usage on the key, nothing sent around the broker, the user's own Codex settings kept, and
 * revocation ending a live answer with Till's message.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CREDENTIAL_MARKER, addCredential, fakeCredential, runTill, spawnServe, tempHome, type ServeProcess } from '../support/till';
import { startOpenAIUpstream, type Upstream } from '../support/upstreams';
import { isLoopback, listKeys, noteReader, runAgent, waitFor, workspace } from './support/agentRun';

/** The user's own ~/.codex/config.toml, which Till layers its provider over. */
const USER_CONFIG = `# my settings
model = "gpt-5.5"
model_reasoning_effort = "low"

[tui]
notifications = false
`;

describe.each(['websocket', 'http'] as const)('Codex CLI through Till over %s', (transport) => {
  const marker = `NOTE-${randomBytes(6).toString('hex')}`;
  let home: string;
  let dir: string;
  let credential: string;
  let up: Upstream;
  let serve: ServeProcess;

  beforeAll(async () => {
    home = tempHome();
    dir = workspace(marker);
    credential = fakeCredential('openai');
    up = await startOpenAIUpstream({ credential, reply: noteReader(dir, marker), websocket: transport === 'websocket' });
    await addCredential(home, 'openai', 'openai', credential);
    serve = await spawnServe(home, { env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
  });

  afterAll(async () => {
    await serve?.stop();
    await up?.close();
  });

  /** Generated responses the upstream was asked for (prewarms excluded), over either transport. */
  const generated = () =>
    transport === 'websocket'
      ? up.socketMessages.filter((m) => m.type === 'response.create' && m.generate !== false)
      : up.received.filter((r) => r.method === 'POST' && r.path === '/v1/responses').map((r) => JSON.parse(r.body) as Record<string, unknown>);

  it('completes a prompt with a tool round trip, its usage counted on the key, with nothing sent around the broker', async () => {
    const label = `codex ${transport} round trip`;
    const run = runAgent({
      home,
      agent: 'codex',
      tillArgs: ['--uses', '10', '--label', label],
      args: ['exec', '--skip-git-repo-check', 'Please read note.txt and tell me what it says.'],
      cwd: dir,
      homeFiles: { '.codex/config.toml': USER_CONFIG },
    });
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${marker}.`);

    // The transport: the Responses WebSocket, or HTTP after the upstream refused the upgrade.
    if (transport === 'websocket') {
      expect(up.upgrades.length).toBeGreaterThanOrEqual(1);
      for (const u of up.upgrades) expect(u.headers.authorization).toBe(`Bearer ${credential}`);
      expect(up.socketMessages.some((m) => m.generate === false)).toBe(true); // Codex's prewarm
    } else {
      expect(up.upgrades).toHaveLength(0);
      for (const c of up.received) expect(c.headers.authorization).toBe(`Bearer ${credential}`);
    }
    expect(up.rejected).toHaveLength(0);

    // The round trip: Codex ran its shell tool and sent the note back as the function call's output.
    const calls = generated();
    expect(calls.length).toBeGreaterThanOrEqual(2);
    expect(calls.some((c) => JSON.stringify(c.input).includes('function_call_output') && JSON.stringify(c.input).includes(marker))).toBe(true);

    // The agent was given a till key and a Codex home whose provider is the broker, never the credential.
    expect(r.env.OPENAI_API_KEY).toMatch(/^till_/);
    expect(r.env.OPENAI_BASE_URL).toBeUndefined();
    expect(Object.values(r.env).join('\n')).not.toContain(CREDENTIAL_MARKER);
    const config = r.files.find((f) => f.path.endsWith('codex-home/config.toml'))?.text ?? '';
    expect(config).toContain(`base_url = "${serve.url}/openai/v1"`);
    expect(config).toContain('model_reasoning_effort = "low"'); // the user's settings, kept
    expect(config).toContain('[tui]');
    for (const f of r.files) expect(f.text.includes(CREDENTIAL_MARKER), f.path).toBe(false);

    // Usage: one activation per generated response (the prewarm is free), exactly the tokens reported.
    const key = (await listKeys(home)).find((k) => k.label === label);
    expect(key?.state).toBe('revoked'); // till exec revokes its keys when the command exits
    expect(key?.used.activations).toBe(calls.length);
    expect(key?.tokens.input).toBe(up.reported.inputTokens);
    expect(key?.tokens.output).toBe(up.reported.outputTokens);
    expect(key?.spend.usd).toBeGreaterThan(0);

    // Every address Codex (and the shell it ran) tried was the broker's, on loopback.
    const brokerPort = Number(new URL(serve.url).port);
    expect(r.destinations.length).toBeGreaterThan(0);
    for (const d of r.destinations) expect(isLoopback(d.address), JSON.stringify(d)).toBe(true);
    expect(r.destinations.map((d) => d.port)).toContain(brokerPort);
    expect(r.destinations.map((d) => d.port)).not.toContain(Number(new URL(up.url).port));
  });

  it('a one-dollar key: Codex still completes, each response capped to what the dollar leaves', async () => {
    const label = `codex ${transport} dollar`;
    const before = generated().length;
    const run = runAgent({
      home,
      agent: 'codex',
      tillArgs: ['--max-spend', '1', '--label', label],
      args: ['exec', '--skip-git-repo-check', 'Please read note.txt and tell me what it says.'],
      cwd: dir,
      homeFiles: { '.codex/config.toml': USER_CONFIG },
    });
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${marker}.`);
    const calls = generated().slice(before);
    expect(calls.length).toBeGreaterThanOrEqual(2);
    // Codex sets no output limit; the broker adds one that fits the dollar (gpt-5.5: $30 per million out).
    for (const c of calls) expect(c.max_output_tokens).toBeLessThanOrEqual(1_000_000 / 30);
    const key = (await listKeys(home)).find((k) => k.label === label);
    expect(key?.spend.usd).toBeGreaterThan(0);
    expect(key?.spend.usd).toBeLessThanOrEqual(1);
    expect(key?.spend.reservedUsd).toBe(0);
  });

  it(`revoking the key mid-answer ends Codex with Till's message, not a hang`, async () => {
    const label = `codex ${transport} revoked`;
    const before = generated().length;
    const run = runAgent({ home, agent: 'codex', tillArgs: ['--label', label], args: ['exec', '--skip-git-repo-check', 'Keep talking until I stop you.'], cwd: dir });
    await waitFor('the answer to stream', () => (generated().length > before ? true : undefined));
    const key = (await listKeys(home)).find((k) => k.label === label && k.state === 'active');
    expect(key?.inFlight).toBe(1);
    if (transport === 'websocket') expect(up.openSockets()).toBe(1);
    const revokedAt = Date.now();
    expect((await runTill(['revoke', key!.id], { home })).code).toBe(0);
    // The broker ends the live answer at once: the upstream socket (or stream) is gone.
    await waitFor('the upstream answer to be cut', () => (up.openSockets() === 0 && up.inFlight() === 0 ? true : undefined), 5_000);
    // Codex retries a 401 five times per transport before it gives up (about 8 s over HTTP, 15 s
    // when it first retries the WebSocket); then it exits with Till's message.
    const r = await run.done;
    expect(Date.now() - revokedAt).toBeLessThan(45_000);
    expect(r.code, run.output()).not.toBe(0);
    expect(run.output()).toMatch(/till: till key "[^"]+" was revoked/);
  });
});
