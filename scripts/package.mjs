#!/usr/bin/env node
// Packages Till into VSIXs in dist/vsix/ (run `npm run build` first; `npm run package` does both):
//
//   till-<version>.vsix               universal, with the keychain binary of THIS machine only
//                                     (for local installs; it cannot open the keychain elsewhere)
//   till-<target>-<version>.vsix      one per platform target, each with its own keychain binary
//
// The bundles leave `@napi-rs/keyring` external (it is native), so a VSIX must carry
// node_modules/@napi-rs/keyring (its loader, index.js) plus the one prebuilt binary package the
// loader picks on that platform (@napi-rs/keyring-<platform>). npm installs only the current
// platform's binary package, so the others are fetched with `npm pack` at the exact version of the
// installed @napi-rs/keyring, checked against package-lock.json's integrity, and cached in
// $TILL_CACHE/keyring-prebuilds (default ~/.cache/till).
//
// Each VSIX is built by vsce from its own staging folder holding exactly what that VSIX needs;
// .vscodeignore (an allow-list) then picks the files. vsce runs `npm ls --production` in the
// folder to find dependency files, so the other production dependencies are staged too (they
// are bundled into dist/ and the allow-list drops them). Every VSIX is then read back and
// checked: allowed paths only, one keychain binary, built for the target's OS and CPU.
//
// Usage: node scripts/package.mjs [--target <t>]... [--no-universal] [--out <dir>] [--keep-stage] [--verbose]
//   --target        package only these targets (repeatable; default: all in TARGETS)
//   --no-universal  skip the universal VSIX
//   --out           output folder. Default: dist/vsix
//   --keep-stage    keep the staging folders (printed) for inspection
//   --verbose       show vsce's own output (its file tree of each VSIX); warnings always show
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync, statSync } from 'node:fs';
import { builtinModules } from 'node:module';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { inflateRawSync } from 'node:zlib';
import { createVSIX } from '@vscode/vsce';

const ROOT = path.resolve(fileURLToPath(new URL('..', import.meta.url)));
const KEYRING = '@napi-rs/keyring';

/**
 * VS Code platform targets and the @napi-rs/keyring binary package its loader (index.js)
 * requires there. `format`/`machine` describe the binary, checked after packaging.
 */
const TARGETS = {
  'linux-x64': { binding: 'linux-x64-gnu', format: 'elf', machine: 0x3e },
  'linux-arm64': { binding: 'linux-arm64-gnu', format: 'elf', machine: 0xb7 },
  'darwin-x64': { binding: 'darwin-x64', format: 'macho', machine: 0x01000007 },
  'darwin-arm64': { binding: 'darwin-arm64', format: 'macho', machine: 0x0100000c },
  'win32-x64': { binding: 'win32-x64-msvc', format: 'pe', machine: 0x8664 },
};

/** Bundles the VSIX ships; each must exist (built by esbuild.mjs). */
const BUNDLES = ['dist/extension.js', 'dist/till.js', 'dist/webview.js'];
/** Data the bundles read at run time: the tokenizer's rank file (esbuild.mjs copies it). */
const DATA = ['dist/tokenizers/o200k_base.tiktoken'];
const DOCS = ['README.md', 'CHANGELOG.md', 'LICENSE'];
/**
 * Bare imports a bundle may leave to run time: vscode, the keychain binding, ws's optional speedups,
 * pg's optional native client (loaded only when `pg.native` is asked for, which Till never does),
 * node:sqlite (undici's probe of the runtime's features names it, loaded only by a cache store Till
 * never uses).
 */
const EXTERNAL_OK = new Set(['vscode', KEYRING, `${KEYRING}-win32-x64-msvc`]);
const EXTERNAL_OPTIONAL = new Set(['bufferutil', 'utf-8-validate', 'pg-native', 'node:sqlite']);

const say = (msg) => console.log(`[package] ${msg}`);
const fail = (msg) => {
  console.error(`[package] error: ${msg}`);
  process.exit(1);
};
const readJson = (file) => JSON.parse(readFileSync(file, 'utf8'));

function parseArgs(argv) {
  const opts = { targets: [], universal: true, out: path.join(ROOT, 'dist', 'vsix'), keepStage: false, verbose: false };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--target') opts.targets.push(argv[++i]);
    else if (a === '--no-universal') opts.universal = false;
    else if (a === '--out') opts.out = path.resolve(argv[++i]);
    else if (a === '--keep-stage') opts.keepStage = true;
    else if (a === '--verbose') opts.verbose = true;
    else fail(`unknown argument ${a}`);
  }
  for (const t of opts.targets) if (!TARGETS[t]) fail(`unknown target ${t}; known: ${Object.keys(TARGETS).join(', ')}`);
  if (!opts.targets.length) opts.targets = Object.keys(TARGETS);
  return opts;
}

