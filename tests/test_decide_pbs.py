"""decide() on what a real OpenPBS 23.06 reports (tests/fixtures/openpbs-23.06/), with and without
the wrapper's exit-code marker: a walltime kill is TIMEOUT, an outside qdel is CANCELLED with who
did it, and a scheduler's NODE_FAIL guess never overrules a marker."""

from __future__ import annotations

from pathlib import Path

import pytest

from fem_hpc.executors import pbs_cmds as cmds
from fem_hpc.executors import pbs_parse as pp
from fem_hpc.executors.base import Job, NativeStatus
from fem_hpc.layout import Marker
from fem_hpc.lifecycle.outcome import decide, requeued_after, vanished
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


# --- job history off (job_history_enable = False, the OpenPBS default) ------------------------------
# PBS forgets a job the moment it ends: no F, no substate 91, no Exit_status. decide() and vanished()
# judge by the marker and the job's last live status, and say that PBS's word is missing.

DERIVED = REC.with_name("openpbs-23.06-derived")
NO_RECORD = cmds.NO_HISTORY_NOTE


def derived(name: str, job_id: str) -> NativeStatus:
    return pp.parse_qstat_json((DERIVED / name).read_text())[job_id]


def term(seconds: int) -> Marker:
    """The wrapper's marker of a command SIGTERM'd after `seconds` s."""
    return Marker(exit_code=143, signal="TERM", started="2026-12-01T18:00:00Z",
                  finished=f"2026-12-01T{18 + seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}Z")


THREE = "historyoff-qstat-json-no-x-three.json"


def test_a_live_job_carries_the_walltime_pbs_enforces() -> None:
    assert derived(THREE, "88.pbs-vm").walltime_limit == 3600
    assert derived(THREE, "89.pbs-vm").walltime_limit == 3600
    assert derived(THREE, "90.pbs-vm").walltime_limit == 2
    recorded = pp.parse_qstat_json((REC / "historyoff-qstat-json-no-x-running.json").read_text())["88.pbs-vm"]
    assert recorded.walltime_limit is None and recorded.requeued is False  # no -l walltime, no queue default


@pytest.mark.parametrize("recording", [("qstat-json-exit3.json", "4.pbs-vm"), ("qstat-json-held.json", "7.pbs-vm"),
                                       ("qstat-json-queued.json", "6.pbs-vm")], ids=["queued", "held", "can-never-run"])
def test_a_job_gone_before_it_started_is_cancelled(recording: tuple[str, str]) -> None:
    last = status(*recording)
    outcome = vanished(last, False, NO_RECORD)
    assert outcome is not None
    assert (outcome.state, outcome.reason, outcome.exit_code) == (State.CANCELLED, None, None)
    assert outcome.message == ("left the queue before it started (deleted outside fem-hpc; PBS keeps no job history "
                               "here: job_history_enable=False, so who deleted it is not known; to keep PBS's record "
                               "of finished jobs: qmgr -c 'set server job_history_enable=True')")


def test_a_gone_job_that_ran_or_was_never_seen_is_not_judged() -> None:
    queued = status("qstat-json-exit3.json", "4.pbs-vm")
    assert vanished(queued, True, NO_RECORD) is None  # it started (running seen, or its `started` stamp)
    assert vanished(status("qstat-json-running.json", "3.pbs-vm"), False, NO_RECORD) is None  # last seen running
    assert vanished(None, False, NO_RECORD) is None  # never seen at all


# (marker, task walltime, last live status) -> (state, reason, words in the message)
NO_HISTORY = [
    pytest.param(term(1), "01:00:00", None, (State.CANCELLED, None, "terminated by SIGTERM before its walltime "
                 "(ran 00:00:01 of its walltime 01:00:00)"), id="qdel while running, task walltime"),
    pytest.param(term(21), "00:00:02", None, (State.FAILED, Reason.TIMEOUT, "walltime exceeded"),
                 id="walltime kill, task walltime"),
    pytest.param(term(21), None, ("historyoff-qstat-json-no-x-three.json", "90.pbs-vm"),
                 (State.FAILED, Reason.TIMEOUT, "of its walltime 00:00:02"), id="walltime kill, PBS's walltime"),
    pytest.param(term(1), None, ("historyoff-qstat-json-no-x-three.json", "88.pbs-vm"),
                 (State.CANCELLED, None, "of its walltime 01:00:00"), id="qdel, PBS's walltime"),
    pytest.param(term(5), None, ("historyoff-qstat-json-no-x-running.json", "88.pbs-vm"),
                 (State.CANCELLED, None, "terminated by SIGTERM with no walltime set"), id="qdel, no walltime at all"),
    pytest.param(term(57), "00:01:00", None, (State.FAILED, Reason.TIMEOUT, "walltime exceeded"),
                 id="within the margin below the walltime"),
    pytest.param(term(50), "00:01:00", None, (State.CANCELLED, None, "ran 00:00:50 of its walltime 00:01:00"),
                 id="below the margin"),
    pytest.param(Marker(exit_code=143, signal="TERM"), "01:00:00", None,
                 (State.FAILED, Reason.EXIT_CODE, "after SIGTERM was sent to it"), id="marker without times"),
    pytest.param(Marker(exit_code=137, signal="KILL", started="2026-12-01T18:00:00Z", finished="2026-12-01T18:00:01Z"),
                 "01:00:00", None, (State.FAILED, Reason.EXIT_CODE, "after SIGKILL"), id="SIGKILL is not a qdel's"),
    pytest.param(Marker(exit_code=3), "01:00:00", None, (State.FAILED, Reason.EXIT_CODE, "exited with code 3"),
                 id="own exit"),
]


