"""Slurm over SSH with NO shared file system, through the real `fem-hpc serve` (issue 13).

The test bed (clusterkit.isolate): the cluster side is this host (a real sshd from sshkit, the
real single-node Slurm and its jobs); the service runs in a mount namespace of its own in which
the cluster's scratch dir, `remote_work_root`, is covered by an empty tmpfs. The service cannot
see one file of a remote work dir: inputs, job scripts, markers and outputs all cross the one
SSH connection. The tests check that from the service's own view (/proc/<pid>/root).
"""

from __future__ import annotations

import hashlib
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import services
from apptainerkit import calls, install_fake
from brokerkit import ServeProcess
from clusterkit import Runs, isolate, jobs_named, metric, metrics_text, rows, service_sees, slurm_over_ssh, wait_for
from gitkit import Repo
from sshkit import SSHD

pytestmark = [pytest.mark.ssh, pytest.mark.slurm, pytest.mark.rabbitmq, pytest.mark.slow]




def offcluster(tmp: Path, sshd: SSHD, **slurm: Any) -> tuple[ServeProcess, Path]:
    """The isolated service and the cluster's scratch (remote_work_root), which only the host sees."""
    hidden = tmp / "cluster"
    root = hidden / "scratch"
    root.mkdir(parents=True)
    serve = isolate(slurm_over_ssh(tmp, sshd, remote_work_root=str(root), **slurm), hidden)
    return serve, root


def remote_dirs(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.glob("*/*/*") if p.is_dir())


def test_twenty_tasks_and_a_failing_one_without_a_shared_file_system(sshd: SSHD, tmp_path: Path):
    serve, root = offcluster(tmp_path, sshd)
    # The remote work dirs go in the retention pass after the broker confirmed the results: often here.
    serve.config["retention"] = {"interval_seconds": 2}
    serve.start()
    node = serve.node
    tasks = {
        f"ok{i}-{node}": {"id": f"ok{i}-{node}", "outputs": ["res/**"], "user_id": "alice", "execution_id": "run1",
                          "command": ["sh", "-c", 'mkdir -p res/sub; echo "r $1" > res/out.txt; seq 1 "$2" > '
                                      'res/sub/seq.txt; ln -s /etc/hostname res/leak; echo "stdout $1"',
                                      "sh", str(i), str(1000 * (i + 1))]}
        for i in range(20)
    }
    fail = f"fail-{node}"
    tasks[fail] = {"id": fail, "user_id": "alice", "execution_id": "run1",
                   "command": ["sh", "-c", "echo broken >&2; exit 3"]}
    runs = Runs(node)
    try:
        runs.submit(tasks)
        seen_running = wait_for(lambda: remote_dirs(root), 60, "a work dir on the cluster")
        # The proof of "no shared file system": the service sees nothing where the cluster works.
        assert service_sees(serve, root.parent) == [], service_sees(serve, root.parent)
        assert (root / "alice" / "run1").is_dir() and seen_running
        results = runs.wait(list(tasks), 180, tmp_path / "out")
        text = metrics_text(serve)
        wait_for(lambda: remote_dirs(root) == [], 30, "the retention pass to remove the remote work dirs")
    finally:
        runs.close()
        serve.stop()
    log = serve.log()
    work = Path(serve.config["work_root"])
    for i in range(20):
        tid = f"ok{i}-{node}"
        r = results[tid]
        assert r.state == "COMPLETED", (tid, r.result, log[-3000:])
        out = tmp_path / "out" / tid / "outputs" / "res"
        assert (out / "out.txt").read_text() == f"r {i}\n"
        assert (out / "sub" / "seq.txt").read_text() == "".join(f"{n}\n" for n in range(1, 1000 * (i + 1) + 1))
        assert not (out / "leak").exists()  # the symlink out of the work dir was refused on the cluster
        assert r.result["stdout_tail"] == f"stdout {i}\n"
        assert (tmp_path / "out" / tid / "logs" / "stdout").read_text() == f"stdout {i}\n"
        # The archive came through SSH: the service's copy has the checksum the result names.
        archive = work / "alice" / "run1" / tid / ".fem" / "outputs.tar.gz"
        assert hashlib.sha256(archive.read_bytes()).hexdigest() == r.result["outputs"]["sha256"]
        assert r.result["outputs"]["size"] == archive.stat().st_size
        assert not (work / "alice" / "run1" / tid / "res").exists()  # outputs never appeared here unpacked
        assert len(jobs_named(f"fem-{tid}")) == 1
    failed = results[fail]
    assert (failed.state, failed.result["reason"], failed.result["exit_code"]) == ("FAILED", "EXIT_CODE", 3), \
        failed.result
    assert failed.result["stderr_tail"] == "broken\n"
    # One SSH connection for everything, and few round trips per task.
    assert sshd.accepted() == 1, sshd.log()
    assert metric(text, "fem_ssh_connects_total", host="127.0.0.1") == 1.0
    channels = metric(text, "fem_ssh_channels_total", host="127.0.0.1") or 0
    polls = metric(text, "fem_scheduler_calls_total", executor="slurm", kind="poll") or 0
    print(f"{channels:.0f} SSH round trips for {len(tasks)} tasks ({channels / len(tasks):.2f} per task, "
          f"{polls:.0f} squeue)")
    assert channels <= 3 * len(tasks) + polls + 120, channels  # + the 1 s marker cycles of the run


