"""Work dirs on a cluster without a shared file system (remote_work_root) are removed by the
retention pass (ops/gc.py) once the broker confirmed the result, over the executor's SSH
connection to a real sshd (tests/sshkit.py), one command for all of a pass; the journal records
each removal, so a restart between the result and the pass leaks nothing and repeats nothing.

The "cluster" is this host's disk seen through the sshd; the journal is the real one, with tasks
recorded as the agent records them (tests/retentionkit.py), and "the broker confirmed" is what
the publisher does then: the task's outbox rows deleted.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from retentionkit import FakeClock, add_task, confirm
from sshkit import SSHD

from fem_hpc.config import SiteConfig
from fem_hpc.executors import registry, site_from_dict
from fem_hpc.journal import Journal
from fem_hpc.layout import FEM_DIR, MARKER_NAME
from fem_hpc.model import State
from fem_hpc.ops.gc import DAY, run_pass

pytestmark = [pytest.mark.ssh]


def cluster_site(tmp_path: Path, sshd: SSHD, root: Path, **slurm: Any) -> SiteConfig:
    return site_from_dict({
        "node": "gcnode", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "executors": {"slurm": {"ssh": {**sshd.settings_dict(), "reconnect_max_seconds": 1, "connect_timeout": 5},
                                "remote_work_root": str(root), "command_timeout": 20, **slurm}},
        "retention": {"workdirs_days": 7, "keep_failed_days": 14, "journal_days": 30},
    })


def on_cluster(root: Path, tid: str) -> Path:
    """A task's work dir as the job left it on the cluster: outputs and the wrapper's marker."""
    wd = root / "u1" / "e1" / tid
    (wd / FEM_DIR).mkdir(parents=True)
    (wd / FEM_DIR / MARKER_NAME).write_text(json.dumps({"exit_code": 0}) + "\n")
    (wd / "out.txt").write_text("result\n")
    return wd


def record(journal: Journal, site: SiteConfig, tid: str, state: State) -> None:
    add_task(journal, site, tid, state, executor="slurm", user_id="u1", execution_id="e1")


def remote_items(report: Any) -> list[Any]:
    return [i for i in report.items if i.area == "remote"]


def test_removed_after_confirmation_and_a_restart_between_leaks_nothing(sshd: SSHD, tmp_path: Path):
    root = tmp_path / "cluster"
    site = cluster_site(tmp_path, sshd, root)
    dirs = {tid: on_cluster(root, tid) for tid in ("ok", "bad", "busy")}
    journal = Journal(site.journal_path)
    record(journal, site, "ok", State.COMPLETED)
    record(journal, site, "bad", State.FAILED)
    record(journal, site, "busy", State.RUNNING)
    ex = registry.create("slurm", site)
    calls: list[tuple[str, list[str]]] = []

    def remover(name: str, rels: list[str]) -> None:
        calls.append((name, rels))
        ex.remove_remote(rels)

    # The results are committed but the broker has not confirmed them: everything stays.
    report = run_pass(site, journal, remover=remover)
    assert remote_items(report) == [] and calls == []
    assert all(d.is_dir() for d in dirs.values())
    # The service stops (or crashes) here: nothing about the remote dirs was kept in memory.
    ex.close()
    journal.close()
    journal = Journal(site.journal_path)
    ex = registry.create("slurm", site)
    try:
        confirm(journal)
        report = run_pass(site, journal, remover=remover)
        # One command over SSH for both final tasks (remote_cleanup: always); the running one stays.
        assert len(calls) == 1 and sorted(calls[0][1]) == ["u1/e1/bad", "u1/e1/ok"], calls
        assert not dirs["ok"].exists() and not dirs["bad"].exists() and dirs["busy"].is_dir()
        items = remote_items(report)
        assert sorted(i.what for i in items) == [f"slurm:{root}/u1/e1/bad", f"slurm:{root}/u1/e1/ok"]
        assert all(i.done for i in items)
        # The journal remembers: the next pass (and the next start) asks the cluster for nothing.
        journal.close()
        journal = Journal(site.journal_path)
        again = run_pass(site, journal, remover=lambda *_: pytest.fail("removed twice"))
        assert remote_items(again) == []
        assert sshd.accepted() == 1  # the first executor never connected: only the second one did
    finally:
        ex.close()
        journal.close()


def test_unreachable_cluster_is_tried_again_at_the_next_pass(sshd: SSHD, tmp_path: Path):
    root = tmp_path / "cluster"
    site = cluster_site(tmp_path, sshd, root)
    wd = on_cluster(root, "ok")
    journal = Journal(site.journal_path)
    ex = registry.create("slurm", site)
    try:
        record(journal, site, "ok", State.COMPLETED)
        confirm(journal)
        sshd.stop()
        report = run_pass(site, journal, remover=lambda _name, rels: ex.remove_remote(rels))
        [item] = remote_items(report)
        assert not item.done and "tried again next pass" in (item.skipped or ""), item
        assert wd.is_dir()
        sshd.start()
        time.sleep(1.5)  # the runner's reconnect backoff (reconnect_max_seconds 1); passes are far apart
        report = run_pass(site, journal, remover=lambda _name, rels: ex.remove_remote(rels))
        assert [i.done for i in remote_items(report)] == [True]
        assert not wd.exists()
    finally:
        ex.close()
        journal.close()


def test_the_executors_remote_retention_settings_are_honoured(sshd: SSHD, tmp_path: Path):
    root = tmp_path / "cluster"
    site = cluster_site(tmp_path, sshd, root, remote_cleanup="on-success", remote_keep_days=1)
    dirs = {tid: on_cluster(root, tid) for tid in ("ok", "bad")}
    journal = Journal(site.journal_path)
    ex = registry.create("slurm", site)
    clock = FakeClock()
    start = clock.t
    try:
        record(journal, site, "ok", State.COMPLETED)
        record(journal, site, "bad", State.FAILED)
        confirm(journal)

        def gc_pass(at: float, remover: Any = lambda _name, rels: ex.remove_remote(rels)) -> list[Any]:
            return remote_items(run_pass(site, journal, now=clock.at(at), remover=remover))

        assert gc_pass(start) == []  # the clocks start now (confirmed)
        assert gc_pass(start + 0.5 * DAY) == []  # remote_keep_days 1
        # `fem-hpc gc` has no connection to the cluster: it says so and leaves the dir to the service.
        [left] = gc_pass(start + 1.1 * DAY, remover=None)
        assert not left.done and "left to the service" in (left.skipped or "") and dirs["ok"].is_dir()
        [item] = gc_pass(start + 1.2 * DAY)
        assert item.done and item.what.endswith("/u1/e1/ok") and "remote_cleanup on-success" in item.reason
        assert not dirs["ok"].exists()
        assert dirs["bad"].is_dir()  # on-success keeps a failed task's dir on the cluster for a look
    finally:
        ex.close()
        journal.close()
