"""`fem-hpc submit --wait` as a user runs it, across a RabbitMQ app stop/start and then a restart of
the node's service: the client reconnects, asks again, and ends with the task's result and outputs;
neither it nor the service prints a traceback, and the service says "lost the broker" in warning
lines, not in a logged traceback.

RabbitMQ is shared with other test runs on the machine: its app is stopped for 10 s only (the
outage issue 12 reports), `start_app` runs in a `finally`, and a file lock keeps two of these tests
from stopping it at once."""

from __future__ import annotations

import fcntl
import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, rabbitmqctl, unique_node
from conftest import fem_hpc_command

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

STOP_SECONDS = 10  # as long as the outage the issue reports
LOCK = Path("/tmp/fem-hpc-tests-rabbitmq-stop-app.lock")


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout}s")


def _broker_back(timeout: float = 90) -> None:
    rabbitmqctl("await_startup", timeout=timeout)
    _wait_for(lambda: services.check("rabbitmq")[0], timeout, "RabbitMQ listening again")


def test_submit_wait_survives_a_broker_app_restart(tmp_path):
    services.require("rabbitmq")
    node = unique_node("rc")
    serve = ServeProcess(tmp_path, node).start()
    task = {"id": "long-25s", "command": ["sh", "-c", "sleep 25; mkdir -p out; echo finished > out/r.txt"],
            "outputs": ["out/r.txt"]}
    task_file = tmp_path / "task.json"
    task_file.write_text(json.dumps(task))
    err_path = tmp_path / "submit.stderr"
    with open(err_path, "wb") as err:
        submit = subprocess.Popen([*fem_hpc_command(), "submit", "--broker", BROKER_URL, "--node", node, "--wait",
                                   "--outputs", str(tmp_path / "out"), "--timeout", "240", str(task_file)],
                                  stdout=subprocess.PIPE, stderr=err)
    try:
        _wait_for(lambda: "RUNNING" in err_path.read_text(), 60, "the task RUNNING")
        with open(LOCK, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                assert rabbitmqctl("stop_app").returncode == 0
                time.sleep(STOP_SECONDS)
            finally:
                started = rabbitmqctl("start_app")
                _broker_back()
            assert started.returncode == 0, started.stderr
        # Then the node's service restarts (SIGTERM leaves the job running; the new one adopts it).
        first_log = serve.log()
        assert serve.stop() == 0
        serve.log_path.rename(serve.log_path.with_suffix(".1.log"))
        serve.start()
        code = submit.wait(timeout=240)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
        serve.stop()
    stderr = err_path.read_text()
    assert code == 0, stderr
    assert (tmp_path / "out/outputs/out/r.txt").read_text() == "finished\n"
    assert "Traceback" not in stderr and "pika" not in stderr, stderr
    assert "lost the broker connection" in stderr and "reconnected to the broker" in stderr, stderr
    # re-sent states are not printed twice (the one "final:" line is not a progress line)
    assert len(re.findall(r"^long-25s\s+COMPLETED\s", stderr, re.M)) == 1, stderr
    log = first_log
    assert "Traceback" not in log + serve.log(), log + serve.log()
    # The expected reconnect: one warning line per broker connection of the service (consumer and
    # publisher), nothing at ERROR, no line per failed attempt.
    loud = [line for line in log.splitlines() if " WARNING " in line or " ERROR " in line]
    assert loud and all("lost the broker connection" in line and " WARNING " in line for line in loud), log
    assert len(loud) <= 2, log
