"""The configuration traps of the redesign review, each closed and kept closed (issue 10):
policy by executor type, SSH runners by their full settings and closed, a scrubbed task
environment on every executor, output globs that never walk through a symlink."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import services

from fem_hpc.config import config_from_dict
from fem_hpc.executors import registry, site_from_dict
from fem_hpc.executors.base import Job
from fem_hpc.executors.runners import SSHRunner, SSHSettings, release, runner_for, scrubbed_env
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State, parse_task
from fem_hpc.policy import check_policy
from fem_hpc.render import render_job
from fem_hpc.staging.outputs import build_archive, collect

SECRET_NAME, SECRET = "FEM_HPC_BROKER_URL", "amqp://fem:hunter2-secret@127.0.0.1:5672/%2f"
PASSED_NAME, PASSED = "SITE_LICENSE_SERVER", "27000@license.example"


def base(tmp: Path, **more: Any) -> dict[str, Any]:
    return {"node": "traps", "state_dir": str(tmp / "state"), "work_root": str(tmp / "work"), **more}


# -- policy by type ------------------------------------------------------------------------------------
def test_a_docker_typed_executor_needs_an_image(tmp_path: Path) -> None:
    site = config_from_dict(base(tmp_path, executors={"containers": {"type": "docker"}},
                                 default_executor="containers"))
    task, _ = parse_task({"id": "noimg", "command": ["true"]})
    errors = check_policy(task, site)
    assert [(e.field, e.message) for e in errors] == [
        ("task.image", "executor 'containers' (type docker) needs an image")]


def test_an_apptainer_typed_executor_needs_an_image(tmp_path: Path) -> None:
    site = config_from_dict(base(tmp_path, executors={"local": {}, "sif": {"type": "apptainer"}}))
    task, _ = parse_task({"id": "noimg", "command": ["true"], "executor": "sif"})
    assert [e.field for e in check_policy(task, site)] == ["task.image"]


def test_rejected_at_intake_not_at_stage_in(tmp_path: Path) -> None:
    site = config_from_dict(base(tmp_path, executors={"containers": {"type": "docker"}},
                                 default_executor="containers"))
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    try:
        res = agent.intake({"id": "noimg", "command": ["true"]})
        assert res.record is None and [e.field for e in res.errors] == ["task.image"]
        assert agent.journal.get("noimg") is None  # nothing journalled: a corrected resubmit is accepted
    finally:
        agent.close()


# -- SSH runners -------------------------------------------------------------------------------------------
def test_ssh_runners_are_keyed_by_all_their_settings(tmp_path: Path) -> None:
    a = runner_for(SSHSettings(host="cluster.example", user="fem", key_file=Path("/etc/fem/keyA"), max_channels=2))
    b = runner_for(SSHSettings(host="cluster.example", user="fem", key_file=Path("/etc/fem/keyB"), max_channels=8))
    a2 = runner_for(SSHSettings(host="cluster.example", user="fem", key_file=Path("/etc/fem/keyA"), max_channels=2))
    try:
        assert isinstance(a, SSHRunner) and isinstance(b, SSHRunner)
        assert a is not b and a is a2  # same settings share one connection, others get their own
        assert (a.settings.key_file, a.settings.max_channels) == (Path("/etc/fem/keyA"), 2)
        assert (b.settings.key_file, b.settings.max_channels) == (Path("/etc/fem/keyB"), 8)
    finally:
        for r in (a, a2, b):
            release(r)
    fresh = runner_for(SSHSettings(host="cluster.example", user="fem", key_file=Path("/etc/fem/keyA"), max_channels=2))
    assert fresh is not a  # the last release closed and dropped it
    release(fresh)


def test_two_executors_on_one_host_with_other_keys_get_their_own_runners(tmp_path: Path) -> None:
    ssh = {"host": "cluster.example", "user": "fem"}
    site = site_from_dict(base(tmp_path, executors={
        "local": {},
        "cpu": {"type": "slurm", "ssh": {**ssh, "key_file": "/etc/fem/cpu_key"}},
        "gpu": {"type": "slurm", "ssh": {**ssh, "key_file": "/etc/fem/gpu_key", "max_channels": 2}}}))
    cpu, gpu = registry.create("cpu", site), registry.create("gpu", site)
    try:
        assert cpu.runner is not gpu.runner
        assert gpu.runner.settings.key_file == Path("/etc/fem/gpu_key") and gpu.runner.settings.max_channels == 2
    finally:
        cpu.close()
        gpu.close()


def test_closing_the_agent_closes_its_ssh_runners(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    site = site_from_dict(base(tmp_path, executors={"local": {}, "remote": {
        "type": "slurm", "ssh": {"host": "cluster.example", "key_file": "/etc/fem/k"}}}))
    closed: list[str] = []
    monkeypatch.setattr(SSHRunner, "close", lambda self: closed.append(self.settings.host))
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    agent.executors.start("remote")
    agent.close()
    assert closed == ["cluster.example"]


# -- the task environment -----------------------------------------------------------------------------
def test_scrubbed_env_keeps_only_the_basics_and_the_pass_through_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SECRET_NAME, SECRET)
    monkeypatch.setenv(PASSED_NAME, PASSED)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "nope")
    env = scrubbed_env({"X": "1"}, [PASSED_NAME])
    assert env["X"] == "1" and env[PASSED_NAME] == PASSED and "PATH" in env
    assert SECRET_NAME not in env and "AWS_SECRET_ACCESS_KEY" not in env


def _env_task(task_id: str, **more: Any) -> dict[str, Any]:
    return {"id": task_id, "command": ["sh", "-c", "env > env.txt"], "outputs": ["env.txt"], **more}


def _run_env_task(tmp_path: Path, executors: dict[str, Any], task: dict[str, Any],
                  monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(SECRET_NAME, SECRET)
    monkeypatch.setenv(PASSED_NAME, PASSED)
    monkeypatch.setenv("FEM_TEST_OTHER_SECRET", "do-not-leak")
    site = site_from_dict(base(tmp_path, executors=executors, default_executor=next(iter(executors)),
                               pass_env=[PASSED_NAME], policy={"images": ["127.0.0.1:5000/*"]}))
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    try:
        assert agent.intake(task).created
        rec = agent.wait(task["id"], 120)
    finally:
        agent.close()
    assert rec is not None and rec.state == State.COMPLETED, (rec.state if rec else None, rec and rec.message)
    return (Path(rec.workdir) / "env.txt").read_text()


def _assert_clean(env_text: str, passed: bool = True) -> None:
    assert SECRET not in env_text and SECRET_NAME not in env_text
    assert "do-not-leak" not in env_text
    assert (f"{PASSED_NAME}={PASSED}" in env_text) is passed


def test_local_task_env_has_no_service_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _assert_clean(_run_env_task(tmp_path, {"local": {}}, _env_task("env-local"), monkeypatch))


@pytest.mark.slurm
def test_slurm_task_env_has_no_service_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services.require("slurm")
    _assert_clean(_run_env_task(tmp_path, {"slurm": {"poll": {"min_seconds": 0.5, "max_seconds": 2}}},
                                _env_task(f"env-slurm-{os.getpid()}"), monkeypatch))


@pytest.mark.pbs
def test_pbs_task_env_has_no_service_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services.require("pbs")
    _assert_clean(_run_env_task(tmp_path, {"pbs": {"dialect": "torque", "poll": {"min_seconds": 0.5,
                                                                                  "max_seconds": 2}}},
                                _env_task(f"env-pbs-{os.getpid()}"), monkeypatch))


@pytest.mark.docker
def test_docker_task_env_has_no_service_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    services.require("docker")
    services.require("registry")
    # A container never inherits the service's environment (nor the pass-through list: that is
    # for processes on the host); only the task's own env reaches it.
    _assert_clean(_run_env_task(tmp_path, {"docker": {}}, _env_task("env-docker", image="127.0.0.1:5000/fem/busybox:1"),
                                monkeypatch), passed=False)


def test_apptainer_command_line_env_has_no_service_secret(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Apptainer itself is not installable here: the rendered job script (what the wrapper runs)
    is checked instead. --cleanenv keeps the host env out; only the task's env is exported."""
    monkeypatch.setenv(SECRET_NAME, SECRET)
    fake = Path(__file__).parent / "fakes" / "apptainer"
    site = site_from_dict(base(tmp_path, executors={"apptainer": {"binary": str(fake)}},
                               default_executor="apptainer", pass_env=[PASSED_NAME]))
    task, errors = parse_task({"id": "env-sif", "image": "127.0.0.1:5000/fem/busybox:1", "command": ["env"],
                               "env": {"MODE": "a"}})
    assert task is not None, errors
    executor = registry.create("apptainer", site)
    script = render_job(executor, Job(task=task, workdir=tmp_path / "work" / "env-sif"))
    assert "--cleanenv" in script and "MODE" in script
    assert SECRET not in script and SECRET_NAME not in script


