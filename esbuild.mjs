// Bundles the extension entry, the `till` command, the webview script, the benchmark and the
// real-VS-Code test suite with its runners.
// The keychain binding is native (N-API) and stays external: it ships in node_modules.
import * as esbuild from 'esbuild';

const watch = process.argv.includes('--watch');
const common = {
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'cjs',
  sourcemap: true,
  external: ['vscode', '@napi-rs/keyring', '@napi-rs/keyring-*', 'bufferutil', 'utf-8-validate'],
  logLevel: 'warning',
};

const builds = [
  { ...common, entryPoints: { extension: 'src/vscode/extension.ts' }, outdir: 'dist' },
  { ...common, entryPoints: { till: 'src/cli/main.ts' }, outdir: 'dist', banner: { js: '#!/usr/bin/env node' } },
  { ...common, entryPoints: { bench: 'bench/run.ts' }, outdir: 'dist' },
  { ...common, platform: 'browser', format: 'iife', target: 'es2022', entryPoints: { webview: 'src/webview/main.ts' }, outdir: 'dist' },
  // Tests inside a real VS Code (test/vscode/README.md): the suite runs in the extension host
  // (mocha bundled in), the runner under plain Node drives code-server and Chromium.
  // Mocha's parallel mode (never used here) resolves worker files at run time: not a problem.
  { ...common, entryPoints: { 'test/suite': 'test/vscode/suite/index.ts' }, outdir: 'dist', logOverride: { 'require-resolve-not-external': 'silent' } },
  { ...common, entryPoints: { 'test/run': 'test/vscode/run.ts' }, outdir: 'dist', external: [...common.external, 'playwright-core'] },
  // A person's clicks against the installed VSIX (npm run test:ui), driven the same way.
  { ...common, entryPoints: { 'test/ui': 'test/vscode/ui.ts' }, outdir: 'dist', external: [...common.external, 'playwright-core'] },
  { ...common, entryPoints: { 'test/electron': 'test/vscode/electron.ts' }, outdir: 'dist', external: [...common.external, '@vscode/test-electron'] },
];

if (watch) {
  for (const b of builds) await (await esbuild.context(b)).watch();
} else {
  await Promise.all(builds.map((b) => esbuild.build(b)));
}
