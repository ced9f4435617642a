/**
 * The vault against a real Secret Service (gnome-keyring on a private D-Bus): the round trip,
 * "not stored" versus "locked" versus "no keychain at all", bounded time in every case, and no
 * plaintext fallback. A vault on another bus (a second, lockable keyring, or none) runs in a
 * child process with that bus in its environment: @napi-rs/keyring reads the address when an
 * entry is created, and a test worker's process.env does not reach it.
 */
import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { buildSync } from 'esbuild';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { keychainService, tillPaths } from '../src/core/runtime/home';
import { KeychainVault, VaultError, type VaultErrorKind } from '../src/core/credentials/vault';
import { startPrivateKeyring, type PrivateKeyring } from './support/keyring';
import { collectOutput } from './support/process';
import { fakeCredential, runTill, spawnServe, tempHome, type ServeProcess, expectOneLineError } from './support/till';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';
import { filesUnder } from './support/files';

const ABSENT_BUS = 'unix:path=/nonexistent';

/** Every file of a data folder, to prove a secret never landed on disk there. */
function expectNotOnDisk(home: string, secret: string): void {
  for (const f of filesUnder(home)) expect(readFileSync(f, 'utf8'), f).not.toContain(secret);
}

async function rejection(p: Promise<unknown>): Promise<VaultError> {
  try {
    await p;
  } catch (err) {
    expect(err).toBeInstanceOf(VaultError);
    return err as VaultError;
  }
  throw new Error('expected the vault call to fail');
}

async function expectVaultError(p: Promise<unknown>, kind: VaultErrorKind, message: RegExp): Promise<void> {
  const err = await rejection(p);
  expect(err.kind, err.message).toBe(kind);
  expect(err.message).toMatch(message);
}

const ROOT = resolve(__dirname, '..');

/** src/core/credentials/vault.ts as CommonJS, for child processes (the keyring binding stays external). */
const VAULT_JS = buildSync({
  entryPoints: [join(ROOT, 'src/core/credentials/vault.ts')],
  bundle: true,
  platform: 'node',
  format: 'cjs',
  target: 'node20',
  external: ['@napi-rs/keyring', '@napi-rs/keyring-*'],
  write: false,
}).outputFiles[0]!.text;

type VaultOp = { op: 'get'; name: string } | { op: 'set'; name: string; secret: string } | { op: 'delete'; name: string };
type VaultOutcome =
  { ok: true; value: unknown; ms: number } | { ok: false; error: string; kind?: VaultErrorKind; message: string; ms: number };

/**
 * Runs vault calls in a child process with `env` (e.g. another bus). The child is not told to
 * exit: it has to end by itself once the calls are done, so a keychain call left hanging shows
 * as a timeout here. Secrets travel in the child's environment and stdout, never on disk.
 */
async function vaultInChild(
  service: string,
  env: Record<string, string>,
  ops: VaultOp[],
  timeoutMs = 20_000,
): Promise<{ outcomes: VaultOutcome[]; ms: number }> {
  const script = `
    const module_ = { exports: {} };
    (function (module, exports) { ${VAULT_JS} })(module_, module_.exports);
    const { KeychainVault } = module_.exports;
    (async () => {
      const vault = new KeychainVault({ service: process.env.VAULT_SERVICE });
      const outcomes = [];
      for (const op of JSON.parse(process.env.VAULT_OPS)) {
        const started = Date.now();
        try {
          const value = op.op === 'set' ? await vault.set(op.name, op.secret) : await vault[op.op](op.name);
          outcomes.push({ ok: true, value: value === undefined ? null : value, ms: Date.now() - started });
        } catch (err) {
          outcomes.push({ ok: false, error: err.name, kind: err.kind, message: err.message, ms: Date.now() - started });
        }
      }
      process.stdout.write(JSON.stringify(outcomes));
    })();`;
  const started = Date.now();
  const child = spawn(process.execPath, ['-'], {
    cwd: ROOT,
    env: { ...process.env, ...env, VAULT_SERVICE: service, VAULT_OPS: JSON.stringify(ops) },
    stdio: ['pipe', 'pipe', 'pipe'],
  });
  const run = collectOutput(child, 'the vault child (a keychain call hung?)', timeoutMs);
  child.stdin.end(script);
  const { code, stdout, stderr } = await run.done;
  if (code !== 0) throw new Error(`the vault child exited with ${code}: ${stderr}`);
  return { outcomes: JSON.parse(stdout) as VaultOutcome[], ms: Date.now() - started };
}

function expectFailure(outcome: VaultOutcome | undefined, kind: VaultErrorKind, message: RegExp): void {
  expect(outcome).toBeDefined();
  if (!outcome || outcome.ok) throw new Error(`expected a ${kind} VaultError, got success`);
  expect(outcome.error).toBe('VaultError');
  expect(outcome.kind, outcome.message).toBe(kind);
  expect(outcome.message).toMatch(message);
}

const uniqueService = (what: string) => `till vault-test ${what} ${randomBytes(4).toString('hex')}`;

