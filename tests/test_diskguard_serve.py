"""`fem-hpc serve` with state_dir and work_root on a real tmpfs of 8 MB, against the real RabbitMQ:
fill the disk, submit tasks. Nothing is lost or half-done, the health reply and `doctor` say why
intake is paused, intake resumes by itself once space is freed, and the journal stays consistent."""

from __future__ import annotations

import re
import sqlite3
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, get_all, task, unique_node
from fskit import fill, tmpfs
from sshkit import free_port

from fem_hpc.client import Client

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

MiB = 1024 * 1024


def _serve(tmp_path: Path, disk: Path, on_low_disk: str, **extra: Any) -> ServeProcess:
    return ServeProcess(tmp_path, unique_node("disk"), extra={
        "state_dir": str(disk / "state"), "work_root": str(disk / "work"),
        "disk_guard": {"min_free_bytes": MiB, "min_free_percent": 0, "check_seconds": 0.5,
                       "on_low_disk": on_low_disk},
        "retention": {"interval_seconds": 0},
        **extra,
    })


def _metrics(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # loopback
        return resp.read().decode()


def _journal(disk: Path) -> tuple[str, dict[str, str]]:
    db = sqlite3.connect(f"file:{disk / 'state' / 'journal.sqlite'}?mode=ro", uri=True, timeout=10)
    try:
        return db.execute("PRAGMA integrity_check").fetchone()[0], dict(db.execute("SELECT id, state FROM tasks"))
    finally:
        db.close()


def _ran(tmp_path: Path, task_id: str) -> list[str]:
    return ["sh", "-c", f"echo ran >> {tmp_path / f'ran-{task_id}'}"]


def _wait_message(node: str, task_id: str, text: str, timeout: float = 15) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        with Client(BROKER_URL, node) as c:
            reply = c.status(task_id, timeout=10)
        if text in (reply.get("message") or "") or time.monotonic() > deadline:
            return reply
        time.sleep(0.3)


def test_queue_on_a_full_disk_loses_nothing_and_resumes_by_itself(tmp_path: Path, cli):
    services.require("rabbitmq")
    with tmpfs(tmp_path / "disk", "8m") as disk:
        port = free_port()
        serve = _serve(tmp_path, disk, "queue", metrics={"listen": f"127.0.0.1:{port}"}).start()
        try:
            with Client(BROKER_URL, serve.node) as c:
                res = c.submit(task("roomy", _ran(tmp_path, "roomy")), timeout=60)
                assert res is not None and res.state == "COMPLETED"

                low = fill(disk, leave=MiB // 2, name="low")  # below the guard's 1 MiB: intake pauses
                time.sleep(0.6)
                low_corr = c.publish({"fem": 1, "op": "submit", "task": task("low1", _ran(tmp_path, "low1"))})
                status = _wait_message(serve.node, "low1", "waiting for disk space")
                assert status["state"] == "RECEIVED", status
                assert status["message"].startswith(f"waiting for disk space: state_dir {disk / 'state'}: ")
                with Client(BROKER_URL, serve.node) as h:
                    health = h.health(timeout=30)
                guard = health["disk_guard"]
                assert guard["blocked"] and guard["on_low_disk"] == "queue"
                assert "below the 1.0 MiB kept free (disk_guard.min_free_bytes)" in guard["reason"]
                checks = {ch["name"]: ch for ch in health["checks"]}
                assert checks["disk guard"]["status"] == "error"
                assert checks["disk guard"]["detail"].startswith("intake paused (new tasks wait in RECEIVED")
                metrics = _metrics(port)
                assert "fem_intake_paused 1.0" in metrics
                assert re.search(r'fem_area_free_bytes\{area="work_root"\} (\d+(\.\d+)?(e\+\d+)?)', metrics)
                proc = cli("doctor", "--config", serve.config_path, "--json", "--timeout", "10", timeout=180)
                assert proc.returncode == 1, proc.stdout
                assert '"name": "disk guard"' in proc.stdout and "intake paused" in proc.stdout

                full = fill(disk, leave=0, name="full")  # nothing at all fits any more
                full_corr = c.publish({"fem": 1, "op": "submit", "task": task("full1", _ran(tmp_path, "full1"))})
                time.sleep(4)
                assert serve.alive(), serve.log()
                assert not (tmp_path / "ran-low1").exists() and not (tmp_path / "ran-full1").exists()

                full.unlink()
                low.unlink()  # space returns: both start by themselves
                for corr in (low_corr, full_corr):
                    assert c.follow(corr, timeout=90).state == "COMPLETED"
                assert "fem_intake_paused 0.0" in _metrics(port)
            for task_id in ("roomy", "low1", "full1"):
                assert (tmp_path / f"ran-{task_id}").read_text() == "ran\n", f"{task_id} ran exactly once"
            integrity, states = _journal(disk)
            assert integrity == "ok"
            assert states == {"roomy": "COMPLETED", "low1": "COMPLETED", "full1": "COMPLETED"}
        finally:
            serve.stop()


def test_reject_on_a_low_disk_answers_rejected_and_takes_the_id_later(tmp_path: Path):
    services.require("rabbitmq")
    with tmpfs(tmp_path / "disk", "8m") as disk:
        serve = _serve(tmp_path, disk, "reject").start()
        try:
            low = fill(disk, leave=MiB // 2)
            time.sleep(0.6)
            with Client(BROKER_URL, serve.node) as c:
                res = c.submit(task("rej1", _ran(tmp_path, "rej1")), timeout=60)
                assert res is not None and res.state == "REJECTED"
                [error] = res.result["errors"]
                assert error["field"] == "node" and "work_root" in error["message"]
                [(props, _body)] = get_all(f"{serve.node}.rejected")
                assert props.headers["x-fem-reason"] == "rejected task"
                low.unlink()
                time.sleep(0.6)
                res = c.submit(task("rej1", _ran(tmp_path, "rej1")), timeout=60)
                assert res is not None and res.state == "COMPLETED"
            assert (tmp_path / "ran-rej1").read_text() == "ran\n"
            assert _journal(disk) == ("ok", {"rej1": "COMPLETED"})
        finally:
            serve.stop()
