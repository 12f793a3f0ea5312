"""Retention on a fake clock: work dirs, journal rows, tombstones and cache entries go exactly when
their setting says, never before the broker confirmed the result, and never while a task uses them.

Everything here is real (the SQLite journal, the file system, git mirrors, the SIF cache code with
the FAKE apptainer of tests/fakes, the agent with the local executor); only time is injected: the
GC reads `now()` from a FakeClock, and file mtimes are set relative to it.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fskit import tmpfs
from gitkit import Repo
from retentionkit import FakeClock, add_task, confirm, event, make_site

from fem_hpc.config import SiteConfig, config_from_dict
from fem_hpc.journal import Compacted, Journal, Route
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State, parse_task
from fem_hpc.ops.caches import in_use
from fem_hpc.ops.gc import GcCollector, PeriodicGC, run_pass
from fem_hpc.ops.gc_model import DAY, tree_bytes
from fem_hpc.ops.gc_report import load_report, render_report
from fem_hpc.protocols.legacy.codec import decode_reply, decode_request
from fem_hpc.protocols.legacy.frontend import LegacyFrontend
from fem_hpc.protocols.legacy.handler import LegacyHandler
from fem_hpc.protocols.legacy.mapping import to_task
from fem_hpc.protocols.v1.frontend import V1Frontend
from fem_hpc.staging.git import mirror_path, update_mirror
from fem_hpc.staging.images import cache_key, ensure_sif, sif_path
from fem_hpc.staging.locks import exclusive
from fem_hpc.staging.mirrors import site_image

FAKE_APPTAINER = Path(__file__).parent / "fakes" / "apptainer"


def gc(site: SiteConfig, journal: Journal, clock: FakeClock, **kw: Any):
    return run_pass(site, journal, now=clock, **kw)


@pytest.fixture
def env(tmp_path: Path):
    site = make_site(tmp_path)
    journal = Journal(site.journal_path)
    yield site, journal
    journal.close()


# -- work dirs --------------------------------------------------------------------------------------------------
def test_work_dir_waits_for_the_broker_then_goes_after_workdirs_days(env):
    site, journal = env
    wd = add_task(journal, site, "done1")
    clock = FakeClock()
    report = gc(site, journal, clock.at(clock.t + 400 * DAY))
    assert report.confirmed == 0 and wd.is_dir()  # its events are still in the outbox: never removed
    confirm(journal)
    t1 = clock.t
    assert gc(site, journal, clock).confirmed == 1  # the clock starts now, not when the task ended
    gc(site, journal, clock.at(t1 + 7 * DAY))
    assert wd.is_dir(), "removed at exactly workdirs_days: the cutoff is strict"
    report = gc(site, journal, clock.at(t1 + 7 * DAY + 1))
    assert not wd.exists()
    assert not wd.parent.exists() and not wd.parent.parent.exists(), "empty execution/user dirs are pruned"
    assert site.work_root.is_dir()
    [item] = [i for i in report.items if i.area == "workdirs"]
    assert item.done and item.what == str(wd) and item.bytes == 4003
    assert "workdirs_days 7" in item.reason and "done1 COMPLETED" in item.reason
    assert journal.get("done1") is not None, "the journal row stays until journal_days"
    assert gc(site, journal, clock.at(t1 + 8 * DAY)).items == []  # done once


def test_failed_work_dir_is_kept_for_keep_failed_days(env):
    site, journal = env
    ok = add_task(journal, site, "ok1")
    failed = add_task(journal, site, "bad1", State.FAILED)
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    gc(site, journal, clock.at(t1 + 7 * DAY + 1))
    assert not ok.exists() and failed.is_dir()
    gc(site, journal, clock.at(t1 + 14 * DAY))
    assert failed.is_dir()
    report = gc(site, journal, clock.at(t1 + 14 * DAY + 1))
    assert not failed.exists()
    assert "keep_failed_days 14" in report.items[0].reason


def test_a_task_that_is_not_final_keeps_its_work_dir_forever(env):
    site, journal = env
    running = add_task(journal, site, "run1", State.RUNNING)
    waiting = add_task(journal, site, "new1", State.RECEIVED)
    confirm(journal)
    clock = FakeClock()
    for days in (0, 10, 100, 1000):
        report = gc(site, journal, clock.at(clock.t + days * DAY))
        assert report.items == []
    assert running.is_dir() and waiting.is_dir()


def test_a_shared_legacy_work_dir_goes_when_its_last_task_is_due(env):
    site, journal = env
    shared = site.work_root / "alice" / "exec1"
    add_task(journal, site, "first", workdir=shared)
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    add_task(journal, site, "second", workdir=shared)  # a later task of the same execution
    gc(site, journal, clock.at(t1 + 7 * DAY + 1))
    assert shared.is_dir(), "the second task is not even confirmed yet"
    confirm(journal)
    gc(site, journal, clock.at(t1 + 8 * DAY))  # the second task's clock starts here
    gc(site, journal, clock.at(t1 + 15 * DAY))
    assert shared.is_dir()
    report = gc(site, journal, clock.at(t1 + 15 * DAY + 1))
    assert not shared.exists()
    assert "first COMPLETED" in report.items[0].reason and "second COMPLETED" in report.items[0].reason


def test_a_work_dir_outside_the_work_roots_is_never_removed(env, tmp_path: Path):
    site, journal = env
    outside = tmp_path / "precious" / "data"
    add_task(journal, site, "odd1", workdir=outside)
    link = site.work_root / "u" / "e" / "link1"  # inside by name, outside once resolved
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    add_task(journal, site, "odd2", workdir=link)
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    report = gc(site, journal, clock.at(t1 + 8 * DAY))
    assert (outside / "result.txt").read_text() == "42\n"
    assert all(not i.done and "not under work_root" in (i.skipped or "") for i in report.items)
    assert gc(site, journal, clock.at(t1 + 9 * DAY)).items == [], "not tried again every pass"


def test_a_duplicate_re_sending_its_archive_keeps_the_work_dir(env):
    site, journal = env
    wd = add_task(journal, site, "busy1")
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    journal.event("busy1", event("busy1"))  # e.g. chunks of a re-sent result still in the outbox
    gc(site, journal, clock.at(t1 + 8 * DAY))
    assert wd.is_dir()
    confirm(journal)
    gc(site, journal, clock.at(t1 + 8 * DAY + 1))
    assert not wd.exists()


def test_work_is_bounded_per_pass(tmp_path: Path):
    site = make_site(tmp_path, max_items_per_pass=2)
    journal = Journal(site.journal_path)
    dirs = [add_task(journal, site, f"b{i}") for i in range(5)]
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    assert [gc(site, journal, clock).confirmed for _ in range(4)] == [2, 2, 1, 0]  # clocks are started in bounds too
    counts = [len(gc(site, journal, clock.at(t1 + 8 * DAY + i)).items) for i in range(4)]
    assert counts == [2, 2, 1, 0]
    assert not any(d.exists() for d in dirs)
    journal.close()


# -- journal rows and tombstones ---------------------------------------------------------------------------------
def _integrity(path: Path) -> str:
    db = sqlite3.connect(path)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0]
    finally:
        db.close()


def test_compaction_leaves_a_tombstone_that_expires_after_idempotency_days(env):
    site, journal = env
    add_task(journal, site, "old1", labels={"run": "r7"})
    seq = journal.get("old1").seq
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    gc(site, journal, clock.at(t1 + 8 * DAY))  # the work dir goes
    gc(site, journal, clock.at(t1 + 30 * DAY))
    assert journal.get("old1") is not None and journal.retention.tombstone("old1") is None
    report = gc(site, journal, clock.at(t1 + 30 * DAY + 1))
    assert journal.get("old1") is None and journal.transitions("old1") == []
    assert journal.outbox_depth() == 0
    tomb = journal.retention.tombstone("old1")
    assert tomb is not None and tomb.state == State.COMPLETED and tomb.exit_code == 0 and tomb.seq == seq
    assert tomb.labels == {"run": "r7"} and tomb.confirmed == t1
    assert tomb.note() == "finished on 2026-11-30, outputs expired"
    [item] = [i for i in report.items if i.area == "journal"]
    assert item.done and "3 transition(s)" in item.reason and "journal_days 30" in item.reason
    gc(site, journal, clock.at(t1 + 365 * DAY))
    assert journal.retention.tombstone("old1") is not None
    gc(site, journal, clock.at(t1 + 365 * DAY + 1))
    assert journal.retention.tombstone("old1") is None
    assert _integrity(site.journal_path) == "ok"


def test_no_compaction_while_the_work_dir_is_still_there(env):
    site, journal = env
    wd = add_task(journal, site, "stuck1")
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    # The work dir cannot be removed: a mount point (rmdir fails with EBUSY, even for root).
    with tmpfs(wd, "1m"):
        (wd / "busy.txt").write_text("x")
        report = gc(site, journal, clock.at(t1 + 31 * DAY))
        assert wd.is_dir() and journal.get("stuck1") is not None
        [item] = report.items
        assert item.area == "workdirs" and not item.done and "cannot remove it" in (item.skipped or "")
    report = gc(site, journal, clock.at(t1 + 31 * DAY + 1))  # tried again, and now it goes
    assert not wd.exists() and journal.get("stuck1") is None
    assert [i.area for i in report.items if i.done] == ["workdirs", "journal"]


def test_a_submit_racing_compaction_is_refused_by_the_journal(env):
    site, journal = env
    add_task(journal, site, "race1")
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    gc(site, journal, clock.at(t1 + 31 * DAY))
    task, _ = parse_task({"id": "race1", "command": ["true"]})
    with pytest.raises(Compacted) as info:
        journal.insert(task, executor="local", workdir=site.work_root / "x", route=Route("v1"))
    assert isinstance(info.value, sqlite3.Error)  # the service puts such a message back on the queue
    assert journal.get("race1") is None


def test_a_duplicate_submit_after_compaction_runs_nothing(tmp_path: Path):
    site = make_site(tmp_path)
    journal = Journal(site.journal_path)
    agent = Agent(site, journal, workers=2, frontends={"v1": V1Frontend(site.node, site.broker.events_exchange)})
    ran = tmp_path / "ran.log"
    data = {"id": "dup1", "command": ["sh", "-c", f"echo ran >> {ran}; echo out > o.txt"], "outputs": ["o.txt"],
            "labels": {"k": "v"}}
    try:
        assert agent.intake(data, Route("v1", "replies")).created
        rec = agent.wait("dup1", 30)
        assert rec is not None and rec.state == State.COMPLETED
        last_seq = rec.seq
        confirm(journal)
        clock = FakeClock()
        t1 = clock.t
        gc(site, journal, clock)
        gc(site, journal, clock.at(t1 + 31 * DAY))
        assert journal.get("dup1") is None and journal.retention.tombstone("dup1") is not None
        workdir = Path(rec.workdir or "")
        assert not workdir.exists()

        result = agent.intake(data, Route("v1", "replies", "c2"))
        assert result.record is None and not result.created and result.errors == []
        time.sleep(0.5)  # a task that was started would have run by now
        assert ran.read_text() == "ran\n", "the command ran once"
        assert journal.get("dup1") is None and not workdir.exists()
        rows = journal.pending()
        bodies = [json.loads(r.payload()) for r in rows]
        assert [b["type"] for b in bodies] == ["status", "result"]
        status, res = bodies
        assert status["state"] == "COMPLETED" and status["seq"] == last_seq + 1
        assert status["message"].startswith("finished on ") and status["message"].endswith(", outputs expired")
        assert res["seq"] == last_seq + 2 and res["outputs"] is None and res["exit_code"] == 0
        assert status["labels"] == res["labels"] == {"k": "v"}
        assert all(("", "replies") in r.destinations and r.properties.get("correlation_id") == "c2" for r in rows)
        assert agent.status("dup1", Route("v1", "q")) == State.COMPLETED  # not UNKNOWN
        assert json.loads(journal.pending()[-1].payload())["seq"] == last_seq + 3
    finally:
        agent.close()
        journal.close()


def test_a_late_legacy_duplicate_after_compaction_is_answered_as_an_error(tmp_path: Path):
    """The legacy path of the test above: the handler answers from the tombstone with an error
    reply, runs nothing, and counts the request as an error (it returned no outcome before)."""
    site = config_from_dict({
        "node": "gcnode", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "executors": {"local": {"kill_grace_seconds": 1}},
        "retention": {"workdirs_days": 7, "keep_failed_days": 14, "journal_days": 30, "idempotency_days": 365},
        "legacy": {"enabled": True, "sandbox_path": str(tmp_path / "sandbox"), "executor_no_image": "local"}})
    (tmp_path / "sandbox").mkdir()
    journal = Journal(site.journal_path)
    agent = Agent(site, journal, workers=2, frontends={
        "v1": V1Frontend(site.node, site.broker.events_exchange),
        "legacy": LegacyFrontend(site.node, site.broker.events_exchange, site.legacy)})
    handler = LegacyHandler(site, journal, agent, lambda: {})
    ran = tmp_path / "ran.log"
    info = ("{'_id': 'leg1', 'image': {}, 'command': {'base': 'sh -c', 'args': [{'id': 's', 'type': 'str', "
            f"'default_value': 'echo ran >> {ran}', 'position': 0, 'prefix': '', 'separate': True, "
            "'required': True}]}, 'cpus': 1, 'memory': '256M', 'gpus': 0}")
    raw = "|".join(["submit_run", "tool1", info, '{"execution_id": "exl1", "process_info": []}', "{}", "user7",
                    "None", "{}", "tok"]).encode()
    req = decode_request(raw, site.broker.max_body_bytes)
    task_id = to_task(req, site)[0]["id"]
    try:
        assert handler.submit_run(req, Route("legacy", "legacy-q", "c1")) == "ok"
        rec = agent.wait(task_id, 30)
        assert rec is not None and rec.state == State.COMPLETED, rec
        confirm(journal)
        clock = FakeClock()
        t1 = clock.t
        gc(site, journal, clock)
        gc(site, journal, clock.at(t1 + 31 * DAY))
        assert journal.get(task_id) is None and journal.retention.tombstone(task_id) is not None

        assert handler.submit_run(req, Route("legacy", "legacy-q", "c2")) == "error"
        time.sleep(0.5)  # a task that was started would have run by now
        assert ran.read_text() == "ran\n", "the command ran once"
        replies = [r.payload() for r in journal.pending(limit=1000)
                   if ("", "legacy-q") in r.destinations and r.properties.get("correlation_id") == "c2"]
        reply = decode_reply(replies)
        assert reply["status"] == "error", reply
        assert "finished on " in json.dumps(reply) and "outputs expired" in json.dumps(reply), reply
    finally:
        agent.close()
        journal.close()


# -- caches ---------------------------------------------------------------------------------------------------------
def _age(path: Path, clock: FakeClock, days: float) -> None:
    t = clock.t - days * DAY
    os.utime(path, (t, t))


def _mirrors(tmp_path: Path, site: SiteConfig, n: int) -> list[tuple[str, Path]]:
    out = []
    for i in range(n):
        repo = Repo(tmp_path / f"repo{i}")
        repo.commit({"f.txt": f"content {i}\n" * 200})
        out.append((repo.url, update_mirror(site, repo.url)))
    return out


def test_git_mirrors_evicted_by_age_and_size_least_recently_used_first(tmp_path: Path):
    site = make_site(tmp_path, caches={"git": {"max_age_days": 30, "max_bytes": None}})
    journal = Journal(site.journal_path)
    clock = FakeClock()
    (_, old), (_, mid), (_, new) = _mirrors(tmp_path, site, 3)
    _age(old, clock, 31)
    _age(mid, clock, 29)
    _age(new, clock, 1)
    report = gc(site, journal, clock)
    assert not old.exists() and mid.is_dir() and new.is_dir()
    [item] = [i for i in report.items if i.area == "git"]
    assert item.done and "max_age_days 30" in item.reason
    sizes = tree_bytes(mid) + tree_bytes(new)
    site2 = make_site(tmp_path, caches={"git": {"max_age_days": None, "max_bytes": sizes - 1}})
    report = gc(site2, journal, clock)
    assert not mid.exists() and new.is_dir(), "over max_bytes: the least recently used goes"
    usage = {u.area: u for u in report.usage}
    assert usage["git"].entries == 1 and usage["git"].bytes == tree_bytes(new)
    journal.close()


def test_a_cache_entry_in_use_is_never_evicted(tmp_path: Path):
    site = make_site(tmp_path, caches={"git": {"max_age_days": 1}})
    journal = Journal(site.journal_path)
    clock = FakeClock()
    (url_a, a), (_, b) = _mirrors(tmp_path, site, 2)
    _age(a, clock, 10)
    _age(b, clock, 10)
    add_task(journal, site, "staging1", State.RUNNING, source={"git": url_a})  # needs mirror a
    assert mirror_path(site, url_a) == a
    held = threading.Event()
    release = threading.Event()

    def stage_in() -> None:  # a stage-in of b holds its lock, as update_mirror does
        with exclusive(b.with_suffix(".lock")):
            held.set()
            release.wait(10)

    worker = threading.Thread(target=stage_in)
    worker.start()
    try:
        assert held.wait(5)
        report = gc(site, journal, clock)
        assert a.is_dir() and b.is_dir()
        [item] = [i for i in report.items if i.area == "git"]
        assert item.what == str(b) and not item.done and "lock" in (item.skipped or "")
        assert str(a) not in {i.what for i in report.items}
    finally:
        release.set()
        worker.join()
    gc(site, journal, clock)
    assert not b.exists() and a.is_dir()
    journal.transition("staging1", State.COMPLETED, event("staging1"))
    gc(site, journal, clock)
    assert not a.exists(), "once the task is final the mirror may go"
    journal.close()


@pytest.fixture
def fake_apptainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    target = bindir / "apptainer"
    shutil.copy(FAKE_APPTAINER, target)
    target.chmod(0o755)
    (bindir / "python3").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APPTAINER_PULL_SECONDS", "0")
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(tmp_path / "apptainer.jsonl"))
    return str(target)


def test_sif_cache_lru_under_its_lock_and_crash_leftovers(tmp_path: Path, fake_apptainer: str):
    site = make_site(tmp_path, caches={"sif": {"max_age_days": None, "max_bytes": 1}})
    journal = Journal(site.journal_path)
    clock = FakeClock()
    cache = site.state_dir / "sif"
    images = [f"127.0.0.1:5000/fem/img{i}:1" for i in range(3)]
    sifs = [ensure_sif(fake_apptainer, ref, cache) for ref in images]
    for i, sif in enumerate(sifs):
        _age(sif, clock, 10 - i)  # img0 least recently used
    ensure_sif(fake_apptainer, images[0], cache)  # a cached hit is a use: img0 is now the newest
    os.utime(sifs[0], (clock.t, clock.t))
    add_task(journal, site, "app1", State.RUNNING, image=images[1])  # a running job reads img1's SIF
    leftover = cache / ".ref-abc.123.456.tmp.sif"  # a pull killed halfway, two days ago
    leftover.write_bytes(b"half")
    _age(leftover, clock, 2)
    with exclusive(cache / ".locks" / f"{sifs[2].stem}.lock"):  # a stage-in of img2 right now
        report = gc(site, journal, clock)
    assert [(i.what, i.done) for i in report.items if i.area == "sif"] == [
        (str(sifs[2]), False), (str(sifs[0]), True), (str(leftover), True)], "LRU order; img1 is in use"
    assert "lock" in (report.items[0].skipped or "")
    assert sifs[2].exists() and not sifs[0].exists() and not leftover.exists()
    report = gc(site, journal, clock)
    assert [(i.what, i.done) for i in report.items] == [(str(sifs[2]), True)]
    assert sifs[1].exists() and sif_path(cache, images[1]) == sifs[1]
    journal.close()


# -- dry run, the report, the periodic thread --------------------------------------------------------------------------
def _snapshot(site: SiteConfig) -> tuple[list[str], str]:
    files = sorted(str(p) for p in site.work_root.rglob("*")) + sorted(str(p) for p in site.state_dir.rglob("*.git"))
    db = sqlite3.connect(site.journal_path)
    try:
        rows = repr([db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
                           for t in ("tasks", "transitions", "outbox", "retention", "tombstones")])
    finally:
        db.close()
    return files, rows


def test_dry_run_lists_exactly_what_gc_then_removes(tmp_path: Path):
    site = make_site(tmp_path, caches={"git": {"max_age_days": 5}})
    journal = Journal(site.journal_path)
    clock = FakeClock()
    for i in range(3):
        add_task(journal, site, f"d{i}", State.FAILED if i == 2 else State.COMPLETED)
    add_task(journal, site, "keep", State.RUNNING)
    confirm(journal)
    t1 = clock.t
    gc(site, journal, clock)
    add_task(journal, site, "later")  # its result is never confirmed: nothing of it is due
    (_, mirror), = _mirrors(tmp_path, site, 1)
    clock.at(t1 + 31 * DAY)
    _age(mirror, clock, 6)
    before = _snapshot(site)
    dry = gc(site, journal, clock, dry_run=True)
    assert _snapshot(site) == before, "a dry run changes nothing"
    real = gc(site, journal, clock)
    planned = [(i.area, i.what, i.bytes) for i in dry.items]
    assert planned == [(i.area, i.what, i.bytes) for i in real.items]
    assert all(i.done for i in real.items) and not any(i.done for i in dry.items)
    assert {a for a, _, _ in planned} == {"workdirs", "journal", "git"}
    assert len([p for p in planned if p[0] == "workdirs"]) == 3
    text = render_report(dry)
    assert text[0].startswith("would remove") and text[-1].startswith("would free: workdirs ")
    assert journal.get("keep") is not None and journal.get("later") is not None
    journal.close()


def test_periodic_gc_runs_on_its_own_thread_and_saves_its_report(tmp_path: Path):
    site = make_site(tmp_path, interval_seconds=0.05, workdirs_days=0, keep_failed_days=0, journal_days=0,
                     idempotency_days=0)
    journal = Journal(site.journal_path)
    wd = add_task(journal, site, "p1")
    confirm(journal)
    clock = FakeClock()
    periodic = PeriodicGC(site, now=clock, first_delay=0)
    periodic.start()
    try:
        deadline = time.monotonic() + 10
        while periodic.passes < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        clock.at(clock.t + 1)
        target = periodic.passes + 2
        while periodic.passes < target and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not wd.exists() and journal.get("p1") is None
    finally:
        started = time.monotonic()
        periodic.stop()
        assert time.monotonic() - started < 5
    assert periodic.summary()["passes"] >= 3
    saved = load_report(site)
    assert saved is not None and not saved.dry_run
    journal.close()


def test_metrics_series_of_retention_and_the_guard(tmp_path: Path):
    from prometheus_client import CollectorRegistry, generate_latest

    from fem_hpc.diskguard import DiskGuard

    site = make_site(tmp_path)
    journal = Journal(site.journal_path)
    add_task(journal, site, "m1")
    confirm(journal)
    clock = FakeClock()
    periodic = PeriodicGC(site, now=clock)
    periodic.last = gc(site, journal, clock)
    clock.at(clock.t + 3600)
    registry = CollectorRegistry()
    registry.register(GcCollector(periodic, DiskGuard(site)))
    text = generate_latest(registry).decode()
    assert 'fem_area_free_bytes{area="work_root"}' in text
    assert "fem_intake_paused 0.0" in text
    assert 'fem_area_bytes{area="workdirs"} 4003.0' in text
    assert 'fem_retention_oldest_age_seconds{kind="workdirs"} 3600.0' in text
    assert 'fem_gc_last_freed_bytes{area="workdirs"} 0.0' in text
    journal.close()


def test_tasks_waiting_for_a_shared_work_dir_do_not_hold_up_compaction(tmp_path: Path):
    site = make_site(tmp_path, max_items_per_pass=2)
    journal = Journal(site.journal_path)
    shared = site.work_root / "bob" / "exec9"
    for i in range(3):
        add_task(journal, site, f"old{i}", workdir=shared)
    add_task(journal, site, "solo")
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    gc(site, journal, clock)
    add_task(journal, site, "newest", State.RUNNING, workdir=shared)  # keeps the shared dir
    gc(site, journal, clock.at(t1 + 31 * DAY))
    gc(site, journal, clock.at(t1 + 31 * DAY + 1))
    assert journal.get("solo") is None and journal.retention.tombstone("solo") is not None
    assert all(journal.get(f"old{i}") is not None for i in range(3)) and shared.is_dir()
    journal.close()


def test_one_gc_pass_at_a_time(env):
    site, journal = env
    wd = add_task(journal, site, "one1")
    confirm(journal)
    clock = FakeClock()
    t1 = clock.t
    gc(site, journal, clock)
    held, release = threading.Event(), threading.Event()

    def other_pass() -> None:  # e.g. `fem-hpc gc` while the service's own pass runs
        with exclusive(site.state_dir / "gc.lock"):
            held.set()
            release.wait(10)

    worker = threading.Thread(target=other_pass)
    worker.start()
    try:
        assert held.wait(5)
        report = gc(site, journal, clock.at(t1 + 8 * DAY))
        assert report.errors == ["another gc pass is running; nothing done"] and wd.is_dir()
        assert [i.what for i in gc(site, journal, clock, dry_run=True).items] == [str(wd)], "a dry run needs no lock"
    finally:
        release.set()
        worker.join()
    gc(site, journal, clock)
    assert not wd.exists()


def test_in_use_names_the_mirrored_entries_stage_in_made(tmp_path: Path):
    """With `git.mirrors` and `image_mirrors`, stage-in fetches the mirror's URL and the executors pull
    the rewritten image: those are the cache entries on disk, so those are what an active task holds
    (and the task's own spelling too, for an entry made before the rule was added)."""
    upstream, mirror = Repo(tmp_path / "upstream"), Repo(tmp_path / "mirror")
    site = config_from_dict({
        "node": "gcnode", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "executors": {"local": {"kill_grace_seconds": 1}},
        "policy": {"git": ["file://*"], "images": ["*"]},
        "git": {"mirrors": {upstream.url: mirror.url}},
        "image_mirrors": {"images.site-a.test": {"mirror": "127.0.0.1:5000"}},
    })
    journal = Journal(site.journal_path)
    add_task(journal, site, "running1", State.RUNNING, source={"git": upstream.url},
             image="images.site-a.test/fl/flcore:demo")
    held = in_use(site, journal)
    assert str(mirror_path(site, site.git.fetch_url(upstream.url))) in held["git"]
    assert str(mirror_path(site, mirror.url)) in held["git"] and str(mirror_path(site, upstream.url)) in held["git"]
    mirrored = site_image(site, "images.site-a.test/fl/flcore:demo")
    assert mirrored.registry == "127.0.0.1:5000"
    assert cache_key(mirrored) in held["sif"] and mirrored.pull_ref in held["docker"]
    journal.close()
