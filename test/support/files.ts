/** Small file helpers shared by the suite (and its global setup). */
import { readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';

/** Every regular file under a folder, recursively. Entries that vanish meanwhile are skipped. */
export function filesUnder(dir: string): string[] {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    const st = statSync(path, { throwIfNoEntry: false });
    if (!st) return [];
    return st.isDirectory() ? filesUnder(path) : st.isFile() ? [path] : [];
  });
}

/** The files under `dir` that contain `needle`; a file renamed away while reading is skipped. */
export function filesContaining(dir: string, needle: string): string[] {
  return filesUnder(dir).filter((f) => {
    try {
      return readFileSync(f).includes(needle);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === 'ENOENT') return false;
      throw err;
    }
  });
}
