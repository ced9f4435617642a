/**
 * A team broker as a server runs it: `till serve --listen 0.0.0.0 --tls-cert … --tls-key …
 * --allow-host till.test` on a team ledger, its real keys and admin token handed over by the
 * service manager (a file, an environment variable, a systemd credential), no keychain at all;
 * and admins and CI runners elsewhere using it with `till --broker https://… issue|ls|exec|…`.
 * (Every request in these tests goes to 127.0.0.1.)
 */
import { spawn } from 'node:child_process';
import * as http from 'node:http';
import * as https from 'node:https';
import * as net from 'node:net';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { KeySummary } from '../src/core/events';
import type { IssuedKey } from '../src/core/runtime/controlApi';
import { startPostgres, type TestPostgres } from './support/postgres';
import { expectOneLineError, fakeCredential, runTill, spawnServe, tempHome, TILL_JS, writeConfig, type ServeProcess } from './support/till';
import { openResponsesSocket } from './support/responsesSocket';
import { makeCertificate, type TestCertificate } from './support/tls';
import { startAnthropicUpstream, startOpenAIUpstream, type Upstream } from './support/upstreams';
import { waitFor } from './support/wait';

const ADMIN_TOKEN = 'a'.repeat(8) + Buffer.from('till team broker admin token for tests').toString('hex');
/** No Secret Service on this server: a keychain call would fail. */
const NO_KEYCHAIN = { DBUS_SESSION_BUS_ADDRESS: 'unix:path=/nonexistent/till-test-bus' };

let db: TestPostgres;
let tls: TestCertificate;
let openaiKey: string;
let anthropicKey: string;
let openai: Upstream;
let anthropic: Upstream;
let server: ServeProcess;
let serverHome: string;
let port: number;
/** A teammate's laptop: its own data folder, no broker of its own. */
let laptop: string;
/** The service manager's secrets (a systemd credentials folder, a secret file). */
let secrets: string | undefined;

beforeAll(async () => {
  db = await startPostgres();
  tls = makeCertificate(['till.test']);
  openaiKey = fakeCredential('openai');
  anthropicKey = fakeCredential('anthropic');
  openai = await startOpenAIUpstream({ credential: openaiKey, websocket: true });
  anthropic = await startAnthropicUpstream({ credential: anthropicKey });
  serverHome = tempHome();
  // What systemd's LoadCredential= and a Docker secret leave for the service: outside the test
  // root, whose files are scanned for real credentials at the end (these are where one belongs).
  secrets = mkdtempSync(join(tmpdir(), 'till-service-secrets-'));
  const credentials = join(secrets, 'credentials');
  mkdirSync(credentials, { mode: 0o700 });
  writeFileSync(join(credentials, 'till-admin-token'), ADMIN_TOKEN + '\n', { mode: 0o600 });
  const secretFile = join(secrets, 'openai.key');
  writeFileSync(secretFile, openaiKey + '\n', { mode: 0o600 });
  writeConfig(serverHome, {
    ledger: db.url,
    adminToken: { systemd: 'till-admin-token' },
    credentials: {
      openai: { provider: 'openai', file: secretFile },
      anthropic: { provider: 'anthropic', env: 'TEAM_ANTHROPIC_KEY' },
    },
  });
  server = await spawnServe(serverHome, {
    args: ['--listen', '0.0.0.0', '--tls-cert', tls.certFile, '--tls-key', tls.keyFile, '--allow-host', 'till.test'],
    env: {
      ...NO_KEYCHAIN,
      CREDENTIALS_DIRECTORY: credentials,
      TEAM_ANTHROPIC_KEY: anthropicKey,
      TILL_UPSTREAM_OPENAI: `${openai.url}/v1`,
      TILL_UPSTREAM_ANTHROPIC: anthropic.url,
    },
  });
  port = Number(new URL(server.url).port);
  laptop = tempHome();
}, 60_000);

