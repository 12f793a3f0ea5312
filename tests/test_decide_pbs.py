"""decide() on what a real OpenPBS 23.06 reports (tests/fixtures/openpbs-23.06/), with and without
the wrapper's exit-code marker: a walltime kill is TIMEOUT, an outside qdel is CANCELLED with who
did it, and a scheduler's NODE_FAIL guess never overrules a marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from fem_hpc.executors import pbs_parse as pp
from fem_hpc.executors.base import Job, NativeStatus
from fem_hpc.layout import Marker
from fem_hpc.lifecycle.outcome import decide
from fem_hpc.model import Reason, State, Task

REC = Path(__file__).parent / "fixtures" / "openpbs-23.06"


def status(name: str, job_id: str) -> NativeStatus:
    return pp.parse_qstat_json((REC / name).read_text())[job_id]


def job(walltime: str | None = None) -> Job:
    resources = {"walltime": walltime} if walltime else {}
    return Job(task=Task.model_validate({"id": "t1", "command": ["sleep", "30"], "resources": resources}),
               workdir=Path("/nonexistent/t1"))


# The wrapper's marker for a command stopped by SIGTERM after 21 s (job 5 ran 00:00:21 under a 2 s walltime).
TERM_21S = Marker(exit_code=143, signal="TERM", started="2026-12-01T18:20:39Z", finished="2026-12-01T18:21:00Z")
TERM_1S = Marker(exit_code=143, signal="TERM", started="2026-12-01T18:21:59Z", finished="2026-12-01T18:22:00Z")

WALLTIME = ("qstat-json-walltime-final.json", "5.pbs-vm")
QDEL_RUNNING = ("qstat-json-qdel-running2-after.json", "9.pbs-vm")
QDEL_QUEUED = ("qstat-json-deleted-while-queued.json", "8.pbs-vm")
QDEL_HELD = ("qstat-json-deleted-held.json", "7.pbs-vm")
EXIT3 = ("qstat-json-exit3-final.json", "4.pbs-vm")
FINISHED = ("qstat-json-finished.json", "3.pbs-vm")

# (recording, marker, cancel requested, job walltime) -> (state, reason, exit code, words in the message)
TABLE = [
    pytest.param(WALLTIME, None, False, "00:00:02", (State.FAILED, Reason.TIMEOUT, None, "JOB_EXEC_KILL_WALLTIME"),
                 id="walltime -29, no marker"),
    pytest.param(WALLTIME, TERM_21S, False, "00:00:02", (State.FAILED, Reason.TIMEOUT, 143, "JOB_EXEC_KILL_WALLTIME"),
                 id="walltime -29 with the TERM marker"),
    pytest.param(WALLTIME, TERM_1S, False, None, (State.FAILED, Reason.TIMEOUT, 143, "exceeded its walltime"),
                 id="walltime -29, marker alone would say EXIT_CODE"),
    pytest.param(QDEL_RUNNING, TERM_1S, False, None, (State.CANCELLED, None, 143, "deleted in PBS by pbsuser@pbs-vm"),
                 id="outside qdel while running"),
    pytest.param(QDEL_RUNNING, TERM_1S, True, None, (State.CANCELLED, None, 143, "cancelled"),
                 id="qdel by fem-hpc itself"),
    pytest.param(QDEL_QUEUED, None, False, None,
                 (State.CANCELLED, None, None, "Not Running: Not enough free nodes available and terminated"),
                 id="outside qdel while queued"),
    pytest.param(QDEL_HELD, None, False, None, (State.CANCELLED, None, None, "PBS does not say by whom"),
                 id="outside qdel while held"),
    pytest.param(EXIT3, Marker(exit_code=3), False, None, (State.FAILED, Reason.EXIT_CODE, 3, "exited with code 3"),
                 id="exit 3"),
    pytest.param(FINISHED, Marker(exit_code=0), False, None, (State.COMPLETED, None, 0, None), id="exit 0"),
    pytest.param(FINISHED, None, False, None, (State.FAILED, Reason.LOST, 0, "no exit-code marker"),
                 id="finished, no marker"),
]


@pytest.mark.parametrize(("recording", "marker", "cancel", "walltime", "expected"), TABLE)
def test_decide_on_recorded_openpbs(recording: tuple[str, str], marker: Marker | None, cancel: bool,
                                    walltime: str | None, expected: tuple) -> None:
    outcome = decide(marker, status(*recording), cancel, job(walltime))
    state, reason, exit_code, words = expected
    assert (outcome.state, outcome.reason, outcome.exit_code) == (state, reason, exit_code)
    if words is None:
        assert outcome.message is None
    else:
        assert outcome.message is not None and words in outcome.message, outcome.message


def node_fail(code: int) -> NativeStatus:
    doc = f'{{"Jobs": {{"12.pbs-vm": {{"job_state": "F", "substate": 93, "Exit_status": {code}}}}}}}'
    st = pp.parse_qstat_json(doc)["12.pbs-vm"]
    assert st.reason is Reason.NODE_FAIL
    return st


@pytest.mark.parametrize("code", [-1, -2, -3, -11, -99])
def test_node_fail_never_overrules_a_marker(code: int) -> None:
    """The bug of issue 14: a NODE_FAIL beat the marker's TIMEOUT. A marker proves the command ran
    and says how it ended; the scheduler's "could not run it" is the weaker word."""
    wall = decide(TERM_21S, node_fail(code), False, job("00:00:02"))
    assert (wall.state, wall.reason, wall.exit_code) == (State.FAILED, Reason.TIMEOUT, 143)
    ok = decide(Marker(exit_code=0), node_fail(code), False, job())
    assert (ok.state, ok.reason, ok.exit_code) == (State.COMPLETED, None, 0)
    failed = decide(Marker(exit_code=2), node_fail(code), False, job())
    assert (failed.state, failed.reason, failed.exit_code) == (State.FAILED, Reason.EXIT_CODE, 2)
    alone = decide(None, node_fail(code), False, job())
    assert (alone.state, alone.reason) == (State.FAILED, Reason.NODE_FAIL)
    assert alone.message is not None and f"Exit_status {code}" in alone.message


@pytest.mark.parametrize(("code", "reason"), [(-27, Reason.OUT_OF_MEMORY), (-26, Reason.OUT_OF_MEMORY),
                                             (-28, Reason.TIMEOUT), (-29, Reason.TIMEOUT)])
def test_a_resource_kill_says_why_a_signal_came(code: int, reason: Reason) -> None:
    """A marker of a killed command knows only the signal; PBS knows the limit that sent it."""
    doc = f'{{"Jobs": {{"12.pbs-vm": {{"job_state": "F", "substate": 93, "Exit_status": {code}}}}}}}'
    st = pp.parse_qstat_json(doc)["12.pbs-vm"]
    outcome = decide(Marker(exit_code=137, signal="KILL"), st, False, job())
    assert (outcome.state, outcome.reason, outcome.exit_code) == (State.FAILED, reason, 137)


def test_outside_cancel_without_a_message_still_says_cancelled() -> None:
    st = NativeStatus(native_id="17", state=State.CANCELLED)
    assert decide(None, st, False).message == "cancelled"
