"""Every output recorded from a real OpenPBS 23.06 (tests/fixtures/openpbs-23.06/, see the README
there) parsed to the state, reason and message fem-hpc reports; the JOB_EXEC_* table; the history
setting; GPU resources and qsub's unknown-resource refusal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from fem_hpc.executors import pbs_cmds as pc
from fem_hpc.executors import pbs_parse as pp
from fem_hpc.executors.pbs import PBSSettings
from fem_hpc.model import Reason, State, Task

REC = Path(__file__).parent / "fixtures" / "openpbs-23.06"
WORKDIR = "/var/lib/fem-hpc/work/alice/run1/t1"


def rec(name: str) -> str:
    return (REC / name).read_text()


def rc(name: str) -> int:
    path = REC / f"{name}.rc"
    return int(path.read_text()) if path.exists() else 0


def stderr(name: str) -> str:
    path = REC / f"{name}.stderr"
    return path.read_text() if path.exists() else ""


# --- one job per recording: (file, job id, state, reason, exit code, words in the message) -------------

SINGLE = [
    ("qstat-json-running.json", "3.pbs-vm", State.RUNNING, None, None, None),
    ("qstat-json-finished.json", "3.pbs-vm", State.COMPLETED, None, 0, None),
    ("qstat-json-exit3.json", "4.pbs-vm", State.SUBMITTED, None, None, "Not Running: Not enough free nodes"),
    ("qstat-json-exit3-final.json", "4.pbs-vm", State.FAILED, Reason.EXIT_CODE, 3, "and failed"),
    ("qstat-json-walltime.json", "5.pbs-vm", State.RUNNING, None, None, None),
    ("qstat-json-walltime-final.json", "5.pbs-vm", State.FAILED, Reason.TIMEOUT, None,
     "Exit_status -29 (JOB_EXEC_KILL_WALLTIME)"),
    ("qstat-json-queued.json", "6.pbs-vm", State.SUBMITTED, None, None, "Can Never Run: Insufficient amount"),
    ("qstat-json-held.json", "7.pbs-vm", State.SUBMITTED, None, None, "held"),
    ("qstat-json-deleted-held.json", "7.pbs-vm", State.CANCELLED, None, None, "PBS does not say by whom"),
    ("qstat-json-deleted-while-queued.json", "8.pbs-vm", State.CANCELLED, None, None,
     "Not Running: Not enough free nodes available and terminated"),
    ("qstat-json-qdel-running2-before.json", "9.pbs-vm", State.RUNNING, None, None, None),
    ("qstat-json-qdel-running2-after.json", "9.pbs-vm", State.CANCELLED, None, None,
     "deleted in PBS by pbsuser@pbs-vm, Exit_status 271"),
    ("historyoff-qstat-json-no-x-running.json", "88.pbs-vm", State.RUNNING, None, None, None),
]


@pytest.mark.parametrize(("name", "job_id", "state", "reason", "exit_code", "words"), SINGLE,
                         ids=[s[0] for s in SINGLE])
def test_recorded_job(name: str, job_id: str, state: State, reason: Reason | None, exit_code: int | None,
                      words: str | None) -> None:
    assert rc(name) == 0 and stderr(name) == ""
    jobs = pp.parse_qstat_json(rec(name))
    assert list(jobs) == [job_id]
    job = jobs[job_id]
    assert (job.state, job.reason, job.exit_code) == (state, reason, exit_code)
    assert job.job_name is not None and job.job_name.startswith("rec-")
    if words is None:
        assert state is State.COMPLETED or job.message is None
    else:
        assert job.message is not None and words in job.message, job.message


def test_walltime_kill_is_timeout_never_node_fail() -> None:
    job = pp.parse_qstat_json(rec("qstat-json-walltime-final.json"))["5.pbs-vm"]
    assert job.reason is Reason.TIMEOUT
    assert job.message is not None
    assert "exceeded its walltime" in job.message and "exceeded resource walltime" in job.message


def test_outside_qdel_says_who() -> None:
    """The comment never says "deleted": substate 91 does, and the comment says by whom."""
    running = pp.parse_qstat_json(rec("qstat-json-qdel-running2-after.json"))["9.pbs-vm"]
    assert running.message is not None and running.message.startswith("deleted in PBS by pbsuser@pbs-vm")
    assert "delet" not in json.loads(rec("qstat-json-qdel-running2-after.json"))["Jobs"]["9.pbs-vm"]["comment"]


def test_release_client_prints_all_seven_jobs() -> None:
    jobs = pp.parse_qstat_json(rec("release-23.06.06-qstat-json-mixed.json"))
    summary = {k: (v.state, v.reason, v.exit_code) for k, v in jobs.items()}
    assert summary == {
        "3.pbs-vm": (State.COMPLETED, None, 0),
        "4.pbs-vm": (State.FAILED, Reason.EXIT_CODE, 3),
        "5.pbs-vm": (State.FAILED, Reason.TIMEOUT, None),
        "6.pbs-vm": (State.CANCELLED, None, None),  # deleted while "Can Never Run"
        "7.pbs-vm": (State.CANCELLED, None, None),  # deleted while held
        "8.pbs-vm": (State.CANCELLED, None, None),  # deleted while queued
        "9.pbs-vm": (State.CANCELLED, None, None),  # deleted while running
    }
    assert "Can Never Run" in (jobs["6.pbs-vm"].message or "")


@pytest.mark.parametrize("name", ["qstat-json-mixed.json", "master-qstat-json-mixed-all-ids.json"])
def test_master_client_prints_only_the_first_of_several_ids(name: str) -> None:
    """What the executor must notice: fewer jobs than asked, rc 0, nothing on stderr."""
    assert rc(name) == 0 and stderr(name) == ""
    jobs = pp.parse_qstat_json(rec(name))
    assert list(jobs) == ["3.pbs-vm"]
    assert pc.ids_named_on_stderr(stderr(name)) == set()


def test_unknown_id_rc_153_still_prints_the_known_job() -> None:
    name = "qstat-json-with-unknown.json"
    assert rc(name) == 153
    assert pp.parse_qstat_json(rec(name))["3.pbs-vm"].state is State.COMPLETED
    assert pc.ids_named_on_stderr(stderr(name)) == {"9999.pbs-vm"}
    only = "qstat-json-only-unknown.json"
    assert rc(only) == 153 and pp.parse_qstat_json(rec(only)) == {}
    assert pc.ids_named_on_stderr(stderr(only)) == {"9999.pbs-vm"}


def test_finished_job_without_x() -> None:
    name = "qstat-json-no-x-finished.json"
    assert rc(name) == 35 and pp.parse_qstat_json(rec(name)) == {}
    assert pc.ids_named_on_stderr(stderr(name)) == {"3.pbs-vm"}
    assert not pc.history_disabled(stderr(name))


@pytest.mark.parametrize("name", ["historyoff-qstat-json-x-running.json",
                                  "historyoff-release-qstat-json-x-running.json"])
def test_history_off_prints_no_job_and_says_so(name: str) -> None:
    assert rc(name) == 0
    assert pp.parse_qstat_json(rec(name)) == {}  # the job IS running (historyoff-qstat-json-no-x-running.json)
    assert pc.history_disabled(stderr(name))
    assert pc.ids_named_on_stderr(stderr(name)) == {rec("historyoff-jobid.txt").strip()}


def test_unfiltered_listing_without_x() -> None:
    """`qstat -f -F json` with no ids: every live job the server shows, other users' included."""
    jobs = pp.parse_qstat_json(rec("qstat-json-all.json"))
    assert {k: v.state for k, v in jobs.items()} == {"1.pbs-vm": State.RUNNING, "5.pbs-vm": State.RUNNING,
                                                     "6.pbs-vm": State.SUBMITTED}
    assert set(pc.pick(jobs, ["5.pbs-vm", "6.pbs-vm", "77.pbs-vm"])) == {"5.pbs-vm", "6.pbs-vm"}


