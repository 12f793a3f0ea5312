"""A scheduler call budget: a token bucket per cluster, for sites that limit RPCs to their
controller (one real site: a bucket of 40 calls, refilled by 4 per 60 s).

Every scheduler call (sbatch, squeue, sacct, scancel, qsub, qstat, ...) takes one token. Calls
that can be later (the tracker's polls, sacct, health checks) never wait: with no token they are
*deferred* (executors.base.Deferred, with the time until the next token). Calls a task is waiting
for (submit, cancel, the look-up by name) wait a little for a token, then are deferred too, so a
worker never sits out a long refill. The class is pure: time comes from an injected clock.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from pydantic import BaseModel, ConfigDict, Field


class BudgetSettings(BaseModel):
    """`bucket` calls at most in a burst; `refill` calls come back every `per_seconds`."""

    model_config = ConfigDict(extra="forbid")
    bucket: int = Field(ge=1)
    refill: float = Field(gt=0)
    per_seconds: float = Field(default=60.0, gt=0)

    @classmethod
    def per_minute(cls, calls: float) -> BudgetSettings:
        """`max_scheduler_calls_per_minute: N`: a bucket of N, refilled by N per minute."""
        return cls(bucket=max(1, math.ceil(calls)), refill=calls, per_seconds=60.0)

    def describe(self) -> str:
        return f"bucket {self.bucket}, refill {self.refill:g} per {self.per_seconds:g}s"


class CallBudget:
    """A token bucket, full at start, refilled continuously at refill/per_seconds tokens a second."""

    def __init__(self, settings: BudgetSettings, clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self.clock = clock
        self.rate = settings.refill / settings.per_seconds
        self._tokens = float(settings.bucket)
        self._at = clock()
        self._cv = threading.Condition()

    def _refill(self, now: float) -> None:
        self._tokens = min(float(self.settings.bucket), self._tokens + (now - self._at) * self.rate)
        self._at = now

    @property
    def tokens(self) -> float:
        with self._cv:
            self._refill(self.clock())
            return self._tokens

    def try_take(self) -> float:
        """Take a token: 0.0 when taken, else the seconds until one is there (nothing taken)."""
        with self._cv:
            now = self.clock()
            self._refill(now)
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return 0.0
            return (1.0 - self._tokens) / self.rate

    def take(self, max_wait: float, *, cancelled: Callable[[], bool] = lambda: False,
             sleep: Callable[[float], None] | None = None) -> tuple[bool, float]:
        """Wait up to `max_wait` seconds for a token (less once `cancelled()`, checked after each
        wake()). Returns (taken, seconds waited or, when not taken, seconds until the next
        token). `sleep` replaces the condition wait in tests."""
        start = self.clock()
        while True:
            wait = self.try_take()
            if wait == 0.0:
                return True, self.clock() - start
            left = start + max_wait - self.clock()
            if left <= 0 or cancelled():
                return False, wait
            pause = min(wait, left)
            if sleep is not None:
                sleep(pause)
            else:
                with self._cv:
                    self._cv.wait(pause)

    def wake(self) -> None:
        """Wake every waiter so it looks at its `cancelled` again (an executor is closing)."""
        with self._cv:
            self._cv.notify_all()


# One bucket per cluster: executors reaching the same scheduler (e.g. two partitions of one
# cluster behind one SSH host) with the same budget share it, as the site's limit does.
_buckets: dict[tuple[str, str], CallBudget] = {}
_lock = threading.Lock()


def budget_for(cluster: str, settings: BudgetSettings) -> CallBudget:
    key = (cluster, settings.model_dump_json())
    with _lock:
        if key not in _buckets:
            _buckets[key] = CallBudget(settings)
        return _buckets[key]
