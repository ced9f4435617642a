/**
 * `till exec` neither leaks nor lingers, tried against the built command and `till serve`: its
 * keys live only as long as it does (kill -9 included), and the command it runs sees no real key
 * inherited from the shell. Each test starts with a comment naming the attack.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeySummary } from '../src/core/events';
import { serveTill, startInProcess, type Broker } from './support/served';
import { addCredential, fakeCredential, runTill, tempHome, testRoot, TILL_JS } from './support/till';
import { startAnthropicUpstream, startOpenAIUpstream, type Upstream } from './support/upstreams';
import { waitFor } from './support/wait';

let openai: Upstream;
let anthropic: Upstream;
let creds: { openai: string; anthropic: string };

beforeAll(async () => {
  creds = { openai: fakeCredential('openai'), anthropic: fakeCredential('anthropic') };
  openai = await startOpenAIUpstream({ credential: creds.openai });
  anthropic = await startAnthropicUpstream({ credential: creds.anthropic });
});
afterAll(async () => {
  await openai.close();
  await anthropic.close();
});

const env = () => ({ TILL_UPSTREAM_OPENAI: `${openai.url}/v1`, TILL_UPSTREAM_ANTHROPIC: anthropic.url });

async function newBroker(): Promise<Broker> {
  const home = tempHome();
  await addCredential(home, 'openai', 'openai', creds.openai);
  return serveTill(home, { env: env() });
}

/**
 * `till exec openai -- <sh script>` in the background, in its own process group so the test can
 * clean up the orphan it leaves. The script tells the test its key and base URL, then sleeps.
 */
async function execInBackground(home: string): Promise<{ exec: ChildProcess; key: string; baseUrl: string }> {
  const keyFile = join(testRoot(), `exec-key-${Date.now()}-${Math.random().toString(36).slice(2)}`);
  const script = `echo "$OPENAI_API_KEY $OPENAI_BASE_URL" > '${keyFile}'; exec sleep 60`;
  const exec = spawn(process.execPath, [TILL_JS, 'exec', 'openai', '--label', 'leased', '--', 'sh', '-c', script], {
    env: { ...process.env, TILL_HOME: home },
    stdio: 'ignore',
    detached: true,
  });
  await waitFor('the command to start', () => existsSync(keyFile) && readFileSync(keyFile, 'utf8').includes('till_'));
  const [key, baseUrl] = readFileSync(keyFile, 'utf8').trim().split(' ') as [string, string];
  return { exec, key, baseUrl };
}

async function keyOf(broker: Broker, label: string): Promise<KeySummary> {
  let found: KeySummary | undefined;
  await waitFor(`the key labelled ${label}`, async () => {
    const r = await runTill(['ls', '--json'], { home: broker.home });
    found = (JSON.parse(r.stdout) as KeySummary[]).find((k) => k.label === label);
    return found !== undefined;
  });
  return found!;
}

