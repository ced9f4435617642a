/**
 * The list of credentials: names and providers only, in `credentials.json` in the data
 * folder. The secrets themselves live in the {@link Vault}; this file holds nothing secret.
 */
import { existsSync, mkdirSync, readFileSync, renameSync, writeFileSync } from 'node:fs';
import { dirname } from 'node:path';

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
    if (!existsSync(this.file)) return [];
    const text = readFileSync(this.file, 'utf8');
    try {
      const parsed = JSON.parse(text) as { credentials?: CredentialInfo[] };
      if (!Array.isArray(parsed.credentials)) throw new Error('no credentials array');
      return parsed.credentials;
    } catch (err) {
      throw new Error(`${this.file} is damaged (${(err as Error).message}); fix or remove it, then add the credentials again`);
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
    mkdirSync(dirname(this.file), { recursive: true, mode: 0o700 });
    const tmp = `${this.file}.tmp`;
    writeFileSync(tmp, JSON.stringify({ credentials: list }, null, 2) + '\n', { mode: 0o600 });
    renameSync(tmp, this.file);
  }
}
