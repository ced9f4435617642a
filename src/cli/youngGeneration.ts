/**
 * Keeps the `till serve` process's young generation (V8's new space, where every request's
 * short-lived objects are born) at most {@link NEW_SPACE_CAP} bytes.
 *
 * V8 grows the new space each time as many bytes have survived collections since its last
 * growth as it holds, up to 32 MiB. Objects that outlive one collection (a request in flight
 * at 32 at once, the last requests a late-opening view is shown) make a broker reach that
 * ceiling within seconds of load, where a plain node:http proxy stays at 16 MiB: measured, the
 * 16 extra MiB were most of what `till serve` took beyond such a proxy (about 95 against 72 MiB),
 * for no CPU saved (a collection's cost is what survives it, not the space's size).
 *
 * V8 sizes its heap when the process starts (`--max-semi-space-size`), before Till runs, and
 * people start `till serve` with plain `node`. So once the new space has reached the cap, the
 * factor it grows by is set to 1, which V8 reads at each growth: it stays where it is. Only
 * this process: the extension's broker runs in VS Code's extension host, whose heap is not Till's.
 */
import { PerformanceObserver } from 'node:perf_hooks';
import * as v8 from 'node:v8';

/** Two semi-spaces of 8 MiB: where a plain node:http proxy's new space settles under load. */
export const NEW_SPACE_CAP = 16 * 1024 * 1024;

function newSpaceBytes(): number {
  return v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space')?.space_size ?? 0;
}

/** Starts watching collections; stops growth (and watching) once the new space reaches the cap. */
export function capYoungGeneration(cap = NEW_SPACE_CAP): void {
  const check = (): boolean => {
    if (newSpaceBytes() < cap) return false;
    v8.setFlagsFromString('--semi-space-growth-factor=1');
    return true;
  };
  if (check()) return;
  const observer = new PerformanceObserver(() => {
    if (check()) observer.disconnect();
  });
  observer.observe({ entryTypes: ['gc'] });
}
