/**
 * The command table: every command the extension declares, in one place, registered by one
 * registrar that pushes each disposable to the extension's subscriptions.
 *
 * Commands accept optional arguments so scripts and tests can skip the questions; without
 * them they ask through the session's prompter.
 */
import * as vscode from 'vscode';
import { isAgentName, type AgentName } from '../core/agents/agents';
import type { KeySummary } from '../core/events';
import { parseDuration, type PolicyInput } from '../core/policy/policy';
import { VaultError } from '../core/credentials/vault';
import { providerBaseUrl, ProviderRegistry } from '../core/providers/providers';
import type { IssuedKey, IssueInput } from '../core/runtime/controlApi';
import type { AgentTerminals } from './agentTerminals';
import { COMMANDS, SETTINGS, VIEW_CONTAINER } from './constants';
import type { KeysTreeProvider } from './keysTree';
import type { DisposableStore } from './lifecycle';
import type { TillSession } from './session';
import type { TerminalEnv } from './terminalEnv';
import type { UsageViewProvider } from './usageView';

export interface CommandDeps {
  session: TillSession;
  tree: KeysTreeProvider;
  agents: AgentTerminals;
  terminals: TerminalEnv;
  dashboard: UsageViewProvider;
}

/** Presets offered by Issue Key; "Custom…" asks for each limit. */
const PRESETS: { label: string; policy: PolicyInput }[] = [
  { label: '50 calls, 1 hour', policy: { uses: 50, ttl: '1h' } },
  { label: '200 calls, 8 hours', policy: { uses: 200, ttl: '8h' } },
  { label: '10 calls, 15 minutes', policy: { uses: 10, ttl: '15m' } },
  { label: '1,000 calls, 1 day', policy: { uses: 1000, ttl: '1d' } },
  { label: '$1 of spend, 8 hours', policy: { maxSpend: 1, ttl: '8h' } },
];

type TreeArg = { kind: 'key'; key: KeySummary } | undefined;

function keyIdOf(arg: unknown): string | undefined {
  if (typeof arg === 'string') return arg;
  const node = arg as TreeArg;
  return node?.kind === 'key' ? node.key.id : undefined;
}

let catalogue: ProviderRegistry | undefined;
/** The built-in providers (for names and base paths), made once, when first needed. */
function providers(): ProviderRegistry {
  return (catalogue ??= new ProviderRegistry([], {}, {}));
}

function numberOrUndefined(text: string): number | undefined {
  return text.trim() === '' ? undefined : Number(text.trim());
}

function listOrUndefined(text: string): string[] | undefined {
  const items = text
    .split(',')
    .map((s) => s.trim())
    .filter(Boolean);
  return items.length ? items : undefined;
}

async function addCredential(deps: CommandDeps, args?: { provider?: string; secret?: string; name?: string }): Promise<string | undefined> {
  const { session } = deps;
  const p = session.prompter;
  const provider =
    args?.provider ??
    (await p.pick(
      'Till: Add Credential',
      providers()
        .all()
        .map((pr) => ({ label: pr.displayName, description: pr.id, detail: pr.keyEnv.join(', '), value: pr.id })),
      'Which provider is the key for?',
    ));
  if (!provider) return undefined;
  const info = providers().get(provider);
  if (!info) throw new Error(`unknown provider "${provider}"`);
  const taken = new Set(session.credentials.all().map((c) => c.name));
  const name =
    args?.name ??
    (taken.has(provider)
      ? await p.input('Till: Credential name', { value: `${provider}-2`, prompt: `A credential named "${provider}" exists: name this one` })
      : provider);
  if (!name) return undefined;
  let store = session.newCredentialStore();
  const secret =
    args?.secret ??
    (await p.input(`Till: ${info.displayName} API key`, {
      password: true,
      prompt: `Stored in ${session.describeStore(store)}; never shown again, never put in a terminal.`,
    }));
  if (!secret) return undefined;
  try {
    await session.credentials.add(provider, secret.trim(), name, store);
  } catch (err) {
    if (store !== 'keychain' || !(err instanceof VaultError) || err.kind === 'missing') throw err;
    session.log.warn(`the OS keychain cannot keep "${name}": ${err.message}`);
    // No keychain to keep it (missing, locked, not answering): the user chooses, once; nothing is stored before.
    const other = "Use VS Code's Secret Storage";
    const choice = session.fallsBackToEditor()
      ? other
      : await p.message(
          'warning',
          `Till: the OS keychain cannot keep "${name}" (${err.message}). VS Code's secret storage can: on the desktop it is encrypted with the OS keychain's key when VS Code can reach one; in code-server and VS Code for the Web it is the browser's storage, which is weaker. Till never writes a key to a plain file.`,
          [other],
          true,
        );
    if (choice !== other) {
      void p.message(
        'info',
        `Till: nothing was stored. Unlock or start your OS keychain and run "Till: Add Credential" again, or set "till.${SETTINGS.credentialStore}" to "vscode".`,
        [],
      );
      return undefined;
    }
    if (!session.fallsBackToEditor())
      await vscode.workspace
        .getConfiguration(SETTINGS.section)
        .update(SETTINGS.credentialStore, 'vscode', vscode.ConfigurationTarget.Global);
    store = 'editor';
    await session.credentials.add(provider, secret.trim(), name, store);
  }
  session.credentialsChanged(name);
  await session.connection.connect();
  void p.message('info', `Till: stored "${name}" (${info.displayName}) in ${session.describeStore(store)}.`, []);
  return name;
}

