"""The disk guard on a real small file system (a tmpfs of a few MB as state_dir and work_root):
what it says, when, and what intake does with it (queue: the task waits in RECEIVED; reject: a
REJECTED result). The end-to-end test with `fem-hpc serve` is in test_diskguard_serve.py."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from fskit import fill, tmpfs

from fem_hpc.broker.consumer import Delivery
from fem_hpc.config import SiteConfig, config_from_dict
from fem_hpc.diskguard import DiskGuard, guard_check
from fem_hpc.journal import Journal, Route
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State
from fem_hpc.protocols.v1.dispatch import V1Dispatch
from fem_hpc.protocols.v1.frontend import V1Frontend

MiB = 1024 * 1024


class Tick:
    """A monotonic clock the test moves by hand (the guard reuses a check for check_seconds)."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def make_site(disk: Path, **guard: Any) -> SiteConfig:
    return config_from_dict({
        "node": "guardnode", "state_dir": str(disk / "state"), "work_root": str(disk / "work"),
        "executors": {"local": {"kill_grace_seconds": 1}},
        "disk_guard": {"min_free_bytes": MiB, "min_free_percent": 0, "check_seconds": 0.2, **guard},
    })


@pytest.fixture
def disk(tmp_path: Path):
    with tmpfs(tmp_path / "disk", "8m") as d:
        yield d


