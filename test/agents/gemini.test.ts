/**
 * The real Gemini CLI (`@google/gemini-cli`), headless, through `till exec --agent gemini`
 * against a 127.0.0.1 imitation of the Gemini API that accepts only the real credential: a
 * prompt with one tool round trip, usage on the key, nothing sent around the broker (its usage
 * statistics included), and revocation ending a live answer with Till's message.
 *
 * Gemini CLI ignores a system settings file under a folder others can write to (like /tmp), so
 * this test's data folder is under the account's cache folder instead of the test root.
 */
import { randomBytes } from 'node:crypto';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { filesContaining } from '../support/files';
import { CREDENTIAL_MARKER, addCredential, fakeCredential, runTill, spawnServe, type ServeProcess } from '../support/till';
import { startGeminiUpstream, type Upstream } from '../support/upstreams';
import { isLoopback, listKeys, noteReader, runAgent, waitFor, workspace } from './support/agentRun';

const marker = `NOTE-${randomBytes(6).toString('hex')}`;
let home: string;
let dir: string;
let credential: string;
let up: Upstream;
let serve: ServeProcess;

beforeAll(async () => {
  const homes = join(process.env.TILL_CACHE ?? join(userInfo().homedir, '.cache', 'till'), 'test-homes');
  mkdirSync(homes, { recursive: true, mode: 0o700 });
  home = mkdtempSync(join(homes, 'gemini-'));
  dir = workspace(marker);
  credential = fakeCredential('gemini');
  up = await startGeminiUpstream({ credential, reply: noteReader(dir, marker) });
  await addCredential(home, 'gemini', 'gemini', credential);
  serve = await spawnServe(home, { env: { TILL_UPSTREAM_GEMINI: up.url } });
});

afterAll(async () => {
  await serve?.stop();
  await up?.close();
  if (home) {
    const leaks = filesContaining(home, CREDENTIAL_MARKER);
    rmSync(home, { recursive: true, force: true });
    expect(leaks, 'the credential was written to the data folder').toEqual([]);
  }
});

const modelCalls = () => up.received.filter((r) => r.method === 'POST' && /:(generateContent|streamGenerateContent)/.test(r.path));

describe('Gemini CLI through Till', () => {
  it('completes a prompt with a tool round trip, its usage counted on the key, with nothing sent around the broker', async () => {
    const run = runAgent({ home, agent: 'gemini', tillArgs: ['--uses', '20', '--label', 'gemini round trip'], args: ['--skip-trust', '-p', 'Please read note.txt and tell me what it says.'], cwd: dir });
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${marker}.`);

    // The round trip: Gemini CLI ran read_file and sent the note back as a function response.
    const calls = modelCalls();
    expect(calls.some((c) => c.body.includes('"functionResponse"') && c.body.includes(marker))).toBe(true);
    for (const c of calls) expect(c.headers['x-goog-api-key']).toBe(credential);
    expect(up.rejected).toHaveLength(0);

    // The agent was given a till key, the broker's address and Till's system settings.
    expect(r.env.GEMINI_API_KEY).toMatch(/^till_/);
    expect(r.env.GOOGLE_GEMINI_BASE_URL).toBe(`${serve.url}/gemini`);
    expect(Object.values(r.env).join('\n')).not.toContain(CREDENTIAL_MARKER);
    const settings = r.files.find((f) => f.path.endsWith('gemini/system-settings.json'))?.text ?? '{}';
    expect(JSON.parse(settings)).toMatchObject({ security: { auth: { selectedType: 'gemini-api-key' } }, privacy: { usageStatisticsEnabled: false } });
    for (const f of r.files) expect(f.text.includes(CREDENTIAL_MARKER), f.path).toBe(false);

    // Usage: one activation per model call, exactly the tokens the upstream reported.
    const key = (await listKeys(home)).find((k) => k.label === 'gemini round trip');
    expect(key?.state).toBe('revoked');
    expect(key?.used.activations).toBe(calls.length);
    expect(key?.tokens.input).toBe(up.reported.inputTokens);
    expect(key?.tokens.output).toBe(up.reported.outputTokens);

    // Every address Gemini CLI tried was the broker's (no usage statistics to Google).
    const brokerPort = Number(new URL(serve.url).port);
    expect(r.destinations.length).toBeGreaterThan(0);
    for (const d of r.destinations) expect(isLoopback(d.address), JSON.stringify(d)).toBe(true);
    expect(r.destinations.map((d) => d.port)).toContain(brokerPort);
    expect(r.destinations.map((d) => d.port)).not.toContain(Number(new URL(up.url).port));
  });

  it("revoking the key mid-answer ends Gemini CLI with Till's message, not a hang", async () => {
    const before = modelCalls().length;
    const run = runAgent({ home, agent: 'gemini', tillArgs: ['--label', 'gemini revoked'], args: ['--skip-trust', '-p', 'Keep talking until I stop you.'], cwd: dir });
    await waitFor('the answer to stream', () => (modelCalls().slice(before).some((c) => c.path.includes('streamGenerateContent')) && up.inFlight() > 0 ? true : undefined));
    const key = (await listKeys(home)).find((k) => k.label === 'gemini revoked' && k.state === 'active');
    expect(key).toBeDefined();
    const revokedAt = Date.now();
    expect((await runTill(['revoke', key!.id], { home })).code).toBe(0);
    const r = await run.done;
    expect(Date.now() - revokedAt).toBeLessThan(45_000);
    expect(r.code, run.output()).not.toBe(0);
    // Gemini CLI prints the error body as JSON, quotes escaped.
    expect(run.output()).toMatch(/till: till key \\?"gemini revoked\\?" was revoked/);
    await waitFor('the upstream stream to be cut', () => (up.inFlight() === 0 ? true : undefined), 5_000);
  });
});
