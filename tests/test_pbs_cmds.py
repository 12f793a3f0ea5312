"""PBS adapter functions: argv builders, parsers of OpenPBS JSON and Torque text (recorded from
Debian's slurm-wlm-torque, and written from the documented formats), directives, the template."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from fem_hpc.executors import pbs_cmds as pc
from fem_hpc.executors import pbs_parse as pp
from fem_hpc.executors.base import Job
from fem_hpc.layout import read_marker
from fem_hpc.model import Reason, State, Task
from fem_hpc.render import base_context, make_environment

FIXTURES = Path(__file__).parent / "fixtures"
WORKDIR = "/var/lib/fem-hpc/work/alice/run1/t1"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


def make_task(**fields: object) -> Task:
    data: dict[str, object] = {"id": "t1", "command": ["echo", "hi"]}
    data.update(fields)
    return Task.model_validate(data)


# --- qsub / qdel --------------------------------------------------------------------------------


def test_qsub_argv() -> None:
    assert pc.qsub_argv("/w/.fem/job.sh") == ["qsub", "/w/.fem/job.sh"]
    assert pc.qsub_argv("/w/.fem/job.sh", "/w/.fem/scheduler.out", "/w/.fem/scheduler.err") == [
        "qsub",
        "-o",
        "/w/.fem/scheduler.out",
        "-e",
        "/w/.fem/scheduler.err",
        "/w/.fem/job.sh",
    ]


@pytest.mark.parametrize("path", ["job.sh", "/w/a b.sh", "/w/$(id).sh", "/w/x;y", "/w/x\n", "/w/`id`", "-h"])
def test_qsub_argv_rejects_unsafe_paths(path: str) -> None:
    """Debian's qsub runs sbatch through a shell: paths must not mean anything to it."""
    with pytest.raises(ValueError):
        pc.qsub_argv(path)
    with pytest.raises(ValueError):
        pc.qsub_argv("/w/job.sh", stdout_path=path)


def test_parse_qsub_recorded_debian() -> None:
    assert pc.parse_qsub(fixture("slurm-wlm-torque-qsub.txt")) == "17"


@pytest.mark.parametrize(
    ("stdout", "expected"),
    [
        ("40.pbs\n", "40.pbs"),
        ("123.hostname\n", "123.hostname"),
        ("  123.torque.example.org  \n", "123.torque.example.org"),
        ("123\n", "123"),
        ("5[].pbs\n", "5[].pbs"),
    ],
)
def test_parse_qsub_forms(stdout: str, expected: str) -> None:
    assert pc.parse_qsub(stdout) == expected


@pytest.mark.parametrize(
    "stdout",
    [
        "",
        "qsub: Unknown queue\n",
        "There was an error running the Slurm sbatch command.\nThe command was:\n'...'\n",
        "abc.host\n",
        "12 13\n",
        "12\n-x\n",
    ],
)
def test_parse_qsub_rejects(stdout: str) -> None:
    with pytest.raises(ValueError, match="qsub did not print a job id"):
        pc.parse_qsub(stdout)


def test_qdel_argv() -> None:
    assert pc.qdel_argv("40.pbs") == ["qdel", "40.pbs"]
    for bad in ["-W", "40.pbs\n", "40 41", "", "x"]:
        with pytest.raises(ValueError):
            pc.qdel_argv(bad)


# --- qstat argv ---------------------------------------------------------------------------------


def test_qstat_argv() -> None:
    assert pc.qstat_argv("pbspro", ["40.pbs", "41.pbs"]) == ["qstat", "-f", "-F", "json", "-x", "40.pbs", "41.pbs"]
    assert pc.qstat_argv("torque", ["17", "18"]) == ["qstat", "-f", "17", "18"]
    with pytest.raises(ValueError):
        pc.qstat_argv("torque", [])
    with pytest.raises(ValueError):
        pc.qstat_argv("lsf", ["1"])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pc.qstat_argv("pbspro", ["-u"])


# --- OpenPBS JSON -------------------------------------------------------------------------------


