/**
 * The VS Code entry point. Activation only registers: the broker starts (or is attached to)
 * when a credential exists or a key is issued. The extension adapts VS Code to the core and
 * shows what the core emits; it holds no policy logic.
 */
import { join } from 'node:path';
import * as vscode from 'vscode';
import type { TillConnection } from '../core/runtime/connection';
import { changesKeys } from '../core/events';
import { AgentTerminals } from './agentTerminals';
import { registerCommands } from './commands';
import { AGENT_TERMINAL_PROFILE, COMMANDS, CONTEXT, KEYS_VIEW, SETTINGS, USAGE_VIEW } from './constants';
import { KeysTreeProvider } from './keysTree';
import { DisposableStore } from './lifecycle';
import { Notifier } from './notifier';
import type { Prompter } from './prompter';
import { TillSession } from './session';
import { TillStatusBar } from './statusBar';
import { TerminalEnv } from './terminalEnv';
import { writeTillLauncher } from './tillOnPath';
import { UsageViewProvider } from './usageView';

/** What `activate` returns: for other extensions and for the extension-host tests. */
export interface TillApi {
  readonly session: TillSession;
  /** The live connection (it changes on "Till: Restart Broker"). */
  connection(): TillConnection;
  /** Replaces the prompter (tests answer the questions with a script). */
  setPrompter(prompter: Prompter): void;
  /** Resolves once the broker is reachable (started or attached). */
  ready(): Promise<void>;
  /** The key ids this window put into terminal env vars. */
  terminalKeyIds(): string[];
  /** Names of open terminals holding a terminal key revoked since they started. */
  staleTerminals(): string[];
  /** How many open terminals started with this key. */
  terminalsHolding(id: string): number;
  /** The Keys tree's data, as VS Code sees it. */
  readonly tree: Pick<vscode.TreeDataProvider<unknown>, 'getChildren' | 'getTreeItem'>;
}

let store: DisposableStore | undefined;
let activeSession: TillSession | undefined;

export function activate(context: vscode.ExtensionContext): TillApi {
  const started = performance.now();
  store = new DisposableStore();
  context.subscriptions.push(store);
  const log = store.add(vscode.window.createOutputChannel('Till', { log: true }));
  try {
    return wire(context, store, log, started);
  } catch (err) {
    const message = (err as Error).message;
    log.error(`activation failed: ${message}`);
    void vscode.window.showErrorMessage(`Till could not start: ${message}`, 'Show Log').then((c) => c && log.show());
    throw err;
  }
}

