"""The site config's `retention:` and `disk_guard:` sections (how long things are kept, the cache
limits, when new tasks must wait for disk space): applied by fem_hpc/ops/gc.py and
fem_hpc/diskguard.py, read into SiteConfig by fem_hpc/config.py."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CacheLimits(_Section):
    """One cache: entries are evicted least-recently-used first when the cache is over `max_bytes`,
    and any entry unused for `max_age_days`; never one a task is using. None = no limit."""

    max_bytes: int | None = Field(default=None, ge=0)
    max_age_days: float | None = Field(default=30.0, ge=0)


class CachesConfig(_Section):
    git: CacheLimits = Field(default_factory=lambda: CacheLimits(max_bytes=10 * 1024**3))
    sif: CacheLimits = Field(default_factory=lambda: CacheLimits(max_bytes=50 * 1024**3))
    docker: CacheLimits = Field(default_factory=lambda: CacheLimits(max_bytes=50 * 1024**3))


class RetentionConfig(_Section):
    """How long what fem-hpc writes is kept (every `*_days` may be None: kept forever).

    The clock of a final task starts when fem-hpc sees its result confirmed by the broker (the
    task's outbox rows are all published and gone), not when it ended: nothing is removed before
    the orchestrator had it."""

    workdirs_days: float | None = Field(default=7.0, ge=0)  # work dirs (and .fem/) of COMPLETED/CANCELLED tasks
    keep_failed_days: float | None = Field(default=14.0, ge=0)  # work dirs of FAILED tasks
    journal_days: float | None = Field(default=30.0, ge=0)  # then the task's rows become a tombstone
    idempotency_days: float | None = Field(default=365.0, ge=0)  # tombstones: a late duplicate runs nothing
    interval_seconds: float = Field(default=3600.0, ge=0)  # periodic pass in `serve`; 0 = only `fem-hpc gc`
    max_items_per_pass: int = Field(default=500, ge=1)  # per kind (work dirs, tasks, tombstones, cache entries)
    caches: CachesConfig = Field(default_factory=CachesConfig)

    @model_validator(mode="after")
    def _order(self) -> RetentionConfig:
        # The journal row is what tells the GC which work dir is whose: it may not go first. And a
        # tombstone only makes sense once the row is gone.
        if self.journal_days is not None:
            for name in ("workdirs_days", "keep_failed_days"):
                value = getattr(self, name)
                if value is None or value > self.journal_days:
                    raise ValueError(f"journal_days ({self.journal_days:g}) must be at least {name} "
                                     f"({'never' if value is None else f'{value:g}'}): a task's journal row "
                                     "names its work dir, so it is kept until the work dir is gone")
            if self.idempotency_days is not None and self.idempotency_days < self.journal_days:
                raise ValueError(f"idempotency_days ({self.idempotency_days:g}) must be at least journal_days "
                                 f"({self.journal_days:g}): the tombstone outlives the task's row")
        return self


class DiskGuardConfig(_Section):
    """Below these, new tasks are not started: the areas are state_dir, work_root, the legacy
    sandbox, the SIF caches and `paths`. Running tasks finish. 0 and 0 turn the guard off."""

    min_free_bytes: int = Field(default=1024**3, ge=0)
    min_free_percent: float = Field(default=1.0, ge=0, lt=100)
    on_low_disk: Literal["queue", "reject"] = "queue"
    check_seconds: float = Field(default=2.0, gt=0, le=60)  # a check is reused this long (intake stays fast)
    paths: dict[str, Path] = Field(default_factory=dict)  # more areas to watch, by name
