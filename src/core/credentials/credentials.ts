/**
 * The list of credentials: names and providers only, in `credentials.json` in the data
 * folder. The secrets themselves live in the {@link Vault}; this file holds nothing secret.
 */
import { dirname } from 'node:path';
import { ensurePrivateFolder, readPrivateFile, writePrivateFile } from '../files/privateFolder';

export interface CredentialInfo {
  /** Unique name, also the keychain account. Default: the provider id. */
  name: string;
  provider: string;
  addedAt: number;
}

const NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

/** Checks a credential name: letters, digits, dot, dash, underscore; at most 64. */
export function checkCredentialName(name: string): void {
  if (!NAME.test(name)) throw new Error(`credential name "${name}" must be 1-64 letters, digits, dots, dashes or underscores`);
}

export class CredentialList {
  constructor(readonly file: string) {}

  all(): CredentialInfo[] {
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
    this.save([...this.all().filter((c) => c.name !== info.name), info]);
  }

  remove(name: string): boolean {
    const all = this.all();
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
 * goes to the vault, the name to the list. The broker must be told afterwards (it caches).
 */
export class CredentialStore {
  readonly list: CredentialList;

  constructor(
    file: string,
    private readonly vault: import('./vault').Vault,
  ) {
    this.list = new CredentialList(file);
  }

  all(): CredentialInfo[] {
    return this.list.all();
  }

  /** Stores a credential for a provider under `name` (default: the provider id). */
  async add(provider: string, secret: string, name = provider): Promise<CredentialInfo> {
    checkCredentialName(name);
    checkSecret(secret);
    await this.vault.set(name, secret);
    const info = { name, provider, addedAt: Date.now() };
    this.list.put(info);
    return info;
  }

  /** Removes a credential from the vault and the list; keys bound to it stop working. */
  async remove(name: string): Promise<void> {
    if (!this.list.get(name)) throw new Error(`no credential named "${name}"`);
    await this.vault.delete(name);
    this.list.remove(name);
  }
}
