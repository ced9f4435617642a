/**
 * The "Keys" tree: one item per till key, live keys first, ended ones (exhausted, expired,
 * revoked) in a group of their own, then the stored credentials (names and providers only;
 * each with Remove). Refreshed from broker events and credential changes.
 */
import * as vscode from 'vscode';
import type { CredentialInfo } from '../core/credentials/credentials';
import type { KeySummary } from '../core/events';
import { callsUsed, describePolicy, formatAmount, formatUsd, spendUsed, timeLeft } from '../core/keys/present';
import { COMMANDS, CONTEXT } from './constants';
import type { TillSession } from './session';

type Node =
  | { kind: 'key'; key: KeySummary }
  | { kind: 'ended'; keys: KeySummary[] }
  | { kind: 'credentials'; credentials: CredentialInfo[] }
  | { kind: 'credential'; credential: CredentialInfo }
  | { kind: 'noKeys' };

function usage(key: KeySummary): string {
  const calls = key.policy.maxActivations === undefined ? `${callsUsed(key)} calls` : callsUsed(key);
  const dollars =
    key.policy.maxSpendUsd !== undefined || (key.used.spend ?? 0) > 0 || key.spend.unpricedRequests > 0 ? ` · ${spendUsed(key)}` : '';
  const tokens =
    key.policy.maxTokens !== undefined
      ? ` · ${formatAmount('tokens', key.used.tokens ?? 0)}/${key.policy.maxTokens.toLocaleString('en-US')}`
      : '';
  return calls + tokens + dollars;
}

const STATE_ICON: Record<KeySummary['state'], [string, string]> = {
  active: ['key', 'charts.green'],
  exhausted: ['circle-slash', 'charts.orange'],
  expired: ['watch', 'disabledForeground'],
  revoked: ['close', 'charts.red'],
};

export class KeysTreeProvider implements vscode.TreeDataProvider<Node>, vscode.Disposable {
  private readonly changed = new vscode.EventEmitter<Node | undefined>();
  readonly onDidChangeTreeData = this.changed.event;
  private keys: KeySummary[] = [];
  private pending: NodeJS.Timeout | undefined;
  private readonly ticker: NodeJS.Timeout;

  constructor(private readonly session: TillSession) {
    // Time left changes without events.
    this.ticker = setInterval(() => this.refresh(), 30_000);
  }

  /** Re-reads the keys, at most once per 100 ms however many events arrive. */
  refresh(): void {
    if (this.pending) return;
    this.pending = setTimeout(() => {
      this.pending = undefined;
      void this.load();
    }, 100);
  }

  private async load(): Promise<void> {
    try {
      this.keys = this.session.connection.role === 'down' ? [] : await this.session.connection.list();
    } catch (err) {
      this.session.log.warn(`could not list keys: ${(err as Error).message}`);
      this.keys = [];
    }
    void vscode.commands.executeCommand('setContext', CONTEXT.hasKey, this.keys.length > 0);
    this.changed.fire(undefined);
  }

  /** The keys as last loaded (for commands that pick one). */
  current(): KeySummary[] {
    return this.keys;
  }

  getChildren(node?: Node): Node[] {
    if (node?.kind === 'ended') return node.keys.map((key) => ({ kind: 'key', key }));
    if (node?.kind === 'credentials') return node.credentials.map((credential) => ({ kind: 'credential', credential }));
    if (node) return [];
    // No credential: the tree stays empty so the welcome view's Add Credential is what shows.
    const credentials = this.session.credentials.all();
    if (credentials.length === 0) return [];
    const byNewest = [...this.keys].sort((a, b) => b.createdAt - a.createdAt);
    const nodes: Node[] = byNewest.filter((k) => k.state === 'active').map((key): Node => ({ kind: 'key', key }));
    if (nodes.length === 0) nodes.push({ kind: 'noKeys' });
    const ended = byNewest.filter((k) => k.state !== 'active');
    if (ended.length > 0) nodes.push({ kind: 'ended', keys: ended });
    nodes.push({ kind: 'credentials', credentials });
    return nodes;
  }

