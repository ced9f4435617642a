/**
 * What every part of the extension shares: the connection to this user's broker, the
 * credential store, settings turned into core options, the log, and the prompter.
 */
import * as vscode from 'vscode';
import { TillConnection } from '../core/runtime/connection';
import { CredentialStore, storeName, type CredentialInfo, type SecretStoreId } from '../core/credentials/credentials';
import { defaultHome, tillPaths, type TillPaths } from '../core/runtime/home';
import { buildPolicy, type PolicyInput } from '../core/policy/policy';
import { upstreamEnvVar } from '../core/providers/providers';
import { DEFAULT_PORT } from '../core/broker/server';
import { KeychainVault } from '../core/credentials/vault';
import type { PriceOverrides } from '../core/metering/pricing';
import { SETTINGS } from './constants';
import { SecretStorageVault } from './secretStorageVault';
import { vscodePrompter, type Prompter } from './prompter';

export class TillSession implements vscode.Disposable {
  readonly paths: TillPaths;
  readonly credentials: CredentialStore;
  /** VS Code's secret storage, as one of the credential stores (see {@link newCredentialStore}). */
  readonly editorSecrets: SecretStorageVault;
  /** This window, as the owner recorded on the keys it issues. */
  readonly owner = `vscode:${vscode.env.sessionId}`;
  prompter: Prompter = vscodePrompter;
  connection: TillConnection;
  private readonly credentialListeners = new Set<() => void>();
  private readonly pending = new Set<Promise<unknown>>();
  /** Resolves once the session has closed its connection (deactivate waits for it). */
  closed: Promise<void> = Promise.resolve();
  private readonly connectionListeners = new Set<(c: TillConnection) => void>();

  constructor(
    readonly log: vscode.LogOutputChannel,
    secrets: vscode.SecretStorage,
  ) {
    this.paths = tillPaths(defaultHome());
    this.editorSecrets = new SecretStorageVault(secrets);
    this.credentials = new CredentialStore(this.paths.credentials, {
      keychain: new KeychainVault({ service: this.paths.keychainService }),
      editor: this.editorSecrets,
    });
    this.connection = this.newConnection();
  }

  /**
   * Where this window's UI is, seen from its extension host (where Till, its broker and the
   * terminals run): the same machine; a desktop window on another machine (Dev Containers, WSL,
   * SSH, Codespaces); or a browser (code-server, VS Code for the Web), whose extension host runs
   * on the server.
   */
  private ui(): 'local' | 'remote' | 'web' {
    if (!vscode.env.remoteName) return 'local';
    return vscode.env.uiKind === vscode.UIKind.Web ? 'web' : 'remote';
  }

  /** The user's choice of store, or undefined for the default (`auto`). */
  private storeSetting(): SecretStoreId | undefined {
    const setting = vscode.workspace.getConfiguration(SETTINGS.section).inspect<string>(SETTINGS.credentialStore)?.globalValue;
    return setting === 'vscode' ? 'editor' : setting === 'keychain' ? 'keychain' : undefined;
  }

  /**
   * Where a credential added now is kept: as the user set it; else VS Code's secret storage for a
   * desktop window on a remote (a container, WSL or SSH host seldom has an OS keychain, and VS Code
   * keeps these secrets on the user's own machine, never on the remote's disk); else the OS
   * keychain of the machine the extension runs on.
   */
  newCredentialStore(): SecretStoreId {
    return this.storeSetting() ?? (this.ui() === 'remote' ? 'editor' : 'keychain');
  }

  /**
   * Whether a key the keychain cannot keep goes to VS Code's secret storage without asking: in a
   * browser window left to the default, where the server has no keychain (a container, as a dev
   * container is) and the browser's storage is the one place left. A local window asks first.
   */
  fallsBackToEditor(): boolean {
    return this.storeSetting() === undefined && this.ui() === 'web';
  }

  /** Where a store keeps secrets, in the user's words (for messages, the status bar, the sidebar). */
  describeStore(store: SecretStoreId): string {
    const ui = this.ui();
    if (store === 'keychain') return ui === 'local' ? 'the OS keychain' : `the OS keychain of ${this.whereBrokerRuns()}`;
    if (ui === 'remote') return "VS Code's secret storage, kept on your local machine";
    if (ui === 'web') return "VS Code's secret storage (this browser's storage, encrypted with a key the server keeps)";
    return storeName(store);
  }

