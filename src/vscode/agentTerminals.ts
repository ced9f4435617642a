/**
 * "Till: Open Agent Terminal" and the matching terminal profile: a terminal with its own fresh
 * till keys, revoked when the terminal closes. For a named agent (Claude Code, Codex CLI, …) the
 * terminal is set up so the agent goes through Till unchanged (see ../core/agents), with any
 * files it needs in a folder under the data folder, removed when the terminal closes.
 */
import { rmSync } from 'node:fs';
import * as vscode from 'vscode';
import { AGENTS, agentSetup, agentTargets, newAgentScratchDir, type AgentName } from '../core/agents/agents';
import type { IssuedKey } from '../core/runtime/controlApi';
import { SETTINGS } from './constants';
import type { TillSession } from './session';

export class AgentTerminals implements vscode.Disposable {
  private readonly byTerminal = new Map<vscode.Terminal, IssuedKey[]>();
  /** Folders written for an agent terminal, removed when it closes. */
  private readonly scratchDirs = new Map<vscode.Terminal, string>();
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

  /** Issues a key from each target with the Issue Key default limits; on a failure, revokes those already issued. */
  private async issueKeys(targets: string[], name: string): Promise<IssuedKey[]> {
    const policy = this.session.policySetting(SETTINGS.issuePolicy);
    const keys: IssuedKey[] = [];
    try {
      for (const target of targets)
        keys.push(await this.session.connection.issue({ ...policy, target, label: name, owner: this.session.owner }));
      return keys;
    } catch (err) {
      for (const k of keys) this.session.revokeLater(k.id);
      throw err;
    }
  }

  /** Issues a key per provider (its first credential) and returns the env, the keys and the terminal's name. */
  private async issueAll(): Promise<{ name: string; env: Record<string, string>; keys: IssuedKey[]; scratch?: undefined }> {
    const credentials = this.session.credentials.all();
    if (credentials.length === 0) throw new Error('no credentials: run "Till: Add Credential" first');
    const name = `Till agent ${++this.count}`;
    const firstPerProvider = credentials.filter((c, i) => credentials.findIndex((o) => o.provider === c.provider) === i);
    const keys = await this.issueKeys(
      firstPerProvider.map((c) => c.name),
      name,
    );
    return { name, env: Object.assign({}, ...keys.map((k) => k.env)) as Record<string, string>, keys };
  }

  /** Issues the keys an agent needs and writes its setup into a fresh folder under the data folder. */
  private async issueForAgent(
    agent: AgentName,
  ): Promise<{ name: string; env: Record<string, string>; keys: IssuedKey[]; scratch: string }> {
    const targets = agentTargets(agent, this.session.credentials.all());
    const name = `Till agent ${++this.count} (${AGENTS[agent].describe})`;
    const keys = await this.issueKeys(targets, name);
    let scratch: string | undefined;
    try {
      scratch = newAgentScratchDir(this.session.paths.home);
      const { env, warnings } = agentSetup(agent, keys, { scratchDir: scratch });
      for (const warning of warnings) void this.session.prompter.message('warning', `Till: ${warning}`, []);
      // Variables that would take priority over Till's are blanked in the terminal (null unsets).
      for (const unset of AGENTS[agent].unset ?? []) (env as Record<string, string | null>)[unset] = null;
      return { name, env, keys, scratch };
    } catch (err) {
      if (scratch) rmSync(scratch, { recursive: true, force: true });
      for (const k of keys) this.session.revokeLater(k.id);
      throw err;
    }
  }

  /** Opens a terminal with fresh keys: for every credential, or set up for one agent. */
  async open(agent?: AgentName): Promise<vscode.Terminal> {
    const { name, env, keys, scratch } = agent === undefined ? await this.issueAll() : await this.issueForAgent(agent);
    const terminal = vscode.window.createTerminal({ name, env, iconPath: new vscode.ThemeIcon('key') });
    this.byTerminal.set(terminal, keys);
    if (scratch) this.scratchDirs.set(terminal, scratch);
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
    const scratch = this.scratchDirs.get(terminal);
    if (scratch) {
      this.scratchDirs.delete(terminal);
      rmSync(scratch, { recursive: true, force: true });
    }
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
    for (const dir of this.scratchDirs.values()) rmSync(dir, { recursive: true, force: true });
    this.scratchDirs.clear();
  }
}
