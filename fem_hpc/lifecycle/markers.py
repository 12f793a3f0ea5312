"""Wake the tracker the moment a job's wrapper writes its exit-code marker (Linux inotify).

The wrapper renames `.fem/exit_code.tmp.N` to `.fem/exit_code`; a watch on each tracked job's
`.fem` directory for IN_MOVED_TO sees that rename as it happens. The tracker's stat loop stays
as the fallback: inotify is absent off Linux, misses writes made by other hosts on NFS, and has a
per-user watch limit. A failure here only costs latency, never correctness.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import select
import struct
import threading
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("fem_hpc.markers")

IN_MOVED_TO = 0x00000080
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1  # noqa: B018 - probe for the symbol
        return libc
    except (OSError, AttributeError):
        return None


class MarkerWatcher:
    """Calls `wake()` whenever a file is renamed into a watched directory."""

    def __init__(self, wake: Callable[[], None]):
        self.wake = wake
        self._libc = _libc()
        self._fd = -1
        self._watches: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._warned = False
        if self._libc is not None:
            self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd >= 0:
            self._thread = threading.Thread(target=self._run, name="fem-markers", daemon=True)
            self._thread.start()

    @property
    def active(self) -> bool:
        return self._fd >= 0

    def add(self, directory: Path) -> None:
        if self._fd < 0 or self._libc is None:
            return
        key = str(directory)
        with self._lock:
            if key in self._watches:
                return
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(key), IN_MOVED_TO)
            if wd < 0:
                if not self._warned:  # e.g. fs.inotify.max_user_watches reached: the stat loop covers it
                    log.info("cannot watch %s (%s); markers are found by the stat loop",
                             key, os.strerror(ctypes.get_errno()))
                    self._warned = True
                return
            self._watches[key] = wd

    def remove(self, directory: Path) -> None:
        if self._fd < 0 or self._libc is None:
            return
        with self._lock:
            wd = self._watches.pop(str(directory), None)
            if wd is not None:
                self._libc.inotify_rm_watch(self._fd, wd)

    def close(self) -> None:
        self._stop.set()
        if self._fd >= 0:
            if self._thread.is_alive():
                self._thread.join(timeout=2)
            os.close(self._fd)
            self._fd = -1

    def _run(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._fd], [], [], 0.5)
            if not ready:
                continue
            try:
                data = os.read(self._fd, 65536)
            except BlockingIOError:
                continue
            except OSError:
                return
            # Names are not needed: any rename into a job's .fem dir is worth one early cycle,
            # which reads the markers that matter. Other events (IN_IGNORED after a watch is
            # removed) are skipped.
            offset, moved = 0, False
            while offset + _EVENT.size <= len(data):
                _wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
                moved = moved or bool(mask & IN_MOVED_TO)
                offset += _EVENT.size + length
            if moved:
                self.wake()
