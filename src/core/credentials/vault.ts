/**
 * The vault: credentials in the OS keychain (Keychain on macOS, Credential Manager on
 * Windows, Secret Service on Linux) through @napi-rs/keyring. Never a plaintext file.
 *
 * Keychains misbehave in ways a broker must survive: a locked one, none at all, one that
 * hangs on an unlock prompt nobody sees. Every call here is serialized, has a timeout, and
 * fails with a {@link VaultError} whose message says what to do.
 */
import type { AsyncEntry } from '@napi-rs/keyring';

type KeyringBinding = typeof import('@napi-rs/keyring');
let binding: KeyringBinding | undefined;

/**
 * Loads the native binding on first use, so a machine where it cannot load gets a clear
 * keychain error instead of a failed activation.
 */
function keyring(): KeyringBinding {
  if (binding) return binding;
  try {
    // Required on first use, not imported: a missing or broken native binding must fail one call
    // with a clear VaultError, not the loading of the whole module.
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    binding = require('@napi-rs/keyring') as KeyringBinding;
  } catch (err) {
    // In Electron on Windows the loader sees node_target_type "shared_library" and looks only
    // for the GNU build; the VSIX ships the MSVC one, which loads fine when asked directly.
    if (process.platform !== 'win32' || process.arch !== 'x64') throw err;
    // eslint-disable-next-line @typescript-eslint/no-require-imports
    binding = require('@napi-rs/keyring-win32-x64-msvc') as KeyringBinding;
  }
  return binding;
}

export type VaultErrorKind = 'missing' | 'locked' | 'unavailable' | 'timeout';

export class VaultError extends Error {
  constructor(
    readonly kind: VaultErrorKind,
    message: string,
  ) {
    super(message);
    this.name = 'VaultError';
  }
}

/** Where credentials are kept. The keychain in production; the interface lets the editor offer its own secret storage. */
export interface Vault {
  /** The secret of a credential. Throws {@link VaultError} (`missing`, `locked`, …). */
  get(name: string): Promise<string>;
  set(name: string, secret: string): Promise<void>;
  /** Returns false when there was nothing to delete. */
  delete(name: string): Promise<boolean>;
}

export interface KeychainVaultOptions {
  /** Keychain service name. Default: `till`. */
  service?: string;
  /** Per-call timeout in ms. Default: 5000. */
  timeoutMs?: number;
}

const UNAVAILABLE_HINT =
  process.platform === 'linux'
    ? 'no OS keychain is reachable (Secret Service over D-Bus). Start one (gnome-keyring, or KeePassXC with Secret Service on) in this session and retry; in a container or on a remote machine, open it in a VS Code window with Till instead, whose broker keeps the real keys in VS Code on your own machine'
    : 'the OS keychain is not reachable from this process';

function classify(err: unknown): VaultError {
  const text = err instanceof Error ? err.message : String(err);
  if (/lock|unlock|prompt|dismissed/i.test(text)) {
    return new VaultError(
      'locked',
      'the OS keychain is locked: unlock it (log in to the desktop session, or unlock the "login" keyring) and retry',
    );
  }
  return new VaultError(
    'unavailable',
    `${UNAVAILABLE_HINT}. Till never falls back to a plain file. (${text.replace(/\s+/g, ' ').slice(0, 200)})`,
  );
}

/** Credentials in the OS keychain. One entry object per account, reused; one call at a time. */
export class KeychainVault implements Vault {
  private readonly entries = new Map<string, AsyncEntry>();
  private queue: Promise<unknown> = Promise.resolve();
  private readonly service: string;
  private readonly timeoutMs: number;

  constructor(options: KeychainVaultOptions = {}) {
    this.service = options.service ?? 'till';
    this.timeoutMs = options.timeoutMs ?? 5000;
  }

  private entry(name: string): AsyncEntry {
    let entry = this.entries.get(name);
    if (!entry) {
      // Pinned to Secret Service: the library's Linux default silently falls back to the kernel keyring.
      entry = new (keyring().AsyncEntry)(this.service, name, { linux: { store: 'secret-service' } });
      this.entries.set(name, entry);
    }
    return entry;
  }

  private call<T>(name: string, op: (entry: AsyncEntry, signal: AbortSignal) => Promise<T>): Promise<T> {
    const run = async () => {
      const abort = new AbortController();
      let timer: NodeJS.Timeout | undefined;
      const timeout = new Promise<never>((_, reject) => {
        timer = setTimeout(() => {
          abort.abort();
          reject(
            new VaultError(
              'timeout',
              `the OS keychain did not answer within ${this.timeoutMs / 1000} s: it may be locked and waiting for an unlock prompt`,
            ),
          );
        }, this.timeoutMs);
      });
      try {
        const attempt = (async () => op(this.entry(name), abort.signal))().catch((err: unknown) => {
          throw err instanceof VaultError ? err : classify(err);
        });
        return await Promise.race([attempt, timeout]);
      } finally {
        clearTimeout(timer);
      }
    };
    const result = this.queue.then(run, run);
    this.queue = result.catch(() => undefined);
    return result;
  }

  async get(name: string): Promise<string> {
    const secret = await this.call(name, (e, signal) => e.getPassword(signal));
    if (secret === null || secret === undefined) {
      // Some Secret Service providers answer "nothing" while locked instead of failing.
      if (await this.isLocked()) throw classify(new Error('locked'));
      throw new VaultError('missing', `credential "${name}" is not in the OS keychain: add it again with \`till credential add\``);
    }
    return secret;
  }

  /** A write fails on a locked keychain even where a read only comes back empty. */
  private async isLocked(): Promise<boolean> {
    const probe = '.till-lock-probe';
    try {
      await this.call(probe, (e, signal) => e.setPassword('probe', signal));
      await this.call(probe, (e, signal) => e.deleteCredential(signal));
      return false;
    } catch (err) {
      return err instanceof VaultError && (err.kind === 'locked' || err.kind === 'timeout');
    }
  }

  async set(name: string, secret: string): Promise<void> {
    await this.call(name, (e, signal) => e.setPassword(secret, signal));
  }

  async delete(name: string): Promise<boolean> {
    return this.call(name, (e, signal) => e.deleteCredential(signal));
  }
}