def test_parse_qstat_json_recorded_finished() -> None:
    jobs = pp.parse_qstat_json(fixture("openpbs-19-qstat-x-f-F-json-finished.json"))
    assert list(jobs) == ["40.pbs"]
    job = jobs["40.pbs"]
    assert (job.state, job.exit_code, job.reason, job.job_name) == (State.COMPLETED, 0, None, "pbs_sleep")


def test_parse_qstat_json_queued() -> None:
    job = pp.parse_qstat_json(fixture("openpbs-qstat-x-f-F-json-queued.json"))["41.pbs"]
    assert job.state is State.SUBMITTED
    assert job.message is not None and job.message.startswith("Not Running: Insufficient amount of resource")
    assert job.job_name == "fem-queued"


def test_parse_qstat_json_running() -> None:
    job = pp.parse_qstat_json(fixture("openpbs-qstat-x-f-F-json-running.json"))["42.pbs"]
    assert (job.state, job.exit_code, job.job_name) == (State.RUNNING, None, "fem-running")


def test_parse_qstat_json_walltime() -> None:
    job = pp.parse_qstat_json(fixture("openpbs-qstat-x-f-F-json-walltime.json"))["43.pbs"]
    assert (job.state, job.reason) == (State.FAILED, Reason.TIMEOUT)
    assert job.exit_code == 128 + 15
    assert job.message is not None and "271" in job.message and "walltime" in job.message


def test_parse_qstat_json_exec_failure() -> None:
    job = pp.parse_qstat_json(fixture("openpbs-qstat-x-f-F-json-execfail.json"))["44.pbs"]
    assert (job.state, job.reason, job.exit_code) == (State.FAILED, Reason.NODE_FAIL, None)
    assert job.message is not None and "-1" in job.message


def test_parse_qstat_json_mixed() -> None:
    jobs = pp.parse_qstat_json(fixture("openpbs-qstat-x-f-F-json-mixed.json"))
    summary = {k: (v.state, v.reason, v.exit_code) for k, v in jobs.items()}
    assert summary == {
        "40.pbs": (State.COMPLETED, None, 0),
        "41.pbs": (State.SUBMITTED, None, None),
        "42.pbs": (State.RUNNING, None, None),
        "43.pbs": (State.FAILED, Reason.TIMEOUT, 143),
        "44.pbs": (State.FAILED, Reason.NODE_FAIL, None),
        "45.pbs": (State.FAILED, Reason.EXIT_CODE, 3),
        "46.pbs": (State.SUBMITTED, None, None),
    }
    assert jobs["46.pbs"].message is not None and jobs["46.pbs"].message.startswith("held")


def pbs_doc(**job: Any) -> str:
    return json.dumps({"timestamp": 1, "pbs_version": "19.0.0", "pbs_server": "pbs", "Jobs": {"7.pbs": job}})


