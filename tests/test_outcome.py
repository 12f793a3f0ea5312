"""The decision logic without any service: `decide` as a table, and the tracker's state machine
driven by a fake executor and an injected clock (no sleeps, no threads)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from fem_hpc.config import config_from_dict
from fem_hpc.executors.base import Executor, ExecutorSettings, Job, NativeStatus
from fem_hpc.journal import Journal
from fem_hpc.layout import Marker
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.lifecycle.outcome import Outcome, decide
from fem_hpc.lifecycle.tracker import Tracker
from fem_hpc.model import Reason, State, parse_task

F, C, X = State.FAILED, State.COMPLETED, State.CANCELLED


def job(tmp: Path, walltime: str | None = None, task_id: str = "t1") -> Job:
    data: dict[str, Any] = {"id": task_id, "command": ["true"]}
    if walltime:
        data["resources"] = {"walltime": walltime}
    task, errors = parse_task(data)
    assert task is not None, errors
    j = Job(task=task, workdir=tmp / task_id, native_id=f"n-{task_id}")
    j.fem_dir.mkdir(parents=True, exist_ok=True)
    return j


def marker(code: int, signal: str | None = None, seconds: int = 5) -> Marker:
    return Marker(exit_code=code, signal=signal, started="2026-12-01T10:00:00Z",
                  finished=f"2026-12-01T10:00:{seconds:02d}Z")


def status(state: State, reason: Reason | None = None, code: int | None = None) -> NativeStatus:
    return NativeStatus(native_id="n-t1", state=state, reason=reason, exit_code=code, message=None)


#  marker                     native status                              cancel  walltime  -> state, reason, exit
TABLE = [
    (marker(0),                 None,                                      False, None,      C, None, 0),
    (marker(0),                 status(F, Reason.EXIT_CODE, 1),            False, None,      C, None, 0),
    (marker(3),                 None,                                      False, None,      F, Reason.EXIT_CODE, 3),
    (marker(143, "TERM", 10),   None,                                      False, "00:00:10", F, Reason.TIMEOUT, 143),
    (marker(143, "TERM", 4),    None,                                      False, "00:00:10", F, Reason.EXIT_CODE, 143),
    (marker(143, "TERM", 4),    None,                                      True,  None,      X, None, 143),
    (marker(0),                 status(X),                                 False, None,      X, None, 0),
    (marker(137),               status(F, Reason.OUT_OF_MEMORY, 137),      False, None,      F, Reason.OUT_OF_MEMORY, 137),  # noqa: E501
    (marker(143, "TERM", 10),   status(F, Reason.TIMEOUT),                 False, "00:00:10", F, Reason.TIMEOUT, 143),
    (None,                      status(C, None, 0),                        False, None,      F, Reason.LOST, 0),
    (None,                      status(F, Reason.NODE_FAIL),               False, None,      F, Reason.NODE_FAIL, None),
    (None,                      status(F, None, 2),                        False, None,      F, Reason.EXIT_CODE, 2),
    (None,                      status(X),                                 False, None,      X, None, None),
    (None,                      status(F, Reason.NODE_FAIL),               True,  None,      X, None, None),
]


@pytest.mark.parametrize(("mk", "st", "cancel", "walltime", "state", "reason", "code"), TABLE)
def test_decide(tmp_path: Path, mk: Marker | None, st: NativeStatus | None, cancel: bool, walltime: str | None,
                state: State, reason: Reason | None, code: int | None) -> None:
    out = decide(mk, st, cancel, job(tmp_path, walltime))
    assert (out.state, out.reason, out.exit_code) == (state, reason, code), out
    if mk is not None:
        assert (out.started, out.finished) == (mk.started, mk.finished)


def test_signal_message_names_the_signal(tmp_path: Path) -> None:
    out = decide(marker(143, "TERM", 4), None, False, job(tmp_path, "00:01:00"))
    assert out.message == "command exited with code 143 after SIGTERM was sent to it"


# -- the tracker on a fake clock ----------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeExecutor(Executor):
    """A scheduler as a dict: `queue` is what a poll shows; `fail` makes the next polls raise."""

    kind = "fake"
    template = "local.sh.j2"

    def __init__(self, site: Any):
        super().__init__("fake", ExecutorSettings(), site)
        self.queue: dict[str, NativeStatus] = {}
        self.fail = False
        self.polls = 0
        self.opinion: NativeStatus | None = None
        self.opinions_asked = 0

    def submit(self, job: Job) -> str:
        raise NotImplementedError

    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        self.polls += 1
        if self.fail:
            raise OSError("scheduler unreachable")
        return {j.native_id: self.queue[j.native_id] for j in jobs if j.native_id in self.queue}

    def cancel(self, job: Job) -> None:
        pass

    def lookup_finished(self, job: Job) -> NativeStatus | None:
        self.opinions_asked += 1
        return self.opinion

    def poll_interval(self, youngest_age: float) -> float:
        return 5.0


class Listener:
    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def on_running(self, job: Job, st: NativeStatus) -> None:
        self.events.append(("running", st.state))

    def on_pending(self, job: Job, st: NativeStatus) -> None:
        self.events.append(("pending", st.message))

    def on_final(self, job: Job, outcome: Outcome) -> None:
        self.events.append(("final", outcome))

    def on_paused(self, job: Job, message: str) -> None:
        self.events.append(("paused", message))

    def on_resumed(self, job: Job) -> None:
        self.events.append(("resumed", job.task.id))

    @property
    def final(self) -> Outcome | None:
        return next((o for kind, o in self.events if kind == "final"), None)


@pytest.fixture
def rig(tmp_path: Path):
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")})
    clock, executor, listener = Clock(), FakeExecutor(site), Listener()
    tracker = Tracker(executor, listener, clock=clock, lost_grace=60, marker_grace=3, signal_wait=10,
                      watch_markers=False)
    return tracker, executor, listener, clock


def write_marker(j: Job, mk: Marker) -> None:
    j.marker_path.write_text(json.dumps(mk.model_dump()))


def run(tracker: Tracker, clock: Clock, seconds: float, step: float = 1.0) -> None:
    t = 0.0
    while t < seconds:
        tracker.step()
        clock.advance(step)
        t += step


def running_job(tracker: Tracker, ex: FakeExecutor, clock: Clock, tmp_path: Path, *, seconds: float = 1,
                walltime: str | None = None) -> Job:
    """A job the scheduler says runs, tracked and followed for `seconds` of the fake clock."""
    j = job(tmp_path, walltime)
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.RUNNING)
    tracker.track(j)
    run(tracker, clock, seconds)
    return j


def test_running_then_marker_completes(rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = rig
    j = job(tmp_path)
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.SUBMITTED, message="Priority")
    tracker.track(j)
    run(tracker, clock, 1)
    assert listener.events == [("pending", "Priority")]
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.RUNNING)
    run(tracker, clock, 6)
    assert ("running", State.RUNNING) in listener.events
    write_marker(j, marker(0))
    run(tracker, clock, 1)
    assert listener.final is not None and listener.final.state == State.COMPLETED
    assert len(tracker) == 0


def test_failed_polls_fail_nothing(rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = rig
    j = job(tmp_path)
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.RUNNING)
    ex.fail = True
    tracker.track(j)
    run(tracker, clock, 600)  # ten minutes of a dead scheduler
    assert tracker.stale and tracker.poll_errors >= 5
    assert listener.final is None and len(tracker) == 1
    assert ex.polls < 30  # backed off, not hammering: 1, 2, 4 ... 60 s
    ex.fail = False
    run(tracker, clock, 61)
    assert not tracker.stale and ("running", State.RUNNING) in listener.events and listener.final is None


def test_vanished_job_second_opinion_then_lost_after_grace(rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = rig
    j = job(tmp_path)
    tracker.track(j)  # the queue does not know it: it is gone without a marker
    run(tracker, clock, 2)
    assert ex.opinions_asked == 0  # not before marker_grace
    run(tracker, clock, 5)
    assert ex.opinions_asked == 1 and listener.final is None
    run(tracker, clock, 45)
    assert listener.final is None  # still inside the 60 s grace
    run(tracker, clock, 20)
    assert listener.final is not None and listener.final.reason == Reason.LOST
    assert 1 < ex.opinions_asked <= 7  # again every 10 s while it has no final word, not every cycle


def test_second_opinion_settles_a_vanished_job(rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = rig
    j = job(tmp_path)
    ex.opinion = NativeStatus(native_id=j.native_id, state=State.FAILED, reason=Reason.OUT_OF_MEMORY, exit_code=137)
    tracker.track(j)
    run(tracker, clock, 12)
    assert listener.final is not None and listener.final.reason == Reason.OUT_OF_MEMORY


def test_signalled_job_waits_for_the_schedulers_reason(rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = rig
    j = running_job(tracker, ex, clock, tmp_path, seconds=6, walltime="01:00:00")
    write_marker(j, marker(137))  # died of a signal; the scheduler still shows it running
    run(tracker, clock, 4)
    assert listener.final is None
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.FAILED, reason=Reason.OUT_OF_MEMORY)
    run(tracker, clock, 2)
    assert listener.final is not None and listener.final.reason == Reason.OUT_OF_MEMORY


def test_signalled_job_decided_by_marker_after_the_wait(rig, tmp_path: Path) -> None:
    tracker, ex, listener, clock = rig
    j = running_job(tracker, ex, clock, tmp_path, seconds=6, walltime="01:00:00")
    write_marker(j, marker(143, "TERM"))
    run(tracker, clock, 9)
    assert listener.final is None
    run(tracker, clock, 3)
    assert listener.final is not None and listener.final.reason == Reason.EXIT_CODE


def test_reused_job_id_is_not_this_job(rig, tmp_path: Path) -> None:
    """After a controller reset the same id may belong to someone else's job: it is not ours."""
    tracker, ex, listener, clock = rig
    j = job(tmp_path)
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.RUNNING, job_name="somebody-else")
    tracker.track(j)
    run(tracker, clock, 80)
    assert ("running", State.RUNNING) not in listener.events
    assert listener.final is not None and listener.final.reason == Reason.LOST


