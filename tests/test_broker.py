"""Protocol v1 over the real RabbitMQ: `fem-hpc serve` as a process, a client written from
PROTOCOL.md, and the failure cases (hostile bodies, restarts, broker outages)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import services
from brokerkit import BROKER_URL, EventTap, ServeProcess, get_all, rabbitmqctl, task, unique_node

from fem_hpc.client import Client

pytestmark = pytest.mark.rabbitmq


@pytest.fixture(autouse=True)
def _rabbit():
    services.require("rabbitmq")


@pytest.fixture
def node():
    return unique_node("brk")


@pytest.fixture
def serve(tmp_path: Path, node: str):
    started: list[ServeProcess] = []

    def start(**extra) -> ServeProcess:
        s = ServeProcess(tmp_path, node, extra).start()
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()


@pytest.fixture
def tap(node: str):
    t = EventTap(node)
    yield t
    t.delete()


def test_submit_completes_with_verified_outputs(serve, node, tmp_path, tap):
    serve()
    t = task("ok1", ["sh", "-c", "mkdir -p res; echo 41 > res/a.txt; head -c 3000000 /dev/urandom > res/big.bin;"
                     " echo done; echo warn >&2"],
             outputs=["res/*"], labels={"run": "r1"})
    with Client(BROKER_URL, node) as c:
        res = c.submit(t, timeout=60, outputs_dir=tmp_path / "out")
    assert res is not None
    assert res.state == "COMPLETED" and res.exit_code == 0
    assert res.result["outputs"]["chunks"] == 3  # 3 MB of random data in <= 1 MiB chunks
    assert (tmp_path / "out/outputs/res/a.txt").read_text() == "41\n"
    assert (tmp_path / "out/outputs/res/big.bin").stat().st_size == 3000000
    assert (tmp_path / "out/logs/stdout").read_text() == "done\n"
    assert res.result["stderr_tail"] == "warn\n"
    states = [e["state"] for e in res.events if e["type"] == "status"]
    assert states == ["RECEIVED", "STAGING_IN", "SUBMITTED", "RUNNING", "STAGING_OUT", "COMPLETED"]
    seqs = [e["seq"] for e in res.events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e["labels"] == {"run": "r1"} for e in res.events)
    # The same events reached the topic exchange under <node>.<task_id>.<type>.
    tap.drain(until_result="ok1")
    assert tap.states("ok1")[-1] == "COMPLETED"
    assert len(tap.chunks) == 3 and {h["index"] for h, _ in tap.chunks} == {0, 1, 2}


def test_exit_code_5_is_failed_exit_code(serve, node):
    serve()
    with Client(BROKER_URL, node) as c:
        res = c.submit(task("fail5", ["sh", "-c", "echo oops >&2; exit 5"]), timeout=60)
    assert res.state == "FAILED"
    assert res.result["reason"] == "EXIT_CODE" and res.exit_code == 5
    assert res.result["stderr_tail"] == "oops\n"
    last_status = [e for e in res.events if e["type"] == "status"][-1]
    assert last_status["state"] == "FAILED" and "5" in last_status["message"]


HOSTILE = [
    (b"this is not json", "body"),
    (b"{not json either", "body"),
    (b"[1, 2, 3]", "body"),
    (json.dumps({"fem": 1, "op": "explode"}).encode(), "op"),
    (json.dumps({"fem": 2, "op": "health"}).encode(), "fem"),
    (json.dumps({"fem": 1, "op": "submit", "task": {"id": "bad1", "command": ["true"], "colour": "red"}}).encode(),
     "task.colour"),
    (json.dumps({"fem": 1, "op": "submit", "task": {"id": "../x", "command": ["true"]}}).encode(), "task.id"),
    (json.dumps({"fem": 1, "op": "submit", "task": {"id": "pol1", "command": ["true"],
                                                    "resources": {"cpus": 64}}}).encode(), "task.resources.cpus"),
    (json.dumps({"fem": 1, "op": "submit", "task": {"id": "vol1", "command": ["true"],
                                                    "volumes": [{"name": "nope", "target": "/d"}]}}).encode(),
     "task.volumes.0.name"),
    (b"{" + b" " * (1024 * 1024 + 10) + b"}", "body"),
]


def test_hostile_bodies_are_rejected_and_dead_lettered(serve, node, tap):
    s = serve()
    with Client(BROKER_URL, node) as c:
        for body, field in HOSTILE:
            corr = c.publish(body)
            reply = json.loads(next(c.replies(corr, timeout=30))[1])
            assert reply["type"] == "result" and reply["state"] == "REJECTED", (body[:60], reply)
            assert any(e["field"] == field for e in reply["errors"]), (field, reply["errors"])
            assert all(e["message"] for e in reply["errors"])
        # Still serving after all of that.
        assert c.health(timeout=30)["node"] == node
    assert s.alive()
    dead = get_all(f"{node}.rejected", expect=len(HOSTILE), timeout=20)
    assert len(dead) == len(HOSTILE)
    assert all(p.headers.get("x-fem-reason") and p.headers.get("x-fem-errors") for p, _ in dead)
    assert dead[0][1] == b"this is not json"  # the original body is kept as is
    # Where a task id was readable, the REJECTED result went to fem.events too.
    tap.drain()
    assert {e["task_id"] for e in tap.events if e["state"] == "REJECTED"} >= {"bad1", "pol1", "vol1"}


def test_same_submit_three_times_runs_once(serve, node, tmp_path):
    serve()
    counter = tmp_path / "counter"
    t = task("dup1", ["sh", "-c", f"echo run >> {counter}"])
    with Client(BROKER_URL, node) as c:
        first = c.submit(t, timeout=60)
        second = c.submit(t, timeout=60)
        third = c.submit(t, timeout=60)
    assert first.state == second.state == third.state == "COMPLETED"
    assert counter.read_text() == "run\n"
    assert third.result["outputs"]["sha256"] == first.result["outputs"]["sha256"]
    assert [e["state"] for e in second.events if e["type"] == "status"] == ["COMPLETED"]


def test_cancel_a_long_task(serve, node):
    serve()
    with Client(BROKER_URL, node) as c:
        corr = c.publish({"fem": 1, "op": "submit", "task": task("long1", ["sleep", "301"])})
        for _props, body in c.replies(corr, timeout=30):
            if json.loads(body).get("state") == "RUNNING":
                break
        with Client(BROKER_URL, node) as c2:
            c2.cancel("long1", timeout=30)
        res = c.follow(corr, timeout=60)
    assert res.state == "CANCELLED"
    with Client(BROKER_URL, node) as c:
        assert c.status("long1", timeout=30)["state"] == "CANCELLED"
        assert c.status("never-seen", timeout=30)["state"] == "UNKNOWN"


def test_sigkill_after_ack_then_restart_completes_exactly_once(serve, node, tmp_path, tap):
    s = serve()
    counter = tmp_path / "count"
    with Client(BROKER_URL, node) as c:
        corr = c.publish({"fem": 1, "op": "submit",
                          "task": task("crash1", ["sh", "-c", f"sleep 2; echo x >> {counter}"])})
        for _props, body in c.replies(corr, timeout=30):
            if json.loads(body).get("state") == "RECEIVED":  # committed to the journal, then acked
                break
    s.kill()
    serve()  # same node, same journal
    tap.drain(until_result="crash1", timeout=60)
    assert tap.result("crash1")["state"] == "COMPLETED"
    time.sleep(1)
    assert counter.read_text() == "x\n"


def test_graceful_stop_leaves_job_running_and_restart_adopts_it(serve, node, tmp_path, tap):
    s = serve()
    marker = tmp_path / "m"
    with Client(BROKER_URL, node) as c:
        corr = c.publish({"fem": 1, "op": "submit", "task": task("gs1", ["sh", "-c", f"sleep 3; echo y > {marker}"])})
        for _props, body in c.replies(corr, timeout=30):
            if json.loads(body).get("state") == "RUNNING":
                break
    assert s.stop(signal.SIGTERM) == 0
    assert "re-adopted at the next start" in s.log()
    serve()
    tap.drain(until_result="gs1", timeout=60)
    assert tap.result("gs1")["state"] == "COMPLETED"
    assert marker.read_text() == "y\n"


def test_connections_closed_mid_task_result_still_arrives(serve, node, tap):
    s = serve()
    with Client(BROKER_URL, node) as c:
        c.submit(task("cc1", ["sleep", "3"]), wait=False)
    time.sleep(1)
    out = rabbitmqctl("close_all_connections", "test: connections closed mid-task")
    assert out.returncode == 0, out.stderr
    tap.drain(until_result="cc1", timeout=60)
    assert tap.result("cc1")["state"] == "COMPLETED"
    assert s.alive()
    assert "reconnect" in s.log()


@pytest.mark.slow
def test_broker_app_restart_mid_task_result_still_arrives(serve, node, tap):
    s = serve()
    with Client(BROKER_URL, node) as c:
        c.submit(task("br1", ["sleep", "4"]), wait=False)
    time.sleep(1)
    try:
        assert rabbitmqctl("stop_app").returncode == 0
        time.sleep(6)  # the job ends while the broker is down: its events wait in the outbox
    finally:
        assert rabbitmqctl("start_app").returncode == 0
        rabbitmqctl("await_startup")
    tap.drain(until_result="br1", timeout=90)
    assert tap.result("br1")["state"] == "COMPLETED"
    states = tap.states("br1")
    assert states[-1] == "COMPLETED" and "RUNNING" in states
    assert s.alive()


def test_bad_credentials_exit_with_a_clear_message(tmp_path, node):
    s = ServeProcess(tmp_path, node, {"broker": {"url": "amqp://guest:wrong-password@127.0.0.1:5672/%2F"}})
    s.config_path.write_text(__import__("yaml").safe_dump(s.config))
    import subprocess

    from conftest import fem_hpc_command

    out = subprocess.run([*fem_hpc_command(), "serve", "--config", str(s.config_path)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 77
    assert "refused the credentials" in out.stderr
    assert "wrong-password" not in out.stderr
