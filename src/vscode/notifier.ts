/**
 * Notifications: a key at 50 % and 80 % of a limit, a key that ran out (Extend, Issue Another,
 * Revoke), and a request refused for being out of scope (possible misuse). Shown once, by the
 * window that issued the key, or by the hosting window for keys issued elsewhere (the `till`
 * command).
 */
import * as vscode from 'vscode';
import type { KeySummary, TillEvent } from '../core/events';
import type { Extension } from '../core/keys/keys';
import { limitsOf, type Meter } from '../core/policy/policy';
import { formatAmount } from '../core/keys/present';
import { COMMANDS, SETTINGS } from './constants';
import type { TillSession } from './session';

const METER_NAME: Record<Meter, string> = { activations: 'calls', tokens: 'tokens', spend: 'spend' };

/** The choices "Extend" offers for a meter, chosen in place. */
const EXTENSIONS: Record<Meter, { label: string; by: Extension }[]> = {
  activations: [
    { label: '+50 calls', by: { uses: 50 } },
    { label: '+200 calls', by: { uses: 200 } },
    { label: '+1,000 calls', by: { uses: 1000 } },
  ],
  tokens: [
    { label: '+10,000 tokens', by: { maxTokens: 10_000 } },
    { label: '+100,000 tokens', by: { maxTokens: 100_000 } },
    { label: '+1,000,000 tokens', by: { maxTokens: 1_000_000 } },
  ],
  spend: [
    { label: '+$1', by: { maxSpend: 1 } },
    { label: '+$5', by: { maxSpend: 5 } },
    { label: '+$20', by: { maxSpend: 20 } },
  ],
};

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
    // Most events (every request's start and end) can notify nothing: skip the settings read.
    if (e.type !== 'limit.near' && e.type !== 'key.exhausted' && e.type !== 'request.denied') return;
    if (!this.enabled()) return;
    if (e.type === 'limit.near' && this.mine(e.key.owner)) {
      const text = `Till key "${e.key.label}" has used ${e.percent}% of its ${METER_NAME[e.meter]} limit: ${formatAmount(e.meter, e.used)} of ${formatAmount(e.meter, e.limit)}.`;
      void this.show(text, e.key, e.meter, ['Extend', 'Revoke']);
    } else if (e.type === 'key.exhausted' && this.mine(e.key.owner)) {
      const limit = limitsOf(e.key.policy)[e.meter] ?? 0;
      void this.show(
        `Till key "${e.key.label}" ran out: all ${formatAmount(e.meter, limit)} of its ${METER_NAME[e.meter]} limit used.`,
        e.key,
        e.meter,
        ['Extend', 'Issue Another', 'Revoke'],
      );
    } else if (e.type === 'request.denied' && e.code === 'out_of_scope' && e.request.keyId) {
      const key = keys().find((k) => k.id === e.request.keyId);
      if (key && this.mine(key.owner)) {
        void this.show(
          `Till refused a request on key "${key.label}" that is outside its scope (possible misuse): ${e.reason}`,
          key,
          undefined,
          ['Revoke'],
        );
      }
    }
  }

  private async show(text: string, key: KeySummary, meter: Meter | undefined, buttons: string[]): Promise<void> {
    const choice = await this.session.prompter.message('warning', text, buttons);
    if (choice === 'Revoke') await vscode.commands.executeCommand(COMMANDS.revokeKey, key.id);
    if (choice === 'Issue Another') await vscode.commands.executeCommand(COMMANDS.issueKey);
    if (choice === 'Extend' && meter) await this.extend(key, meter);
  }

  /** Extend, chosen in place: a pick of amounts for the limit that is running out. */
  async extend(key: KeySummary, meter: Meter): Promise<void> {
    const by = await this.session.prompter.pick(
      `Till: extend "${key.label}"`,
      EXTENSIONS[meter].map((x) => ({ label: x.label, value: x.by })),
      `Raise its ${METER_NAME[meter]} limit by`,
    );
    if (!by) return;
    const extended = await this.session.connection.extend(key.id, by);
    void this.session.prompter.message('info', `Till key "${extended.label}" extended.`, []);
  }
}
