"""The real tracker and PBSExecutor driven by recorded OpenPBS 23.06 outputs.

`qsub`/`qstat`/`qdel` here are tests/fakes/pbs-recorded-replay, a RECORDED-OUTPUT REPLAYER (not
PBS): each call prints the next recording the test's script names, byte for byte, with its
recorded stderr and exit status. What is tested is fem-hpc: which qstat it runs, how many per
cycle, and what it makes of the answers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fem_hpc.config import config_from_dict
from fem_hpc.executors import registry
from fem_hpc.executors.base import Job, NativeStatus
from fem_hpc.executors.pbs import PBSExecutor
from fem_hpc.lifecycle.outcome import Outcome
from fem_hpc.lifecycle.tracker import Tracker
from fem_hpc.model import Reason, State, Task

REPLAYER = Path(__file__).parent / "fakes" / "pbs-recorded-replay"
IDS = ["-f", "-F", "json", "-x"]  # qstat's options before the ids, with history


class Replay:
    """A bin dir of qsub/qstat/qdel links to the replayer, its script, and the log of calls."""

    def __init__(self, root: Path, script: dict[str, list[dict[str, Any]]]):
        self.dir = root / "replay"
        self.bin = root / "replay-bin"
        self.dir.mkdir()
        self.bin.mkdir()
        for prog in ("qsub", "qstat", "qdel"):
            (self.bin / prog).symlink_to(REPLAYER)
        (self.dir / "script.json").write_text(json.dumps(script))

    @property
    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.bin}:{os.environ.get('PATH', '/usr/bin:/bin')}", "PBS_REPLAY_DIR": str(self.dir)}

    def flag(self, name: str) -> None:
        (self.dir / name).touch()

    def calls(self, prog: str = "qstat") -> list[dict[str, Any]]:
        path = self.dir / "calls.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [c for c in map(json.loads, lines) if c["prog"] == prog]


class Listener:
    def __init__(self) -> None:
        self.running: list[str] = []
        self.pending: list[tuple[str, str | None]] = []
        self.final: dict[str, Outcome] = {}
        self._cond = threading.Condition()

    def on_running(self, job: Job, status: NativeStatus) -> None:
        with self._cond:
            self.running.append(job.task.id)
            self._cond.notify_all()

    def on_pending(self, job: Job, status: NativeStatus) -> None:
        with self._cond:
            self.pending.append((job.task.id, status.message))
            self._cond.notify_all()

    def on_final(self, job: Job, outcome: Outcome) -> None:
        with self._cond:
            self.final[job.task.id] = outcome
            self._cond.notify_all()

    def wait(self, what, timeout: float = 10.0) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: what(self), timeout), (self.running, self.pending, self.final)


def executor(tmp_path: Path, replay: Replay, **settings: Any) -> PBSExecutor:
    site = config_from_dict({
        "node": "replay", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "default_executor": "pbs",
        "executors": {"pbs": {"dialect": "pbspro", "env": replay.env, "lost_grace_seconds": 1,
                              "poll": {"min_seconds": 0.2, "max_seconds": 0.2, "ramp_seconds": 0}, **settings}},
    })
    ex = registry.create("pbs", site)
    assert isinstance(ex, PBSExecutor)
    return ex


@dataclass
class RecordedJob(Job):
    """The recorded jobs were submitted as `qsub -N rec-...`, not under fem-hpc's `fem-<task id>`;
    the tracker drops a status whose job name is not the job's (a reused id), so the name is theirs."""

    recorded_name: str = ""

    @property
    def job_name(self) -> str:
        return self.recorded_name


def submit(ex: PBSExecutor, tmp_path: Path, task_id: str, name: str, walltime: str | None = None) -> Job:
    resources = {"walltime": walltime} if walltime else {}
    task = Task.model_validate({"id": task_id, "command": ["sleep", "30"], "resources": resources})
    job = RecordedJob(task=task, workdir=tmp_path / "work" / task_id, recorded_name=name)
    job.fem_dir.mkdir(parents=True)
    job.native_id = ex.submit(job)
    return job


def marker(job: Job, exit_code: int, signal: str | None = None, seconds: int = 1) -> None:
    assert 0 <= seconds < 60
    job.marker_path.write_text(json.dumps({"exit_code": exit_code, "signal": signal, "started": "2026-12-01T18:20:00Z",
                                           "finished": f"2026-12-01T18:20:{seconds:02d}Z"}))


