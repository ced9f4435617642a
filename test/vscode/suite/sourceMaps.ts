/**
 * Failure stacks that point at the test sources. The extension host installs its own
 * `Error.prepareStackTrace`, so Node's `--enable-source-maps` never applies there; this maps
 * frames of this bundle through its .map file by hand and drops mocha's own frames.
 */
import { readFileSync } from 'node:fs';
import { SourceMap } from 'node:module';
import * as path from 'node:path';

let map: SourceMap | null | undefined;

function load(): SourceMap | null {
  if (map === undefined) {
    try {
      map = new SourceMap(JSON.parse(readFileSync(`${__filename}.map`, 'utf8')));
    } catch {
      map = null; // no map next to the bundle: leave stacks alone
    }
  }
  return map;
}

/** `stack` with this bundle's frames rewritten to `test/vscode/suite/x.ts:line:col`. */
export function mapStack(stack: string): string {
  const sm = load();
  if (!sm) return stack;
  const bundle = path.basename(__filename).replace(/[.]/g, '\\.');
  const frame = new RegExp(`[^\\s()]*${bundle}:(\\d+):(\\d+)`, 'g');
  const repoRoot = path.resolve(__dirname, '..', '..');
  return stack
    .split('\n')
    .map((line) =>
      line.replace(frame, (whole, l: string, c: string) => {
        const entry = sm.findEntry(Number(l) - 1, Number(c) - 1) as Partial<{
          originalSource: string;
          originalLine: number;
          originalColumn: number;
        }>;
        if (!entry.originalSource || entry.originalLine === undefined || entry.originalColumn === undefined) return whole;
        const source = path.relative(repoRoot, path.resolve(__dirname, entry.originalSource.replace(/^file:\/\//, '')));
        return `${source}:${entry.originalLine + 1}:${entry.originalColumn + 1}`;
      }),
    )
    .filter((line) => !/^\s*at .*node_modules[\\/]mocha[\\/]/.test(line))
    .join('\n');
}
