"""Exit statuses of `run` and `submit --wait` that never collide with fem-hpc's own outcomes in the
common cases (65 rejected, 124 timed out, 78 bad config), the `final:` line on stderr, and --json."""

from __future__ import annotations

import json
from pathlib import Path

import pika
import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node


def final_line(stderr: str) -> str:
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert lines and lines[-1].startswith("final: "), stderr
    return lines[-1]


def run_json(cli, write_config, write_task, site, task, *extra) -> tuple[int, dict, str]:
    proc = cli("run", "--config", write_config(site), write_task(task), "--json", *extra)
    report = json.loads(proc.stdout)
    assert report["exit_status"] == proc.returncode
    return proc.returncode, report, proc.stderr


def test_completed(tmp_path: Path, site, cli, write_config, write_task) -> None:
    task = {"id": "ok1", "command": ["sh", "-c", "echo 42 > a.txt"], "outputs": ["a.txt"]}
    code, report, stderr = run_json(cli, write_config, write_task, site, task, "--outputs", tmp_path / "out")
    assert code == 0
    assert report == {"task_id": "ok1", "state": "COMPLETED", "reason": None, "exit_code": 0, "message": None,
                      "exit_status": 0, "errors": [], "outputs": 3}
    assert final_line(stderr) == "final: ok1 COMPLETED (exit code 0); exit status 0"


@pytest.mark.parametrize("task_exit", [2, 3, 65, 124])
def test_the_task_exit_code_passes_through(site, cli, write_config, write_task, task_exit: int) -> None:
    """Even a task that exits 65 or 124 is told apart from fem-hpc's own 65/124 by --json."""
    task = {"id": f"x{task_exit}", "command": ["sh", "-c", f"exit {task_exit}"]}
    code, report, stderr = run_json(cli, write_config, write_task, site, task)
    assert code == task_exit
    assert (report["state"], report["reason"], report["exit_code"]) == ("FAILED", "EXIT_CODE", task_exit)
    assert f"final: x{task_exit} FAILED (EXIT_CODE, exit code {task_exit})" in final_line(stderr)


def test_rejected_is_65_and_lists_the_errors(site, cli, write_config, write_task) -> None:
    code, report, stderr = run_json(cli, write_config, write_task, site,
                                    {"id": "bad", "command": ["true"], "resources": {"memory": "4GB"}})
    assert code == 65
    assert report["state"] == "REJECTED" and report["task_id"] == "bad"
    assert [e["field"] for e in report["errors"]] == ["task.resources.memory"]
    assert "final: bad REJECTED" in final_line(stderr)


def test_a_known_id_is_rejected_65(site, cli, write_config, write_task) -> None:
    task = {"id": "again", "command": ["true"]}
    assert run_json(cli, write_config, write_task, site, task)[0] == 0
    code, report, _ = run_json(cli, write_config, write_task, site, task)
    assert code == 65 and report["state"] == "REJECTED"
    assert report["errors"][0]["field"] == "task.id" and "already exists" in report["errors"][0]["message"]


def test_unreadable_task_file_is_66_bad_config_78(tmp_path: Path, site, cli, write_config) -> None:
    assert cli("run", "--config", write_config(site), tmp_path / "missing.json").returncode == 66
    assert cli("run", "--config", write_config({"node": "x", "bogus": 1}), tmp_path / "t.json").returncode == 78


def test_status_without_a_task_id_is_a_usage_error(cli) -> None:
    proc = cli("status", "--broker", BROKER_URL, "--node", "nobody")
    assert proc.returncode == 64 and "needs a TASK_ID" in proc.stderr


@pytest.mark.parametrize("argv", [("run", "--bogus", "t.json"), ("nosuch",), ("run", "t.json"),
                                  ("submit", "--wait", "t.json")])
def test_a_command_line_argparse_refuses_is_64_not_2(cli, argv: tuple[str, ...]) -> None:
    """2 is what a task exiting 2 gives `run`: argparse's own 2 would collide with it."""
    proc = cli(*argv)
    assert proc.returncode == 64, (proc.returncode, proc.stderr)
    assert "usage: fem-hpc" in proc.stderr and "error:" in proc.stderr


@pytest.mark.rabbitmq
def test_submit_wait_timeout_is_124(tmp_path: Path, cli, write_task) -> None:
    services.require("rabbitmq")
    # A node queue that exists but that no service consumes (a node that is down): the submit is
    # taken by the broker, and nothing answers. (A queue that does not exist is an error at once.)
    queue = unique_node("nobody")
    with pika.BlockingConnection(pika.URLParameters(BROKER_URL)) as conn:
        conn.channel().queue_declare(queue, arguments={"x-expires": 60_000})
    proc = cli("submit", "--broker", BROKER_URL, "--node", queue, "--wait", "--timeout", "1",
               "--json", write_task({"id": "late", "command": ["true"]}), timeout=60)
    assert proc.returncode == 124, proc.stderr
    report = json.loads(proc.stdout)
    assert (report["task_id"], report["state"], report["exit_status"]) == ("late", None, 124)
    assert final_line(proc.stderr).startswith("final: late no final state: timed out")


@pytest.mark.rabbitmq
def test_submit_wait_rejected_and_exit_code(tmp_path: Path, cli, write_task) -> None:
    services.require("rabbitmq")
    node = unique_node("exit")
    serve = ServeProcess(tmp_path, node).start()
    try:
        base = ["submit", "--broker", BROKER_URL, "--node", node, "--wait", "--timeout", "60", "--json"]
        rejected = cli(*base, write_task({"id": "r1", "command": ["true"], "bogus": 1}), timeout=90)
        assert rejected.returncode == 65, rejected.stderr
        report = json.loads(rejected.stdout)
        assert report["state"] == "REJECTED" and report["errors"][0]["field"] == "task.bogus"
        failed = cli(*base, write_task({"id": "r2", "command": ["sh", "-c", "exit 3"]}), timeout=90)
        assert failed.returncode == 3, failed.stderr
        assert json.loads(failed.stdout)["exit_code"] == 3
        assert "final: r2 FAILED (EXIT_CODE, exit code 3)" in final_line(failed.stderr)
    finally:
        assert serve.stop() == 0