# -- output globs and symlinks ----------------------------------------------------------------------------
def test_a_symlinked_directory_lists_nothing_behind_it(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    (wd / "real").mkdir(parents=True)
    (wd / "real" / "ok.txt").write_text("ok")
    (wd / "link").symlink_to("/etc")
    (wd / "inner").symlink_to(wd / "real")
    for patterns in (["link/*"], ["link/**"], ["**/passwd"], ["*/*"], ["**"]):
        files, skipped = collect(wd, patterns)
        text = " ".join(skipped)
        assert "passwd" not in text and "hostname" not in text, (patterns, skipped)
        assert all(f.resolve().is_relative_to(wd.resolve()) for f in files), (patterns, files)
    files, skipped = collect(wd, ["*/*"])
    assert [str(f.relative_to(wd)) for f in files] == ["real/ok.txt"]
    assert skipped == []  # link/* and inner/* are not even walked
    files, skipped = collect(wd, ["link", "inner"])
    assert files == [] and sorted(skipped) == ["inner: symlinked directory, not followed",
                                               "link: symlink pointing outside the work dir, not followed"]


def test_symlinked_dir_output_leaves_no_names_in_the_result(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    (wd / ".fem").mkdir(parents=True)
    (wd / "link").symlink_to("/etc")
    archive = build_archive(wd, ["link/*"], max_bytes=1 << 20)
    assert archive.skipped == [] and archive.size > 0
