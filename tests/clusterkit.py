"""Helpers for the tests of Slurm over SSH through the real `fem-hpc serve`: one site config, the
journal as the service sees it, the metrics text, and the jobs the real Slurm knows by name."""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brokerkit import BROKER_URL, EventTap, ServeProcess, unique_node
from sshkit import SSHD, free_port

from fem_hpc.client import Client
from fem_hpc.journal import JournalReader
from fem_hpc.staging.outputs import safe_extract


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


# The test bed of "no shared file system" on one machine. The cluster side (the sshd, slurmd and
# the jobs it starts) is this host; fem-hpc serve runs in a mount namespace of its own in which the
# cluster's scratch directory is covered by an empty tmpfs: the service cannot see a single file
# of a remote work dir, so whatever reaches it went through the SSH connection. (The inverse, a
# second slurmd inside the namespace, would need a second node in the shared slurm.conf and a
# controller restart under the other users of the test bed.)
HIDE = 'mount -t tmpfs -o size=1m,mode=0 fem-cluster-hidden "$1" && shift && exec "$@"'


def isolate(serve: ServeProcess, hidden: Path) -> ServeProcess:
    """Run `serve` (each start) where `hidden` is an empty directory."""
    hidden.mkdir(parents=True, exist_ok=True)
    serve.prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", HIDE, "sh", str(hidden)]
    return serve


def service_sees(serve: ServeProcess, path: Path) -> list[str]:
    """What the running service sees in `path` (through /proc/<pid>/root, i.e. its mount namespace)."""
    assert serve.proc is not None
    view = Path(f"/proc/{serve.proc.pid}/root") / path.relative_to("/")
    return sorted(p.name for p in view.iterdir()) if view.is_dir() else []


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


@dataclass
class Outcome:
    result: dict[str, Any]
    states: list[str]

    @property
    def state(self) -> str:
        return self.result["state"]


class Runs:
    """Tasks submitted to a node and their results read from the node's fem.events (a durable tap
    queue that outlives broker connections, which other users of the test bed may close), with the
    outputs joined by chunk index, checked against the result's sha256 and unpacked."""

    def __init__(self, node: str):
        self.node = node
        self.tap = EventTap(node)

    def submit(self, tasks: dict[str, dict[str, Any]]) -> None:
        for task in tasks.values():
            for attempt in range(5):
                try:
                    with Client(BROKER_URL, self.node) as c:
                        c.publish({"fem": 1, "op": "submit", "task": task})
                    break
                except Exception:
                    if attempt == 4:
                        raise
                    time.sleep(1)

    def wait(self, task_ids: list[str], timeout: float, outputs: Path | None = None) -> dict[str, Outcome]:
        deadline = time.monotonic() + timeout
        for tid in task_ids:
            self.tap.drain(until_result=tid, timeout=max(1.0, deadline - time.monotonic()))
        out = {}
        for tid in task_ids:
            result = self.tap.result(tid)
            assert result is not None
            if outputs is not None and result.get("outputs"):
                parts = sorted((h["index"], body) for h, body in self.tap.chunks if h.get("task_id") == tid)
                data = b"".join(body for _, body in dict(parts).items())
                assert hashlib.sha256(data).hexdigest() == result["outputs"]["sha256"], tid
                archive = outputs / f"{tid}.tar.gz"
                archive.parent.mkdir(parents=True, exist_ok=True)
                archive.write_bytes(data)
                safe_extract(archive, outputs / tid)
            out[tid] = Outcome(result, self.tap.states(tid))
        return out

    def close(self) -> None:
        self.tap.delete()
