/**
 * Notifications: a key at 80 % of its calls, an exhausted key (Revoke / Issue Another), and a
 * request refused for being out of scope (possible misuse). Shown once, by the window that
 * issued the key, or by the hosting window for keys issued elsewhere (the `till` command).
 */
import * as vscode from 'vscode';
import type { KeySummary, TillEvent } from '../core/events';
import { COMMANDS, SETTINGS } from './constants';
import type { TillSession } from './session';

export class Notifier {
  constructor(private readonly session: TillSession) {}

  private mine(owner: string | undefined): boolean {
    if (owner === this.session.owner) return true;
    return !owner?.startsWith('vscode:') && this.session.connection.role === 'host';
  }

  private enabled(): boolean {
    return vscode.workspace.getConfiguration(SETTINGS.section).get<boolean>(SETTINGS.notifications, true);
  }

  handle(e: TillEvent, keys: () => KeySummary[]): void {
    if (!this.enabled()) return;
    if (e.type === 'limit.near' && this.mine(e.key.owner)) {
      void this.show('warning', `Till key "${e.key.label}" has used ${e.used} of its ${e.limit} calls.`, e.key, ['Revoke']);
    } else if (e.type === 'key.exhausted' && this.mine(e.key.owner)) {
      void this.show('warning', `Till key "${e.key.label}" is exhausted: all ${e.key.policy.maxActivations} calls used.`, e.key, ['Issue Another', 'Revoke']);
    } else if (e.type === 'request.denied' && e.code === 'out_of_scope' && e.request.keyId) {
      const key = keys().find((k) => k.id === e.request.keyId);
      if (key && this.mine(key.owner)) {
        void this.show('warning', `Till refused a request on key "${key.label}" that is outside its scope (possible misuse): ${e.reason}`, key, ['Revoke']);
      }
    }
  }

  private async show(kind: 'warning', text: string, key: KeySummary, buttons: string[]): Promise<void> {
    const choice = await this.session.prompter.message(kind, text, buttons);
    if (choice === 'Revoke') await vscode.commands.executeCommand(COMMANDS.revokeKey, key.id);
    if (choice === 'Issue Another') await vscode.commands.executeCommand(COMMANDS.issueKey);
  }
}
