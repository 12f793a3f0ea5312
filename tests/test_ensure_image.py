"""`staging.images.ensure_image`, the one pull-policy implementation, per policy and runtime: the
docker daemon with the real local registry, apptainer/singularity with tests/fakes/apptainer (a
FAKE binary that logs its argv; no apptainer runs here), and batch `container.pull_policy`
reaching the Slurm/PBS job's stage-in and launch line."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import services
from apptainerkit import IMAGE, calls, install_fake

from fem_hpc.config import ConfigError
from fem_hpc.executors import registry, site_from_dict
from fem_hpc.executors.base import ExecutorError, Job
from fem_hpc.model import Task
from fem_hpc.render import render_job
from fem_hpc.staging.errors import StageError
from fem_hpc.staging.images import ImageError, ensure_image, pull_needed, sif_path


# -- the decision ----------------------------------------------------------------------------------
def _never_asked() -> bool:
    raise AssertionError("`always` must not ask whether the image is present")


@pytest.mark.parametrize(("policy", "present", "pull"), [
    ("always", _never_asked, True),
    ("if-not-present", lambda: True, False),
    ("if-not-present", lambda: False, True),
    ("never", lambda: True, False),
])
def test_pull_needed_table(policy, present, pull):
    assert pull_needed(policy, present, "image x is missing") is pull


def test_pull_needed_never_and_missing_names_the_image():
    with pytest.raises(ImageError, match=r"^image x is missing and pull_policy is 'never'$") as info:
        pull_needed("never", lambda: False, "image x is missing")
    assert isinstance(info.value, StageError)  # the agent ends the task STAGE_IN with this message


# -- apptainer / singularity, with the FAKE binary -------------------------------------------------------
def test_apptainer_per_policy(tmp_path: Path):
    binary = str(install_fake(tmp_path / "bin"))
    cache = tmp_path / "sif"
    target = sif_path(cache, IMAGE)
    notes: list[str] = []

    def ensure(policy: str) -> str:
        return ensure_image("apptainer", IMAGE, policy, binary=binary, cache_dir=cache, progress=notes.append)

    with pytest.raises(ImageError, match=r"is not in the SIF cache .* and pull_policy is 'never'"):
        ensure("never")
    assert calls(tmp_path / "bin", "pull") == [] and notes == []

    assert ensure("if-not-present") == str(target) and target.is_file()
    assert len(calls(tmp_path / "bin", "pull")) == 1
    assert notes == [f"pulling image {IMAGE} into the SIF cache"]
    inode = target.stat().st_ino

    assert ensure("if-not-present") == str(target)
    assert ensure("never") == str(target)
    assert len(calls(tmp_path / "bin", "pull")) == 1  # cached: neither pulls again

    assert ensure("always") == str(target)
    pulls = calls(tmp_path / "bin", "pull")
    assert len(pulls) == 2 and pulls[1]["argv"] == ["pull", pulls[1]["argv"][1], f"docker://{IMAGE}"]
    assert target.stat().st_ino != inode  # a fresh SIF renamed over the cached one


@pytest.mark.parametrize(("name", "flag"), [("apptainer", "--no-https"), ("singularity", "--nohttps")])
def test_insecure_registry_flag_follows_the_binary(tmp_path: Path, name: str, flag: str):
    binary = str(install_fake(tmp_path / "bin", name))
    ensure_image("apptainer", IMAGE, "if-not-present", binary=binary, cache_dir=tmp_path / "sif",
                 pull_args=["--disable-cache"], insecure_registries=["127.0.0.1:5000"])
    (pull,) = calls(tmp_path / "bin", "pull")
    assert pull["prog"] == name and pull["argv"][:3] == ["pull", "--disable-cache", flag]


def test_apptainer_without_a_binary_is_an_image_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ImageError, match="neither apptainer nor singularity is on PATH"):
        ensure_image("apptainer", IMAGE, "always", cache_dir=tmp_path / "sif")
    with pytest.raises(ImageError, match="'/no/such/apptainer' is not an executable"):
        ensure_image("apptainer", IMAGE, "always", binary="/no/such/apptainer", cache_dir=tmp_path / "sif")


# -- docker, with the real daemon and the local registry ------------------------------------------------
@pytest.fixture
def unique_ref():
    """A tag of the test image that this test alone uses: pushed to the local registry and then
    removed from the daemon, so it is absent here but pullable (other tests' tags stay untouched)."""
    services.require("docker")
    services.require("registry")
    import docker

    client = docker.from_env(timeout=120)
    ensure_image("docker", services.TEST_IMAGE, "if-not-present", docker_client=client)
    ref = f"{services.REGISTRY}/fem/busybox:pp-{uuid.uuid4().hex[:12]}"
    client.images.get(services.TEST_IMAGE).tag(ref)
    for line in client.api.push(ref, stream=True, decode=True):
        assert "error" not in line, line
    client.images.remove(ref)  # the tag only: the image keeps TEST_IMAGE
    try:
        yield client, ref
    finally:
        try:
            client.images.remove(ref)
        except docker.errors.ImageNotFound:
            pass
        client.close()


@pytest.mark.docker
def test_docker_per_policy(unique_ref):
    import docker.errors

    client, ref = unique_ref
    notes: list[str] = []

    def ensure(policy: str) -> str:
        return ensure_image("docker", ref, policy, docker_client=client, progress=notes.append)

    def pulls() -> int:
        return sum(n.startswith("pulling image") for n in notes)

    with pytest.raises(ImageError, match=r"is not present on this host and pull_policy is 'never'"):
        ensure("never")
    with pytest.raises(docker.errors.ImageNotFound):
        client.images.get(ref)
    assert pulls() == 0

    assert ensure("if-not-present") == ref
    assert pulls() == 1 and client.images.get(ref).id == client.images.get(services.TEST_IMAGE).id
    assert ensure("if-not-present") == ref and ensure("never") == ref
    assert pulls() == 1  # present: neither asks the registry
    assert ensure("always") == ref
    assert pulls() == 2


@pytest.mark.docker
def test_docker_executor_pull_policy_never(tmp_path: Path, unique_ref):
    """The docker executor's stage-in goes through ensure_image with its own pull_policy."""
    _client, ref = unique_ref
    site = site_from_dict({"node": f"pp{uuid.uuid4().hex[:8]}", "state_dir": str(tmp_path / "state"),
                             "work_root": str(tmp_path / "work"), "default_executor": "docker",
                             "executors": {"docker": {"pull_policy": "never"}},
                             "policy": {"images": ["127.0.0.1:*"]}})
    ex = registry.create("docker", site)
    job = Job(task=Task.model_validate({"id": "pp1", "image": ref, "command": ["true"]}),
              workdir=tmp_path / "work" / "pp1")
    job.workdir.mkdir(parents=True)
    try:
        with pytest.raises(ExecutorError, match=r"is not present on this host and pull_policy is 'never'"):
            ex.stage_in(job)
    finally:
        ex.close()


# -- batch jobs: container.pull_policy --------------------------------------------------------------------
def batch_site(tmp_path: Path, kind: str, container: dict[str, Any]):
    return site_from_dict({
        "node": "bn", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "default_executor": kind, "executors": {kind: {"container": container}},
        "policy": {"images": ["127.0.0.1:*"]}})


def batch_job(tmp_path: Path, task_id: str, image: str = IMAGE) -> Job:
    job = Job(task=Task.model_validate({"id": task_id, "image": image, "command": ["true"]}),
              workdir=tmp_path / "work" / task_id)
    job.fem_dir.mkdir(parents=True)
    return job


@pytest.mark.parametrize("kind", ["slurm", "pbs"])
def test_batch_pull_policy_reaches_the_stage_in(tmp_path: Path, kind: str):
    binary = str(install_fake(tmp_path / "bin"))
    never = registry.create(kind, batch_site(tmp_path, kind, {"binary": binary, "pull_policy": "never"}))
    with pytest.raises(ExecutorError, match="pull_policy is 'never'"):
        never.stage_in(batch_job(tmp_path, "b0"))
    assert calls(tmp_path / "bin", "pull") == []

    always = registry.create(kind, batch_site(tmp_path, kind, {"binary": binary, "pull_policy": "always"}))
    for task_id in ("b1", "b2"):
        job = batch_job(tmp_path, task_id)
        always.stage_in(job)
    assert len(calls(tmp_path / "bin", "pull")) == 2  # always: every job pulls

    default = registry.create(kind, batch_site(tmp_path, kind, {"binary": binary}))
    job = batch_job(tmp_path, "b3")
    default.stage_in(job)
    assert len(calls(tmp_path / "bin", "pull")) == 2  # if-not-present: the cached SIF
    # The job script runs the SIF the stage-in put in the cache.
    sif = sif_path(tmp_path / "state" / "sif", IMAGE)
    assert sif.is_file() and f"{binary} exec --containall" in render_job(default, job)
    assert str(sif) in render_job(default, job)
    never.stage_in(job)  # and `never` is content with it now


def test_batch_pull_policy_is_validated(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        batch_site(tmp_path, "slurm", {"pull_policy": "sometimes"})
    assert any(p.startswith("executors.slurm.container.pull_policy:") for p in info.value.problems), \
        info.value.problems


@pytest.mark.docker
def test_batch_docker_pull_policy(tmp_path: Path, unique_ref):
    client, ref = unique_ref
    never = registry.create("slurm", batch_site(tmp_path, "slurm", {"runtime": "docker", "pull_policy": "never"}))
    with pytest.raises(ExecutorError, match="is not present on this host and pull_policy is 'never'"):
        never.stage_in(batch_job(tmp_path, "d0", ref))
    pulled = registry.create("slurm", batch_site(tmp_path, "slurm", {"runtime": "docker"}))
    pulled.stage_in(batch_job(tmp_path, "d1", ref))
    assert client.images.get(ref).id == client.images.get(services.TEST_IMAGE).id
    never.stage_in(batch_job(tmp_path, "d2", ref))  # present now
