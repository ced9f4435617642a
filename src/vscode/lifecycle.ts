/**
 * One disposal model for the extension: a store that disposes what it holds once, last in
 * first out (as vscode-pull-request-github's lifecycle does).
 */
import type * as vscode from 'vscode';

type DisposableLike = vscode.Disposable | { dispose(): unknown } | (() => unknown);

export class DisposableStore implements vscode.Disposable {
  private readonly items: DisposableLike[] = [];
  private disposed = false;

  /** Adds an item; if the store is already disposed, disposes the item at once. */
  add<T extends DisposableLike>(item: T): T {
    if (this.disposed) dispose(item);
    else this.items.push(item);
    return item;
  }

  dispose(): void {
    if (this.disposed) return;
    this.disposed = true;
    while (this.items.length > 0) dispose(this.items.pop()!);
  }
}

function dispose(item: DisposableLike): void {
  try {
    if (typeof item === 'function') void item();
    else void item.dispose();
  } catch {
    // one failing disposal must not keep the rest alive
  }
}
