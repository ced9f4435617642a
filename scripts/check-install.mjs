// Runs first in `npm start`, `npm test` and `npm run bench` (see package.json): in a clone where
// `npm ci` has not run, or has not run since package-lock.json changed, it says so in one line
// and exits 1, instead of a module-not-found stack from esbuild, vitest or tsc further on.
// No dependencies of its own (it checks that they are there); Node 14 and later can run it, so an
// old Node gets the Node version message rather than a syntax error.
import { existsSync, readFileSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const fail = (msg) => {
  console.error(`[till] ${msg}`);
  process.exit(1);
};
const readJson = (file) => JSON.parse(readFileSync(file, 'utf8'));

const major = Number(process.versions.node.split('.')[0]);
if (major < 20) fail(`Node.js ${process.version} is too old: Till needs Node.js 20 or newer`);

const pkg = readJson(path.join(root, 'package.json'));
let lock = { packages: {} };
try {
  lock = readJson(path.join(root, 'package-lock.json'));
} catch {
  // no lockfile: check presence only
}
const names = Object.keys({ ...pkg.dependencies, ...pkg.devDependencies });
const missing = [];
const stale = [];
for (const name of names) {
  const file = path.join(root, 'node_modules', name, 'package.json');
  if (!existsSync(file)) {
    missing.push(name);
    continue;
  }
  const wanted = lock.packages?.[`node_modules/${name}`]?.version;
  const installed = readJson(file).version;
  if (wanted && installed !== wanted) stale.push(`${name} ${installed}, package-lock.json has ${wanted}`);
}

if (missing.length === names.length) fail('the dependencies are not installed: run npm ci first');
const list = (items) => (items.length > 3 ? `${items.slice(0, 3).join('; ')} and ${items.length - 3} more` : items.join('; '));
if (missing.length) fail(`node_modules is incomplete (missing ${list(missing)}): run npm ci first`);
if (stale.length) fail(`node_modules is out of date (${list(stale)}): run npm ci first`);
