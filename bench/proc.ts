/**
 * CPU time and peak memory of another process, read from /proc (Linux). CPU time is
 * utime + stime from /proc/<pid>/stat, in clock ticks (usually 10 ms): phases are long
 * enough that this resolution is under a few percent.
 */
import { execFileSync } from 'node:child_process';
import { readdirSync, readFileSync } from 'node:fs';

let ticksPerSecond: number | undefined;

function clockTicks(): number {
  if (ticksPerSecond === undefined) {
    try {
      ticksPerSecond = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100;
    } catch {
      ticksPerSecond = 100;
    }
  }
  return ticksPerSecond;
}

/** The fields of /proc/<pid>/stat after the command name (which may hold spaces): [0] is field 3 (state). */
function statFields(pid: number | string): string[] {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** Total CPU time (user + system, all threads) of a process, in µs. */
export function cpuMicros(pid: number): number {
  const fields = statFields(pid);
  const utime = Number(fields[11]);
  const stime = Number(fields[12]);
  return ((utime + stime) * 1e6) / clockTicks();
}

/**
 * CPU time (µs) of a process and its children: its own, that of the children it has reaped
 * (cutime + cstime), and that of its children running now. For a server that forks a process
 * per connection and helpers beside them (PostgreSQL's postmaster): the delta over a phase is
 * what the whole server spent, whether a child lived through the phase, started or ended in it.
 */
export function familyCpuMicros(pid: number): number {
  const own = statFields(pid);
  let ticks = Number(own[11]) + Number(own[12]) + Number(own[13]) + Number(own[14]);
  const parent = String(pid);
  for (const name of readdirSync('/proc')) {
    if (name.charCodeAt(0) > 57 || name.charCodeAt(0) < 48) continue;
    let fields: string[];
    try {
      fields = statFields(name);
    } catch {
      continue; // ended meanwhile (then counted in its parent's cutime, if it was a child)
    }
    if (fields[1] === parent) ticks += Number(fields[11]) + Number(fields[12]);
  }
  return (ticks * 1e6) / clockTicks();
}

/** CPU time (µs) the whole machine spent busy since boot, all cores: user, nice, system, irq, softirq, steal. */
export function machineBusyMicros(): number {
  const line = readFileSync('/proc/stat', 'utf8').split('\n', 1)[0]!;
  const [user, nice, system, , , irq, softirq, steal] = line.trim().split(/\s+/).slice(1).map(Number);
  return (((user ?? 0) + (nice ?? 0) + (system ?? 0) + (irq ?? 0) + (softirq ?? 0) + (steal ?? 0)) * 1e6) / clockTicks();
}

/** Peak resident set size (VmHWM) of a process, in KiB. */
export function peakRssKiB(pid: number): number {
  const m = /^VmHWM:\s+(\d+)\s+kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmHWM in /proc/${pid}/status`);
  return Number(m[1]);
}

/**
 * Pins every thread of `pid` to `cores` (a taskset list: `1`, `0-2`); threads it starts later
 * inherit it. False when it could not (no taskset, or not permitted).
 */
export function pinToCores(pid: number, cores: string): boolean {
  try {
    execFileSync('taskset', ['-a', '-p', '-c', cores, String(pid)], { stdio: 'ignore' });
    return true;
  } catch {
    return false;
  }
}

/** The CPU model, for the report. */
export function cpuModel(): string {
  try {
    const m = /^model name\s*:\s*(.+)$/m.exec(readFileSync('/proc/cpuinfo', 'utf8'));
    return m?.[1]?.trim() ?? 'unknown';
  } catch {
    return 'unknown';
  }
}