// --- the keychain binary packages -------------------------------------------------------------

/** The binary package name the loader picks on this machine, e.g. `linux-x64-gnu`. */
function hostBinding() {
  const { platform, arch } = process;
  if (platform === 'linux') {
    const header = process.report?.getReport?.().header;
    return `${platform}-${arch}-${header?.glibcVersionRuntime ? 'gnu' : 'musl'}`;
  }
  if (platform === 'win32') return `${platform}-${arch}-msvc`;
  return `${platform}-${arch}`;
}

function npm(args, cwd) {
  return execFileSync(process.platform === 'win32' ? 'npm.cmd' : 'npm', args, {
    cwd,
    encoding: 'utf8',
    shell: process.platform === 'win32',
    stdio: ['ignore', 'pipe', 'inherit'],
  });
}

/**
 * A folder holding `@napi-rs/keyring-<binding>` at `version`: the installed one when it matches,
 * otherwise the cached copy, fetched on first use with `npm pack` and checked against the
 * integrity package-lock.json records for it.
 */
function bindingPackage(binding, version, lock) {
  const name = `${KEYRING}-${binding}`;
  const installed = path.join(ROOT, 'node_modules', name);
  if (existsSync(path.join(installed, 'package.json')) && readJson(path.join(installed, 'package.json')).version === version) {
    return installed;
  }
  const cacheRoot = path.join(process.env.TILL_CACHE || path.join(os.homedir(), '.cache', 'till'), 'keyring-prebuilds');
  const cached = path.join(cacheRoot, `keyring-${binding}@${version}`);
  if (existsSync(path.join(cached, 'package.json'))) return cached;

  mkdirSync(cacheRoot, { recursive: true });
  const tmp = mkdtempSync(path.join(cacheRoot, '.fetch-'));
  try {
    say(`fetching ${name}@${version} (npm pack)`);
    const [packed] = JSON.parse(npm(['pack', `${name}@${version}`, '--json', '--pack-destination', tmp], tmp));
    const tarball = path.join(tmp, packed.filename);
    const integrity = `sha512-${createHash('sha512').update(readFileSync(tarball)).digest('base64')}`;
    const locked = lock?.packages?.[`node_modules/${name}`];
    if (locked?.integrity) {
      if (locked.version !== version || locked.integrity !== integrity) {
        fail(`${name}@${version}: tarball ${integrity} does not match package-lock.json (${locked.version} ${locked.integrity})`);
      }
    } else {
      say(`warning: package-lock.json has no entry for ${name}; trusting the registry's integrity only`);
    }
    execFileSync('tar', ['-xzf', packed.filename], { cwd: tmp, stdio: 'inherit' });
    const pkg = readJson(path.join(tmp, 'package', 'package.json'));
    if (pkg.name !== name || pkg.version !== version) fail(`${tarball} holds ${pkg.name}@${pkg.version}`);
    // Move into place only once complete, so an interrupted fetch never looks cached.
    renameSync(path.join(tmp, 'package'), cached);
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return cached;
}

// --- staging ----------------------------------------------------------------------------------

/** Fails when a bundle needs a package at run time that the VSIX does not ship. */
function checkBundles() {
  const builtins = new Set(builtinModules.flatMap((m) => [m, `node:${m}`]));
  for (const file of BUNDLES) {
    const abs = path.join(ROOT, file);
    if (!existsSync(abs)) fail(`${file} is missing: run \`npm run build\` first`);
    const code = readFileSync(abs, 'utf8');
    for (const [, spec] of code.matchAll(/\brequire\(\s*["']([^"'./][^"']*)["']\s*\)/g)) {
      if (builtins.has(spec) || EXTERNAL_OK.has(spec) || EXTERNAL_OPTIONAL.has(spec)) continue;
      fail(`${file} requires '${spec}' at run time, but the VSIX ships no node_modules besides ${KEYRING}: bundle it (esbuild.mjs)`);
    }
  }
}

/** Copies `rel` (a file or folder under ROOT) into the stage, leaving out dotfiles such as .gitkeep. */
function copyIn(stage, rel, from = path.join(ROOT, rel)) {
  cpSync(from, path.join(stage, rel), {
    recursive: true,
    dereference: true,
    filter: (src) => src === from || !path.basename(src).startsWith('.'),
  });
}

/**
 * Stages the production dependencies other than the keychain binding, so that vsce's
 * `npm ls --production` in the stage finds a complete tree. The allow-list keeps them out.
 */
function stageOtherDependencies(stage, manifest) {
  const seen = new Set();
  const visit = (name, fromDir) => {
    if (name === KEYRING || name.startsWith(`${KEYRING}-`)) return;
    // Resolve as Node does: the nearest node_modules upwards from the requiring package.
    let dir = fromDir;
    let found;
    for (;;) {
      const candidate = path.join(dir, 'node_modules', name);
      if (existsSync(path.join(candidate, 'package.json'))) {
        found = candidate;
        break;
      }
      if (dir === ROOT) break;
      dir = path.dirname(dir);
    }
    if (!found || seen.has(found)) return; // a missing optional dependency, or done
    seen.add(found);
    // A package nested in another's node_modules came along with that one.
    if (![...seen].some((s) => found.startsWith(s + path.sep))) copyIn(stage, path.relative(ROOT, found), found);
    const pkg = readJson(path.join(found, 'package.json'));
    for (const dep of Object.keys({ ...pkg.dependencies, ...pkg.optionalDependencies })) visit(dep, found);
  };
  for (const dep of Object.keys(manifest.dependencies ?? {})) visit(dep, ROOT);
}

function stageFolder(label, manifest, bindingName, bindingDir) {
  const stage = mkdtempSync(path.join(os.tmpdir(), `till-vsix-${label}-`));
  for (const f of ['package.json', '.vscodeignore', ...DOCS, ...BUNDLES, ...DATA, 'media']) copyIn(stage, f);
  copyIn(stage, `node_modules/${KEYRING}`);
  copyIn(stage, `node_modules/${KEYRING}-${bindingName}`, bindingDir);
  stageOtherDependencies(stage, manifest);
  return stage;
}

// --- checking a VSIX --------------------------------------------------------------------------

/** Reads a zip's central directory: name, sizes and a reader for each entry. */
function readZip(file) {
  const buf = readFileSync(file);
  let eocd = buf.length - 22;
  while (eocd >= 0 && buf.readUInt32LE(eocd) !== 0x06054b50) eocd--;
  if (eocd < 0) throw new Error(`${file}: not a zip`);
  const count = buf.readUInt16LE(eocd + 10);
  let p = buf.readUInt32LE(eocd + 16);
  const entries = [];
  for (let i = 0; i < count; i++) {
    if (buf.readUInt32LE(p) !== 0x02014b50) throw new Error(`${file}: bad central directory`);
    const method = buf.readUInt16LE(p + 10);
    const compressed = buf.readUInt32LE(p + 20);
    const size = buf.readUInt32LE(p + 24);
    const nameLen = buf.readUInt16LE(p + 28);
    const extraLen = buf.readUInt16LE(p + 30);
    const commentLen = buf.readUInt16LE(p + 32);
    const local = buf.readUInt32LE(p + 42);
    const name = buf.toString('utf8', p + 46, p + 46 + nameLen);
    const read = () => {
      const start = local + 30 + buf.readUInt16LE(local + 26) + buf.readUInt16LE(local + 28);
      const raw = buf.subarray(start, start + compressed);
      return method === 0 ? raw : inflateRawSync(raw);
    };
    entries.push({ name, size, compressed, read });
    p += 46 + nameLen + extraLen + commentLen;
  }
  return { size: buf.length, entries };
}

/** The OS format and CPU a native binary was built for. */
function binaryKind(bin) {
  if (bin.readUInt32BE(0) === 0x7f454c46) return { format: 'elf', machine: bin.readUInt16LE(18) };
  if (bin.readUInt32LE(0) === 0xfeedfacf) return { format: 'macho', machine: bin.readUInt32LE(4) };
  if (bin.toString('latin1', 0, 2) === 'MZ') {
    const pe = bin.readUInt32LE(0x3c);
    if (bin.toString('latin1', pe, pe + 4) === 'PE\0\0') return { format: 'pe', machine: bin.readUInt16LE(pe + 4) };
  }
  return { format: 'unknown', machine: 0 };
}

const ALLOWED = [
  /^extension\.vsixmanifest$/,
  /^\[Content_Types\]\.xml$/,
  /^extension\/package\.json$/,
  /^extension\/(readme|changelog)\.md$/i,
  /^extension\/license(\.txt|\.md)?$/i,
  /^extension\/dist\/(extension|till|webview)\.js$/,
  /^extension\/dist\/tokenizers\/o200k_base\.tiktoken$/,
  /^extension\/media\/[^.][^/]*(\/[^.][^/]*)*$/,
  /^extension\/node_modules\/@napi-rs\/keyring\/(package\.json|index\.js|LICENSE)$/,
  /^extension\/node_modules\/@napi-rs\/keyring-[a-z0-9-]+\/(package\.json|keyring\.[a-z0-9-]+\.node|LICENSE[^/]*)$/,
];

function checkVsix(file, bindingName, expect) {
  const zip = readZip(file);
  const names = zip.entries.map((e) => e.name);
  const stray = names.filter((n) => !ALLOWED.some((re) => re.test(n)));
  if (stray.length) fail(`${path.basename(file)} holds files outside the allow-list: ${stray.join(', ')}`);
  const required = [
    'extension/package.json',
    ...[...BUNDLES, ...DATA].map((b) => `extension/${b}`),
    `extension/node_modules/${KEYRING}/package.json`,
    `extension/node_modules/${KEYRING}/index.js`,
    `extension/node_modules/${KEYRING}-${bindingName}/package.json`,
    `extension/node_modules/${KEYRING}-${bindingName}/keyring.${bindingName}.node`,
    'extension/media/icon.png',
  ];
  const missing = required.filter((r) => !names.includes(r));
  if (missing.length) fail(`${path.basename(file)} lacks ${missing.join(', ')}`);
  const natives = zip.entries.filter((e) => e.name.endsWith('.node'));
  if (natives.length !== 1)
    fail(`${path.basename(file)} holds ${natives.length} native binaries: ${natives.map((e) => e.name).join(', ')}`);
  if (expect) {
    const kind = binaryKind(natives[0].read());
    if (kind.format !== expect.format || kind.machine !== expect.machine) {
      fail(
        `${natives[0].name} is ${kind.format}/0x${kind.machine.toString(16)}, expected ${expect.format}/0x${expect.machine.toString(16)}`,
      );
    }
  }
  return zip;
}

// --- main -------------------------------------------------------------------------------------

const opts = parseArgs(process.argv.slice(2));
const manifest = readJson(path.join(ROOT, 'package.json'));
const keyringVersion = readJson(path.join(ROOT, 'node_modules', KEYRING, 'package.json')).version;
const lock = existsSync(path.join(ROOT, 'package-lock.json')) ? readJson(path.join(ROOT, 'package-lock.json')) : undefined;
checkBundles();
for (const f of [...DOCS, 'media/icon.png']) if (!existsSync(path.join(ROOT, f))) fail(`${f} is missing`);

mkdirSync(opts.out, { recursive: true });
for (const f of readdirSync(opts.out)) {
  // Drop other versions' VSIXs; this version's are overwritten only when rebuilt.
  if (f.startsWith(`${manifest.name}-`) && f.endsWith('.vsix') && !f.endsWith(`-${manifest.version}.vsix`)) rmSync(path.join(opts.out, f));
}

const jobs = [];
if (opts.universal) {
  const host = hostBinding();
  const expect = Object.values(TARGETS).find((t) => t.binding === host);
  jobs.push({ label: 'universal', target: undefined, binding: host, expect });
}
for (const t of opts.targets) jobs.push({ label: t, target: t, binding: TARGETS[t].binding, expect: TARGETS[t] });

const built = [];
for (const job of jobs) {
  const dir = bindingPackage(job.binding, keyringVersion, lock);
  const stage = stageFolder(job.label, manifest, job.binding, dir);
  const packagePath = path.join(
    opts.out,
    job.target ? `${manifest.name}-${job.target}-${manifest.version}.vsix` : `${manifest.name}-${manifest.version}.vsix`,
  );
  try {
    say(`${job.label}: ${KEYRING}-${job.binding}@${keyringVersion}${opts.keepStage ? ` (stage ${stage})` : ''}`);
    // vsce prints a file tree per VSIX through console.log; the summary below says the same.
    const log = console.log;
    if (!opts.verbose) console.log = () => {};
    try {
      await createVSIX({ cwd: stage, packagePath, target: job.target, dependencies: true, useYarn: false });
    } finally {
      console.log = log;
    }
  } finally {
    if (!opts.keepStage) rmSync(stage, { recursive: true, force: true });
  }
  const zip = checkVsix(packagePath, job.binding, job.expect);
  built.push({ file: path.relative(ROOT, packagePath), zip, binding: job.binding });
}

const kb = (n) => `${(n / 1024).toFixed(0)} KB`;
console.log('');
for (const { file, zip, binding } of built) {
  const unpacked = zip.entries.reduce((s, e) => s + e.size, 0);
  console.log(
    `${file.padEnd(40)} ${kb(zip.size).padStart(8)}  (${zip.entries.length} files, ${kb(unpacked)} unpacked, keyring-${binding})`,
  );
}
const first = built[0];
if (first) {
  console.log(`\ncontents of ${path.basename(first.file)} (the others differ only in the keyring-<platform> folder):`);
  for (const e of first.zip.entries) console.log(`  ${kb(e.size).padStart(8)}  ${e.name}`);
}