/** Remove Credential's argument: a name (scripts; no question asked) or the tree's credential item (asks first). */
type RemoveArg = { name?: string } | { kind: 'credential'; credential: { name: string } } | undefined;

async function removeCredential(deps: CommandDeps, arg?: RemoveArg): Promise<void> {
  const { session } = deps;
  const fromTree = arg && 'kind' in arg ? arg.credential.name : undefined;
  const args = fromTree ? undefined : (arg as { name?: string } | undefined);
  const all = session.credentials.all();
  if (all.length === 0) {
    void session.prompter.message('info', 'Till: there are no credentials to remove.', []);
    return;
  }
  const name =
    args?.name ??
    fromTree ??
    (await session.prompter.pick(
      'Till: Remove Credential',
      all.map((c) => ({ label: c.name, description: c.provider, value: c.name })),
    ));
  if (!name) return;
  if (!args?.name) {
    const ok = await session.prompter.message(
      'warning',
      `Remove "${name}" from ${session.describeStore(session.credentials.storeOf(name))}? Till keys bound to it stop working.`,
      ['Remove'],
      true,
    );
    if (ok !== 'Remove') return;
  }
  const store = session.credentials.storeOf(name);
  await session.credentials.remove(name);
  session.credentialsChanged(name);
  void session.prompter.message('info', `Till: removed "${name}" from ${session.describeStore(store)}.`, []);
}

/** Move Credential: one credential to the other store (the OS keychain, VS Code's secret storage), after asking. */
async function moveCredential(deps: CommandDeps, arg?: RemoveArg): Promise<string | undefined> {
  const { session } = deps;
  const p = session.prompter;
  const fromTree = arg && 'kind' in arg ? arg.credential.name : undefined;
  const all = session.credentials.all();
  const name =
    (arg && !('kind' in arg) ? arg.name : fromTree) ??
    (all.length === 0
      ? undefined
      : await p.pick(
          'Till: Move Credential',
          all.map((c) => ({ label: c.name, description: session.describeStore(c.store ?? 'keychain'), value: c.name })),
        ));
  if (!name) return undefined;
  const from = session.credentials.storeOf(name);
  const to = from === 'editor' ? 'keychain' : 'editor';
  const ok = await p.message(
    'info',
    `Move "${name}" from ${session.describeStore(from)} to ${session.describeStore(to)}? Its till keys keep working.`,
    ['Move'],
    true,
  );
  if (ok !== 'Move') return undefined;
  await session.credentials.move(name, to);
  session.credentialsChanged(name);
  void p.message('info', `Till: "${name}" is now kept in ${session.describeStore(to)}.`, []);
  return to;
}

