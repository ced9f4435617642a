/**
 * Who Till trusts on disk, tried against the built `till` as users run it: the data folder and
 * its files, and the control socket's folder. Each test starts with a comment naming the attack.
 * "Another user" is uid 65534 (nobody) when the suite runs as root, as CI does; otherwise the
 * folder is one this user made open to everyone, which Till must refuse just the same.
 */
import {
  chmodSync,
  chownSync,
  existsSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { createServer, type Server } from 'node:net';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { tillPaths } from '../src/core/runtime/home';
import { serveTill } from './support/served';
import { addCredential, expectOneLineError, fakeCredential, runTill, tempHome, testRoot } from './support/till';
import { startOpenAIUpstream, type Upstream } from './support/upstreams';

const AS_ROOT = process.getuid?.() === 0;
const OTHER_UID = 65534;

/** Makes `path` (and what is in it) belong to another user: chown as root, else open it to everyone. */
function giveAway(path: string, mode: number): void {
  chmodSync(path, mode);
  if (AS_ROOT) chownSync(path, OTHER_UID, OTHER_UID);
}

/** A folder under the test root that nobody else can write (the test root is private). */
function privateScratch(name: string): string {
  mkdirSync(join(testRoot(), 'scratch'), { recursive: true, mode: 0o700 });
  return mkdtempSync(join(testRoot(), 'scratch', `${name}-`));
}

let upstream: Upstream;
let credential: string;
/** An upstream "of the attacker's": a real server that records whatever reaches it. */
let trap: Upstream;

beforeAll(async () => {
  credential = fakeCredential('openai');
  upstream = await startOpenAIUpstream({ credential });
  trap = await startOpenAIUpstream({ credential: 'the attacker does not know it' });
});
afterAll(async () => {
  await upstream.close();
  await trap.close();
});

describe('a data folder someone else made', () => {
  it('refuses a data folder another user made (world-writable, with a config.json redirecting openai), before anything is sent', async () => {
    // Attack: another user creates TILL_HOME=/tmp/till first, mode 0777, with a config.json that
    // points `openai` at their own port; Till would send the real credential there.
    const home = join(privateScratch('foreign'), 'till');
    mkdirSync(home);
    writeFileSync(join(home, 'config.json'), JSON.stringify({ upstreams: { openai: `${trap.url}/v1` } }));
    giveAway(join(home, 'config.json'), 0o666);
    giveAway(home, 0o777);
    for (const args of [['credential', 'add', 'openai'], ['serve', '--port', '0'], ['ls']]) {
      const r = await runTill(args, { home, input: credential });
      expectOneLineError(r, 1, /Till will not use the data folder .*till: it (belongs to another user|is writable by every user)/);
      expect(r.stderr).not.toContain(credential);
    }
    expect(trap.received.length + trap.rejected.length).toBe(0);
  });

  it('refuses a folder whose parent another user can write, and a config.json another user can change', async () => {
    // Attack: the data folder is the user's own, but sits in a folder anyone can write without
    // the sticky bit (they can rename it away and put theirs in its place), or its config.json
    // was left writable by others.
    const open = privateScratch('open-parent');
    chmodSync(open, 0o777);
    const home = join(open, 'till');
    const r = await runTill(['ls'], { home });
    expectOneLineError(r, 1, /is writable by every user .*so another user could replace it/);

    const own = tempHome();
    writeFileSync(join(own, 'config.json'), '{}');
    chmodSync(join(own, 'config.json'), 0o666);
    const c = await runTill(['serve', '--port', '0'], { home: own });
    expectOneLineError(c, 1, /Till will not use .*config\.json: it is writable by others \(mode 0666\): run `chmod 600/);
  });

  it('creates a missing data folder private to the user (0700), parents included', async () => {
    // Attack: none; the folder Till makes itself must be one only the user can enter.
    const home = join(privateScratch('fresh'), 'a', 'b', 'till');
    const r = await runTill(['credential', 'ls'], { home });
    expect(r.code, r.stderr).toBe(0);
    expect(statSync(home).mode & 0o777).toBe(0o700);
    expect(statSync(join(home, '..')).mode & 0o777).toBe(0o700);
  });

  it('never follows links planted in the data folder: audit log, ledger and temporary files', async () => {
    // Attack: links planted where Till writes: audit lines appended to the link's target, and
    // `ledger.jsonl.tmp` / `control.token.tmp` links making Till overwrite their targets (the
    // control token into a world-readable file of the attacker's choosing).
    const home = tempHome();
    await addCredential(home, 'openai', 'openai', credential);
    const outside = privateScratch('targets');
    const targets = ['audit', 'ledger-tmp', 'token-tmp', 'creds-tmp'].map((n) => join(outside, n));
    for (const t of targets) {
      writeFileSync(t, 'untouched\n');
      chmodSync(t, 0o644);
    }
    symlinkSync(targets[1]!, join(home, 'ledger.jsonl.tmp'));
    symlinkSync(targets[2]!, join(home, 'control.token.tmp'));
    symlinkSync(targets[3]!, join(home, 'credentials.json.tmp'));
    // Temporary files are replaced, never written through: the broker starts and works.
    const served = await serveTill(home, { env: { TILL_UPSTREAM_OPENAI: `${upstream.url}/v1` } });
    try {
      const k = await served.issue({ target: 'openai', uses: 1 });
      expect(k.key).toMatch(/^till_/);
      const add = await runTill(['credential', 'add', 'openai', '--name', 'second'], { home, input: fakeCredential('second') });
      expect(add.code, add.stderr).toBe(0);
    } finally {
      await served.close();
    }
    for (const t of targets.slice(1)) expect(readFileSync(t, 'utf8'), t).toBe('untouched\n');
    expect(lstatSync(join(home, 'control.token.tmp'), { throwIfNoEntry: false })).toBeUndefined();

    // A link where the audit log (or the ledger) goes stops Till with a clear error.
    const auditPath = join(home, 'audit.jsonl');
    rmSync(auditPath, { force: true });
    symlinkSync(targets[0]!, auditPath);
    const r = await runTill(['serve', '--port', '0'], { home });
    expectOneLineError(r, 1, /Till will not use .*audit\.jsonl: it is a symbolic link, which Till does not follow/);
    expect(readFileSync(targets[0]!, 'utf8')).toBe('untouched\n');

    rmSync(auditPath);
    const ledger = join(home, 'ledger.jsonl');
    writeFileSync(join(outside, 'ledger-copy'), readFileSync(ledger));
    rmSync(ledger);
    symlinkSync(join(outside, 'ledger-copy'), ledger);
    const l = await runTill(['serve', '--port', '0'], { home });
    expectOneLineError(l, 1, /Till will not use .*ledger\.jsonl: it is a symbolic link/);
  });

  it('refuses a credentials.json that belongs to another user', async () => {
    // Attack: a credentials list planted by someone else, naming credentials of their choosing.
    const home = tempHome();
    writeFileSync(join(home, 'credentials.json'), JSON.stringify({ credentials: [{ name: 'openai', provider: 'openai', addedAt: 1 }] }));
    giveAway(join(home, 'credentials.json'), AS_ROOT ? 0o644 : 0o666);
    const r = await runTill(['credential', 'ls'], { home });
    expectOneLineError(r, 1, /Till will not use .*credentials\.json: it (belongs to another user \(uid 65534\)|is writable by others)/);
  });
});

describe('posing as the broker', () => {
  /** A data folder whose socket path is too long for the folder itself (over 100 bytes). */
  function longHome(): string {
    const home = join(tempHome(), 'a-data-folder-with-a-name-long-enough-that-its-control-socket-cannot-live-in-it-x');
    mkdirSync(home, { mode: 0o700 });
    expect(Buffer.byteLength(join(home, 'control.sock'))).toBeGreaterThan(100);
    return home;
  }
  const uid = process.getuid?.() ?? 0;

  it("puts a socket that cannot live in the data folder in a folder of the user's alone", async () => {
    // Attack: the old fallback `/tmp/till-<uid>-<hash>.sock` is a name anyone can compute in a
    // folder anyone can write; another user binds it first.
    const home = longHome();
    const tmp = privateScratch('tmpdir');
    const env = { TMPDIR: tmp, XDG_RUNTIME_DIR: '' };
    const served = await serveTill(home, { env: { ...env, TILL_UPSTREAM_OPENAI: `${upstream.url}/v1` } });
    try {
      const folder = join(tmp, `till-${uid}`);
      expect(statSync(folder).mode & 0o777).toBe(0o700);
      const r = await runTill(['ls', '--json'], { home, env });
      expect(r.code, r.stderr).toBe(0);
    } finally {
      await served.close();
    }
    // With XDG_RUNTIME_DIR (private by definition), the socket goes there.
    const runtime = privateScratch('runtime');
    const again = await serveTill(home, { env: { TMPDIR: tmp, XDG_RUNTIME_DIR: runtime } });
    try {
      expect(existsSync(join(runtime, 'till'))).toBe(true);
      const r = await runTill(['ls'], { home, env: { TMPDIR: tmp, XDG_RUNTIME_DIR: runtime } });
      expect(r.code, r.stderr).toBe(0);
    } finally {
      await again.close();
    }
  });

  it('refuses to start when another user made the socket folder first', async () => {
    // Attack: another user creates <tmp>/till-<uid> before the broker does, to bind the
    // socket inside it (or read the token) themselves.
    const home = longHome();
    const tmp = privateScratch('tmpdir');
    const folder = join(tmp, `till-${uid}`);
    mkdirSync(folder);
    giveAway(folder, 0o777);
    const r = await runTill(['serve', '--port', '0'], { home, env: { TMPDIR: tmp, XDG_RUNTIME_DIR: '' } });
    expectOneLineError(
      r,
      1,
      /Till will not use the control socket folder .*till-\d+: it (belongs to another user|is writable by every user)/,
    );
  });

  it('sends the control token to no socket it does not own', async () => {
    // Attack: a fake broker listening where the control socket should be; with a leftover
    // control token, `till issue` would hand it the token and print the fake's key and URL.
    const home = tempHome();
    const paths = tillPaths(home);
    writeFileSync(paths.token, 'leftover-token', { mode: 0o600 });
    const received: string[] = [];
    let fake: Server | undefined;
    if (AS_ROOT) {
      fake = createServer((s) => s.on('data', (d) => received.push(d.toString())));
      await new Promise<void>((r) => fake!.listen(paths.socket, () => r()));
      chownSync(paths.socket, OTHER_UID, OTHER_UID);
    } else {
      // Without root, the stand-in is an entry that is not a socket at all.
      writeFileSync(paths.socket, '');
    }
    try {
      const r = await runTill(['issue', 'openai'], { home });
      expectOneLineError(
        r,
        1,
        /Till will not talk to .*control\.sock: it is (a socket of another user \(uid 65534\)|not a socket), so it may be posing as your broker/,
      );
      expect(received.join('')).toBe('');
    } finally {
      await new Promise<void>((r) => (fake ? fake.close(() => r()) : r()));
    }
  });
});
