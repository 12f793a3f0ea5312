"""The docker executor on the real daemon, with the test image from the local registry.

Every test uses its own node name, so the `fem.node` label tells its containers apart from those
of any other test running at the same time, and every test checks that none is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import services

from fem_hpc.executors import registry, site_from_dict
from fem_hpc.executors.base import Job
from fem_hpc.executors.docker import DockerExecutor
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import Reason, State, Task

pytestmark = pytest.mark.docker

TEST_IMAGE = services.TEST_IMAGE
AUTH_IMAGE = services.AUTH_TEST_IMAGE
AUTH_USER = services.AUTH_USER
AUTH_PASSWORD = services.AUTH_PASSWORD


@pytest.fixture(autouse=True)
def _docker() -> None:
    services.require("docker")
    services.require("registry")  # the test image is pulled from it when the daemon lacks it


@pytest.fixture
def node() -> str:
    return f"dk{uuid.uuid4().hex[:10]}"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "input.txt").write_text("read-only volume data\n")
    d.chmod(0o755)
    return d


def site_dict(tmp_path: Path, node: str, data_dir: Path, **docker: Any) -> dict[str, Any]:
    return {
        "node": node,
        "state_dir": str(tmp_path / "state"),
        "work_root": str(tmp_path / "work"),
        "default_executor": "docker",
        "executors": {"docker": {"stop_grace_seconds": 2, **docker}},
        "volumes": {"data": {"path": str(data_dir), "mode": "ro"}},
        "policy": {"images": ["127.0.0.1:*"], "max_resources": {"gpus": 4}},
    }


def containers(*labels: str) -> list[str]:
    """`docker ps -a` ids of the containers carrying every one of the labels."""
    argv = ["docker", "ps", "-a", "-q"]
    for label in labels:
        argv += ["--filter", f"label={label}"]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout.split()


@pytest.fixture(autouse=True)
def _no_container_left(node: str):
    yield
    left = containers(f"fem.node={node}")
    if left:
        subprocess.run(["docker", "rm", "-f", *left], capture_output=True, timeout=60)
    assert not left, f"containers left behind: {left}"


def task(task_id: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "image": TEST_IMAGE, "command": command, **extra}


def wait_state(agent: Agent, task_id: str, state: State, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rec = agent.journal.get(task_id)
        if rec is not None and (rec.state == state or rec.final):
            break
        time.sleep(0.05)
    rec = agent.journal.get(task_id)
    assert rec is not None and rec.state == state, f"{task_id}: {rec and rec.state} ({rec and rec.message})"


def new_agent(site_cfg: dict[str, Any]) -> Agent:
    site = site_from_dict(site_cfg)
    return Agent(site, Journal(site.journal_path, outbox=False))


# -- through `fem-hpc run` ------------------------------------------------------------------------
def test_outputs_written_by_the_non_root_user(tmp_path, node, data_dir, write_config, write_task, cli):
    cfg = write_config(site_dict(tmp_path, node, data_dir))
    t = write_task(task("out1", ["sh", "-c", "mkdir result && id -u > uid.txt && "
                                 "printf %s \"$GREETING\" > result/greeting.txt && "
                                 "cat /data/input.txt > result/copy.txt && pwd"],
                        env={"GREETING": "hello 'world' $(not expanded)"}, outputs=["result/*", "uid.txt"],
                        volumes=[{"name": "data", "target": "/data", "mode": "ro"}]))
    res = cli("run", "--config", cfg, t, "--outputs", tmp_path / "out", timeout=120)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    assert (out / "outputs" / "result" / "greeting.txt").read_text() == "hello 'world' $(not expanded)"
    assert (out / "outputs" / "result" / "copy.txt").read_text() == "read-only volume data\n"
    uid = int((out / "outputs" / "uid.txt").read_text())
    assert uid != 0
    assert (out / "logs" / "stdout").read_text() == "/fem/work\n"
    workdir = tmp_path / "work" / "anonymous" / "out1" / "out1"
    expected_uid = 65534 if os.geteuid() == 0 else os.geteuid()
    assert uid == expected_uid
    assert (workdir / "result" / "greeting.txt").stat().st_uid == expected_uid  # written inside, by that user


def test_readonly_volume_cannot_be_written(tmp_path, node, data_dir, write_config, write_task, cli):
    cfg = write_config(site_dict(tmp_path, node, data_dir))
    t = write_task(task("ro1", ["sh", "-c", "cat /data/input.txt > seen.txt && echo x > /data/written.txt"],
                        volumes=[{"name": "data", "target": "/data"}], outputs=["seen.txt"]))
    res = cli("run", "--config", cfg, t, "--outputs", tmp_path / "out", timeout=120)
    assert res.returncode != 0
    assert "reason: EXIT_CODE" in res.stderr
    assert (tmp_path / "out" / "outputs" / "seen.txt").read_text() == "read-only volume data\n"
    assert "Read-only file system" in (tmp_path / "out" / "logs" / "stderr").read_text()
    assert not (data_dir / "written.txt").exists()


def test_exit_code_3(tmp_path, node, data_dir, write_config, write_task, cli):
    cfg = write_config(site_dict(tmp_path, node, data_dir))
    t = write_task(task("ec3", ["sh", "-c", "echo failing >&2; exit 3"]))
    res = cli("run", "--config", cfg, t, timeout=120)
    assert res.returncode == 3, res.stderr
    assert "FAILED" in res.stderr and "reason: EXIT_CODE" in res.stderr
    site = site_from_dict(site_dict(tmp_path, node, data_dir))
    rec = Journal(site.journal_path, outbox=False).get("ec3")
    assert (rec.state, rec.reason, rec.exit_code) == (State.FAILED, "EXIT_CODE", 3)
    assert json.loads(rec.result_json)["stderr_tail"] == "failing\n"


def test_pull_with_credentials_not_logged(tmp_path, node, data_dir, write_config, write_task, cli):
    services.require("registry-auth")
    cfg_dict = site_dict(tmp_path, node, data_dir, pull_policy="always")
    cfg_dict["registries"] = {"127.0.0.1:5001": {"username": AUTH_USER, "password": AUTH_PASSWORD}}
    cfg = write_config(cfg_dict)
    t = write_task({"id": "auth1", "image": AUTH_IMAGE, "command": ["cat", "/etc/fem-testbed"]})
    res = cli("run", "--config", cfg, t, "--verbose", timeout=180)
    assert res.returncode == 0, res.stderr
    assert "/images/create" in res.stderr  # the debug log shows the pull request itself
    assert AUTH_PASSWORD not in res.stderr + res.stdout
    for root in (tmp_path / "state", tmp_path / "work"):
        for path in root.rglob("*"):
            if path.is_file():
                assert AUTH_PASSWORD.encode() not in path.read_bytes(), path
    # and a wrong password: a clear STAGE_IN failure, still without the password
    cfg_dict["registries"]["127.0.0.1:5001"]["password"] = "wrong-password-xyz"
    cfg2 = write_config(cfg_dict)
    t2 = write_task({"id": "auth2", "image": AUTH_IMAGE, "command": ["true"]})
    res = cli("run", "--config", cfg2, t2, "--verbose", timeout=180)
    assert res.returncode == 1
    assert "reason: STAGE_IN" in res.stderr
    assert f"cannot pull image {AUTH_IMAGE}" in res.stderr
    assert "wrong-password-xyz" not in res.stderr + res.stdout


def test_missing_image_fails_stage_in(tmp_path, node, data_dir, write_config, write_task, cli):
    cfg = write_config(site_dict(tmp_path, node, data_dir))
    t = write_task({"id": "miss1", "image": "127.0.0.1:5000/fem/nonexistent:1", "command": ["true"]})
    res = cli("run", "--config", cfg, t, timeout=120)
    assert res.returncode == 1
    assert "reason: STAGE_IN" in res.stderr
    assert "cannot pull image 127.0.0.1:5000/fem/nonexistent:1" in res.stderr
    assert "not found" in res.stderr or "manifest unknown" in res.stderr


# -- through the Agent -----------------------------------------------------------------------------
def test_cancel_leaves_no_container(tmp_path, node, data_dir):
    agent = new_agent(site_dict(tmp_path, node, data_dir))
    try:
        agent.intake(task("can1", ["sleep", "300"], volumes=[{"name": "data", "target": "/data"}],
                          resources={"cpus": 1, "memory": "64M"}))
        wait_state(agent, "can1", State.RUNNING)
        (cid,) = containers(f"fem.node={node}", "fem.task_id=can1")
        info = json.loads(subprocess.run(["docker", "inspect", cid], capture_output=True, text=True,
                                         check=True).stdout)[0]
        host = info["HostConfig"]
        assert host["Privileged"] is False and host["CapDrop"] == ["ALL"]
        assert host["SecurityOpt"] == ["no-new-privileges"] and host["NetworkMode"] == "none"
        assert host["NanoCpus"] == 1_000_000_000 and host["Memory"] == 64 * 1024 * 1024
        assert host["AutoRemove"] is False
        assert info["Config"]["Labels"]["fem.task_id"] == "can1" and info["Config"]["Labels"]["fem.node"] == node
        assert info["Config"]["User"] != "" and not info["Config"]["User"].startswith("0")
        mounts = {m["Destination"]: m for m in info["Mounts"]}
        assert mounts["/fem/work"]["RW"] is True and mounts["/data"]["RW"] is False
        started = time.monotonic()
        agent.cancel("can1")
        rec = agent.wait("can1", 30)
        assert rec is not None and rec.state == State.CANCELLED
        assert time.monotonic() - started < 10  # sleep obeys SIGTERM, no wait for the kill
        assert containers(f"fem.node={node}", "fem.task_id=can1") == []
    finally:
        agent.close()


def test_cancel_of_a_command_ignoring_sigterm_is_killed_after_grace(tmp_path, node, data_dir):
    agent = new_agent(site_dict(tmp_path, node, data_dir, stop_grace_seconds=1))
    try:
        agent.intake(task("can2", ["sh", "-c", "trap '' TERM; while true; do sleep 1; done"]))
        wait_state(agent, "can2", State.RUNNING)
        agent.cancel("can2")
        rec = agent.wait("can2", 30)
        assert rec is not None and rec.state == State.CANCELLED
        assert containers(f"fem.node={node}", "fem.task_id=can2") == []
    finally:
        agent.close()


def test_walltime_timeout(tmp_path, node, data_dir):
    agent = new_agent(site_dict(tmp_path, node, data_dir))
    try:
        agent.intake(task("wall1", ["sleep", "300"], resources={"walltime": "00:00:02"}))
        rec = agent.wait("wall1", 40)
        assert rec is not None and rec.final
        assert (rec.state, rec.reason) == (State.FAILED, Reason.TIMEOUT.value), rec.message
        assert "walltime 00:00:02 exceeded" in (rec.message or "")
        assert containers(f"fem.node={node}", "fem.task_id=wall1") == []
    finally:
        agent.close()


def test_readopted_by_label_after_restart(tmp_path, node, data_dir):
    cfg = site_dict(tmp_path, node, data_dir)
    first = new_agent(cfg)
    first.intake(task("re1", ["sh", "-c", "sleep 3; echo survived > done.txt"]))
    wait_state(first, "re1", State.RUNNING)
    native = first.journal.get("re1").native_id
    first.close()  # the service stops; the container keeps running
    (cid,) = containers(f"fem.node={node}", "fem.task_id=re1")
    assert native.startswith(cid)

    second = new_agent(cfg)
    try:
        ex = second.executors.start("docker")[0]
        rec = second.journal.get("re1")
        assert ex.find_by_name(Job(task=rec.task, workdir=Path(rec.workdir))) == native
        assert second.recover() == 1
        rec = second.wait("re1", 30)
        assert rec is not None and rec.state == State.COMPLETED, rec.message
        assert (Path(rec.workdir) / "done.txt").read_text() == "survived\n"
        assert containers(f"fem.node={node}", "fem.task_id=re1") == []
    finally:
        second.close()


def test_intent_without_native_id_readopts_by_label(tmp_path, node, data_dir):
    """A crash between the submit and the journalling of its native id: the restarted agent finds
    the container by its labels instead of starting a second one."""
    cfg = site_dict(tmp_path, node, data_dir)
    first = new_agent(cfg)
    first.intake(task("int1", ["sh", "-c", "sleep 3; echo once >> runs.txt"]))
    wait_state(first, "int1", State.RUNNING)
    first.close()
    first.journal.update("int1", native_id=None, intent=1, state=State.STAGING_IN.value)
    second = new_agent(cfg)
    try:
        assert second.recover() == 1
        rec = second.wait("int1", 30)
        assert rec is not None and rec.state == State.COMPLETED, rec.message
        assert (Path(rec.workdir) / "runs.txt").read_text() == "once\n"  # ran once, not twice
        messages = [t["message"] for t in second.journal.transitions("int1")]
        assert "re-adopted after a restart" in messages
    finally:
        second.close()


def test_created_but_never_started_container_is_replaced(tmp_path, node, data_dir):
    site = site_from_dict(site_dict(tmp_path, node, data_dir))
    ex = registry.create("docker", site)
    t = Task.model_validate(task("cr1", ["true"]))
    job = Job(task=t, workdir=site.work_root / "cr1")
    job.fem_dir.mkdir(parents=True)
    ex.stage_in(job)
    client = ex._client()
    client.containers.create(**ex._create_args(job))  # created, never started (a crash before start)
    assert len(containers(f"fem.node={node}", "fem.task_id=cr1")) == 1
    try:
        assert ex.find_by_name(job) is None  # nothing ran: the agent may submit again
        assert containers(f"fem.node={node}", "fem.task_id=cr1") == []
    finally:
        ex.close()


def test_explicit_user_owns_the_work_dir(tmp_path, node, data_dir):
    if os.geteuid() != 0:
        pytest.skip("handing the work dir to another uid needs a root service")
    agent = new_agent(site_dict(tmp_path, node, data_dir, user="4321:4322"))
    try:
        agent.intake(task("usr1", ["sh", "-c", "id -u; id -g; echo x > mine.txt"]))
        rec = agent.wait("usr1", 30)
        assert rec is not None and rec.state == State.COMPLETED, rec.message
        wd = Path(rec.workdir)
        assert (wd / ".fem" / "stdout").read_text() == "4321\n4322\n"
        st = (wd / "mine.txt").stat()
        assert (st.st_uid, st.st_gid) == (4321, 4322)
    finally:
        agent.close()


def test_gpus_refused_when_disabled(tmp_path, node, data_dir):
    agent = new_agent(site_dict(tmp_path, node, data_dir, gpus=False))
    try:
        agent.intake(task("gpu1", ["true"], resources={"gpus": 1}))
        rec = agent.wait("gpu1", 30)
        assert (rec.state, rec.reason) == (State.FAILED, "STAGE_IN")
        assert "does not pass GPUs" in rec.message
    finally:
        agent.close()


def test_volume_target_over_the_work_mount_fails_stage_in(tmp_path, node, data_dir):
    agent = new_agent(site_dict(tmp_path, node, data_dir))
    try:
        agent.intake(task("hide1", ["true"], volumes=[{"name": "data", "target": "/fem"}]))
        rec = agent.wait("hide1", 30)
        assert (rec.state, rec.reason) == (State.FAILED, "STAGE_IN")
        assert "would hide the work dir mounted at /fem/work" in rec.message
    finally:
        agent.close()


def test_host_network_needs_permission(tmp_path, node, data_dir):
    from fem_hpc.config import ConfigError

    with pytest.raises(ConfigError, match="allow_host_network"):
        site_from_dict(site_dict(tmp_path, node, data_dir, network="host"))
    site_from_dict(site_dict(tmp_path, node, data_dir, network="host", allow_host_network=True))


# -- the executor's calls directly -----------------------------------------------------------------
def test_poll_maps_oom_and_exit_codes_in_one_list_call(tmp_path, node, data_dir):
    site = site_from_dict(site_dict(tmp_path, node, data_dir))
    ex = registry.create("docker", site)
    assert isinstance(ex, DockerExecutor)
    assert [c.status for c in ex.checks()] == ["ok"]
    jobs = []
    specs = {
        "p-oom": (["sh", "-c", "head -c 300000000 /dev/zero | tail > /dev/null"], {"memory": "16M"}),
        "p-ok": (["true"], {}),
        "p-two": (["sh", "-c", "exit 2"], {}),
    }
    from fem_hpc.policy import effective_task
    from fem_hpc.render import render_job

    for tid, (cmd, res) in specs.items():
        t = effective_task(Task.model_validate(task(tid, cmd, resources=res)), site)
        job = Job(task=t, workdir=site.work_root / tid)
        job.fem_dir.mkdir(parents=True)
        ex.stage_in(job)
        job.script_path.write_text(render_job(ex, job))
        job.script_path.chmod(0o700)
        job.native_id = ex.submit(job)
        jobs.append(job)
    try:
        api = ex._client().api  # count the daemon calls a poll makes
        calls: list[str] = []

        def counting(name: str):
            real = getattr(api, name)

            def call(*a, **kw):
                calls.append(name)
                return real(*a, **kw)

            return call

        for name in ("containers", "inspect_container"):
            setattr(api, name, counting(name))
        deadline = time.monotonic() + 30
        statuses = {}
        while time.monotonic() < deadline:
            statuses = ex.poll(jobs)
            if all(s.state.final for s in statuses.values()) and len(statuses) == 3:
                break
            time.sleep(0.3)
        by_task = {j.task.id: statuses[j.native_id] for j in jobs}
        assert (by_task["p-oom"].state, by_task["p-oom"].reason) == (State.FAILED, Reason.OUT_OF_MEMORY)
        assert (by_task["p-ok"].state, by_task["p-ok"].exit_code) == (State.COMPLETED, 0)
        assert (by_task["p-two"].state, by_task["p-two"].exit_code) == (State.FAILED, 2)
        # one list call per cycle; an ended container is inspected once (exit code, OOM flag), then cached
        assert calls.count("containers") >= 1 and calls.count("inspect_container") == 3
        calls.clear()
        assert ex.poll(jobs) == statuses
        assert calls == ["containers"]
    finally:
        for job in jobs:
            ex.after_final(job)
        ex.close()


# -- containers inside batch jobs: the launch line of executors.containers, run for real -----------
def test_batch_job_launch_line_runs_in_docker(tmp_path, node, data_dir):
    """What a Slurm/PBS job script does with docker as the site runtime: the common wrapper execs
    `docker run ... image argv` (here the script is run by sh directly, as a batch job would)."""
    from fem_hpc.executors.containers import container_launch, docker_cleanup_argv
    from fem_hpc.render import base_context, environment
    from fem_hpc.staging.images import stage_image
    from fem_hpc.staging.volumes import resolve_volumes

    site = site_from_dict(site_dict(tmp_path, node, data_dir))
    t = Task.model_validate(task("batch1", ["sh", "-c", "id -u; pwd; printf %s \"$SECRET\" > secret.txt; "
                                            "cat /data/input.txt; touch /data/no 2>/dev/null || echo ro"],
                                 env={"SECRET": "value with 'quotes' and $(dollar)"},
                                 volumes=[{"name": "data", "target": "/data"}], resources={"cpus": 1}))
    job = Job(task=t, workdir=site.work_root / "batch1")
    job.fem_dir.mkdir(parents=True)
    image = stage_image("docker", site, TEST_IMAGE)
    assert image == TEST_IMAGE
    launch, env = container_launch("docker", job, image, resolve_volumes(t, site, job.workdir), node=node)
    ctx = base_context(job)
    ctx.update(launch=launch, env_exports=env)
    script = environment(site).get_template("local.sh.j2").render(**ctx)
    assert "value with" not in " ".join(launch)
    job.script_path.write_text(script)
    proc = subprocess.run(["sh", str(job.script_path)], capture_output=True, text=True, timeout=120)
    stdout = (job.fem_dir / "stdout").read_text()
    assert proc.returncode == 0, (job.fem_dir / "stderr").read_text()
    assert stdout.splitlines() == [str(os.getuid()), str(job.workdir), "read-only volume data", "ro"]
    assert (job.workdir / "secret.txt").read_text() == "value with 'quotes' and $(dollar)"
    assert json.loads((job.fem_dir / "exit_code").read_text())["exit_code"] == 0
    assert containers(f"fem.node={node}", "fem.task_id=batch1") == []  # --rm
    cleanup = subprocess.run(docker_cleanup_argv("batch1", node), capture_output=True, text=True, timeout=60)
    assert "No such container" in cleanup.stderr  # nothing left; and the cleanup is safe to repeat


def test_stage_image_docker_missing_image(tmp_path, node, data_dir):
    from fem_hpc.staging.images import ImageError, stage_image

    site = site_from_dict(site_dict(tmp_path, node, data_dir))
    with pytest.raises(ImageError, match="cannot pull image 127.0.0.1:5000/fem/nonexistent:2"):
        stage_image("docker", site, "127.0.0.1:5000/fem/nonexistent:2")


# -- published ports ----------------------------------------------------------------------------------
@pytest.fixture
def bridge() -> Any:
    """A bridge network of the test's own (the test bed's dockerd has no default bridge: --bridge=none)."""
    name = f"fem-test-{uuid.uuid4().hex[:10]}"
    subprocess.run(["docker", "network", "create", name], check=True, capture_output=True, timeout=60)
    yield name
    subprocess.run(["docker", "network", "rm", name], capture_output=True, timeout=60)


def test_a_task_port_is_published_on_the_configured_address(tmp_path, node, data_dir, bridge):
    import socket

    from sshkit import free_port

    port = free_port()
    cfg = site_dict(tmp_path, node, data_dir, network=bridge, publish_host="127.0.0.1")
    cfg["policy"]["ports"] = [port]
    agent = new_agent(cfg)
    try:
        result = agent.intake(task("port1", ["sh", "-c", "echo hello-from-the-task | nc -l -p 4433"],
                                   ports=[{"host_port": port, "container_port": 4433}]))
        assert result.errors == []
        wait_state(agent, "port1", State.RUNNING, timeout=60)
        deadline, got = time.monotonic() + 30, b""
        while time.monotonic() < deadline and not got:
            try:  # docker-proxy listens at once; the container's nc a moment later
                with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
                    got = conn.recv(100)
            except OSError:
                time.sleep(0.2)
        assert got == b"hello-from-the-task\n"
        rec = agent.wait("port1", 60)
        assert rec is not None and rec.state == State.COMPLETED, rec and rec.message
    finally:
        agent.close()


def test_ports_are_refused_where_they_cannot_be_published(tmp_path, node, data_dir):
    cfg = site_dict(tmp_path, node, data_dir)  # network none, the default
    cfg["policy"]["ports"] = ["4000-4999"]
    agent = new_agent(cfg)
    try:
        errors = agent.intake(task("port2", ["true"], ports=[{"host_port": 4433, "container_port": 4433}])).errors
        assert [(e.field, e.message) for e in errors] == [
            ("task.ports", "executor 'docker' runs containers with network 'none', where ports cannot be published")]
        errors = agent.intake(task("port3", ["true"], ports=[{"host_port": 5000, "container_port": 80}])).errors
        assert ("task.ports.0.host_port", "host port 5000 is not allowed by site policy (policy.ports: "
                "['4000-4999'])") in [(e.field, e.message) for e in errors]
    finally:
        agent.close()
