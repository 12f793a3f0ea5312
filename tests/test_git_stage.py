"""Git stage-in with real repositories made by `git` in tmp_path, over file:// and a real
`git daemon` on loopback."""

from __future__ import annotations

import base64
import functools
import subprocess
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from gitkit import GIT_ENV, Repo, git
from gitkit import git_daemon as serve_git
from sshkit import free_port

from fem_hpc.config import config_from_dict
from fem_hpc.model import Task
from fem_hpc.staging.errors import GitStageError, StageError
from fem_hpc.staging.git import mirror_path, stage_source


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    r = Repo(tmp_path / "repos" / "solver")
    r.first = r.commit({"version.txt": "v1\n", "sub/data.txt": "data-v1\n"}, "first")  # type: ignore[attr-defined]
    git(r.path, "tag", "v1.0")
    r.second = r.commit({"version.txt": "v2\n", "sub/data.txt": "data-v2\n"}, "second")  # type: ignore[attr-defined]
    git(r.path, "branch", "stable", r.first)  # type: ignore[attr-defined]
    return r


@pytest.fixture
def git_site(site: dict[str, Any]) -> dict[str, Any]:
    site["policy"] = {"git": ["file://*", "git://127.0.0.1:*"]}
    return site


def run_task(cli, write_config, write_task, site: dict[str, Any], task: dict[str, Any], out: Path | None = None,
             *extra: str):
    args = ["run", "--config", write_config(site), write_task(task), *extra]
    if out is not None:
        args += ["--outputs", out]
    return cli(*args, timeout=60)


def show_version_task(task_id: str, source: dict[str, Any]) -> dict[str, Any]:
    return {"id": task_id, "source": source, "command": ["sh", "-c", "cat version.txt > seen.txt"],
            "outputs": ["seen.txt"]}


def workdir(site: dict[str, Any], task_id: str) -> Path:
    return Path(site["work_root"]) / "anonymous" / task_id / task_id


# -- refs, commits, paths -----------------------------------------------------------------------
def test_pinned_commit_even_after_the_branch_moved(tmp_path, repo, git_site, cli, write_config, write_task) -> None:
    out = tmp_path / "out"
    task = show_version_task("pinned", {"git": repo.url, "ref": "main", "commit": repo.first})
    proc = run_task(cli, write_config, write_task, git_site, task, out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "outputs" / "seen.txt").read_text() == "v1\n"
    wd = workdir(git_site, "pinned")
    assert git(wd, "rev-parse", "HEAD") == repo.first


def test_default_is_head(tmp_path, repo, git_site, cli, write_config, write_task) -> None:
    out = tmp_path / "out"
    proc = run_task(cli, write_config, write_task, git_site, show_version_task("head", {"git": repo.url}), out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "outputs" / "seen.txt").read_text() == "v2\n"


@pytest.mark.parametrize(("ref", "expected"), [("main", "v2\n"), ("stable", "v1\n"), ("v1.0", "v1\n")])
def test_ref_branch_and_tag(tmp_path, repo, git_site, cli, write_config, write_task, ref: str,
                            expected: str) -> None:
    out = tmp_path / "out"
    task = show_version_task(f"ref-{ref}", {"git": repo.url, "ref": ref})
    proc = run_task(cli, write_config, write_task, git_site, task, out)
    assert proc.returncode == 0, proc.stderr
    assert (out / "outputs" / "seen.txt").read_text() == expected


def test_path_is_the_run_dir(tmp_path, repo, git_site, cli, write_config, write_task) -> None:
    out = tmp_path / "out"
    task = {"id": "subdir", "source": {"git": repo.url, "ref": "stable", "path": "sub"},
            "command": ["sh", "-c", "pwd > pwd.txt; cat data.txt > copy.txt"],
            "outputs": ["sub/pwd.txt", "sub/copy.txt"]}
    proc = run_task(cli, write_config, write_task, git_site, task, out)
    assert proc.returncode == 0, proc.stderr
    wd = workdir(git_site, "subdir")
    assert (out / "outputs" / "sub" / "pwd.txt").read_text() == f"{wd / 'sub'}\n"
    assert (out / "outputs" / "sub" / "copy.txt").read_text() == "data-v1\n"


