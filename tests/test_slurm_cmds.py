"""Slurm adapter functions: argv builders, parsers on recorded Slurm 22.05 output, directives, and
the job script template."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from fem_hpc.executors import slurm_cmds as sc
from fem_hpc.executors.base import Job
from fem_hpc.layout import read_marker
from fem_hpc.model import Reason, State, Task
from fem_hpc.render import base_context, make_environment

FIXTURES = Path(__file__).parent / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def make_task(**fields: object) -> Task:
    data: dict[str, object] = {"id": "t1", "command": ["echo", "hi"]}
    data.update(fields)
    return Task.model_validate(data)


# --- sbatch -------------------------------------------------------------------------------------


def test_sbatch_argv() -> None:
    assert sc.sbatch_argv("/w/.fem/job.sh") == ["sbatch", "--parsable", "/w/.fem/job.sh"]


def test_parse_sbatch_recorded() -> None:
    assert sc.parse_sbatch(fixture("slurm-22.05-sbatch-parsable.txt")) == "16"


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("123\n", "123"),
        ("123;cluster1\n", "123"),
        ("  42 \n", "42"),
        ("sbatch: warning: something ignored\n77\n", "77"),
    ],
)
def test_parse_sbatch_forms(stdout: str, expected: str) -> None:
    assert sc.parse_sbatch(stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    ["", "\n", "Submitted batch job 12\n", "sbatch: error: Batch job submission failed\n", "12;\n", "abc"],
)
def test_parse_sbatch_rejects(stdout: str) -> None:
    with pytest.raises(ValueError, match="sbatch did not print a job id"):
        sc.parse_sbatch(stdout)


# --- squeue -------------------------------------------------------------------------------------


def test_squeue_format_has_the_fields_and_name_last() -> None:
    fields = sc.SQUEUE_FORMAT.split("|")
    assert fields == ["%i", "%t", "%T", "%r", "%j"]


def test_squeue_argv() -> None:
    assert sc.squeue_argv() == ["squeue", "--noheader", "-t", "all", "-o", sc.SQUEUE_FORMAT, "--me"]
    assert sc.squeue_argv("alice") == ["squeue", "--noheader", "-t", "all", "-o", sc.SQUEUE_FORMAT, "-u", "alice"]


@pytest.mark.parametrize("user", ["-a", "alice\nbob", "al ice", "", "x;y"])
def test_squeue_argv_rejects_odd_users(user: str) -> None:
    with pytest.raises(ValueError):
        sc.squeue_argv(user)


def test_find_by_name_argv() -> None:
    assert sc.find_by_name_argv("fem-t1") == [
        "squeue",
        "--noheader",
        "-t",
        "all",
        "--name=fem-t1",
        "-o",
        sc.SQUEUE_FORMAT,
    ]
    for bad in ["fem t1", "fem,t2", "x\ny", "", "a|b"]:
        with pytest.raises(ValueError):
            sc.find_by_name_argv(bad)


def test_parse_squeue_recorded_mixed() -> None:
    bad: list[str] = []
    jobs = sc.parse_squeue(fixture("slurm-22.05-squeue-mixed.txt"), bad)
    assert bad == []
    assert jobs["2"].state is State.COMPLETED and jobs["2"].exit_code is None and jobs["2"].reason is None
    assert jobs["2"].job_name == "rec-completed"
    assert jobs["3"].state is State.FAILED and jobs["3"].reason is Reason.EXIT_CODE
    assert "NonZeroExitCode" in (jobs["3"].message or "")
    assert jobs["7"].state is State.CANCELLED
    assert jobs["4"].state is State.RUNNING and jobs["4"].message is None
    # pending reasons become the message
    assert (jobs["5"].state, jobs["5"].message) == (State.SUBMITTED, "BeginTime")
    assert (jobs["13"].state, jobs["13"].message) == (State.SUBMITTED, "Resources")
    assert (jobs["15"].state, jobs["15"].message) == (State.SUBMITTED, "Dependency")
    assert (jobs["6"].state, jobs["6"].message) == (State.SUBMITTED, "JobHeldUser")
    assert jobs["16"].message is not None and jobs["16"].message.startswith("Nodes required for job are DOWN, ")
    # array elements and a pending array keep their ids as strings
    assert jobs["10_1"].state is State.RUNNING and jobs["10_2"].native_id == "10_2"
    assert jobs["14_[1-3]"].state is State.SUBMITTED and jobs["14_[1-3]"].message == "Priority"
    # a '|' and spaces inside a job name do not break the line
    assert jobs["9"].job_name == "rec|pipe name with spaces"
    assert jobs["9"].state is State.RUNNING
    assert all(j.native_id == k for k, j in jobs.items())


def test_parse_squeue_recorded_finished() -> None:
    jobs = sc.parse_squeue(fixture("slurm-22.05-squeue-finished.txt"))
    for job_id in ("8", "24", "25"):
        assert jobs[job_id].state is State.FAILED
        assert jobs[job_id].reason is Reason.TIMEOUT
        assert "TimeLimit" in (jobs[job_id].message or "")
    assert jobs["24"].job_name == "fem-to1"
    assert jobs["9"].state is State.CANCELLED and jobs["9"].job_name == "rec|pipe name with spaces"
    assert jobs["14_[1-3]"].state is State.CANCELLED  # cancelled while pending keeps its reason
    assert jobs["16"].state is State.COMPLETED and jobs["16"].exit_code is None
    assert jobs["5"].state is State.SUBMITTED
    assert jobs["4"].state is State.RUNNING


def test_parse_squeue_recorded_by_name() -> None:
    jobs = sc.parse_squeue(fixture("slurm-22.05-squeue-by-name.txt"))
    assert list(jobs) == ["24"]
    assert jobs["24"].job_name == "fem-to1" and jobs["24"].reason is Reason.TIMEOUT


@pytest.mark.parametrize(
    ("compact", "long", "reason", "state", "why", "in_message"),
    [
        ("PD", "PENDING", "Priority", State.SUBMITTED, None, "Priority"),
        ("PD", "PENDING", "None", State.SUBMITTED, None, None),
        ("CF", "CONFIGURING", "None", State.SUBMITTED, None, "CONFIGURING"),
        ("R", "RUNNING", "None", State.RUNNING, None, None),
        ("CG", "COMPLETING", "None", State.RUNNING, None, "COMPLETING"),
        ("CD", "COMPLETED", "None", State.COMPLETED, None, None),
        ("F", "FAILED", "NonZeroExitCode", State.FAILED, Reason.EXIT_CODE, "NonZeroExitCode"),
        ("TO", "TIMEOUT", "TimeLimit", State.FAILED, Reason.TIMEOUT, "TIMEOUT"),
        ("DL", "DEADLINE", "None", State.FAILED, Reason.TIMEOUT, "DEADLINE"),
        ("OOM", "OUT_OF_MEMORY", "OutOfMemory", State.FAILED, Reason.OUT_OF_MEMORY, "OUT_OF_MEMORY"),
        ("NF", "NODE_FAIL", "NodeDown", State.FAILED, Reason.NODE_FAIL, "NODE_FAIL"),
        ("BF", "BOOT_FAIL", "None", State.FAILED, Reason.NODE_FAIL, "BOOT_FAIL"),
        ("CA", "CANCELLED", "None", State.CANCELLED, None, "CANCELLED"),
        ("PR", "PREEMPTED", "None", State.SUBMITTED, None, "PREEMPTED"),
        ("RQ", "REQUEUED", "None", State.SUBMITTED, None, "REQUEUED"),
        ("RF", "REQUEUE_FED", "None", State.SUBMITTED, None, "REQUEUE_FED"),
        ("RH", "REQUEUE_HOLD", "None", State.SUBMITTED, None, "REQUEUE_HOLD"),
        ("RD", "RESV_DEL_HOLD", "None", State.SUBMITTED, None, "RESV_DEL_HOLD"),
        ("SE", "SPECIAL_EXIT", "None", State.SUBMITTED, None, "SPECIAL_EXIT"),
        ("RS", "RESIZING", "None", State.RUNNING, None, "RESIZING"),
        ("S", "SUSPENDED", "None", State.RUNNING, None, "SUSPENDED"),
        ("ST", "STOPPED", "None", State.RUNNING, None, "STOPPED"),
        ("SI", "SIGNALING", "None", State.RUNNING, None, "SIGNALING"),
        ("SO", "STAGE_OUT", "None", State.RUNNING, None, "STAGE_OUT"),
        ("RV", "REVOKED", "None", State.RUNNING, None, "REVOKED"),
        ("ZZ", "NEW_STATE", "None", State.RUNNING, None, "unknown Slurm state ZZ"),
    ],
)
def test_squeue_state_mapping(
    compact: str, long: str, reason: str, state: State, why: Reason | None, in_message: str | None
) -> None:
    jobs = sc.parse_squeue(f"77|{compact}|{long}|{reason}|fem-x\n")
    job = jobs["77"]
    assert job.state is state
    assert job.reason is why
    assert job.exit_code is None  # squeue never knows it: the marker (then sacct) decides
    if in_message is None:
        assert job.message is None
    else:
        assert job.message is not None and in_message in job.message
    assert job.message is None or "None" not in job.message.split()


def test_parse_squeue_empty_and_garbage() -> None:
    assert sc.parse_squeue("") == {}
    assert sc.parse_squeue("\n\n   \n") == {}
    bad: list[str] = []
    text = "\n".join(
        [
            "garbage",
            "12|R|RUNNING",  # too few fields
            "abc|R|RUNNING|None|x",  # not a job id
            "-5|R|RUNNING|None|x",
            "13||RUNNING|None|x",  # no state
            "14|r unning|RUNNING|None|x",
            "slurm_load_jobs error: Unable to contact slurm controller",
            "15|R|RUNNING|None|good",
            "16|PD|PENDING|Priority|",  # empty job name is fine
        ]
    )
    jobs = sc.parse_squeue(text, bad)
    assert set(jobs) == {"15", "16"}
    assert jobs["16"].job_name is None
    assert len(bad) == 7


def test_parse_squeue_het_and_array_ids() -> None:
    jobs = sc.parse_squeue("123+1|R|RUNNING|None|het\n123_4|PD|PENDING|Priority|arr\n")
    assert jobs["123+1"].state is State.RUNNING
    assert jobs["123_4"].native_id == "123_4"


def test_parse_squeue_ten_thousand_lines() -> None:
    codes = ["PD", "R", "CD", "F", "CA", "TO"]
    lines = [f"{i}|{codes[i % 6]}|X|None|fem-task-{i}|with|pipes" for i in range(1, 10001)]
    lines.insert(5000, "this line is broken")
    bad: list[str] = []
    jobs = sc.parse_squeue("\n".join(lines) + "\n", bad)
    assert len(jobs) == 10000
    assert bad == ["this line is broken"]
    assert jobs["9999"].job_name == "fem-task-9999|with|pipes"
    assert jobs["6"].state is State.SUBMITTED  # 6 % 6 == 0 -> PD
    assert jobs["9999"].state is State.FAILED and jobs["9999"].reason is Reason.EXIT_CODE  # 9999 % 6 == 3 -> F
    assert jobs["10000"].state is State.CANCELLED  # 10000 % 6 == 4 -> CA


# --- sacct --------------------------------------------------------------------------------------


def test_sacct_argv() -> None:
    assert sc.sacct_argv(["12", "13_2"]) == [
        "sacct",
        "-n",
        "-P",
        "-X",
        "-j",
        "12,13_2",
        "-o",
        "JobID,State,ExitCode,JobName",
    ]
    with pytest.raises(ValueError):
        sc.sacct_argv([])
    for bad in ["-S", "12,13", "12 13", "x", ""]:
        with pytest.raises(ValueError):
            sc.sacct_argv([bad])


def test_parse_sacct_fixture() -> None:
    jobs = sc.parse_sacct(fixture("slurm-sacct-n-P-X.txt"))
    assert (jobs["101"].state, jobs["101"].exit_code) == (State.COMPLETED, 0)
    assert (jobs["102"].state, jobs["102"].reason, jobs["102"].exit_code) == (State.FAILED, Reason.EXIT_CODE, 3)
    assert jobs["103"].state is State.CANCELLED and "CANCELLED by 0" in (jobs["103"].message or "")
    assert (jobs["104"].state, jobs["104"].reason, jobs["104"].exit_code) == (State.FAILED, Reason.TIMEOUT, None)
    assert jobs["105"].reason is Reason.OUT_OF_MEMORY
    assert jobs["106"].reason is Reason.NODE_FAIL
    assert jobs["107"].state is State.RUNNING
    assert jobs["108"].state is State.SUBMITTED
    assert jobs["109_1"].state is State.COMPLETED
    assert (jobs["110"].reason, jobs["110"].exit_code) == (Reason.EXIT_CODE, 137)
    assert "signal 9" in (jobs["110"].message or "")
    assert jobs["111"].state is State.SUBMITTED and jobs["112"].state is State.SUBMITTED  # never terminal
    assert jobs["113"].reason is Reason.NODE_FAIL
    assert jobs["114"].reason is Reason.TIMEOUT
    assert jobs["115"].job_name == "fem|pipe in name"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("0:0", (0, None)), ("2:0", (2, None)), ("0:9", (137, 9)), ("0:15", (143, 15)), ("x", (None, None))],
)
def test_parse_exit_code(text: str, expected: tuple[int | None, int | None]) -> None:
    assert sc.parse_exit_code(text) == expected


def test_parse_sacct_garbage() -> None:
    bad: list[str] = []
    assert sc.parse_sacct("", bad) == {}
    jobs = sc.parse_sacct("sacct: error: Problem talking to the database\n12|COMPLETED\n13|WEIRD|0:0|x\n", bad)
    assert list(jobs) == ["13"] and jobs["13"].state is State.RUNNING  # unknown state: never final
    assert len(bad) == 2


# --- scancel ------------------------------------------------------------------------------------


def test_scancel_argv() -> None:
    assert sc.scancel_argv("12") == ["scancel", "12"]
    assert sc.scancel_argv("12_3") == ["scancel", "12_3"]
    for bad in ["-u", "--signal=KILL", "12 13", "", "12\n", "x12"]:
        with pytest.raises(ValueError):
            sc.scancel_argv(bad)


# --- directives ---------------------------------------------------------------------------------

WORKDIR = "/var/lib/fem-hpc/work/alice/run1/t1"


def test_directives_all_resources() -> None:
    task = make_task(
        resources={"cpus": 4, "memory": "4G", "gpus": 2, "nodes": 1, "walltime": "02:30:00"},
        queue="gpu",
        account="proj1",
    )
    assert sc.directives(task, WORKDIR, partition="debug", account="default") == [
        "#SBATCH --job-name=fem-t1",
        f"#SBATCH --chdir={WORKDIR}",
        f"#SBATCH --output={WORKDIR}/.fem/scheduler.out",
        f"#SBATCH --error={WORKDIR}/.fem/scheduler.err",
        "#SBATCH --partition=gpu",
        "#SBATCH --account=proj1",
        "#SBATCH --nodes=1",
        "#SBATCH --cpus-per-task=4",
        "#SBATCH --mem=4096M",
        "#SBATCH --gres=gpu:2",
        "#SBATCH --time=02:30:00",
    ]


def test_directives_site_defaults_and_minimal_task() -> None:
    lines = sc.directives(make_task(), Path(WORKDIR), partition="debug", account="acct")
    assert "#SBATCH --partition=debug" in lines and "#SBATCH --account=acct" in lines
    assert not any("--mem" in x or "--time" in x or "--gres" in x for x in lines)
    assert not any("--partition" in x for x in sc.directives(make_task(), WORKDIR))


@pytest.mark.parametrize(
    ("walltime", "expected"),
    [("00:00:01", "00:00:01"), ("24:00:00", "1-00:00:00"), ("1-02:03:04", "1-02:03:04"), ("30:00:00", "1-06:00:00")],
)
def test_directives_walltime(walltime: str, expected: str) -> None:
    lines = sc.directives(make_task(resources={"walltime": walltime}), WORKDIR)
    assert f"#SBATCH --time={expected}" in lines


def test_directives_memory_units() -> None:
    assert "#SBATCH --mem=512M" in sc.directives(make_task(resources={"memory": "512M"}), WORKDIR)
    assert "#SBATCH --mem=1M" in sc.directives(make_task(resources={"memory": "100K"}), WORKDIR)


def test_directives_gpus_zero_means_none() -> None:
    assert not any("gres" in x for x in sc.directives(make_task(resources={"gpus": 0}), WORKDIR))


def test_directives_job_name_from_task_id() -> None:
    lines = sc.directives(make_task(id="Run_1.a-b"), WORKDIR)
    assert lines[0] == "#SBATCH --job-name=fem-Run_1.a-b"


@pytest.mark.parametrize(
    "kwargs",
    [
        {"partition": "debug\n#SBATCH --uid=0"},
        {"partition": "debug\0"},
        {"partition": "deb ug"},
        {"partition": "debug#x"},
        {"account": "acct\n"},
        {"account": "a'b"},
        {"account": ""},
    ],
)
def test_directives_reject_hostile_site_values(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        sc.directives(make_task(), WORKDIR, **kwargs)


def test_model_rejects_newlines_in_queue_and_account() -> None:
    with pytest.raises(ValidationError):
        make_task(queue="debug\n#SBATCH --uid=0")
    with pytest.raises(ValidationError):
        make_task(account="a\nb")


def test_directives_reject_unvalidated_task_values() -> None:
    """Even a Task built without validation cannot smuggle a line into the script."""
    for fields in (
        {"queue": "debug\n#SBATCH --uid=0"},
        {"account": "x\ry"},
        {"id": "t1\n#SBATCH --uid=0"},
        {"id": "t 1"},
    ):
        data = {"id": "t1", "command": ["true"], **fields}
        task = Task.model_construct(**data)
        with pytest.raises(ValueError):
            sc.directives(task, WORKDIR)


@pytest.mark.parametrize(
    "workdir",
    [
        "relative/dir",
        "/work/with space",
        "/work/new\nline",
        "/work/nul\0",
        "/work/%j",
        "/work/#hash",
        "/work/quote'",
        '/work/dq"',
        "/work/back\\slash",
        "/work/$HOME",
        "",
    ],
)
def test_directives_reject_unsafe_workdirs(workdir: str) -> None:
    with pytest.raises(ValueError):
        sc.directives(make_task(), workdir)


def test_directives_extra() -> None:
    lines = sc.directives(make_task(), WORKDIR, extra_directives=["--qos=normal", "#SBATCH --exclusive", "  "])
    assert lines[-2:] == ["#SBATCH --qos=normal", "#SBATCH --exclusive"]
    for bad in ["--qos=normal\necho pwned", "--x\0"]:
        with pytest.raises(ValueError):
            sc.directives(make_task(), WORKDIR, extra_directives=[bad])


# --- the template -------------------------------------------------------------------------------

HOSTILE_ARGV = ["sh", "-c", 'echo "$1" > out.txt', "x", "$(touch /tmp/pwned) `id` 'q' \"d\" \\ ; | & {{ 7*7 }}\nnl"]


def render(tmp_path: Path, task: Task) -> tuple[Job, str]:
    job = Job(task=task, workdir=tmp_path / "work" / task.id)
    job.fem_dir.mkdir(parents=True)
    context = base_context(job)
    context["directives"] = sc.directives(task, job.workdir, partition="debug")
    text = make_environment().get_template("slurm.sh.j2").render(**context)
    job.script_path.write_text(text)
    return job, text


def test_template_renders_valid_sh(tmp_path: Path) -> None:
    task = make_task(command=HOSTILE_ARGV, resources={"cpus": 1, "walltime": "00:05:00"})
    job, text = render(tmp_path, task)
    lines = text.splitlines()
    assert lines[0] == "#!/bin/sh"
    directive_lines = [i for i, line in enumerate(lines) if line.startswith("#SBATCH")]
    assert directive_lines == list(range(1, len(directive_lines) + 1))
    # sbatch stops reading #SBATCH lines at the first command: all of them come before it
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    assert max(directive_lines) < first_command
    assert "{{ 7*7 }}" in text  # task values are data, never template source
    result = subprocess.run(["sh", "-n", str(job.script_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_template_runs_as_plain_sh(tmp_path: Path) -> None:
    """The #SBATCH lines are comments to sh: run the script directly and read the marker."""
    job, _ = render(tmp_path, make_task(command=HOSTILE_ARGV))
    subprocess.run(["sh", str(job.script_path)], capture_output=True, timeout=30)
    marker = read_marker(job.marker_path)
    assert marker is not None and marker.exit_code == 0
    assert (job.workdir / "out.txt").read_text() == HOSTILE_ARGV[-1] + "\n"
    assert not Path("/tmp/pwned").exists()


