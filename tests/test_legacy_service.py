"""The legacy FEM orchestrator's protocol against the real `fem-hpc serve` and RabbitMQ.

The orchestrator side (brokerkit.LegacyOrchestrator) is written from the wire facts only
(DESIGN.md, "Legacy FEM protocol", and FEM-REAL.md).
"""

from __future__ import annotations

import base64
import time
from pathlib import Path

import pika
import pytest
import services
from brokerkit import LegacyOrchestrator, ServeProcess, unique_node

pytestmark = pytest.mark.rabbitmq


def body(action: str, task_info: str = "{}", execution: str = '{"execution_id": "ex1", "process_info": []}',
         params: str = "{}", user: str = "user7", token: str = "tok-SECRET-123") -> str:
    return "|".join([action, "tool1", task_info, execution, params, user, "None", "{}", token])


TASK_INFO = ("{'_id': 'abc123', 'image': {}, "
             "'command': {'base': 'sh -c', 'args': ["
             "{'id': 'script', 'type': 'str', 'default_value': 'echo hi; mkdir -p model; echo w > model/w.txt', "
             "'position': 0, 'prefix': '', 'separate': True, 'required': True}]}, "
             "'var_envs': {'MODE': 'a|b'}, 'cpus': 1, 'memory': '256M', 'gpus': 0, "
             "'outputs': {'model_dir': 'model', 'move_to': ''}}")


@pytest.fixture
def legacy(tmp_path: Path):
    services.require("rabbitmq")
    node = unique_node("leg")
    s = ServeProcess(tmp_path, node, {"legacy": {"enabled": True, "sandbox_path": str(tmp_path / "sandbox"),
                                                 "reply_chunk_size": 100, "token_env": "FEM_TOKEN",
                                                 "executor_no_image": "local"}})
    (tmp_path / "sandbox").mkdir()
    s.start()
    orch = LegacyOrchestrator(node)
    yield s, orch, tmp_path
    orch.close()
    s.stop()


def test_submit_run_status_report_and_files(legacy):
    s, orch, tmp = legacy
    reply = orch.call(body("submit_run", TASK_INFO))
    assert reply["status"] == "success", reply
    # The original's shape (FEM-REAL.md): `result` is what the command printed (no JSON: its stdout)
    assert reply["return_code"] == 0 and reply["result"] == {"stdout": "hi\n"}
    assert reply["fem_hpc"]["state"] == "COMPLETED" and reply["task_id"] == "abc123"
    assert reply["execution_id"] == "ex1" and reply["tool_id"] == "tool1" and reply["user_id"] == "user7"
    assert len(reply["starting_time"]) == 19 and reply["starting_time"][10] == " "
    # The work dir is <sandbox>/<user_id>/<execution_id>/ as with the original client.
    assert (tmp / "sandbox/user7/ex1/model/w.txt").read_text() == "w\n"

    status = orch.call(body("run_status", "{'_id': 'abc123'}"))
    assert status["state"] == "COMPLETED" and status["status"] == "success"
    report = orch.call(body("run_report", "{'_id': 'abc123'}"))
    assert report["exit_code"] == 0 and report["error"] is None
    assert report["elapsed_time_sec"] is not None and report["start_time"]
    files = orch.call(body("send_files"))
    names = {f["path"]: base64.b64decode(f["data"]) for f in files["files"]}
    assert names["model/w.txt"] == b"w\n"
    health = orch.call(body("health-check"))
    assert health["status"] == "success" and health["checks"]["installation"]["executors"]["local"] is True
    assert orch.call(body("print_images"))["status"] == "success"
    # The token never reaches the log or the journal.
    assert "tok-SECRET-123" not in s.log()
    journal = (tmp / "state" / "journal.sqlite").read_bytes()
    assert b"tok-SECRET-123" not in journal


def test_token_reaches_the_task_only_through_the_configured_env(legacy):
    s, orch, tmp = legacy
    info = TASK_INFO.replace("echo hi; mkdir -p model; echo w > model/w.txt", 'echo "tok=$FEM_TOKEN"')
    reply = orch.call(body("submit_run", info, execution='{"execution_id": "ex2", "process_info": []}'))
    assert reply["status"] == "success"
    assert reply["result"] == {"stdout": "tok=tok-SECRET-123\n"}
    workdir = tmp / "sandbox/user7/ex2"
    for path in workdir.rglob("*"):
        if path.is_file() and path.name != "stdout":
            assert b"tok-SECRET-123" not in path.read_bytes(), path