@pytest.fixture
def run_tracker():
    trackers: list[Tracker] = []

    def start(ex: PBSExecutor, jobs: list[Job], **kwargs: Any) -> tuple[Tracker, Listener]:
        listener = Listener()
        kwargs.setdefault("lost_grace", 0.6)
        kwargs.setdefault("marker_grace", 0.4)
        tracker = Tracker(ex, listener, **kwargs)
        for job in jobs:  # all tracked before the first poll: it asks for every id at once
            tracker.track(job)
        trackers.append(tracker)
        tracker.start()
        return tracker, listener

    yield start
    for t in trackers:
        t.stop()


def test_history_off_jobs_stay_tracked_and_end_by_their_markers(tmp_path, run_tracker):
    """job_history_enable = False: `qstat -x` prints nothing (rc 0); fem-hpc drops -x at once and the
    running job is never LOST, however long it runs past the lost grace."""
    job_id = "88.pbs-vm"
    replay = Replay(tmp_path, {
        "qsub": [{"out": "historyoff-jobid.txt"}],
        "qstat": [{"argv": [*IDS, job_id], "out": "historyoff-qstat-json-x-running.json"},
                  {"argv": ["-f", "-F", "json", job_id], "out": "historyoff-qstat-json-no-x-running.json"}],
    })
    ex = executor(tmp_path, replay)
    job = submit(ex, tmp_path, "histoff", "rec-histoff")
    assert job.native_id == job_id
    tracker, seen = run_tracker(ex, [job])
    seen.wait(lambda s: s.running == ["histoff"])
    started, deadline = time.monotonic(), time.monotonic() + 10
    # well past lost_grace (0.6 s), over several polls
    while (tracker.poll_count < 4 or time.monotonic() - started < 1.5) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert tracker.poll_count >= 4
    assert seen.final == {} and len(tracker) == 1  # the one job, still tracked
    assert ex.history is False and ex.unfiltered is False
    marker(job, 0)
    seen.wait(lambda s: "histoff" in s.final)
    outcome = seen.final["histoff"]
    assert (outcome.state, outcome.exit_code) == (State.COMPLETED, 0)
    calls = replay.calls()
    assert calls[0]["argv"] == [*IDS, job_id] and all("-x" not in c["argv"] for c in calls[1:])
    assert all(c["rc"] == 0 for c in calls)  # every call was what the script expected
    assert len(calls) == tracker.poll_count + 1  # one per cycle, plus the retry without -x once


def test_partial_reply_falls_back_to_one_unfiltered_qstat_per_cycle(tmp_path, run_tracker):
    """The master-branch qstat prints only the first of seven ids: within the same cycle one
    unfiltered `qstat -f -F json -x` answers for all, and every later cycle is that one call."""
    names = ["ok", "exit3", "walltime", "queued", "held", "deleted-while-queued", "qdel-running2"]
    ids = [f"{n}.pbs-vm" for n in range(3, 10)]
    replay = Replay(tmp_path, {
        "qsub": [{"out": f"qsub-{n}.txt"} for n in names],
        "qstat": [{"argv": [*IDS, *ids], "out": "master-qstat-json-mixed-all-ids.json"},
                  {"argv": IDS, "out": "release-23.06.06-qstat-json-mixed.json"}],
    })
    ex = executor(tmp_path, replay)
    recorded = ["rec-ok", "rec-exit3", "rec-wall", "rec-queued", "rec-held", "rec-delrun", "rec-qdelrun"]
    jobs = {n: submit(ex, tmp_path, f"p-{n}", r, walltime="00:00:02" if n == "walltime" else None)
            for n, r in zip(names, recorded, strict=True)}
    assert [j.native_id for j in jobs.values()] == ids
    # What the wrappers of the jobs that ran left behind (6, 7, 8 never started).
    marker(jobs["ok"], 0)
    marker(jobs["exit3"], 3)
    marker(jobs["walltime"], 143, "TERM", seconds=21)
    marker(jobs["qdel-running2"], 143, "TERM")
    tracker, seen = run_tracker(ex, list(jobs.values()), marker_grace=1.5)
    seen.wait(lambda s: len(s.final) == len(names))
    got = {tid.removeprefix("p-"): (o.state, o.reason, o.exit_code) for tid, o in seen.final.items()}
    assert got == {
        "ok": (State.COMPLETED, None, 0),
        "exit3": (State.FAILED, Reason.EXIT_CODE, 3),
        "walltime": (State.FAILED, Reason.TIMEOUT, 143),
        "queued": (State.CANCELLED, None, None),
        "held": (State.CANCELLED, None, None),
        "deleted-while-queued": (State.CANCELLED, None, None),
        "qdel-running2": (State.CANCELLED, None, 143),
    }
    assert "Can Never Run" in (seen.final["p-queued"].message or "")
    assert "pbsuser@pbs-vm" in (seen.final["p-qdel-running2"].message or "")
    assert ex.unfiltered is True and ex.history is True
    calls = replay.calls()
    assert [c["argv"] for c in calls[:2]] == [[*IDS, *ids], IDS]
    assert all(c["argv"] == IDS for c in calls[1:]) and all(c["rc"] == 0 for c in calls)
    assert len(calls) == tracker.poll_count + 1  # the fallback once inside the first cycle, then one each
    assert tracker.poll_count >= 2  # the never-started jobs waited marker_grace over more than one cycle


