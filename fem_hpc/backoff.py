"""The one retry delay of fem-hpc: exponential, capped, optionally jittered.

Used by the broker reconnects, the SSH runner, the tracker's failed polls and the re-adoption of a
journalled submit intent, so every retry loop in the service backs off the same way.
"""

from __future__ import annotations

import random


class Backoff:
    """`base`, 2*base, 4*base ... capped at `cap`. With `jitter`, each delay is scaled by a random
    50-100%, so many clients that lost the same server do not come back in step."""

    def __init__(self, cap: float = 30.0, base: float = 0.5, *, jitter: bool = True):
        self.cap = cap
        self.base = base
        self.jitter = jitter
        self.attempt = 0

    def peek(self) -> float:
        """The delay the next failure will get, without jitter (for log lines)."""
        return min(self.cap, self.base * (2 ** self.attempt))

    def next(self) -> float:
        delay = self.peek()
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0) if self.jitter else delay

    def reset(self) -> None:
        self.attempt = 0