async function askPolicy(deps: CommandDeps): Promise<PolicyInput | undefined> {
  const p = deps.session.prompter;
  const defaults = deps.session.policySetting(SETTINGS.issuePolicy);
  const options: Array<{ label: string; description?: string; value: PolicyInput | 'custom' }> = [
    ...PRESETS.map((pr) => ({ label: pr.label, value: pr.policy })),
    { label: 'Custom…', description: 'uses, lifetime, rate, models, paths', value: 'custom' },
  ];
  const choice = await p.pick('Till: Issue Key: limits', options, 'How much may this key do?');
  if (choice !== 'custom') return choice;
  const wholeOrEmpty = (v: string) => (v.trim() === '' || /^\d+$/.test(v.trim()) ? undefined : 'a whole number, or empty');
  const uses = await p.input('Till: calls allowed', {
    value: defaults.uses?.toString() ?? '',
    prompt: 'Billable calls; empty for unlimited',
    validate: wholeOrEmpty,
  });
  if (uses === undefined) return undefined;
  const ttl = await p.input('Till: lifetime', {
    value: String(defaults.ttl ?? '1h'),
    prompt: 'e.g. 30m, 8h, 7d; empty for no expiry',
    validate: (v) => {
      if (!v.trim()) return undefined;
      try {
        parseDuration(v);
        return undefined;
      } catch (err) {
        return (err as Error).message;
      }
    },
  });
  if (ttl === undefined) return undefined;
  const rpm = await p.input('Till: requests per minute', { prompt: 'Empty for no rate limit', validate: wholeOrEmpty });
  if (rpm === undefined) return undefined;
  const tokens = await p.input('Till: token limit', { prompt: 'Input + output tokens; empty for no limit', validate: wholeOrEmpty });
  if (tokens === undefined) return undefined;
  const spend = await p.input('Till: spend limit (US dollars)', {
    prompt: "e.g. 1.50, at Till's price table; empty for no limit",
    validate: (v) => (v.trim() === '' || /^\$?\d+(\.\d+)?$/.test(v.trim()) ? undefined : 'an amount such as 1.50, or empty'),
  });
  if (spend === undefined) return undefined;
  const models = await p.input('Till: allowed models', { prompt: 'Comma-separated, * wildcards (e.g. gpt-4o*, claude-*); empty for any' });
  if (models === undefined) return undefined;
  const paths = await p.input('Till: allowed paths', { prompt: 'Comma-separated, * wildcards (e.g. /v1/chat/*); empty for any' });
  if (paths === undefined) return undefined;
  const policy: PolicyInput = {};
  const n = numberOrUndefined(uses);
  if (n !== undefined) policy.uses = n;
  if (ttl.trim()) policy.ttl = ttl.trim();
  const r = numberOrUndefined(rpm);
  if (r !== undefined) policy.rpm = r;
  const t = numberOrUndefined(tokens);
  if (t !== undefined) policy.maxTokens = t;
  const d = numberOrUndefined(spend.replace('$', ''));
  if (d !== undefined) policy.maxSpend = d;
  const m = listOrUndefined(models);
  if (m) policy.models = m;
  const pa = listOrUndefined(paths);
  if (pa) policy.paths = pa;
  return policy;
}

/** `export NAME=value` lines for a shell, or `NAME=value` for a .env file. */
function envText(key: IssuedKey, style: 'shell' | 'dotenv'): string {
  return Object.entries(key.env)
    .map(([name, value]) => (style === 'shell' ? `export ${name}=${value}` : `${name}=${value}`))
    .join('\n');
}

async function issueKey(deps: CommandDeps, args?: Partial<IssueInput>): Promise<IssuedKey | undefined> {
  const { session } = deps;
  const p = session.prompter;
  let credentials = session.credentials.all();
  if (credentials.length === 0 && !args?.target) {
    const go = await p.message('info', 'Till: add a credential (a real API key, kept in the OS keychain) before issuing till keys.', [
      'Add Credential',
    ]);
    if (go !== 'Add Credential') return undefined;
    if (!(await addCredential(deps))) return undefined;
    credentials = session.credentials.all();
  }
  const target =
    args?.target ??
    (credentials.length === 1
      ? credentials[0]!.name
      : await p.pick(
          'Till: Issue Key: credential',
          credentials.map((c) => ({ label: c.name, description: c.provider, value: c.name })),
          'Which credential does the key stand in for?',
        ));
  if (!target) return undefined;
  const policy = args?.target ? args : await askPolicy(deps);
  if (!policy) return undefined;
  const provider = credentials.find((c) => c.name === target)?.provider ?? target;
  const label =
    args?.label ??
    (args?.target
      ? undefined
      : await p.input('Till: Issue Key: label', { value: `${provider} agent`, prompt: 'A name to recognise the key by' }));
  if (label === undefined && !args?.target) return undefined;
  const issued = await session.connection.issue({ ...policy, target, label, owner: session.owner });
  deps.tree.refresh();
  if (!args?.target) void offerCopies(deps, issued);
  return issued;
}