def test_a_job_accounting_knows_alive_is_never_lost(rig, tmp_path: Path) -> None:
    """Missing from the queue but RUNNING by sacct's word: not gone; asked again, and it ends by
    the scheduler's word (here CANCELLED by hand), never LOST."""
    tracker, ex, listener, clock = rig
    j = job(tmp_path)
    ex.opinion = NativeStatus(native_id=j.native_id, state=State.RUNNING)
    tracker.track(j)
    run(tracker, clock, 300)  # far past the 60 s lost grace
    assert listener.final is None and ex.opinions_asked > 1
    ex.opinion = NativeStatus(native_id=j.native_id, state=State.CANCELLED, message="CANCELLED by 0")
    run(tracker, clock, 15)
    assert listener.final is not None and listener.final.state == State.CANCELLED


def test_the_second_opinion_survives_the_next_polls(rig, tmp_path: Path) -> None:
    """With polls faster than the marker grace, the next poll (which still does not list the job)
    must not erase sacct's final word before it is acted on."""
    tracker, ex, listener, clock = rig
    ex.poll_interval = lambda youngest_age: 0.5  # type: ignore[method-assign]
    j = job(tmp_path)
    ex.opinion = NativeStatus(native_id=j.native_id, state=State.FAILED, reason=Reason.EXIT_CODE, exit_code=137,
                              message="FAILED, signal 9")
    tracker.track(j)
    run(tracker, clock, 12, step=0.5)
    assert listener.final is not None and listener.final.state == State.FAILED
    assert listener.final.reason == Reason.EXIT_CODE and listener.final.exit_code == 137