@pytest.mark.parametrize(
    ("job", "state", "reason", "exit_code"),
    [
        ({"job_state": "F", "Exit_status": 0}, State.COMPLETED, None, 0),
        ({"job_state": "X", "Exit_status": 0}, State.COMPLETED, None, 0),
        ({"job_state": "F", "Exit_status": "2"}, State.FAILED, Reason.EXIT_CODE, 2),
        ({"job_state": "F", "Exit_status": 127}, State.FAILED, Reason.EXIT_CODE, 127),
        ({"job_state": "F", "Exit_status": 130}, State.FAILED, Reason.EXIT_CODE, 130),
        ({"job_state": "F", "Exit_status": 265}, State.FAILED, Reason.EXIT_CODE, 137),
        (
            {"job_state": "F", "Exit_status": 271, "comment": "job killed: walltime 70 exceeded limit 60"},
            State.FAILED,
            Reason.TIMEOUT,
            143,
        ),
        ({"job_state": "F", "Exit_status": 143, "comment": "Walltime exceeded"}, State.FAILED, Reason.TIMEOUT, 143),
        (
            {
                "job_state": "F",
                "Exit_status": 271,
                "resources_used": {"walltime": "00:01:02"},
                "Resource_List": {"walltime": "00:01:00"},
            },
            State.FAILED,
            Reason.TIMEOUT,
            143,
        ),
        (
            {
                "job_state": "F",
                "Exit_status": 271,
                "resources_used": {"walltime": "00:00:02"},
                "Resource_List": {"walltime": "00:01:00"},
            },
            State.FAILED,
            Reason.EXIT_CODE,
            143,
        ),
        (
            {"job_state": "F", "Exit_status": 265, "comment": "job killed: mem 2gb exceeded limit 1gb"},
            State.FAILED,
            Reason.OUT_OF_MEMORY,
            137,
        ),
        ({"job_state": "F", "Exit_status": -1}, State.FAILED, Reason.NODE_FAIL, None),
        ({"job_state": "F", "Exit_status": -3}, State.FAILED, Reason.NODE_FAIL, None),
        ({"job_state": "F", "Exit_status": -99}, State.FAILED, Reason.NODE_FAIL, None),
        ({"job_state": "F"}, State.COMPLETED, None, None),  # no exit status: the marker decides
        ({"job_state": "F", "comment": "Job deleted by alice"}, State.CANCELLED, None, None),
        ({"job_state": "Q"}, State.SUBMITTED, None, None),
        ({"job_state": "H"}, State.SUBMITTED, None, None),
        ({"job_state": "W"}, State.SUBMITTED, None, None),
        ({"job_state": "T"}, State.SUBMITTED, None, None),
        ({"job_state": "M"}, State.SUBMITTED, None, None),
        ({"job_state": "R"}, State.RUNNING, None, None),
        ({"job_state": "E"}, State.RUNNING, None, None),
        ({"job_state": "B"}, State.RUNNING, None, None),
        ({"job_state": "S"}, State.RUNNING, None, None),
        ({"job_state": "U"}, State.RUNNING, None, None),
        ({"job_state": "Z"}, State.RUNNING, None, None),  # unknown: never final
        ({}, State.RUNNING, None, None),
    ],
)
def test_pbspro_states_and_exit_status(
    job: dict[str, Any], state: State, reason: Reason | None, exit_code: int | None
) -> None:
    status = pp.parse_qstat_json(pbs_doc(Job_Name="fem-x", **job))["7.pbs"]
    assert (status.state, status.reason, status.exit_code) == (state, reason, exit_code)
    assert status.job_name == "fem-x"
    if job.get("job_state") in ("S", "U"):
        assert status.message == "suspended"
    if job.get("job_state") == "Z":
        assert status.message is not None and "Z" in status.message


def test_parse_qstat_json_robustness() -> None:
    assert pp.parse_qstat_json("") == {}
    assert pp.parse_qstat_json('{"timestamp": 1, "pbs_version": "19.0.0", "pbs_server": "pbs"}') == {}
    assert pp.parse_qstat_json('{"Jobs": {"1.pbs": "not an object", "2.pbs": {"job_state": "R"}}}').keys() == {"2.pbs"}
    # a raw control character inside a string (seen in some OpenPBS versions' Variable_List)
    raw = '{"Jobs": {"3.pbs": {"job_state": "R", "Variable_List": {"X": "a\tb"}}}}'
    assert pp.parse_qstat_json(raw)["3.pbs"].state is State.RUNNING
    for bad in ["{", "qstat: Unknown Job Id 9.pbs", "[1, 2]", '{"Jobs": [1]}']:
        with pytest.raises(ValueError):
            pp.parse_qstat_json(bad)


# --- Torque text --------------------------------------------------------------------------------


def test_parse_torque_recorded_debian_mixed() -> None:
    jobs = pp.parse_qstat_torque(fixture("slurm-wlm-torque-qstat-f-mixed.txt"))
    assert set(jobs) == {"2", "3", "4", "5", "6", "7", "9", "14"}
    # Debian's wrapper: every ended job is C without exit_status -> COMPLETED, exit unknown (marker decides)
    for job_id in ("2", "3", "7"):
        assert (jobs[job_id].state, jobs[job_id].exit_code) == (State.COMPLETED, None)
    assert jobs["4"].state is State.RUNNING and jobs["4"].job_name == "rec-running"
    assert jobs["5"].state is State.SUBMITTED and jobs["6"].state is State.SUBMITTED
    assert jobs["9"].job_name == "rec|pipe name with spaces"