QSUBS = ("ok", "exit3", "walltime", "queued", "held", "deleted-while-queued", "qdel-running2")


@pytest.mark.parametrize("name", [f"qsub-{n}.txt" for n in QSUBS])
def test_recorded_qsub(name: str) -> None:
    assert rc(name) == 0
    job_id = pc.parse_qsub(rec(name))
    assert job_id in rec("ids.txt").split()


# --- the text form (`qstat -x -f`) of the same moments says the same -------------------------------------

TEXT_PAIRS = [
    ("qstat-text-running.txt", "qstat-json-running.json"),
    ("qstat-text-finished.txt", "qstat-json-finished.json"),
    ("qstat-text-exit3.txt", "qstat-json-exit3.json"),
    ("qstat-text-exit3-final.txt", "qstat-json-exit3-final.json"),
    ("qstat-text-walltime.txt", "qstat-json-walltime.json"),
    ("qstat-text-walltime-final.txt", "qstat-json-walltime-final.json"),
    ("qstat-text-queued.txt", "qstat-json-queued.json"),
    ("qstat-text-held.txt", "qstat-json-held.json"),
    ("qstat-text-deleted-held.txt", "qstat-json-deleted-held.json"),
    ("qstat-text-deleted-while-queued.txt", "qstat-json-deleted-while-queued.json"),
    ("qstat-text-qdel-running2-after.txt", "qstat-json-qdel-running2-after.json"),
]