async function chat(baseUrl: string, key: string): Promise<number> {
  const res = await fetch(`${baseUrl}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }),
  });
  return res.status;
}

function killGroup(child: ChildProcess): void {
  try {
    process.kill(-child.pid!, 'SIGKILL');
  } catch {
    // already gone
  }
}

describe('till exec keys live as long as till exec', () => {
  it('revokes the key within a second of kill -9, while the orphaned command still runs', async () => {
    // Attack: kill -9 of `till exec` (an OOM kill, a closed terminal) left its key active forever,
    // and the orphaned child kept using it.
    const broker = await newBroker();
    const { exec, key, baseUrl } = await execInBackground(broker.home);
    try {
      expect(await chat(baseUrl, key)).toBe(200);
      const leased = await keyOf(broker, 'leased');
      expect(leased.state).toBe('active');
      expect(leased.leased).toBe(true);

      exec.kill('SIGKILL');
      const killedAt = Date.now();
      await waitFor('the key to be revoked', async () => (await broker.key(leased.id)).state === 'revoked', {
        timeoutMs: 3000,
        everyMs: 20,
      });
      expect(Date.now() - killedAt).toBeLessThan(1000);
      expect(await chat(baseUrl, key)).toBe(401);
    } finally {
      killGroup(exec);
      await broker.close();
    }
  });

  it('keeps the key while till exec lives, across a broker restart', async () => {
    // Attack: none; the lease must not cost a running agent its key when the broker restarts
    // (`till serve` restarted, a VS Code window handing the broker over).
    const broker = await newBroker();
    const { exec, key, baseUrl } = await execInBackground(broker.home);
    try {
      const leased = await keyOf(broker, 'leased');
      await broker.close();
      const port = Number(new URL(baseUrl).port);
      const again = await serveTill(broker.home, { env: env(), port });
      try {
        // Past the grace period the key is still active: till exec came back for its lease.
        await new Promise((r) => setTimeout(r, 11_000));
        expect((await again.key(leased.id)).state).toBe('active');
        expect(await chat(baseUrl, key)).toBe(200);
        exec.kill('SIGKILL');
        await waitFor('the key to be revoked', async () => (await again.key(leased.id)).state === 'revoked', { timeoutMs: 3000 });
      } finally {
        await again.close();
      }
    } finally {
      killGroup(exec);
    }
  }, 40_000);

  it('revokes, after a grace period, a leased key whose holder died while no broker ran', async () => {
    // Attack: till exec killed while the broker was down: nobody is left to hold (or revoke) the key.
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', creds.openai);
    const first = await startInProcess({ home, env: env() });
    const k = await first.issue({ target: 'openai', lease: true });
    await first.close();
    const second = await startInProcess({ home, env: env(), leaseGraceMs: 300 });
    try {
      expect((await second.key(k.id)).state).toBe('active');
      await waitFor('the unclaimed key to be revoked', async () => (await second.key(k.id)).state === 'revoked', { timeoutMs: 3000 });
    } finally {
      await second.close();
    }
  });
});

describe('what the command inherits', () => {
  it("removes every provider's key and endpoint variables the shell had, and sets only Till's", async () => {
    // Attack: real keys already in the parent's environment (OPENAI_API_KEY=sk-… in a shell
    // profile) reached the command `till exec` ran, next to (or instead of) Till's.
    const broker = await newBroker();
    try {
      const inherited = {
        OPENAI_API_KEY: fakeCredential('shell-openai'),
        OPENAI_BASE_URL: 'https://api.openai.com/v1',
        ANTHROPIC_API_KEY: fakeCredential('shell-anthropic'),
        ANTHROPIC_AUTH_TOKEN: fakeCredential('shell-anthropic-token'),
        GEMINI_API_KEY: fakeCredential('shell-gemini'),
        GOOGLE_GENERATIVE_AI_API_KEY: fakeCredential('shell-google'),
        GITHUB_TOKEN: fakeCredential('shell-github'),
        MISTRAL_API_KEY: fakeCredential('shell-mistral'),
        UNRELATED: 'kept',
      };
      const r = await runTill(['exec', 'openai', '--', process.execPath, '-e', 'console.log(JSON.stringify(process.env))'], {
        home: broker.home,
        env: inherited,
      });
      expect(r.code, r.stderr).toBe(0);
      const seen = JSON.parse(r.stdout) as Record<string, string>;
      expect(seen.OPENAI_API_KEY).toMatch(/^till_/);
      expect(seen.OPENAI_BASE_URL).toBe(`${broker.url}/openai/v1`);
      for (const name of [
        'ANTHROPIC_API_KEY',
        'ANTHROPIC_AUTH_TOKEN',
        'GEMINI_API_KEY',
        'GOOGLE_GENERATIVE_AI_API_KEY',
        'GITHUB_TOKEN',
        'MISTRAL_API_KEY',
      ])
        expect(seen[name], name).toBeUndefined();
      expect(seen.UNRELATED).toBe('kept');
      expect(r.stdout).not.toContain('REALCRED');
    } finally {
      await broker.close();
    }
  });
});