def test_parse_torque_recorded_debian_running_and_finished() -> None:
    running = pp.parse_qstat_torque(fixture("slurm-wlm-torque-qstat-f-running.txt"))
    assert {k: (v.state, v.job_name) for k, v in running.items()} == {"23": (State.RUNNING, "fem-qd1")}
    finished = pp.parse_qstat_torque(fixture("slurm-wlm-torque-qstat-f-finished.txt"))
    assert {k: (v.state, v.job_name) for k, v in finished.items()} == {
        "17": (State.COMPLETED, "fem-p-torque"),
        "23": (State.COMPLETED, "fem-qd1"),
        "25": (State.COMPLETED, "fem-to2"),
    }
    blocks = pp.parse_torque_blocks(fixture("slurm-wlm-torque-qstat-f-finished.txt"))
    assert blocks["25"]["Resource_List.walltime"] == "00:01:00"


def test_parse_torque_native_format() -> None:
    jobs = pp.parse_qstat_torque(fixture("torque-qstat-f.txt"))
    summary = {k.split(".")[0]: (v.state, v.reason, v.exit_code, v.job_name) for k, v in jobs.items()}
    assert summary == {
        "101": (State.COMPLETED, None, 0, "fem-done"),
        "102": (State.FAILED, Reason.EXIT_CODE, 2, "fem-exit2"),
        "103": (State.FAILED, Reason.TIMEOUT, 143, "fem-walltime"),
        "104": (State.RUNNING, None, None, "fem-running"),
        "105": (State.SUBMITTED, None, None, "fem-queued"),
        "106": (State.SUBMITTED, None, None, "fem-held"),
        "107": (State.FAILED, Reason.NODE_FAIL, None, "fem-execfail"),
    }
    assert "101.torque.example.org" in jobs


def test_parse_torque_continuation_lines() -> None:
    blocks = pp.parse_torque_blocks(fixture("torque-qstat-f.txt"))
    variables = blocks["101.torque.example.org"]["Variable_List"]
    assert variables.startswith("PBS_O_QUEUE=batch,")
    assert "PBS_O_WORKDIR=/home/alice," in variables
    assert variables.endswith("PBS_O_SERVER=torque.example.org")
    assert blocks["101.torque.example.org"]["euser"] == "alice"  # the attribute after them is its own


@pytest.mark.parametrize(
    ("state", "exit_status", "expected", "reason"),
    [
        ("C", None, State.COMPLETED, None),
        ("C", "0", State.COMPLETED, None),
        ("C", "1", State.FAILED, Reason.EXIT_CODE),
        ("C", "-1", State.FAILED, Reason.NODE_FAIL),
        ("Q", None, State.SUBMITTED, None),
        ("H", None, State.SUBMITTED, None),
        ("W", None, State.SUBMITTED, None),
        ("T", None, State.SUBMITTED, None),
        ("R", None, State.RUNNING, None),
        ("E", None, State.RUNNING, None),
        ("S", None, State.RUNNING, None),
        ("U", None, State.RUNNING, None),  # Debian's wrapper for a state it does not map
    ],
)
def test_torque_states(state: str, exit_status: str | None, expected: State, reason: Reason | None) -> None:
    text = f"Job Id: 5.host\n    Job_Name = fem-x\n    job_state = {state}\n"
    if exit_status is not None:
        text += f"    exit_status = {exit_status}\n"
    job = pp.parse_qstat_torque(text)["5.host"]
    assert (job.state, job.reason) == (expected, reason)


def test_parse_torque_robustness() -> None:
    assert pp.parse_qstat_torque("") == {}
    garbage = "qstat: Unknown Job Id 99.host\nrandom words\n    indented = before any job\n"
    assert pp.parse_qstat_torque(garbage) == {}
    text = garbage + "Job Id: 6.host\n    job_state = R\n  not an attribute line\nJob Id:\t7\n\tjob_state = Q\n"
    jobs = pp.parse_qstat_torque(text)
    assert jobs["6.host"].state is State.RUNNING and jobs["7"].state is State.SUBMITTED


