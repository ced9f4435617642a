/**
 * Integrated terminals get, for each stored credential, the provider's key and base-URL
 * variables holding a till key issued for this window (never the credential), and the setup of
 * the agents named in `till.terminal.agents` that those keys can serve (e.g. Claude Code's
 * `CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC`, Codex's `CODEX_HOME`). The variables are not
 * persisted: the keys die with the window.
 */
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { delimiter, join } from 'node:path';
import * as vscode from 'vscode';
import { AGENTS, agentServed, agentSetup, isAgentName, newAgentScratchDir, type AgentName } from '../core/agents/agents';
import type { TillEvent } from '../core/events';
import type { IssuedKey } from '../core/runtime/controlApi';
import { SETTINGS, TERMINAL_AGENTS_DEFAULT } from './constants';
import type { TillSession } from './session';

/** A stretch of time (ms since the epoch); open-ended until `until` is set. */
interface Span {
  from: number;
  until?: number;
}

export class TerminalEnv implements vscode.Disposable {
  /** Our terminal key per provider. */
  private readonly keys = new Map<string, IssuedKey>();
  /** Variables set for agents beyond the providers' own, taken back when no longer wanted. */
  private agentVars = new Set<string>();
  /** The agents terminals are set up for now. */
  private agents: AgentName[] = [];
  /** Where Codex's config.toml for this window's terminals lives, once written. */
  private scratch: string | undefined;
  private syncing: Promise<void> = Promise.resolve();
  /**
   * When each terminal's process may have taken its environment: from when VS Code reported the
   * terminal open to when its process id arrived (until then, any time from now on). A terminal
   * opened in an untrusted folder waits for trust, so its process can start well after it opened.
   */
  private readonly opened = new Map<vscode.Terminal, Span>();
  /** When each terminal key went into the collection and, once replaced, came out. */
  private readonly inCollection = new Map<string, Span>();
  /** Terminal keys revoked (terminals opened while they were in the collection hold them). */
  private readonly revoked = new Set<string>();
  private readonly listeners: vscode.Disposable[];

  /** Whether the launcher's folder is on the terminals' PATH now. */
  private onPath = false;

  /** `tillBin`: the folder holding the `till` launcher (tillOnPath.ts), put first on PATH while terminals get keys. */
  constructor(
    private readonly session: TillSession,
    private readonly collection: vscode.GlobalEnvironmentVariableCollection,
    private readonly tillBin?: string,
  ) {
    collection.persistent = false;
    this.listeners = [
      vscode.window.onDidOpenTerminal((t) => this.watchStart(t)),
      vscode.window.onDidCloseTerminal((t) => this.opened.delete(t)),
      vscode.workspace.onDidGrantWorkspaceTrust(() => void this.sync()),
    ];
    this.describe();
  }

  private watchStart(terminal: vscode.Terminal): void {
    const window: Span = { from: Date.now() };
    this.opened.set(terminal, window);
    void Promise.resolve(terminal.processId).then(
      () => (window.until = Date.now()),
      () => {},
    );
  }

  private describe(): void {
    const providers = [...this.keys.keys()];
    const agents = this.agents.length ? ` Set up for ${this.agents.map((a) => AGENTS[a].describe).join(', ')}.` : '';
    const stale = this.staleTerminals().length;
    // VS Code shows this on the terminals it flags as needing a relaunch (the collection changed).
    const relaunch = stale
      ? ` ${stale} open terminal${stale === 1 ? ' holds' : 's hold'} a revoked till key: relaunch ${stale === 1 ? 'it' : 'them'} to get the new one.`
      : '';
    this.collection.description = providers.length
      ? `Till: till keys and the local broker's URL for ${providers.join(', ')}.${agents}${this.onPath ? ' The `till` command is on PATH.' : ''}${relaunch} Your real API keys never reach a terminal.`
      : this.restricted()
        ? 'Till: no till keys in terminals of this untrusted workspace (they get one once you trust it).'
        : `Till: no till keys in terminals (add a credential to get some).${relaunch}`;
  }

  /**
   * Restricted Mode: a workspace the user has not trusted gets no terminal key. VS Code starts
   * no terminal or task there (opening one asks for trust first); the key is issued on the grant.
   */
  private restricted(): boolean {
    return !vscode.workspace.isTrusted;
  }

  /** Open terminals holding a terminal key that was revoked since they started. */
  staleTerminals(): vscode.Terminal[] {
    return vscode.window.terminals.filter((t) => [...this.revoked].some((id) => this.holds(t, id)));
  }

  /** How many open terminals started with this key. */
  terminalsHolding(id: string): number {
    return vscode.window.terminals.filter((t) => this.holds(t, id)).length;
  }

  /**
   * Whether a terminal's process may have started while the key was in the collection (its
   * start window and the key's span overlap). One never reported open (it was open before Till
   * was, or its report is late) is counted: the safe side for a question and a warning.
   */
  private holds(terminal: vscode.Terminal, id: string): boolean {
    const span = this.inCollection.get(id);
    if (!span) return false;
    const start = this.opened.get(terminal);
    if (start === undefined) return true;
    return start.from < (span.until ?? Infinity) && (start.until ?? Infinity) >= span.from;
  }

