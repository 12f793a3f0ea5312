"""executors.timers: the walltime check against an injected clock, and SIGTERM -> SIGKILL after
the grace period on real short-lived processes (the local and docker executors share it)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fem_hpc.executors.base import Job, NativeStatus
from fem_hpc.executors.timers import Stopper, over_walltime
from fem_hpc.model import Reason, State, Task


def job(native_id: str | None = "42", walltime: str | None = "00:01:00", submitted_at: float = 1000.0) -> Job:
    resources = {"walltime": walltime} if walltime else {}
    task = Task.model_validate({"id": "w1", "command": ["true"], "resources": resources})
    return Job(task=task, workdir=Path("/nonexistent"), native_id=native_id, submitted_at=submitted_at)


def cancelled(native_id: str) -> NativeStatus:
    return NativeStatus(native_id=native_id, state=State.CANCELLED, message="cancelled")


# -- walltime, with a fake clock ---------------------------------------------------------------------
@pytest.mark.parametrize(("now", "over"), [(1000.0, False), (1060.0, False), (1060.5, True), (5000.0, True)])
def test_over_walltime_at_the_limit(now: float, over: bool):
    verdict = over_walltime(job(), now)
    if not over:
        assert verdict is None
        return
    assert verdict == NativeStatus(native_id="42", state=State.FAILED, reason=Reason.TIMEOUT,
                                   message="walltime 00:01:00 exceeded", job_name=job().job_name)


def test_no_walltime_or_no_native_id_is_never_over():
    assert over_walltime(job(walltime=None), 1e12) is None
    assert over_walltime(job(native_id=None), 1e12) is None


def test_walltime_verdict_once_per_stop():
    now = [1000.0]
    stopper = Stopper(0.0, clock=lambda: now[0])
    j = job()
    assert stopper.walltime_verdict(j) is None
    now[0] = 1061.0
    verdict = stopper.walltime_verdict(j)
    assert verdict is not None and verdict.reason == Reason.TIMEOUT
    stopper.stop("42", verdict, terminate=lambda: False, kill=lambda: None)
    assert stopper.verdict("42") == verdict
    assert stopper.walltime_verdict(j) is None  # being stopped: not stopped again at every poll
    stopper.forget("42")
    assert stopper.verdict("42") is None


# -- the kill timer, on real processes --------------------------------------------------------------
def spawn(script: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    time.sleep(0.2)  # let the shell set its trap
    return proc


def signals_for(proc: subprocess.Popen[bytes], sent: list[str]):
    def terminate() -> bool:
        sent.append("TERM")
        os.killpg(proc.pid, signal.SIGTERM)
        return True

    def kill() -> None:
        if proc.poll() is None:
            sent.append("KILL")
            os.killpg(proc.pid, signal.SIGKILL)

    return terminate, kill


def test_sigkill_after_the_grace_for_a_process_ignoring_sigterm():
    proc = spawn('trap "" TERM; sleep 30 & wait; sleep 30')
    sent: list[str] = []
    stopper = Stopper(0.5)
    started = time.monotonic()
    stopper.stop(str(proc.pid), cancelled(str(proc.pid)), *signals_for(proc, sent))
    time.sleep(0.2)
    assert proc.poll() is None and sent == ["TERM"]  # SIGTERM ignored, the grace still runs
    assert stopper.pending() == [str(proc.pid)]
    assert proc.wait(5) == -signal.SIGKILL
    assert 0.5 <= time.monotonic() - started < 3
    stopper.close()
    assert sent == ["TERM", "KILL"] and stopper.pending() == []
    assert stopper.verdict(str(proc.pid)) == cancelled(str(proc.pid))


def test_a_process_obeying_sigterm_gets_no_sigkill():
    proc = spawn("sleep 30")
    sent: list[str] = []
    stopper = Stopper(0.3)
    stopper.stop(str(proc.pid), cancelled(str(proc.pid)), *signals_for(proc, sent))
    assert proc.wait(5) == -signal.SIGTERM
    stopper.close()  # waits for the timer, whose kill finds nothing left
    assert sent == ["TERM"]


def test_nothing_to_terminate_starts_no_timer():
    stopper = Stopper(30.0)
    stopper.stop("7", cancelled("7"), terminate=lambda: False, kill=lambda: pytest.fail("no kill expected"))
    assert stopper.pending() == [] and stopper.verdict("7") == cancelled("7")
    stopper.close()  # returns at once


def test_a_second_stop_keeps_the_first_deadline_and_forget_can_drop_the_kill():
    kills: list[str] = []
    stopper = Stopper(0.3)
    stopper.stop("1", cancelled("1"), terminate=lambda: True, kill=lambda: kills.append("first"))
    timeout = NativeStatus(native_id="1", state=State.FAILED, reason=Reason.TIMEOUT)
    stopper.stop("1", timeout, terminate=lambda: True, kill=lambda: kills.append("second"))
    assert stopper.verdict("1") == timeout and stopper.pending() == ["1"]
    stopper.stop("2", cancelled("2"), terminate=lambda: True, kill=lambda: kills.append("dropped"))
    stopper.forget("2", cancel_kill=True)  # e.g. a container already force-removed
    stopper.close()
    assert kills == ["first"]


def test_a_failing_kill_is_contained():
    def kill() -> None:
        raise ProcessLookupError("gone")

    stopper = Stopper(0.05)
    stopper.stop("9", cancelled("9"), terminate=lambda: True, kill=kill)
    stopper.close()
    assert stopper.pending() == []


def test_a_failing_terminate_reaches_the_caller_with_the_verdict_recorded():
    def terminate() -> bool:
        raise RuntimeError("daemon away")

    stopper = Stopper(0.05)
    with pytest.raises(RuntimeError, match="daemon away"):
        stopper.stop("5", cancelled("5"), terminate=terminate, kill=lambda: None)
    assert stopper.verdict("5") == cancelled("5") and stopper.pending() == []
