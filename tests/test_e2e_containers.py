"""End to end through `fem-hpc serve`: a v1 submit with an image from the local registry, a source
from a `git daemon` on loopback pinned to a commit, and a named read-only volume."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node
from gitkit import Repo, git
from gitkit import git_daemon as serve_git

from fem_hpc.client import Client

pytestmark = [pytest.mark.docker, pytest.mark.rabbitmq]


@pytest.fixture
def git_daemon(tmp_path: Path):
    """A repository with two commits served by a real `git daemon`; yields (URL, first commit)."""
    work = Repo(tmp_path / "src")
    pinned = work.commit({"job/train.sh": "echo pinned-version\n"}, "v1")
    work.commit({"job/train.sh": "echo moved-on\n"}, "v2")
    base = tmp_path / "repos"
    base.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(work.path), str(base / "fl.git"))
    with serve_git(base) as url:
        yield f"{url}/fl.git", pinned


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