# -- requeue: the scheduler runs the job again after a run that left a marker --------------------------
def test_a_requeued_job_is_not_ended_by_its_earlier_runs_marker(rig, tmp_path: Path) -> None:
    """Slurm's `scontrol requeue` (or a PBS rerun): PENDING again after the first run's SIGTERM
    marker. The job stays tracked well past the signal wait and ends by the next run's marker."""
    tracker, ex, listener, clock = rig
    j = running_job(tracker, ex, clock, tmp_path)
    assert listener.events == [("running", State.RUNNING)]
    write_marker(j, marker(143, "TERM", 4))
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.SUBMITTED, message="BeginTime")
    run(tracker, clock, 12)  # the first poll after the marker sees it queued again
    assert listener.final is None and len(tracker) == 1
    assert ("pending", "requeued: the scheduler lists the job queued again after its command ended (exit 143)") \
        in listener.events
    run(tracker, clock, 30)  # three signal waits: the stale marker, read again every cycle, is still set aside
    assert listener.final is None and len(tracker) == 1
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.RUNNING)
    run(tracker, clock, 6)
    assert [e for e in listener.events if e[0] == "running"] == [("running", State.RUNNING)] * 2
    write_marker(j, Marker(exit_code=0, started="2026-12-01T10:05:00Z", finished="2026-12-01T10:06:00Z"))
    run(tracker, clock, 2)
    final = listener.final
    assert final is not None and (final.state, final.exit_code, final.started) == (C, 0, "2026-12-01T10:05:00Z")