/** What each copy button puts on the clipboard, and what the confirmation calls it. */
const COPIES: { button: string; what: string; text: (key: IssuedKey) => string }[] = [
  { button: 'Copy Key', what: 'the key', text: (k) => k.key },
  { button: 'Copy as env', what: 'export lines for a shell', text: (k) => envText(k, 'shell') },
  { button: 'Copy as .env', what: '.env lines', text: (k) => envText(k, 'dotenv') },
  { button: 'Copy Base URL', what: 'the base URL', text: (k) => k.baseUrl },
];

/**
 * Shows the key once (the broker keeps only its hash), with copy buttons, until dismissed;
 * each copy is confirmed in the message that comes back.
 */
async function offerCopies(deps: CommandDeps, issued: IssuedKey): Promise<void> {
  const shown = `Till key "${issued.label}" issued: ${issued.key} (base URL ${issued.baseUrl}). It is shown only now: copy what you need.`;
  let text = shown;
  for (let i = 0; i < 10; i++) {
    const choice = await deps.session.prompter.message(
      'info',
      text,
      COPIES.map((c) => c.button),
    );
    const copy = COPIES.find((c) => c.button === choice);
    if (!copy) return;
    await vscode.env.clipboard.writeText(copy.text(issued));
    text = `Copied ${copy.what} to the clipboard. ${shown}`;
    vscode.window.setStatusBarMessage(`$(check) Till: copied ${copy.what}`, 3000);
  }
}

async function revokeKey(deps: CommandDeps, arg?: unknown): Promise<boolean> {
  const { session } = deps;
  const keys = await session.connection.list();
  let id = keyIdOf(arg);
  if (!id) {
    const live = keys.filter((k) => k.state === 'active');
    if (live.length === 0) {
      void session.prompter.message('info', 'Till: no live keys to revoke.', []);
      return false;
    }
    id = await session.prompter.pick(
      'Till: Revoke Key',
      live.map((k) => ({ label: k.label, description: `${k.provider} · ${k.id}`, value: k.id })),
    );
    if (!id) return false;
  }
  const key = keys.find((k) => k.id === id);
  if (key && !(await confirmRevokeInUse(deps, key))) return false;
  const revoked = await session.connection.revoke(id);
  deps.tree.refresh();
  const name = key ? `"${key.label}"` : id;
  void session.prompter.message(
    'info',
    revoked ? `Till: revoked ${name}. Requests with it are refused from now on, streams included.` : `Till: ${name} had already ended.`,
    [],
  );
  return revoked;
}

/**
 * Revoking a key that terminals or requests in flight use stops them at once: asked once,
 * unless `till.revoke.confirmInUse` is off (the modal's second button turns it off).
 */
async function confirmRevokeInUse(deps: CommandDeps, key: KeySummary): Promise<boolean> {
  const config = vscode.workspace.getConfiguration(SETTINGS.section);
  if (key.state !== 'active' || !config.get<boolean>(SETTINGS.confirmRevokeInUse, true)) return true;
  const terminals = deps.terminals.terminalsHolding(key.id);
  const uses = [
    terminals ? `${terminals} open terminal${terminals === 1 ? '' : 's'}` : '',
    key.inFlight ? `${key.inFlight} request${key.inFlight === 1 ? '' : 's'} in flight` : '',
  ].filter(Boolean);
  if (uses.length === 0) return true;
  const always = "Revoke, Don't Ask Again";
  const choice = await deps.session.prompter.message(
    'warning',
    `Revoke "${key.label}"? It is in use by ${uses.join(' and ')}; they stop at once.`,
    ['Revoke', always],
    true,
  );
  if (choice === always) await config.update(SETTINGS.confirmRevokeInUse, false, vscode.ConfigurationTarget.Global);
  return choice === 'Revoke' || choice === always;
}

async function revokeAll(deps: CommandDeps): Promise<number> {
  const { session } = deps;
  const ok = await session.prompter.message(
    'warning',
    'Revoke every till key now? Agents using them stop at once, streams included.',
    ['Revoke All'],
    true,
  );
  if (ok !== 'Revoke All') return 0;
  const n = await session.connection.revokeAll();
  deps.tree.refresh();
  void session.prompter.message('info', `Till: revoked ${n} key${n === 1 ? '' : 's'}.`, []);
  return n;
}

