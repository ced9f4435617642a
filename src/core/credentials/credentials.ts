/**
 * The list of credentials: names, providers and which store keeps each, in `credentials.json`
 * in the data folder. The secrets themselves live in a {@link Vault}; this file holds nothing
 * secret.
 *
 * Two stores can keep secrets: the OS keychain (every process of this user on this machine can
 * ask it) and the editor's secret storage (VS Code's, kept on the machine VS Code runs on, even
 * for a remote window; only that editor's extension can read it). A credential stays in the
 * store it was added to: nothing copies it to the other, and a process without its store says so
 * instead of looking in the wrong place.
 *
 * On a server, credentials can also be named in config.json (`"credentials"`): each is read from
 * where the service manager put it (secretSource.ts), listed with the others, and never stored.
 */
import { dirname } from 'node:path';
import { ensurePrivateFolder, readPrivateFile, writePrivateFile } from '../files/privateFolder';
import { KeychainVault, VaultError, type Vault } from './vault';
import { describeSource, readSecretSource, type SecretSource } from './secretSource';

/** Where a credential's secret is kept: the keychain, the editor's secret storage, or a source config.json names. */
export type SecretStoreId = 'keychain' | 'editor' | 'config';

/** A credential config.json names: its provider, and where the service manager keeps its secret. */
export type ConfiguredCredential = SecretSource & { provider: string };

/** config.json's `"credentials"`: credential name → {@link ConfiguredCredential}. */
export type ConfiguredCredentials = Record<string, ConfiguredCredential>;

export interface CredentialInfo {
  /** Unique name, also the keychain account. Default: the provider id. */
  name: string;
  provider: string;
  addedAt: number;
  /** Where its secret is kept. Absent: the OS keychain (credentials added before there was a choice). */
  store?: SecretStoreId;
}

/** The stores one process can reach: the keychain always (it may fail when asked), the editor's only inside it. */
export interface SecretStores {
  keychain: Vault;
  editor?: Vault;
  config?: Vault;
}

/** How a store is named to the user. */
export function storeName(store: SecretStoreId): string {
  return store === 'editor' ? "VS Code's secret storage" : store === 'config' ? "the broker's configuration" : 'the OS keychain';
}

