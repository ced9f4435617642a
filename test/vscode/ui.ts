/**
 * Drives Till as a person would, against the INSTALLED VSIX: code-server on 127.0.0.1 with
 * dist/vsix/till-linux-x64-<version>.vsix installed into a throw-away extensions dir, headless
 * Chromium clicking and typing through playwright-core, a fake OpenAI upstream and a private
 * keychain. Bundled to dist/test/ui.js; `npm run test:ui` packages, installs and runs it.
 *
 * The steps: add an OpenAI credential and issue a key through the command palette; see the
 * key in the Keys tree; in a new integrated terminal, see OPENAI_BASE_URL point at the broker
 * and make a request with the terminal's own till key (it reaches the upstream with the real
 * credential), and one to a model without a price; see the request in the Usage view and the
 * key's spend as unknown; stream a long answer on the terminal's token-limited key and see its hold grow in the Usage view, then stop it with Ctrl+C; revoke
 * the terminal's key there (asked once: a terminal holds it) and see the same request refused, and
 * a new terminal served with a fresh key. Also: the issued key shown once with a confirmed copy,
 * the credential listed in the tree, and a till.upstreams change applied without a restart (an
 * unreachable upstream's 502 leaves the Usage view's totals as they were). Screenshots go to
 * test/vscode/screenshots/ui-*.png.
 *
 * Exit code 0 when every step passed, 1 otherwise (with ui-failure.png and the step named).
 *
 * Options (after `npm run test:ui --`):
 *   --vsix <file>      the VSIX to install. Default: dist/vsix/till-linux-x64-<version>.vsix
 *   --timeout <s>      overall limit, from the start. Default: 240 (or TILL_UI_TIMEOUT)
 *   --keep             keep the throw-away dirs (profile, logs of code-server) for a look
 *   --verbose          print code-server's own output and the browser console as they come
 */
import { randomBytes } from 'node:crypto';
import { existsSync, readFileSync } from 'node:fs';
import { createServer } from 'node:net';
import * as path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { parseArgs } from 'node:util';
import type { BrowserContext, FrameLocator, Locator, Page } from 'playwright-core';
import pkg from '../../package.json';
import { startPrivateKeyring, type PrivateKeyring } from '../support/keyring';
import { startOpenAIUpstream, type Upstream } from '../support/upstreams';
import { waitFor } from '../support/wait';
import {
  BASE_SETTINGS,
  CODE_SERVER_VERSION,
  Deadline,
  HarnessError,
  checkInstalled,
  createSandbox,
  installExtension,
  launchChromium,
  logger,
  prefixLines,
  recordBrowserConsole,
  repoRoot,
  screenshot,
  spawnCodeServer,
  type CodeServer,
  type Sandbox,
  exitOnSignals,
} from './harness';

const { values: opts } = parseArgs({
  options: {
    vsix: { type: 'string' },
    timeout: { type: 'string' },
    keep: { type: 'boolean', default: false },
    verbose: { type: 'boolean', default: false },
    // No Secret Service on the server (no D-Bus session), as in a dev container: the same clicks,
    // the key kept by VS Code's secret storage instead.
    'no-keychain': { type: 'boolean', default: false },
  },
});
const noKeychain = opts['no-keychain'];
const timeoutMs = Number(opts.timeout ?? process.env.TILL_UI_TIMEOUT ?? 240) * 1000;
const vsix = path.resolve(opts.vsix ?? path.join(repoRoot, 'dist', 'vsix', `${pkg.name}-linux-x64-${pkg.version}.vsix`));

/** The "real" OpenAI key the person pastes in; only the fake upstream accepts it. */
const SECRET = `sk-REALCRED-ui-${randomBytes(8).toString('hex')}`;
const KEY_LABEL = 'ui test key';
const PRESET = '50 calls, 1 hour';
// `; echo`: the answer ends without a newline, and a prompt drawn right after it garbles the
// next command line on the screen.
const CURL = `curl -s -H "Authorization: Bearer $OPENAI_API_KEY" -H 'content-type: application/json' -d '{"model":"gpt-4o-mini","max_tokens":5,"messages":[]}' $OPENAI_BASE_URL/chat/completions; echo`;

