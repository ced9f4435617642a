/**
 * The bundled `till` command, for the integrated terminals: a launcher written where the
 * extension host runs (in a remote window: the container, WSL distro or SSH host, where its
 * terminals run too), put first on their PATH. It runs `dist/till.js` with the extension host's
 * own Node (Electron's, run as Node, on the desktop) against this window's data folder, so
 * `till ls` or `till exec --agent claude -- claude` in a dev container terminal talk to the
 * window's broker over the control channel, with nothing to install.
 */
import { chmodSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

/** A value as one single-quoted POSIX shell word. */
const shellWord = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

/**
 * Writes the launcher (`till`, and `till.cmd` on Windows) into `binDir`, replacing an older one,
 * and returns the folder to put on PATH.
 */
export function writeTillLauncher(binDir: string, tillJs: string, home: string, node = process.execPath): string {
  mkdirSync(binDir, { recursive: true, mode: 0o700 });
  if (process.platform === 'win32') {
    const cmd = `@echo off\r\nset ELECTRON_RUN_AS_NODE=1\r\nset "TILL_HOME=${home}"\r\n"${node}" "${tillJs}" %*\r\n`;
    writeFileSync(join(binDir, 'till.cmd'), cmd);
  } else {
    const file = join(binDir, 'till');
    const sh = `#!/bin/sh\n# Written by the Till extension: the bundled \`till\` command, on this window's data folder.\nELECTRON_RUN_AS_NODE=1 TILL_HOME=${shellWord(home)} exec ${shellWord(node)} ${shellWord(tillJs)} "$@"\n`;
    writeFileSync(file, sh, { mode: 0o700 });
    chmodSync(file, 0o700);
  }
  return binDir;
}
