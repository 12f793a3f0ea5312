"""The test bed itself (scripts/testbed up): each real service does the one thing the suite relies on."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import services


def run(argv: list[str], timeout: float = 60, **kwargs) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kwargs)


@pytest.mark.slurm
def test_sbatch_wait_runs_a_job_and_writes_its_output(tmp_path: Path) -> None:
    services.require("slurm")
    out = tmp_path / "job.out"
    proc = run(
        ["sbatch", "--wait", "--parsable", "-p", services.SLURM_PARTITION, "-J", "fem-testbed-test",
         "-D", str(tmp_path), "-o", str(out), "--wrap", "echo hello from $SLURM_JOB_ID; pwd"],
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().split(";")[0]
    assert job_id.isdigit()
    assert out.read_text().splitlines() == [f"hello from {job_id}", str(tmp_path)]


@pytest.mark.slurm
def test_slurm_has_debug_default_and_short_partitions() -> None:
    services.require("slurm")
    proc = run(["sinfo", "-h", "-o", "%P"])
    assert proc.returncode == 0, proc.stderr
    assert {"debug*", "short"} <= set(proc.stdout.split())


@pytest.mark.pbs
def test_qsub_over_slurm_runs_a_job(tmp_path: Path) -> None:
    services.require("pbs")
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#PBS -N fem-testbed-pbs\n#PBS -l walltime=00:01:00\necho hello from pbs\n")
    proc = run(["qsub", str(script)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    deadline = time.monotonic() + 120
    state = ""
    while time.monotonic() < deadline:
        status = run(["qstat", "-f", job_id])
        for line in status.stdout.splitlines():
            if line.strip().startswith("job_state ="):
                state = line.split("=", 1)[1].strip()
        if state == "C":
            break
        time.sleep(0.5)
    assert state == "C", f"job {job_id} still {state!r} after 120 s"
    assert "Job_Name = fem-testbed-pbs" in status.stdout
    output = tmp_path / f"job.sh.o{job_id}"
    deadline = time.monotonic() + 10
    while not output.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert output.read_text().strip() == "hello from pbs"


@pytest.mark.docker
def test_docker_runs_the_test_image_with_a_bind_mount(tmp_path: Path) -> None:
    services.require("docker")
    services.require("registry")
    (tmp_path / "in.txt").write_text("payload\n")
    proc = run(
        ["docker", "run", "--rm", "-v", f"{tmp_path}:/work", services.TEST_IMAGE,
         "sh", "-c", "cat /etc/fem-testbed /work/in.txt; echo done > /work/out.txt; id -u"],
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["fem-testbed busybox image", "payload", "0"]
    assert (tmp_path / "out.txt").read_text() == "done\n"


@pytest.mark.docker
def test_registry_lists_the_test_image() -> None:
    services.require("registry")
    with urllib.request.urlopen(f"http://{services.REGISTRY}/v2/fem/busybox/tags/list", timeout=5) as resp:
        tags = json.load(resp)
    assert "1" in tags["tags"]


@pytest.mark.docker
def test_auth_registry_pull_needs_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services.require("docker")
    services.require("registry-auth")
    docker = pytest.importorskip("docker")
    # An empty client config: no credentials from root's ~/.docker/config.json.
    monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path))
    client = docker.from_env(timeout=60)
    try:
        repo = f"{services.AUTH_REGISTRY}/fem/busybox"
        with pytest.raises(docker.errors.APIError):
            client.images.pull(repo, tag="1")
        image = client.images.pull(
            repo, tag="1", auth_config={"username": services.AUTH_USER, "password": services.AUTH_PASSWORD}
        )
        assert f"{repo}:1" in image.tags
        out = client.containers.run(image.id, ["cat", "/etc/fem-testbed"], remove=True)
        assert out == b"fem-testbed busybox image\n"
    finally:
        client.close()


@pytest.mark.rabbitmq
def test_rabbitmq_round_trip() -> None:
    services.require("rabbitmq")
    pika = pytest.importorskip("pika")
    params = pika.URLParameters(services.RABBITMQ_URL)
    params.socket_timeout = 5
    params.blocked_connection_timeout = 10
    conn = pika.BlockingConnection(params)
    try:
        ch = conn.channel()
        queue = ch.queue_declare(queue=f"fem-testbed-{uuid.uuid4().hex}", exclusive=True, auto_delete=True)
        name = queue.method.queue
        ch.confirm_delivery()
        ch.basic_publish(exchange="", routing_key=name, body=b"ping")
        deadline = time.monotonic() + 10
        body = None
        while body is None and time.monotonic() < deadline:
            _, _, body = ch.basic_get(queue=name, auto_ack=True)
            if body is None:
                time.sleep(0.05)
        assert body == b"ping"
    finally:
        conn.close()


def test_require_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(services._CHECKS, "nothing", lambda: (False, "not here"))
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="nothing is not available: not here"):
        services.require("nothing")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="nothing is not available: not here"):
        services.require("nothing")
    with pytest.raises(ValueError, match="unknown service"):
        services.check("no-such-service")
