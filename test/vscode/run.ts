/**
 * Runs the extension-host test suite (dist/test/suite.js) inside a real VS Code: code-server
 * on 127.0.0.1 plus headless Chromium driven by playwright-core. Bundled to dist/test/run.js
 * and run under plain Node; `npm run test:vscode` builds, installs and runs it. Exit code is
 * the suite's, or 1 when the harness itself fails. See test/vscode/README.md.
 *
 * Options (after `npm run test:vscode --`):
 *   --grep <pattern>   run only tests whose full title matches
 *   --timeout <s>      overall limit, spawn to suite end. Default: 180 (or TILL_VSCODE_TIMEOUT)
 *   --keep             keep the throw-away dirs (profile, logs of code-server) for a look
 *   --verbose          print code-server's own output and the browser console as they come
 */
import { startPrivateKeyring } from '../support/keyring';
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import { format, parseArgs } from 'node:util';
import type { BrowserContext, Page } from 'playwright-core';
import {
  BASE_SETTINGS,
  CODE_SERVER_VERSION,
  Deadline,
  HarnessError,
  KNOWN_NOISE,
  checkInstalled,
  createSandbox,
  launchChromium,
  logger,
  prefixLines,
  recordBrowserConsole,
  repoRoot,
  screenshot,
  spawnCodeServer,
  type CodeServer,
  exitOnSignals,
} from './harness';

const suitePath = path.join(repoRoot, 'dist', 'test', 'suite.js');
/** What the suite logs to have the runner open a second window. */
const OPEN_SECOND_WINDOW = '[till-test] open a second window';

const { values: opts } = parseArgs({
  options: {
    grep: { type: 'string' },
    timeout: { type: 'string' },
    keep: { type: 'boolean', default: false },
    // No Secret Service on the server side (no D-Bus session), as in a dev container: the no-keychain suite.
    'no-keychain': { type: 'boolean', default: false },
    verbose: { type: 'boolean', default: false },
  },
});
const timeoutMs = Number(opts.timeout ?? process.env.TILL_VSCODE_TIMEOUT ?? 180) * 1000;

const t0 = Date.now();
const { since, say } = logger('till-vscode', t0);