@pytest.mark.parametrize(("marker", "walltime", "last", "expected"), NO_HISTORY)
def test_decide_without_job_history(marker: Marker, walltime: str | None, last: tuple[str, str] | None,
                                    expected: tuple) -> None:
    last_seen = None if last is None else (derived(*last) if (DERIVED / last[0]).exists() else status(*last))
    outcome = decide(marker, None, False, job(walltime), no_record=NO_RECORD, last_seen=last_seen)
    state, reason, words = expected
    assert (outcome.state, outcome.reason, outcome.exit_code) == (state, reason, marker.exit_code)
    assert outcome.message is not None and words in outcome.message, outcome.message
    if state is State.CANCELLED:
        assert "deleted outside fem-hpc" in outcome.message and "job_history_enable=False" in outcome.message


def test_with_a_record_kept_a_gone_sigtermed_job_is_decided_as_before() -> None:
    """The same marker where the scheduler keeps records (Slurm, PBS with history): no guess."""
    outcome = decide(term(1), None, False, job("01:00:00"))
    assert (outcome.state, outcome.reason, outcome.exit_code) == (State.FAILED, Reason.EXIT_CODE, 143)
    # and a job PBS still lists is never judged by the no-history rule
    running = derived(THREE, "88.pbs-vm")
    outcome = decide(term(1), running, False, job("01:00:00"), no_record=NO_RECORD, last_seen=running)
    assert (outcome.state, outcome.reason) == (State.FAILED, Reason.EXIT_CODE)


# --- requeue: PBS reruns a job (Exit_status -11 / -3) after a run whose marker exists ------------------

RERUN_Q = ("rerun-qstat-json-queued.json", "3.pbs-vm")
RERUN_R = ("rerun-qstat-json-running.json", "3.pbs-vm")
FIRST_RUN = Marker(exit_code=143, signal="TERM", started="2026-12-01T18:20:24Z", finished="2026-12-01T18:21:10Z")


def test_rerun_statuses_say_requeued() -> None:
    for rec in (RERUN_Q, RERUN_R):
        st = derived(*rec)
        assert st.requeued is True and not st.state.final
        assert st.message is not None and "requeued by PBS after Exit_status -11 (JOB_EXEC_RERUN)" in st.message


@pytest.mark.parametrize("code", [-11, -3])
def test_queued_again_after_the_marker_is_requeued(code: int) -> None:
    doc = f'{{"Jobs": {{"3.pbs-vm": {{"job_state": "Q", "substate": 10, "Exit_status": {code}}}}}}}'
    st = pp.parse_qstat_json(doc)["3.pbs-vm"]
    note = requeued_after(FIRST_RUN, st, None)
    assert note is not None and f"requeued by PBS after Exit_status {code}" in note


def test_requeued_after_on_recorded_and_derived_statuses() -> None:
    assert requeued_after(FIRST_RUN, derived(*RERUN_Q), "2026-12-01T18:20:24Z") is not None
    # running again: the rerun's `started` stamp is newer than the marker's start
    assert requeued_after(FIRST_RUN, derived(*RERUN_R), "2026-12-01T18:21:31Z") is not None
    assert requeued_after(FIRST_RUN, derived(*RERUN_R), None) is not None  # no stamp: PBS's word wins
    # the marker is this run's own (same start): it just ended and PBS still lists it
    assert requeued_after(FIRST_RUN, derived(*RERUN_R), FIRST_RUN.started) is None
    # the rerun's own exit, seen before PBS lists it finished: never stale, stamp or not
    own_exit = Marker(exit_code=0, started="2026-12-01T18:21:31Z", finished="2026-12-01T18:22:00Z")
    assert requeued_after(own_exit, derived(*RERUN_R), None) is None
    assert requeued_after(own_exit, derived(*RERUN_R), "2026-12-01T18:21:31Z") is None
    # no requeue word: a running job whose marker appeared has simply ended
    assert requeued_after(FIRST_RUN, status("qstat-json-running.json", "3.pbs-vm"), None) is None
    assert requeued_after(FIRST_RUN, status(*FINISHED), None) is None
    assert requeued_after(FIRST_RUN, None, None) is None


def test_a_slurm_requeue_is_seen_by_the_same_rule() -> None:
    """Slurm's `scontrol requeue` puts a job back to PENDING: no requeue word, but queued after its end."""
    pending = NativeStatus(native_id="17", state=State.SUBMITTED, message="BeginTime")
    note = requeued_after(FIRST_RUN, pending, None)
    assert note is not None and note.startswith("requeued: the scheduler lists the job queued again")
    assert requeued_after(FIRST_RUN, NativeStatus(native_id="17", state=State.RUNNING), None) is None
