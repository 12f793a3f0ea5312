"""Retries that wait without holding a worker: while a cluster is unreachable, its submits and
stage-outs are tried again later, each with its own backoff, from one timer thread. A worker
that slept through an outage would hold up every other executor's tasks behind it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..backoff import Backoff

log = logging.getLogger("fem_hpc.lifecycle")


class Later:
    """Calls `fn(*args)` after a delay, from one thread started on first use. `fn` should be
    quick (typically: hand the real work to a pool)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self._heap: list[tuple[float, int, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._cv = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def call(self, delay: float, fn: Callable[..., Any], *args: Any) -> bool:
        """False when stopped (the service is closing: a restart picks the task up from the journal)."""
        with self._cv:
            if self._stopped:
                return False
            heapq.heappush(self._heap, (self.clock() + max(0.0, delay), next(self._seq), fn, args))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fem-later", daemon=True)
                self._thread.start()
            self._cv.notify()
        return True

    def __len__(self) -> int:
        with self._cv:
            return len(self._heap)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._stopped and (not self._heap or self._heap[0][0] > self.clock()):
                    self._cv.wait(None if not self._heap else max(0.01, self._heap[0][0] - self.clock()))
                if self._stopped:
                    return
                _, _, fn, args = heapq.heappop(self._heap)
            try:
                fn(*args)
            except Exception:
                log.exception("a delayed retry failed to start")

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._heap.clear()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)


class Retries:
    """Per-task backoff on top of `Later`: the first retry of a task after 1 s, then 2, 4 ... up
    to the executor's `retry_max_seconds`; `done` forgets a task once it got through."""

    def __init__(self, later: Later):
        self.later = later
        self._lock = threading.Lock()
        self._backoffs: dict[str, Backoff] = {}

    def schedule(self, key: str, cap: float, fn: Callable[..., Any], *args: Any) -> float | None:
        """Run fn(*args) after the task's next delay; returns it (None when closing)."""
        with self._lock:
            backoff = self._backoffs.setdefault(key, Backoff(cap=cap, base=1.0))
            delay = backoff.next()
        return delay if self.later.call(delay, fn, *args) else None

    def done(self, key: str) -> None:
        with self._lock:
            self._backoffs.pop(key, None)

    def waiting(self) -> int:
        with self._lock:
            return len(self._backoffs)