def test_outside_qdel_of_a_running_job_is_cancelled_with_who(tmp_path, run_tracker):
    job_id = "9.pbs-vm"
    replay = Replay(tmp_path, {
        "qsub": [{"out": "qsub-qdel-running2.txt"}],
        "qstat": [{"argv": [*IDS, job_id], "out": "qstat-json-qdel-running2-before.json", "until": "qdel"},
                  {"argv": [*IDS, job_id], "out": "qstat-json-qdel-running2-after.json"}],
    })
    ex = executor(tmp_path, replay)
    job = submit(ex, tmp_path, "qdelrun", "rec-qdelrun")
    tracker, seen = run_tracker(ex, [job])
    seen.wait(lambda s: s.running == ["qdelrun"])
    marker(job, 143, "TERM")  # the wrapper got PBS's SIGTERM, then PBS says why
    replay.flag("qdel")
    seen.wait(lambda s: "qdelrun" in s.final)
    outcome = seen.final["qdelrun"]
    assert (outcome.state, outcome.reason, outcome.exit_code) == (State.CANCELLED, None, 143)
    assert outcome.message is not None and outcome.message.startswith("deleted in PBS by pbsuser@pbs-vm")
    assert replay.calls("qdel") == []  # fem-hpc did not cancel it


def test_outside_qdel_of_a_held_job_is_cancelled(tmp_path, run_tracker):
    """No marker (it never ran): PBS's F/91 alone decides, after the marker grace."""
    replay = Replay(tmp_path, {"qsub": [{"out": "qsub-held.txt"}],
                               "qstat": [{"out": "qstat-json-held.json", "until": "qdel"},
                                         {"out": "qstat-json-deleted-held.json"}]})
    ex = executor(tmp_path, replay)
    job = submit(ex, tmp_path, "held", "rec-held")
    tracker, seen = run_tracker(ex, [job])
    seen.wait(lambda s: s.pending)
    assert seen.pending == [("held", "held")]
    replay.flag("qdel")
    seen.wait(lambda s: "held" in s.final)
    outcome = seen.final["held"]
    assert (outcome.state, outcome.reason, outcome.exit_code) == (State.CANCELLED, None, None)
    assert outcome.message is not None and "PBS does not say by whom" in outcome.message


def test_outside_qdel_of_a_queued_job_is_cancelled(tmp_path, run_tracker):
    replay = Replay(tmp_path, {"qsub": [{"out": "qsub-deleted-while-queued.txt"}],
                               "qstat": [{"out": "qstat-json-deleted-while-queued.json"}]})
    ex = executor(tmp_path, replay)
    job = submit(ex, tmp_path, "queued", "rec-delrun")
    tracker, seen = run_tracker(ex, [job])
    seen.wait(lambda s: "queued" in s.final)
    outcome = seen.final["queued"]
    assert (outcome.state, outcome.reason, outcome.exit_code) == (State.CANCELLED, None, None)
    assert outcome.message is not None
    assert "Not Running: Not enough free nodes available and terminated" in outcome.message


@pytest.mark.parametrize("with_marker", [True, False])
def test_walltime_kill_is_timeout(tmp_path, run_tracker, with_marker):
    job_id = "5.pbs-vm"
    replay = Replay(tmp_path, {
        "qsub": [{"out": "qsub-walltime.txt"}],
        "qstat": [{"argv": [*IDS, job_id], "out": "qstat-json-walltime.json", "until": "killed"},
                  {"argv": [*IDS, job_id], "out": "qstat-json-walltime-final.json"}],
    })
    ex = executor(tmp_path, replay)
    job = submit(ex, tmp_path, "wall", "rec-wall", walltime="00:00:02")
    tracker, seen = run_tracker(ex, [job])
    seen.wait(lambda s: s.running == ["wall"])
    if with_marker:
        marker(job, 143, "TERM", seconds=21)
    replay.flag("killed")
    seen.wait(lambda s: "wall" in s.final)
    outcome = seen.final["wall"]
    assert (outcome.state, outcome.reason) == (State.FAILED, Reason.TIMEOUT)
    assert outcome.exit_code == (143 if with_marker else None)
    assert outcome.message is not None and "JOB_EXEC_KILL_WALLTIME" in outcome.message