def test_parse_qstat_dispatch() -> None:
    assert pp.parse_qstat("torque", fixture("slurm-wlm-torque-qstat-f-running.txt"))["23"].state is State.RUNNING
    assert pp.parse_qstat("pbspro", fixture("openpbs-qstat-x-f-F-json-running.json"))["42.pbs"].state is State.RUNNING
    with pytest.raises(ValueError):
        pp.parse_qstat("lsf", "")  # type: ignore[arg-type]


# --- directives ---------------------------------------------------------------------------------


def test_directives_pbspro() -> None:
    task = make_task(
        resources={"cpus": 4, "memory": "2G", "gpus": 1, "nodes": 2, "walltime": "1-02:00:00"},
        queue="workq",
        account="proj1",
    )
    assert pc.directives(task, WORKDIR, "pbspro", queue="default") == [
        "#PBS -N fem-t1",
        "#PBS -S /bin/sh",
        f"#PBS -o {WORKDIR}/.fem/scheduler.out",
        f"#PBS -e {WORKDIR}/.fem/scheduler.err",
        "#PBS -q workq",
        "#PBS -A proj1",
        "#PBS -l select=2:ncpus=4:mem=2048mb:ngpus=1",
        "#PBS -l walltime=26:00:00",
    ]


def test_directives_torque() -> None:
    task = make_task(resources={"cpus": 2, "memory": "512M", "nodes": 2, "gpus": 1, "walltime": "00:10:00"})
    assert pc.directives(task, WORKDIR, "torque", queue="batch", account="acct") == [
        "#PBS -N fem-t1",
        "#PBS -S /bin/sh",
        f"#PBS -o {WORKDIR}/.fem/scheduler.out",
        f"#PBS -e {WORKDIR}/.fem/scheduler.err",
        "#PBS -q batch",
        "#PBS -A acct",
        "#PBS -l nodes=2:ppn=2:gpus=1",
        "#PBS -l mem=1024mb",
        "#PBS -l walltime=00:10:00",
    ]


def test_directives_minimal() -> None:
    assert pc.directives(make_task(), WORKDIR, "pbspro")[4:] == ["#PBS -l select=1:ncpus=1"]
    assert pc.directives(make_task(), WORKDIR, "torque")[4:] == ["#PBS -l nodes=1:ppn=1"]
    with pytest.raises(ValueError):
        pc.directives(make_task(), WORKDIR, "lsf")  # type: ignore[arg-type]


