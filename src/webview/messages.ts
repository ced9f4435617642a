/**
 * Messages between the Usage view's page and the extension host. Both sides import this file,
 * so a change to the protocol is a type error on both sides at once.
 *
 * Nothing here carries a secret: keys travel as `KeySummary` and requests as `RequestRecord`,
 * neither of which holds a till key or a credential. Keep it that way.
 */
import type { TillRole } from '../core/runtime/connection';
import type { KeySummary, TillEvent } from '../core/events';
import type { RequestRecord } from '../core/events';

/** Host → page. */
export type HostMessage =
  /**
   * Everything the page needs to draw from scratch: sent after `ready`, when the view becomes
   * visible again and when the broker comes back. `recent` is oldest first; `truncated` says
   * older requests were dropped (so "today" counts are lower bounds); `error` says why `keys`
   * could not be read.
   */
  | {
      type: 'state';
      keys: KeySummary[];
      recent: RequestRecord[];
      truncated: boolean;
      brokerUrl: string | undefined;
      role: TillRole;
      error?: string;
      /** Whether any credential is stored (first run: the page's first action is Add Credential). */ hasCredential: boolean;
      /** Where the broker runs and where the real keys are, in a sentence. */
      placement: string;
    }
  /**
   * One live event, sent only while the view is visible. `request.started` is not sent (the
   * `keys` after it carry its effect); `request.progress` comes up to twice a second per open
   * stream and changes no counter, so no `keys` follows it and the page repaints it at most once
   * per animation frame.
   */
  | { type: 'event'; event: LiveEvent }
  /** A fresh key list after events changed counters; never older than an earlier `keys` or `state`. */
  | { type: 'keys'; keys: KeySummary[] }
  /** The broker went away or came back; a `state` follows when it is back. */
  | { type: 'role'; role: TillRole; brokerUrl: string | undefined };

/** The events the host relays to the page. */
export type LiveEvent = Exclude<TillEvent, { type: 'request.started' }>;

/**
 * The only commands the page may ask the host to run; the host checks again against its own list
 * (usageView.ts builds it from vscode/constants.ts, a type error if the two differ).
 */
export type PageCommand = 'till.issueKey' | 'till.addCredential' | 'till.openDashboard';

/** Page → host. The host treats every field as untrusted input. */
export type PageMessage =
  | { type: 'ready' }
  | { type: 'revoke'; id: string }
  /** Asks; the host confirms with a modal dialog before revoking anything. */
  | { type: 'revokeAll' }
  | { type: 'command'; id: PageCommand };

/** Identifies one ended request across `state` and `event` messages, so neither side counts it twice. */
export function recordKey(r: RequestRecord): string {
  return `${r.type}|${r.request.requestId ?? ''}|${r.at}`;
}

/** Ended requests the host and the page remember (newest kept): a busy day's worth, still cheap to post once. */
export const HISTORY = 2000;

/**
 * Adds ended requests to `list` once each (`seen` holds their keys), keeping it oldest first and
 * at most HISTORY long; returns true when older requests had to be dropped.
 */
export function mergeRecords(list: RequestRecord[], seen: Set<string>, records: RequestRecord[]): boolean {
  let unordered = false;
  for (const r of records) {
    const key = recordKey(r);
    if (seen.has(key)) continue;
    seen.add(key);
    const last = list[list.length - 1];
    if (last && last.at > r.at) unordered = true;
    list.push(r);
  }
  if (unordered) list.sort((a, b) => a.at - b.at);
  if (list.length <= HISTORY) return false;
  for (const r of list.splice(0, list.length - HISTORY)) seen.delete(recordKey(r));
  return true;
}
