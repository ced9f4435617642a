/** The status bar item: broker state and live key count; a click opens the sidebar. */
import * as vscode from 'vscode';
import type { KeySummary } from '../core/events';
import { COMMANDS } from './constants';
import type { TillSession } from './session';

export class TillStatusBar implements vscode.Disposable {
  private readonly item = vscode.window.createStatusBarItem('till.status', vscode.StatusBarAlignment.Left, 50);

  constructor(private readonly session: TillSession) {
    this.item.name = 'Till';
    this.item.command = COMMANDS.focusSidebar;
    this.update([]);
    this.item.show();
  }

  update(keys: KeySummary[]): void {
    const { role, url } = this.session.connection;
    const live = keys.filter((k) => k.state === 'active').length;
    if (role === 'down') {
      this.item.text = '$(key) Till: off';
      this.item.tooltip = 'Till: the broker is not running. It starts when you add a credential or issue a key.';
    } else {
      this.item.text = `$(key) Till: ${live} key${live === 1 ? '' : 's'}`;
      this.item.tooltip = `Till broker at ${url} (${role === 'host' ? 'in this window' : 'in another window or `till serve`'}), ${live} live key${live === 1 ? '' : 's'}. Click to open the sidebar.`;
    }
  }

  dispose(): void {
    this.item.dispose();
  }
}
