/**
 * "Till: Open Agent Terminal" and the matching terminal profile: a terminal with its own fresh
 * till keys, revoked when the terminal closes.
 */
import * as vscode from 'vscode';
import type { IssuedKey } from '../core/service';
import { SETTINGS } from './constants';
import type { TillSession } from './session';

export class AgentTerminals implements vscode.Disposable {
  private readonly byTerminal = new Map<vscode.Terminal, IssuedKey[]>();
  /** Keys issued for a profile terminal not opened yet, by one of their values. */
  private readonly pendingProfiles = new Map<string, IssuedKey[]>();
  private count = 0;
  private readonly subscriptions: vscode.Disposable[] = [];

  constructor(private readonly session: TillSession) {
    this.subscriptions.push(
      vscode.window.onDidCloseTerminal((t) => this.closed(t)),
      vscode.window.onDidOpenTerminal((t) => this.adopt(t)),
    );
  }

  /** Issues one key per credential and returns the env, the keys and the terminal's name. */
  private async issueAll(): Promise<{ name: string; env: Record<string, string>; keys: IssuedKey[] }> {
    const credentials = this.session.credentials.all();
    if (credentials.length === 0) throw new Error('no credentials: run "Till: Add Credential" first');
    const name = `Till agent ${++this.count}`;
    const keys: IssuedKey[] = [];
    const env: Record<string, string> = {};
    const seen = new Set<string>();
    for (const c of credentials) {
      if (seen.has(c.provider)) continue;
      seen.add(c.provider);
      const key = await this.session.connection.issue({ ...this.session.policySetting(SETTINGS.issuePolicy), target: c.name, label: name, owner: this.session.owner });
      keys.push(key);
      Object.assign(env, key.env);
    }
    return { name, env, keys };
  }

  async open(): Promise<vscode.Terminal> {
    const { name, env, keys } = await this.issueAll();
    const terminal = vscode.window.createTerminal({ name, env, iconPath: new vscode.ThemeIcon('key') });
    this.byTerminal.set(terminal, keys);
    terminal.show();
    return terminal;
  }

  /** For the terminal profile: the terminal is created by VS Code; it is matched when it opens. */
  async profile(): Promise<vscode.TerminalProfile> {
    const { name, env, keys } = await this.issueAll();
    this.pendingProfiles.set(keys[0]!.key, keys);
    return new vscode.TerminalProfile({ name, env, iconPath: new vscode.ThemeIcon('key') });
  }

  private adopt(terminal: vscode.Terminal): void {
    const env = (terminal.creationOptions as vscode.TerminalOptions).env ?? {};
    for (const [marker, keys] of this.pendingProfiles) {
      if (Object.values(env).includes(marker)) {
        this.pendingProfiles.delete(marker);
        this.byTerminal.set(terminal, keys);
      }
    }
  }

  private closed(terminal: vscode.Terminal): void {
    const keys = this.byTerminal.get(terminal);
    if (!keys) return;
    this.byTerminal.delete(terminal);
    for (const k of keys) this.session.revokeLater(k.id);
  }

  dispose(): void {
    for (const d of this.subscriptions) d.dispose();
    for (const keys of [...this.byTerminal.values(), ...this.pendingProfiles.values()]) {
      for (const k of keys) this.session.revokeLater(k.id);
    }
    this.byTerminal.clear();
    this.pendingProfiles.clear();
  }
}
