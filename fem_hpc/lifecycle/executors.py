"""The executor instances of this process and their trackers, by configured name.

An executor is created, with its tracker thread, the first time a task needs it (`start`), and
both are stopped by `close()`, which also lets the executor release its runner (SSH connection).
"""

from __future__ import annotations

import threading
from typing import Any

from ..config import SiteConfig
from ..executors import registry
from ..executors.base import Executor
from .tracker import Listener, Tracker


class ExecutorPool:
    def __init__(self, site: SiteConfig, listener: Listener):
        self.site = site
        self.listener = listener
        self._lock = threading.Lock()
        self._executors: dict[str, Executor] = {}
        self._trackers: dict[str, Tracker] = {}

    def start(self, name: str) -> tuple[Executor, Tracker]:
        """The executor named `name` and its running tracker, created on first use."""
        with self._lock:
            if name not in self._executors:
                executor = registry.create(name, self.site)
                tracker = Tracker(executor, self.listener, lost_grace=executor.settings.lost_grace_seconds,
                                  retry_cap=executor.settings.retry_max_seconds)
                tracker.start()
                self._executors[name] = executor
                self._trackers[name] = tracker
            return self._executors[name], self._trackers[name]

    def trackers(self) -> dict[str, Tracker]:
        with self._lock:
            return dict(self._trackers)

    def health(self) -> dict[str, dict[str, Any]]:
        """Each configured executor's own checks and its tracker's state (creating it if needed)."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.site.executors:
            try:
                executor, tracker = self.start(name)
                # The checks also probe the link: an answer ends an outage no job has noticed yet
                # (and while it lasts, the runner's reconnect backoff makes them fail fast).
                checks = executor.health_checks()
                down = executor.unreachable()
                out[name] = {"works": all(c.status != "error" for c in checks) and not tracker.stale
                             and down is None,
                             "stale": tracker.stale, "tracked": len(tracker),
                             "checks": [c.model_dump() for c in checks]}
                if down is not None:
                    out[name]["unreachable"] = {"host": down.host, "since": down.since,
                                                "message": down.pause_message, "error": str(down)}
            except Exception as exc:
                out[name] = {"works": False, "error": str(exc)}
        return out

    def close(self) -> None:
        """Stop tracking (jobs keep running and are re-adopted at the next start) and close the executors."""
        with self._lock:
            trackers, executors = list(self._trackers.values()), list(self._executors.values())
        for tracker in trackers:
            tracker.stop()
        for executor in executors:
            executor.close()