async function chat(baseUrl: string, key: string): Promise<{ status: number; message: string; code: string | undefined }> {
  const res = await fetch(`${baseUrl}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }),
  });
  const body = (await res.json()) as { error?: { message?: string; code?: string } };
  return { status: res.status, message: body.error?.message ?? '', code: body.error?.code };
}

describe('KeychainVault on the real Secret Service', () => {
  it('sets, gets, replaces and deletes a credential', async () => {
    const service = uniqueService('roundtrip');
    const vault = new KeychainVault({ service });
    const first = fakeCredential('vault-a');
    const second = fakeCredential('vault-b');
    await vault.set('openai', first);
    expect(await vault.get('openai')).toBe(first);
    // A fresh vault (another process, in effect) reads what the first stored.
    const other = new KeychainVault({ service });
    expect(await other.get('openai')).toBe(first);
    await vault.set('openai', second);
    expect(await vault.get('openai')).toBe(second);
    expect(await other.get('openai')).toBe(second);
    expect(await vault.delete('openai')).toBe(true);
    expect(await vault.delete('openai')).toBe(false);
    await expectVaultError(
      other.get('openai'),
      'missing',
      /credential "openai" is not in the OS keychain: add it again with `till credential add`/,
    );
  });

  it('"not stored" is VaultError kind missing, distinct from locked or unavailable', async () => {
    const vault = new KeychainVault({ service: uniqueService('missing') });
    await expectVaultError(vault.get('never-stored'), 'missing', /credential "never-stored" is not in the OS keychain/);
  });

  it('keeps accounts apart and serializes concurrent calls', async () => {
    const vault = new KeychainVault({ service: uniqueService('many') });
    const secrets = Array.from({ length: 8 }, (_, i) => [`cred-${i}`, fakeCredential(`many-${i}`)] as const);
    await Promise.all(secrets.map(([name, secret]) => vault.set(name, secret)));
    const got = await Promise.all(secrets.map(([name]) => vault.get(name)));
    expect(got).toEqual(secrets.map(([, s]) => s));
    expect(await Promise.all(secrets.map(([name]) => vault.delete(name)))).toEqual(secrets.map(() => true));
  });

  it('keeps entries per data folder: two homes with the same credential name do not clash', async () => {
    const homeA = tempHome();
    const homeB = tempHome();
    expect(keychainService(homeA)).not.toBe(keychainService(homeB));
    const secretA = fakeCredential('home-a');
    const secretB = fakeCredential('home-b');
    expect((await runTill(['credential', 'add', 'openai'], { home: homeA, input: secretA })).code).toBe(0);
    expect((await runTill(['credential', 'add', 'openai'], { home: homeB, input: secretB })).code).toBe(0);
    expect(await new KeychainVault({ service: tillPaths(homeA).keychainService }).get('openai')).toBe(secretA);
    expect(await new KeychainVault({ service: tillPaths(homeB).keychainService }).get('openai')).toBe(secretB);

    // Removing it from one folder leaves the other folder's secret alone.
    expect((await runTill(['credential', 'rm', 'openai'], { home: homeA })).code).toBe(0);
    await expectVaultError(
      new KeychainVault({ service: tillPaths(homeA).keychainService }).get('openai'),
      'missing',
      /not in the OS keychain/,
    );
    expect(await new KeychainVault({ service: tillPaths(homeB).keychainService }).get('openai')).toBe(secretB);
    expectNotOnDisk(homeA, secretA);
    expectNotOnDisk(homeB, secretB);
  });
});

describe('a locked keychain', () => {
  let keyring: PrivateKeyring;
  let up: Upstream;
  let serve: ServeProcess | undefined;
  const secret = fakeCredential('locked');
  const home = tempHome();

  beforeAll(async () => {
    keyring = await startPrivateKeyring();
    up = await startOpenAIUpstream({ credential: secret });
  });
  afterAll(async () => {
    await serve?.stop();
    await up?.close();
    keyring?.stop();
  });

  it('is reported as locked, in bounded time, by the vault, the CLI and the broker', async () => {
    // Stored while unlocked, through the CLI, in this keyring.
    const add = await runTill(['credential', 'add', 'openai'], { home, input: secret, env: keyring.env });
    expect(add.code, add.stderr).toBe(0);

    const service = tillPaths(home).keychainService;
    const before = await vaultInChild(service, keyring.env, [{ op: 'get', name: 'openai' }]);
    expect(before.outcomes).toEqual([{ ok: true, value: secret, ms: expect.any(Number) }]);

    serve = await spawnServe(home, { env: { ...keyring.env, TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
    const issued = await runTill(['issue', 'openai', '--json'], { home, env: keyring.env });
    expect(issued.code, issued.stderr).toBe(0);
    const key = JSON.parse(issued.stdout) as { key: string; baseUrl: string };

    await keyring.lock();

    // The vault: "locked", not "missing" (a locked collection must not look like an empty one),
    // for every call, and the process ends by itself in bounded time.
    const locked = await vaultInChild(service, keyring.env, [
      { op: 'get', name: 'openai' },
      { op: 'set', name: 'spare', secret: fakeCredential('spare') },
      { op: 'delete', name: 'openai' },
      // Never stored: a locked keychain may answer "nothing" for it, which must still read as locked.
      { op: 'get', name: 'never-stored' },
    ]);
    expect(locked.ms).toBeLessThan(10_000);
    expectFailure(locked.outcomes[3], 'locked', /the OS keychain is locked/);
    expectFailure(locked.outcomes[0], 'locked', /^the OS keychain is locked: unlock it .* and retry$/);
    expectFailure(locked.outcomes[1], 'locked', /the OS keychain is locked/);
    expectFailure(locked.outcomes[2], 'locked', /the OS keychain is locked/);
    for (const o of locked.outcomes) expect(JSON.stringify(o)).not.toContain(secret);

    // The broker: the first request after the lock needs the secret and cannot read it.
    let started = Date.now();
    const refused = await chat(key.baseUrl, key.key);
    expect(Date.now() - started).toBeLessThan(10_000);
    expect(refused.status).toBe(503);
    expect(refused.code).toBe('till_credential_unavailable');
    expect(refused.message).toMatch(/^till: credential "openai" unavailable: the OS keychain is locked/);
    expect(up.received).toHaveLength(0);

    // The CLI: issuing checks the credential now, not at the first request.
    started = Date.now();
    const issue = await runTill(['issue', 'openai'], { home, env: keyring.env, timeoutMs: 15_000 });
    expect(Date.now() - started).toBeLessThan(10_000);
    expectOneLineError(issue, undefined, /the OS keychain is locked/);

    // Adding a credential to a locked keychain fails and writes nothing.
    const other = fakeCredential('locked-add');
    started = Date.now();
    const add2 = await runTill(['credential', 'add', 'openai', '--name', 'second'], {
      home,
      input: other,
      env: keyring.env,
      timeoutMs: 15_000,
    });
    expect(Date.now() - started).toBeLessThan(10_000);
    expectOneLineError(add2, undefined, /the OS keychain is locked/);
    const listed = JSON.parse((await runTill(['credential', 'ls', '--json'], { home })).stdout) as { name: string }[];
    expect(listed.map((c) => c.name)).toEqual(['openai']);
    expectNotOnDisk(home, secret);
    expectNotOnDisk(home, other);
  });
});

describe('no keychain at all', () => {
  const env = { DBUS_SESSION_BUS_ADDRESS: ABSENT_BUS };

  it('the vault fails at once as unavailable, never falling back to another store', async () => {
    const secret = fakeCredential('absent-vault');
    const { outcomes, ms } = await vaultInChild(uniqueService('absent'), env, [
      { op: 'set', name: 'openai', secret },
      { op: 'get', name: 'openai' },
      { op: 'delete', name: 'openai' },
    ]);
    expect(ms).toBeLessThan(5_000);
    // Had the binding fallen back to the kernel keyring, the set would have succeeded.
    for (const o of outcomes)
      expectFailure(o, 'unavailable', /^no OS keychain is reachable \(Secret Service over D-Bus\).*Till never falls back to a plain file/);
    for (const o of outcomes) expect(JSON.stringify(o)).not.toContain(secret);
  });

  it('till credential add fails within seconds with a clear message and writes no plaintext', async () => {
    const home = tempHome();
    const secret = fakeCredential('absent-cli');
    const started = Date.now();
    const r = await runTill(['credential', 'add', 'openai'], { home, input: secret, env, timeoutMs: 15_000 });
    expect(Date.now() - started).toBeLessThan(8_000);
    expectOneLineError(r, undefined, /no OS keychain is reachable \(Secret Service over D-Bus\).*Till never falls back to a plain file/);
    expect(r.stdout + r.stderr).not.toContain(secret);
    expectNotOnDisk(home, secret);
    expect(existsSync(tillPaths(home).credentials)).toBe(false);
    // And it is not in the real (reachable) keychain either.
    await expectVaultError(
      new KeychainVault({ service: tillPaths(home).keychainService }).get('openai'),
      'missing',
      /not in the OS keychain/,
    );
  });

  it('a broker without a keychain refuses to issue keys, clearly', async () => {
    const home = tempHome();
    const secret = fakeCredential('absent-broker');
    // Stored while a keychain was reachable; the broker then runs where none is.
    expect((await runTill(['credential', 'add', 'openai'], { home, input: secret })).code).toBe(0);
    const serve = await spawnServe(home, { env });
    try {
      const started = Date.now();
      const r = await runTill(['issue', 'openai'], { home, timeoutMs: 15_000 });
      expect(Date.now() - started).toBeLessThan(8_000);
      expectOneLineError(r, undefined, /no OS keychain is reachable/);
      expect(r.stdout).toBe('');
    } finally {
      await serve.stop();
    }
    expectNotOnDisk(home, secret);
  });
});