@pytest.mark.parametrize(("text_name", "json_name"), TEXT_PAIRS, ids=[t for t, _ in TEXT_PAIRS])
def test_text_and_json_recordings_agree(text_name: str, json_name: str) -> None:
    """The text blocks, read by the same block reader as Torque's, hold the same attributes as
    the JSON (wrapped comments joined back), so both read to the same status."""
    blocks = pp.parse_torque_blocks(rec(text_name))
    from_json = json.loads(rec(json_name))["Jobs"]
    assert set(blocks) == set(from_json)
    for job_id, attrs in blocks.items():
        for key in ("job_state", "substate", "Exit_status", "comment", "Job_Name"):
            assert attrs.get(key) == (None if key not in from_json[job_id] else str(from_json[job_id][key]))
        as_json = json.dumps({"Jobs": {job_id: attrs}})
        assert pp.parse_qstat_json(as_json) == pp.parse_qstat_json(rec(json_name))


# --- the server's history setting --------------------------------------------------------------------------


def test_history_setting() -> None:
    assert pc.parse_history_setting(rec("historyon-qstat-Bf-history.txt")) is True
    assert pc.parse_history_setting(rec("historyoff-qstat-Bf-history.txt")) is False
    assert pc.parse_history_setting(rec("qmgr-print-server.txt")) is True  # `set server job_history_enable = True`
    assert pc.parse_history_setting("Server: pbs-vm\n    scheduling = True\n") is False  # unset: the default, off
    assert pc.qstat_server_argv() == ["qstat", "-B", "-f"]
    assert pc.HISTORY_FIX == "qmgr -c 'set server job_history_enable=True'"


def test_qstat_argv_with_and_without_history() -> None:
    assert pc.qstat_argv("pbspro", ["3.pbs-vm"], history=False) == ["qstat", "-f", "-F", "json", "3.pbs-vm"]
    assert pc.qstat_argv("pbspro", ["3.pbs-vm"]) == ["qstat", "-f", "-F", "json", "-x", "3.pbs-vm"]
    assert pc.qstat_all_argv() == ["qstat", "-f", "-F", "json", "-x"]
    assert pc.qstat_all_argv(history=False) == ["qstat", "-f", "-F", "json"]


def test_same_job_short_and_long_server_names() -> None:
    assert pc.same_job("3.pbs-vm", "3.pbs-vm")
    assert pc.same_job("3.pbs-vm", "3.pbs-vm.example.org")
    assert pc.same_job("3.pbs-vm.example.org", "3.pbs-vm")
    assert not pc.same_job("3.pbs-vm", "33.pbs-vm")
    assert not pc.same_job("3.pbs-vm", "3.pbs-vmx")
    assert not pc.same_job("3", "3.pbs-vm")
    status = pp.parse_qstat_json(rec("qstat-json-running.json"))
    picked = pc.pick(status, ["3.pbs-vm.example.org"])
    assert picked["3.pbs-vm.example.org"].native_id == "3.pbs-vm.example.org"


# --- JOB_EXEC_* codes: one test per code --------------------------------------------------------------------

