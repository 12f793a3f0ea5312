"""What a task may mount and publish (the additive v1 fields of issue 11): volumes that name the work
dir, the source checkout or a site variable's path, a subpath of any root, and published ports; how
they resolve on a real file system, what policy says, and how the launch lines use them."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from gitkit import Repo

from fem_hpc.config import config_from_dict
from fem_hpc.executors.base import Job
from fem_hpc.executors.containers import container_launch, docker_create_args
from fem_hpc.layout import source_dir
from fem_hpc.model import Task, parse_task
from fem_hpc.policy import check_policy
from fem_hpc.staging.errors import VolumeError
from fem_hpc.staging.git import stage_source
from fem_hpc.staging.volumes import resolve_volumes

SOURCE = {"git": "file:///srv/flcore.git", "ref": "production"}


def task(**extra: Any) -> Task:
    parsed, errors = parse_task({"id": "t1", "command": ["python3", "server_cmd.py"], **extra})
    assert errors == [] and parsed is not None, errors
    return parsed


def problems(**extra: Any) -> dict[str, str]:
    _, errors = parse_task({"id": "t1", "command": ["true"], **extra})
    return {e.field: e.message for e in errors}


@pytest.fixture
def site(tmp_path: Path):
    femc = tmp_path / "femc" / "config" / "certs"
    femc.mkdir(parents=True)
    (tmp_path / "scratch").mkdir()
    (tmp_path / "data").mkdir()
    return config_from_dict({
        "node": "n1", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "executors": {"local": {}, "docker": {"network": "fl"}, "box": {"type": "docker"}, "slurm": {}},
        "volumes": {"data": {"path": str(tmp_path / "data")}},
        "policy": {"ports": [4433, "8000-8010"]},
        "legacy": {"variables": {"HOST_FEMC_PATH": str(tmp_path / "femc"),
                                 "SCRATCH": {"value": str(tmp_path / "scratch"), "mode": "rw"},
                                 "CACERT": {"value": "/app/ca.pem", "mode": "none"}}},
    })


# -- the model -------------------------------------------------------------------------------------
def test_volume_kinds_and_their_names() -> None:
    assert problems(volumes=[{"kind": "workdir", "target": "/sandbox", "mode": "rw"}]) == {}
    assert problems(volumes=[{"kind": "variable", "name": "HOST_FEMC_PATH", "subpath": "config/certs",
                              "target": "/certs"}]) == {}
    assert "a workdir volume has no name" in problems(volumes=[{"kind": "workdir", "name": "x", "target": "/s"}])[
        "task.volumes.0.name"]
    assert "variable's name matching" in problems(volumes=[{"kind": "variable", "name": "BAD-NAME", "target": "/s"}])[
        "task.volumes.0.name"]
    assert problems(volumes=[{"target": "/s"}]) == {"task.volumes.0.name": "a site volume needs its name"}
    assert problems(volumes=[{"kind": "mount", "name": "x", "target": "/s"}]).keys() == {"task.volumes.0.kind"}


@pytest.mark.parametrize("subpath", ["/abs", "../up", "a/../../b", "a:b", "a,b", ""])
def test_a_subpath_stays_below_its_root(subpath: str) -> None:
    assert "task.volumes.0.subpath" in problems(volumes=[{"name": "data", "subpath": subpath, "target": "/d"}])


def test_the_checkout_volume_needs_the_source_once() -> None:
    assert problems(volumes=[{"kind": "checkout", "target": "/code"}]) == {
        "task": "a checkout volume needs the task's source"}
    two = [{"kind": "checkout", "target": "/a"}, {"kind": "checkout", "target": "/b"}]
    assert problems(source=SOURCE, volumes=two) == {"task": "the source can be mounted once (two checkout volumes)"}
    assert "task.volumes.0" in problems(source=SOURCE, volumes=[{"kind": "checkout", "subpath": "x", "target": "/a"}])


def test_ports_are_checked() -> None:
    assert problems(ports=[{"host_port": 4433, "container_port": 4433}]) == {}
    assert "task.ports.0.host_port" in problems(ports=[{"host_port": 0, "container_port": 1}])
    assert "task.ports.0.protocol" in problems(ports=[{"host_port": 1, "container_port": 1, "protocol": "sctp"}])
    twice = [{"host_port": 9, "container_port": 1}, {"host_port": 9, "container_port": 2}]
    assert problems(ports=twice) == {"task": "two ports share one host port"}
    assert problems(ports=[*twice[:1], {**twice[1], "protocol": "udp"}]) == {}  # tcp and udp are two ports


# -- where the source goes, where the command runs -----------------------------------------------------
def test_a_mounted_source_lives_in_fem_source_and_the_command_runs_from_its_target(tmp_path: Path) -> None:
    plain = Job(task=task(source={**SOURCE, "path": "src"}), workdir=tmp_path)
    assert source_dir(plain.task, tmp_path) == tmp_path
    assert plain.rundir == tmp_path / "src" and plain.container_rundir is None
    mounted = Job(task=task(source={**SOURCE, "path": "src"}, volumes=[{"kind": "checkout", "target": "/flcore"}]),
                  workdir=tmp_path)
    assert mounted.source_dir == tmp_path / ".fem" / "source"
    assert mounted.rundir == tmp_path / ".fem" / "source" / "src"
    assert mounted.container_rundir == "/flcore/src"


def test_stage_source_checks_a_mounted_source_out_beside_the_task_files(tmp_path: Path, site) -> None:
    repo = Repo(tmp_path / "repo")
    repo.commit({"server_cmd.py": "print('x')\n"})
    workdir = tmp_path / "sandbox" / "u" / "e"
    workdir.mkdir(parents=True)
    (workdir / "input.csv").write_text("received earlier\n")  # e.g. a legacy receive_files
    t = task(source={"git": repo.url}, volumes=[{"kind": "checkout", "target": "/flcore"}])
    stage_source(t, workdir, site)
    assert (workdir / ".fem" / "source" / "server_cmd.py").read_text() == "print('x')\n"
    assert sorted(p.name for p in workdir.iterdir()) == [".fem", "input.csv"]


def test_git_mirrors_rewrite_the_longest_prefix(tmp_path: Path) -> None:
    cfg = config_from_dict({"node": "n", "state_dir": str(tmp_path), "work_root": str(tmp_path), "git": {
        "mirrors": {"https://git.example.org/": "file:///srv/all/", "https://git.example.org/fl/": "git://127.0.0.1/"}}})
    assert cfg.git.fetch_url("https://git.example.org/fl/flcore.git") == "git://127.0.0.1/flcore.git"
    assert cfg.git.fetch_url("https://git.example.org/other.git") == "file:///srv/all/other.git"
    assert cfg.git.fetch_url("https://elsewhere.example.org/x.git") == "https://elsewhere.example.org/x.git"
    with pytest.raises(Exception, match="is not a git URL prefix"):
        config_from_dict({"node": "n", "state_dir": str(tmp_path), "work_root": str(tmp_path),
                          "git": {"mirrors": {"not a url": "file:///x/"}}})


# -- resolving mounts at the moment of use -----------------------------------------------------------
def test_every_kind_resolves_to_a_site_path(tmp_path: Path, site) -> None:
    workdir = tmp_path / "work" / "u" / "e" / "t1"
    (workdir / ".fem" / "source").mkdir(parents=True)
    t = task(source=SOURCE, volumes=[
        {"kind": "workdir", "target": "/sandbox", "mode": "rw"},
        {"kind": "workdir", "subpath": "out/models", "target": "/models", "mode": "rw"},
        {"kind": "checkout", "target": "/flcore", "mode": "rw"},
        {"kind": "variable", "name": "HOST_FEMC_PATH", "subpath": "config/certs", "target": "/certs"},
        {"kind": "variable", "name": "SCRATCH", "target": "/scratch", "mode": "rw"},
        {"name": "data", "target": "/data"}])
    mounts = [(m.source, m.target, m.mode) for m in resolve_volumes(t, site, workdir)]
    assert mounts == [
        (workdir, "/sandbox", "rw"),
        (workdir / "out" / "models", "/models", "rw"),  # made: it is the task's own area
        (workdir / ".fem" / "source", "/flcore", "rw"),
        (tmp_path / "femc" / "config" / "certs", "/certs", "ro"),
        (tmp_path / "scratch", "/scratch", "rw"),
        (tmp_path / "data", "/data", "ro"),
    ]


@pytest.mark.parametrize(("volume", "fragment"), [
    ({"kind": "variable", "name": "CACERT", "target": "/x"}, "is not a path this site lets tasks mount"),
    ({"kind": "variable", "name": "HOME", "target": "/x"}, "is not a path this site lets tasks mount"),
    ({"kind": "variable", "name": "HOST_FEMC_PATH", "target": "/x", "mode": "rw"}, "is read-only on this site"),
    ({"kind": "variable", "name": "HOST_FEMC_PATH", "subpath": "nope", "target": "/x"}, "does not exist"),
    ({"name": "data", "subpath": "escape", "target": "/x"}, "outside"),
    ({"kind": "variable", "name": "HOST_FEMC_PATH", "subpath": "config/escape", "target": "/x"}, "outside"),
    ({"kind": "workdir", "subpath": "escape", "target": "/x"}, "outside"),
])
def test_what_is_refused_at_the_moment_of_use(tmp_path: Path, site, volume: dict[str, Any], fragment: str) -> None:
    workdir = tmp_path / "work" / "t1"
    workdir.mkdir(parents=True)
    for root in (tmp_path / "data", tmp_path / "femc" / "config", workdir):
        (root / "escape").symlink_to("/etc")  # a symlink swapped in: never followed out of its root
    with pytest.raises(VolumeError, match=fragment):
        resolve_volumes(task(volumes=[volume]), site, workdir)


def test_policy_on_variables_and_ports(site) -> None:
    def errors(executor: str, **extra: Any) -> dict[str, str]:
        return {e.field: e.message for e in check_policy(task(executor=executor, image="127.0.0.1:5000/x:1",
                                                              **extra), site)}

    variable = [{"kind": "variable", "name": "CACERT", "target": "/x"}]
    assert errors("docker", volumes=variable)["task.volumes.0.name"].startswith("variable 'CACERT' is not a path")
    rw = [{"kind": "variable", "name": "HOST_FEMC_PATH", "target": "/x", "mode": "rw"}]
    assert errors("docker", volumes=rw)["task.volumes.0.mode"] == "variable 'HOST_FEMC_PATH' is read-only on this site"
    port = [{"host_port": 4433, "container_port": 4433}]
    assert "task.ports" not in errors("docker", ports=port) and "task.ports.0.host_port" not in errors("docker",
                                                                                                      ports=port)
    assert errors("docker", ports=[{"host_port": 8011, "container_port": 1}])["task.ports.0.host_port"].startswith(
        "host port 8011 is not allowed by site policy")
    assert errors("box", ports=port)["task.ports"] == ("executor 'box' runs containers with network 'none', where "
                                                       "ports cannot be published")
    assert errors("slurm", ports=port)["task.ports"].startswith("executor 'slurm' (type slurm) cannot publish ports")


# -- the launch lines ------------------------------------------------------------------------------
def test_launch_lines_bind_the_checkout_and_run_from_it(tmp_path: Path, site) -> None:
    workdir = tmp_path / "w"
    (workdir / ".fem" / "source").mkdir(parents=True)
    t = task(source=SOURCE, image="127.0.0.1:5000/fl/flcore:demo", ports=[{"host_port": 4433, "container_port": 80}],
             volumes=[{"kind": "checkout", "target": "/flcore", "mode": "rw"},
                      {"kind": "workdir", "target": "/sandbox", "mode": "rw"}])
    job = Job(task=t, workdir=workdir)
    mounts = resolve_volumes(t, site, workdir)
    argv, _ = container_launch("docker", job, "img", mounts, user=None)
    assert argv[argv.index("-w") + 1] == "/flcore"
    assert f"{workdir}/.fem/source:/flcore:rw" in argv and f"{workdir}:/sandbox:rw" in argv
    assert argv[argv.index("--network") + 1] == "none"  # a batch job's container publishes nothing
    argv, _ = container_launch("apptainer", job, "x.sif", mounts, binary="apptainer")
    assert argv[argv.index("--pwd") + 1] == "/flcore"
    args = docker_create_args(job, "img", mounts, name="c", labels={}, user=(os.getuid(), os.getgid()),
                              network="fl", publish_host="127.0.0.1")
    assert args["ports"] == {"80/tcp": ("127.0.0.1", 4433)}
    assert {(m["Target"], m["Source"]) for m in args["mounts"]} >= {("/flcore", str(workdir / ".fem" / "source")),
                                                                    ("/sandbox", str(workdir))}