/** A model without a price in Till's table. */
const UNPRICED = CURL.replace('"gpt-4o-mini"', '"no-such-model-ui"');
/** A long streamed answer (see the upstream's stream settings below), read as it comes. */
const STREAM = `curl -sN -H "Authorization: Bearer $OPENAI_API_KEY" -H 'content-type: application/json' -d '{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"tell me everything"}]}' $OPENAI_BASE_URL/chat/completions > /dev/null`;

const SIDEBAR = '.part.sidebar';
/** How long a single UI expectation may take before the step fails. */
const EXPECT_MS = 20_000;

const t0 = Date.now();
const { since, say } = logger('till-ui', t0);

// ---- the steps ---------------------------------------------------------------------------------

interface World {
  sb: Sandbox;
  page: Page;
  upstream: Upstream;
  /** The user settings code-server started with; a step rewrites the file as a person edits it. */
  settings: Record<string, unknown>;
}

const steps: Array<[name: string, run: (w: World) => Promise<void>]> = [
  [
    'first run in an untrusted folder: the status bar and the Usage view offer Add Credential; add an OpenAI credential',
    async ({ page }) => {
      // A folder never opened before is untrusted: code-server opens it in Restricted Mode (where
      // VS Code asks first, a careful user says no).
      const trust = page.locator('.monaco-dialog-box', { hasText: /trust the authors/i });
      const restricted = page.locator('.statusbar-item', { hasText: 'Restricted Mode' }).first();
      await trust.or(restricted).first().waitFor({ timeout: EXPECT_MS });
      if (await trust.isVisible()) await trust.getByRole('button', { name: /don.t trust/i }).click();
      await restricted.waitFor({ timeout: EXPECT_MS });
      // Nothing to broker yet: the one action offered everywhere is adding a credential.
      const status = page.locator('.statusbar-item', { hasText: 'Till: add a credential' }).first();
      await status.waitFor({ timeout: EXPECT_MS });
      await openTillSidebar(page);
      const usage = usageFrame(page);
      await usage.locator('.empty h2', { hasText: 'Add your first credential' }).waitFor({ timeout: EXPECT_MS });
      await shot(page, 'ui-first-run', SIDEBAR);
      await usage.getByRole('button', { name: 'Add Credential' }).click({ timeout: EXPECT_MS });
      await pick(page, 'Till: Add Credential', 'OpenAI');
      await input(page, 'Till: OpenAI API key', SECRET, { password: true });
      await toast(
        page,
        noKeychain ? /Till: stored "openai" \(OpenAI\) in VS Code's secret storage/ : /Till: stored "openai" \(OpenAI\) in the OS keychain/,
      );
      await page
        .locator('.statusbar-item', { hasText: /Till: \d+ keys?/ })
        .first()
        .waitFor({ timeout: EXPECT_MS });
      await usage.locator('.empty h2', { hasText: 'No till keys yet' }).waitFor({ timeout: EXPECT_MS });
    },
  ],

  [
    'issue a key (palette)',
    async ({ page }) => {
      await runCommand(page, 'Till: Issue Key');
      await pick(page, 'Till: Issue Key: limits', PRESET);
      await input(page, 'Till: Issue Key: label', KEY_LABEL);
      // The key itself is in the message (once), with copy buttons; a copy is confirmed.
      const issued = page
        .locator('.notifications-toasts .notification-toast', { hasText: `Till key "${KEY_LABEL}" issued: till_` })
        .first();
      await issued.waitFor({ timeout: EXPECT_MS });
      await issued.getByRole('button', { name: 'Copy Key' }).click({ timeout: EXPECT_MS });
      await toast(page, /Copied the key to the clipboard\. Till key/);
    },
  ],

  [
    'see the key in the Keys tree',
    async ({ page }) => {
      await openTillSidebar(page);
      const keys = viewPane(page, 'Keys');
      await keys.locator('.monaco-list-row', { hasText: KEY_LABEL }).first().waitFor({ timeout: EXPECT_MS });
      const row = (await keys.locator('.monaco-list-row', { hasText: KEY_LABEL }).first().innerText()).replace(/\s+/g, ' ');
      if (!/openai · 0\/50/.test(row)) throw new Error(`the key's row reads "${row}", expected "openai · 0/50 · …"`);
      // The stored credential is listed (its name, never the secret), under a group that starts folded.
      await keys.locator('.monaco-list-row', { hasText: 'Credentials (1)' }).first().click({ timeout: EXPECT_MS });
      const credential = keys.locator('.monaco-list-row[aria-level="2"]', { hasText: 'openai' }).first();
      await credential.waitFor({ timeout: EXPECT_MS });
      if ((await page.content()).includes(SECRET)) throw new Error('the credential is on the page');
      await keys.locator('.monaco-list-row', { hasText: 'Credentials (1)' }).first().click({ timeout: EXPECT_MS });
      // The Usage view below it has drawn its first state (the key), so the picture is whole.
      await usageFrame(page).locator('li.card .label', { hasText: KEY_LABEL }).waitFor({ timeout: EXPECT_MS });
      await shot(page, 'ui-keys', SIDEBAR);
    },
  ],

  [
    'Restricted Mode: no terminal key until the folder is trusted; trusted as a terminal opens, that terminal has one',
    async ({ sb, page }) => {
      const usage = usageFrame(page);
      const label = `terminals · ${path.basename(sb.workspace)}`;
      if (await usage.locator('li.card .label', { hasText: label }).count())
        throw new Error('a terminal key was issued in Restricted Mode');
      // VS Code runs no terminal in an untrusted folder: opening one asks for trust first.
      await runCommand(page, 'Terminal: Create New Terminal');
      const ask = page.locator('.monaco-dialog-box', { hasText: /trust the authors/i });
      await ask.waitFor({ timeout: EXPECT_MS });
      await ask.getByRole('button', { name: /^Trust/ }).click();
      await page.locator('.statusbar-item', { hasText: 'Restricted Mode' }).first().waitFor({ state: 'detached', timeout: EXPECT_MS });
      await usage.locator('li.card .label', { hasText: label }).waitFor({ timeout: EXPECT_MS });
      // The terminal that asked started once trusted, with the broker's URL and a till key.
      const rows = page.locator('.terminal-wrapper .xterm-rows').first();
      await rows.waitFor({ timeout: EXPECT_MS });
      await expectSoon('a shell prompt', async () => /[$#]\s*$/.test((await screenText(rows)).trimEnd()));
      await typeInTerminal(page, 'echo "[${OPENAI_API_KEY%%_*}] $OPENAI_BASE_URL"');
      await expectSoon('a till key and the broker URL on the terminal', async () =>
        /\[till\] http:\/\/127\.0\.0\.1:\d+\/openai\/v1/.test(await screenText(rows)),
      );
    },
  ],

  [
    'make a request from the terminal with its own key',
    async ({ page, upstream }) => {
      const before = upstream.received.length;
      const rows = page.locator('.terminal-wrapper .xterm-rows').first();
      await typeInTerminal(page, CURL);
      await expectSoon("the fake upstream's answer on the terminal", async () => /"chat\.completion"/.test(flat(await screenText(rows))));
      if (upstream.received.length !== before + 1)
        throw new Error(`the upstream received ${upstream.received.length - before} requests, expected 1`);
      const got = upstream.received.at(-1)!;
      if (got.method !== 'POST' || got.path !== '/v1/chat/completions') throw new Error(`the upstream received ${got.method} ${got.path}`);
      if (got.headers.authorization !== `Bearer ${SECRET}`) throw new Error('the upstream did not receive the real credential');
      // A model Till has no price for: served on this token-limited key, its tokens counted.
      await typeInTerminal(page, UNPRICED);
      await expectSoon('the second answer on the terminal', async () => flat(await screenText(rows)).split('"chat.completion"').length > 2);
    },
  ],

  [
    'see the request in the Usage view, and a model without a price as unknown spend',
    async ({ sb, page }) => {
      const usage = usageFrame(page);
      const request = usage.locator('table.requests tbody tr', { hasText: 'POST' }).filter({ hasText: '/v1/chat/completions' });
      await request.first().waitFor({ timeout: 10_000 });
      const text = (await request.first().innerText()).replace(/\s+/g, ' ');
      if (!/\b200\b/.test(text)) throw new Error(`the request's row reads "${text}", expected status 200`);
      // The terminal key's spend: what the priced call cost, and unknown for the other, not $0.00.
      const label = `terminals · ${path.basename(sb.workspace)}`;
      const spent = usage.locator('li.card', { has: usage.locator('.label', { hasText: label }) }).locator('.key-usage .spent');
      await expectSoon("the terminal key's spend to read unknown", async () =>
        /unknown/.test((await spent.textContent({ timeout: EXPECT_MS })) ?? ''),
      );
      // Fold the Keys tree away, as a person would, so the Usage view gets the sidebar's height.
      await viewPane(page, 'Keys').locator('.pane-header').click();
      await viewPane(page, 'Keys').locator('.pane-header[aria-expanded="false"]').waitFor({ timeout: EXPECT_MS });
      await request.first().scrollIntoViewIfNeeded();
      await shot(page, 'ui-usage', SIDEBAR);
    },
  ],

  [
    "watch a stream's hold grow in the Usage view, then stop it",
    async ({ page }) => {
      // The terminal's key has a token limit: its stream holds a slice of its answer ahead and
      // grows the hold as the answer comes (3,000 tokens, one every 5 ms).
      const rows = page.locator('.terminal-wrapper .xterm-rows').first();
      await typeInTerminal(page, STREAM);
      const live = usageFrame(page).locator('li.card [data-live^="key:"]').first();
      const holding = async () => {
        const m = /holding ([\d.]+)(K?) tokens/.exec((await live.textContent({ timeout: EXPECT_MS })) ?? '');
        return m ? Number(m[1]) * (m[2] === 'K' ? 1000 : 1) : undefined;
      };
      await expectSoon('the stream and its hold in the Usage view', async () => (await holding()) !== undefined);
      const first = await holding();
      await expectSoon(`the stream's hold to grow from ${first} tokens`, async () => ((await holding()) ?? 0) > first!);
      await shot(page, 'ui-stream', SIDEBAR);
      // Ctrl+C: the client leaves mid-answer; the stream is settled and its line goes.
      await page.locator('.terminal-wrapper .xterm').first().click();
      await page.keyboard.press('Control+C');
      await live.waitFor({ state: 'detached', timeout: EXPECT_MS });
      await expectSoon('a prompt after the stopped stream', async () => /[$#]\s*$/.test((await screenText(rows)).trimEnd()));
    },
  ],

  [
    'change till.upstreams: applied without a restart; an unreached request is not counted',
    async ({ sb, page, upstream, settings }) => {
      const usage = usageFrame(page);
      const rows = page.locator('.terminal-wrapper .xterm-rows').first();
      const tiles = async () => (await usage.locator('dl.totals').innerText({ timeout: EXPECT_MS })).replace(/\s+/g, ' ');
      // As a person edits it: the user settings JSON in an editor, replaced and saved.
      const write = async (upstreams: Record<string, string>) => {
        await runCommand(page, 'Preferences: Open User Settings (JSON)');
        const editor = page.locator('.editor-instance .monaco-editor', { hasText: 'till.upstreams' }).first();
        await editor.click({ timeout: EXPECT_MS });
        const text = JSON.stringify({ ...settings, 'till.upstreams': upstreams });
        // Pasted, as a person would: typed, it would be auto-closed and auto-indented.
        await page.context().grantPermissions(['clipboard-read', 'clipboard-write'], { origin: new URL(page.url()).origin });
        await page.evaluate(
          (t) =>
            (globalThis as unknown as { navigator: { clipboard: { writeText(v: string): Promise<void> } } }).navigator.clipboard.writeText(
              t,
            ),
          text,
        );
        await page.keyboard.press('Control+A');
        await page.keyboard.press('Control+V');
        await page.keyboard.press('Control+S');
        const file = path.join(sb.userDataDir, 'User', 'settings.json');
        await expectSoon('the settings to be saved', async () => readFileSync(file, 'utf8') === text);
        // Settings open in a modal editor here: its close button (Escape may go to a widget first).
        const close = page.locator('[class*="modal"] .codicon-close, [class*="modal"] [aria-label^="Close"]').first();
        await expectSoon('the settings editor to close', async () => {
          if (!(await editor.isVisible())) return true;
          if (await close.isVisible()) await close.click();
          else await page.keyboard.press('Escape');
          await delay(300);
          return !(await editor.isVisible());
        });
      };
      const received = upstream.received.length;
      // Pointed at a closed port, as a typo would: once the change lands, requests get Till's 502.
      await write({ openai: `http://127.0.0.1:${await closedPort()}/v1` });
      await expectSoon("Till's 502 for the unreachable upstream", async () => {
        await typeInTerminal(page, CURL);
        await delay(300);
        return /till_upstream_unreachable/.test(flat(await screenText(rows)));
      });
      const unreached = usage.locator('table.requests tbody tr', { hasText: '502' });
      await unreached.first().waitFor({ timeout: EXPECT_MS });
      await delay(500); // the key list that follows each request has landed
      const before = await tiles();
      const n = await unreached.count();
      await typeInTerminal(page, CURL);
      await expectSoon('a second 502 row', async () => (await unreached.count()) > n);
      await delay(500);
      const after = await tiles();
      if (after !== before)
        throw new Error(`the Usage view's totals changed with a request the ledger did not count: "${before}" → "${after}"`);
      // Back to the upstream: served again by the same broker (no restart, same base URL).
      await write({ openai: `${upstream.url}/v1` });
      await expectSoon('the upstream to be reached again', async () => {
        await typeInTerminal(page, CURL);
        await delay(300);
        return upstream.received.length > received;
      });
    },
  ],

  [
    'revoke the terminal key in the Usage view; the terminal is refused',
    async ({ sb, page, upstream }) => {
      const usage = usageFrame(page);
      const label = `terminals · ${path.basename(sb.workspace)}`;
      const card = usage.locator('li.card.active', { has: usage.locator('.label', { hasText: label }) });
      // New terminals get a fresh key under the same label at once: follow this one by its id.
      const id = (await card.first().locator('.id').textContent({ timeout: EXPECT_MS }))?.trim();
      if (!id) throw new Error("no key id on the terminal key's card");
      await card.getByRole('button', { name: `Revoke till key ${label}` }).click({ timeout: EXPECT_MS });
      // The open terminal holds it: Till asks once, in a modal.
      const dialog = page.locator('.monaco-dialog-box', { hasText: 'It is in use by 1 open terminal' });
      await dialog.waitFor({ timeout: EXPECT_MS });
      await dialog.getByRole('button', { name: 'Revoke', exact: true }).click();
      await usage
        .locator('li.card.active', { has: usage.locator('.id', { hasText: id }) })
        .waitFor({ state: 'detached', timeout: EXPECT_MS });
      await toast(page, /1 open terminal holds the revoked key/);
      await usage.locator('details.revoked-list summary', { hasText: 'Revoked (1)' }).waitFor({ timeout: EXPECT_MS });

      const before = { received: upstream.received.length, rejected: upstream.rejected.length };
      const rows = page.locator('.terminal-wrapper .xterm-rows').first();
      await typeInTerminal(page, CURL);
      await expectSoon("Till's refusal on the terminal", async () => /"code":\s*"(till_)?revoked"/.test(flat(await screenText(rows))));
      await delay(500); // anything that did get through would have arrived by now
      if (upstream.received.length !== before.received || upstream.rejected.length !== before.rejected) {
        throw new Error(
          `the upstream received ${upstream.received.length - before.received} (+${upstream.rejected.length - before.rejected} refused) requests after the revoke`,
        );
      }
      await usage.locator('table.requests tbody tr.denied', { hasText: 'revoked' }).first().waitFor({ timeout: 10_000 });
      await shot(page, 'ui-revoked');
    },
  ],

  [
    "a new terminal gets a fresh key after the terminals' was revoked",
    async ({ page, upstream }) => {
      const before = upstream.received.length;
      await runCommand(page, 'Terminal: Create New Terminal');
      const rows = page.locator('.terminal-wrapper .xterm-rows').last();
      await expectSoon('a shell prompt in the new terminal', async () => /[$#]\s*$/.test((await screenText(rows)).trimEnd()));
      await page.locator('.terminal-wrapper .xterm').last().click();
      await page.keyboard.type(CURL);
      await page.keyboard.press('Enter');
      await expectSoon('the new terminal served', async () => /"chat\.completion"/.test(flat(await screenText(rows))));
      if (upstream.received.length !== before + 1)
        throw new Error(`the upstream received ${upstream.received.length - before} requests, expected 1`);
    },
  ],
];

// ---- UI helpers --------------------------------------------------------------------------------

/** A port on 127.0.0.1 nothing listens on (bound, then closed). */
async function closedPort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

const quickInput = (page: Page): Locator => page.locator('.quick-input-widget');

/** F1, type `>` and the command's title, wait for its row, run it. Retries while the command is not listed yet. */
async function runCommand(page: Page, title: string): Promise<void> {
  const widget = quickInput(page);
  const box = widget.locator('input.input').first();
  const row = widget
    .locator('.quick-input-list .monaco-list-row')
    .filter({ has: page.locator('.label-name', { hasText: exactly(title) }) });
  const until = Date.now() + 30_000;
  for (let attempt = 1; ; attempt++) {
    if (!(await widget.isVisible())) await page.keyboard.press('F1');
    await box.waitFor({ timeout: EXPECT_MS });
    await box.fill(`>${title}`);
    try {
      await row.first().waitFor({ timeout: 4_000 });
      break;
    } catch {
      // Right after load the palette may not list a just-activated extension's command yet.
      if (Date.now() > until) throw new Error(`"${title}" is not in the command palette (${attempt} tries)`);
      await page.keyboard.press('Escape');
      await delay(1_000);
    }
  }
  // Enter runs the focused row: the first one, unless a longer title ranks above this one.
  if (/\bfocused\b/.test((await row.first().getAttribute('class')) ?? '')) await box.press('Enter');
  else await row.first().click();
}

/** Waits for the quick pick titled `title`, filters for `label` and clicks its row. */
async function pick(page: Page, title: string, label: string): Promise<void> {
  const widget = quickInput(page);
  await widget.locator('.quick-input-title', { hasText: title }).waitFor({ timeout: EXPECT_MS });
  await widget.locator('input.input').first().fill(label);
  const row = widget
    .locator('.quick-input-list .monaco-list-row')
    .filter({ has: page.locator('.label-name', { hasText: exactly(label) }) });
  await row.first().click({ timeout: EXPECT_MS });
}

/** Waits for the input box titled `title`, types `text` (replacing any default) and presses Enter. */
async function input(page: Page, title: string, text: string, o: { password?: boolean } = {}): Promise<void> {
  const widget = quickInput(page);
  await widget.locator('.quick-input-title', { hasText: title }).waitFor({ timeout: EXPECT_MS });
  const box = widget.locator(o.password ? 'input[type="password"]' : 'input.input').first();
  await box.fill(text);
  await box.press('Enter');
  await widget.locator('.quick-input-title', { hasText: title }).waitFor({ state: 'hidden', timeout: EXPECT_MS });
}

async function toast(page: Page, text: string | RegExp): Promise<void> {
  await page.locator('.notifications-toasts .notification-toast', { hasText: text }).first().waitFor({ timeout: EXPECT_MS });
}

/** The sidebar pane of the view titled `title` (its header and body). */
/** Shows Till's sidebar; the activity bar icon toggles it, so only when it is not showing. */
async function openTillSidebar(page: Page): Promise<void> {
  if (await viewPane(page, 'Keys').isVisible()) return;
  await page.locator('.activitybar [aria-label^="Till"]').first().click();
  await viewPane(page, 'Keys').waitFor({ timeout: EXPECT_MS });
}

function viewPane(page: Page, title: string): Locator {
  return page.locator(`${SIDEBAR} .pane`, { has: page.locator('.pane-header', { hasText: exactly(title, 'i') }) }).first();
}

/**
 * The Usage view's page: a webview renders in an iframe inside an iframe, laid over its pane
 * from outside the pane's DOM. It is the only webview in this window.
 */
function usageFrame(page: Page): FrameLocator {
  return page.frameLocator('iframe.webview').frameLocator('iframe#active-frame');
}

async function typeInTerminal(page: Page, line: string): Promise<void> {
  await page.locator('.terminal-wrapper .xterm').first().click();
  await page.keyboard.type(line);
  await page.keyboard.press('Enter');
}

/** What the terminal shows, row by row (the DOM renderer, GPU acceleration off). */
async function screenText(rows: Locator): Promise<string> {
  return (await rows.innerText()).replace(/\u00a0/g, ' ');
}

/** Rows joined back together, so output wrapped at the terminal's width reads as one line. */
function flat(text: string): string {
  return text.replace(/\n/g, '');
}

async function expectSoon(what: string, check: () => Promise<boolean>, ms = EXPECT_MS): Promise<void> {
  await waitFor(what, check, { timeoutMs: ms, everyMs: 200 });
}

function exactly(text: string, flags = ''): RegExp {
  return new RegExp(`^\\s*${text.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}\\s*$`, flags);
}

const shots: string[] = [];
async function shot(page: Page, name: string, element?: string): Promise<void> {
  const file = await screenshot(page, noKeychain ? `no-keychain-${name}` : name, element);
  shots.push(file);
  say(`screenshot: ${file}`);
}

// ---- the run -----------------------------------------------------------------------------------

async function main(): Promise<number> {
  // The terminal step runs curl from the shell's PATH.
  const curl =
    (process.env.PATH ?? '')
      .split(path.delimiter)
      .map((d) => path.join(d, 'curl'))
      .find((f) => existsSync(f)) ?? 'curl';
  checkInstalled([
    ['the VSIX', vsix, 'run npm run package'],
    ['curl', curl, 'apt-get install curl'],
  ]);

  // Answers are long (3,000 tokens) and streams slow (the hold step); the other requests ask for 5 tokens.
  const upstream = await startOpenAIUpstream({ credential: SECRET, streamChunks: 3000, streamDelayMs: 5 });
  const settings: Record<string, unknown> = {
    ...BASE_SETTINGS,
    'till.upstreams': { openai: `${upstream.url}/v1` },
    // Terminal keys with a token limit, so that a stream's hold shows and grows (and a model
    // without a price is still served, its spend unknown).
    'till.terminal.policy': { uses: 500, ttl: '12h', maxTokens: 1_000_000 },
    // No empty chat area on the right of the screenshots.
    'workbench.secondarySideBar.defaultVisibility': 'hidden',
  };
  const sb = createSandbox('till-ui-', settings);
  let keyring: PrivateKeyring | undefined;
  let server: CodeServer | undefined;
  let context: BrowserContext | undefined;
  let page: Page | undefined;
  // Last resort when this process exits some other way (a signal, a crash); Playwright ends
  // Chromium itself from its own exit handler.
  const onExit = (): void => {
    server?.kill('SIGKILL');
    keyring?.stop();
    if (!opts.keep) sb.remove();
  };
  process.on('exit', onExit);

  const deadline = new Deadline(t0, timeoutMs, 'set --timeout or TILL_UI_TIMEOUT');
  const timings: string[] = [];
  let stepName = 'setup';
  try {
    // Not raced against the deadline: daemons started after a lost race would outlive the run.
    // It gives up by itself within ~10 s.
    deadline.stage = 'starting the private keychain';
    keyring = noKeychain ? undefined : await startPrivateKeyring();

    deadline.stage = `installing ${path.relative(process.cwd(), vsix)}`;
    let mark = Date.now();
    const installed = await deadline.guard(installExtension(sb, vsix));
    if (!/successfully installed/i.test(installed)) throw new HarnessError(`code-server --install-extension said: ${installed}`);
    if (
      !existsSync(path.join(sb.extensionsDir, `${pkg.publisher}.${pkg.name}-${pkg.version}-linux-x64`)) &&
      !existsSync(path.join(sb.extensionsDir, `${pkg.publisher}.${pkg.name}-${pkg.version}`))
    ) {
      throw new HarnessError(`the VSIX did not land in ${sb.extensionsDir}`);
    }
    say(`installed ${path.basename(vsix)} (${((Date.now() - mark) / 1000).toFixed(1)} s)`);

    server = await spawnCodeServer(sb, {
      // The extension's keychain: a private Secret Service, never the developer's own; or a
      // session bus address where nothing listens.
      env: { DBUS_SESSION_BUS_ADDRESS: keyring ? keyring.env.DBUS_SESSION_BUS_ADDRESS! : `unix:path=${path.join(sb.tmp, 'no-dbus')}` },
      // The smoke-test driver hides notification toasts; nothing here needs it.
      smokeTestDriver: false,
      // As a fresh install meets a folder: asked whether to trust it (the first step says no).
      workspaceTrust: true,
      onOutput: opts.verbose ? (text) => process.stdout.write(prefixLines('[code-server] ', text)) : undefined,
    });
    deadline.failWith(server.exited);
    say(`code-server ${CODE_SERVER_VERSION} on ${server.origin}; fake OpenAI on ${upstream.url} (throw-away dirs in ${sb.tmp})`);
    deadline.stage = 'waiting for code-server /healthz';
    await deadline.guard(deadline.waitHealthy(server.origin));

    deadline.stage = 'launching chromium';
    context = await launchChromium(sb, deadline.remaining());
    page = context.pages()[0] ?? (await context.newPage());
    recordBrowserConsole(page, sb, opts.verbose);
    page.setDefaultTimeout(EXPECT_MS);

    deadline.stage = 'loading the workbench';
    mark = Date.now();
    await deadline.guard(
      page.goto(`${server.origin}/?folder=${encodeURIComponent(sb.workspace)}`, {
        waitUntil: 'domcontentloaded',
        timeout: deadline.remaining(),
      }),
    );
    // The Till icon in the activity bar: the workbench is up and knows the installed extension.
    await deadline.guard(
      page
        .locator('.activitybar [aria-label^="Till"]')
        .first()
        .waitFor({ timeout: Math.min(60_000, deadline.remaining()) }),
    );
    timings.push(`workbench ready: ${((Date.now() - mark) / 1000).toFixed(1)} s`);
    say('workbench ready');

    const world: World = { sb, page, upstream, settings };
    for (const [i, [name, run]] of steps.entries()) {
      stepName = `${i + 1}/${steps.length} "${name}"`;
      deadline.stage = `step ${stepName}`;
      mark = Date.now();
      await deadline.guard(run(world));
      const took = `${((Date.now() - mark) / 1000).toFixed(1)} s`;
      timings.push(`${name}: ${took}`);
      say(`ok ${i + 1}/${steps.length} ${name} (${took})`);
    }
    say(`all ${steps.length} steps passed; timings:\n${timings.map((t) => `  ${t}`).join('\n')}\n  screenshots: ${shots.join(', ')}`);
    return 0;
  } catch (err) {
    // A timeout names the stage; within a step the step is named already.
    const why = (err instanceof Error ? err.message : String(err)).replace(stepName === 'setup' ? /$^/ : ` while ${deadline.stage}`, '');
    console.error(`[till-ui ${since()}] FAILED at ${stepName === 'setup' ? 'setup' : `step ${stepName}`}: ${why}`);
    if (!(err instanceof HarnessError) && err instanceof Error && err.stack) console.error(prefixLines('  ', err.stack));
    if (page)
      await screenshot(page, 'ui-failure').then(
        (f) => console.error(`  screenshot: ${f}`),
        () => {},
      );
    console.error(`  code-server log: ${sb.serverLog}\n  browser console: ${sb.browserLog}`);
    opts.keep = true; // keep the evidence
    return 1;
  } finally {
    await context?.close().catch(() => {});
    await server?.stop();
    await upstream.close().catch(() => {});
    keyring?.stop();
    process.off('exit', onExit);
    if (opts.keep) say(`kept ${sb.tmp}`);
    else sb.remove();
  }
}

exitOnSignals('till-ui');

// Everything was ended above; exiting outright also drops whatever a lost race left pending
// (an install still running, say), and runs the 'exit' handlers as a last resort.
main().then(
  (code) => {
    say(`done in ${since()} (exit ${code})`);
    process.exit(code);
  },
  (err: unknown) => {
    console.error(err instanceof HarnessError ? `[till-ui] ${err.message}` : err);
    process.exit(1);
  },
);
