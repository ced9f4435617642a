/**
 * How late this process's event loop has run lately: the longest delay of the last few seconds.
 *
 * A stream's hold is checked only when Till reads the stream's data (holds/streamHold.ts). While
 * the event loop is late (the machine is starved of CPU, the process was descheduled, another
 * socket kept it busy), the upstream goes on generating into the kernel's buffers, and the next
 * read brings that much more at once. A hold that stays that far ahead of the stream covers it,
 * so the margin a stream holds grows with this figure. Lateness comes in spells (a busy machine
 * stays busy), so the figure is the worst of the last {@link WINDOWS} windows of {@link WINDOW_MS},
 * not only the current one.
 *
 * Measured by Node's own event-loop delay histogram (perf_hooks), a native timer that costs
 * nothing on the request path; started by the first stream that asks and never keeping the
 * process alive.
 */
import { monitorEventLoopDelay, type IntervalHistogram } from 'node:perf_hooks';

const WINDOW_MS = 1000;
const WINDOWS = 4;
/** The histogram samples the loop this often; a delay shorter than this is not seen, and matters not. */
const RESOLUTION_MS = 10;

let histogram: IntervalHistogram | undefined;
/** The worst delay of each finished window (ms), newest last, and the worst of them. */
const windows: number[] = [];
let worstPast = 0;

/** The longest event-loop delay of the last few seconds, in milliseconds (0 when the loop keeps time). */
export function recentLoopLagMs(): number {
  if (!histogram) start();
  return Math.max(lateness(), worstPast);
}

/** The histogram times its whole interval; what is past the resolution is lateness. */
function lateness(): number {
  return Math.max(0, histogram!.max / 1e6 - RESOLUTION_MS);
}

function start(): void {
  histogram = monitorEventLoopDelay({ resolution: RESOLUTION_MS });
  histogram.enable();
  setInterval(() => {
    windows.push(lateness());
    if (windows.length > WINDOWS - 1) windows.shift();
    worstPast = Math.max(...windows);
    histogram!.reset();
  }, WINDOW_MS).unref();
}
