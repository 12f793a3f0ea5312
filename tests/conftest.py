"""Small shared fixtures: a site config dict in tmp_path, the real `fem-hpc` command, and a real
loopback sshd (tests/sshkit.py) for the tests that reach a cluster over SSH."""

from __future__ import annotations

import inspect
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services
import yaml
from sshkit import SSHD


def fem_hpc_command() -> list[str]:
    """The installed console script (next to this interpreter first), else `python -m fem_hpc.cli`."""
    beside = Path(sys.executable).parent / "fem-hpc"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fem-hpc")
    return [found] if found else [sys.executable, "-m", "fem_hpc.cli"]


@pytest.fixture
def site(tmp_path: Path) -> dict[str, Any]:
    """A minimal valid site config as a dict (state and work dirs under tmp_path); tests adjust it."""
    return {
        "node": "testnode",
        "state_dir": str(tmp_path / "state"),
        "work_root": str(tmp_path / "work"),
        "executors": {"local": {"kill_grace_seconds": 1}},
    }


@pytest.fixture
def write_config(tmp_path: Path):
    """write_config(dict) -> path of a YAML file holding it."""
    counter = iter(range(1000))

    def write(cfg: dict[str, Any], name: str | None = None) -> Path:
        path = tmp_path / (name or f"config{next(counter)}.yaml")
        path.write_text(yaml.safe_dump(cfg))
        return path

    return write


@pytest.fixture
def write_task(tmp_path: Path):
    """write_task(dict) -> path of a JSON file holding it."""
    counter = iter(range(1000))

    def write(task: dict[str, Any], name: str | None = None) -> Path:
        path = tmp_path / (name or f"task{next(counter)}.json")
        path.write_text(json.dumps(task))
        return path

    return write


@pytest.fixture
def fem_hpc_argv() -> list[str]:
    """The argv prefix that runs `fem-hpc` (for tests that need a Popen of their own)."""
    return fem_hpc_command()


@pytest.fixture
def cli():
    """cli(*args, timeout=60, env=None) -> CompletedProcess of the real `fem-hpc` command (text mode)."""

    def run(*args: str | Path, timeout: float = 60, env: dict[str, str] | None = None,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*fem_hpc_command(), *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, env=env, cwd=cwd)

    return run


@pytest.fixture
def sshd(request: pytest.FixtureRequest, tmp_path: Path):
    """A real sshd on a loopback port of its own, for this test only. The services the test is
    marked with (slurm, rabbitmq, pbs ...) are required first, so a missing one fails the test under
    CI instead of surfacing as an SSH error later."""
    services.require("ssh")
    marked = {m.name for m in request.node.iter_markers()} & set(services.SERVICES)
    for name in sorted(marked - {"ssh"}):
        services.require(name)
    server = SSHD(tmp_path).start()
    yield server
    server.stop()


SERVICE_MARKERS = {"rabbitmq", "slurm", "pbs", "docker", "ssh", "slow"}


@pytest.hookimpl(hookwrapper=True)  # around xdist's own hook, which reads the group marks into the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> Iterator[None]:
    """Under pytest-xdist (`-n 2 --dist loadgroup`, as scripts/test runs the suite), every test that
    uses a real service runs on one worker, one after another, in file order: they share the one
    Slurm, the broker (some stop its app) and the docker daemon, and their timings assume they are
    alone with them. The unit tests (no service marker) spread over the workers beside them."""
    for item in items:
        if SERVICE_MARKERS & {m.name for m in item.iter_markers()} or _asks_for_a_service(item):
            item.add_marker(pytest.mark.xdist_group("services"))
    yield
    if config.getoption("dist", None) == "loadgroup" and any(
            item.get_closest_marker("xdist_group") and not item.nodeid.endswith("@services") for item in items):
        # xdist did not take the group: the service tests would run side by side and step on each
        # other (a stopped broker, a killed slurmctld), so refuse rather than run them so
        raise pytest.UsageError("pytest-xdist did not group the real-service tests (--dist loadgroup): "
                                "a pytest/pytest-xdist pair that does not work together? (pyproject pins pytest<9)")


def _asks_for_a_service(item: pytest.Item) -> bool:
    """A test without a marker that still calls services.require (or takes the sshd fixture)."""
    if "sshd" in getattr(item, "fixturenames", ()):
        return True
    function = getattr(item, "function", None)
    try:
        return function is not None and "require(" in inspect.getsource(function)
    except (OSError, TypeError):
        return False