  /** Where the real keys are, in the user's words: the stores of the credentials there are, else where a new one would go. */
  keysKeptIn(credentials: CredentialInfo[] = this.credentials.all()): string {
    const stores = [...new Set(credentials.map((c) => c.store ?? 'keychain'))];
    return (stores.length > 0 ? stores : [this.newCredentialStore()]).map((st) => this.describeStore(st)).join(' and ');
  }

  /** Where this window's broker runs and where the real keys are, in a sentence (tooltips). */
  placement(credentials?: CredentialInfo[]): string {
    const role = this.connection.role;
    const broker =
      role === 'host'
        ? `The broker runs in this window, on ${this.whereBrokerRuns()}.`
        : role === 'attached'
          ? 'The broker runs in another window or `till serve`.'
          : 'The broker is not running.';
    return `${broker} Real keys: in ${this.keysKeptIn(credentials)}.`;
  }

  /** Where this window's extension (and a broker it hosts) runs: this machine, or the remote's name. */
  whereBrokerRuns(): string {
    const remote = vscode.env.remoteName;
    return remote ? `the remote (${remote})` : 'this machine';
  }

  /** The broker settings as the user set them (user settings only: see below). */
  brokerSettings(): { env: NodeJS.ProcessEnv; port: number; prices: PriceOverrides } {
    const config = vscode.workspace.getConfiguration(SETTINGS.section);
    // Upstream overrides are read only from user (application) settings: a workspace must not
    // be able to send credentials elsewhere. package.json declares them application-scoped.
    const upstreams = config.inspect<Record<string, string>>(SETTINGS.upstreams)?.globalValue ?? {};
    const env: NodeJS.ProcessEnv = { ...process.env };
    for (const [id, url] of Object.entries(upstreams)) if (typeof url === 'string' && url) env[upstreamEnvVar(id)] = url;
    const port = config.inspect<number>(SETTINGS.brokerPort)?.globalValue ?? DEFAULT_PORT;
    const prices = config.inspect<PriceOverrides>(SETTINGS.prices)?.globalValue ?? {};
    return { env, port, prices };
  }

  private newConnection(): TillConnection {
    // A broker this window hosts reads each credential from the store that keeps it.
    return new TillConnection({
      home: this.paths.home,
      ...this.brokerSettings(),
      vault: this.credentials.vault,
      log: (line) => this.log.info(line),
    });
  }

  /** Stops this window's broker (if it hosts one) and connects again with fresh settings. */
  async restart(): Promise<void> {
    const old = this.connection;
    this.connection = this.newConnection();
    await old.dispose();
    for (const l of this.connectionListeners) l(this.connection);
    await this.connection.connect();
  }

  /** Called with the new connection after a restart. */
  onConnectionChanged(listener: (c: TillConnection) => void): vscode.Disposable {
    this.connectionListeners.add(listener);
    return new vscode.Disposable(() => this.connectionListeners.delete(listener));
  }

  onCredentialsChanged(listener: () => void): vscode.Disposable {
    this.credentialListeners.add(listener);
    return new vscode.Disposable(() => this.credentialListeners.delete(listener));
  }

  credentialsChanged(name: string): void {
    void this.connection.credentialChanged(name).catch(() => undefined);
    for (const l of this.credentialListeners) l();
  }

  /** A policy from the settings, validated (a bad setting is reported, not silently used). */
  policySetting(key: typeof SETTINGS.terminalPolicy | typeof SETTINGS.issuePolicy): PolicyInput {
    const input = vscode.workspace.getConfiguration(SETTINGS.section).get<PolicyInput>(key) ?? {};
    buildPolicy(input);
    return input;
  }

  /** Revokes a key without waiting; the session waits for it before it closes the broker. */
  revokeLater(id: string): void {
    const p = this.connection.revoke(id).catch(() => false);
    this.pending.add(p);
    void p.finally(() => this.pending.delete(p));
  }

  dispose(): void {
    const connection = this.connection;
    this.closed = Promise.allSettled([...this.pending]).then(() => connection.dispose());
    this.editorSecrets.dispose();
  }
}
