"""What a retention pass works with: its items, the areas, the report, and file helpers."""

from __future__ import annotations

import logging
import os
import shutil
import stat
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

log = logging.getLogger("fem_hpc.ops.gc")


DAY = 86400.0


STALE_TEMP_SECONDS = DAY  # a half-written clone or pull this old was left by a crash


PRUNE_PARENT_SECONDS = 3600.0  # an empty user/execution dir is removed once this old (not racing a new task)


AREAS = ("workdirs", "remote", "journal", "tombstones", "git", "sif", "docker")


Area = Literal["workdirs", "remote", "journal", "tombstones", "git", "sif", "docker"]  # remote: a cluster's


Clock = Callable[[], float]


class Item(BaseModel):
    """One thing a pass removes (or, in a dry run, would remove), and why."""

    area: Area
    what: str  # a path, an image reference, a task id
    bytes: int = 0
    reason: str
    done: bool = False
    skipped: str | None = None  # why a planned item was left in place this time


class AreaUsage(BaseModel):
    area: str
    bytes: int
    entries: int | None = None
    oldest: float | None = None  # when the oldest kept item's clock started (unix time)


class GcReport(BaseModel):
    time: float
    dry_run: bool
    confirmed: int = 0  # final tasks whose retention clock started in this pass
    items: list[Item] = Field(default_factory=list)
    usage: list[AreaUsage] = Field(default_factory=list)
    clocks: dict[str, float | None] = Field(default_factory=dict)
    errors: list[str] = Field(default_factory=list)

    def freed(self) -> dict[str, int]:
        out = dict.fromkeys(AREAS, 0)
        for item in self.items:
            if item.done:
                out[item.area] += item.bytes
        return out


def days_ago(then: float, now: float) -> str:
    return f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(then))} UTC, {(now - then) / DAY:.1f} days ago"


def cutoff(days: float | None, now: float) -> float | None:
    return None if days is None else now - days * DAY


def tree_bytes(root: Path, limit: int = 1_000_000) -> int:
    """Bytes of the regular files under root, symlinks not followed (at most `limit` entries)."""
    total = 0
    seen = 0
    stack = [root]
    while stack and seen < limit:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    seen += 1
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    if stat.S_ISDIR(st.st_mode):
                        stack.append(Path(entry.path))
                    elif stat.S_ISREG(st.st_mode):
                        total += st.st_size
        except OSError:
            continue
    return total


def path_size(path: Path) -> int:
    try:
        st = path.lstat()
    except OSError:
        return 0
    return tree_bytes(path) if stat.S_ISDIR(st.st_mode) else st.st_size


def rmtree(path: Path) -> None:
    """Remove a tree a task may have made read-only (e.g. chmod 0500 on its own dirs)."""
    def fix(func: Any, name: str, *_: Any) -> None:
        os.chmod(os.path.dirname(name), stat.S_IRWXU)
        func(name)

    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
    elif sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=fix)
    else:
        shutil.rmtree(path, onerror=fix)
