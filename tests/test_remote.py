"""The cluster-side work dir (remote_work_root) without SSH: executors/remote.py's argv builders
and parsers, and the remote side's operations run for real through a local runner against a
"cluster" directory of this machine (the same commands go over SSH in test_offcluster.py).

The packer is one implementation for both sides: run as `python3 -c <its source>` it must
select exactly what the local stage-out selects, refusals and size cap included.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import shutil
import subprocess
import sys
import tarfile
import threading
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from apptainerkit import IMAGE, calls, install_fake

from fem_hpc.config import config_from_dict
from fem_hpc.executors import registry, remote
from fem_hpc.executors.base import ExecutorError, Job
from fem_hpc.executors.commands import LocalRunner
from fem_hpc.executors.slurm import SlurmExecutor
from fem_hpc.layout import FEM_DIR, job_name
from fem_hpc.model import parse_task
from fem_hpc.render import render_job
from fem_hpc.staging import packer
from fem_hpc.staging.outputs import StageOutError, build_archive, collect


def make_task(tid: str = "t1", **more: Any):
    task, errors = parse_task({"id": tid, "command": ["sh", "-c", "echo hi"], "user_id": "u1",
                               "execution_id": "e1", **more})
    assert task is not None, errors
    return task


# -- pure functions --------------------------------------------------------------------------------
def test_paths_are_checked() -> None:
    assert remote.check_root("/scratch/fem/") == "/scratch/fem"
    for bad in ("scratch", "/a b", "/a/../etc", "/a;b", "/$HOME", "/a\nb"):
        with pytest.raises(ValueError):
            remote.check_root(bad)
    assert str(remote.remote_dir("/scratch", make_task())) == "/scratch/u1/e1/t1"
    assert remote.cycle_input(["u1/e1/t1"], ["u1/e1/t0"]) == b"m u1/e1/t1\nr u1/e1/t0\n"
    for bad in ("u1/e1", "../e1/t1", "u1/e1/t1/x", "u1/e 1/t1", "/u1/e1/t1", "u1/../t1"):
        with pytest.raises(ValueError):
            remote.cycle_input([], [bad])


def test_parse_cycle_keeps_markers_and_skips_half_written_ones() -> None:
    out = ('u/e/a\t{"exit_code": 0, "started": "2026-12-01T10:00:00Z", "finished": "2026-12-01T10:00:01Z", '
           '"signal": ""}\nu/e/b\t{"exit_co\nnonsense\nu/e/c\t{"exit_code": 137, "signal": "TERM"}\n')
    markers = remote.parse_cycle(out)
    assert sorted(markers) == ["u/e/a", "u/e/c"]
    assert markers["u/e/a"].exit_code == 0 and markers["u/e/a"].signal is None
    assert markers["u/e/c"].signal == "TERM"


def test_the_packer_is_sendable() -> None:
    assert packer.FEM_DIR == FEM_DIR
    tree = ast.parse(remote.PACKER_SOURCE)
    imported = {n.module if isinstance(n, ast.ImportFrom) else a.name for n in ast.walk(tree)
                if isinstance(n, ast.Import | ast.ImportFrom) for a in n.names}
    assert all(isinstance(n, ast.Import) or n.level == 0 for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    assert imported <= {"gzip", "os", "sys", "tarfile", "zlib", "fnmatch", "pathlib", "typing"}, imported
    argv = remote.pack_argv("python3", PurePosixPath("/s/u/e/t"), ["a/**", "b"], 1000, None)
    assert argv[:4] == ["python3", "-E", "-S", "-c"] and argv[5:] == ["/s/u/e/t", "1000", "auto", "a/**", "b"]
    with pytest.raises(ValueError):
        remote.sif_pull_argv("apptainer", PurePosixPath("/c"), "../x", IMAGE, pull_args=[], force=False, never=False)


def hostile_tree(wd: Path, outside: Path) -> None:
    (wd / "out" / "deep").mkdir(parents=True)
    (wd / "out" / "a.txt").write_text("a\n")
    (wd / "out" / "deep" / "b.csv").write_text("1,2\n" * 1000)
    outside.mkdir(exist_ok=True)
    (outside / "secret").write_text("secret\n")
    (wd / "out" / "leak").symlink_to(outside / "secret")
    (wd / "out" / "linkdir").symlink_to(outside)
    (wd / "inside").symlink_to(wd / "out" / "a.txt")
    (wd / FEM_DIR).mkdir()
    (wd / FEM_DIR / "stdout").write_text("the log\n")


def remote_pack(wd: Path, patterns: list[str], max_bytes: int = 10**9) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(remote.pack_argv(sys.executable, PurePosixPath(str(wd)), patterns, max_bytes, None),
                          capture_output=True, timeout=60)


def members(data: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return {m.name: (tar.extractfile(m).read() if m.isfile() else b"") for m in tar}  # type: ignore[union-attr]


def test_remote_packer_selects_what_the_local_stage_out_selects(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    hostile_tree(wd, tmp_path / "outside")
    patterns = ["out/**", "inside", "out/linkdir", "missing*"]
    local = build_archive(wd, patterns, max_bytes=10**9)
    proc = remote_pack(wd, patterns)
    assert proc.returncode == 0, proc.stderr
    skipped, said = remote.parse_pack_stderr(proc.stderr.decode())
    assert said == ""
    assert sorted(skipped) == sorted(local.skipped)
    assert {s.split(":")[0] for s in skipped} == {"out/leak", "out/linkdir"}
    assert members(proc.stdout) == members(local.path.read_bytes())
    assert "outputs/out/leak" not in members(proc.stdout)
    assert members(proc.stdout)["logs/stdout"] == b"the log\n"
    files, _ = collect(wd, patterns)
    assert [str(f.relative_to(wd)) for f in files] == ["inside", "out/a.txt", "out/deep/b.csv"]


def test_remote_packer_enforces_the_size_cap(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    hostile_tree(wd, tmp_path / "outside")
    proc = remote_pack(wd, ["out/**"], max_bytes=100)
    assert proc.returncode == packer.EXIT_OVER_LIMIT and proc.stdout == b""
    assert "over this site's limit of 100 bytes" in proc.stderr.decode()
    with pytest.raises(StageOutError, match="over this site's limit of 100 bytes"):
        build_archive(wd, ["out/**"], max_bytes=100)


# -- the remote side through a local runner --------------------------------------------------------
@pytest.fixture
def rig(tmp_path: Path):
    cluster = tmp_path / "cluster" / "scratch"
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
                             "executors": {"slurm": {}}})
    settings = SlurmSettings_remote(cluster, tmp_path)
    ex = SlurmExecutor("slurm", settings, site)
    ex.runner = LocalRunner()  # the "cluster" is a directory of this machine; SSH is test_offcluster's part
    yield ex, site, cluster
    ex.close()


def SlurmSettings_remote(cluster: Path, tmp: Path, **more: Any):  # noqa: N802 - a settings factory
    raw = {"remote_work_root": str(cluster), "ssh": {"host": f"remote-{id(tmp)}"}, "remote_python": sys.executable,
           **more}
    problems = registry.validate_settings("slurm", raw)
    assert not problems, problems
    return registry.get("slurm").Settings.model_validate(raw)


def staged_job(site: Any, task: Any) -> Job:
    wd = site.work_root / task.user_id / task.execution / task.id
    (wd / FEM_DIR).mkdir(parents=True)
    (wd / "input.txt").write_text("input\n")
    (wd / "link").symlink_to("input.txt")
    (wd / FEM_DIR / "job.sh").write_text("#!/bin/sh\n")
    return Job(task=task, workdir=wd)


def test_stage_sends_the_work_dir_in_one_stream_and_replaces_an_old_one(rig) -> None:
    ex, site, cluster = rig
    job = staged_job(site, make_task())
    ex.stage_remote(job)
    there = cluster / "u1" / "e1" / "t1"
    assert (there / "input.txt").read_text() == "input\n"
    assert (there / "link").is_symlink() and (there / "link").read_text() == "input\n"
    assert (there / FEM_DIR / "job.sh").exists()
    (there / "stale").write_text("from an earlier attempt")
    ex.stage_remote(job)
    assert not (there / "stale").exists()


def test_markers_in_one_read_and_removal_in_one_command(rig) -> None:
    ex, site, cluster = rig
    jobs = [staged_job(site, make_task(f"t{i}")) for i in range(3)]
    for j in jobs:
        ex.stage_remote(j)
    assert ex.read_markers(jobs) == {}
    (cluster / "u1" / "e1" / "t1" / FEM_DIR / "exit_code").write_text(json.dumps({"exit_code": 3}) + "\n")
    found = ex.read_markers(jobs)
    assert list(found) == ["t1"] and found["t1"].exit_code == 3
    assert (cluster / "u1" / "e1" / "t1").exists()  # a read never removes: the retention pass does
    # What the retention pass asks for (test_remote_retention.py): many dirs, one command; one
    # already gone is no error.
    ex.remove_remote(["u1/e1/t1", "u1/e1/t2", "u1/e1/gone"])
    assert sorted(p.name for p in (cluster / "u1" / "e1").iterdir()) == ["t0"]
    with pytest.raises(ValueError):
        ex.remove_remote(["u1/../t0"])


def test_fetch_builds_the_archive_there_and_hashes_it_on_the_way(rig) -> None:
    ex, site, cluster = rig
    job = staged_job(site, make_task(outputs=["out/**"]))
    ex.stage_remote(job)
    there = cluster / "u1" / "e1" / "t1"
    hostile_tree_outputs = there / "out"
    hostile_tree_outputs.mkdir()
    (hostile_tree_outputs / "r.txt").write_text("result\n")
    (hostile_tree_outputs / "leak").symlink_to("/etc/hostname")
    (there / FEM_DIR / "stdout").write_text("out log\n")
    (there / FEM_DIR / "stderr").write_text("err log\n")
    archive = ex.fetch_outputs(job, ["out/**"], max_bytes=10**6, compress_level=None)
    assert archive is not None and archive.path == job.fem_dir / "outputs.tar.gz"
    data = archive.path.read_bytes()
    assert archive.size == len(data) and archive.sha256 == hashlib.sha256(data).hexdigest()
    got = members(data)
    assert got["outputs/out/r.txt"] == b"result\n" and "outputs/out/leak" not in got
    assert archive.skipped == ["out/leak: symlink pointing outside the work dir, not followed"]
    assert (job.fem_dir / "stdout").read_text() == "out log\n"  # the tails come from here
    assert (job.fem_dir / "stderr").read_text() == "err log\n"
    with pytest.raises(StageOutError, match="over this site's limit of 3 bytes"):
        ex.fetch_outputs(job, ["out/**"], max_bytes=3, compress_level=None)


def test_fetch_without_python_on_the_cluster_says_so(tmp_path: Path) -> None:
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")})
    ex = SlurmExecutor("slurm", SlurmSettings_remote(tmp_path / "c", tmp_path, remote_python="fem-no-python3"), site)
    ex.runner = LocalRunner()
    try:
        job = staged_job(site, make_task())
        ex.stage_remote(job)
        with pytest.raises(ExecutorError, match="fem-no-python3"):  # over SSH: exit 127, "set remote_python"
            ex.fetch_outputs(job, [], max_bytes=10, compress_level=None)
        check = ex.health_checks()[0]
        assert check.name == "remote work root" and check.status == "error"
    finally:
        ex.close()


class ClusterPathRunner(LocalRunner):
    """A local runner whose commands find only what is in `bin` on PATH: a cluster where some
    tools are not installed (a real shell and real binaries, with fewer of them)."""

    def __init__(self, bin_dir: Path):
        self.path = str(bin_dir)

    def run(self, argv: list[str], *, timeout: float = 30, env: dict[str, str] | None = None):
        return super().run(argv, timeout=timeout, env={**(env or {}), "PATH": self.path})


@pytest.mark.parametrize(("tools", "runtime", "status"), [
    (("sh", "mkdir", "tar", "flock"), "apptainer", "ok"),
    (("sh", "mkdir", "tar"), "apptainer", "warning"),
    (("sh", "mkdir", "tar"), "docker", "ok"),  # no SIF cache, no lock: flock is not needed
], ids=["with flock", "no flock, apptainer", "no flock, docker"])
def test_the_remote_work_root_check_looks_for_flock(tmp_path: Path, tools: tuple[str, ...], runtime: str,
                                                    status: str) -> None:
    bin_dir = tmp_path / "cluster-bin"
    bin_dir.mkdir()
    for tool in tools:
        found = shutil.which(tool)
        assert found is not None, tool
        (bin_dir / tool).symlink_to(found)
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w")})
    ex = SlurmExecutor("slurm", SlurmSettings_remote(tmp_path / "c", tmp_path, container={"runtime": runtime}), site)
    ex.runner = ClusterPathRunner(bin_dir)
    try:
        check = ex.health_checks()[0]
    finally:
        ex.close()
    assert (check.name, check.status) == ("remote work root", status), check
    assert f"{tmp_path / 'c'} writable on the cluster, {sys.executable} {sys.version.split()[0]}" in check.detail
    if status == "warning":
        assert "flock not found on the cluster" in check.detail and str(tmp_path / "c" / ".sif") in check.detail
        assert check.fix is not None and "util-linux" in check.fix
    else:
        assert check.detail.endswith(", flock") == ("flock" in tools)


def test_the_job_script_names_only_cluster_paths(rig) -> None:
    ex, site, cluster = rig
    job = staged_job(site, make_task())
    script = render_job(ex, job)
    there = str(cluster / "u1" / "e1" / "t1")
    assert f"--chdir={there}" in script and f"FEM_DIR={there}/.fem" in script
    assert str(site.work_root) not in script
    assert f"--job-name={job_name('t1')}" in script


def test_settings_say_what_is_wrong() -> None:
    def problems(raw: dict[str, Any]) -> str:
        return " ".join(registry.validate_settings("slurm", raw))

    assert "needs ssh" in problems({"remote_work_root": "/scratch"})
    assert "needs remote_work_root" in problems({"shared_fs": False})
    assert "drop shared_fs: true" in problems({"remote_work_root": "/scratch", "shared_fs": True,
                                                "ssh": {"host": "h"}})
    assert "absolute path" in problems({"remote_work_root": "scratch", "ssh": {"host": "h"}})
    assert problems({"remote_work_root": "/scratch", "shared_fs": False, "ssh": {"host": "h"}}) == ""


# -- the cluster-side SIF cache, with the FAKE apptainer ---------------------------------------------
def test_sif_pull_there_once_under_a_lock_then_cached(rig, tmp_path: Path) -> None:
    ex, site, cluster = rig
    fake = install_fake(tmp_path / "fakebin")
    ex.settings.container.binary = str(fake)
    job = Job(task=make_task(image=IMAGE), workdir=site.work_root / "x")
    errors: list[BaseException] = []

    def pull() -> None:
        try:
            ex.stage_in(job)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=pull) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(calls(tmp_path / "fakebin", "pull")) == 1  # the flock made the others find it
    sif = Path(ex.remote.image_argument(IMAGE))  # type: ignore[union-attr]
    assert sif.parent == cluster / ".sif" and sif.read_bytes().startswith(b"#!/usr/bin/env run-singularity")
    assert not [p for p in sif.parent.iterdir() if ".tmp" in p.name]
    ex.stage_in(job)
    assert len(calls(tmp_path / "fakebin", "pull")) == 1
    ex.settings.container.pull_policy = "always"
    ex.stage_in(job)
    assert len(calls(tmp_path / "fakebin", "pull")) == 2
    ex.settings.container.pull_policy = "never"
    with pytest.raises(ExecutorError, match="pull_policy is never"):
        ex.stage_in(Job(task=make_task(image="127.0.0.1:5000/fem/other:1"), workdir=site.work_root / "y"))
    with pytest.raises(ExecutorError, match="manifest unknown"):
        ex.settings.container.pull_policy = "if-not-present"
        ex.stage_in(Job(task=make_task(image="127.0.0.1:5000/fem/nonexistent:1"), workdir=site.work_root / "z"))
    script = render_job(ex, job)
    assert str(sif) in script and str(site.state_dir) not in script
