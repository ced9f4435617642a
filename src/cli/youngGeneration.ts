/**
 * Keeps the `till serve` process's young generation (V8's new space, where every request's
 * short-lived objects are born) at most {@link NEW_SPACE_CAP} bytes.
 *
 * V8 grows the new space each time as many bytes have survived collections since its last
 * growth as it holds, up to 32 MiB on Node 20 (128 MiB on Node 24). Objects that outlive one
 * collection (a request in flight at 32 at once, the last requests a late-opening view is shown)
 * make a broker reach that ceiling within seconds of load, where a plain node:http proxy stays at
 * 16 MiB: measured on Node 20, the 16 extra MiB were most of what `till serve` took beyond such a
 * proxy (about 95 against 72 MiB; on Node 24, 129 against 88, and 112 with the cap), for no CPU
 * saved (a collection's cost is what survives it, not the space's size).
 *
 * V8 sizes its heap when the process starts (`--max-semi-space-size`), before Till runs, and
 * people start `till serve` with plain `node`. So the factor the new space grows by, which V8
 * reads at each growth, is set to 1 once growing would pass the cap (it stays where it is) and
 * back to V8's 2 below that: V8 shrinks the new space of an idle process, and a broker busy again
 * must grow it back to the cap. Checked after each collection (a `gc` performance entry). Only
 * this process: the extension's broker runs in VS Code's extension host, whose heap is not Till's.
 */
import { PerformanceObserver } from 'node:perf_hooks';
import * as v8 from 'node:v8';

/** Two semi-spaces of 8 MiB: where a plain node:http proxy's new space settles under load. */
export const NEW_SPACE_CAP = 16 * 1024 * 1024;

/** V8's own growth factor (`--semi-space-growth-factor`). */
const V8_GROWTH_FACTOR = 2;

function newSpaceBytes(): number {
  return v8.getHeapSpaceStatistics().find((s) => s.space_name === 'new_space')?.space_size ?? 0;
}

/** Keeps the new space at most `cap` bytes from now on, for the life of the process. */
export function capYoungGeneration(cap = NEW_SPACE_CAP): void {
  let held = false;
  const check = (): void => {
    // Held once a growth would pass the cap (V8 may have shrunk it to a size that doubles past it).
    const hold = newSpaceBytes() * V8_GROWTH_FACTOR > cap;
    if (hold === held) return;
    held = hold;
    v8.setFlagsFromString(`--semi-space-growth-factor=${hold ? 1 : V8_GROWTH_FACTOR}`);
  };
  check();
  new PerformanceObserver(check).observe({ entryTypes: ['gc'] });
}
