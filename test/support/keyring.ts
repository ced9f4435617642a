/**
 * A private, headless OS keychain for tests: its own D-Bus session bus and gnome-keyring
 * (Secret Service) in throw-away folders, so the suite never touches the developer's real
 * keychain and runs the same on a laptop and in CI.
 */
import { execFile, execFileSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';

const run = promisify(execFile);

/** `gdbus` arguments that lock the session's login collection, as a screen lock or a timeout would. */
export const LOCK_LOGIN_COLLECTION = [
  'call',
  '--session',
  '--dest',
  'org.freedesktop.secrets',
  '--object-path',
  '/org/freedesktop/secrets',
  '--method',
  'org.freedesktop.Secret.Service.Lock',
  "['/org/freedesktop/secrets/collection/login']",
];

export interface PrivateKeyring {
  /** Environment a process needs to reach this keychain (bus address and XDG folders). */
  env: Record<string, string>;
  /** Locks the login collection, as a screen lock or a timeout would. */
  lock(): Promise<void>;
  stop(): void;
}

export async function startPrivateKeyring(): Promise<PrivateKeyring> {
  for (const bin of ['dbus-daemon', 'gnome-keyring-daemon', 'gdbus']) {
    try {
      execFileSync('which', [bin], { stdio: 'ignore' });
    } catch {
      throw new Error(
        `${bin} is not installed: the keychain tests need a real Secret Service (apt-get install gnome-keyring dbus libglib2.0-bin)`,
      );
    }
  }
  const root = mkdtempSync(join(tmpdir(), 'till-keyring-'));
  const env: Record<string, string> = {
    XDG_RUNTIME_DIR: join(root, 'run'),
    XDG_DATA_HOME: join(root, 'data'),
    XDG_CONFIG_HOME: join(root, 'config'),
    HOME: root,
  };
  for (const dir of ['run', 'data', 'config']) execFileSync('mkdir', ['-p', '-m', '700', join(root, dir)]);
  const bus = await run('dbus-daemon', ['--session', '--fork', '--nopidfile', '--print-address=1', '--print-pid=1'], {
    env: { ...process.env, ...env },
  });
  const [address, pid] = bus.stdout.trim().split('\n');
  if (!address || !pid) throw new Error(`dbus-daemon did not start: ${bus.stderr}`);
  env.DBUS_SESSION_BUS_ADDRESS = address;
  const fullEnv = { ...process.env, ...env };
  // --unlock with the password on stdin creates an unlocked "login" collection without a prompt.
  await new Promise<void>((resolve, reject) => {
    const child = execFile(
      'gnome-keyring-daemon',
      ['--daemonize', '--unlock', '--components=secrets'],
      { env: fullEnv },
      (err: Error | null) => (err ? reject(err) : resolve()),
    );
    child.stdin?.end('till-test-password');
  });
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      const { stdout } = await run(
        'gdbus',
        [
          'introspect',
          '--session',
          '--dest',
          'org.freedesktop.secrets',
          '--object-path',
          '/org/freedesktop/secrets/collection/login',
          '--only-properties',
        ],
        { env: fullEnv },
      );
      if (stdout.includes('Locked = false')) break;
    } catch {
      // not up yet
    }
    if (Date.now() > deadline) throw new Error('gnome-keyring did not unlock its login collection within 10 s');
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    env,
    async lock() {
      await run('gdbus', LOCK_LOGIN_COLLECTION, { env: fullEnv });
    },
    stop() {
      try {
        process.kill(Number(pid));
      } catch {
        // already gone
      }
      // gnome-keyring-daemon exits when its bus goes away.
      rmSync(root, { recursive: true, force: true });
    },
  };
}