def test_unknown_id_rc_153_keeps_the_known_job(tmp_path, run_tracker):
    """qstat exits 153 for an id the server forgot and still prints the other: not a failed poll,
    and no fallback (qstat said why the second job is missing)."""
    replay = Replay(tmp_path, {"qsub": [{"out": "qsub-ok.txt"}, {"out": "qsub-ok.txt"}],
                               "qstat": [{"out": "qstat-json-with-unknown.json"}]})
    ex = executor(tmp_path, replay)
    known = submit(ex, tmp_path, "known", "rec-ok")
    gone = submit(ex, tmp_path, "gone", "rec-gone")
    gone.native_id = "9999.pbs-vm"
    statuses = ex.poll([known, gone])
    assert set(statuses) == {"3.pbs-vm"} and statuses["3.pbs-vm"].state is State.COMPLETED
    assert ex.unfiltered is False
    assert [c["rc"] for c in replay.calls()] == [153]


def test_checks_report_the_history_setting(tmp_path):
    for recording, status in [("historyoff-qstat-Bf-history.txt", "warning"), ("historyon-qstat-Bf-history.txt", "ok")]:
        root = tmp_path / status
        root.mkdir()
        replay = Replay(root, {"qstat": [{"argv": ["-q"], "out": "qstat-q.txt"},
                                         {"argv": ["-B", "-f"], "out": recording}]})
        checks = {c.name: c for c in executor(root, replay).checks()}
        assert checks["pbs server"].status == "ok"
        history = checks["pbs job history"]
        assert history.status == status
        if status == "warning":
            assert "job_history_enable is False" in history.detail
            assert history.fix is not None and "qmgr -c 'set server job_history_enable=True'" in history.fix


def test_gpu_resource_reaches_the_job_script(tmp_path):
    replay = Replay(tmp_path, {"qstat": [{"out": None}]})
    ex = executor(tmp_path, replay, gpu_resource="ngpus={gpus}:gpu_model=a100")
    task = Task.model_validate({"id": "g1", "command": ["true"], "resources": {"gpus": 2}})
    lines = ex.directives(Job(task=task, workdir=tmp_path / "work" / "g1"))
    assert "#PBS -l select=1:ncpus=1:ngpus=2:gpu_model=a100" in lines


NO_X = ["-f", "-F", "json"]  # qstat's options before the ids, without history


def stamp(job: Job, started: str) -> None:
    """What the wrapper writes to .fem/started when the command starts (a rerun writes it again)."""
    (job.fem_dir / "started").write_text(started + "\n")


def test_history_off_outside_qdel_is_cancelled_and_a_walltime_kill_is_timeout(tmp_path, run_tracker):
    """job_history_enable = False: PBS forgets every job the moment it ends (DERIVED sequence, see
    tests/fixtures/openpbs-23.06-derived/README.txt). A running job qdel'd long before its walltime
    and a queued one are CANCELLED, a job SIGTERM'd at its walltime is TIMEOUT; none is LOST."""
    ids = ["88.pbs-vm", "89.pbs-vm", "90.pbs-vm"]
    replay = Replay(tmp_path, {
        "qsub": [{"out": "historyoff-jobid.txt"}, {"out": "derived/historyoff-qsub-89.txt"},
                 {"out": "derived/historyoff-qsub-90.txt"}],
        "qstat": [{"argv": [*IDS, *ids], "out": "historyoff-qstat-json-x-running.json"},
                  {"argv": [*NO_X, *ids], "out": "derived/historyoff-qstat-json-no-x-three.json", "until": "qdel"},
                  # any ids: once two jobs are settled by their markers, only the queued one is asked for
                  {"out": "derived/historyoff-qstat-json-no-x-gone.json"}],
    })
    ex = executor(tmp_path, replay)
    running = submit(ex, tmp_path, "hrun", "rec-histoff", walltime="01:00:00")
    queued = submit(ex, tmp_path, "hq", "rec-histoff-q", walltime="01:00:00")
    wall = submit(ex, tmp_path, "hwall", "rec-histoff-wall", walltime="00:00:02")
    assert [j.native_id for j in (running, queued, wall)] == ids
    stamp(running, "2026-12-01T18:20:00Z")
    stamp(wall, "2026-12-01T18:20:00Z")
    tracker, seen = run_tracker(ex, [running, queued, wall])
    seen.wait(lambda s: sorted(s.running) == ["hrun", "hwall"] and s.pending)
    assert seen.pending == [("hq", "Not Running: Not enough free nodes available")]
    assert ex.history is False and ex.no_record_note() is not None
    replay.flag("qdel")  # qdel of 88 and 89, 90 killed at its walltime: all three gone from qstat at once
    marker(running, 143, "TERM", seconds=1)  # their wrappers got PBS's SIGTERM
    marker(wall, 143, "TERM", seconds=21)
    seen.wait(lambda s: len(s.final) == 3)
    got = {tid: (o.state, o.reason, o.exit_code) for tid, o in seen.final.items()}
    assert got == {"hrun": (State.CANCELLED, None, 143), "hq": (State.CANCELLED, None, None),
                   "hwall": (State.FAILED, Reason.TIMEOUT, 143)}
    run_msg, queued_msg = seen.final["hrun"].message or "", seen.final["hq"].message or ""
    assert run_msg.startswith("terminated by SIGTERM before its walltime (ran 00:00:01 of its walltime 01:00:00)")
    assert queued_msg.startswith("left the queue before it started (deleted outside fem-hpc; PBS keeps no job history")
    assert all("job_history_enable=False, so who deleted it is not known" in m for m in (run_msg, queued_msg))
    assert "00:00:21 of its walltime 00:00:02" in (seen.final["hwall"].message or "")
    calls = replay.calls()
    assert [c["rc"] for c in calls[:2]] == [0, 0] and {c["rc"] for c in calls[2:]} <= {0, 153}  # 99: unexpected
    assert calls[-1]["rc"] == 153 and calls[-1]["argv"] == [*NO_X, "89.pbs-vm"]
    assert len(calls) == tracker.poll_count + 1
    assert replay.calls("qdel") == []