afterAll(async () => {
  await server?.stop();
  await openai?.close();
  await anthropic?.close();
  db?.destroy();
  if (secrets) rmSync(secrets, { recursive: true, force: true });
}, 30_000);

/** `till --broker https://127.0.0.1:<port> --ca <cert> …` from the laptop, with the admin token. */
function admin(args: string[], env: NodeJS.ProcessEnv = {}) {
  return runTill(['--broker', `https://127.0.0.1:${port}`, '--ca', tls.certFile, ...args], {
    home: laptop,
    env: { TILL_ADMIN_TOKEN: ADMIN_TOKEN, ...NO_KEYCHAIN, ...env },
  });
}

/** A request to the broker over TLS to 127.0.0.1, with the Host given. */
function call(options: {
  path: string;
  method?: string;
  host?: string;
  headers?: Record<string, string>;
  body?: string;
}): Promise<{ status: number; body: string }> {
  const host = options.host ?? `127.0.0.1:${port}`;
  return new Promise((resolve, reject) => {
    const req = https.request(
      {
        host: '127.0.0.1',
        port,
        // The certificate's name, whatever Host is sent: these tests are about the broker's checks.
        servername: 'till.test',
        ca: tls.cert,
        // A fresh connection each: one the broker closed (after a 413) is never reused.
        agent: false,
        method: options.method ?? 'GET',
        path: options.path,
        headers: { host, ...options.headers },
      },
      (res) => {
        let text = '';
        res.on('data', (c: Buffer) => (text += c));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('error', reject);
    req.end(options.body);
  });
}

function chatBody(): string {
  return JSON.stringify({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] });
}

describe('till serve as a team broker', () => {
  it('refuses to start on a non-loopback address without TLS, or on every address without host names', async () => {
    const home = tempHome();
    const plain = await runTill(['serve', '--port', '0', '--listen', '0.0.0.0'], { home });
    expectOneLineError(plain, 1, /only with TLS: give --tls-cert and --tls-key/);
    const unnamed = await runTill(['serve', '--port', '0', '--listen', '0.0.0.0', '--tls-cert', tls.certFile, '--tls-key', tls.keyFile], {
      home,
    });
    expectOneLineError(unnamed, 1, /needs --allow-host NAME/);
    const halfTls = await runTill(['serve', '--port', '0', '--listen', '0.0.0.0', '--tls-cert', tls.certFile], { home });
    expectOneLineError(halfTls, 1, /both --tls-cert and --tls-key/);
    const weak = await runTill(['serve', '--port', '0'], { home, env: { TILL_ADMIN_TOKEN: 'hunter2' } });
    expectOneLineError(weak, 1, /admin token must be at least 32 characters/);
    const remote = await runTill(['--broker', `https://127.0.0.1:${port}`, 'serve'], { home });
    expectOneLineError(remote, 2, /till serve runs on the broker's machine/);
  });

  it('serves HTTPS on its names only: plaintext, other Host names and browser origins are refused', async () => {
    expect(server.url).toBe(`https://till.test:${port}`);
    expect(server.output()).toContain(`remote admin: till --broker https://till.test:${port}`);
    // Plain HTTP to the TLS port gets no HTTP answer at all.
    const plaintext = await new Promise<string>((resolve) => {
      const req = http.request(
        { host: '127.0.0.1', port, path: '/_till/status', headers: { authorization: `Bearer ${ADMIN_TOKEN}` } },
        (res) => resolve(`answered ${res.statusCode}`),
      );
      req.on('error', (err: NodeJS.ErrnoException) => resolve(err.code ?? err.message));
      req.end();
    });
    expect(plaintext).not.toMatch(/^answered/);
    const auth = { authorization: `Bearer ${ADMIN_TOKEN}` };
    expect((await call({ path: '/_till/status', host: `till.test:${port}`, headers: auth })).status).toBe(200);
    const rebound = await call({ path: '/_till/status', host: `evil.example:${port}`, headers: auth });
    expect(rebound.status).toBe(403);
    expect(rebound.body).toMatch(/DNS rebinding/);
    const browser = await call({ path: '/_till/status', host: `till.test:${port}`, headers: { ...auth, origin: 'https://evil.example' } });
    expect(browser.status).toBe(403);
    expect(browser.body).toMatch(/web browsers are refused/);
  });

  it('survives admin requests cut off mid-body and refuses oversized ones', async () => {
    const auth = { authorization: `Bearer ${ADMIN_TOKEN}`, 'content-type': 'application/json' };
    for (let i = 0; i < 3; i++) {
      await new Promise<void>((resolve) => {
        const req = https.request({ host: '127.0.0.1', port, ca: tls.cert, servername: 'till.test', method: 'POST', path: '/_till/keys' });
        req.setHeader('authorization', auth.authorization);
        req.setHeader('content-length', '1000');
        req.on('error', () => resolve());
        req.write('{"target": "ope');
        setTimeout(() => {
          req.destroy();
          resolve();
        }, 50);
      });
    }
    // Refused as soon as it is past 1 MB: the client sees the 413 or its connection cut, and nothing is issued.
    const huge = await call({
      path: '/_till/keys',
      method: 'POST',
      headers: auth,
      body: JSON.stringify({ target: 'x'.repeat(1_100_000) }),
    }).then(
      (r) => String(r.status),
      (err: NodeJS.ErrnoException) => err.code ?? err.message,
    );
    expect(['413', 'ECONNRESET', 'EPIPE']).toContain(huge);
    expect((await call({ path: '/_till/status', headers: auth })).status).toBe(200);
  });

  it('drops a connection that never finishes its TLS handshake once the header timeout passes (10 s)', async () => {
    const started = Date.now();
    const closedAfter = await new Promise<number>((resolve, reject) => {
      const socket = net.connect(port, '127.0.0.1');
      socket.on('error', () => undefined);
      socket.on('close', () => resolve(Date.now() - started));
      setTimeout(() => reject(new Error('the connection was still open after 14 s')), 14_000).unref();
    });
    expect(closedAfter).toBeGreaterThan(5_000);
    expect(closedAfter).toBeLessThan(14_000);
  }, 20_000);

  it('stops at once on SIGTERM with a connection still in its TLS handshake', async () => {
    const broker = await spawnServe(tempHome(), { args: ['--listen', '127.0.0.1', '--tls-cert', tls.certFile, '--tls-key', tls.keyFile] });
    const socket = net.connect(Number(new URL(broker.url).port), '127.0.0.1');
    socket.on('error', () => undefined);
    await new Promise((resolve) => socket.once('connect', resolve));
    const asked = Date.now();
    await broker.stop();
    expect(Date.now() - asked).toBeLessThan(3_000);
    socket.destroy();
  });

  it('refuses the control API without the right admin token, and sends the token only over TLS', async () => {
    const wrong = await admin(['ls'], { TILL_ADMIN_TOKEN: 'b'.repeat(64) });
    expectOneLineError(wrong, 1, /bad admin token/);
    const none = await admin(['ls'], { TILL_ADMIN_TOKEN: '' });
    expectOneLineError(none, 2, /needs the admin token/);
    const cleartext = await runTill(['--broker', `http://till.test:${port}`, 'ls'], {
      home: laptop,
      env: { TILL_ADMIN_TOKEN: ADMIN_TOKEN },
    });
    expectOneLineError(cleartext, 1, /only over https/);
    const untrusted = await runTill(['--broker', `https://127.0.0.1:${port}`, 'ls'], {
      home: laptop,
      env: { TILL_ADMIN_TOKEN: ADMIN_TOKEN },
    });
    expectOneLineError(untrusted, 1, /certificate this machine does not trust.*--ca/);
    const noRoute = await call({ path: '/_till/status', headers: { authorization: 'Bearer nope' } });
    expect(noRoute.status).toBe(401);
  });

  it('issues, lists, extends and revokes keys for admins elsewhere; the keys work through it with the configured credentials', async () => {
    const issued = await admin(['issue', 'openai', '--uses', '2', '--label', 'ci runner', '--json']);
    expect(issued.code, issued.stderr).toBe(0);
    const key = JSON.parse(issued.stdout) as IssuedKey;
    expect(key.baseUrl).toBe(`https://127.0.0.1:${port}/openai/v1`);
    const headers = { authorization: `Bearer ${key.key}`, 'content-type': 'application/json' };
    const first = await call({ path: '/openai/v1/chat/completions', method: 'POST', headers, body: chatBody() });
    expect(first.status, first.body).toBe(200);
    expect(openai.received.at(-1)!.headers.authorization).toBe(`Bearer ${openaiKey}`);
    expect(first.body).not.toContain(openaiKey);

    const listed = await admin(['ls', '--json']);
    const summary = (JSON.parse(listed.stdout) as KeySummary[]).find((k) => k.id === key.id)!;
    expect(summary.label).toBe('ci runner');
    expect(summary.used.activations).toBe(1);

    expect((await admin(['extend', key.id, '--uses', '5'])).stdout).toContain(`extended ${key.id}`);
    expect((await admin(['revoke', key.id])).stdout).toContain(`revoked ${key.id}`);
    const after = await call({ path: '/openai/v1/chat/completions', method: 'POST', headers, body: chatBody() });
    expect(after.status).toBe(401);

    // The Anthropic credential comes from the service's environment.
    const claude = JSON.parse((await admin(['issue', 'anthropic', '--uses', '1', '--json'])).stdout) as IssuedKey;
    const answer = await call({
      path: '/anthropic/v1/messages',
      method: 'POST',
      headers: { 'x-api-key': claude.key, 'anthropic-version': '2023-06-01', 'content-type': 'application/json' },
      body: JSON.stringify({ model: 'claude-sonnet-4-5', max_tokens: 64, messages: [{ role: 'user', content: 'hi' }] }),
    });
    expect(answer.status, answer.body).toBe(200);
    expect(anthropic.received.at(-1)!.headers['x-api-key']).toBe(anthropicKey);
  });

  it('carries WebSockets over TLS (wss://), checked and counted like HTTP', async () => {
    const key = JSON.parse((await admin(['issue', 'openai', '--uses', '1', '--json'])).stdout) as IssuedKey;
    const socket = await openResponsesSocket(`wss://127.0.0.1:${port}/openai/v1/responses`, key.key, tls.cert);
    await socket.turn('hi');
    socket.ws.close();
    await waitFor('the turn to be counted', async () => {
      const keys = JSON.parse((await admin(['ls', '--json'])).stdout) as KeySummary[];
      return keys.find((k) => k.id === key.id)?.used.activations === 1;
    });
  });

  it('runs a CI job with `till --broker … exec`: the official SDK goes through the team broker, the key is revoked at exit', async () => {
    const script = join(tempHome(), 'job.js');
    writeFileSync(
      script,
      `const OpenAI = require(${JSON.stringify(require.resolve('openai'))}).default;
       new OpenAI().chat.completions.create({ model: 'gpt-4o-mini', messages: [{ role: 'user', content: 'hi' }] })
         .then((r) => console.log('answer:' + r.choices[0].message.content.length + ' ' + process.env.OPENAI_BASE_URL))
         .catch((e) => { console.error(e.message); process.exit(1); });`,
    );
    const before = openai.received.length;
    // The job is told to trust the team's CA (given with --ca) the way Node programs do.
    const job = await admin(['exec', 'openai', '--uses', '1', '--', process.execPath, script]);
    expect(job.code, job.stderr).toBe(0);
    expect(job.stdout).toMatch(new RegExp(`answer:\\d+ https://127\\.0\\.0\\.1:${port}/openai/v1`));
    expect(openai.received.length).toBe(before + 1);
    expect(openai.received.at(-1)!.headers.authorization).toBe(`Bearer ${openaiKey}`);
    const keys = JSON.parse((await admin(['ls', '--json'])).stdout) as KeySummary[];
    const execKey = keys.find((k) => k.label === `exec ${process.execPath.split('/').pop()}`)!;
    expect(execKey.state).toBe('revoked');
  });

  it('streams events to `till --broker … watch`', async () => {
    const key = JSON.parse((await admin(['issue', 'openai', '--json'])).stdout) as IssuedKey;
    const watch = spawn(process.execPath, [TILL_JS, '--broker', `https://127.0.0.1:${port}`, '--ca', tls.certFile, 'watch', '--json'], {
      env: { ...process.env, TILL_HOME: laptop, TILL_ADMIN_TOKEN: ADMIN_TOKEN },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let printed = '';
    watch.stdout.on('data', (c: Buffer) => (printed += c));
    watch.stderr.on('data', (c: Buffer) => (printed += c));
    try {
      // Requests until watch shows one (it may not be streaming yet when the first is sent), at most 20.
      for (let i = 0; i < 20 && !printed.includes(`"keyId":"${key.id}"`); i++) {
        await call({
          path: '/openai/v1/chat/completions',
          method: 'POST',
          headers: { authorization: `Bearer ${key.key}`, 'content-type': 'application/json' },
          body: chatBody(),
        });
        await new Promise((r) => setTimeout(r, 250));
      }
      expect(printed).toContain(`"keyId":"${key.id}"`);
      expect(printed).toContain('"type":"request.finished"');
    } finally {
      watch.kill();
    }
  });

  it('writes audit records to the database, and the credentials nowhere: not in the database, its logs or answers', async () => {
    await waitFor('audit records in the database', async () => Number(db.psql('select count(*) from till_audit')) >= 4);
    expect(db.psql("select count(*) from till_audit where status = 401 and path = '/v1/chat/completions'")).not.toBe('0');
    const everything = db.psql(
      "select coalesce(string_agg(t::text, chr(10)), '') from till_keys t union all select coalesce(string_agg(a::text, chr(10)), '') from till_audit a",
    );
    expect(everything).toContain('ci runner');
    for (const secret of [openaiKey, anthropicKey, ADMIN_TOKEN]) {
      expect(everything).not.toContain(secret);
      expect(server.output()).not.toContain(secret);
      expect(readFileSync(join(serverHome, 'audit.jsonl'), 'utf8')).not.toContain(secret);
    }
  });

  it('behind a TLS-terminating proxy on its machine (nginx, Caddy): admins reach it through the proxy, keys are issued with https', async () => {
    // Till on loopback, plain HTTP; the proxy terminates TLS and says so in X-Forwarded-Proto.
    const home = tempHome();
    writeConfig(home, { credentials: { openai: { provider: 'openai', env: 'PROXIED_OPENAI_KEY' } } });
    const behind = await spawnServe(home, {
      env: { ...NO_KEYCHAIN, TILL_ADMIN_TOKEN: ADMIN_TOKEN, PROXIED_OPENAI_KEY: openaiKey, TILL_UPSTREAM_OPENAI: `${openai.url}/v1` },
    });
    const target = new URL(behind.url);
    const proxy = https.createServer({ cert: tls.cert, key: readFileSync(tls.keyFile) }, (req, res) => {
      const headers = { ...req.headers, 'x-forwarded-proto': 'https' };
      const up = http.request({ host: '127.0.0.1', port: Number(target.port), method: req.method, path: req.url, headers }, (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      });
      up.on('error', () => res.destroy());
      req.pipe(up);
    });
    await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve));
    const proxied = `https://127.0.0.1:${(proxy.address() as net.AddressInfo).port}`;
    try {
      const issued = await runTill(['--broker', proxied, '--ca', tls.certFile, 'issue', 'openai', '--uses', '1', '--json'], {
        home: laptop,
        env: { TILL_ADMIN_TOKEN: ADMIN_TOKEN, ...NO_KEYCHAIN },
      });
      expect(issued.code, issued.stderr).toBe(0);
      const key = JSON.parse(issued.stdout) as IssuedKey;
      expect(key.baseUrl).toBe(`${proxied}/openai/v1`);
      // The key works through the proxy, with the real key swapped in behind it.
      const answer = await new Promise<number>((resolve, reject) => {
        const req = https.request(
          `${key.baseUrl}/chat/completions`,
          { method: 'POST', ca: tls.cert, headers: { authorization: `Bearer ${key.key}`, 'content-type': 'application/json' } },
          (res) => {
            res.resume();
            res.on('end', () => resolve(res.statusCode ?? 0));
          },
        );
        req.on('error', reject);
        req.end(chatBody());
      });
      expect(answer).toBe(200);
      expect(openai.received.at(-1)!.headers.authorization).toBe(`Bearer ${openaiKey}`);
      // Asked directly (no proxy, no header), the same broker names its own plain-HTTP address.
      const direct = await runTill(['--broker', behind.url, 'issue', 'openai', '--json'], {
        home: laptop,
        env: { TILL_ADMIN_TOKEN: ADMIN_TOKEN, ...NO_KEYCHAIN },
      });
      expect(direct.code, direct.stderr).toBe(0);
      expect((JSON.parse(direct.stdout) as IssuedKey).baseUrl).toBe(`${behind.url}/openai/v1`);
    } finally {
      await new Promise((resolve) => proxy.close(resolve));
      await behind.stop();
    }
  });

  it('refuses admin requests from an address that sent ten wrong admin tokens within a minute, even with the right one, and says so', async () => {
    // A broker of its own: the lockout is per client address, and every client here is 127.0.0.1.
    const home = tempHome();
    const guarded = await spawnServe(home, { env: { ...NO_KEYCHAIN, TILL_ADMIN_TOKEN: ADMIN_TOKEN } });
    try {
      const ask = (token: string) =>
        runTill(['--broker', guarded.url, 'ls'], { home: laptop, env: { TILL_ADMIN_TOKEN: token, ...NO_KEYCHAIN } });
      expect((await ask(ADMIN_TOKEN)).code).toBe(0);
      for (let i = 0; i < 10; i++) expectOneLineError(await ask(`${'b'.repeat(40)}${i}`), 1, /bad admin token/);
      expectOneLineError(await ask(ADMIN_TOKEN), 1, /too many wrong admin tokens from 127\.0\.0\.1: try again in \d+ s/);
      expect(guarded.output()).toContain('admin requests from 127.0.0.1 refused for a minute: 10 wrong admin tokens');
      // Till keys are not admin requests: one is still judged for what it is (here malformed: 400), not locked out.
      const status = await new Promise<number>((resolve, reject) =>
        http
          .get(`${guarded.url}/openai/v1/models`, { headers: { authorization: 'Bearer till_nope' } }, (res) => {
            res.resume();
            resolve(res.statusCode ?? 0);
          })
          .on('error', reject),
      );
      expect(status).toBe(400);
    } finally {
      await guarded.stop();
    }
  });

  it('shows configured credentials in `till credential ls` and refuses to change them through Till', async () => {
    // TILL_BROKER in the environment (a teammate's shell) leaves this machine's own commands alone.
    const env = { TEAM_ANTHROPIC_KEY: anthropicKey, TILL_BROKER: `https://127.0.0.1:${port}`, ...NO_KEYCHAIN };
    const ls = await runTill(['credential', 'ls'], { home: serverHome, env });
    expect(ls.stdout).toMatch(/openai\s+openai\s+from the file \//);
    expect(ls.stdout).toMatch(/anthropic\s+anthropic\s+from the environment variable TEAM_ANTHROPIC_KEY/);
    const rm = await runTill(['credential', 'rm', 'openai'], { home: serverHome, env });
    expectOneLineError(rm, 1, /comes from the file .* change it there/);
  });
});