def test_path_that_is_not_a_directory(repo, git_site, cli, write_config, write_task) -> None:
    task = {"id": "nodir", "source": {"git": repo.url, "path": "version.txt"}, "command": ["true"]}
    proc = run_task(cli, write_config, write_task, git_site, task)
    assert proc.returncode == 1
    assert "reason: STAGE_IN" in proc.stderr and "'version.txt' is not a directory" in proc.stderr


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ({"ref": "no-such-branch"}, "ref 'no-such-branch' not found"),
        ({"commit": "0123456789abcdef0123456789abcdef01234567"}, "not found in the repository"),
    ],
)
def test_unknown_ref_fails_stage_in(tmp_path, repo, git_site, cli, write_config, write_task,
                                    source: dict[str, Any], words: str) -> None:
    proc = run_task(cli, write_config, write_task, git_site,
                    {"id": "badref", "source": {"git": repo.url, **source}, "command": ["touch", "ran"]})
    assert proc.returncode == 1, proc.stderr
    assert "FAILED" in proc.stderr and "SUBMITTED" not in proc.stderr
    assert "reason: STAGE_IN" in proc.stderr and words in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (workdir(git_site, "badref") / "ran").exists()


def test_stage_source_takes_plain_values(tmp_path, repo, git_site) -> None:
    """The stage-in step without an agent or a job: task, work dir, site, progress."""
    site = config_from_dict(git_site)
    notes: list[str] = []
    task = Task.model_validate(show_version_task("plain", {"git": repo.url, "ref": "stable", "path": "sub"}))
    stage_source(task, tmp_path / "wd", site, notes.append)
    assert (tmp_path / "wd" / "version.txt").read_text() == "v1\n"
    assert notes == [f"cloning {repo.url}", f"checked out {repo.first[:12]}"]
    stage_source(Task.model_validate({"id": "nosrc", "command": ["true"]}), tmp_path / "empty", site)
    assert not (tmp_path / "empty").exists()  # no source: nothing to do
    bad = Task.model_validate(show_version_task("bad", {"git": repo.url, "ref": "no-such-ref"}))
    with pytest.raises(GitStageError, match="ref 'no-such-ref' not found") as info:
        stage_source(bad, tmp_path / "wd2", site)
    assert isinstance(info.value, StageError)  # what the agent turns into FAILED / STAGE_IN


def test_url_not_allowed_is_rejected(tmp_path, repo, site, cli, write_config, write_task) -> None:
    site["policy"] = {"git": ["https://git.example.org/*"]}
    proc = run_task(cli, write_config, write_task, site, show_version_task("nogit", {"git": repo.url}))
    assert proc.returncode == 65, proc.stderr
    assert "task.source.git:" in proc.stderr and "policy.git" in proc.stderr
    assert not Path(site["work_root"]).exists()
    assert not (Path(site["state_dir"]) / "git").exists()  # nothing was fetched


def test_mirror_is_reused_and_fetched(tmp_path, repo, git_site, cli, write_config, write_task) -> None:
    mirror = mirror_path(config_from_dict(git_site), repo.url)
    proc = run_task(cli, write_config, write_task, git_site, show_version_task("m1", {"git": repo.url}),
                    tmp_path / "o1")
    assert proc.returncode == 0, proc.stderr
    assert (mirror / "HEAD").is_file()
    inode = mirror.stat().st_ino
    objects_inode = (mirror / "objects").stat().st_ino
    third = repo.commit({"version.txt": "v3\n"}, "third")
    proc = run_task(cli, write_config, write_task, git_site, show_version_task("m2", {"git": repo.url}),
                    tmp_path / "o2")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "o2" / "outputs" / "seen.txt").read_text() == "v3\n"  # fetched the new commit
    assert mirror.stat().st_ino == inode and (mirror / "objects").stat().st_ino == objects_inode  # not re-cloned
    assert git(mirror, "rev-parse", "refs/heads/main") == third
    assert [p.name for p in mirror.parent.iterdir() if p.suffix == ".git"] == [mirror.name]


# -- git daemon on loopback ------------------------------------------------------------------
@pytest.fixture
def git_daemon(repo: Repo) -> Iterator[str]:
    """A real `git daemon` serving the repos next to `repo`; yields its base URL."""
    with serve_git(repo.path.parent) as url:
        yield url


TOKEN = "fem-test-TOKEN-7f3a9c1e"


