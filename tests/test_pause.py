"""Paused, never failed: what the tracker and the submit path do while a cluster is unreachable.

The tracker is driven by a fake executor and an injected clock (no threads, no sleeps), as in
test_outcome.py. The submit path runs the real Agent with a fake executor whose submits raise a
TransportError, once after the job had in fact reached its "scheduler": the retry must adopt
that job by name, never submit a second one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
from test_outcome import Clock, FakeExecutor, Listener, job, marker, run, running_job, write_marker

from fem_hpc.config import config_from_dict
from fem_hpc.executors.base import Deferred, ExecutorSettings, Job, NativeStatus, TransportError
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.lifecycle.later import Later
from fem_hpc.lifecycle.tracker import Tracker
from fem_hpc.model import Reason, State

PAUSE = "paused: cluster.example unreachable since "


class LinkExecutor(FakeExecutor):
    """A fake cluster behind a link that can be cut: every call raises TransportError while `down`."""

    def __init__(self, site: Any, remote_markers: bool = False):
        super().__init__(site)
        self.down_since: float | None = None
        self.remote_markers = remote_markers
        self.marker_reads = 0
        self.cancels = 0

    def _link(self) -> None:
        if self.down_since is not None:
            raise TransportError("cannot connect to ssh://cluster.example:22: Connection refused",
                                 "cluster.example", self.down_since)

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        self.polls += 1
        self._link()
        return {j.native_id: self.queue[j.native_id] for j in jobs if j.native_id in self.queue}

    def read_markers(self, jobs: list[Job]) -> dict[str, Any]:
        if self.remote_markers:
            self.marker_reads += 1
            self._link()
        return super().read_markers(jobs)

    def marker_interval(self) -> float | None:
        return 1.0 if self.remote_markers else None

    def cancel(self, job: Job) -> None:
        self._link()
        self.cancels += 1
        self.queue[job.native_id or ""] = NativeStatus(native_id=job.native_id or "", state=State.CANCELLED)


@pytest.fixture(params=[False, True], ids=["local-markers", "remote-markers"])
def link_rig(request, tmp_path: Path):
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")})
    clock, listener = Clock(), Listener()
    ex = LinkExecutor(site, remote_markers=request.param)
    tracker = Tracker(ex, listener, clock=clock, lost_grace=60, marker_grace=3, signal_wait=10,
                      watch_markers=False, retry_cap=30)
    return tracker, ex, listener, clock


def test_an_outage_pauses_every_job_and_fails_none(link_rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = link_rig
    jobs = [job(tmp_path, task_id=f"t{i}") for i in range(3)]
    for j in jobs:
        ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.RUNNING)
        tracker.track(j)
    run(tracker, clock, 3)
    assert [k for k, _ in listener.events] == ["running"] * 3
    ex.down_since = clock.now
    # Ten minutes without the cluster, far past the lost grace: nothing ends, nothing is LOST.
    run(tracker, clock, 600)
    assert listener.final is None and len(tracker) == 3
    paused = [m for k, m in listener.events if k == "paused"]
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ex.down_since))
    assert paused == [PAUSE + when] * 3  # once per job, not once per failed attempt
    assert tracker.paused is not None and tracker.stale
    attempts = ex.marker_reads if ex.remote_markers else ex.polls
    assert attempts < 35, attempts  # backed off to one attempt per 30 s, not one per cycle
    # The link is back: tracking resumes (within the backoff cap) and the jobs end normally.
    ex.down_since = None
    for j in jobs:
        write_marker(j, marker(0))
    run(tracker, clock, 31)
    assert [k for k, _ in listener.events].count("resumed") == 3
    assert tracker.paused is None and not tracker.stale
    finals = [o for k, o in listener.events if k == "final"]
    assert [o.state for o in finals] == [State.COMPLETED] * 3


def test_lost_only_on_the_schedulers_word_after_the_link_returns(link_rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = link_rig
    j = running_job(tracker, ex, clock, tmp_path, seconds=2)
    ex.down_since = clock.now
    del ex.queue[j.native_id]  # the job vanished during the outage, but nobody can see it yet
    run(tracker, clock, 300)
    assert listener.final is None
    ex.down_since = None
    run(tracker, clock, 40)  # back: gone from the queue, yet within the grace counted from now
    assert listener.final is None
    run(tracker, clock, 70)
    assert listener.final is not None and listener.final.reason == Reason.LOST


def test_a_cancel_during_the_outage_is_sent_when_the_link_returns(link_rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = link_rig
    j = running_job(tracker, ex, clock, tmp_path, seconds=2)
    ex.down_since = clock.now
    run(tracker, clock, 5)
    assert tracker.cancel(j.task.id)
    assert ex.cancels == 0
    run(tracker, clock, 60)
    assert ex.cancels == 0 and listener.final is None
    ex.down_since = None
    run(tracker, clock, 40)
    assert ex.cancels == 1
    assert listener.final is not None and listener.final.state == State.CANCELLED


class BudgetExecutor(FakeExecutor):
    def __init__(self, site: Any):
        super().__init__(site)
        self.deferrals = 0

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        if self.deferrals < 3:
            self.deferrals += 1
            raise Deferred(4.0)
        return super().poll(jobs)


def test_a_deferred_poll_is_later_not_stale(tmp_path: Path) -> None:
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")})
    clock, listener, ex = Clock(), Listener(), BudgetExecutor(site)
    tracker = Tracker(ex, listener, clock=clock, watch_markers=False)
    running_job(tracker, ex, clock, tmp_path, seconds=9)
    assert ex.deferrals == 3 and not tracker.stale and tracker.poll_errors == 0
    assert listener.events == []  # no poll got through yet: 3 deferrals of 4 s
    run(tracker, clock, 5)
    assert ("running", State.RUNNING) in listener.events and not tracker.stale


# -- the submit path ------------------------------------------------------------------------------
class FlakySubmitExecutor(FakeExecutor):
    """Submits reach the 'scheduler' (`queue`) on the second attempt and then lose the link before
    the id comes back; the third attempt works. find_by_name sees what reached the queue."""

    def __init__(self, site: Any, settings: ExecutorSettings):
        super().__init__(site)
        self.settings = settings
        self.submits = 0
        self.lookups = 0
        self.down = True

    def submit(self, job: Job) -> str:
        self.submits += 1
        native = f"{100 + self.submits}"
        if self.submits == 1:
            raise TransportError("cannot connect", "cluster.example", time.time())
        if self.submits == 2:
            self.queue[native] = NativeStatus(native_id=native, state=State.RUNNING, job_name=job.job_name)
            raise TransportError("connection lost during sbatch", "cluster.example", time.time())
        self.queue[native] = NativeStatus(native_id=native, state=State.RUNNING, job_name=job.job_name)
        return native

    def find_by_name(self, job: Job) -> str | None:
        self.lookups += 1
        return next((s.native_id for s in self.queue.values() if s.job_name == job.job_name), None)

    def poll_interval(self, youngest_age: float) -> float:
        return 0.2


def test_a_submit_during_an_outage_waits_and_never_makes_two_jobs(tmp_path: Path) -> None:
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w"),
                             "executors": {"local": {}}})
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    fake = FlakySubmitExecutor(site, ExecutorSettings(retry_max_seconds=1))
    fake.name = "local"
    tracker = Tracker(fake, agent.results, watch_markers=False, retry_cap=1)
    tracker.start()
    agent.executors._executors["local"] = fake  # the pool hands out the fake for "local"
    agent.executors._trackers["local"] = tracker
    try:
        res = agent.intake({"id": "flaky", "command": ["true"]})
        assert res.record is not None
        messages = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            rec = agent.journal.get("flaky")
            assert rec is not None
            messages.append(rec.message)
            if rec.state == State.RUNNING or rec.final:
                break
            time.sleep(0.05)
        rec = agent.journal.get("flaky")
        assert rec is not None and rec.state in (State.SUBMITTED, State.RUNNING), rec
        assert any(m and m.startswith("paused: cluster.example unreachable since ") for m in messages), messages
        # attempt 1 reached nothing (a lookup before attempt 2 finds no job); attempt 2 reached the
        # queue and lost the answer: the second lookup finds that job instead of a third submit.
        assert fake.submits == 2 and fake.lookups == 2, (fake.submits, fake.lookups)
        assert rec.native_id == "102" and list(fake.queue) == ["102"]
        states = [t["state"] for t in agent.journal.transitions("flaky")]
        assert "FAILED" not in states and states.count("SUBMITTED") == 1
        assert rec.intent
        wd = Path(rec.workdir or "")
        (wd / ".fem" / "exit_code").write_text(json.dumps({"exit_code": 0}))
        done = agent.wait("flaky", timeout=20)
        assert done is not None and done.state == State.COMPLETED, done
    finally:
        agent.close()


def test_later_runs_in_order_and_stops() -> None:
    later = Later()
    seen: list[int] = []
    later.call(0.2, seen.append, 2)
    later.call(0.05, seen.append, 1)
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert seen == [1, 2]
    later.call(10, seen.append, 3)
    later.stop()
    assert not later.call(0, seen.append, 4)
    time.sleep(0.1)
    assert seen == [1, 2]


def test_the_remote_marker_read_is_on_time_not_a_tick_late(tmp_path: Path) -> None:
    """Off-cluster the marker is read once per marker_seconds (1 s here); the loop's tick (0.2 s)
    must not be added on top of it, which cost up to 0.2 s of every completion on an idle link."""
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")})
    clock, listener = Clock(), Listener()
    ex = LinkExecutor(site, remote_markers=True)
    tracker = Tracker(ex, listener, clock=clock, marker_interval=0.2, watch_markers=False)
    assert tracker.sleep_for() == 0.2  # nothing tracked: the tick (a new job wakes the loop)
    j = job(tmp_path)
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.RUNNING)
    tracker.track(j)
    tracker.step()
    assert ex.marker_reads == 1
    clock.advance(0.9)
    assert tracker.sleep_for() == pytest.approx(0.1)  # the read falls due before the tick ends
    clock.advance(0.1)
    tracker.step()
    assert ex.marker_reads == 2  # exactly 1 s after the first
    ex.down_since = clock.now
    clock.advance(1.0)
    tracker.step()
    assert tracker.paused is not None and tracker.sleep_for() == 0.2  # the backoff decides, not the reads
