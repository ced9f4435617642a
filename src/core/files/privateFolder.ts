/**
 * Folders and files only this OS user can change, and writes into them that never follow a link.
 *
 * Guarantees, on Linux and macOS (Windows folders are guarded by ACLs, which Till leaves to the
 * OS, so there every check passes):
 * - A folder Till trusts (the data folder, the control socket's folder) is owned by this user and
 *   not writable by group or others, and no folder above it lets another user swap it: each is
 *   owned by this user or root and writable by no one else, or sticky (like `/tmp`).
 * - A file Till reads or replaces in such a folder is a regular file owned by this user and
 *   writable by no one else; a symbolic link is refused, never followed.
 * - Files are replaced through a temporary file created exclusively (a planted link makes the
 *   create fail instead of redirecting the write) and an atomic rename.
 * Each refusal is a {@link PrivateFolderError} whose message says what is wrong and how to mend it.
 */
import {
  closeSync,
  constants,
  fstatSync,
  fsyncSync,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  realpathSync,
  renameSync,
  rmSync,
  writeSync,
  type Stats,
} from 'node:fs';
import { dirname } from 'node:path';

/** Thrown when a folder or file cannot be trusted; nothing was read from it or written to it. */
export class PrivateFolderError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PrivateFolderError';
  }
}

const CHECKED = process.platform !== 'win32' && typeof process.getuid === 'function';
const uid = (): number => process.getuid!();
const gid = (): number => process.getgid?.() ?? -1;
// Absent on Windows, where the checks are off.
const NOFOLLOW = constants.O_NOFOLLOW ?? 0;

function octal(mode: number): string {
  return (mode & 0o7777).toString(8).padStart(4, '0');
}

function statOrUndefined(path: string): Stats | undefined {
  return lstatSync(path, { throwIfNoEntry: false });
}

/** Why a folder above a trusted one would let another user replace what is below it, or undefined. */
function ancestorProblem(dir: string, st: Stats): string | undefined {
  if (st.uid !== uid() && st.uid !== 0) return `${dir} belongs to another user (uid ${st.uid})`;
  // Sticky (like /tmp): others may add entries but not rename or remove this user's.
  if (st.mode & 0o1000) return undefined;
  if (st.mode & 0o002) return `${dir} is writable by every user (mode ${octal(st.mode)})`;
  // Group-writable is fine when the group is this user's own (the user-private-group scheme).
  if (st.mode & 0o020 && st.gid !== gid()) return `${dir} is writable by group ${st.gid} (mode ${octal(st.mode)})`;
  return undefined;
}

/** Why `dir` (an existing folder, links resolved) cannot be trusted, or undefined. */
function folderProblem(dir: string, st: Stats): string | undefined {
  if (!st.isDirectory()) return 'it is not a folder';
  if (st.uid !== uid()) return `it belongs to another user (uid ${st.uid}), who could read or change what Till keeps there`;
  if (st.mode & 0o022)
    return `it is writable by ${st.mode & 0o002 ? 'every user' : 'its group'} (mode ${octal(st.mode)}): run \`chmod 700 ${dir}\``;
  for (let up = dirname(dir), below = dir; up !== below; below = up, up = dirname(up)) {
    const problem = ancestorProblem(up, lstatSync(up));
    if (problem) return `${problem}, so another user could replace it`;
  }
  return undefined;
}

/**
 * Makes sure `dir` exists (created 0700 with any missing parents) and that only this user can
 * change it. A link to a folder is followed once, and the folder it names is checked.
 */
export function ensurePrivateFolder(dir: string, what = 'the folder'): void {
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  if (!CHECKED) return;
  const link = lstatSync(dir);
  if (link.isSymbolicLink() && link.uid !== uid() && link.uid !== 0) {
    throw new PrivateFolderError(`Till will not use ${what} ${dir}: it is a link made by another user (uid ${link.uid})`);
  }
  const real = realpathSync(dir);
  const problem = folderProblem(real, lstatSync(real));
  if (problem) throw new PrivateFolderError(`Till will not use ${what} ${dir}: ${problem}`);
}