def test_cancel_run_of_a_long_task_and_queue_keeps_flowing(legacy):
    s, orch, tmp = legacy
    info = TASK_INFO.replace("echo hi; mkdir -p model; echo w > model/w.txt", "sleep 300")
    orch.ch.basic_publish("", orch.queue, body("submit_run", info, execution='{"execution_id": "ex3"}').encode(),
                          pika.BasicProperties(reply_to=orch.reply_queue, correlation_id="long-one"))
    time.sleep(1.5)
    # Other messages are served while the long task runs.
    assert orch.call(body("health-check"), timeout=30)["status"] == "success"
    cancel = orch.call(body("cancel_run", "{'_id': 'abc123'}", execution='{"execution_id": "ex3"}'), timeout=30)
    assert cancel["status"] == "success"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = orch.call(body("run_status", "{'_id': 'abc123'}", execution='{"execution_id": "ex3"}'))
        if st["state"] == "CANCELLED":
            break
        time.sleep(0.5)
    assert st["state"] == "CANCELLED"


HOSTILE = [
    "submit_run|t|{'_id': __import__('os').system('touch /tmp/fem-pwn-1')}|{}|{}|u|None|{}|tok",
    "submit_run|t|{'_id': 'x'}|{}|{'lr': __import__('os').system('touch /tmp/fem-pwn-2')}|u|None|{}|tok",
    "submit_run|t|{'_id': (lambda: 1)()}|{}|{}|u|None|{}|tok",
    "submit_run|t|{'_id': os.path}|{}|{}|u|None|{}|tok",
    "submit_run|t|{'_id': 1+1}|{}|{}|u|None|{}|tok",
    "submit_run|t|" + "[" * 100000 + "]" * 100000 + "|{}|{}|u|None|{}|tok",
    "submit_run|t|{'a': '" + "x" * (10 * 1024 * 1024) + "'}|{}|{}|u|None|{}|tok",
    "submit_run|only|three",
    "bogus_action|t|{}|{}|{}|u|None|{}|tok",
    "submit_run|t|{'_id': 'a|b', 'command': {'base': 'true'}}|{\"execution_id\": \"e|x\"}|{}|u|None|{}|tok|extra",
]


def test_hostile_legacy_bodies_get_error_replies_and_nothing_runs(legacy):
    s, orch, tmp = legacy
    for i, hostile in enumerate(HOSTILE):
        reply = orch.call(hostile, timeout=60)
        assert reply["status"] == "error", (i, reply)
        assert reply["message"], i
    assert not Path("/tmp/fem-pwn-1").exists() and not Path("/tmp/fem-pwn-2").exists()
    assert s.alive()
    assert orch.call(body("health-check"))["status"] == "success"


def test_submit_waits_false_replies_once_the_job_is_submitted(tmp_path):
    services.require("rabbitmq")
    node = unique_node("legs")
    (tmp_path / "sandbox").mkdir()
    s = ServeProcess(tmp_path, node, {"legacy": {"enabled": True, "sandbox_path": str(tmp_path / "sandbox"),
                                                 "submit_waits": False, "executor_no_image": "local"}}).start()
    orch = LegacyOrchestrator(node)
    try:
        info = TASK_INFO.replace("echo hi; mkdir -p model; echo w > model/w.txt", "sleep 5; echo late")
        start = time.monotonic()
        reply = orch.call(body("submit_run", info, execution='{"execution_id": "ex9"}'), timeout=30)
        assert time.monotonic() - start < 4, "the reply did not wait for the task's end"
        assert reply["status"] == "success" and reply["fem_hpc"]["native_id"]
        assert reply["return_code"] is None and reply["fem_hpc"]["message"] == "submitted"
        status = orch.call(body("run_status", "{'_id': 'abc123'}", execution='{"execution_id": "ex9"}'))
        assert status["state"] in ("SUBMITTED", "RUNNING")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            report = orch.call(body("run_report", "{'_id': 'abc123'}", execution='{"execution_id": "ex9"}'))
            if report["state"] == "COMPLETED":
                break
            time.sleep(0.5)
        assert report["state"] == "COMPLETED" and report["exit_code"] == 0
    finally:
        orch.close()
        s.stop()