@pytest.mark.parametrize("queued_seen", [True, False], ids=["back in Q", "straight to R again"])
def test_a_rerun_job_stays_tracked_and_its_first_runs_marker_does_not_end_it(tmp_path, run_tracker, queued_seen):
    """PBS reruns job 3 (Exit_status -11, DERIVED statuses) after its first run was SIGTERM'd and
    left a marker: the job stays tracked past the signal wait, is reported requeued, and ends by the
    rerun's own marker."""
    job_id = "3.pbs-vm"
    steps: list[dict[str, Any]] = [{"argv": [*IDS, job_id], "out": "qstat-json-running.json", "until": "rerun"}]
    if queued_seen:
        steps.append({"argv": [*IDS, job_id], "out": "derived/rerun-qstat-json-queued.json", "until": "restarted"})
    steps += [{"argv": [*IDS, job_id], "out": "derived/rerun-qstat-json-running.json", "until": "done"},
              {"argv": [*IDS, job_id], "out": "qstat-json-finished.json"}]
    replay = Replay(tmp_path, {"qsub": [{"out": "qsub-ok.txt"}], "qstat": steps})
    ex = executor(tmp_path, replay)
    job = submit(ex, tmp_path, "rerun", "rec-ok")
    stamp(job, "2026-12-01T18:20:00Z")
    tracker, seen = run_tracker(ex, [job], signal_wait=0.5)
    seen.wait(lambda s: s.running == ["rerun"])
    if not queued_seen:
        stamp(job, "2026-12-01T18:21:30Z")  # the rerun has started before fem-hpc looks again
    replay.flag("rerun")
    marker(job, 143, "TERM", seconds=50)  # the first run's wrapper, SIGTERM'd for the rerun
    if queued_seen:
        seen.wait(lambda s: any("requeued by PBS after Exit_status -11" in (m or "") for _, m in s.pending))
    else:
        seen.wait(lambda s: s.running == ["rerun", "rerun"])
    polls = tracker.poll_count
    time.sleep(1.5)  # three signal waits: the first run's marker would have ended the job by now
    assert seen.final == {} and len(tracker) == 1 and tracker.poll_count > polls
    if queued_seen:
        stamp(job, "2026-12-01T18:21:30Z")
        replay.flag("restarted")
        seen.wait(lambda s: s.running == ["rerun", "rerun"])
    job.marker_path.write_text(json.dumps({"exit_code": 0, "signal": "", "started": "2026-12-01T18:21:30Z",
                                           "finished": "2026-12-01T18:22:00Z"}))
    replay.flag("done")
    seen.wait(lambda s: "rerun" in s.final)
    outcome = seen.final["rerun"]
    assert (outcome.state, outcome.reason, outcome.exit_code) == (State.COMPLETED, None, 0)
    assert outcome.started == "2026-12-01T18:21:30Z"  # the rerun's, not the first run's
    assert all(c["rc"] == 0 for c in replay.calls())
