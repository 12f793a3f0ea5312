"""One exclusive lock per cache entry (a git mirror, a SIF image), across threads and processes."""

from __future__ import annotations

import fcntl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_thread_locks: dict[str, threading.Lock] = {}
_thread_locks_guard = threading.Lock()


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """flock on lock_path for other processes; a plain lock first for this process's threads,
    which then wait cheaply instead of each holding a file open."""
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(str(lock_path), threading.Lock())
    with tlock:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)


@contextmanager
def try_exclusive(lock_path: Path) -> Iterator[bool]:
    """The same lock as `exclusive`, without waiting: yields True when it is held, False when a
    thread or process has it (the GC then leaves that cache entry alone: someone is using it)."""
    with _thread_locks_guard:
        tlock = _thread_locks.setdefault(str(lock_path), threading.Lock())
    if not tlock.acquire(blocking=False):
        yield False
        return
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
    finally:
        tlock.release()