@pytest.mark.parametrize("dialect", ["pbspro", "torque"])
@pytest.mark.parametrize(
    "kwargs",
    [
        {"queue": "workq\n#PBS -u root"},
        {"queue": "work q"},
        {"queue": "q\0"},
        {"account": "a\rb"},
        {"account": "a#b"},
        {"extra_directives": ["-l place=scatter\nrm -rf /"]},
    ],
)
def test_directives_reject_hostile_values(dialect: pp.Dialect, kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        pc.directives(make_task(), WORKDIR, dialect, **kwargs)


@pytest.mark.parametrize("workdir", ["rel/dir", "/a b", "/a\nb", "/a%j", "/a'b", "/a$(id)", ""])
def test_directives_reject_unsafe_workdirs(workdir: str) -> None:
    with pytest.raises(ValueError):
        pc.directives(make_task(), workdir, "torque")


def test_directives_reject_unvalidated_task_values() -> None:
    for fields in ({"queue": "q\n#PBS -u root"}, {"account": "a\nb"}, {"id": "t1\nx"}, {"id": "t 1"}):
        task = Task.model_construct(**{"id": "t1", "command": ["true"], **fields})
        with pytest.raises(ValueError):
            pc.directives(task, WORKDIR, "pbspro")


def test_directives_job_name_and_extras() -> None:
    lines = pc.directives(make_task(id="9lives"), WORKDIR, "pbspro", extra_directives=["-l place=scatter", "#PBS -r n"])
    assert lines[0] == "#PBS -N fem-9lives"  # PBS wants a leading letter: the fem- prefix gives one
    assert lines[-2:] == ["#PBS -l place=scatter", "#PBS -r n"]


# --- the template -------------------------------------------------------------------------------


def render(tmp_path: Path, task: Task, dialect: pp.Dialect) -> Job:
    job = Job(task=task, workdir=tmp_path / "work" / task.id)
    job.fem_dir.mkdir(parents=True)
    context = base_context(job)
    context["directives"] = pc.directives(task, job.workdir, dialect)
    job.script_path.write_text(make_environment().get_template("pbs.sh.j2").render(**context))
    return job


@pytest.mark.parametrize("dialect", ["pbspro", "torque"])
def test_template_renders_valid_sh(tmp_path: Path, dialect: pp.Dialect) -> None:
    task = make_task(
        command=["sh", "-c", "pwd > here.txt", "x", "$(id) `id` 'q' \"d\" ; | & \n {{ 1+1 }}"],
        env={"A": "b c", "B": "$(id)"},
        resources={"cpus": 2, "memory": "1G", "walltime": "00:05:00"},
    )
    job = render(tmp_path, task, dialect)
    lines = job.script_path.read_text().splitlines()
    assert lines[0] == "#!/bin/sh"
    directive_lines = [i for i, line in enumerate(lines) if line.startswith("#PBS")]
    assert directive_lines == list(range(1, len(directive_lines) + 1))
    first_command = next(i for i, line in enumerate(lines) if line.strip() and not line.lstrip().startswith("#"))
    assert max(directive_lines) < first_command
    result = subprocess.run(["sh", "-n", str(job.script_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    # PBS starts a job in $HOME: the script itself must get into the run dir
    subprocess.run(["sh", str(job.script_path)], capture_output=True, timeout=30, cwd="/")
    marker = read_marker(job.marker_path)
    assert marker is not None and marker.exit_code == 0
    assert (job.workdir / "here.txt").read_text().strip() == str(job.workdir)


# --- Debian's slurm-wlm-torque over the real Slurm (skipped when it is not up) ------------------


def pbs_up() -> bool:
    if not (shutil.which("qsub") and shutil.which("qstat") and shutil.which("sinfo")):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.pbs
def test_real_qsub_round_trip(tmp_path: Path) -> None:
    if not pbs_up():
        pytest.skip("slurm-wlm-torque's qsub over a running Slurm is not available here")
    task = make_task(
        id=f"pbscmds-{os.getpid()}-{time.time_ns()}",
        command=["sh", "-c", "pwd; exit 4"],
        resources={"cpus": 1, "memory": "64M", "walltime": "00:02:00"},
    )
    job = render(tmp_path, task, "torque")
    out_path, err_path = str(job.fem_dir / "scheduler.out"), str(job.fem_dir / "scheduler.err")
    submitted = subprocess.run(
        pc.qsub_argv(str(job.script_path), out_path, err_path), capture_output=True, text=True, timeout=30, cwd="/"
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = pc.parse_qsub(submitted.stdout)
    deadline = time.monotonic() + 60
    status = None
    while time.monotonic() < deadline:
        listing = subprocess.run(pc.qstat_argv("torque", [job_id]), capture_output=True, text=True, timeout=30)
        status = pp.parse_qstat_torque(listing.stdout).get(job_id)
        if status is not None and status.state.final:
            break
        time.sleep(0.5)
    else:
        subprocess.run(pc.qdel_argv(job_id), capture_output=True, timeout=30)
        pytest.fail(f"job {job_id} did not finish: {status}")
    assert status is not None and status.job_name == f"fem-{task.id}"
    assert (status.state, status.exit_code) == (State.COMPLETED, None)  # no exit_status here: marker decides
    marker = read_marker(job.marker_path)
    assert marker is not None and marker.exit_code == 4
    assert (job.fem_dir / "stdout").read_text().strip() == str(job.workdir)
    assert Path(out_path).exists()  # the command-line -o beat the wrapper's default