OPENPBS_CODES = [
    (-1, "JOB_EXEC_FAIL1", Reason.NODE_FAIL, False),
    (-2, "JOB_EXEC_FAIL2", Reason.NODE_FAIL, False),
    (-3, "JOB_EXEC_RETRY", Reason.NODE_FAIL, True),
    (-4, "JOB_EXEC_INITABT", Reason.NODE_FAIL, True),
    (-5, "JOB_EXEC_INITRST", Reason.NODE_FAIL, True),
    (-6, "JOB_EXEC_INITRMG", Reason.NODE_FAIL, True),
    (-7, "JOB_EXEC_BADRESRT", Reason.NODE_FAIL, True),
    (-10, "JOB_EXEC_FAILUID", Reason.NODE_FAIL, True),
    (-11, "JOB_EXEC_RERUN", Reason.NODE_FAIL, True),
    (-12, "JOB_EXEC_CHKP", Reason.NODE_FAIL, True),
    (-13, "JOB_EXEC_FAIL_PASSWORD", Reason.NODE_FAIL, True),
    (-14, "JOB_EXEC_RERUN_SIS_FAIL", Reason.NODE_FAIL, True),
    (-15, "JOB_EXEC_QUERST", Reason.NODE_FAIL, True),
    (-16, "JOB_EXEC_FAILHOOK_RERUN", Reason.NODE_FAIL, True),
    (-17, "JOB_EXEC_FAILHOOK_DELETE", Reason.NODE_FAIL, False),
    (-18, "JOB_EXEC_HOOK_RERUN", Reason.NODE_FAIL, True),
    (-19, "JOB_EXEC_HOOK_DELETE", Reason.NODE_FAIL, False),
    (-20, "JOB_EXEC_RERUN_MS_FAIL", Reason.NODE_FAIL, True),
    (-21, "JOB_EXEC_FAIL_SECURITY", Reason.NODE_FAIL, True),
    (-22, "JOB_EXEC_HOOKERROR", Reason.NODE_FAIL, True),
    (-23, "JOB_EXEC_FAIL_KRB5", Reason.NODE_FAIL, False),
    (-24, "JOB_EXEC_KILL_NCPUS_BURST", Reason.EXIT_CODE, False),
    (-25, "JOB_EXEC_KILL_NCPUS_SUM", Reason.EXIT_CODE, False),
    (-26, "JOB_EXEC_KILL_VMEM", Reason.OUT_OF_MEMORY, False),
    (-27, "JOB_EXEC_KILL_MEM", Reason.OUT_OF_MEMORY, False),
    (-28, "JOB_EXEC_KILL_CPUT", Reason.TIMEOUT, False),
    (-29, "JOB_EXEC_KILL_WALLTIME", Reason.TIMEOUT, False),
    (-30, "JOB_EXEC_JOINJOB", Reason.NODE_FAIL, False),
]


def job_doc(**job: object) -> str:
    return json.dumps({"pbs_version": "23.06.06", "Jobs": {"12.pbs-vm": {"Job_Name": "fem-x", **job}}})


@pytest.mark.parametrize(("status", "name", "reason", "requeued"), OPENPBS_CODES, ids=[c[1] for c in OPENPBS_CODES])
def test_openpbs_exec_code(status: int, name: str, reason: Reason, requeued: bool) -> None:
    code = pp.exec_code("pbspro", status)
    assert (code.name, code.reason, code.requeued) == (name, reason, requeued)
    # finished (F): a failure with PBS's words, never a success, never an exit code of the command
    final = pp.parse_qstat_json(job_doc(job_state="F", substate=93, Exit_status=status))["12.pbs-vm"]
    assert (final.state, final.reason, final.exit_code) == (State.FAILED, reason, None)
    assert final.message is not None and f"Exit_status {status} ({name})" in final.message
    assert ("so it was not requeued" in final.message) is requeued
    # back in the queue with that Exit_status: requeued, not over
    queued = pp.parse_qstat_json(job_doc(job_state="Q", substate=10, Exit_status=status))["12.pbs-vm"]
    assert queued.state is State.SUBMITTED
    assert (queued.message is not None and queued.message.startswith("requeued by PBS after")) is requeued


