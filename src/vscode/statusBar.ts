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
    // One read of the list per update: the count and the tooltip's stores both come from it.
    const all = this.session.credentials.all();
    const credentials = all.length;
    // With nothing to broker, the one useful step is adding a credential: the click does that.
    this.item.command = credentials === 0 ? COMMANDS.addCredential : COMMANDS.focusSidebar;
    if (credentials === 0) {
      this.item.text = '$(key) Till: add a credential';
      const broker = role === 'down' ? 'the broker is not running' : `the broker runs at ${url}`;
      this.item.tooltip = `Till: no credential stored yet (${broker}, with nothing to broker). Click to add one (a real API key, kept in ${this.session.describeStore(this.session.newCredentialStore())}); terminals get till keys then.`;
    } else if (role === 'down') {
      this.item.text = '$(key) Till: off';
      this.item.tooltip =
        'Till: the broker is not running (it failed to start, or is starting). See "Till: Show Broker Log"; "Till: Restart Broker" tries again.';
    } else {
      this.item.text = `$(key) Till: ${live} key${live === 1 ? '' : 's'}`;
      this.item.tooltip = `Till broker at ${url}, ${live} live key${live === 1 ? '' : 's'}. ${this.session.placement(all)} Click to open the sidebar.`;
    }
  }

  dispose(): void {
    this.item.dispose();
  }
}
