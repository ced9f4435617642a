/**
 * The `till` command end to end: the built dist/till.js in child processes, against a real
 * `till serve` (its own child process), the private keychain and a fake OpenAI upstream.
 * What the upstream received is the proof of what the broker sent.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { appendFileSync, readdirSync, readFileSync } from 'node:fs';
import { createServer, type AddressInfo, type Server } from 'node:net';
import { basename } from 'node:path';
import OpenAI from 'openai';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeySummary, TillEvent } from '../src/core/events';
import type { IssuedKey } from '../src/core/runtime/controlApi';
import { tillPaths } from '../src/core/runtime/home';
import { KeychainVault, VaultError } from '../src/core/credentials/vault';
import {
  fakeCredential,
  logFile,
  runTill,
  spawnServe,
  tempHome,
  TILL_JS,
  type RunResult,
  type ServeProcess,
  expectOneLineError,
} from './support/till';
import { fakeAnswer, startOpenAIUpstream, type Upstream } from './support/upstreams';
import { filesUnder } from './support/files';
import { waitFor } from './support/wait';

/** What `till issue --json` prints. */
type IssuedJson = IssuedKey;

function expectOk(r: RunResult): void {
  expect(r.code, `stdout: ${r.stdout}\nstderr: ${r.stderr}`).toBe(0);
}

async function issueJson(home: string, args: string[]): Promise<IssuedJson> {
  const r = await runTill(['issue', ...args, '--json'], { home });
  expectOk(r);
  const lines = r.stdout.trim().split('\n');
  expect(lines).toHaveLength(1);
  return JSON.parse(lines[0]!) as IssuedJson;
}

async function lsJson(home: string): Promise<KeySummary[]> {
  const r = await runTill(['ls', '--json'], { home });
  expectOk(r);
  return JSON.parse(r.stdout) as KeySummary[];
}

async function keyById(home: string, id: string): Promise<KeySummary> {
  const key = (await lsJson(home)).find((k) => k.id === id);
  if (!key) throw new Error(`key ${id} is not in till ls --json`);
  return key;
}

/** A chat completion with plain fetch, so a refusal is not retried and its body can be read. */
async function chat(
  baseUrl: string,
  key: string,
  model = 'gpt-4o-mini',
): Promise<{ status: number; body: { error?: { message?: string; code?: string } } & Record<string, unknown> }> {
  const res = await fetch(`${baseUrl}/chat/completions`, {
    method: 'POST',
    headers: { authorization: `Bearer ${key}`, 'content-type': 'application/json' },
    body: JSON.stringify({ model, messages: [{ role: 'user', content: 'hi' }] }),
  });
  return { status: res.status, body: (await res.json()) as { error?: { message?: string } } };
}