/**
 * Creates `dir` for this user alone, or accepts it only if it already is exactly that: a real
 * folder (not a link) owned by this user with mode 0700. For names anyone can compute in a folder
 * anyone can write (`/tmp/till-<uid>`), where another user may have made it first.
 */
export function claimPrivateFolder(dir: string, what = 'the folder'): void {
  try {
    mkdirSync(dir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
  }
  if (!CHECKED) return;
  const st = lstatSync(dir);
  let problem = st.isSymbolicLink() ? 'it is a link' : folderProblem(dir, st);
  if (!problem && st.mode & 0o077) problem = `it is open to other users (mode ${octal(st.mode)})`;
  if (problem)
    throw new PrivateFolderError(`Till will not use ${what} ${dir}: ${problem}; remove it, or set XDG_RUNTIME_DIR to a folder of your own`);
}

/** Why an existing entry cannot be trusted as a file of this user's, or undefined. */
function fileProblem(file: string, st: Stats): string | undefined {
  if (st.isSymbolicLink()) return 'it is a symbolic link, which Till does not follow';
  if (!st.isFile()) return 'it is not a regular file';
  if (st.uid !== uid()) return `it belongs to another user (uid ${st.uid})`;
  if (st.mode & 0o022) return `it is writable by others (mode ${octal(st.mode)}): run \`chmod 600 ${file}\``;
  return undefined;
}

function openChecked(file: string, flags: number, mode?: number): number {
  let fd: number;
  try {
    fd = openSync(file, flags | NOFOLLOW, mode);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ELOOP')
      throw new PrivateFolderError(`Till will not use ${file}: it is a symbolic link, which Till does not follow`);
    throw err;
  }
  if (CHECKED) {
    const problem = fileProblem(file, fstatSync(fd));
    if (problem) {
      closeSync(fd);
      throw new PrivateFolderError(`Till will not use ${file}: ${problem}`);
    }
  }
  return fd;
}

/** A file's text, read without following a link; undefined when it does not exist. */
export function readPrivateFile(file: string): string | undefined {
  let fd: number;
  try {
    fd = openChecked(file, constants.O_RDONLY);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw err;
  }
  try {
    return readFileSync(fd, 'utf8');
  } finally {
    closeSync(fd);
  }
}

/** Opens a file (0600) for appending, creating it if need be, without following a link. */
export function openPrivateAppend(file: string): number {
  return openChecked(file, constants.O_WRONLY | constants.O_APPEND | constants.O_CREAT, 0o600);
}

/**
 * Opens `<file>.tmp` exclusively for writing (0600): a leftover is removed first (unlinking a
 * link removes the link, not what it names), and a link planted in between makes the create fail.
 * Finish with {@link commitTemporary}.
 */
function openTemporary(file: string): { fd: number; path: string } {
  const path = `${file}.tmp`;
  rmSync(path, { force: true });
  return { fd: openChecked(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL, 0o600), path };
}

/** Syncs and closes a temporary file from {@link openTemporary} and renames it over `file`. */
function commitTemporary(tmp: { fd: number; path: string }, file: string, sync = true): void {
  try {
    if (sync) fsyncSync(tmp.fd);
  } finally {
    closeSync(tmp.fd);
  }
  renameSync(tmp.path, file);
}

/** Replaces `file` with `text` (0600) atomically, without following links. */
export function writePrivateFile(file: string, text: string, sync = true): void {
  const tmp = openTemporary(file);
  try {
    const bytes = Buffer.from(text);
    let done = 0;
    while (done < bytes.length) done += writeSync(tmp.fd, bytes, done, bytes.length - done);
  } catch (err) {
    closeSync(tmp.fd);
    rmSync(tmp.path, { force: true });
    throw err;
  }
  commitTemporary(tmp, file, sync);
}

/** Throws unless `path` is a unix socket owned by this user (before anything is sent to it). */
export function checkOwnSocket(path: string): void {
  if (!CHECKED) return;
  const st = statOrUndefined(path);
  if (!st) return;
  if (!st.isSocket() || st.uid !== uid()) {
    throw new PrivateFolderError(
      `Till will not talk to ${path}: it is ${st.isSocket() ? `a socket of another user (uid ${st.uid})` : 'not a socket'}, so it may be posing as your broker`,
    );
  }
}