def test_a_marker_while_the_job_still_runs_is_its_end(rig, tmp_path: Path) -> None:
    """No requeue word and not queued: the scheduler only lags behind the job's end (unchanged)."""
    tracker, ex, listener, clock = rig
    j = running_job(tracker, ex, clock, tmp_path)
    write_marker(j, marker(143, "TERM", 4))
    run(tracker, clock, 12)
    final = listener.final
    assert final is not None and (final.state, final.reason, final.exit_code) == (F, Reason.EXIT_CODE, 143)


class QueueExecutor(FakeExecutor):
    """FakeExecutor that takes submits: the job shows RUNNING at once."""

    def submit(self, job: Job) -> str:
        self.queue["q-1"] = NativeStatus(native_id="q-1", state=State.RUNNING, job_name=job.job_name)
        return "q-1"

    def poll_interval(self, youngest_age: float) -> float:
        return 0.2


def test_a_requeued_task_goes_back_to_submitted_in_the_journal(tmp_path: Path) -> None:
    """Through the real Agent and journal: RUNNING, then SUBMITTED with the requeue message (an
    event of its own), RUNNING again, and COMPLETED by the rerun's marker."""
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w"),
                             "executors": {"local": {}}})
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    fake = QueueExecutor(site)
    fake.name = "local"
    tracker = Tracker(fake, agent.results, watch_markers=False, signal_wait=0.5)
    agent.executors._executors["local"] = fake  # the pool hands out the fake for "local"
    agent.executors._trackers["local"] = tracker
    tracker.start()

    def until(state: State) -> Any:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            rec = agent.journal.get("rq")
            if rec is not None and (rec.state == state or rec.final):
                return rec
            time.sleep(0.05)
        return agent.journal.get("rq")

    try:
        agent.intake({"id": "rq", "command": ["true"]})
        rec = until(State.RUNNING)
        assert rec is not None and rec.state == State.RUNNING, rec
        fem = Path(rec.workdir or "") / ".fem"
        (fem / "exit_code").write_text(json.dumps(marker(143, "TERM", 4).model_dump()))
        fake.queue["q-1"] = NativeStatus(native_id="q-1", state=State.SUBMITTED)
        rec = until(State.SUBMITTED)
        assert rec is not None and rec.state == State.SUBMITTED, rec
        assert (rec.message or "").startswith("requeued: the scheduler lists the job queued again")
        time.sleep(1.5)  # three signal waits
        rec = agent.journal.get("rq")
        assert rec is not None and rec.state == State.SUBMITTED, rec
        fake.queue["q-1"] = NativeStatus(native_id="q-1", state=State.RUNNING)
        assert until(State.RUNNING).state == State.RUNNING
        (fem / "exit_code").write_text(json.dumps({"exit_code": 0, "started": "2026-12-01T10:05:00Z",
                                                   "finished": "2026-12-01T10:05:01Z"}))
        done = agent.wait("rq", timeout=20)
        assert done is not None and done.state == State.COMPLETED, done
        states = [t["state"] for t in agent.journal.transitions("rq")]
        assert states[states.index("RUNNING"):states.index("RUNNING") + 3] == ["RUNNING", "SUBMITTED", "RUNNING"]
        assert "FAILED" not in states
    finally:
        tracker.stop()
        agent.close()


def test_requeued_then_gone_without_a_new_marker_falls_back_to_the_earlier_run(rig, tmp_path: Path) -> None:
    """Queued again after a SIGTERM marker, then gone with no new run (e.g. Slurm's PREEMPTED when
    the job is not requeued after all): not LOST, the earlier run's marker is the last word."""
    tracker, ex, listener, clock = rig
    j = running_job(tracker, ex, clock, tmp_path)
    write_marker(j, marker(143, "TERM", 4))
    ex.queue[j.native_id] = NativeStatus(native_id=j.native_id, state=State.SUBMITTED, message="Preempted")
    run(tracker, clock, 6)
    assert listener.final is None
    del ex.queue[j.native_id]
    run(tracker, clock, 70)  # past the lost grace (60 s)
    final = listener.final
    assert final is not None and (final.state, final.reason, final.exit_code) == (F, Reason.EXIT_CODE, 143)
    assert final.message == ("left the queue after it was requeued, without a new exit-code marker; its earlier run: "
                             "command exited with code 143 after SIGTERM was sent to it")
