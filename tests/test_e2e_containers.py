"""End to end through `fem-hpc serve`: a v1 submit with an image from the local registry, a source
from a `git daemon` on loopback pinned to a commit, and a named read-only volume."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node

from fem_hpc.client import Client

pytestmark = [pytest.mark.docker, pytest.mark.rabbitmq]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def git(*args: str, cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


@pytest.fixture
def git_daemon(tmp_path: Path):
    base = tmp_path / "repos"
    repo = base / "fl.git"
    work = tmp_path / "src"
    work.mkdir(parents=True)
    git("init", "-q", "-b", "main", cwd=work)
    git("config", "user.email", "t@example.org", cwd=work)
    git("config", "user.name", "t", cwd=work)
    (work / "job").mkdir()
    (work / "job/train.sh").write_text("echo pinned-version\n")
    git("add", ".", cwd=work)
    git("commit", "-qm", "v1", cwd=work)
    pinned = git("rev-parse", "HEAD", cwd=work)
    (work / "job/train.sh").write_text("echo moved-on\n")
    git("commit", "-qam", "v2", cwd=work)
    base.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(work), str(repo)], check=True)
    port = free_port()
    proc = subprocess.Popen(["git", "daemon", "--reuseaddr", f"--base-path={base}", "--export-all",
                             "--listen=127.0.0.1", f"--port={port}", str(base)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    yield f"git://127.0.0.1:{port}/fl.git", pinned
    proc.terminate()
    proc.wait(10)


def test_image_git_source_and_readonly_volume_through_serve(tmp_path, git_daemon):
    services.require("rabbitmq")
    services.require("docker")
    services.require("registry")
    url, pinned = git_daemon
    data = tmp_path / "cardio"
    data.mkdir()
    (data / "records.csv").write_text("a,b\n1,2\n")
    node = unique_node("e2e")
    s = ServeProcess(tmp_path, node, {
        "default_executor": "docker",
        "executors": {"docker": {}, "local": {}},
        "volumes": {"cardio": {"path": str(data), "mode": "ro"}},
        "policy": {"images": ["127.0.0.1:5000/*"], "git": ["git://127.0.0.1:*"]},
    }).start()
    try:
        task = {"id": "fl-round-1", "image": services.TEST_IMAGE,
                "source": {"git": url, "commit": pinned, "path": "job"},
                "volumes": [{"name": "cardio", "target": "/data", "mode": "ro"}],
                "command": ["sh", "-c", "sh train.sh > result.txt; wc -l < /data/records.csv >> result.txt; "
                            "if touch /data/evil 2>/dev/null; then echo WROTE >> result.txt; fi"],
                "outputs": ["job/result.txt"]}
        with Client(BROKER_URL, node) as c:
            res = c.submit(task, timeout=180, outputs_dir=tmp_path / "out")
            assert res.state == "COMPLETED", res.result
            assert (tmp_path / "out/outputs/job/result.txt").read_text() == "pinned-version\n2\n"
            assert not (data / "evil").exists()
            # A ref that does not exist ends FAILED / STAGE_IN with a message naming it.
            bad = c.submit({**task, "id": "fl-bad-ref", "source": {"git": url, "ref": "no-such-branch"}}, timeout=120)
            assert bad.state == "FAILED" and bad.result["reason"] == "STAGE_IN"
            last = [e for e in bad.events if e["type"] == "status"][-1]
            assert "no-such-branch" in last["message"]
        left = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=fem.node={node}"], capture_output=True,
                              text=True).stdout.strip()
        assert left == "", "no container is left behind"
    finally:
        s.stop()