async function main(): Promise<number> {
  checkInstalled();
  if (!existsSync(suitePath)) throw new HarnessError(`${suitePath} missing: run npm run build`);

  // Everything the editor and the browser write goes under one throw-away dir.
  const sb = createSandbox('till-vscode-', { ...BASE_SETTINGS });

  let server: CodeServer | undefined;
  let context: BrowserContext | undefined;
  let page: Page | undefined;
  // Last resort when this process exits some other way (a signal, a crash); Playwright ends
  // Chromium itself from its own exit handler.
  const onExit = (): void => {
    server?.kill('SIGKILL');
    if (!opts.keep) sb.remove();
  };
  process.on('exit', onExit);

  const keyring = opts['no-keychain'] ? undefined : await startPrivateKeyring();
  process.on('exit', () => keyring?.stop());
  try {
    server = await spawnCodeServer(sb, {
      env: {
        // The extension's keychain: a private Secret Service, never the developer's own; or, with
        // --no-keychain, a session bus address where nothing listens (none inherited from here).
        DBUS_SESSION_BUS_ADDRESS: keyring ? keyring.env.DBUS_SESSION_BUS_ADDRESS! : `unix:path=${path.join(sb.tmp, 'no-dbus')}`,
        ...(keyring ? {} : { TILL_TEST_SUITE: 'no-keychain' }),
        ...(opts.grep ? { TILL_TEST_GREP: opts.grep } : {}),
      },
      onOutput: opts.verbose ? (text) => process.stdout.write(prefixLines('[code-server] ', text)) : undefined,
    });
    const { origin } = server;
    say(`code-server ${CODE_SERVER_VERSION} on ${origin} (throw-away dirs in ${sb.tmp})`);
    const deadline = new Deadline(t0, timeoutMs, 'set --timeout or TILL_VSCODE_TIMEOUT');
    deadline.failWith(server.exited);
    const remaining = (): number => deadline.remaining();

    deadline.stage = 'waiting for code-server /healthz';
    await deadline.guard(deadline.waitHealthy(origin));
    say('code-server healthy');

    deadline.stage = 'launching chromium';
    context = await launchChromium(sb, deadline.remaining());
    page = context.pages()[0] ?? (await context.newPage());

    let exitCode: (code: number) => void = () => {};
    const suiteEnded = new Promise<number>((resolve) => (exitCode = resolve));
    const workbenchLogs: Array<{ relativePath: string; contents: string }> = [];
    let ended = false;
    // The workbench calls these once the smoke-test driver is on (see README.md). The log gets
    // workbench log lines and, while tests run, the extension host's console (mocha's reporter,
    // the tests' console.log): each call carries one console call's arguments.
    // The suite asks for a second window (another VS Code window on the same machine, with its
    // own extension host) by logging this line; it runs the extension under test, no tests.
    const secondWorkspace = path.join(sb.tmp, 'window-two');
    mkdirSync(secondWorkspace, { recursive: true });
    const openSecondWindow = async (): Promise<void> => {
      const second = await context!.newPage();
      recordBrowserConsole(second, sb, opts.verbose);
      const devOnly = [['extensionDevelopmentPath', `vscode-remote://remote${repoRoot}`]];
      await second.goto(
        `${server!.origin}/?folder=${encodeURIComponent(secondWorkspace)}&payload=${encodeURIComponent(JSON.stringify(devOnly))}`,
        { waitUntil: 'domcontentloaded' },
      );
      say('second window opened');
    };
    await page.exposeFunction('codeAutomationLog', (level: string, args: unknown) => {
      const text = Array.isArray(args) ? format(...(args as unknown[])) : String(args);
      if (text.includes(OPEN_SECOND_WINDOW)) void openSecondWindow().catch((err: unknown) => say(`second window failed: ${String(err)}`));
      // After the suite, the workbench only complains about the extension host being gone.
      if (!opts.verbose && (ended || KNOWN_NOISE.some((re) => re.test(text)))) return;
      console.log(prefixLines(level === 'info' ? '' : `[${level}] `, text).replace(/\n$/, ''));
    });
    await page.exposeFunction('codeAutomationExit', (code: number, logs?: typeof workbenchLogs) => {
      ended = true;
      if (Array.isArray(logs)) workbenchLogs.push(...logs);
      exitCode(code);
    });
    recordBrowserConsole(page, sb, opts.verbose);

    const payload = [
      ['extensionDevelopmentPath', `vscode-remote://remote${repoRoot}`],
      ['extensionTestsPath', `vscode-remote://remote${suitePath}`],
    ];
    const url = `${origin}/?folder=${encodeURIComponent(sb.workspace)}&payload=${encodeURIComponent(JSON.stringify(payload))}`;
    deadline.stage = 'loading the workbench';
    await deadline.guard(page.goto(url, { waitUntil: 'domcontentloaded', timeout: remaining() }));
    say('workbench page loaded; waiting for the suite');
    deadline.stage = 'waiting for the suite to end (codeAutomationExit)';
    void page
      .waitForSelector('.monaco-workbench', { timeout: remaining() })
      .then(() => say('workbench rendered'))
      .catch(() => {});

    const code = await deadline.guard(suiteEnded);
    say(`suite ended with exit code ${code}`);
    if (code !== 0) opts.keep = true; // keep the evidence
    if (opts.keep) saveLogs(sb.tmp, workbenchLogs);
    say(`screenshot: ${await screenshot(page, 'last-run')}`);
    return code;
  } catch (err) {
    if (page)
      await screenshot(page, 'last-run').then(
        (f) => say(`screenshot: ${f}`),
        () => {},
      );
    console.error(
      `[till-vscode ${since()}] FAILED: ${err instanceof HarnessError ? err.message : err instanceof Error ? err.stack : String(err)}`,
    );
    console.error(`  code-server log: ${sb.serverLog}\n  browser console: ${sb.browserLog}`);
    opts.keep = true; // keep the evidence
    return 1;
  } finally {
    await context?.close().catch(() => {});
    await server?.stop();
    process.off('exit', onExit);
    if (opts.keep) say(`kept ${sb.tmp}`);
    else sb.remove();
  }
}

function saveLogs(tmp: string, logs: Array<{ relativePath: string; contents: string }>): void {
  for (const { relativePath, contents } of logs) {
    const file = path.join(tmp, 'workbench-logs', relativePath);
    if (!file.startsWith(path.join(tmp, 'workbench-logs') + path.sep)) continue;
    mkdirSync(path.dirname(file), { recursive: true });
    writeFileSync(file, contents);
  }
  if (logs.length) say(`workbench logs: ${path.join(tmp, 'workbench-logs')}`);
}

exitOnSignals('till-vscode');

main().then(
  (code) => {
    say(`done in ${since()} (exit ${code})`);
    process.exitCode ||= code;
  },
  (err: unknown) => {
    console.error(err instanceof HarnessError ? `[till-vscode] ${err.message}` : err);
    process.exitCode = 1;
  },
);