/** The secrets of the credentials config.json names, read from their sources at each call; never written. */
export function configuredVault(configured: ConfiguredCredentials, env: NodeJS.ProcessEnv = process.env): Vault {
  const sourceOf = (name: string): ConfiguredCredential => {
    const source = Object.hasOwn(configured, name) ? configured[name] : undefined;
    if (!source) throw new VaultError('missing', `credential "${name}" is not in config.json's "credentials"`);
    return source;
  };
  const readOnly = (name: string) =>
    new VaultError(
      'unavailable',
      `credential "${name}" comes from ${describeSource(sourceOf(name))}, as config.json says: change it there, not through Till`,
    );
  return {
    get: (name) => Promise.resolve().then(() => readSecretSource(sourceOf(name), env)),
    set: (name) => Promise.reject(readOnly(name)),
    delete: (name) => Promise.reject(readOnly(name)),
  };
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Checks a credential name: letters, digits, dot, dash, underscore; at most 64. */
export function checkCredentialName(name: string): void {
  if (!NAME.test(name)) throw new Error(`credential name "${name}" must be 1-64 letters, digits, dots, dashes or underscores`);
}

export class CredentialList {
  private readonly configured: CredentialInfo[];

  /** `configured`: config.json's credentials, listed first; a name there hides the same name in the file. */
  constructor(
    readonly file: string,
    configured: ConfiguredCredentials = {},
  ) {
    this.configured = Object.entries(configured).map(([name, c]) => ({ name, provider: c.provider, addedAt: 0, store: 'config' }));
  }

  all(): CredentialInfo[] {
    const stored = this.stored();
    if (this.configured.length === 0) return stored;
    const names = new Set(this.configured.map((c) => c.name));
    return [...this.configured, ...stored.filter((c) => !names.has(c.name))];
  }

  /** The credentials credentials.json lists. */
  private stored(): CredentialInfo[] {
    const text = readPrivateFile(this.file);
    if (text === undefined) return [];
    try {
      const parsed = JSON.parse(text) as { credentials?: CredentialInfo[] };
      if (!Array.isArray(parsed.credentials)) throw new Error('no credentials array');
      return parsed.credentials;
    } catch (err) {
      throw new Error(`${this.file} is damaged (${(err as Error).message}); fix or remove it, then add the credentials again`, {
        cause: err,
      });
    }
  }

  get(name: string): CredentialInfo | undefined {
    return this.all().find((c) => c.name === name);
  }

  /** Credentials of a provider, for `till issue <provider>`. */
  forProvider(provider: string): CredentialInfo[] {
    return this.all().filter((c) => c.provider === provider);
  }

  put(info: CredentialInfo): void {
    checkCredentialName(info.name);
    this.save([...this.stored().filter((c) => c.name !== info.name), info]);
  }

  remove(name: string): boolean {
    const all = this.stored();
    const rest = all.filter((c) => c.name !== name);
    if (rest.length === all.length) return false;
    this.save(rest);
    return true;
  }

  private save(list: CredentialInfo[]): void {
    ensurePrivateFolder(dirname(this.file), 'the data folder');
    writePrivateFile(this.file, JSON.stringify({ credentials: list }, null, 2) + '\n');
  }
}

/** Refuses what is clearly not a real credential, before it reaches the keychain. */
export function checkSecret(secret: string): void {
  if (!secret) throw new Error('no secret given');
  if (/\s/.test(secret)) throw new Error('the secret contains whitespace: paste only the key');
  if (secret.startsWith('till_')) throw new Error('that is a till key, not a real credential');
  if (secret.length > 16 * 1024) throw new Error('the secret is longer than 16 KiB');
}

/**
 * Adding and removing credentials, for the `till` command and the editor alike: the secret
 * goes to its store, the name (and the store) to the list. The broker must be told afterwards
 * (it caches). {@link vault} is what a broker reads secrets through.
 */
export class CredentialStore {
  readonly list: CredentialList;
  /** Each credential's secret from the store the list says keeps it. */
  readonly vault: Vault;

  constructor(
    file: string,
    private readonly stores: SecretStores,
    configured?: ConfiguredCredentials,
  ) {
    this.list = new CredentialList(file, configured);
    this.vault = {
      get: async (name) => this.storeFor(name).get(name),
      set: async (name, secret) => this.storeFor(name).set(name, secret),
      delete: async (name) => this.storeFor(name).delete(name),
    };
  }

  /**
   * The credentials of a process without VS Code (`till serve`, `till credential`): the OS
   * keychain's (`keychainService`) and those config.json names, read from `env` and their files.
   */
  static outsideEditor(
    file: string,
    keychainService: string,
    configured: ConfiguredCredentials,
    env: NodeJS.ProcessEnv = process.env,
  ): CredentialStore {
    return new CredentialStore(
      file,
      { keychain: new KeychainVault({ service: keychainService }), config: configuredVault(configured, env) },
      configured,
    );
  }

  all(): CredentialInfo[] {
    return this.list.all();
  }

  /** Where a credential is kept (the keychain for one not listed). */
  storeOf(name: string): SecretStoreId {
    return this.list.get(name)?.store ?? 'keychain';
  }

  private storeFor(name: string): Vault {
    const store = this.storeOf(name);
    const vault = this.stores[store];
    if (vault) return vault;
    if (store === 'config') throw new VaultError('unavailable', `credential "${name}" comes from config.json, which only the broker reads`);
    throw new VaultError(
      'unavailable',
      `credential "${name}" is kept in ${storeName(store)}, which only VS Code's Till extension can read: let a VS Code window run the broker (close \`till serve\`, then "Till: Restart Broker"), or add the credential to this machine's keychain with \`till credential add\``,
    );
  }

  /** Stores a credential for a provider under `name` (default: the provider id), in `store` (default: the keychain). */
  async add(provider: string, secret: string, name = provider, store: SecretStoreId = 'keychain'): Promise<CredentialInfo> {
    checkCredentialName(name);
    checkSecret(secret);
    if (this.storeOf(name) === 'config') await this.vault.set(name, secret); // refused, saying where it comes from
    const vault = this.stores[store];
    if (!vault) throw new VaultError('unavailable', `${storeName(store)} cannot be reached from this process`);
    // Added again in another store: the old secret goes, so no store keeps one the list forgot.
    const before = this.list.get(name);
    await vault.set(name, secret);
    const info: CredentialInfo = { name, provider, addedAt: Date.now() };
    if (store !== 'keychain') info.store = store;
    this.list.put(info);
    if (before && (before.store ?? 'keychain') !== store) await this.stores[before.store ?? 'keychain']?.delete(name).catch(() => false);
    return info;
  }

  /**
   * Moves a credential to another store (the one explicit way a secret changes stores): read from
   * where it is, written to `to`, then gone from the first. Keys bound to it keep working.
   */
  async move(name: string, to: SecretStoreId): Promise<CredentialInfo> {
    const info = this.list.get(name);
    if (!info) throw new Error(`no credential named "${name}"`);
    if ((info.store ?? 'keychain') === to) return info;
    return this.add(info.provider, await this.vault.get(name), name, to);
  }

  /** Removes a credential from its store and the list; keys bound to it stop working. */
  async remove(name: string): Promise<void> {
    if (!this.list.get(name)) throw new Error(`no credential named "${name}"`);
    // Refused for one config.json names (its source is the service manager's, not Till's).
    await this.vault.delete(name);
    this.list.remove(name);
  }
}
