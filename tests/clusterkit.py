"""Helpers for the tests of Slurm over SSH through the real `fem-hpc serve`: one site config, the
journal as the service sees it, the metrics text, and the jobs the real Slurm knows by name."""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brokerkit import ServeProcess, unique_node
from sshkit import SSHD, free_port

from fem_hpc.journal import JournalReader


def slurm_over_ssh(tmp: Path, sshd: SSHD, *, ssh: dict[str, Any] | None = None, prefix: str = "oc",
                   env: dict[str, str] | None = None, serve_cls: type[ServeProcess] = ServeProcess,
                   **slurm: Any) -> ServeProcess:
    """`fem-hpc serve` whose default executor is the real Slurm reached over `sshd`, with short
    retry caps (so a test outage costs seconds, not minutes) and metrics on a free port."""
    settings: dict[str, Any] = {
        "partition": "debug", "poll": {"min_seconds": 1, "max_seconds": 5}, "lost_grace_seconds": 30,
        "retry_max_seconds": 4, "ssh": {**sshd.settings_dict(), "reconnect_max_seconds": 4, "connect_timeout": 5,
                                        **(ssh or {})},
        "command_timeout": 20, **slurm,
    }
    node = unique_node(prefix)
    return serve_cls(tmp, node, {
        "default_executor": "slurm", "executors": {"slurm": settings},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }, env=env)


def rows(serve: ServeProcess) -> dict[str, dict[str, Any]]:
    """Every task of the service's journal (read-only, safe while it runs), by id."""
    path = Path(serve.config["state_dir"]) / "journal.sqlite"
    if not path.exists():
        return {}
    with JournalReader(path) as reader:
        return {r["id"]: r for r in reader.task_rows()}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def metrics_text(serve: ServeProcess) -> str:
    listen = serve.config["metrics"]["listen"]
    with urllib.request.urlopen(f"http://{listen}/metrics", timeout=10) as resp:  # loopback only
        return resp.read().decode()


def metric(text: str, name: str, **labels: str) -> float | None:
    """The value of one sample of the exposition text (labels matched exactly), None if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    head = f"{name}{{{want}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(head + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def jobs_named(name: str) -> list[str]:
    """Ids of every job the real Slurm knows under this name (any state)."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", f"--name={name}", "-o", "%i"], capture_output=True,
                          text=True, timeout=30, env={**os.environ})
    return proc.stdout.split()