def test_git_source_and_a_container_in_the_batch_job(sshd: SSHD, tmp_path: Path):
    services.require("docker")
    services.require("registry")
    repo = Repo(tmp_path / "repo")
    commit = repo.commit({"tool/run.sh": 'echo "from git: $(cat data.txt)" > result.txt\n', "tool/data.txt": "42\n"})
    serve, root = offcluster(tmp_path, sshd, container={"runtime": "docker"})
    serve.config["policy"]["images"] = ["127.0.0.1:5000/*"]
    serve.start()
    node = serve.node
    tasks = {
        f"git-{node}": {"id": f"git-{node}", "source": {"git": repo.url, "commit": commit, "path": "tool"},
                        "command": ["sh", "run.sh"], "outputs": ["tool/result.txt"]},  # relative to the work dir
        f"box-{node}": {"id": f"box-{node}", "image": services.TEST_IMAGE, "outputs": ["where.txt"],
                        "command": ["sh", "-c", "pwd > where.txt; cat /etc/os-release 2>/dev/null | head -1; "
                                    "busybox | head -1"]},
    }
    runs = Runs(node)
    try:
        runs.submit(tasks)
        results = runs.wait(list(tasks), 180, tmp_path / "out")
    finally:
        runs.close()
        serve.stop()
    log = serve.log()
    git = results[f"git-{node}"]
    assert git.state == "COMPLETED", (git.result, log[-3000:])
    assert (tmp_path / "out" / f"git-{node}" / "outputs" / "tool" / "result.txt").read_text() == "from git: 42\n"
    box = results[f"box-{node}"]
    assert box.state == "COMPLETED", (box.result, log[-3000:])
    where = (tmp_path / "out" / f"box-{node}" / "outputs" / "where.txt").read_text().strip()
    assert where == str(root / "anonymous" / f"box-{node}" / f"box-{node}")  # it ran in the cluster's dir
    assert "BusyBox" in box.result["stdout_tail"]
    assert sshd.accepted() == 1


def test_sigkill_of_the_service_mid_run_loses_nothing_and_duplicates_nothing(sshd: SSHD, tmp_path: Path):
    serve, root = offcluster(tmp_path, sshd)
    serve.start()
    node = serve.node
    tasks = {f"k{i}-{node}": {"id": f"k{i}-{node}", "outputs": ["out.txt"],
                              "command": ["sh", "-c", 'sleep 4; echo "k $1" > out.txt', "sh", str(i)]}
             for i in range(12)}
    runs = Runs(node)
    try:
        runs.submit(tasks)
        # Killed while submits are still going on (some tasks have a job, some are being staged).
        wait_for(lambda: sum(1 for r in rows(serve).values() if r["native_id"]) >= 3, 60, "the first jobs")
        serve.stop(signal.SIGKILL)
        states = {t: r["state"] for t, r in rows(serve).items()}
        time.sleep(1)
        serve.start()
        results = runs.wait(list(tasks), 180, tmp_path / "out")
    finally:
        runs.close()
        serve.stop()
    log = serve.log()
    assert "carrying on with" in log
    for tid, r in results.items():
        assert r.state == "COMPLETED", (tid, states, r.result, log[-3000:])
        assert (tmp_path / "out" / tid / "outputs" / "out.txt").read_text() == f"k {tid[1:].split('-')[0]}\n"
        assert len(jobs_named(f"fem-{tid}")) == 1, (tid, jobs_named(f"fem-{tid}"), states)
    print(f"states at the SIGKILL: {sorted(states.values())}")