  getTreeItem(node: Node): vscode.TreeItem {
    if (node.kind === 'ended') {
      const item = new vscode.TreeItem(`Ended (${node.keys.length})`, vscode.TreeItemCollapsibleState.Collapsed);
      item.contextValue = 'till.endedGroup';
      item.iconPath = new vscode.ThemeIcon('history');
      return item;
    }
    if (node.kind === 'credentials') {
      const item = new vscode.TreeItem(`Credentials (${node.credentials.length})`, vscode.TreeItemCollapsibleState.Collapsed);
      item.id = 'till.credentials';
      item.contextValue = 'till.credentials';
      item.iconPath = new vscode.ThemeIcon('lock');
      const stores = [...new Set(node.credentials.map((c) => c.store ?? 'keychain'))].map((st) => this.session.describeStore(st));
      item.tooltip = `Your real API keys${stores.length ? `, kept in ${stores.join(' and ')}` : ''}. Till keys stand in for them; they are never shown. The broker runs on ${this.session.whereBrokerRuns()}.`;
      return item;
    }
    if (node.kind === 'credential') {
      const { name, provider, store = 'keychain' } = node.credential;
      const item = new vscode.TreeItem(name, vscode.TreeItemCollapsibleState.None);
      item.id = `till.credential.${name}`;
      item.description = store === 'editor' ? `${provider} · VS Code` : provider;
      item.contextValue = 'till.credential';
      item.iconPath = new vscode.ThemeIcon('lock-small');
      item.tooltip = `Credential "${name}" for ${provider}, in ${this.session.describeStore(store)}. Remove it to stop every till key bound to it.`;
      return item;
    }
    if (node.kind === 'noKeys') {
      const item = new vscode.TreeItem('No till keys yet: Issue Key…', vscode.TreeItemCollapsibleState.None);
      item.contextValue = 'till.noKeys';
      item.iconPath = new vscode.ThemeIcon('add');
      item.command = { command: COMMANDS.issueKey, title: 'Issue Key' };
      item.tooltip = 'Issue a scoped, limited till key. New integrated terminals already get one for each credential.';
      return item;
    }
    const key = node.key;
    const now = Date.now();
    const item = new vscode.TreeItem(key.label, vscode.TreeItemCollapsibleState.None);
    item.id = key.id;
    const parts = [key.provider, usage(key)];
    // Whole minutes: the tree refreshes every 30 s, so seconds would always be stale.
    const left = timeLeft(key, now, true);
    if (key.state === 'active' && left) parts.push(left === 'expired' ? left : `${left} left`);
    if (key.state !== 'active') parts.push(key.state);
    item.description = parts.join(' · ');
    const [icon, color] = STATE_ICON[key.state];
    item.iconPath = new vscode.ThemeIcon(icon, new vscode.ThemeColor(color));
    item.contextValue = key.state === 'active' ? 'till.key.active' : 'till.key.ended';
    const tip = new vscode.MarkdownString(undefined, true);
    tip.appendMarkdown(`**${escape(key.label)}** \`${key.id}\`\n\n`);
    tip.appendMarkdown(`${escape(key.provider)} · credential \`${escape(key.credential)}\` · **${key.state}**\n\n`);
    tip.appendMarkdown(`Policy: ${escape(describePolicy(key.policy, now))}\n\n`);
    tip.appendMarkdown(`Used ${escape(usage(key))}; ${key.reserved.activations ?? 0} reserved; ${key.inFlight} in flight\n\n`);
    const t = key.tokens;
    if (t.input + t.output > 0) {
      tip.appendMarkdown(
        `Tokens: ${t.input.toLocaleString('en-US')} in (${t.cached.toLocaleString('en-US')} cached), ${t.output.toLocaleString('en-US')} out (${t.reasoning.toLocaleString('en-US')} reasoning)\n\n`,
      );
    }
    if ((key.used.spend ?? 0) > 0 || (key.reserved.spend ?? 0) > 0) {
      tip.appendMarkdown(
        `Spend: ${formatUsd(key.used.spend ?? 0)}${key.estimatedSpend > 0 ? ` (${formatUsd(key.estimatedSpend)} estimated)` : ''}, ${formatUsd(key.reserved.spend ?? 0)} held by requests in flight\n\n`,
      );
    }
    const unpriced = key.spend.unpricedRequests;
    if (unpriced > 0) {
      tip.appendMarkdown(
        `Spend unknown for ${unpriced} request${unpriced === 1 ? '' : 's'} to a model without a price (tokens counted); add its price to prices.json in Till's data folder\n\n`,
      );
    }
    tip.appendMarkdown(`Issued ${new Date(key.createdAt).toLocaleString()}`);
    item.tooltip = tip;
    return item;
  }

  dispose(): void {
    clearInterval(this.ticker);
    clearTimeout(this.pending);
    this.changed.dispose();
  }
}

function escape(text: string): string {
  return text.replace(/[\\`*_{}[\]()#+\-.!|<>]/g, '\\$&');
}
