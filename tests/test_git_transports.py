"""Git stage-in over real transports: submodules from a `git daemon`, and an SSH source with the
site's per-host key (GIT_SSH_COMMAND) against the loopback sshd."""

from __future__ import annotations

from pathlib import Path

import pytest
from gitkit import Repo, git
from gitkit import git_daemon as serve_git

from fem_hpc.config import config_from_dict
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State
from fem_hpc.staging.git import stage_source


def make_repo(path: Path, files: dict[str, str]) -> Path:
    Repo(path).commit(files, "init")
    return path


def run_task(tmp: Path, git_cfg: dict, policy_git: list[str], source: dict) -> tuple[Agent, object]:
    site = config_from_dict({"node": "gt", "state_dir": str(tmp / "state"), "work_root": str(tmp / "work"),
                             "executors": {"local": {}}, "git": git_cfg, "policy": {"git": policy_git}})
    agent = Agent(site, Journal(site.journal_path, outbox=False), steps=[stage_source])
    agent.intake({"id": "g1", "source": source, "command": ["sh", "-c", "find . -name '*.txt' | sort"]})
    rec = agent.wait("g1", 60)
    agent.close()
    return agent, rec


@pytest.fixture
def daemon(tmp_path: Path):
    base = tmp_path / "served"
    base.mkdir()
    sub = make_repo(tmp_path / "sub-src", {"lib.txt": "from the submodule\n"})
    git(tmp_path, "clone", "-q", "--bare", str(sub), str(base / "sub.git"))
    with serve_git(base) as url:
        main = make_repo(tmp_path / "main-src", {"top.txt": "top\n"})
        git(main, "-c", "protocol.git.allow=always", "submodule", "add", "-q", f"{url}/sub.git", "vendor/sub")
        git(main, "commit", "-qm", "add submodule")
        git(tmp_path, "clone", "-q", "--bare", str(main), str(base / "main.git"))
        yield f"{url}/main.git"


@pytest.mark.parametrize("enabled", [True, False])
def test_submodules_only_when_the_site_enables_them(tmp_path, daemon, enabled):
    _, rec = run_task(tmp_path, {"submodules": enabled}, ["git://127.0.0.1:*"], {"git": daemon})
    assert rec.state == State.COMPLETED, rec.message
    listed = (Path(rec.workdir) / ".fem/stdout").read_text().split()
    assert "./top.txt" in listed
    assert ("./vendor/sub/lib.txt" in listed) is enabled


@pytest.mark.ssh
def test_ssh_source_uses_the_hosts_key_from_the_site_config(tmp_path, sshd):
    repo = make_repo(tmp_path / "src", {"over-ssh.txt": "via ssh\n"})
    bare = tmp_path / "repo.git"
    git(tmp_path, "clone", "-q", "--bare", str(repo), str(bare))
    url = f"ssh://root@127.0.0.1:{sshd.port}{bare}"
    cred = {"127.0.0.1": {"ssh_key": str(sshd.client_key), "known_hosts": str(sshd.known_hosts)}}
    _, rec = run_task(tmp_path, {"credentials": cred}, ["ssh://root@127.0.0.1:*"], {"git": url})
    assert rec.state == State.COMPLETED, rec.message
    assert "./over-ssh.txt" in (Path(rec.workdir) / ".fem/stdout").read_text().split()
    # Without the key the host refuses, and the task ends in STAGE_IN with a clear reason.
    other = tmp_path / "other"
    other.mkdir()
    _, bad = run_task(other, {}, ["ssh://root@127.0.0.1:*"], {"git": url})
    assert bad.state == State.FAILED and bad.reason == "STAGE_IN", bad.message