def test_apptainer_image_pulled_into_the_clusters_sif_cache(sshd: SSHD, tmp_path: Path):
    """apptainer is not installable here: the FAKE binary (tests/fakes/apptainer, it records its
    argv and writes a SIF-shaped file) stands on the cluster side, outside the service's view."""
    fakebin = tmp_path / "cluster-bin"  # the cluster's own software, not under the hidden scratch
    fake = install_fake(fakebin)
    serve, root = offcluster(tmp_path, sshd, container={"runtime": "apptainer", "binary": str(fake)})
    serve.config["policy"]["images"] = ["127.0.0.1:5000/*"]
    serve.start()
    node = serve.node
    tasks = {f"sif{i}-{node}": {"id": f"sif{i}-{node}", "image": services.TEST_IMAGE, "outputs": ["o.txt"],
                                "command": ["sh", "-c", "pwd > o.txt"]} for i in range(3)}
    runs = Runs(node)
    try:
        runs.submit(tasks)
        results = runs.wait(list(tasks), 120, tmp_path / "out")
        sees = service_sees(serve, root.parent)
    finally:
        runs.close()
        serve.stop()
    assert sees == []
    for tid, r in results.items():
        assert r.state == "COMPLETED", (r.result, serve.log()[-3000:])
        where = (tmp_path / "out" / tid / "outputs" / "o.txt").read_text().strip()
        assert where == str(root / "anonymous" / tid / tid)
    pulls = calls(fakebin, "pull")
    assert len(pulls) == 1, pulls  # three tasks, one pull: the flock on the cluster side
    sif = Path(pulls[0]["argv"][-2]).name
    assert pulls[0]["argv"][-1] == f"docker://{services.TEST_IMAGE}"
    cached = sorted(p.name for p in (root / ".sif").glob("*.sif"))
    assert len(cached) == 1 and sif.startswith(".") and sif.endswith(".tmp.sif")  # pulled to a temp, renamed
    execs = calls(fakebin, "exec")
    assert len(execs) == 3 and all(str(root / ".sif" / cached[0]) in e["argv"] for e in execs), execs


@pytest.mark.pbs
def test_a_torque_pbs_task_without_a_shared_file_system(sshd: SSHD, tmp_path: Path):
    services.require("pbs")
    hidden = tmp_path / "cluster"
    root = hidden / "scratch"
    root.mkdir(parents=True)
    serve = slurm_over_ssh(tmp_path, sshd, remote_work_root=str(root), dialect="torque")
    serve.config["executors"] = {"pbs": {k: v for k, v in serve.config["executors"]["slurm"].items()
                                         if k != "partition"}}
    serve.config["default_executor"] = "pbs"
    isolate(serve, hidden).start()
    node = serve.node
    tid = f"pbs-{node}"
    runs = Runs(node)
    try:
        runs.submit({tid: {"id": tid, "outputs": ["out.txt"], "command": ["sh", "-c", "echo pbs > out.txt; echo ok"]}})
        r = runs.wait([tid], 120, tmp_path / "out")[tid]
    finally:
        runs.close()
        serve.stop()
    assert r.state == "COMPLETED", (r.result, serve.log()[-3000:])
    assert (tmp_path / "out" / tid / "outputs" / "out.txt").read_text() == "pbs\n"
    assert r.result["stdout_tail"] == "ok\n"
    assert sshd.accepted() == 1
