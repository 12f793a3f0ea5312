"""The federated example's driver pointed at a Git server the nodes can reach (`--app-repo`,
`--app-ref`, or `app:` in federation.yaml), as a real deployment does instead of the local
file:// commit: the task documents it would send (`--print-tasks`) name that URL pinned to the
commit the ref names, a node's policy takes them, and a node's real stage-in checks the app out
from a real `git daemon` on loopback. No broker, no Flower."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml
from gitkit import Repo, git, git_daemon

from fem_hpc.config import config_from_dict
from fem_hpc.model import parse_task
from fem_hpc.policy import check_policy
from fem_hpc.staging.git import stage_source

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "federated"
APP_FILES = {p.name: p.read_text() for p in sorted((EXAMPLE / "app").glob("*.py"))}


def _federation(base: Path, **extra) -> Path:
    """federation.yaml as make_sites.py writes it (three nodes), plus `extra` keys."""
    base.mkdir(parents=True, exist_ok=True)
    nodes = [{"name": "hospital-a", "executor": "docker", "rows": 228, "image": "127.0.0.1:5000/fem/python-fl:1",
              "python": "python3"},
             {"name": "hpc-b", "executor": "slurm", "rows": 199, "python": "/shared/venv/bin/python"},
             {"name": "laptop-c", "executor": "local", "rows": 142, "python": sys.executable}]
    fed = {"broker": "amqp://guest:guest@127.0.0.1:5672/%2F", "aggregator": "laptop-c",
           "server": {"bind": "0.0.0.0", "host": "fl.example.org", "port": 4433}, "nodes": nodes, **extra}
    (base / "federation.yaml").write_text(yaml.safe_dump(fed, sort_keys=False))
    return base


def _print_tasks(base: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLE / "driver.py"), "--dir", str(base), "--print-tasks", *args],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def _served_app(tmp_path: Path) -> tuple[Path, str, str]:
    """A bare repository holding the app, tagged v1 (annotated) and then moved on by one commit:
    (directory to serve, the v1 commit, main's commit)."""
    src = Repo(tmp_path / "app-src")
    v1 = src.commit(APP_FILES, "the FL app")
    git(src.path, "tag", "-a", "v1", "-m", "release v1")
    main = src.commit({"CHANGES.txt": "after v1\n"}, "a later change")
    served = tmp_path / "served"
    served.mkdir()
    git(tmp_path, "clone", "-q", "--bare", str(src.path), str(served / "fl-app.git"))
    return served, v1, main


def test_the_driver_sends_tasks_pinned_to_the_app_repo_it_is_given(tmp_path):
    served, v1, main = _served_app(tmp_path)
    with git_daemon(served) as daemon:
        url = f"{daemon}/fl-app.git"
        base = _federation(tmp_path / "fed")
        out = _print_tasks(base, "--app-repo", url, "--app-ref", "main")
        assert out.returncode == 0, out.stderr
        docs = [json.loads(line) for line in out.stdout.splitlines()]
        assert [d["node"] for d in docs] == ["laptop-c", "hospital-a", "hpc-b", "laptop-c"]
        assert [d["task"]["labels"]["fl_role"] for d in docs] == ["server", "client", "client", "client"]
        assert all(d["task"]["source"] == {"git": url, "commit": main} for d in docs), docs
        assert docs[0]["task"]["env"]["FL_SERVER_ADDRESS"] == "0.0.0.0:4433"
        assert all(d["task"]["env"]["FL_SERVER_ADDRESS"] == "fl.example.org:4433" for d in docs[1:])
        assert not (base / "fl-app.git").exists(), "nothing committed locally when the app has a repository"

        # federation.yaml's `app:` does the same with the steps unchanged; a tag is pinned to its commit.
        base2 = _federation(tmp_path / "fed2", app={"repo": url, "ref": "v1"})
        out = _print_tasks(base2)
        assert out.returncode == 0, out.stderr
        docs = [json.loads(line) for line in out.stdout.splitlines()]
        assert {json.dumps(d["task"]["source"]) for d in docs} == {json.dumps({"git": url, "commit": v1})}
        # the command line wins over federation.yaml
        out = _print_tasks(base2, "--app-ref", "main")
        assert json.loads(out.stdout.splitlines()[0])["task"]["source"]["commit"] == main

        # What a node does with such a document: its policy names the Git server, its stage-in
        # fetches the pinned commit from it.
        site = config_from_dict({"node": "hpc-b", "state_dir": str(tmp_path / "state"),
                                 "work_root": str(tmp_path / "work"), "executors": {"local": {}},
                                 "volumes": {"fl-data": {"path": str(tmp_path), "mode": "ro"}},
                                 "policy": {"git": [f"{daemon}/*"]}})
        task, errors = parse_task(docs[2]["task"])
        assert task is not None and errors == [], errors
        assert check_policy(task, site) == []
        workdir = tmp_path / "work" / "client"
        stage_source(task, workdir, site)
        assert (workdir / "client_app.py").read_text() == APP_FILES["client_app.py"]
        assert (workdir / "server_app.py").is_file() and not (workdir / "CHANGES.txt").exists()  # v1, not main

        # A ref the repository lacks, and a repository nobody serves: said before anything is sent.
        out = _print_tasks(base, "--app-repo", url, "--app-ref", "nope")
        assert out.returncode != 0 and f"--app-repo {url}: no branch or tag 'nope' there" in out.stderr
    gone = _print_tasks(base, "--app-repo", url)
    assert gone.returncode != 0 and f"--app-repo {url}: cannot read it" in gone.stderr, gone.stderr
    # A full commit is taken as given: the driver need not reach the repository then.
    out = _print_tasks(base, "--app-repo", url, "--app-ref", main.upper())
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["task"]["source"] == {"git": url, "commit": main}
    assert _print_tasks(base, "--app-ref", "main").stderr.strip().endswith("needs --app-repo (or app.repo)")
