/**
 * The real Claude Code CLI (`@anthropic-ai/claude-code`), headless, through `till exec --agent
 * claude` against a 127.0.0.1 imitation of the Messages API that accepts only the real
 * credential: a prompt with one tool round trip, usage on the key, nothing sent around the
 * broker, and revocation ending a live answer with Till's message.
 */
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CREDENTIAL_MARKER, addCredential, fakeCredential, runTill, spawnServe, tempHome, type ServeProcess } from '../support/till';
import { startAnthropicUpstream, type Upstream } from '../support/upstreams';
import { isLoopback, listKeys, noteReader, runAgent, waitFor, workspace } from './support/agentRun';

const marker = `NOTE-${randomBytes(6).toString('hex')}`;
let home: string;
let dir: string;
let credential: string;
let up: Upstream;
let serve: ServeProcess;

beforeAll(async () => {
  home = tempHome();
  dir = workspace(marker);
  credential = fakeCredential('anthropic');
  up = await startAnthropicUpstream({ credential, reply: noteReader(dir, marker) });
  await addCredential(home, 'anthropic', 'anthropic', credential);
  serve = await spawnServe(home, { env: { TILL_UPSTREAM_ANTHROPIC: up.url } });
});

afterAll(async () => {
  await serve?.stop();
  await up?.close();
});

const messagesCalls = () => up.received.filter((r) => r.method === 'POST' && r.path.startsWith('/v1/messages'));

describe('Claude Code through Till', () => {
  it('completes a prompt with a tool round trip, its usage counted on the key, with nothing sent around the broker', async () => {
    const run = runAgent({
      home,
      agent: 'claude',
      tillArgs: ['--uses', '10', '--label', 'claude round trip'],
      args: ['-p', 'Please read note.txt and tell me what it says.', '--output-format', 'text'],
      cwd: dir,
    });
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${marker}.`);

    // The round trip: Claude Code ran its Read tool and sent the note back as a tool result.
    const calls = messagesCalls();
    expect(calls.length).toBeGreaterThanOrEqual(2);
    expect(calls.some((c) => c.body.includes('"tool_result"') && c.body.includes(marker))).toBe(true);
    // Each call reached the upstream with the real credential, which only the broker holds.
    for (const c of calls) expect(c.headers['x-api-key']).toBe(credential);
    expect(up.rejected).toHaveLength(0);

    // The agent was given a till key and the broker's address, never the credential.
    expect(r.env.ANTHROPIC_API_KEY).toMatch(/^till_/);
    expect(r.env.ANTHROPIC_BASE_URL).toBe(`${serve.url}/anthropic`);
    expect(r.env.CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC).toBe('1');
    expect(Object.values(r.env).join('\n')).not.toContain(CREDENTIAL_MARKER);
    expect(r.files.length).toBeGreaterThan(0);
    for (const f of r.files) expect(f.text.includes(CREDENTIAL_MARKER), f.path).toBe(false);

    // Usage: one activation per Messages call, and exactly the tokens the upstream reported.
    const key = (await listKeys(home)).find((k) => k.label === 'claude round trip');
    expect(key?.state).toBe('revoked'); // till exec revokes its keys when the command exits
    expect(key?.used.activations).toBe(calls.length);
    expect(key?.tokens.input).toBe(up.reported.inputTokens);
    expect(key?.tokens.output).toBe(up.reported.outputTokens);
    expect(key?.spend.usd).toBeGreaterThan(0);

    // Every address Claude Code tried was the broker's, on loopback; none was the upstream's.
    const brokerPort = Number(new URL(serve.url).port);
    expect(r.destinations.length).toBeGreaterThan(0);
    for (const d of r.destinations) expect(isLoopback(d.address), JSON.stringify(d)).toBe(true);
    expect(r.destinations.map((d) => d.port)).toContain(brokerPort);
    expect(r.destinations.map((d) => d.port)).not.toContain(Number(new URL(up.url).port));
  });

  it('a one-dollar key: Claude Code still completes, its 128k max_tokens capped to what the dollar leaves', async () => {
    const before = messagesCalls().length;
    const run = runAgent({ home, agent: 'claude', tillArgs: ['--max-spend', '1', '--label', 'claude dollar'], args: ['-p', 'Please read note.txt and tell me what it says.', '--output-format', 'text'], cwd: dir });
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${marker}.`);
    const calls = messagesCalls().slice(before);
    expect(calls.length).toBeGreaterThanOrEqual(2);
    // Claude Code asks for 128,000 output tokens: $2.56 at claude-opus-5-5's $20 per million.
    for (const c of calls) expect((JSON.parse(c.body) as { max_tokens: number }).max_tokens).toBeLessThan(50_000);
    const key = (await listKeys(home)).find((k) => k.label === 'claude dollar');
    expect(key?.spend.usd).toBeGreaterThan(0);
    expect(key?.spend.usd).toBeLessThanOrEqual(1);
    expect(key?.spend.reservedUsd).toBe(0);
  });

  it("revoking the key mid-answer ends Claude Code with Till's message, not a hang", async () => {
    const before = messagesCalls().length;
    const run = runAgent({ home, agent: 'claude', tillArgs: ['--label', 'claude revoked'], args: ['-p', 'Keep talking until I stop you.', '--output-format', 'text'], cwd: dir });
    await waitFor('the answer to stream', () => (messagesCalls().length > before && up.inFlight() > 0 ? true : undefined));
    const key = (await listKeys(home)).find((k) => k.label === 'claude revoked' && k.state === 'active');
    expect(key).toBeDefined();
    const revokedAt = Date.now();
    expect((await runTill(['revoke', key!.id], { home })).code).toBe(0);
    const r = await run.done;
    expect(Date.now() - revokedAt).toBeLessThan(30_000);
    expect(r.code, run.output()).not.toBe(0);
    expect(run.output()).toMatch(/till: till key "claude revoked" was revoked/);
    await waitFor('the upstream stream to be cut', () => (up.inFlight() === 0 ? true : undefined), 5_000);
  });
});