def test_template_runs_with_env(tmp_path: Path) -> None:
    job, _ = render(tmp_path, make_task(command=["sh", "-c", 'echo "$GREETING" > out.txt'], env={"GREETING": "a b"}))
    subprocess.run(["sh", str(job.script_path)], capture_output=True, timeout=30)
    marker = read_marker(job.marker_path)
    assert marker is not None and marker.exit_code == 0
    assert (job.workdir / "out.txt").read_text() == "a b\n"


# --- the real Slurm (skipped when it is not up) -------------------------------------------------


def slurm_up() -> bool:
    if not shutil.which("sbatch"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.slurm
def test_real_sbatch_round_trip(tmp_path: Path) -> None:
    if not slurm_up():
        pytest.skip("Slurm is not running here (sinfo fails); `scripts/testbed up` starts it")
    task = make_task(
        id=f"slurmcmds-{os.getpid()}-{time.time_ns()}",
        command=["sh", "-c", "echo out; exit 3"],
        resources={"cpus": 1, "memory": "64M", "walltime": "00:02:00"},
    )
    job = Job(task=task, workdir=tmp_path / "work" / task.id)
    job.fem_dir.mkdir(parents=True)
    context = base_context(job)
    context["directives"] = sc.directives(task, job.workdir)
    job.script_path.write_text(make_environment().get_template("slurm.sh.j2").render(**context))
    out = subprocess.run(sc.sbatch_argv(str(job.script_path)), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    job_id = sc.parse_sbatch(out.stdout)
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        listing = subprocess.run(sc.squeue_argv(), capture_output=True, text=True, timeout=30)
        status = sc.parse_squeue(listing.stdout).get(job_id)
        if status is not None and status.state.final:
            break
        time.sleep(0.5)
    else:
        subprocess.run(sc.scancel_argv(job_id), capture_output=True, timeout=30)
        pytest.fail(f"job {job_id} did not finish: {status}")
    assert status is not None and status.job_name == f"fem-{task.id}"
    assert (status.state, status.reason) == (State.FAILED, Reason.EXIT_CODE)
    marker = read_marker(job.marker_path)
    assert marker is not None and marker.exit_code == 3
    assert (job.fem_dir / "stdout").read_text() == "out\n"
    assert (job.fem_dir / "scheduler.out").exists()
    found = subprocess.run(sc.find_by_name_argv(job.job_name), capture_output=True, text=True, timeout=30)
    assert job_id in sc.parse_squeue(found.stdout)
