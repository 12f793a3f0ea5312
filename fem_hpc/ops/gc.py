"""Retention: what fem-hpc removes, when, and the setting that says so (`retention:` in the config).

One pass does, in this order, at most `retention.max_items_per_pass` items of each kind:

1. It starts the clock of every final task whose result the broker confirmed, that is, the task
   has no outbox row left (`journal.retention.mark_confirmed`). Every later step counts from that moment,
   never from the task's end, so nothing is removed before the orchestrator had it.
2. Work dirs (with their `.fem/` archive) of tasks confirmed `workdirs_days` ago (FAILED tasks:
   `keep_failed_days`). A dir several tasks share (a legacy execution) goes when the last of them
   is due. Only dirs under work_root (or the legacy sandbox) are ever removed. Then the work dirs
   on a cluster without a shared file system (an executor's `remote_work_root`), as that executor's
   `remote_cleanup` and `remote_keep_days` say: one command per cluster over the connection the
   service holds (`remover`; without one, e.g. `fem-hpc gc`, they are left for the service), the
   removal noted in the journal, so a restart neither forgets nor repeats one.
3. Journal: tasks confirmed `journal_days` ago (and whose work dir is gone) become a tombstone:
   their row, transitions and any outbox row left go in one transaction. The tombstone answers
   a late duplicate submit ("finished on <date>, outputs expired") and runs nothing.
4. Tombstones confirmed `idempotency_days` ago.
5. Caches, least recently used first: git mirrors (state_dir/git), SIF files (state_dir/sif and
   each apptainer executor's cache_dir), docker images fem-hpc pulled (noted in
   state_dir/docker-images). An entry goes when unused for `max_age_days`, or while its cache is
   over `max_bytes`; never one a task in the journal still needs, and never while its lock (the
   one stage-in takes, staging/locks.py) is held: the GC takes that lock itself to evict.

A dry run plans the same and changes nothing; a real pass carries out that plan. Every decision
reads the injected clock `now()` (a fake one in the tests); file mtimes are compared with it.
Freed journal pages are reused by SQLite; the file itself does not shrink (no VACUUM, which
would lock the journal under the running service).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SiteConfig
from ..diskguard import DiskGuard, human_bytes
from ..executors import registry, remote
from ..executors.batch import BatchSettings
from ..journal import Journal
from ..model import FINAL_STATES
from ..staging.locks import try_exclusive
from .caches import Docker, Entry, docker_entries, evict, git_entries, in_use, plan_cache, sif_entries, stale_temps
from .gc_model import (
    DAY,
    PRUNE_PARENT_SECONDS,
    AreaUsage,
    Clock,
    GcReport,
    Item,
    cutoff,
    days_ago,
    path_size,
    rmtree,
    tree_bytes,
)
from .gc_report import last_report_path, load_report, save_report

log = logging.getLogger("fem_hpc.ops.gc")


# -- work dirs ----------------------------------------------------------------------------------
def _roots(site: SiteConfig) -> list[Path]:
    roots = [site.work_root.resolve()]
    if site.legacy.sandbox_path is not None:
        roots.append(site.legacy.sandbox_path.resolve())
    return roots


def _inside(path: Path, roots: list[Path]) -> Path | None:
    """The root that holds `path` strictly below it (symlinks in the path resolved), else None."""
    real = path.resolve()
    for root in roots:
        if real != root and real.is_relative_to(root):
            return root
    return None


def plan_workdirs(site: SiteConfig, journal: Journal, now: float) -> list[Item]:
    r = site.retention
    items = []
    for due in journal.retention.workdirs_due(cutoff(r.workdirs_days, now), cutoff(r.keep_failed_days, now),
                                    r.max_items_per_pass):
        failed = "FAILED" in due.states
        setting = (f"keep_failed_days {r.keep_failed_days:g}" if failed else f"workdirs_days {r.workdirs_days:g}")
        tasks = ", ".join(f"{i} {s}" for i, s in zip(due.task_ids, due.states, strict=True))
        items.append(Item(area="workdirs", what=due.workdir, bytes=path_size(Path(due.workdir)),
                          reason=f"{tasks}; result confirmed {days_ago(due.confirmed, now)} ({setting})"))
    return items


def _prune_parents(path: Path, root: Path, now: float) -> None:
    """Empty <user>/<execution> dirs above a removed work dir, once they are old enough that no
    new task of theirs is creating a work dir under them right now."""
    parent = path.parent
    while parent != root and parent.is_relative_to(root):
        try:
            if now - parent.stat().st_mtime < PRUNE_PARENT_SECONDS:
                return
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


def remove_workdir(site: SiteConfig, item: Item, now: float) -> bool:
    """Remove one work dir; True when the journal may forget it (removed, or never ours)."""
    path = Path(item.what)
    root = _inside(path, _roots(site))
    if root is None:
        # Never remove what is not ours; the journal is told it is done with it, so it does not come back.
        item.skipped = f"not under work_root or the legacy sandbox ({', '.join(map(str, _roots(site)))}); left alone"
        log.error("retention: work dir %s is outside the work roots; not removed", path)
        return True
    try:
        rmtree(path)
    except OSError as exc:
        item.skipped = f"cannot remove it: {exc.strerror or exc}; tried again next pass"
        log.error("retention: cannot remove work dir %s (%s)", path, exc)
        return False
    _prune_parents(path, root, now)
    item.done = True
    log.info("retention: removed work dir %s (%s, %s)", path, human_bytes(item.bytes), item.reason)
    return True


# -- remote work dirs -----------------------------------------------------------------------------
Remover = Callable[[str, list[str]], None]  # (executor name, `user/execution/task` dirs): one command
_CLEANUP_STATES = {"always": tuple(s.value for s in FINAL_STATES), "on-success": ("COMPLETED",), "never": ()}


@dataclass
class RemoteItem:
    executor: str
    task_id: str
    rel: str
    item: Item


def plan_remote(site: SiteConfig, journal: Journal, now: float) -> list[RemoteItem]:
    out = []
    for name in site.executors:
        try:
            settings = registry.settings(name, site)
        except Exception:  # noqa: S112 - checked when the config was loaded; a broken plugin is doctor's
            continue
        if not isinstance(settings, BatchSettings) or settings.remote_work_root is None:
            continue
        root = remote.check_root(settings.remote_work_root)
        states = _CLEANUP_STATES[settings.remote_cleanup]
        setting = f"executors.{name}.remote_cleanup {settings.remote_cleanup}, remote_keep_days " \
                  f"{settings.remote_keep_days:g}"
        for due in journal.retention.remote_due(name, states, now - settings.remote_keep_days * DAY,
                                                site.retention.max_items_per_pass) if states else []:
            rel = remote.relative_path(due.user_id, due.execution_id, due.task_id)
            out.append(RemoteItem(name, due.task_id, rel, Item(
                area="remote", what=f"{name}:{root}/{rel}",
                reason=f"{due.task_id} {due.state}; result confirmed {days_ago(due.confirmed, now)} ({setting})")))
    return out


def remove_remote(planned: list[RemoteItem], remover: Remover | None) -> list[str]:
    """Remove the planned remote dirs, one command per executor; the ids of the tasks whose dir is gone."""
    done: list[str] = []
    for name in dict.fromkeys(p.executor for p in planned):
        mine = [p for p in planned if p.executor == name]
        if remover is None:
            for p in mine:
                p.item.skipped = "left to the service's retention pass (it holds the cluster's SSH connection)"
            continue
        try:
            remover(name, [p.rel for p in mine])
        except Exception as exc:  # an unreachable cluster, above all: the next pass tries again
            log.warning("retention: %d work dir(s) on the cluster of %s not removed (%s); next pass", len(mine),
                        name, exc)
            for p in mine:
                p.item.skipped = f"the cluster did not take it ({exc}); tried again next pass"
            continue
        for p in mine:
            p.item.done = True
            done.append(p.task_id)
        log.info("retention: removed %d work dir(s) on the cluster of %s", len(mine), name)
    return done


# -- journal and tombstones --------------------------------------------------------------------------
def plan_journal(site: SiteConfig, journal: Journal, now: float, removed_workdirs: set[str]) -> list[Item]:
    """Tasks to compact: confirmed journal_days ago, and their work dir is gone (or goes in this pass)."""
    r = site.retention
    if r.journal_days is None:
        return []
    items = []
    # A task whose work dir is still there (shared with a newer task, or not removable yet) waits.
    for due in journal.retention.compaction_due(now - r.journal_days * DAY, r.max_items_per_pass,
                                      tuple(sorted(removed_workdirs))):
        items.append(Item(area="journal", what=due.task_id, bytes=due.json_bytes,
                          reason=f"{due.transitions} transition(s) -> tombstone; result confirmed "
                                 f"{days_ago(due.confirmed, now)} (journal_days {r.journal_days:g})"))
    return items


def plan_tombstones(site: SiteConfig, journal: Journal, now: float) -> list[Item]:
    r = site.retention
    if r.idempotency_days is None:
        return []
    return [Item(area="tombstones", what=task_id,
                 reason=f"a duplicate of it would run again (idempotency_days {r.idempotency_days:g})")
            for task_id in journal.retention.tombstones_due(now - r.idempotency_days * DAY, r.max_items_per_pass)]


# -- the pass -------------------------------------------------------------------------------------------
def _journal_bytes(site: SiteConfig) -> int:
    return sum(path_size(Path(f"{site.journal_path}{suffix}")) for suffix in ("", "-wal", "-shm"))


def run_pass(site: SiteConfig, journal: Journal, *, now: Clock = time.time, dry_run: bool = False,
             docker_factory: Callable[[str | None], Any] | None = None, remover: Remover | None = None) -> GcReport:
    """One retention pass (see the module docstring). Never raises for what it finds on disk:
    problems are in the report's `errors` and `skipped`, and are tried again next pass."""
    if dry_run:  # changes nothing: needs no lock, and creates nothing (not even the lock file)
        return _run_pass(site, journal, now, dry_run, Docker(docker_factory), None)
    with try_exclusive(site.state_dir / "gc.lock") as held:
        if not held:
            return GcReport(time=now(), dry_run=dry_run, errors=["another gc pass is running; nothing done"])
        return _run_pass(site, journal, now, dry_run, Docker(docker_factory), remover)