def test_exec_codes_of_torque_differ() -> None:
    """-11 is a rerun on OpenPBS but a walltime kill on Torque: the table is per dialect."""
    assert pp.exec_code("torque", -11).reason is Reason.TIMEOUT
    assert pp.exec_code("torque", -10).reason is Reason.OUT_OF_MEMORY
    assert pp.exec_code("torque", -12).reason is Reason.TIMEOUT
    assert pp.exec_code("torque", -8).name == "JOB_EXEC_CMDFAIL"
    assert pp.exec_code("torque", -13).requeued and pp.exec_code("torque", -14).requeued
    assert pp.exec_code("torque", -3) == pp.exec_code("pbspro", -3)
    text = "Job Id: 5.host\n    Job_Name = fem-x\n    job_state = C\n    exit_status = -11\n"
    assert pp.parse_qstat_torque(text)["5.host"].reason is Reason.TIMEOUT


def test_unknown_exec_code_is_a_failure_to_run() -> None:
    code = pp.exec_code("pbspro", -99)
    assert (code.reason, code.requeued) == (Reason.NODE_FAIL, False)
    with pytest.raises(ValueError):
        pp.exec_code("pbspro", 0)


def test_substate_91_beats_any_exit_status() -> None:
    job = pp.parse_qstat_json(job_doc(job_state="F", substate=91, Exit_status=-29,
                                      comment="x and terminated by root@pbs-vm"))["12.pbs-vm"]
    assert job.state is State.CANCELLED and job.message is not None and "root@pbs-vm" in job.message


# --- GPUs -----------------------------------------------------------------------------------------------------


def test_gpu_select_forms() -> None:
    assert pc.gpu_select("ngpus", 2) == "ngpus=2"
    assert pc.gpu_select("nvidia_gpus", 1) == "nvidia_gpus=1"
    assert pc.gpu_select("ngpus={gpus}:gpu_model=a100", 4) == "ngpus=4:gpu_model=a100"
    for bad in ["ngpus=2", "{gpus}", "ngpus={gpus}:x", "ngpus={gpus} y=1", "a:b", "ngpus={gpus}{gpus}", "g\n",
                "ngpus={gpus}:m=$(id)"]:
        with pytest.raises(ValueError):
            pc.gpu_select(bad, 1)


def test_directives_use_the_site_gpu_resource() -> None:
    task = Task.model_validate({"id": "t1", "command": ["true"], "resources": {"cpus": 2, "gpus": 2}})
    assert "#PBS -l select=1:ncpus=2:ngpus=2" in pc.directives(task, WORKDIR, "pbspro")
    lines = pc.directives(task, WORKDIR, "pbspro", gpu_resource="ngpus={gpus}:gpu_model=a100")
    assert "#PBS -l select=1:ncpus=2:ngpus=2:gpu_model=a100" in lines
    assert "#PBS -l nodes=1:ppn=2:gpus=2" in pc.directives(task, WORKDIR, "torque", gpu_resource="whatever")


def test_gpu_resource_setting_is_checked_at_load() -> None:
    assert PBSSettings().gpu_resource == "ngpus"
    assert PBSSettings(gpu_resource="gpus").gpu_resource == "gpus"
    with pytest.raises(ValidationError, match="gpu_resource"):
        PBSSettings(gpu_resource="ngpus=2")


@pytest.mark.parametrize("refusal", [
    "qsub: Unknown resource Resource_List.ngpus\n",  # the form qsub prints for an undefined -l resource
    "qsub: Unknown resource: ngpus\n",
    "qsub: Unknown resource\n",
])
def test_qsub_unknown_gpu_resource_names_the_setting(refusal: str) -> None:
    hint = pc.qsub_error_hint(refusal, gpus=1, gpu_resource="ngpus", executor="gpu-cluster")
    assert hint is not None and "executors.gpu-cluster.gpu_resource" in hint and "'ngpus'" in hint


def test_qsub_other_refusals() -> None:
    hint = pc.qsub_error_hint("qsub: Unknown resource Resource_List.scratch\n", gpus=1, gpu_resource="ngpus",
                              executor="pbs")
    assert hint is not None and "scratch" in hint and "executors.pbs.extra_directives" in hint
    no_gpu = pc.qsub_error_hint("qsub: Unknown resource\n", gpus=0, gpu_resource="ngpus", executor="pbs")
    assert no_gpu is not None and "gpu_resource" not in no_gpu
    assert pc.qsub_error_hint("qsub: Unknown queue\n", gpus=1, gpu_resource="ngpus", executor="pbs") is None
