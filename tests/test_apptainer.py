"""Apptainer/Singularity executor, SIF cache and container launch lines.

No apptainer binary exists on the test machine: these tests use tests/fakes/apptainer, a FAKE
binary that records its argv and writes a file shaped like a SIF on `pull` (see its docstring);
the last test runs the real binary where one exists and is skipped elsewhere.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from apptainerkit import IMAGE, calls, install_fake

from fem_hpc.executors import registry, site_from_dict
from fem_hpc.executors.apptainer import ApptainerExecutor
from fem_hpc.executors.base import Job
from fem_hpc.executors.containers import container_launch, docker_cleanup_argv
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State, Task
from fem_hpc.staging.images import ImageError, ensure_sif, parse_image_ref, sif_path
from fem_hpc.staging.volumes import Mount

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    return tmp_path / "bin"


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    (d / "input.txt").write_text("volume data\n")
    return d


def make_site(tmp_path: Path, data_dir: Path, executor: dict[str, Any], **extra: Any):
    cfg = {
        "node": "testnode",
        "state_dir": str(tmp_path / "state"),
        "work_root": str(tmp_path / "work"),
        "default_executor": "apptainer",
        "executors": {"apptainer": {"kill_grace_seconds": 1, **executor}},
        "volumes": {"data": {"path": str(data_dir), "mode": "ro"}},
        "policy": {"images": ["127.0.0.1:*"]},
        **extra,
    }
    return site_from_dict(cfg)


def run_tasks(site, tasks: list[dict[str, Any]], timeout: float = 30) -> dict[str, Any]:
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    try:
        for t in tasks:
            res = agent.intake(t)
            assert res.record is not None, res.errors
        out = {}
        for t in tasks:
            rec = agent.wait(t["id"], timeout)
            assert rec is not None and rec.final, f"{t['id']} not final after {timeout}s: {rec and rec.state}"
            out[t["id"]] = rec
        return out
    finally:
        agent.close()


def task(task_id: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "image": IMAGE, "command": command, **extra}


# -- image references and cache keys ------------------------------------------------------------
@pytest.mark.parametrize(("text", "registry_", "repo", "tag", "digest", "normalized"), [
    ("busybox", "docker.io", "library/busybox", None, None, "docker.io/library/busybox:latest"),
    ("debian:12", "docker.io", "library/debian", "12", None, "docker.io/library/debian:12"),
    ("index.docker.io/user/x:1", "docker.io", "user/x", "1", None, "docker.io/user/x:1"),
    ("127.0.0.1:5000/fem/busybox:1", "127.0.0.1:5000", "fem/busybox", "1", None,
     "127.0.0.1:5000/fem/busybox:1"),
    ("localhost/a/b", "localhost", "a/b", None, None, "localhost/a/b:latest"),
    (f"ghcr.io/o/r@{DIGEST}", "ghcr.io", "o/r", None, DIGEST, f"ghcr.io/o/r@{DIGEST}"),
    (f"reg:5000/o/r:v2@{DIGEST}", "reg:5000", "o/r", "v2", DIGEST, f"reg:5000/o/r:v2@{DIGEST}"),
])
def test_parse_image_ref(text, registry_, repo, tag, digest, normalized):
    ref = parse_image_ref(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry_, repo, tag, digest)
    assert ref.normalized == normalized


@pytest.mark.parametrize("bad", ["", "UPPER/case", "a b", "x@sha256:short", "repo:bad tag", "r:-x", "a//b"])
def test_parse_image_ref_rejects(bad):
    with pytest.raises(ImageError):
        parse_image_ref(bad)


def test_sif_key_digest_and_normalized_ref(tmp_path: Path):
    # a pinned digest names the SIF, whatever the tag or registry spelling
    assert sif_path(tmp_path, f"reg:5000/o/r:v2@{DIGEST}").name == f"sha256-{'ab' * 32}.sif"
    assert sif_path(tmp_path, f"reg:5000/o/r@{DIGEST}") == sif_path(tmp_path, f"reg:5000/o/r:v2@{DIGEST}")
    # without one, the normalized reference: equal spellings share a SIF, different tags do not
    assert sif_path(tmp_path, "busybox") == sif_path(tmp_path, "docker.io/library/busybox:latest")
    assert sif_path(tmp_path, "busybox:1") != sif_path(tmp_path, "busybox:2")
    assert sif_path(tmp_path, "busybox").name.startswith("ref-")


# -- exact command lines ---------------------------------------------------------------------------
def test_launch_line_exact(tmp_path: Path, fake_bin: Path, data_dir: Path):
    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary)})
    ex = registry.create("apptainer", site)
    assert isinstance(ex, ApptainerExecutor)
    t = Task.model_validate({"id": "t1", "image": IMAGE, "command": ["python3", "run.py", "--n", "3"],
                             "env": {"GREETING": "hello world", "A_B": "$(rm -rf /)"},
                             "volumes": [{"name": "data", "target": "/data", "mode": "ro"}],
                             "source": {"git": "file:///x", "path": "sub/dir"}})
    wd = tmp_path / "work" / "anonymous" / "t1" / "t1"
    job = Job(task=t, workdir=wd)
    sif = site.state_dir / "sif" / sif_path(Path("."), IMAGE).name
    ctx = ex.template_context(job)
    assert ctx["launch"] == [
        str(binary), "exec", "--containall", "--cleanenv", "--pwd", f"{wd}/sub/dir",
        "--bind", f"{wd}:{wd}:rw", "--bind", f"{data_dir}:/data:ro", str(sif)]
    assert ctx["env_exports"] == [("APPTAINERENV_A_B", "$(rm -rf /)"), ("APPTAINERENV_GREETING", "hello world")]

    from fem_hpc.render import render_job

    script = render_job(ex, job)
    # the launch prefix and the argv, each word quoted; env values only in the export lines
    assert (f"exec {binary} exec --containall --cleanenv --pwd {wd}/sub/dir --bind {wd}:{wd}:rw "
            f"--bind {data_dir}:/data:ro {sif} python3 run.py --n 3") in script
    assert "export APPTAINERENV_A_B='$(rm -rf /)'" in script
    assert "export APPTAINERENV_GREETING='hello world'" in script


def test_launch_line_singularity_prefix_and_gpus(tmp_path: Path):
    t = Task.model_validate({"id": "t2", "image": IMAGE, "command": ["nvidia-smi"], "env": {"X": "1"},
                             "resources": {"gpus": 1}})
    job = Job(task=t, workdir=tmp_path / "wd")
    launch, env = container_launch("singularity", job, "/c/i.sif", binary="/opt/bin/singularity")
    assert launch == ["/opt/bin/singularity", "exec", "--containall", "--cleanenv", "--pwd", str(tmp_path / "wd"),
                      "--bind", f"{tmp_path / 'wd'}:{tmp_path / 'wd'}:rw", "--nv", "/c/i.sif"]
    assert env == [("SINGULARITYENV_X", "1")]


def test_launch_line_docker_in_batch_job(tmp_path: Path):
    """What a Slurm/PBS job script runs for a task with an image and docker as the site runtime."""
    t = Task.model_validate({"id": "t3", "image": IMAGE, "command": ["sh", "-c", "echo $SECRET"],
                             "env": {"SECRET": "s3cr3t-value", "B": "2"},
                             "volumes": [{"name": "data", "target": "/data"}],
                             "resources": {"cpus": 2, "memory": "1G"}})
    wd = tmp_path / "wd"
    job = Job(task=t, workdir=wd)
    mounts = [Mount(source=Path("/srv/data"), target="/data", read_only=True)]
    launch, env = container_launch("docker", job, IMAGE, mounts, user="1000:1000", node="N1")
    assert launch == [
        "docker", "run", "--rm", "--init", "--name", "fem-N1-t3", "--label", "fem.task_id=t3",
        "--label", "fem.node=N1", "--network", "none", "--security-opt", "no-new-privileges",
        "--cap-drop", "ALL", "--user", "1000:1000", "-v", f"{wd}:{wd}:rw", "-v", "/srv/data:/data:ro",
        "-w", str(wd), "--cpus", "2", "--memory", "1024m", "--memory-swap", "1024m",
        "-e", "B", "-e", "SECRET", "--entrypoint", "", IMAGE]
    assert "s3cr3t-value" not in " ".join(launch)  # values by name only: the wrapper exports them
    assert env == [("B", "2"), ("SECRET", "s3cr3t-value")]
    assert docker_cleanup_argv("t3", "N1") == ["docker", "rm", "-f", "fem-N1-t3"]
    auto, _ = container_launch("docker", job, IMAGE)
    assert auto[auto.index("--user") + 1] == f"{os.getuid()}:{os.getgid()}"


# -- the whole lifecycle through the agent, with the FAKE binary ---------------------------------------
def test_lifecycle_exec_line_env_and_outputs(tmp_path: Path, fake_bin: Path, data_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch):
    binary = install_fake(fake_bin)
    monkeypatch.setenv("HOST_ONLY_VARIABLE", "must-not-leak")
    site = make_site(tmp_path, data_dir, {"binary": str(binary)})
    value = "it's \"quoted\" $(not run) `nor this`"
    recs = run_tasks(site, [task("life1", ["sh", "-c", "printf %s \"$MSG\" > out.txt; env > env.txt; pwd"],
                                 env={"MSG": value},
                                 volumes=[{"name": "data", "target": "/data", "mode": "ro"}])])
    rec = recs["life1"]
    assert rec.state == State.COMPLETED, rec.message
    wd = Path(rec.workdir)
    assert (wd / "out.txt").read_text() == value
    env_seen = (wd / "env.txt").read_text()
    assert "MSG=" in env_seen and "HOST_ONLY_VARIABLE" not in env_seen  # --cleanenv, APPTAINERENV_ stripped
    assert (wd / ".fem" / "stdout").read_text().strip() == str(wd)  # --pwd
    sif = site.state_dir / "sif" / sif_path(Path("."), IMAGE).name
    assert sif.read_bytes().startswith(b"#!/usr/bin/env run-singularity")
    pulls = calls(fake_bin, "pull")
    assert len(pulls) == 1
    tmp_sif = pulls[0]["argv"][1]
    assert pulls[0]["argv"] == ["pull", tmp_sif, f"docker://{IMAGE}"]
    assert Path(tmp_sif).parent == sif.parent and tmp_sif.endswith(".sif") and not Path(tmp_sif).exists()
    execs = calls(fake_bin, "exec")
    assert len(execs) == 1
    assert execs[0]["argv"] == [
        "exec", "--containall", "--cleanenv", "--pwd", str(wd), "--bind", f"{wd}:{wd}:rw",
        "--bind", f"{data_dir}:/data:ro", str(sif),
        "sh", "-c", "printf %s \"$MSG\" > out.txt; env > env.txt; pwd"]
    assert "APPTAINERENV_MSG" in execs[0]["env_keys"]


def test_sif_cache_reused_by_the_next_task(tmp_path: Path, fake_bin: Path, data_dir: Path):
    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary)})
    first = run_tasks(site, [task("c1", ["true"])])
    assert first["c1"].state == State.COMPLETED
    second = run_tasks(site, [task("c2", ["true"]), task("c3", ["true"])])
    assert all(r.state == State.COMPLETED for r in second.values())
    assert len(calls(fake_bin, "pull")) == 1
    assert len(calls(fake_bin, "exec")) == 3
    assert [p.name for p in (site.state_dir / "sif").glob("*.sif")] == [sif_path(Path("."), IMAGE).name]


def test_exit_code_and_cancel(tmp_path: Path, fake_bin: Path, data_dir: Path):
    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary)})
    rec = run_tasks(site, [task("ec3", ["sh", "-c", "echo bad >&2; exit 3"])])["ec3"]
    assert (rec.state, rec.reason, rec.exit_code) == (State.FAILED, "EXIT_CODE", 3)
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    try:
        agent.intake(task("sleepy", ["sleep", "60"]))
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and agent.journal.get("sleepy").state != State.RUNNING:
            time.sleep(0.1)
        assert agent.journal.get("sleepy").state == State.RUNNING
        agent.cancel("sleepy")
        rec = agent.wait("sleepy", 15)
        assert rec is not None and rec.state == State.CANCELLED
    finally:
        agent.close()


def test_missing_image_fails_stage_in(tmp_path: Path, fake_bin: Path, data_dir: Path):
    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary)})
    rec = run_tasks(site, [{"id": "nope", "image": "127.0.0.1:5000/fem/nonexistent:1", "command": ["true"]}])["nope"]
    assert (rec.state, rec.reason) == (State.FAILED, "STAGE_IN")
    assert "pull of 127.0.0.1:5000/fem/nonexistent:1 failed" in rec.message
    assert "manifest unknown" in rec.message
    assert not calls(fake_bin, "exec")
    assert not list((site.state_dir / "sif").glob("*.sif")) and not list((site.state_dir / "sif").glob(".*.tmp.sif"))


def test_no_runtime_binary_fails_stage_in(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    site = make_site(tmp_path, data_dir, {})
    rec = run_tasks(site, [task("nobin", ["true"])])["nobin"]
    assert (rec.state, rec.reason) == (State.FAILED, "STAGE_IN")
    assert "neither apptainer nor singularity is on PATH" in rec.message


def test_finds_singularity_when_no_apptainer(tmp_path: Path, fake_bin: Path, data_dir: Path,
                                             monkeypatch: pytest.MonkeyPatch):
    install_fake(fake_bin, "singularity")
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    site = make_site(tmp_path, data_dir, {"insecure_registries": ["127.0.0.1:5000"]})
    rec = run_tasks(site, [task("sing", ["sh", "-c", "echo $V"], env={"V": "via singularity"})])["sing"]
    assert rec.state == State.COMPLETED, rec.message
    assert (Path(rec.workdir) / ".fem" / "stdout").read_text() == "via singularity\n"
    (pull,) = calls(fake_bin, "pull")
    assert pull["prog"] == "singularity" and pull["argv"][:2] == ["pull", "--nohttps"]
    (ex,) = calls(fake_bin, "exec")
    assert ex["prog"] == "singularity" and "SINGULARITYENV_V" in ex["env_keys"]
    assert "APPTAINERENV_V" not in ex["env_keys"]


def test_prefers_apptainer_and_no_https_for_insecure_registry(tmp_path: Path, fake_bin: Path, data_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch):
    install_fake(fake_bin, "singularity")
    install_fake(fake_bin, "apptainer")
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    site = make_site(tmp_path, data_dir, {"insecure_registries": ["127.0.0.1:5000"]})
    assert run_tasks(site, [task("pref", ["true"])])["pref"].state == State.COMPLETED
    progs = {c["prog"] for c in calls(fake_bin)}
    assert progs == {"apptainer"}
    (pull,) = calls(fake_bin, "pull")
    assert pull["argv"][:2] == ["pull", "--no-https"]


def test_registry_credentials_in_env_never_argv(tmp_path: Path, fake_bin: Path, data_dir: Path,
                                                caplog: pytest.LogCaptureFixture):
    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary)},
                     registries={"127.0.0.1:5001": {"username": "femuser", "password": "fempass-apptainer"}})
    caplog.set_level("DEBUG")
    rec = run_tasks(site, [{"id": "auth", "image": "127.0.0.1:5001/fem/busybox:1", "command": ["true"]}])["auth"]
    assert rec.state == State.COMPLETED, rec.message
    (pull,) = calls(fake_bin, "pull")
    assert "fempass-apptainer" not in json.dumps(pull["argv"])
    assert {"APPTAINER_DOCKER_USERNAME", "APPTAINER_DOCKER_PASSWORD"} <= set(pull["env_keys"])
    assert pull["usernames"] == {"APPTAINER_DOCKER_USERNAME": "femuser"}
    assert "fempass-apptainer" not in caplog.text
    script = (Path(rec.workdir) / ".fem" / "job.sh").read_text()
    assert "fempass-apptainer" not in script


def test_pull_policy_never_needs_a_cached_sif(tmp_path: Path, fake_bin: Path, data_dir: Path):
    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary), "pull_policy": "never"})
    rec = run_tasks(site, [task("never", ["true"])])["never"]
    assert (rec.state, rec.reason) == (State.FAILED, "STAGE_IN")
    assert "pull_policy is 'never'" in rec.message
    assert not calls(fake_bin, "pull")


# -- concurrency of the SIF cache ------------------------------------------------------------------------
def test_concurrent_ensure_sif_threads_pull_once(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch):
    binary = install_fake(fake_bin)
    monkeypatch.setenv("FAKE_APPTAINER_PULL_SECONDS", "0.5")
    cache = tmp_path / "sif"
    barrier = threading.Barrier(8)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            barrier.wait()
            results.append(ensure_sif(str(binary), IMAGE, cache))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    assert len(results) == 8 and len(set(results)) == 1
    assert results[0] == sif_path(cache, IMAGE) and results[0].is_file()
    assert len(calls(fake_bin, "pull")) == 1
    assert not list(cache.glob(".*.tmp.sif"))


def _pull_in_process(binary: str, cache: str, queue: Any) -> None:
    queue.put(str(ensure_sif(binary, IMAGE, Path(cache))))


def test_concurrent_ensure_sif_processes_pull_once(tmp_path: Path, fake_bin: Path, monkeypatch: pytest.MonkeyPatch):
    binary = install_fake(fake_bin)
    monkeypatch.setenv("FAKE_APPTAINER_PULL_SECONDS", "0.5")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_pull_in_process, args=(str(binary), str(tmp_path / "sif"), queue)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert all(p.exitcode == 0 for p in procs)
    paths = {queue.get(timeout=5) for _ in procs}
    assert paths == {str(sif_path(tmp_path / "sif", IMAGE))}
    assert len(calls(fake_bin, "pull")) == 1


def test_force_pull_replaces_atomically(tmp_path: Path, fake_bin: Path):
    binary = install_fake(fake_bin)
    cache = tmp_path / "sif"
    first = ensure_sif(str(binary), IMAGE, cache)
    inode = first.stat().st_ino
    with open(first, "rb") as held:  # a running job keeps reading the SIF it opened
        again = ensure_sif(str(binary), IMAGE, cache, force=True)
        assert held.read().startswith(b"#!/usr/bin/env run-singularity")
    assert again == first and again.stat().st_ino != inode
    assert len(calls(fake_bin, "pull")) == 2


# -- the real runtime, where there is one ------------------------------------------------------------
REAL = shutil.which("apptainer") or shutil.which("singularity")


@pytest.mark.skipif(REAL is None, reason="no apptainer or singularity binary on this machine")
def test_real_runtime_runs_the_test_image(tmp_path: Path, data_dir: Path):
    import services

    services.require("registry")
    site = make_site(tmp_path, data_dir, {"insecure_registries": ["127.0.0.1:5000"]})
    rec = run_tasks(site, [task("real", ["sh", "-c", "cat /data/input.txt; echo \"$V\" > out.txt; touch /data/x"],
                                env={"V": "from the real runtime"},
                                volumes=[{"name": "data", "target": "/data", "mode": "ro"}])], timeout=600)["real"]
    wd = Path(rec.workdir)
    assert (wd / ".fem" / "stdout").read_text() == "volume data\n"
    assert (wd / "out.txt").read_text() == "from the real runtime\n"
    assert rec.state == State.FAILED and rec.exit_code != 0  # the read-only volume refused the write
    assert not (data_dir / "x").exists()


def test_volume_target_over_the_work_dir_fails_stage_in(tmp_path: Path, fake_bin: Path, data_dir: Path):
    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary)})
    top = "/" + str(tmp_path).strip("/").split("/")[0]  # e.g. /tmp: above the work dir
    rec = run_tasks(site, [task("hide", ["true"], volumes=[{"name": "data", "target": top}])])["hide"]
    assert (rec.state, rec.reason) == (State.FAILED, "STAGE_IN")
    assert "would hide the work dir" in rec.message
    assert not calls(fake_bin)


def test_stage_image_for_batch_jobs(tmp_path: Path, fake_bin: Path, data_dir: Path):
    """The login-node stage-in the Slurm/PBS executors use before submitting a containerized task."""
    from fem_hpc.staging.images import stage_image

    binary = install_fake(fake_bin)
    site = make_site(tmp_path, data_dir, {"binary": str(binary)})
    with pytest.raises(ImageError, match="pull_policy is 'never'"):
        stage_image("apptainer", site, IMAGE, "never", binary=str(binary))
    first = stage_image("apptainer", site, IMAGE, binary=str(binary))
    assert first == str(sif_path(site.state_dir / "sif", IMAGE))
    assert stage_image("apptainer", site, IMAGE, binary=str(binary)) == first
    assert stage_image("apptainer", site, IMAGE, "never", binary=str(binary)) == first
    (pull,) = calls(fake_bin, "pull")
    assert pull["argv"] == ["pull", pull["argv"][1], f"docker://{IMAGE}"]
