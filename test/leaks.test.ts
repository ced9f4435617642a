/**
 * No secret on disk or in output: neither a credential nor a till key appears in the ledger,
 * the audit log, the broker's log or anything the `till` command prints (but the key, once, at
 * issue). The global teardown repeats the credential scan over every file the whole suite wrote.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { addCredential, CREDENTIAL_MARKER, fakeCredential, runTill, spawnServe, tempHome, testRoot } from './support/till';
import { startOpenAIUpstream } from './support/upstreams';
import { filesContaining, filesUnder } from './support/files';

describe('secrets never leak', () => {
  it('through a session of successes, denials and failures', async () => {
    const secret = fakeCredential('leaks');
    const up = await startOpenAIUpstream({ credential: secret, streamDelayMs: 1 });
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', secret);
    const serve = await spawnServe(home, { env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
    const outputs: string[] = [];
    try {
      const issue = await runTill(['issue', 'openai', '--uses', '2', '--json'], { home });
      const issued = JSON.parse(issue.stdout) as { id: string; key: string; baseUrl: string };
      const call = (key: string, body = '{"model":"gpt-4o-mini","messages":[]}') =>
        fetch(`${issued.baseUrl}/chat/completions`, {
          method: 'POST',
          body,
          headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
        }).then(async (r) => outputs.push(await r.text()));
      await call(issued.key);
      await call(issued.key, '{"model":"gpt-4o-mini","stream":true,"messages":[]}');
      await call(issued.key); // exhausted
      await call(issued.key.slice(0, -1) + (issued.key.endsWith('a') ? 'b' : 'a')); // typo
      await call(secret); // a real key sent to the broker by mistake
      outputs.push((await runTill(['ls', '--json'], { home })).stdout);
      outputs.push((await runTill(['ls'], { home })).stdout);
      await runTill(['revoke', issued.id], { home });
      await call(issued.key); // revoked
      await up.close();
      const again = JSON.parse((await runTill(['issue', 'openai', '--json'], { home })).stdout) as { key: string };
      await call(again.key); // dead upstream
      outputs.push((await runTill(['credential', 'ls'], { home })).stdout);

      for (const text of outputs) {
        expect(text).not.toContain(secret);
        expect(text).not.toContain(issued.key);
      }
    } finally {
      await serve.stop();
    }
    expect(serve.output()).not.toContain(secret);
    for (const file of filesUnder(home)) {
      const text = readFileSync(file, 'utf8');
      expect(text, file).not.toContain(secret);
      expect(text, file).not.toMatch(/till_[0-9A-Za-z]{10}_[0-9A-Za-z]{30}/);
    }
    const audit = readFileSync(join(home, 'audit.jsonl'), 'utf8').trim().split('\n');
    expect(audit.length).toBeGreaterThanOrEqual(7);
  });

  it('the suite so far wrote no credential anywhere under its scratch root', () => {
    // Other test files run meanwhile: files that vanish while being read are skipped.
    const leaks = filesContaining(testRoot(), CREDENTIAL_MARKER);
    expect(leaks).toEqual([]);
  });
});