function wire(context: vscode.ExtensionContext, store: DisposableStore, log: vscode.LogOutputChannel, started: number): TillApi {
  // Kept at module level too, for deactivate().
  const session = (activeSession = store.add(new TillSession(log, context.secrets)));
  const tree = store.add(new KeysTreeProvider(session));
  store.add(vscode.window.createTreeView(KEYS_VIEW, { treeDataProvider: tree, showCollapseAll: false }));
  const status = store.add(new TillStatusBar(session));
  const terminals = store.add(new TerminalEnv(session, context.environmentVariableCollection, tillLauncher(context, session)));
  const agents = store.add(new AgentTerminals(session));
  const notifier = new Notifier(session);
  // One read of the credential list per state the page is sent.
  const facts = () => {
    const all = session.credentials.all();
    return { hasCredential: all.length > 0, placement: session.placement(all) };
  };
  const usage = store.add(new UsageViewProvider(context.extensionUri, () => session.connection, facts));
  const dashboard = store.add(new UsageViewProvider(context.extensionUri, () => session.connection, facts, 'editor'));
  store.add(vscode.window.registerWebviewViewProvider(USAGE_VIEW, usage, { webviewOptions: { retainContextWhenHidden: false } }));
  store.add(vscode.window.registerTerminalProfileProvider(AGENT_TERMINAL_PROFILE, { provideTerminalProfile: () => agents.profile() }));
  registerCommands(store, { session, tree, agents, terminals, dashboard });

  /** Refreshes the tree and the welcome view's context; returns whether any credential is stored (one read of the list). */
  const refreshViews = (): boolean => {
    tree.refresh();
    const has = session.credentials.all().length > 0;
    void vscode.commands.executeCommand('setContext', CONTEXT.hasCredential, has);
    return has;
  };
  const onTreeLoaded = tree.onDidChangeTreeData(() => status.update(tree.current()));
  store.add(onTreeLoaded);

  /** Follows a connection's events and role; replaced on restart. */
  let unfollow: (() => void) | undefined;
  const follow = (connection: TillConnection) => {
    unfollow?.();
    const offEvent = connection.onEvent((e) => {
      if (changesKeys(e)) tree.refresh();
      usage.onEvent(e);
      dashboard.onEvent(e);
      terminals.handle(e);
      notifier.handle(e, () => tree.current());
    });
    const offRole = connection.onRole((role) => {
      usage.onRole(role);
      dashboard.onRole(role);
      log.info(
        role === 'host'
          ? `broker running in this window at ${connection.url}`
          : role === 'attached'
            ? `attached to the broker at ${connection.url}`
            : 'broker connection lost',
      );
      refreshViews();
      status.update(tree.current());
      if (role !== 'down') void terminals.sync();
    });
    unfollow = () => {
      offEvent();
      offRole();
    };
  };
  follow(session.connection);
  store.add(() => unfollow?.());
  store.add(session.onConnectionChanged(follow));

  let readyPromise: Promise<void> | undefined;
  const ready = () => {
    readyPromise ??= session.connection.connect().catch((err: unknown) => {
      readyPromise = undefined;
      const message = (err as Error).message;
      log.error(`broker: ${message}`);
      void vscode.window.showErrorMessage(`Till: the broker could not start: ${message}`, 'Show Log').then((c) => c && log.show());
      throw err;
    });
    return readyPromise;
  };
  store.add(
    session.onCredentialsChanged(() => {
      usage.credentialsChanged();
      dashboard.credentialsChanged();
      if (refreshViews())
        void ready().then(
          () => terminals.sync(),
          () => undefined,
        );
      else void terminals.sync();
    }),
  );
  store.add(
    vscode.workspace.onDidChangeConfiguration((e) => {
      if (e.affectsConfiguration(`${SETTINGS.section}.terminal`)) void terminals.sync();
      const setting = (name: string) => e.affectsConfiguration(`${SETTINGS.section}.${name}`);
      if (setting(SETTINGS.upstreams) || setting(SETTINGS.prices) || setting(SETTINGS.brokerPort))
        applyBrokerSettings(session, setting(SETTINGS.brokerPort));
    }),
  );

  // The broker starts only when there is something to broker.
  if (refreshViews()) void ready().catch(() => undefined);
  log.info(`activated in ${(performance.now() - started).toFixed(1)} ms; data folder ${session.paths.home}`);

  return {
    session,
    connection: () => session.connection,
    setPrompter: (p) => (session.prompter = p),
    ready,
    terminalKeyIds: () => terminals.keyIds(),
    staleTerminals: () => terminals.staleTerminals().map((t) => t.name),
    terminalsHolding: (id) => terminals.terminalsHolding(id),
    tree: tree,
  };
}

/**
 * Upstreams and prices apply to the running broker at once (keys, base URLs and streams in
 * flight stay); a new port takes a restart, which the user is offered now rather than left to
 * find out.
 */
function applyBrokerSettings(session: TillSession, portChanged: boolean): void {
  const settings = session.brokerSettings();
  let where: ReturnType<TillConnection['reconfigure']>;
  try {
    where = session.connection.reconfigure(settings);
  } catch (err) {
    void vscode.window.showErrorMessage(`Till: the setting was not applied: ${(err as Error).message}`);
    return;
  }
  session.log.info(
    `settings: upstreams and prices ${where === 'applied' ? 'applied to the running broker' : where === 'elsewhere' ? 'not applied: another process runs the broker' : 'kept for when the broker starts'}`,
  );
  if (where === 'applied' && !portChanged)
    vscode.window.setStatusBarMessage('$(check) Till: new upstreams and prices apply to the next requests', 5000);
  if (where === 'elsewhere') {
    void vscode.window.showInformationMessage(
      'Till: this window uses a broker another process runs (`till serve` or another window). It keeps its own settings until it restarts.',
    );
  }
  if (portChanged && where === 'applied') {
    const url = session.connection.url ?? '';
    void vscode.window
      .showInformationMessage(
        `Till: the broker moves to port ${settings.port} when it restarts (now ${url}). Keys stay valid; new terminals get the new address; requests in flight end.`,
        'Restart Broker',
      )
      .then((choice) => choice && vscode.commands.executeCommand(COMMANDS.restartBroker));
  }
}

/** Revokes this window's terminal keys, then stops (or detaches from) the broker. */
/** The folder of the `till` launcher for terminals, or undefined (logged) when it cannot be written. */
function tillLauncher(context: vscode.ExtensionContext, session: TillSession): string | undefined {
  try {
    return writeTillLauncher(
      join(context.globalStorageUri.fsPath, 'bin'),
      join(context.extensionPath, 'dist', 'till.js'),
      session.paths.home,
    );
  } catch (err) {
    session.log.warn(`the \`till\` command is not on the terminals' PATH: ${(err as Error).message}`);
    return undefined;
  }
}

export async function deactivate(): Promise<void> {
  const closing = store;
  store = undefined;
  closing?.dispose();
  await activeSession?.closed;
  activeSession = undefined;
}
