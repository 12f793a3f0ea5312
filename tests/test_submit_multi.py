"""`fem-hpc submit` to several nodes: plan files (validated, per-node env and task fields), one
progress line per node and state, outputs in DIR/<node>/, exit status the worst node's, and a node
whose queue does not exist named in the report at once instead of waited for."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import services
import yaml
from brokerkit import BROKER_URL, ServeProcess, unique_node
from conftest import fem_hpc_command

from fem_hpc.plan import PlanError, load_plan, outcome, worst


def _plan(tmp_path: Path, data) -> Path:
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


def test_plan_merges_env_and_task_fields_per_node(tmp_path):
    plan = load_plan(_plan(tmp_path, {
        "task": {"id": "t1", "command": ["echo", "base"], "env": {"A": "1", "B": "base"}},
        "nodes": {"n1": {}, "n2": {"queue": "q2", "env": {"B": "two"}, "task": {"command": ["echo", "two"]}}}}))
    tasks = plan.tasks()
    assert tasks["n1"] == ("n1", {"id": "t1", "command": ["echo", "base"], "env": {"A": "1", "B": "base"}})
    assert tasks["n2"] == ("q2", {"id": "t1", "command": ["echo", "two"], "env": {"A": "1", "B": "two"}})


@pytest.mark.parametrize("data, expect", [
    ({"task": {"id": "t", "command": ["x"]}}, "nodes: Field required"),
    ({"task": {"id": "t", "command": ["x"]}, "nodes": {}}, "nodes: "),
    ({"task": {"id": "t", "command": ["x"]}, "nodes": {"bad name": {}}}, "bad name"),
    ({"task": {"id": "t"}, "nodes": {"a": {}, "b": {"task": {"command": ["x"]}}}}, "nodes.a: task.command"),
    ({"task": {"id": "t", "command": ["x"]}, "nodes": {"a": {"colour": "red"}}}, "nodes.a.colour: unknown field"),
    ({"task": {"id": "t", "command": ["x"]}, "nodes": {"a": {"env": {"1X": "v"}}}}, "nodes.a: task.env"),
    ("nodes: [unclosed", "not valid YAML/JSON"),
])
def test_bad_plans_name_the_problem(tmp_path, data, expect):
    with pytest.raises(PlanError) as err:
        load_plan(_plan(tmp_path, data))
    assert any(expect in p for p in err.value.problems), err.value.problems


def test_worst_outcome_decides_the_exit_status():
    def run(state, result=True):
        return SimpleNamespace(state=state, result=object() if result else None)

    runs = [run("COMPLETED"), run("FAILED"), run("COMPLETED")]
    assert outcome(worst(runs)) == "FAILED"
    assert outcome(worst([*runs, run(None, result=False)])) == "NO_ANSWER"
    assert outcome(worst([*runs, run(None, result=False), run("REJECTED")])) == "REJECTED"
    assert worst([]) is None


@pytest.mark.rabbitmq
def test_plan_to_two_nodes_and_a_missing_one(tmp_path):
    services.require("rabbitmq")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ServeProcess(tmp_path / "a", unique_node("ma")).start()
    b = ServeProcess(tmp_path / "b", unique_node("mb")).start()
    missing = unique_node("gone")  # no service has ever declared its queue
    plan = _plan(tmp_path, {
        "task": {"id": "multi-1", "command": ["sh", "-c", "mkdir -p out; echo $WHO > out/who.txt; exit $CODE"],
                 "outputs": ["out/who.txt"], "env": {"CODE": "0"}},
        "nodes": {a.node: {"env": {"WHO": "node-a"}}, b.node: {"env": {"WHO": "node-b", "CODE": "5"}},
                  missing: {"env": {"WHO": "nobody"}}}})
    try:
        t0 = time.monotonic()
        out = subprocess.run([*fem_hpc_command(), "submit", "--broker", BROKER_URL, "--plan", str(plan), "--wait",
                              "--outputs", str(tmp_path / "out"), "--timeout", "60"],
                             capture_output=True, text=True, timeout=120)
        took = time.monotonic() - t0
        assert (tmp_path / f"out/{a.node}/outputs/out/who.txt").read_text() == "node-a\n"
        assert (tmp_path / f"out/{b.node}/outputs/out/who.txt").read_text() == "node-b\n"
        lines = out.stderr.splitlines()
        for node in (a.node, b.node):  # one progress line per node and state
            assert sum(1 for line in lines if line.startswith(node) and "COMPLETED" in line) == (node == a.node)
            assert sum(1 for line in lines if line.startswith(node) and " RUNNING " in line) == 1
        assert f"{missing}: not sent: the broker has no queue {missing!r}" in out.stderr
        summary = out.stderr.split("summary:")[1]
        assert re.search(rf"{b.node}\s+FAILED\s+exit=5", summary), summary
        assert re.search(rf"{missing}\s+NO_ANSWER", summary), summary
        assert out.returncode == 1, out.stderr  # no answer from one node is worse than a failed task
        assert took < 30, "a node without a queue is reported at once, not waited for"

        # Without the missing node, the worst is b's FAILED: its exit code.
        data = yaml.safe_load(plan.read_text())
        del data["nodes"][missing]
        data["task"]["id"] = "multi-2"
        out = subprocess.run([*fem_hpc_command(), "submit", "--broker", BROKER_URL, "--plan",
                              str(_plan(tmp_path, data)), "--wait", "--timeout", "60"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 5, out.stderr
        # --node repeated: the same task to both, exit 0.
        task = tmp_path / "task.json"
        task.write_text(json.dumps({"id": "multi-3", "command": ["true"]}))
        out = subprocess.run([*fem_hpc_command(), "submit", "--broker", BROKER_URL, "--node", a.node, "--node",
                              b.node, "--wait", "--timeout", "60", str(task)], capture_output=True, text=True,
                             timeout=120)
        assert out.returncode == 0, out.stderr
        # per node: a progress line, the final line and a summary line
        assert out.stderr.count("COMPLETED") == 6
    finally:
        a.stop()
        b.stop()


def test_submit_arguments_are_checked(tmp_path, cli):
    task = tmp_path / "t.json"
    task.write_text(json.dumps({"id": "x", "command": ["true"]}))
    out = cli("submit", "--broker", BROKER_URL, str(task))
    assert out.returncode == 64 and "at least one --node" in out.stderr  # EX_USAGE
    out = cli("submit", "--broker", BROKER_URL, "--node", "a", "--node", "a", str(task))
    assert out.returncode == 64 and "named twice" in out.stderr
    out = cli("submit", "--broker", BROKER_URL, "--plan", str(_plan(tmp_path, {"nodes": {"a": {}}})))
    assert out.returncode == 65 and "nodes.a: task.id" in out.stderr  # EX_DATAERR: the plan's task is invalid


@pytest.mark.rabbitmq
def test_interrupting_a_multi_node_submit_cancels_every_task(tmp_path):
    import signal

    from fem_hpc.client import Client

    services.require("rabbitmq")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ServeProcess(tmp_path / "a", unique_node("ca")).start()
    b = ServeProcess(tmp_path / "b", unique_node("cb")).start()
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"id": "long-multi", "command": ["sleep", "120"]}))
    err = tmp_path / "submit.err"
    try:
        with open(err, "wb") as f:
            proc = subprocess.Popen([*fem_hpc_command(), "submit", "--broker", BROKER_URL, "--node", a.node, "--node",
                                     b.node, "--wait", str(task)], stderr=f)
        deadline = time.monotonic() + 60
        while err.read_text().count(" RUNNING ") < 2:
            assert time.monotonic() < deadline, err.read_text()
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 130
        text = err.read_text()
        assert "interrupted: cancelling 2 task(s)" in text and "Traceback" not in text, text
        with Client(BROKER_URL) as c:
            for node in (a.node, b.node):
                deadline = time.monotonic() + 30
                while (state := c.status("long-multi", node=node)["state"]) != "CANCELLED":
                    assert time.monotonic() < deadline, f"{node}: {state}"
                    time.sleep(0.5)
    finally:
        if proc.poll() is None:
            proc.kill()
        a.stop()
        b.stop()


def _fl_driver():
    """examples/federated/driver.py as a module (it needs only fem_hpc and PyYAML to import)."""
    import importlib.util
    import sys

    path = Path(__file__).resolve().parent.parent / "examples" / "federated" / "driver.py"
    spec = importlib.util.spec_from_file_location("fl_example_driver", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)
    spec.loader.exec_module(module)
    return module


@pytest.mark.rabbitmq
def test_the_fl_driver_cancels_every_task_it_sent(tmp_path, capsys):
    """The driver's cancel reaches a task whose first status it has not heard yet (it asks every
    node it sent to), answers for a final task and for a node that is down, in one bounded wait."""
    import pika

    from fem_hpc.client import Client

    services.require("rabbitmq")
    driver = _fl_driver()
    a = ServeProcess(tmp_path, unique_node("fa")).start()
    down = unique_node("fdown")  # its queue exists (it ran before), no service consumes it
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    conn.channel().queue_declare(down, durable=True)
    conn.close()
    try:
        with Client(BROKER_URL) as c, Client(BROKER_URL) as observer:
            # fl-never: noted as sent, but its submit never left (the driver was stopped first)
            sent = [(a.node, "fl-slow"), (a.node, "fl-quick"), (a.node, "fl-never"), (down, "fl-slow")]
            runs = [c.start({"id": "fl-slow", "command": ["sleep", "120"]}, node=a.node),
                    c.start({"id": "fl-quick", "command": ["true"]}, node=a.node),
                    c.start({"id": "fl-slow", "command": ["sleep", "120"]}, node=down)]
            deadline = time.monotonic() + 30
            # The node runs the slow task (another client asks), yet this client has not read a
            # single reply: no run has a state, which is what the driver used to skip.
            while (observer.status("fl-slow", node=a.node)["state"] != "RUNNING"
                   or observer.status("fl-quick", node=a.node)["state"] != "COMPLETED"):
                assert time.monotonic() < deadline, "the node did not run the tasks"
                time.sleep(0.3)
            assert [r.state for r in runs] == [None, None, None]
            t0 = time.monotonic()
            driver.cancel_sent(c, sent, runs, timeout=5)
            took = time.monotonic() - t0
            deadline = time.monotonic() + 30
            while (state := observer.status("fl-slow", node=a.node)["state"]) != "CANCELLED":
                assert time.monotonic() < deadline, state
                time.sleep(0.3)
            assert observer.status("fl-quick", node=a.node)["state"] == "COMPLETED"  # a cancel of a final task: a no-op
    finally:
        a.stop()
        conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        conn.channel().queue_delete(down)
        conn.close()
    err = capsys.readouterr().err
    assert "cancelling 4 task(s) without a result" in err, err
    assert f"{a.node}/fl-never: UNKNOWN this node has never seen this task" in err, err  # harmless
    assert f"{a.node}/fl-quick: COMPLETED already completed; nothing to cancel" in err, err
    assert re.search(rf"{a.node}/fl-slow: RUNNING cancel requested", err), err
    assert f"{down}/fl-slow: cancel not confirmed (no answer within 5s" in err, err
    assert took < 8, f"one bounded wait for all nodes, not one per node: {took:.1f}s"
