/**
 * The Usage view: a sidebar webview with live calls, tokens and dollars per key and in total,
 * each limit's spent / held / left, the running cost of open streams, the last requests, and
 * revoke buttons.
 *
 * The host only relays: it pushes each event as it comes and a fresh key list after those that
 * change counters (one `list()` in flight at a time, so a burst costs a few reads, not one per
 * request); the page coalesces what arrives, `request.progress` included, into one repaint per
 * animation frame. Nothing is posted while the view is hidden (progress then is simply dropped:
 * the `state` sent on becoming visible again starts the page afresh, and the next progress of a
 * stream still open arrives within half a second). Every message from the page is
 * untrusted: ids are checked, commands come from a fixed allow-list, and Revoke All asks here.
 */
import { randomBytes } from 'node:crypto';
import * as vscode from 'vscode';
import type { TillConnection, TillRole } from '../core/runtime/connection';
import { changesKeys, type KeySummary, type TillEvent } from '../core/events';
import { RECENT_REQUESTS } from '../core/runtime/service';
import type { RequestRecord } from '../core/events';
import { mergeRecords, recordKey, type HostMessage, type PageCommand, type PageMessage } from '../webview/messages';
import { COMMANDS } from './constants';

/** What the view reads from the broker: the current connection (it changes on "Till: Restart Broker"). */
export type UsageSource = () => Pick<TillConnection, 'list' | 'recent' | 'revokeAll' | 'url' | 'role'>;

const PAGE_COMMANDS: ReadonlySet<string> = new Set<PageCommand>([COMMANDS.issueKey, COMMANDS.addCredential, COMMANDS.openDashboard]);
const REVOKE_ALL = 'Revoke All';
/** The dashboard's webview panel type. */
const DASHBOARD_PANEL = 'till.dashboard';

/** What the page shows beside keys and requests. */
export interface PageFacts {
  /** Whether any credential is stored (first run: the page's first action is Add Credential). */
  hasCredential: boolean;
  /** Where the broker runs and where the real keys are (session.ts). */
  placement: string;
}

export class UsageViewProvider implements vscode.WebviewViewProvider, vscode.Disposable {
  private view: vscode.WebviewView | undefined;
  private viewDisposables: vscode.Disposable[] = [];
  private disposed = false;

  private readonly history: RequestRecord[] = [];
  private readonly seen = new Set<string>();
  private truncated = false;

  /** Each key read gets a number; an answer older than one already posted is not posted. */
  private readSeq = 0;
  private postedSeq = 0;
  private keysReading = false;
  private keysStale = false;

  /**
   * @param layout 'sidebar' for the Usage view; 'editor' for the dashboard in an editor tab
   *   (the same page, laid out wide).
   */
  /** `facts`: what the page says beside the keys, read when a state is sent. */
  constructor(
    private readonly extensionUri: vscode.Uri,
    private readonly connection: UsageSource,
    private readonly facts: () => PageFacts,
    private readonly layout: 'sidebar' | 'editor' = 'sidebar',
  ) {}

  /** Credentials were added or removed: the page's first action may change. */
  credentialsChanged(): void {
    // Reading keys while down would start a broker just to say there are none.
    if (this.connection().role !== 'down') return void this.pushState();
    this.post({
      type: 'state',
      keys: [],
      recent: [...this.history],
      truncated: this.truncated,
      brokerUrl: undefined,
      role: 'down',
      ...this.facts(),
    });
  }

  /** Opens (or shows) the dashboard: this page in an editor tab. For a provider made with layout 'editor'. */
  openPanel(): void {
    if (this.view) return void (this.view as unknown as { reveal?: () => void }).reveal?.();
    const panel = vscode.window.createWebviewPanel(DASHBOARD_PANEL, 'Till Dashboard', vscode.ViewColumn.Active, {});
    panel.iconPath = vscode.Uri.joinPath(this.extensionUri, 'media', 'till.svg');
    // A panel is a view with another name for its events: adapt it so one code path serves both.
    const asView = {
      webview: panel.webview,
      get visible() {
        return panel.visible;
      },
      reveal: () => panel.reveal(),
      onDidChangeVisibility: (listener: () => void) => panel.onDidChangeViewState(() => listener()),
      onDidDispose: panel.onDidDispose,
    };
    this.resolveWebviewView(asView as unknown as vscode.WebviewView, undefined as never, undefined as never);
  }