def _run_pass(site: SiteConfig, journal: Journal, now: Clock, dry_run: bool, docker: Docker,
              remover: Remover | None) -> GcReport:
    r = site.retention
    t = now()  # one time for the whole pass: a clock started by this pass never expires in it
    report = GcReport(time=t, dry_run=dry_run)
    if not dry_run:
        report.confirmed = journal.retention.mark_confirmed(t, r.max_items_per_pass)
    workdirs = plan_workdirs(site, journal, t)
    if not dry_run and workdirs:
        journal.retention.mark_workdirs_removed([i.what for i in workdirs if remove_workdir(site, i, t)], t)
    report.items += workdirs
    remote_dirs = plan_remote(site, journal, t)
    if not dry_run and remote_dirs:
        journal.retention.mark_remote_removed(remove_remote(remote_dirs, remover), t)
    report.items += [p.item for p in remote_dirs]
    compact = plan_journal(site, journal, t, {i.what for i in workdirs if i.done or (dry_run and not i.skipped)})
    if not dry_run and compact:
        journal.retention.compact([i.what for i in compact], t)
        for item in compact:
            item.done = True
    tombstones = plan_tombstones(site, journal, t)
    if not dry_run and tombstones:
        journal.retention.drop_tombstones([i.what for i in tombstones])
        for item in tombstones:
            item.done = True
    report.items += compact + tombstones
    report.items += _caches(site, journal, t, dry_run, docker, report)
    docker.close()
    _measure(site, journal, report)
    return report


