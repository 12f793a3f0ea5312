"""Site policy: what a valid task may still not do on this site."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from fem_hpc.config import ConfigError, SiteConfig
from fem_hpc.executors import site_from_dict
from fem_hpc.model import Task, parse_task
from fem_hpc.policy import check_policy, effective_task, executor_for


@pytest.fixture
def cfg(tmp_path: Path, site: dict[str, Any]) -> SiteConfig:
    (tmp_path / "ro").mkdir()
    (tmp_path / "rw").mkdir()
    site["volumes"] = {"refdata": {"path": str(tmp_path / "ro")}, "scratch": {"path": str(tmp_path / "rw"),
                                                                            "mode": "rw"}}
    site["policy"] = {
        "images": ["127.0.0.1:5000/*", "docker.io/library/python:3.*"],
        "git": ["file://*", "https://git.example.org/fem/*"],
        "max_resources": {"cpus": 4, "memory": "8G", "walltime": "02:00:00", "gpus": 1, "nodes": 2},
        "default_resources": {"cpus": 1, "memory": "1G", "walltime": "00:30:00"},
    }
    return site_from_dict(site)


def task(**extra: Any) -> Task:
    t, errors = parse_task({"id": "t1", "command": ["true"], **extra})
    assert t is not None, errors
    return t


def policy_errors(cfg: SiteConfig, **extra: Any) -> dict[str, str]:
    return {e.field: e.message for e in check_policy(task(**extra), cfg)}


def test_plain_task_passes(cfg: SiteConfig) -> None:
    assert policy_errors(cfg) == {}


@pytest.mark.parametrize(
    ("resources", "field", "words"),
    [
        ({"cpus": 5}, "task.resources.cpus", ["5", "4"]),
        ({"gpus": 2}, "task.resources.gpus", ["2", "1"]),
        ({"nodes": 3}, "task.resources.nodes", ["3", "2"]),
        ({"memory": "9G"}, "task.resources.memory", ["9G", "8G"]),
        ({"memory": "8193M"}, "task.resources.memory", ["8193M"]),
        ({"walltime": "02:00:01"}, "task.resources.walltime", ["02:00:01", "02:00:00"]),
        ({"walltime": "1-00:00:00"}, "task.resources.walltime", ["1-00:00:00"]),
    ],
)
def test_resources_over_the_site_maximum(cfg: SiteConfig, resources: dict[str, Any], field: str,
                                         words: list[str]) -> None:
    errors = policy_errors(cfg, resources=resources)
    assert list(errors) == [field], errors
    assert "exceeds the site maximum" in errors[field]
    for w in words:
        assert w in errors[field]


def test_resources_at_the_maximum_pass(cfg: SiteConfig) -> None:
    at_max = {"cpus": 4, "memory": "8192M", "walltime": "02:00:00", "gpus": 1, "nodes": 2}
    assert policy_errors(cfg, resources=at_max) == {}


def test_every_resource_over_reported_at_once(cfg: SiteConfig) -> None:
    errors = policy_errors(cfg, resources={"cpus": 64, "memory": "1T", "walltime": "48:00:00", "gpus": 8})
    assert set(errors) == {"task.resources.cpus", "task.resources.memory", "task.resources.walltime",
                           "task.resources.gpus"}


def test_no_cap_when_unset(site: dict[str, Any]) -> None:
    cfg = site_from_dict(site)
    assert policy_errors(cfg, resources={"cpus": 1000, "memory": "100T", "walltime": "99-00:00:00"}) == {}


@pytest.mark.parametrize("image", ["127.0.0.1:5000/fem/solver:1", "docker.io/library/python:3.12-slim"])
def test_image_allowed_by_glob(cfg: SiteConfig, image: str) -> None:
    assert policy_errors(cfg, image=image) == {}


@pytest.mark.parametrize("image", ["docker.io/library/python:2.7", "evil.example/127.0.0.1:5000/x",
                                   "127.0.0.2:5000/x", "ubuntu"])
def test_image_refused(cfg: SiteConfig, image: str) -> None:
    errors = policy_errors(cfg, image=image)
    assert list(errors) == ["task.image"] and "policy.images" in errors["task.image"]


def test_no_image_allowed_by_default(site: dict[str, Any]) -> None:
    errors = policy_errors(site_from_dict(site), image="127.0.0.1:5000/x:1")
    assert list(errors) == ["task.image"]


@pytest.mark.parametrize("url", ["file:///srv/repo.git", "https://git.example.org/fem/solver.git"])
def test_git_url_allowed(cfg: SiteConfig, url: str) -> None:
    assert policy_errors(cfg, source={"git": url}) == {}


@pytest.mark.parametrize("url", ["https://github.com/x/y.git", "https://git.example.org/other/y.git",
                                 "ssh://git.example.org/fem/y", "/srv/repo.git"])
def test_git_url_refused(cfg: SiteConfig, url: str) -> None:
    errors = policy_errors(cfg, source={"git": url})
    assert list(errors) == ["task.source.git"] and "policy.git" in errors["task.source.git"]


def test_unknown_volume(cfg: SiteConfig) -> None:
    errors = policy_errors(cfg, volumes=[{"name": "refdata", "target": "/ref"},
                                         {"name": "home", "target": "/home"}])
    assert list(errors) == ["task.volumes.1.name"]
    assert "unknown volume 'home'" in errors["task.volumes.1.name"]
    assert "refdata" in errors["task.volumes.1.name"]  # lists what the site has


def test_rw_on_read_only_volume(cfg: SiteConfig) -> None:
    errors = policy_errors(cfg, volumes=[{"name": "refdata", "target": "/ref", "mode": "rw"}])
    assert list(errors) == ["task.volumes.0.mode"] and "read-only" in errors["task.volumes.0.mode"]
    assert policy_errors(cfg, volumes=[{"name": "scratch", "target": "/s", "mode": "rw"},
                                       {"name": "refdata", "target": "/ref", "mode": "ro"}]) == {}


def test_executor_not_configured(cfg: SiteConfig) -> None:
    errors = policy_errors(cfg, executor="slurm")
    assert list(errors) == ["task.executor"]
    assert "'slurm' is not configured" in errors["task.executor"] and "local" in errors["task.executor"]


def test_executor_not_allowed_by_policy(site: dict[str, Any]) -> None:
    site["executors"] = {"local": {}, "other": {"type": "local"}}
    site["policy"] = {"executors": ["other"]}
    cfg = site_from_dict(site)
    assert list(policy_errors(cfg)) == ["task.executor"]  # the default (local) is not in the allowed list
    assert policy_errors(cfg, executor="other") == {}


def test_executor_default(cfg: SiteConfig) -> None:
    assert executor_for(task(), cfg) == "local"
    assert executor_for(task(executor="x"), cfg) == "x"


def test_several_policy_problems_at_once(cfg: SiteConfig) -> None:
    errors = policy_errors(cfg, executor="pbs", image="ubuntu", source={"git": "https://github.com/a/b"},
                           volumes=[{"name": "nope", "target": "/n"}], resources={"cpus": 99})
    assert set(errors) == {"task.executor", "task.image", "task.source.git", "task.volumes.0.name",
                           "task.resources.cpus"}


def test_effective_task_fills_defaults(cfg: SiteConfig) -> None:
    eff = effective_task(task(), cfg)
    assert eff.resources.cpus == 1 and eff.resources.memory == "1G" and eff.resources.walltime == "00:30:00"
    assert eff.resources.gpus is None


def test_effective_task_keeps_what_was_asked(cfg: SiteConfig) -> None:
    t = task(resources={"cpus": 3, "walltime": "01:00:00"})
    eff = effective_task(t, cfg)
    assert eff.resources.cpus == 3 and eff.resources.walltime == "01:00:00" and eff.resources.memory == "1G"
    assert t.resources.memory is None  # the original is unchanged
    assert eff.model_dump(exclude={"resources"}) == t.model_dump(exclude={"resources"})


def test_builtin_default_resources(site: dict[str, Any]) -> None:
    eff = effective_task(task(), site_from_dict(site))
    assert eff.resources.cpus == 1 and eff.resources.walltime == "01:00:00"


def test_default_resources_must_fit_the_caps(site: dict[str, Any]) -> None:
    # Defaults are filled in after the policy check, so a default over a cap would slip past it.
    site["policy"] = {"max_resources": {"walltime": "00:30:00", "memory": "1G"},
                      "default_resources": {"memory": "2G", "walltime": "01:00:00"}}
    with pytest.raises(ConfigError) as info:
        site_from_dict(site)
    keys = sorted(p.split(":", 1)[0] for p in info.value.problems)
    assert keys == ["policy.default_resources.memory", "policy.default_resources.walltime"], info.value.problems
    # The built-in default walltime (01:00:00) counts too.
    site["policy"] = {"max_resources": {"walltime": "00:30:00"}}
    with pytest.raises(ConfigError) as info:
        site_from_dict(site)
    assert [p.split(":", 1)[0] for p in info.value.problems] == ["policy.default_resources.walltime"]
    site["policy"]["default_resources"] = {"memory": "1G", "walltime": "00:30:00", "cpus": 1}
    eff = effective_task(task(), site_from_dict(site))
    assert check_policy(eff, site_from_dict(site)) == []