  resolveWebviewView(webviewView: vscode.WebviewView, _context: vscode.WebviewViewResolveContext, _token: vscode.CancellationToken): void {
    if (this.disposed) return;
    this.disposeView();
    this.view = webviewView;
    const webview = webviewView.webview;
    const dist = vscode.Uri.joinPath(this.extensionUri, 'dist');
    const media = vscode.Uri.joinPath(this.extensionUri, 'media');
    webview.options = { enableScripts: true, enableCommandUris: false, localResourceRoots: [dist, media] };
    webview.html = usageHtml({
      cspSource: webview.cspSource,
      nonce: randomBytes(18).toString('base64'),
      scriptUri: webview.asWebviewUri(vscode.Uri.joinPath(dist, 'webview.js')).toString(),
      styleUri: webview.asWebviewUri(vscode.Uri.joinPath(media, 'usage.css')).toString(),
      layout: this.layout,
    });
    this.viewDisposables = [
      webview.onDidReceiveMessage((m: unknown) => void this.onMessage(m)),
      // A hidden view's page is torn down (no retainContextWhenHidden); when it is shown again it
      // sends `ready`, and this covers the case where VS Code kept it.
      webviewView.onDidChangeVisibility(() => {
        if (webviewView.visible) void this.pushState();
      }),
      webviewView.onDidDispose(() => {
        if (this.view === webviewView) this.disposeView();
      }),
    ];
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    this.disposeView();
  }

  private disposeView(): void {
    this.view = undefined;
    const disposables = this.viewDisposables;
    this.viewDisposables = [];
    while (disposables.length > 0) disposables.pop()!.dispose();
  }

  private get visibleView(): vscode.WebviewView | undefined {
    return !this.disposed && this.view?.visible ? this.view : undefined;
  }

  private post(message: HostMessage): void {
    void this.visibleView?.webview.postMessage(message);
  }

  /** A broker event, from whichever connection is current. */
  onEvent(e: TillEvent): void {
    if (e.type === 'request.finished' || e.type === 'request.denied') this.remember([e]);
    if (!this.visibleView) return;
    if (e.type !== 'request.started') this.post({ type: 'event', event: e });
    if (changesKeys(e)) this.refreshKeys();
  }

  /** The current connection's role changed. */
  onRole(role: TillRole): void {
    if (!this.visibleView) return;
    // Reading keys while down would start a broker (or race a takeover): say so, wait for the next role.
    if (role === 'down') this.post({ type: 'role', role, brokerUrl: undefined });
    else void this.pushState();
  }

  /** Adds ended requests to the history, once each, oldest first, dropping the oldest beyond HISTORY. */
  private remember(records: RequestRecord[]): void {
    if (mergeRecords(this.history, this.seen, records)) this.truncated = true;
  }

  /** Reads keys and posts them; while a read runs, further calls just ask for one more read after it. */
  private refreshKeys(): void {
    if (this.keysReading) {
      this.keysStale = true;
      return;
    }
    this.keysReading = true;
    const seq = ++this.readSeq;
    this.connection()
      .list()
      .then(
        (keys) => {
          if (seq <= this.postedSeq) return;
          this.postedSeq = seq;
          this.post({ type: 'keys', keys });
        },
        () => undefined, // the next event or `state` tries again; a failing read is shown by `state`
      )
      .finally(() => {
        this.keysReading = false;
        if (this.keysStale && this.visibleView) {
          this.keysStale = false;
          this.refreshKeys();
        }
      });
  }

  /** Reads everything and posts a `state`. */
  private async pushState(): Promise<void> {
    if (!this.visibleView) return;
    const seq = ++this.readSeq;
    let keys: KeySummary[] = [];
    let error: string | undefined;
    try {
      const [list, recent] = await Promise.all([this.connection().list(), this.connection().recent()]);
      keys = list;
      // The service keeps only its last requests: a full batch we had not seen means older ones are gone.
      const first = recent[0];
      if (recent.length >= RECENT_REQUESTS && first && !this.seen.has(recordKey(first))) this.truncated = true;
      this.remember(recent);
    } catch (err) {
      error = `Till could not read its keys: ${errorText(err)}`;
    }
    if (!this.visibleView) return;
    this.post({
      type: 'state',
      keys,
      recent: [...this.history],
      truncated: this.truncated,
      brokerUrl: this.connection().url,
      role: this.connection().role,
      ...this.facts(),
      ...(error ? { error } : {}),
    });
    // A `keys` read that started later already landed: read again so the page ends up current.
    if (seq < this.postedSeq) this.refreshKeys();
    else this.postedSeq = seq;
  }

