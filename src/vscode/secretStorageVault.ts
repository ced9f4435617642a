/**
 * Credentials in VS Code's secret storage (`context.secrets`): kept by VS Code on the machine it
 * runs on, encrypted with the OS keychain's key on the desktop, in the browser's storage for
 * browser clients (code-server, VS Code for the Web), and served to a remote window's extension
 * host over VS Code's own channel: never written to the remote's disk. Where no OS keychain can
 * be reached (a dev container, WSL, an SSH host), this is where the real keys stay.
 */
import type * as vscode from 'vscode';
import { VaultError, type Vault } from '../core/credentials/vault';

/** A store entry's key: one namespace for Till's credentials among the extension's secrets. */
const entry = (name: string) => `till.credential.${name}`;

export class SecretStorageVault implements Vault {
  constructor(private readonly secrets: vscode.SecretStorage) {}

  async get(name: string): Promise<string> {
    const secret = await this.secrets.get(entry(name));
    if (secret === undefined)
      throw new VaultError('missing', `credential "${name}" is not in VS Code's secret storage: add it again with "Till: Add Credential"`);
    return secret;
  }

  async set(name: string, secret: string): Promise<void> {
    await this.secrets.store(entry(name), secret);
  }

  async delete(name: string): Promise<boolean> {
    const had = (await this.secrets.get(entry(name))) !== undefined;
    await this.secrets.delete(entry(name));
    return had;
  }
}