/** What Open Agent Terminal offers; the plain terminal first. */
const AGENT_PICKS: { label: string; description: string; value: AgentName | 'plain' }[] = [
  { label: 'Plain terminal (all credentials)', description: 'a till key for each provider in its env', value: 'plain' },
  { label: 'Claude Code', description: 'claude, through Till only', value: 'claude' },
  { label: 'Codex CLI', description: 'codex, with a Till provider over your config.toml', value: 'codex' },
  { label: 'Gemini CLI', description: 'gemini', value: 'gemini' },
  { label: 'aider', description: 'aider, with OpenAI and/or Anthropic keys', value: 'aider' },
];

/** Open Agent Terminal: `{ agent }` skips the question; `agent: 'plain'` is the all-credentials terminal. */
async function openAgentTerminal(deps: CommandDeps, args?: { agent?: string }): Promise<vscode.Terminal | undefined> {
  const choice = args?.agent ?? (await deps.session.prompter.pick('Till: Open Agent Terminal', AGENT_PICKS, 'Which agent will run in it?'));
  if (choice === undefined) return undefined;
  if (choice !== 'plain' && !isAgentName(choice))
    throw new Error(
      `unknown agent "${choice}": use plain, ${AGENT_PICKS.slice(1)
        .map((p) => p.value)
        .join(', ')}`,
    );
  const terminal = await deps.agents.open(choice === 'plain' ? undefined : choice);
  deps.tree.refresh();
  return terminal;
}

/** Every command, by id. */
function commandTable(deps: CommandDeps): Record<(typeof COMMANDS)[keyof typeof COMMANDS], (...args: unknown[]) => unknown> {
  const { session } = deps;
  return {
    [COMMANDS.addCredential]: (args) => addCredential(deps, args as Parameters<typeof addCredential>[1]),
    [COMMANDS.removeCredential]: (arg) => removeCredential(deps, arg as RemoveArg),
    [COMMANDS.moveCredential]: (arg) => moveCredential(deps, arg as RemoveArg),
    [COMMANDS.issueKey]: (args) => issueKey(deps, args as Partial<IssueInput> | undefined),
    [COMMANDS.revokeKey]: (arg) => revokeKey(deps, arg),
    [COMMANDS.revokeAll]: () => revokeAll(deps),
    [COMMANDS.copyKeyId]: async (arg) => {
      const id = keyIdOf(arg);
      if (id) await vscode.env.clipboard.writeText(id);
    },
    [COMMANDS.copyBaseUrl]: async (arg) => {
      const node = arg as TreeArg;
      const provider = node?.kind === 'key' ? node.key.provider : undefined;
      const url = session.connection.url;
      if (url)
        await vscode.env.clipboard.writeText(
          provider ? providerBaseUrl(url, providers().get(provider) ?? { id: provider, basePath: '' }) : url,
        );
    },
    [COMMANDS.openAgentTerminal]: (args) => openAgentTerminal(deps, args as { agent?: string } | undefined),
    [COMMANDS.showAuditLog]: async () => {
      const doc = await vscode.workspace.openTextDocument(vscode.Uri.file(session.paths.audit));
      await vscode.window.showTextDocument(doc, { preview: true });
    },
    [COMMANDS.restartBroker]: async () => {
      await session.restart();
      deps.tree.refresh();
      void session.prompter.message(
        'info',
        session.connection.role === 'host'
          ? `Till: broker restarted at ${session.connection.url}.`
          : `Till: reconnected to the broker at ${session.connection.url} (it runs in another window or \`till serve\`).`,
        [],
      );
    },
    [COMMANDS.showBrokerLog]: () => session.log.show(),
    [COMMANDS.refresh]: () => deps.tree.refresh(),
    [COMMANDS.openDashboard]: () => deps.dashboard.openPanel(),
    [COMMANDS.focusSidebar]: () => vscode.commands.executeCommand(`workbench.view.extension.${VIEW_CONTAINER}`),
  };
}

/** Registers the table; each command reports its failure instead of failing silently. */
export function registerCommands(store: DisposableStore, deps: CommandDeps): void {
  for (const [id, run] of Object.entries(commandTable(deps))) {
    store.add(
      vscode.commands.registerCommand(id, async (...args: unknown[]) => {
        try {
          return await run(...args);
        } catch (err) {
          const message = (err as Error).message;
          deps.session.log.error(`${id}: ${message}`);
          void vscode.window.showErrorMessage(`Till: ${message}`);
          return undefined;
        }
      }),
    );
  }
}