  private async onMessage(raw: unknown): Promise<void> {
    const message = parsePageMessage(raw);
    if (!message) return;
    switch (message.type) {
      case 'ready':
        return this.pushState();
      case 'revoke':
        return this.revoke(message.id);
      case 'revokeAll':
        return this.revokeAll();
      case 'command':
        return this.runCommand(message.id);
    }
  }

  private async revoke(id: string): Promise<void> {
    // The command's own path (it reports its failures): it asks once when terminals or requests
    // in flight use the key, and says what it did, as from the Keys tree or the palette.
    await vscode.commands.executeCommand(COMMANDS.revokeKey, id);
    // Clears the page's "Revoking…" whatever happened.
    await this.pushState();
  }

  private async revokeAll(): Promise<void> {
    try {
      const live = (await this.connection().list()).filter((k) => k.state !== 'revoked');
      if (live.length === 0) {
        void vscode.window.showInformationMessage('There are no till keys to revoke.');
        return;
      }
      const active = live.filter((k) => k.state === 'active').length;
      const n = live.length;
      const choice = await vscode.window.showWarningMessage(
        `Revoke all ${n} till key${n === 1 ? '' : 's'}?`,
        {
          modal: true,
          detail: `${active} ${active === 1 ? 'is' : 'are'} still active. Agents using them are refused at once, requests in flight included. This cannot be undone.`,
        },
        REVOKE_ALL,
      );
      if (choice !== REVOKE_ALL) return;
      const revoked = await this.connection().revokeAll();
      void vscode.window.showInformationMessage(`Revoked ${revoked} till key${revoked === 1 ? '' : 's'}.`);
    } catch (err) {
      void vscode.window.showErrorMessage(`Till could not revoke all keys: ${errorText(err)}`);
    } finally {
      await this.pushState();
    }
  }

  private async runCommand(id: string): Promise<void> {
    if (!PAGE_COMMANDS.has(id)) return;
    try {
      await vscode.commands.executeCommand(id);
    } catch (err) {
      void vscode.window.showErrorMessage(`Till: ${errorText(err)}`);
    }
  }
}

/** Checks a message from the page; anything unexpected is dropped. */
function parsePageMessage(raw: unknown): PageMessage | undefined {
  if (typeof raw !== 'object' || raw === null) return undefined;
  const m = raw as Record<string, unknown>;
  switch (m.type) {
    case 'ready':
    case 'revokeAll':
      return { type: m.type };
    case 'revoke':
      return typeof m.id === 'string' && /^[A-Za-z0-9_-]{1,64}$/.test(m.id) ? { type: 'revoke', id: m.id } : undefined;
    case 'command':
      return typeof m.id === 'string' && PAGE_COMMANDS.has(m.id) ? { type: 'command', id: m.id as PageCommand } : undefined;
    default:
      return undefined;
  }
}

function errorText(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** What the page's HTML is made from. */
interface UsageHtmlParts {
  /** `webview.cspSource`. */
  cspSource: string;
  /** A fresh random nonce per page. */
  nonce: string;
  /** Webview URIs of dist/webview.js and media/usage.css. */
  scriptUri: string;
  styleUri: string;
  layout: 'sidebar' | 'editor';
}

/** The page's whole HTML: the one place markup, CSP and resource URIs are put together. */
function usageHtml({ cspSource, nonce, scriptUri, styleUri, layout }: UsageHtmlParts): string {
  const csp = [`default-src 'none'`, `style-src ${cspSource}`, `script-src 'nonce-${nonce}'`, `img-src ${cspSource} data:`].join('; ');
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="UTF-8">
<meta http-equiv="Content-Security-Policy" content="${escapeAttr(csp)}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="${escapeAttr(styleUri)}">
<title>Till usage</title>
</head>
<body class="${layout}">
<main id="app" aria-busy="true"><p class="loading">Loading usage…</p></main>
<div id="announce" class="sr-only" role="status" aria-live="polite"></div>
<script nonce="${escapeAttr(nonce)}" src="${escapeAttr(scriptUri)}"></script>
</body>
</html>`;
}

function escapeAttr(value: string): string {
  return value.replace(/&/g, '&amp;').replace(/"/g, '&quot;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
}