def test_clone_over_git_daemon_keeps_tokens_out(tmp_path, repo, git_daemon, git_site, cli, write_config,
                                                 write_task) -> None:
    git_site["git"] = {"credentials": {"127.0.0.1": {"username": "fem-bot", "token": TOKEN}}}
    out = tmp_path / "out"
    task = {"id": "daemon", "source": {"git": f"{git_daemon}/solver", "ref": "stable"},
            "command": ["sh", "-c",
                        "cat version.txt > seen.txt; git config --list > gitconfig.txt 2>&1; env > env.txt"],
            "outputs": ["seen.txt", "gitconfig.txt", "env.txt"]}
    proc = run_task(cli, write_config, write_task, git_site, task, out, "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert (out / "outputs" / "seen.txt").read_text() == "v1\n"
    basic = base64.b64encode(f"fem-bot:{TOKEN}".encode()).decode()
    secrets = [TOKEN.encode(), basic.encode()]
    searched = 0
    for root in (workdir(git_site, "daemon"), out, Path(git_site["state_dir"])):
        for f in root.rglob("*"):
            if f.is_file() and not f.is_symlink():
                data = f.read_bytes()
                searched += 1
                for secret in secrets:
                    assert secret not in data, f"{secret!r} leaked into {f}"
    assert searched > 10
    assert (workdir(git_site, "daemon") / ".git" / "config").is_file()
    for secret in secrets:
        assert secret.decode() not in proc.stderr and secret.decode() not in proc.stdout


def test_unreachable_git_daemon_fails_stage_in(tmp_path, git_site, cli, write_config, write_task) -> None:
    url = f"git://127.0.0.1:{free_port()}/x"  # nothing listens there
    git_site["git"] = {"credentials": {"127.0.0.1": {"token": TOKEN}}, "timeout_seconds": 20}
    proc = run_task(cli, write_config, write_task, git_site, {"id": "unreach", "source": {"git": url},
                                                              "command": ["true"]})
    assert proc.returncode == 1, proc.stderr
    assert "reason: STAGE_IN" in proc.stderr
    reason = next(ln for ln in proc.stderr.splitlines() if ln.startswith("reason: STAGE_IN"))
    assert "unreachable" in reason and url in reason
    assert TOKEN not in proc.stderr
    assert not list(mirror_path(config_from_dict(git_site), url).parent.glob("*.tmp*"))  # no half clone left


# -- a token really goes to an http(s) server, as a header --------------------------------------
class _RecordingHandler(SimpleHTTPRequestHandler):
    seen: list[tuple[str, str | None]]

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.seen.append((self.path, self.headers.get("Authorization")))
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


@pytest.fixture
def dumb_http(tmp_path: Path, repo: Repo) -> Iterator[tuple[str, list[tuple[str, str | None]]]]:
    """The repo as a bare clone served over git's dumb HTTP protocol by a real HTTP server; yields
    (url, the (path, Authorization header) of every request)."""
    served = tmp_path / "http"
    served.mkdir()
    subprocess.run(["git", "clone", "-q", "--bare", str(repo.path), str(served / "solver.git")], check=True,
                   env=GIT_ENV)
    git(served / "solver.git", "update-server-info")
    seen: list[tuple[str, str | None]] = []
    handler = type("Handler", (_RecordingHandler,), {"seen": seen})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/solver.git", seen
    finally:
        server.shutdown()
        server.server_close()


def test_token_sent_as_header_never_stored(tmp_path, dumb_http, git_site, cli, write_config, write_task) -> None:
    url, seen = dumb_http
    git_site["policy"]["git"].append("http://127.0.0.1:*")
    git_site["git"] = {"credentials": {"127.0.0.1": {"username": "fem-bot", "token": TOKEN}}}
    out = tmp_path / "out"
    task = show_version_task("http-token", {"git": url, "ref": "v1.0"})
    proc = run_task(cli, write_config, write_task, git_site, task, out, "--verbose")
    assert proc.returncode == 0, proc.stderr
    assert (out / "outputs" / "seen.txt").read_text() == "v1\n"
    basic = base64.b64encode(f"fem-bot:{TOKEN}".encode()).decode()
    assert seen and all(auth == f"Basic {basic}" for _, auth in seen), seen  # the server got the token
    assert not any(TOKEN in path for path, _ in seen)  # never in a URL
    for root in (workdir(git_site, "http-token"), out, Path(git_site["state_dir"])):
        for f in root.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert TOKEN.encode() not in data and basic.encode() not in data, f
    assert TOKEN not in proc.stderr and basic not in proc.stderr
