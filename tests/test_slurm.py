"""The slurm and pbs executors against the real Slurm 22.05 and Debian's slurm-wlm-torque."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import services
from brokerkit import BROKER_URL, EventTap, ServeProcess, unique_node

from fem_hpc.client import Client
from fem_hpc.executors import site_from_dict
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State

pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def _slurm():
    services.require("slurm")


def site_config(tmp: Path, **executors: Any) -> dict[str, Any]:
    return {
        "node": unique_node("sl"),
        "state_dir": str(tmp / "state"),
        "work_root": str(tmp / "work"),
        "default_executor": "slurm",
        "executors": executors or {"slurm": {"partition": "debug", "poll": {"min_seconds": 1},
                                             "lost_grace_seconds": 10}},
        "policy": {"max_resources": {"cpus": 4, "memory": "4G", "walltime": "01:00:00"}},
    }


@pytest.fixture
def agent(tmp_path: Path):
    agents: list[Agent] = []

    def make(cfg: dict[str, Any] | None = None) -> Agent:
        site = site_from_dict(cfg or site_config(tmp_path))
        a = Agent(site, Journal(site.journal_path, outbox=False))
        agents.append(a)
        return a

    yield make
    for a in agents:
        a.close()


def run_all(a: Agent, tasks: list[dict[str, Any]], timeout: float = 120) -> dict[str, Any]:
    for t in tasks:
        res = a.intake(t)
        assert res.record is not None, res.errors
    out = {}
    deadline = time.monotonic() + timeout
    for t in tasks:
        rec = a.wait(t["id"], max(1.0, deadline - time.monotonic()))
        assert rec is not None and rec.final, (t["id"], rec.state if rec else None)
        out[t["id"]] = rec
    return out


def squeue_names() -> str:
    return subprocess.run(["squeue", "-h", "-t", "all", "-o", "%j"], capture_output=True, text=True).stdout


def test_exit_codes_and_outputs(agent, tmp_path):
    a = agent()
    recs = run_all(a, [
        {"id": "s-ok", "command": ["sh", "-c", "echo hi > o.txt; echo $SLURM_JOB_ID"], "outputs": ["o.txt"],
         "resources": {"cpus": 2, "memory": "256M"}},
        {"id": "s-fail", "command": ["sh", "-c", "exit 7"]},
        {"id": "s-missing", "command": ["/no/such/binary"]},
    ])
    ok = recs["s-ok"]
    assert ok.state == State.COMPLETED and ok.exit_code == 0 and ok.native_id
    assert (Path(ok.workdir) / "o.txt").read_text() == "hi\n"
    assert (Path(ok.workdir) / ".fem/stdout").read_text().strip() == ok.native_id
    assert recs["s-fail"].state == State.FAILED and recs["s-fail"].exit_code == 7
    assert recs["s-fail"].reason == "EXIT_CODE"
    assert recs["s-missing"].state == State.FAILED and recs["s-missing"].exit_code == 127
    # The job carried the task's resources.
    script = (Path(ok.workdir) / ".fem/job.sh").read_text()
    assert "#SBATCH --cpus-per-task=2" in script and "#SBATCH --mem=256M" in script
    assert "#SBATCH --job-name=fem-s-ok" in script


def test_cancel_pending_and_running(agent, tmp_path):
    cfg = site_config(tmp_path)
    # A second instance of the slurm executor whose jobs may only start in an hour: they pend.
    cfg["executors"]["later"] = {"type": "slurm", "partition": "debug", "poll": {"min_seconds": 1},
                                 "extra_directives": ["--begin=now+3600"]}
    a = agent(cfg)
    a.intake({"id": "s-run", "command": ["sleep", "300"]})
    a.intake({"id": "s-pend", "command": ["sleep", "300"], "executor": "later"})
    # The pending reason shows in the task's message (what `fem-hpc status` prints).
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and not (
            a.journal.get("s-run").state == State.RUNNING and "BeginTime" in (a.journal.get("s-pend").message or "")):
        time.sleep(0.2)
    assert a.journal.get("s-pend").state == State.SUBMITTED
    assert a.journal.get("s-pend").message == "pending: BeginTime"
    a.cancel("s-run")
    a.cancel("s-pend")
    for tid in ("s-run", "s-pend"):
        rec = a.wait(tid, 60)
        assert rec.state == State.CANCELLED, (tid, rec.state, rec.message)
    active = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout.split()
    assert a.journal.get("s-run").native_id not in active and a.journal.get("s-pend").native_id not in active


def test_fifty_concurrent_jobs_batched_polls(agent):
    a = agent()
    tasks = [{"id": f"c{i:02d}", "command": ["sh", "-c", f"sleep 1; echo {i}"]} for i in range(50)]
    start = time.monotonic()
    recs = run_all(a, tasks, timeout=240)
    assert all(r.state == State.COMPLETED for r in recs.values())
    assert all(Path(r.workdir, ".fem/stdout").read_text() == f"{int(r.id[1:])}\n" for r in recs.values())
    executor = a.executors.start("slurm")[0]
    elapsed = time.monotonic() - start
    # One squeue per cycle for all jobs, never one per job.
    assert executor.calls.get("squeue", 0) <= elapsed / executor.settings.poll.min_seconds + 5
    assert executor.calls.get("sbatch") == 50
    assert set(executor.calls) <= {"sbatch", "squeue"}


@pytest.mark.slow
def test_walltime_is_timeout(agent):
    a = agent()
    recs = run_all(a, [{"id": "s-wall", "command": ["sleep", "600"], "resources": {"walltime": "00:00:30"}}],
                   timeout=200)
    rec = recs["s-wall"]
    assert rec.state == State.FAILED and rec.reason == "TIMEOUT", (rec.reason, rec.message)


def _restart_slurmctld_after(seconds: float, while_down=None) -> None:
    subprocess.run(["pkill", "-x", "slurmctld"], check=False)
    started = time.monotonic()
    try:
        if while_down is not None:
            while_down()
        time.sleep(max(0.0, seconds - (time.monotonic() - started)))
    finally:
        subprocess.run(["slurmctld"], check=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if "is UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout:
            return
        time.sleep(0.5)
    raise AssertionError("slurmctld did not come back")


@pytest.mark.slow
def test_slurmctld_down_for_20s_is_no_false_failure(agent, tmp_path, cli, write_config):
    cfg = site_config(tmp_path)
    a = agent(cfg)
    for i in range(5):
        a.intake({"id": f"down{i}", "command": ["sh", "-c", "sleep 8; echo fine"]})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(
            a.journal.get(f"down{i}").state == State.RUNNING for i in range(5)):
        time.sleep(0.3)
    doctor: list[subprocess.CompletedProcess[str]] = []
    # While slurmctld is down, `fem-hpc doctor` says so (and exits 1).
    _restart_slurmctld_after(20, lambda: doctor.append(cli("doctor", "--config", write_config(cfg), timeout=120)))
    assert doctor[0].returncode == 1
    slurm_line = next(line for line in doctor[0].stdout.splitlines() if "slurm controller" in line)
    assert "ERROR" in slurm_line, doctor[0].stdout
    after = cli("doctor", "--config", write_config(cfg), timeout=120)
    assert "ERROR" not in next(line for line in after.stdout.splitlines() if "slurm controller" in line)
    for i in range(5):
        rec = a.wait(f"down{i}", 120)
        assert rec.state == State.COMPLETED, (rec.id, rec.state, rec.message)
    assert a.executors.start("slurm")[0].calls.get("squeue", 0) > 0
    assert a.executors.start("slurm")[1].poll_errors > 0  # it did see the outage, and failed nothing


def test_restart_mid_run_readopts_every_job_and_submits_none_twice(tmp_path):
    services.require("rabbitmq")
    node = unique_node("slr")
    run = node.split("-", 1)[1]  # job names unique to this run: squeue keeps ended jobs for MinJobAge
    tap = EventTap(node)
    extra = {"default_executor": "slurm",
             "executors": {"slurm": {"partition": "debug", "poll": {"min_seconds": 1}}}}
    s = ServeProcess(tmp_path, node, extra).start()
    try:
        with Client(BROKER_URL, node) as c:
            for i in range(6):
                c.submit({"id": f"{run}-{i}", "command": ["sh", "-c", "sleep 6; echo done"]}, wait=False)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and squeue_names().count(f"fem-{run}-") < 6:
            time.sleep(0.3)
        time.sleep(1)
        s.kill()  # no goodbye: the journal is all the next process has
        s2 = ServeProcess(tmp_path, node, extra).start()
        try:
            for i in range(6):
                tap.drain(until_result=f"{run}-{i}", timeout=90)
            assert all(tap.result(f"{run}-{i}")["state"] == "COMPLETED" for i in range(6))
            assert "re-adopting" in s2.log()
        finally:
            s2.stop()
        # Every task had exactly one Slurm job.
        names = squeue_names().split()
        for i in range(6):
            assert names.count(f"fem-{run}-{i}") == 1, names
    finally:
        s.stop()
        tap.delete()


def test_intent_without_native_id_is_found_by_name_not_resubmitted(agent, tmp_path):
    """A crash between sbatch and the journal commit: the restart finds the job by name."""
    a = agent()
    tid = unique_node("intent")  # unique: squeue keeps ended jobs (and their names) for MinJobAge
    a.intake({"id": tid, "command": ["sh", "-c", "sleep 3; echo once >> ../../count"]})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and a.journal.get(tid).native_id is None:
        time.sleep(0.1)
    a.close()
    # Forget the native id, as if the process died right after sbatch.
    a.journal.update(tid, native_id=None, state="STAGING_IN")
    b = agent()
    assert b.recover() == 1
    rec = b.wait(tid, 60)
    assert rec.state == State.COMPLETED
    assert squeue_names().split().count(f"fem-{tid}") == 1
    assert b.executors.start("slurm")[0].calls.get("sbatch", 0) == 0


@pytest.mark.pbs
def test_torque_path_on_slurm_wlm_torque(agent, tmp_path):
    cfg = site_config(tmp_path, pbs={"dialect": "torque", "poll": {"min_seconds": 1}})
    cfg["default_executor"] = "pbs"
    a = agent(cfg)
    recs = run_all(a, [
        {"id": "p-ok", "command": ["sh", "-c", "echo pbs > p.txt"], "outputs": ["p.txt"],
         "resources": {"cpus": 1, "memory": "128M", "walltime": "00:05:00"}},
        {"id": "p-fail", "command": ["sh", "-c", "exit 4"]},
    ])
    assert recs["p-ok"].state == State.COMPLETED
    assert (Path(recs["p-ok"].workdir) / "p.txt").read_text() == "pbs\n"
    assert recs["p-fail"].state == State.FAILED and recs["p-fail"].exit_code == 4
    script = (Path(recs["p-ok"].workdir) / ".fem/job.sh").read_text()
    assert "#PBS -N fem-p-ok" in script and "#PBS -l walltime=00:05:00" in script
    executor = a.executors.start("pbs")[0]
    assert set(executor.calls) <= {"qsub", "qstat"}
    # cancel through qdel
    a.intake({"id": "p-cancel", "command": ["sleep", "300"]})
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and a.journal.get("p-cancel").state != State.RUNNING:
        time.sleep(0.2)
    a.cancel("p-cancel")
    assert a.wait("p-cancel", 60).state == State.CANCELLED


def test_serve_runs_slurm_tasks_end_to_end(tmp_path):
    services.require("rabbitmq")
    node = unique_node("sle")
    s = ServeProcess(tmp_path, node, {"default_executor": "slurm",
                                      "executors": {"slurm": {"partition": "debug"},
                                                    "pbs": {"dialect": "torque"}}}).start()
    try:
        with Client(BROKER_URL, node) as c:
            res = c.submit({"id": "e2e1", "command": ["sh", "-c", "echo slurm-out > r.txt"], "outputs": ["r.txt"]},
                           timeout=120, outputs_dir=tmp_path / "out")
            pbs = c.submit({"id": "e2e-pbs", "executor": "pbs", "command": ["sh", "-c", "echo pbs-out > r.txt"],
                            "outputs": ["r.txt"]}, timeout=120, outputs_dir=tmp_path / "pbs-out")
        assert res.state == "COMPLETED" and res.result["native_id"]
        assert (tmp_path / "out/outputs/r.txt").read_text() == "slurm-out\n"
        states = [e["state"] for e in res.events if e["type"] == "status"]
        assert states == ["RECEIVED", "STAGING_IN", "SUBMITTED", "RUNNING", "STAGING_OUT", "COMPLETED"]
        assert pbs.state == "COMPLETED" and pbs.result["native_id"]
        assert (tmp_path / "pbs-out/outputs/r.txt").read_text() == "pbs-out\n"
    finally:
        assert s.stop(signal.SIGTERM) == 0


def test_status_shows_running_slurm_jobs_while_serving(tmp_path, cli):
    services.require("rabbitmq")
    node = unique_node("sls")
    s = ServeProcess(tmp_path, node, {"default_executor": "slurm",
                                      "executors": {"slurm": {"partition": "debug"}}}).start()
    try:
        with Client(BROKER_URL, node) as c:
            c.submit({"id": "st1", "command": ["sleep", "30"]}, wait=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                out = cli("status", "--config", s.config_path, "--json")
                rows = json.loads(out.stdout or '{"tasks": []}')["tasks"]
                if rows and rows[0]["state"] == "RUNNING":
                    break
                time.sleep(0.5)
            assert rows[0]["id"] == "st1" and rows[0]["state"] == "RUNNING" and rows[0]["native_id"]
            table = cli("status", "--config", s.config_path).stdout
            assert "st1" in table and "RUNNING" in table and rows[0]["native_id"] in table
            c.cancel("st1")
    finally:
        s.stop()


@pytest.mark.docker
def test_slurm_job_runs_its_command_in_a_docker_container(agent, tmp_path):
    services.require("docker")
    data = tmp_path / "data"
    data.mkdir()
    (data / "in.txt").write_text("from-volume\n")
    cfg = site_config(tmp_path, slurm={"partition": "debug", "poll": {"min_seconds": 1},
                                       "container": {"runtime": "docker"}})
    cfg["volumes"] = {"ds": {"path": str(data), "mode": "ro"}}
    cfg["policy"]["images"] = ["127.0.0.1:5000/*"]
    a = agent(cfg)
    task = {"id": "s-ctr", "image": services.TEST_IMAGE, "env": {"GREETING": "hi $(not run)"},
            "volumes": [{"name": "ds", "target": "/data"}], "outputs": ["o.txt"],
            "command": ["sh", "-c", "cat /data/in.txt > o.txt; echo \"$GREETING\" >> o.txt; "
                        "cat /etc/os-release 2>/dev/null | head -1 >> o.txt; touch /data/x || echo ro >> o.txt"]}
    rec = run_all(a, [task], timeout=120)["s-ctr"]
    assert rec.state == State.COMPLETED, (rec.message, Path(rec.workdir, ".fem/stderr").read_text())
    lines = (Path(rec.workdir) / "o.txt").read_text().splitlines()
    assert lines[0] == "from-volume" and lines[1] == "hi $(not run)" and lines[-1] == "ro"
    assert not (data / "x").exists()
    script = (Path(rec.workdir) / ".fem/job.sh").read_text()
    assert "'docker' 'run'" in script or "docker run" in script.replace("'", "")
    # The container is gone afterwards.
    left = subprocess.run(["docker", "ps", "-aq", "--filter", "label=fem.task_id=s-ctr"], capture_output=True,
                          text=True).stdout.strip()
    assert left == ""
