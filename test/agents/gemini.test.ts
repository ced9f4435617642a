/**
 * The real Gemini CLI (`@google/gemini-cli`), headless, through `till exec --agent gemini`
 * against a 127.0.0.1 imitation of the Gemini API that accepts only the real credential: a
 * prompt with one tool round trip, usage on the key, nothing sent around the broker (its usage
 * statistics included), and revocation ending a live answer with Till's message.
 *
 * Gemini CLI ignores a system settings file under a folder others can write to (like /tmp), so
 * this test's data folder is under the account's home (~/.cache/till-test-homes, removed after)
 * instead of the test root.
 */
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { userInfo } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { filesContaining } from '../support/files';
import { CREDENTIAL_MARKER } from '../support/till';
import { startGeminiUpstream } from '../support/upstreams';
import {
  expectNoCredential,
  expectOnlyBroker,
  expectUsage,
  revokeWhileStreaming,
  startAgentBroker,
  type AgentBroker,
} from './support/agentChecks';
import { waitFor } from '../support/wait';
import { listKeys, runAgent } from './support/agentRun';

let b: AgentBroker;
beforeAll(async () => {
  // Not under TILL_CACHE, which may itself be below /tmp.
  const homes = join(userInfo().homedir, '.cache', 'till-test-homes');
  mkdirSync(homes, { recursive: true, mode: 0o700 });
  b = await startAgentBroker({ provider: 'gemini', start: startGeminiUpstream, home: mkdtempSync(join(homes, 'gemini-')) });
});
afterAll(async () => {
  await b?.close();
  if (!b) return;
  const leaks = filesContaining(b.home, CREDENTIAL_MARKER);
  rmSync(b.home, { recursive: true, force: true });
  expect(leaks, 'the credential was written to the data folder').toEqual([]);
});

const modelCalls = () => b.up.received.filter((r) => r.method === 'POST' && /:(generateContent|streamGenerateContent)/.test(r.path));
// --skip-trust: headless Gemini CLI refuses an untrusted folder otherwise (its own rule, not Till's).
const gemini = (label: string, prompt: string, limits: string[] = []) =>
  runAgent({ home: b.home, agent: 'gemini', tillArgs: [...limits, '--label', label], args: ['--skip-trust', '-p', prompt], cwd: b.dir });

describe('Gemini CLI through Till', () => {
  it('completes a prompt with a tool round trip, its usage counted on the key, with nothing sent around the broker', async () => {
    const run = gemini('gemini round trip', 'Please read note.txt and tell me what it says.', ['--uses', '20']);
    const r = await run.done;
    expect(r.code, run.output()).toBe(0);
    expect(r.stdout).toContain(`The note says ${b.marker}.`);

    // The round trip: Gemini CLI ran read_file and sent the note back as a function response.
    const calls = modelCalls();
    expect(calls.some((c) => c.body.includes('"functionResponse"') && c.body.includes(b.marker))).toBe(true);
    for (const c of calls) expect(c.headers['x-goog-api-key']).toBe(b.credential);
    expect(b.up.rejected).toHaveLength(0);

    // The agent was given a till key, the broker's address and Till's system settings.
    expect(r.env.GEMINI_API_KEY).toMatch(/^till_/);
    expect(r.env.GOOGLE_GEMINI_BASE_URL).toBe(`${b.serve.url}/gemini`);
    const settings = r.files.find((f) => f.path.endsWith('gemini/system-settings.json'))?.text ?? '{}';
    expect(JSON.parse(settings)).toMatchObject({
      security: { auth: { selectedType: 'gemini-api-key' } },
      privacy: { usageStatisticsEnabled: false },
    });
    expectNoCredential(r);

    expectUsage(
      (await listKeys(b.home)).find((k) => k.label === 'gemini round trip'),
      calls.length,
      b.up,
    );
    expectOnlyBroker(r, b); // no usage statistics to Google
  });

  it("revoking the key mid-answer ends Gemini CLI with Till's message, not a hang", async () => {
    const before = modelCalls().length;
    const run = gemini('gemini revoked', 'Keep talking until I stop you.');
    const streaming = () =>
      modelCalls()
        .slice(before)
        .some((c) => c.path.includes('streamGenerateContent')) && b.up.inFlight() > 0;
    const { r, afterMs } = await revokeWhileStreaming(b, run, 'gemini revoked', streaming);
    expect(afterMs).toBeLessThan(30_000);
    expect(r.code, run.output()).not.toBe(0);
    // Gemini CLI prints the error body as JSON, quotes escaped.
    expect(run.output()).toMatch(/till: till key \\?"gemini revoked\\?" was revoked/);
    await waitFor('the upstream stream to be cut', () => b.up.inFlight() === 0, { timeoutMs: 5_000 });
  });
});
