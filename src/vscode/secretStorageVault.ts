/**
 * Credentials in VS Code's secret storage (`context.secrets`): kept by VS Code on the machine it
 * runs on, encrypted with the OS keychain's key on the desktop, in the browser's storage for
 * browser clients (code-server, VS Code for the Web), and served to a remote window's extension
 * host over VS Code's own channel: never written to the remote's disk. Where no OS keychain can
 * be reached (a dev container, WSL, an SSH host), this is where the real keys stay.
 *
 * Each read is a round trip to the client side, slow enough that a terminal opened while a key
 * was being issued started without it: secrets read or stored here are kept in this process's
 * memory (where the broker keeps them anyway) until VS Code says they changed.
 */
import type * as vscode from 'vscode';
import { VaultError, type Vault } from '../core/credentials/vault';

/** A store entry's key: one namespace for Till's credentials among the extension's secrets. */
const PREFIX = 'till.credential.';

export class SecretStorageVault implements Vault, vscode.Disposable {
  private readonly known = new Map<string, string>();
  private readonly watching: vscode.Disposable;

  constructor(private readonly secrets: vscode.SecretStorage) {
    // Another window of this profile changed one: read it again next time.
    this.watching = secrets.onDidChange((e) => {
      if (e.key.startsWith(PREFIX)) this.known.delete(e.key.slice(PREFIX.length));
    });
  }

  async get(name: string): Promise<string> {
    const known = this.known.get(name);
    if (known !== undefined) return known;
    const secret = await this.secrets.get(PREFIX + name);
    if (secret === undefined)
      throw new VaultError('missing', `credential "${name}" is not in VS Code's secret storage: add it again with "Till: Add Credential"`);
    this.known.set(name, secret);
    return secret;
  }

  async set(name: string, secret: string): Promise<void> {
    this.known.delete(name);
    await this.secrets.store(PREFIX + name, secret);
    this.known.set(name, secret);
  }

  async delete(name: string): Promise<boolean> {
    this.known.delete(name);
    const had = (await this.secrets.get(PREFIX + name)) !== undefined;
    await this.secrets.delete(PREFIX + name);
    return had;
  }

  dispose(): void {
    this.watching.dispose();
    this.known.clear();
  }
}