def test_the_guard_names_the_area_its_free_space_and_the_threshold(disk: Path):
    site = make_site(disk, check_seconds=2)
    tick = Tick()
    guard = DiskGuard(site, clock=tick)
    assert guard.blocked() is None  # work_root does not exist yet: its nearest existing dir is measured
    filler = fill(disk, leave=MiB // 2)
    assert guard.blocked() is None, "the last check is reused for check_seconds"
    tick.t += 2
    reason = guard.blocked()
    assert reason is not None
    assert f"state_dir {disk / 'state'}: " in reason and f"work_root {disk / 'work'}: " in reason
    assert "free of 8.0 MiB, below the 1.0 MiB kept free (disk_guard.min_free_bytes)" in reason
    check = guard_check(guard)
    assert check.status == "error" and check.detail.startswith("intake paused (new tasks wait in RECEIVED")
    assert "fem-hpc gc --dry-run" in (check.fix or "")
    state = guard.state()
    assert state["blocked"] and state["on_low_disk"] == "queue"
    assert {a["area"] for a in state["areas"] if a["low"]} == {"state_dir", "work_root"}
    assert all(a["free_bytes"] < MiB and a["total_bytes"] == 8 * MiB for a in state["areas"])
    filler.unlink()
    assert guard.blocked() is not None
    tick.t += 2
    assert guard.blocked() is None and guard_check(guard).status == "ok"


def test_a_percent_threshold_and_extra_areas(disk: Path, tmp_path: Path):
    with tmpfs(tmp_path / "elsewhere", "4m") as other:
        _percent_and_extra(disk, other)


def _percent_and_extra(disk: Path, other: Path) -> None:
    site = make_site(disk, min_free_bytes=0, min_free_percent=20, paths={"scratch": str(other)})
    guard = DiskGuard(site)
    assert [a.name for a in guard.areas()] == ["state_dir", "work_root", "paths.scratch"]
    assert guard.blocked() is None
    fill(disk, leave=MiB)
    guard.areas(fresh=True)
    reason = guard.blocked()
    assert reason is not None and "below the 1.6 MiB kept free (disk_guard.min_free_percent)" in reason
    assert "paths.scratch" not in reason, "the other file system has room"


def _agent(site: SiteConfig) -> tuple[Agent, Journal]:
    journal = Journal(site.journal_path)
    frontends = {"v1": V1Frontend(site.node, site.broker.events_exchange)}
    return Agent(site, journal, workers=2, frontends=frontends), journal


def test_queue_a_new_task_waits_in_received_and_starts_when_space_returns(disk: Path, tmp_path: Path):
    site = make_site(disk)
    agent, journal = _agent(site)
    ran = tmp_path / "ran.log"
    try:
        filler = fill(disk, leave=MiB // 2)
        result = agent.intake({"id": "q1", "command": ["sh", "-c", f"echo ran >> {ran}"]})
        assert result.created, "queued: journalled (and acked) as usual"
        deadline = time.monotonic() + 5
        while "waiting for disk space" not in (journal.get("q1").message or "") and time.monotonic() < deadline:
            time.sleep(0.05)
        rec = journal.get("q1")
        assert rec.state == State.RECEIVED and rec.message.startswith("waiting for disk space: state_dir ")
        time.sleep(1)
        assert journal.get("q1").state == State.RECEIVED and not ran.exists(), "nothing starts on a low disk"
        filler.unlink()
        rec = agent.wait("q1", 30)
        assert rec is not None and rec.state == State.COMPLETED and rec.message is None
        assert ran.read_text() == "ran\n"
    finally:
        agent.close()
        journal.close()


def test_queue_a_waiting_task_can_be_cancelled(disk: Path, tmp_path: Path):
    site = make_site(disk)
    agent, journal = _agent(site)
    try:
        filler = fill(disk, leave=MiB // 2)
        assert agent.intake({"id": "c1", "command": ["sh", "-c", f"touch {tmp_path / 'ran'}"]}).created
        agent.cancel("c1")
        rec = agent.wait("c1", 10)
        assert rec is not None and rec.state == State.CANCELLED and not (tmp_path / "ran").exists()
        filler.unlink()
    finally:
        agent.close()
        journal.close()


def test_reject_a_new_task_gets_a_rejected_result_naming_the_disk(disk: Path):
    site = make_site(disk, on_low_disk="reject")
    agent, journal = _agent(site)
    try:
        filler = fill(disk, leave=MiB // 2)
        task = {"id": "r1", "command": ["true"], "labels": {"run": "7"}}
        result = agent.intake(task, Route("v1", "replies"))
        assert result.record is None and not result.created
        [error] = result.errors
        assert error.field == "node" and error.message.startswith("not enough disk space to take new tasks: ")
        assert "state_dir" in error.message and "disk_guard.min_free_bytes" in error.message
        assert journal.get("r1") is None, "nothing recorded: the same id may come again"
        # The v1 frontend's answer to that refusal, as `serve` sends it: a REJECTED result.
        body = json.dumps({"fem": 1, "op": "submit", "task": task}).encode()
        V1Dispatch(site, journal, agent, dict, legacy_enabled=False).handle(Delivery(
            body=body, reply_to="replies", correlation_id=None, message_id=None, headers={},
            ack=lambda: None, nack=lambda: None))
        [row] = [r for r in journal.pending() if ("", "replies") in r.destinations]
        body = json.loads(row.payload())
        assert body["state"] == "REJECTED" and body["errors"][0]["field"] == "node"
        assert body["labels"] == {"run": "7"} and ("", "replies") in row.destinations
        filler.unlink()
        time.sleep(site.disk_guard.check_seconds)
        assert agent.intake({"id": "r1", "command": ["true"]}).created
        assert agent.wait("r1", 30).state == State.COMPLETED
    finally:
        agent.close()
        journal.close()


def test_a_full_work_root_at_stage_out_waits_for_space_and_fails_nothing(tmp_path: Path):
    """The job ended well, then its archive finds the disk full: the task stays in STAGING_OUT and
    says why, and once space is freed its outputs go back whole and it is COMPLETED, not FAILED."""
    with tmpfs(tmp_path / "work", "12m") as work:
        site = config_from_dict({
            "node": "guardnode", "state_dir": str(tmp_path / "state"), "work_root": str(work),
            "executors": {"local": {"kill_grace_seconds": 1}},
            "disk_guard": {"min_free_bytes": 0, "min_free_percent": 0},  # the guard stays out of it
            "stage_out": {"compress_level": 1},
        })
        filler = fill(work, leave=8 * MiB)
        journal = Journal(site.journal_path)
        agent = Agent(site, journal, frontends={"v1": V1Frontend(site.node, site.broker.events_exchange)})
        try:
            # 5 MB that do not compress: the archive needs about as much again, and 3 MB are left
            res = agent.intake({"id": "full1", "command": ["sh", "-c", "head -c 5000000 /dev/urandom > big.bin"],
                                "outputs": ["big.bin"]}, Route("v1", "q", "c1"))
            assert res.record is not None, res.errors
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                rec = journal.get("full1")
                if rec is not None and "waiting for disk space" in (rec.message or ""):
                    break
                assert rec is not None and not rec.final, (rec.state, rec.message) if rec else None
                time.sleep(0.2)
            assert rec.state == State.STAGING_OUT and "No space left on device" in rec.message, rec.message
            time.sleep(1.5)  # a retry on a still full disk changes nothing
            assert journal.get("full1").state == State.STAGING_OUT
            filler.unlink()
            done = agent.wait("full1", timeout=90)
            assert done is not None and done.state == State.COMPLETED and done.reason is None, done
            result = json.loads(done.result_json or "{}")
            assert result["outputs"]["size"] > 5_000_000 and result["exit_code"] == 0
        finally:
            agent.close()
            journal.close()