def _caches(site: SiteConfig, journal: Journal, now: float, dry_run: bool, docker: Docker,
            report: GcReport) -> list[Item]:
    r = site.retention
    busy = in_use(site, journal)
    listed: dict[str, list[Entry]] = {"git": list(git_entries(site)), "sif": list(sif_entries(site))}
    try:
        listed["docker"] = list(docker_entries(site, docker, report.errors))
    except ImportError as exc:
        report.errors.append(f"docker: {exc}")
        listed["docker"] = []
    items: list[Item] = []
    for area, entries in listed.items():
        by_what = {e.what: e for e in entries}
        planned = plan_cache(entries, getattr(r.caches, area), now, busy[area], r.max_items_per_pass)
        for item in planned if not dry_run else []:
            evict(site, journal, by_what[item.what], item, docker)
        items += planned
        gone = {i.what for i in planned if i.done or dry_run}
        kept = [e for e in entries if e.what not in gone]
        report.usage.append(AreaUsage(area=area, bytes=sum(e.bytes for e in kept), entries=len(kept),
                                      oldest=min((e.last_used for e in kept), default=None)))
    temps = stale_temps(site, now)
    for item in temps if not dry_run else []:
        try:
            rmtree(Path(item.what))
            item.done = True
        except OSError as exc:
            item.skipped = f"cannot remove it: {exc.strerror or exc}"
    return items + temps


def _measure(site: SiteConfig, journal: Journal, report: GcReport) -> None:
    report.clocks = journal.retention.retention_clocks()
    report.usage[:0] = [
        AreaUsage(area="workdirs", bytes=sum(tree_bytes(root) for root in _roots(site) if root.is_dir()),
                  oldest=report.clocks.get("workdirs")),
        AreaUsage(area="journal", bytes=_journal_bytes(site), oldest=report.clocks.get("journal")),
    ]


