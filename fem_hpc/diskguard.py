"""The disk guard: no new task starts while a disk fem-hpc writes to is nearly full.

A login node's disk or group quota fills slowly and then breaks stage-in, stage-out or the journal
in the middle of a task. The guard looks at the free space of every area fem-hpc writes to
(state_dir, work_root, the legacy sandbox, the SIF caches, and the site's `disk_guard.paths`)
and says why new tasks must wait when one is below `disk_guard.min_free_bytes` or
`min_free_percent` of its file system. Running tasks are not touched: they finish.

What the caller does with the answer is the site's `on_low_disk`: `queue` (the task is journalled
and waits in RECEIVED until space returns) or `reject` (a REJECTED result naming the area). A
check is reused for `check_seconds`, so a burst of submits costs one statvfs per area.

The free space is statvfs's f_bavail (what an unprivileged user may still write); a quota is not
visible there, so on a site with a group quota set min_free_bytes with the quota in mind.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import SiteConfig
from .model import Check


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def guarded_areas(site: SiteConfig) -> dict[str, Path]:
    """The areas fem-hpc writes to, by name (several may share a file system)."""
    areas = {"state_dir": site.state_dir, "work_root": site.work_root}
    if site.legacy.enabled and site.legacy.sandbox_path is not None:
        areas["legacy_sandbox"] = site.legacy.sandbox_path
    for name, settings in site.executors.items():
        if site.executor_type(name) == "apptainer":
            cache = settings.get("cache_dir")
            areas[f"sif_cache.{name}"] = Path(cache) if cache else site.state_dir / "sif"
    areas.update({f"paths.{name}": path for name, path in site.disk_guard.paths.items()})
    return areas


def _existing(path: Path) -> Path:
    """The path, or its nearest existing ancestor (work_root may not exist before the first task)."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


@dataclass(frozen=True)
class AreaSpace:
    name: str
    path: Path
    free: int | None  # None: statvfs failed (error says why)
    total: int | None
    threshold: int  # bytes that must stay free
    setting: str = "min_free_bytes"  # the disk_guard key that set the threshold
    error: str | None = None

    @property
    def low(self) -> bool:
        return self.free is not None and self.free < self.threshold

    def reason(self) -> str:
        return (f"{self.name} {self.path}: {human_bytes(self.free or 0)} free of {human_bytes(self.total or 0)}, "
                f"below the {human_bytes(self.threshold)} kept free (disk_guard.{self.setting})")

    def as_dict(self) -> dict[str, Any]:
        return {"area": self.name, "path": str(self.path), "free_bytes": self.free, "total_bytes": self.total,
                "min_free_bytes": self.threshold, "low": self.low, "error": self.error}


class DiskGuard:
    """`blocked()` -> why new tasks must not start now, or None. Thread-safe and cheap."""

    def __init__(self, site: SiteConfig, *, clock: Callable[[], float] = time.monotonic,
                 statvfs: Callable[[str], os.statvfs_result] = os.statvfs):
        self.cfg = site.disk_guard
        self.paths = guarded_areas(site)
        self._clock = clock
        self._statvfs = statvfs
        self._lock = threading.Lock()
        self._checked_at: float | None = None
        self._areas: list[AreaSpace] = []

    @property
    def on_low_disk(self) -> str:
        return self.cfg.on_low_disk

    def _measure(self, name: str, path: Path) -> AreaSpace:
        try:
            st = self._statvfs(str(_existing(path)))
        except OSError as exc:  # not a reason to stop intake: the task's own step reports it
            return AreaSpace(name, path, None, None, self.cfg.min_free_bytes, error=exc.strerror or str(exc))
        total = st.f_blocks * st.f_frsize
        by_percent = math.ceil(total * self.cfg.min_free_percent / 100)
        setting = "min_free_percent" if by_percent > self.cfg.min_free_bytes else "min_free_bytes"
        return AreaSpace(name, path, st.f_bavail * st.f_frsize, total, max(self.cfg.min_free_bytes, by_percent),
                         setting)

    def areas(self, fresh: bool = False) -> list[AreaSpace]:
        """Every area's free space, measured at most every check_seconds (now when `fresh`)."""
        with self._lock:
            now = self._clock()
            if fresh or self._checked_at is None or now - self._checked_at >= self.cfg.check_seconds:
                self._areas = [self._measure(name, path) for name, path in self.paths.items()]
                self._checked_at = now
            return list(self._areas)

    def blocked(self) -> str | None:
        low = [a.reason() for a in self.areas() if a.low]
        return "; ".join(low) if low else None

    def state(self) -> dict[str, Any]:
        """For the health reply: whether intake is paused, why, and every area."""
        reason = self.blocked()
        return {"blocked": reason is not None, "reason": reason, "on_low_disk": self.on_low_disk,
                "areas": [a.as_dict() for a in self.areas()]}


def guard_check(guard: DiskGuard) -> Check:
    """One doctor/health line: is intake paused by the disk guard, and why."""
    reason = guard.blocked()
    if reason is None:
        tightest = min((a for a in guard.areas() if a.free is not None), default=None,
                       key=lambda a: a.free - a.threshold)  # type: ignore[operator]
        detail = "every area has room" + (f" (least: {tightest.name}, {human_bytes(tightest.free or 0)} free, "
                                          f"{human_bytes(tightest.threshold)} kept free)" if tightest else "")
        return Check(name="disk guard", status="ok", detail=detail)
    what = ("new tasks wait in RECEIVED until space returns" if guard.on_low_disk == "queue"
            else "new tasks are REJECTED until space returns")
    return Check(name="disk guard", status="error", detail=f"intake paused ({what}): {reason}",
                 fix="free space there (fem-hpc gc --dry-run shows what retention would free), or lower "
                     "disk_guard.min_free_bytes / min_free_percent")