  /** Sets the agent variables for the keys terminals hold now, and takes back the rest. */
  private applyAgents(): void {
    const keys = [...this.keys.values()];
    const named = vscode.workspace.getConfiguration(SETTINGS.section).get<string[]>(SETTINGS.terminalAgents, TERMINAL_AGENTS_DEFAULT);
    const agents = named.filter(isAgentName).filter((a) => agentServed(a, this.keys.keys()));
    const env: Record<string, string> = {};
    // Codex and Gemini CLI read files of Till's, kept in a folder for this window's terminals.
    if (agents.length > 0) this.scratch ??= newAgentScratchDir(this.session.paths.home, 'terminals-');
    else this.removeScratch();
    const served: AgentName[] = [];
    for (const agent of agents) {
      try {
        const setup = agentSetup(agent, keys, { scratchDir: this.scratch! });
        for (const warning of setup.warnings) this.session.log.warn(`terminal setup: ${warning}`);
        Object.assign(env, setup.env);
        served.push(agent);
      } catch (err) {
        this.session.log.error(`terminal setup for ${AGENTS[agent].describe}: ${(err as Error).message}`);
      }
    }
    // Files of agents no longer set up go (agentSetup writes each agent's in a folder named after it).
    if (this.scratch && existsSync(this.scratch)) {
      for (const name of readdirSync(this.scratch))
        if (!served.includes(name as AgentName)) rmSync(join(this.scratch, name), { recursive: true, force: true });
    }
    const providerVars = new Set(keys.flatMap((k) => Object.keys(k.env)));
    for (const name of this.agentVars) if (!(name in env) && !providerVars.has(name)) this.collection.delete(name);
    this.agentVars = new Set(Object.keys(env).filter((name) => !providerVars.has(name)));
    for (const name of this.agentVars) this.collection.replace(name, env[name]!);
    this.agents = served;
  }

  private removeScratch(): void {
    if (this.scratch) rmSync(this.scratch, { recursive: true, force: true });
    this.scratch = undefined;
  }

  /** Brings the variables in line with the credentials and settings. Serialized. */
  sync(): Promise<void> {
    this.syncing = this.syncing
      .then(() => this.doSync())
      .catch((err: unknown) => this.session.log.error(`terminal keys: ${(err as Error).message}`));
    return this.syncing;
  }

  /** Whether Till puts anything in terminals: injection on, in a trusted workspace. */
  private injecting(): boolean {
    return vscode.workspace.getConfiguration(SETTINGS.section).get<boolean>(SETTINGS.terminalInject, true) && !this.restricted();
  }

  /** The `till` command first on PATH while Till puts anything in terminals. */
  private applyPath(): void {
    const want = this.tillBin !== undefined && this.injecting();
    if (want === this.onPath) return;
    if (want) this.collection.prepend('PATH', this.tillBin + delimiter);
    else this.collection.delete('PATH');
    this.onPath = want;
  }

  private wanted(): Map<string, string> {
    const config = vscode.workspace.getConfiguration(SETTINGS.section);
    const byProvider = new Map<string, string>();
    if (!this.injecting()) return byProvider;
    const only = config.get<string[]>(SETTINGS.terminalProviders, []);
    for (const c of this.session.credentials.all()) {
      if (only.length > 0 && !only.includes(c.provider)) continue;
      if (!byProvider.has(c.provider)) byProvider.set(c.provider, c.name);
    }
    return byProvider;
  }

  private async doSync(): Promise<void> {
    const wanted = this.wanted();
    for (const [provider, key] of [...this.keys]) {
      if (wanted.get(provider) !== key.credential) this.drop(provider, true);
    }
    for (const [provider, credential] of wanted) {
      if (!this.keys.has(provider)) await this.issue(provider, credential);
    }
    this.applyAgents();
    this.applyPath();
    this.describe();
  }

  private async issue(provider: string, credential: string): Promise<void> {
    const folder = vscode.workspace.name ?? 'window';
    const key = await this.session.connection.issue({
      ...this.session.policySetting(SETTINGS.terminalPolicy),
      target: credential,
      label: `terminals · ${folder}`,
      owner: this.session.owner,
    });
    this.keys.set(provider, key);
    for (const [name, value] of Object.entries(key.env)) this.collection.replace(name, value);
    this.inCollection.set(key.id, { from: Date.now() });
  }

  private drop(provider: string, revoke: boolean): void {
    const key = this.keys.get(provider);
    if (!key) return;
    this.keys.delete(provider);
    for (const name of Object.keys(key.env)) this.collection.delete(name);
    const span = this.inCollection.get(key.id);
    if (span) span.until = Date.now();
    if (revoke) this.session.revokeLater(key.id);
  }

  /**
   * Ended keys are replaced: new terminals get a fresh one. Terminals opened with a revoked key
   * are told apart (the collection's description, which VS Code shows on them) and the user is
   * told how many there are.
   */
  handle(e: TillEvent): void {
    if (e.type !== 'key.exhausted' && e.type !== 'key.expired' && e.type !== 'key.revoked') return;
    const entry = [...this.keys].find(([, k]) => k.id === e.key.id);
    if (!entry) return;
    const [provider] = entry;
    if (e.type === 'key.revoked') this.revoked.add(e.key.id);
    this.drop(provider, false);
    void this.sync().then(() => {
      const holding = e.type === 'key.revoked' ? this.terminalsHolding(e.key.id) : 0;
      if (holding === 0) return;
      void this.session.prompter.message(
        'warning',
        `Till: ${holding} open terminal${holding === 1 ? ' holds' : 's hold'} the revoked key "${e.key.label}". New terminals get a fresh key; relaunch ${holding === 1 ? 'that one' : 'those'} to use it.`,
        [],
      );
    });
  }

  /** The key ids this window put into terminals. */
  keyIds(): string[] {
    return [...this.keys.values()].map((k) => k.id);
  }

  dispose(): void {
    for (const l of this.listeners) l.dispose();
    const ids = this.keyIds();
    this.keys.clear();
    this.collection.clear();
    this.removeScratch();
    for (const id of ids) this.session.revokeLater(id);
  }
}