# -- periodic, in the service ---------------------------------------------------------------------------------
class PeriodicGC:
    """Runs a pass every `retention.interval_seconds` on a low-priority thread, with its own
    journal connection (the service's stays free for intake and the publisher)."""

    def __init__(self, site: SiteConfig, *, now: Clock = time.time, first_delay: float | None = None,
                 docker_factory: Callable[[str | None], Any] | None = None, remover: Remover | None = None):
        self.site = site
        self.remover = remover  # the service's executors: remote work dirs go over their connections
        self.now = now
        interval = site.retention.interval_seconds
        self.first_delay = min(60.0, interval) if first_delay is None else first_delay
        self.docker_factory = docker_factory
        self._last: GcReport | None = None
        self._saved_mtime: int | None = None
        self.passes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def last(self) -> GcReport | None:
        """The newest pass's report: this service's own, or the one a `fem-hpc gc` saved since (or
        before the service started), so the metrics and the health reply show it too, also with
        `interval_seconds: 0`. The saved file is read again only when it changed."""
        try:
            mtime = last_report_path(self.site).stat().st_mtime_ns
        except OSError:
            return self._last
        if mtime != self._saved_mtime:
            self._saved_mtime = mtime
            saved = load_report(self.site)
            if saved is not None and (self._last is None or saved.time >= self._last.time):
                self._last = saved
        return self._last

    @last.setter
    def last(self, report: GcReport | None) -> None:
        self._last = report

    def start(self) -> None:
        if self.site.retention.interval_seconds <= 0:
            return
        self._thread = threading.Thread(target=self._run, name="fem-gc", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        try:  # Linux: the nice value is per thread; stage-in, the tracker and intake come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        if self._stop.wait(self.first_delay):
            return
        journal: Journal | None = None
        try:
            while not self._stop.is_set():
                try:
                    journal = journal or Journal(self.site.journal_path)
                    report = run_pass(self.site, journal, now=self.now, docker_factory=self.docker_factory,
                                      remover=self.remover)
                    self.last = report
                    self.passes += 1
                    save_report(self.site, report)
                except Exception:  # a full disk, a locked journal: the next pass tries again
                    log.exception("retention pass failed")
                if self._stop.wait(self.site.retention.interval_seconds):
                    break
        finally:
            if journal is not None:
                journal.close()

    def summary(self) -> dict[str, Any]:
        """For the health reply."""
        last = self.last
        return {"interval_seconds": self.site.retention.interval_seconds, "passes": self.passes,
                "last": None if last is None else {"time": last.time, "freed_bytes": last.freed(),
                                                   "errors": last.errors}}


class GcCollector:
    """Prometheus series of retention and the disk guard (registered on the service's registry):

    =================================================  ==================================================
    ``fem_area_bytes{area}``                           bytes kept per area (workdirs, journal, git, sif,
                                                       docker), as the last gc pass measured them
    ``fem_area_free_bytes{area}``                      free bytes on each guarded area's file system
    ``fem_intake_paused``                              1 while the disk guard keeps new tasks from starting
    ``fem_gc_last_run_timestamp_seconds``              when the last gc pass ran
    ``fem_gc_last_freed_bytes{area}``                  what the last gc pass freed, per area
    ``fem_retention_oldest_age_seconds{kind}``         age of the oldest kept item's clock: workdirs,
                                                       unconfirmed, journal, tombstones, git, sif, docker
    =================================================  ==================================================
    """

    def __init__(self, gc: PeriodicGC, guard: DiskGuard):
        self.gc = gc
        self.guard = guard

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        free = GaugeMetricFamily("fem_area_free_bytes", "Free bytes on each guarded area's file system.",
                                 labels=["area"])
        for a in self.guard.areas():
            if a.free is not None:
                free.add_metric([a.name], a.free)
        yield free
        paused = GaugeMetricFamily("fem_intake_paused", "1 while the disk guard keeps new tasks from starting.")
        paused.add_metric([], 1 if self.guard.blocked() else 0)
        yield paused
        last = self.gc.last
        if last is None:
            return
        used = GaugeMetricFamily("fem_area_bytes", "Bytes kept per area, as the last gc pass measured them.",
                                 labels=["area"])
        ages = GaugeMetricFamily("fem_retention_oldest_age_seconds", "Age of the oldest kept item's retention "
                                 "clock, per kind.", labels=["kind"])
        for u in last.usage:
            used.add_metric([u.area], u.bytes)
        oldest = {**{u.area: u.oldest for u in last.usage}, **last.clocks}
        for kind, then in oldest.items():
            if then:
                ages.add_metric([kind], max(0.0, self.gc.now() - then))
        ran = GaugeMetricFamily("fem_gc_last_run_timestamp_seconds", "When the last gc pass ran.")
        ran.add_metric([], last.time)
        freed = GaugeMetricFamily("fem_gc_last_freed_bytes", "Bytes the last gc pass freed, per area.",
                                  labels=["area"])
        for area, n in last.freed().items():
            freed.add_metric([area], n)
        yield from (used, ages, ran, freed)
