/** Child processes the tests run to completion: their output, their exit, a time limit. */
import type { ChildProcess } from 'node:child_process';

/** How a finished child exited, and what it printed. */
export interface RunResult {
  code: number | null;
  stdout: string;
  stderr: string;
}

/**
 * Collects a child's stdout and stderr until it closes. After `timeoutMs` the child is killed and
 * `done` fails, naming `what` and what it printed. `onData` sees each chunk as it comes.
 */
export function collectOutput(
  child: ChildProcess,
  what: string,
  timeoutMs: number,
  onData?: (chunk: Buffer) => void,
): { output(): string; done: Promise<RunResult> } {
  let stdout = '';
  let stderr = '';
  child.stdout?.on('data', (c: Buffer) => {
    stdout += c;
    onData?.(c);
  });
  child.stderr?.on('data', (c: Buffer) => {
    stderr += c;
    onData?.(c);
  });
  const done = new Promise<RunResult>((resolve, reject) => {
    const timer = setTimeout(() => {
      child.kill('SIGKILL');
      reject(new Error(`${what} did not finish within ${timeoutMs} ms\nstdout: ${stdout}\nstderr: ${stderr}`));
    }, timeoutMs);
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    });
  });
  return { output: () => stdout + stderr, done };
}