/** A long-running `till` child process (watch), its output kept in a scanned log. */
function spawnTill(
  args: string[],
  home: string,
): { child: ChildProcess; stdout: () => string; stderr: () => string; exited: Promise<number | null> } {
  const log = logFile('till-child');
  const child = spawn(process.execPath, [TILL_JS, ...args], {
    env: { ...process.env, TILL_HOME: home },
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.on('data', (c: Buffer) => {
    stdout += c;
    appendFileSync(log, c);
  });
  child.stderr.on('data', (c: Buffer) => {
    stderr += c;
    appendFileSync(log, c);
  });
  const exited = new Promise<number | null>((resolve) => child.once('exit', (code) => resolve(code)));
  return { child, stdout: () => stdout, stderr: () => stderr, exited };
}

async function until(what: string, check: () => boolean | Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  await waitFor(what, check, { timeoutMs });
}

function listen(server: Server): Promise<number> {
  return new Promise((resolve, reject) => {
    server.once('error', reject);
    server.listen(0, '127.0.0.1', () => resolve((server.address() as AddressInfo).port));
  });
}

describe('help and usage (no broker needed)', () => {
  const home = tempHome();

  const helps: [string[], RegExp[]][] = [
    [[], [/Usage: till <command>/, /serve/, /credential/, /issue/, /revoke/, /watch/, /exec/]],
    [['--help'], [/Usage: till <command>/]],
    [['-h'], [/Usage: till <command>/]],
    [['help'], [/Usage: till <command>/]],
    [
      ['serve', '--help'],
      [/Usage: till serve/, /--port/],
    ],
    [
      ['credential', '--help'],
      [/till credential add <provider>/, /stdin/, /credential ls/, /credential rm/],
    ],
    [['credential', 'add', '--help'], [/till credential add <provider> \[--name NAME\]/]],
    [['credential', 'ls', '--help'], [/till credential ls/]],
    [['credential', 'rm', '--help'], [/till credential rm <name>/]],
    [
      ['issue', '--help'],
      [
        /Usage: till issue <provider\|credential>/,
        /--uses/,
        /--ttl/,
        /--rpm/,
        /--concurrency/,
        /--models/,
        /--methods/,
        /--paths/,
        /--label/,
        /--json/,
      ],
    ],
    [['ls', '--help'], [/Usage: till ls \[--json\]/]],
    [['revoke', '--help'], [/Usage: till revoke <id> \| --all/]],
    [['watch', '--help'], [/Usage: till watch \[--json\]/]],
    [['watch', '-h'], [/Usage: till watch/]],
    [
      ['exec', '--help'],
      [/Usage: till exec/, /-- <command…>/, /--uses/, /--ttl/],
    ],
  ];
  it.each(helps)('till %j prints its help and exits 0', async (args, patterns) => {
    const r = await runTill(args, { home });
    expectOk(r);
    expect(r.stderr).toBe('');
    for (const p of patterns) expect(r.stdout).toMatch(p);
  });

  it('--help starts nothing: no broker, no data written', async () => {
    const fresh = tempHome();
    expectOk(await runTill(['serve', '--help'], { home: fresh }));
    expect(readdirSync(fresh)).toEqual([]);
  });

  const usageErrors: [string[], RegExp][] = [
    [['bogus'], /unknown command "bogus"/],
    [['issue', 'openai', '--bogus'], /--bogus/],
    [['ls', '--bogus'], /--bogus/],
    [['watch', '--nope'], /--nope/],
    [['serve', '--port', 'abc'], /--port needs a whole number/],
    [['serve', '--bogus'], /--bogus/],
    [['revoke'], /usage: till revoke <id> \| --all/],
    [['revoke', 'abc', '--all'], /usage: till revoke/],
    [['issue'], /usage: till issue/],
    [['issue', 'openai', '--uses', 'ten'], /--uses needs a whole number, got "ten"/],
    [['credential', 'frob'], /unknown subcommand "credential frob"/],
    [['credential', 'add'], /usage: till credential add <provider>/],
    [['credential', 'add', 'openai', '--bogus'], /--bogus/],
    [['exec', 'openai'], /usage: till exec/],
    [['exec', '--bogus', '--', 'true'], /--bogus/],
  ];
  it.each(usageErrors)('till %j is a usage error: exit 2, one line', async (args, pattern) => {
    const r = await runTill(args, { home });
    expectOneLineError(r, 2, pattern);
    expect(r.stdout).toBe('');
  });

  it('refuses a secret given as an argument (argv is visible to every process)', async () => {
    // Attack: a secret on the command line lands in `ps`, shell history and process listings.
    const r = await runTill(['credential', 'add', 'openai', 'sk-not-a-real-one-in-argv'], { home, input: '' });
    expectOneLineError(r, 2, /usage: till credential add <provider>/);
    expect(r.stderr).not.toContain('sk-not-a-real-one-in-argv');
    expect(JSON.parse((await runTill(['credential', 'ls', '--json'], { home })).stdout)).toEqual([]);
  });

  it('refuses an empty secret, a till key and an unknown provider', async () => {
    expectOneLineError(await runTill(['credential', 'add', 'openai'], { home, input: '' }), 1, /no secret given/);
    expectOneLineError(await runTill(['credential', 'add', 'openai'], { home, input: 'till_abc_def\n' }), 1, /that is a till key/);
    expectOneLineError(await runTill(['credential', 'add', 'nosuch'], { home, input: 'x\n' }), 1, /unknown provider "nosuch"/);
    expect(JSON.parse((await runTill(['credential', 'ls', '--json'], { home })).stdout)).toEqual([]);
  });
});

describe('output piped into a program that stops reading', () => {
  it('ends quietly, as `till --help | head -1` expects', async () => {
    const child = spawn(process.execPath, [TILL_JS, '--help'], {
      env: { ...process.env, TILL_HOME: tempHome() },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let stderr = '';
    child.stderr.on('data', (c: Buffer) => (stderr += c));
    // The reader goes away before the first byte: every write fails.
    child.stdout.destroy();
    const code = await new Promise<number | null>((resolve) => child.on('exit', (c) => resolve(c)));
    expect(stderr).not.toMatch(/EPIPE|Unhandled|at /);
    expect(code).toBe(0);
  });
});

describe('without a broker', () => {
  const home = tempHome();
  const cases: string[][] = [
    ['issue', 'openai'],
    ['issue', 'openai', '--json'],
    ['ls'],
    ['ls', '--json'],
    ['revoke', '--all'],
    ['revoke', 'k_abc'],
    ['watch'],
    ['watch', '--json'],
    ['exec', 'openai', '--', process.execPath, '-e', ''],
  ];
  it.each(cases.map((c) => [c] as [string[]]))('till %j says no broker is running', async (args) => {
    const r = await runTill(args, { home });
    expectOneLineError(r, 1, /no Till broker is running for .*till serve/);
    expect(r.stdout).toBe('');
  });

  it('says so too after a broker was killed and left its socket and token behind, and a new broker starts', async () => {
    const h = tempHome();
    const serve = await spawnServe(h);
    try {
      expectOk(await runTill(['ls'], { home: h }));
    } finally {
      await serve.stop('SIGKILL');
    }
    expectOneLineError(await runTill(['ls'], { home: h }), 1, /no Till broker is running/);
    const again = await spawnServe(h);
    try {
      expectOk(await runTill(['ls'], { home: h }));
    } finally {
      await again.stop();
    }
  });
});

describe('till serve', () => {
  it('prints its URL, stops on SIGINT with exit 0 and leaves no broker behind', async () => {
    const home = tempHome();
    const serve = await spawnServe(home);
    try {
      expect(serve.url).toMatch(/^http:\/\/127\.0\.0\.1:\d+$/);
      await until('the data folder line', () => serve.output().includes(`data folder: ${home}`));
      await serve.stop('SIGINT');
      expect(serve.child.exitCode).toBe(0);
    } finally {
      await serve.stop('SIGKILL');
    }
    expectOneLineError(await runTill(['ls'], { home }), 1, /no Till broker is running/);
  });

  it('a second till serve on the same TILL_HOME fails clearly and leaves the first one working', async () => {
    const home = tempHome();
    const first = await spawnServe(home);
    try {
      const second = await runTill(['serve', '--port', '0'], { home, timeoutMs: 10_000 });
      expectOneLineError(second, 1, /already running for this data folder/);
      expect(second.stderr).toContain(first.url);
      expect(second.stdout).not.toMatch(/listening/);
      const ls = await runTill(['ls'], { home });
      expectOk(ls);
      expect(first.child.exitCode).toBeNull();
    } finally {
      await first.stop();
    }
  });

  it('a taken port gives a clear error; --port is honoured once it is free', async () => {
    const blocker = createServer();
    const port = await listen(blocker);
    const home = tempHome();
    try {
      const r = await runTill(['serve', '--port', String(port)], { home, timeoutMs: 10_000 });
      expectOneLineError(r, 1, new RegExp(`port ${port} on 127\\.0\\.0\\.1 is already in use.*--port`));
    } finally {
      await new Promise((r) => blocker.close(r));
    }
    // The failed start left no lock behind.
    const serve = await spawnServe(home, { port });
    try {
      expect(serve.url).toBe(`http://127.0.0.1:${port}`);
    } finally {
      await serve.stop();
    }
  });
});

describe('the contract against a running broker', () => {
  let secret: string;
  let up: Upstream;
  let home: string;
  let serve: ServeProcess;

  beforeAll(async () => {
    secret = fakeCredential('cli-openai');
    up = await startOpenAIUpstream({ credential: secret });
    home = tempHome();
    serve = await spawnServe(home, { env: { TILL_UPSTREAM_OPENAI: `${up.url}/v1` } });
  });
  afterAll(async () => {
    await serve?.stop();
    await up?.close();
  });

  it('credential add reads the secret from stdin; ls shows the name, never the secret', async () => {
    const r = await runTill(['credential', 'add', 'openai'], { home, input: `${secret}\n` });
    expectOk(r);
    expect(r.stdout).toMatch(/stored credential "openai" \(OpenAI\) in the OS keychain/);
    expect(r.stdout + r.stderr).not.toContain(secret);

    const ls = await runTill(['credential', 'ls'], { home });
    expectOk(ls);
    expect(ls.stdout).toMatch(/^openai\s+openai\s+added \d{4}-\d\d-\d\d$/m);
    expect(ls.stdout).not.toContain(secret);
    const json = JSON.parse((await runTill(['credential', 'ls', '--json'], { home })).stdout) as { name: string; provider: string }[];
    expect(json).toEqual([expect.objectContaining({ name: 'openai', provider: 'openai' })]);

    // The secret is in the keychain, and in no file of the data folder.
    expect(await new KeychainVault({ service: tillPaths(home).keychainService }).get('openai')).toBe(secret);
    for (const f of filesUnder(home)) expect(readFileSync(f, 'utf8'), f).not.toContain(secret);
  });

  it('issue --json has the documented shape and its env works with the official openai SDK', async () => {
    const before = Date.now();
    const k = await issueJson(home, [
      'openai',
      '--uses',
      '3',
      '--ttl',
      '30m',
      '--rpm',
      '100',
      '--concurrency',
      '2',
      '--models',
      'gpt-4o-mini,gpt-4.1',
      '--methods',
      'GET,POST',
      '--paths',
      '/v1/chat/*,/v1/models',
      '--label',
      'sdk test',
    ]);
    expect(Object.keys(k)).toEqual(expect.arrayContaining(['id', 'key', 'provider', 'baseUrl', 'env', 'policy']));
    expect(k.key).toMatch(/^till_/);
    expect(k.provider).toBe('openai');
    expect(k.label).toBe('sdk test');
    expect(k.baseUrl).toBe(`${serve.url}/openai/v1`);
    expect(k.env).toMatchObject({ OPENAI_API_KEY: k.key, OPENAI_BASE_URL: k.baseUrl });
    expect(k.policy).toMatchObject({
      maxActivations: 3,
      rpm: 100,
      concurrency: 2,
      models: ['gpt-4o-mini', 'gpt-4.1'],
      methods: ['GET', 'POST'],
      paths: ['/v1/chat/*', '/v1/models'],
    });
    const expiresAt = k.policy.expiresAt as number;
    expect(expiresAt).toBeGreaterThanOrEqual(before + 30 * 60_000 - 1000);
    expect(expiresAt).toBeLessThanOrEqual(Date.now() + 30 * 60_000 + 1000);

    const client = new OpenAI({ apiKey: k.env.OPENAI_API_KEY, baseURL: k.env.OPENAI_BASE_URL, maxRetries: 0 });
    const seen = up.received.length;
    const answer = await client.chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
    expect(answer.choices[0]?.message.content).toBe(fakeAnswer(5));
    expect(up.received).toHaveLength(seen + 1);
    const got = up.received.at(-1)!;
    expect(got.path).toBe('/v1/chat/completions');
    expect(got.headers.authorization).toBe(`Bearer ${secret}`);
    expect(JSON.stringify(got.headers)).not.toContain(k.key);

    // Free route: listing models spends nothing.
    const ids: string[] = [];
    for await (const m of client.models.list()) ids.push(m.id);
    expect(ids).toContain('gpt-4o-mini');

    // Out of scope: refused by the broker, never sent upstream.
    const count = up.received.length;
    await expect(client.chat.completions.create({ model: 'gpt-5', messages: [{ role: 'user', content: 'hi' }] })).rejects.toMatchObject({
      status: 403,
    });
    await expect(client.embeddings.create({ model: 'gpt-4o-mini', input: 'x' })).rejects.toMatchObject({ status: 403 });
    expect(up.received).toHaveLength(count);

    // The plain output shows the key once, with export lines.
    const plain = await runTill(['issue', 'openai', '--label', 'plain'], { home });
    expectOk(plain);
    expect(plain.stdout).toMatch(/^export OPENAI_API_KEY=till_\S+$/m);
    expect(plain.stdout).toContain(`export OPENAI_BASE_URL=${serve.url}/openai/v1`);
    expect(plain.stdout).not.toContain(secret);
  });

  it('ls --json reports used, remaining and state as calls are spent', async () => {
    const k = await issueJson(home, ['openai', '--uses', '2', '--label', 'counted']);
    let s = await keyById(home, k.id);
    expect(s).toMatchObject({
      state: 'active',
      label: 'counted',
      provider: 'openai',
      credential: 'openai',
      used: { activations: 0 },
      remaining: { activations: 2 },
    });
    expect(JSON.stringify(s)).not.toContain(k.key);

    expect((await chat(k.baseUrl, k.key)).status).toBe(200);
    s = await keyById(home, k.id);
    expect(s).toMatchObject({ state: 'active', used: { activations: 1 }, remaining: { activations: 1 } });

    const plain = await runTill(['ls'], { home });
    expectOk(plain);
    expect(plain.stdout).toMatch(/^ID\s+STATE\s+PROVIDER\s+CALLS\s+TOKENS \/ SPEND\s+EXPIRES\s+LABEL$/m);
    expect(plain.stdout).toMatch(new RegExp(`^${k.id}\\s+active\\s+openai\\s+1/2\\s+\\S+ tok <?\\$\\S+\\s+never\\s+counted$`, 'm'));

    expect((await chat(k.baseUrl, k.key)).status).toBe(200);
    const third = await chat(k.baseUrl, k.key);
    expect(third.status).toBe(429);
    expect(third.body.error?.message).toMatch(/till key exhausted: 2 of 2 activations used/);
    s = await keyById(home, k.id);
    expect(s).toMatchObject({ state: 'exhausted', used: { activations: 2 }, remaining: { activations: 0 } });
  });

  it('revoke <id> ends one key; revoke --all ends every key', async () => {
    const a = await issueJson(home, ['openai', '--label', 'a']);
    const b = await issueJson(home, ['openai', '--label', 'b']);
    expect((await chat(a.baseUrl, a.key)).status).toBe(200);

    const r = await runTill(['revoke', a.id], { home });
    expectOk(r);
    expect(r.stdout.trim()).toBe(`revoked ${a.id}`);
    const refused = await chat(a.baseUrl, a.key);
    expect(refused.status).toBe(401);
    expect(refused.body.error?.message).toMatch(/till key "a" was revoked/);
    expect((await keyById(home, a.id)).state).toBe('revoked');
    expect((await chat(b.baseUrl, b.key)).status).toBe(200);

    const again = await runTill(['revoke', a.id], { home });
    expectOk(again);
    expect(again.stdout).toMatch(/already revoked/);
    expectOneLineError(await runTill(['revoke', 'k_nosuchkey'], { home }), 1, /no till key with id k_nosuchkey/);

    const active = (await lsJson(home)).filter((k) => k.state !== 'revoked').length;
    expect(active).toBeGreaterThanOrEqual(1);
    const all = await runTill(['revoke', '--all'], { home });
    expectOk(all);
    expect(all.stdout.trim()).toBe(`revoked ${active} key${active === 1 ? '' : 's'}`);
    expect((await chat(b.baseUrl, b.key)).status).toBe(401);
    const keys = await lsJson(home);
    expect(keys.length).toBeGreaterThanOrEqual(2);
    for (const k of keys) expect(k.state).toBe('revoked');
    expect((await runTill(['revoke', '--all'], { home })).stdout.trim()).toBe('revoked 0 keys');
  });

  it('watch --json prints one JSON event per line (issued, request.finished, revoked) until SIGINT', async () => {
    const json = spawnTill(['watch', '--json'], home);
    const plain = spawnTill(['watch'], home);
    try {
      // The watchers connect asynchronously: issue probe keys until both have seen one.
      await until('the watchers to connect', async () => {
        const probe = await issueJson(home, ['openai', '--label', 'probe']);
        await new Promise((r) => setTimeout(r, 150));
        return json.stdout().includes(probe.id) && plain.stdout().includes(probe.id);
      });
      const k = await issueJson(home, ['openai', '--label', 'watched']);
      expect((await chat(k.baseUrl, k.key)).status).toBe(200);
      expectOk(await runTill(['revoke', k.id], { home }));
      await until(
        'the revoked event',
        () => json.stdout().includes('"key.revoked"') && json.stdout().includes(k.id) && plain.stdout().includes(`key revoked: ${k.id}`),
      );

      json.child.kill('SIGINT');
      plain.child.kill('SIGINT');
      expect(await json.exited).toBe(0);
      expect(await plain.exited).toBe(0);

      const lines = json
        .stdout()
        .split('\n')
        .filter((l) => l !== '');
      const events = lines.map((l) => JSON.parse(l) as TillEvent);
      const mine = events.filter((e) => ('key' in e && e.key.id === k.id) || ('request' in e && e.request.keyId === k.id));
      expect(mine.map((e) => e.type)).toEqual(['key.issued', 'request.started', 'request.finished', 'key.revoked']);
      const finished = mine.find((e) => e.type === 'request.finished');
      expect(finished).toMatchObject({
        request: { method: 'POST', path: '/v1/chat/completions', provider: 'openai', model: 'gpt-4o-mini', label: 'watched' },
        status: 200,
      });
      expect(mine.find((e) => e.type === 'key.revoked')).toMatchObject({ key: { state: 'revoked', used: { activations: 1 } } });
      for (const e of events) expect(typeof e.at).toBe('number');
      // Events carry ids, labels and numbers; never a key or a credential.
      expect(json.stdout()).not.toContain(k.key);
      expect(json.stdout()).not.toContain(secret);

      expect(plain.stdout()).toMatch(new RegExp(`key issued: ${k.id} "watched"`));
      expect(plain.stdout()).toMatch(
        new RegExp(`200 POST /openai/v1/chat/completions gpt-4o-mini \\d+(\\.\\d+)?ms \\d+\\+\\d+ tok.* key ${k.id} "watched"`),
      );
      expect(plain.stderr() + json.stderr()).toBe('');
    } finally {
      json.child.kill('SIGKILL');
      plain.child.kill('SIGKILL');
    }
  });

  it('exec runs the command with a fresh key in its env, passes its exit code through and revokes the key after', async () => {
    const script = `
      const r = await fetch(process.env.OPENAI_BASE_URL + '/chat/completions', {
        method: 'POST',
        headers: { authorization: 'Bearer ' + process.env.OPENAI_API_KEY, 'content-type': 'application/json' },
        body: JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] }),
      });
      const body = await r.json();
      console.log(JSON.stringify({ status: r.status, key: process.env.OPENAI_API_KEY, base: process.env.OPENAI_BASE_URL, text: body.choices?.[0]?.message?.content, tracing: process.env.OPENAI_AGENTS_DISABLE_TRACING }));
      process.exit(7);`;
    const seen = up.received.length;
    const r = await runTill(
      ['exec', 'openai', '--uses', '5', '--label', 'exec test', '--', process.execPath, '--input-type=module', '-e', script],
      { home },
    );
    expect(r.code, r.stderr).toBe(7);
    const result = JSON.parse(r.stdout.trim()) as { status: number; key: string; base: string; text: string; tracing: string };
    // OpenAI Agents SDK traces (prompts included) would go to api.openai.com around the broker.
    expect(result).toMatchObject({ status: 200, base: `${serve.url}/openai/v1`, text: fakeAnswer(5), tracing: '1' });
    expect(result.key).toMatch(/^till_/);
    expect(up.received).toHaveLength(seen + 1);
    expect(up.received.at(-1)?.headers.authorization).toBe(`Bearer ${secret}`);

    const key = (await lsJson(home)).find((k) => k.label === 'exec test');
    expect(key).toMatchObject({ state: 'revoked', used: { activations: 1 }, policy: { maxActivations: 5 } });
    const after = await chat(result.base, result.key);
    expect(after.status).toBe(401);
    expect(after.body.error?.message).toMatch(/revoked/);
  });

  it('exec defaults to every stored credential, passes exit 0 and signals through, and revokes even when the command cannot start', async () => {
    const ok = await runTill(['exec', '--', process.execPath, '-e', 'console.log(process.env.OPENAI_API_KEY)'], { home });
    expectOk(ok);
    expect(ok.stdout.trim()).toMatch(/^till_/);

    const killed = await runTill(['exec', '--label', 'signalled', '--', process.execPath, '-e', "process.kill(process.pid, 'SIGTERM')"], {
      home,
    });
    expect(killed.code).toBe(128 + 15);

    const missing = await runTill(['exec', '--label', 'no such command', '--', 'till-test-no-such-command'], { home });
    expect(missing.code).toBe(127);
    expect(missing.stderr).toMatch(/cannot run till-test-no-such-command/);

    const keys = await lsJson(home);
    // Without --label, an exec key is labelled after the command.
    for (const label of [`exec ${basename(process.execPath)}`, 'signalled', 'no such command']) {
      const k = keys.filter((x) => x.label === label);
      expect(k.length, label).toBeGreaterThanOrEqual(1);
      for (const x of k) expect(x.state, label).toBe('revoked');
    }
  });

  it('credential rm removes it from the keychain; a key bound to it then gets a clear 503', async () => {
    const k = await issueJson(home, ['openai', '--label', 'orphan']);
    expect((await chat(k.baseUrl, k.key)).status).toBe(200); // the broker now holds the secret

    const rm = await runTill(['credential', 'rm', 'openai'], { home });
    expectOk(rm);
    expect(rm.stdout).toMatch(/removed credential "openai"/);
    expect(JSON.parse((await runTill(['credential', 'ls', '--json'], { home })).stdout)).toEqual([]);
    await expect(new KeychainVault({ service: tillPaths(home).keychainService }).get('openai')).rejects.toSatisfy(
      (e) => e instanceof VaultError && e.kind === 'missing',
    );

    const count = up.received.length;
    const refused = await chat(k.baseUrl, k.key);
    expect(refused.status).toBe(503);
    expect(refused.body.error?.message).toMatch(/^till: credential "openai" unavailable: .*not in the OS keychain.*till credential add/);
    expect(refused.body.error?.code).toBe('till_credential_unavailable');
    expect(up.received).toHaveLength(count);

    expectOneLineError(
      await runTill(['issue', 'openai'], { home }),
      1,
      /no credential for openai: add one with `till credential add openai`/,
    );
    expectOneLineError(await runTill(['credential', 'rm', 'openai'], { home }), 1, /no credential named "openai"/);

    // Adding it again (here under another name) brings the key's provider back to life for new keys.
    expectOk(await runTill(['credential', 'add', 'openai', '--name', 'work'], { home, input: secret }));
    const fresh = await issueJson(home, ['work']);
    expect(fresh.credential).toBe('work');
    expect((await chat(fresh.baseUrl, fresh.key)).status).toBe(200);
    expect(up.received.at(-1)?.headers.authorization).toBe(`Bearer ${secret}`);
  });
});
