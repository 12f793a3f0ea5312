"""The node as the broker sees it (the orchestrator's "heartbeat", FEM-REAL.md): the consumer's
connection carries the node's name, and the node queue never has two consumers, across a
reconnect or a second service started for the same node. Checked with rabbitmqctl on the real
RabbitMQ; every test has its own node, so its queue is its own."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, rabbitmqctl, unique_node

from fem_hpc.broker.connection import run_connected
from fem_hpc.config import BrokerConfig

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]


def _listing(*args: str) -> list[dict[str, Any]]:
    proc = rabbitmqctl("-q", *args, "--formatter", "json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout or "[]")


def _props(conn: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, _, value in conn["client_properties"]}


def connections_named(name: str) -> list[dict[str, Any]]:
    """The broker's connections whose connection_name client property is `name`."""
    found = _listing("list_connections", "pid", "user", "peer_host", "peer_port", "state", "client_properties")
    return [c for c in found if _props(c).get("connection_name") == name]


def consumers_of(queue: str) -> list[dict[str, Any]]:
    """The consumers of `queue`, each with the connection (pid) its channel belongs to."""
    channels = {c["pid"]: c["connection"] for c in _listing("list_channels", "pid", "connection")}
    return [{**c, "connection": channels.get(c["channel_pid"])}
            for c in _listing("list_consumers", "queue_name", "channel_pid") if c["queue_name"] == queue]


def close_connection(conn: dict[str, Any], reason: str) -> None:
    """Have the broker close `conn` (found by its peer port: the JSON listing's pid is not the form
    close_connection takes)."""
    rows = rabbitmqctl("-q", "list_connections", "pid", "peer_port", "--no-table-headers").stdout.splitlines()
    pids = [row.split("\t")[0] for row in rows if row.split("\t")[-1].strip() == str(conn["peer_port"])]
    assert len(pids) == 1, rows
    closed = rabbitmqctl("close_connection", pids[0], reason)
    assert closed.returncode == 0, closed.stderr


def wait_for(check, timeout: float = 60, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(every)


def test_the_consumer_connection_is_named_after_the_node(tmp_path: Path) -> None:
    services.require("rabbitmq")
    node = unique_node("hb")
    s = ServeProcess(tmp_path, node).start()
    try:
        named = wait_for(lambda: connections_named(node))
        assert len(named) == 1, named
        conn = named[0]
        # what the orchestrator's heartbeat reply shows: user, peer host and port, state running
        assert (conn["user"], conn["peer_host"], conn["state"]) == ("guest", [127, 0, 0, 1], "running")  # json: a tuple
        assert isinstance(conn["peer_port"], int) and conn["peer_port"] > 0
        consumers = consumers_of(node)
        assert [c["connection"] for c in consumers] == [conn["pid"]]  # the node queue's one consumer is it
        assert len(connections_named(f"{node} (events)")) == 1  # the publisher says what it is too
    finally:
        s.stop()
    assert wait_for(lambda: not connections_named(node), timeout=30)  # a stopped node is gone


def test_a_reconnect_leaves_one_consumer(tmp_path: Path) -> None:
    services.require("rabbitmq")
    node = unique_node("hb")
    s = ServeProcess(tmp_path, node).start()
    try:
        first = wait_for(lambda: connections_named(node))[0]
        close_connection(first, "test: the node's connection is cut")
        again = wait_for(lambda: [c for c in connections_named(node) if c["pid"] != first["pid"]])
        assert again, s.log()
        seen = []
        for _ in range(5):  # a few looks after the reconnect: never two
            seen.append(consumers_of(node))
            time.sleep(0.5)
        assert all(len(c) == 1 for c in seen), seen
        assert seen[-1][0]["connection"] == again[0]["pid"]
        assert "consumer reconnected" in s.log()
    finally:
        s.stop()


def test_a_second_service_for_the_node_waits_instead_of_sharing_the_queue(tmp_path: Path) -> None:
    services.require("rabbitmq")
    node = unique_node("hb")
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = ServeProcess(tmp_path / "a", node).start()
    b = ServeProcess(tmp_path / "b", node)
    try:
        b.start(ready=None)
        assert wait_for(lambda: "already has a consumer" in b.log(), timeout=30), b.log()
        assert wait_for(lambda: len(connections_named(node)) >= 1)
        looks = []
        for _ in range(4):
            looks.append(len(consumers_of(node)))
            time.sleep(0.5)
        assert looks == [1, 1, 1, 1]
        a.stop()
        # the broker dropped a's consumer; b, backing off, takes the queue over
        assert wait_for(lambda: "consuming queue" in b.log(), timeout=60), b.log()
        consumers = consumers_of(node)
        assert len(consumers) == 1
        assert consumers[0]["connection"] in {c["pid"] for c in connections_named(node)}
    finally:
        a.stop()
        b.stop()


def test_a_session_the_broker_ends_at_once_backs_off() -> None:
    """A refused consume (the queue held) ends the session right after connecting: the reconnect
    backs off instead of looping connect-refuse-connect as fast as the broker answers."""
    services.require("rabbitmq")
    cfg = BrokerConfig(url=BROKER_URL, reconnect_max_seconds=1)
    stop, connected = threading.Event(), threading.Event()
    sessions: list[float] = []

    def session(conn: Any) -> None:
        sessions.append(time.monotonic())
        raise RuntimeError("refused at once")

    thread = threading.Thread(target=run_connected, args=(cfg, "test", session, stop, connected),
                              kwargs={"name": unique_node("bo")})
    thread.start()
    time.sleep(3)
    stop.set()
    thread.join(15)
    assert not thread.is_alive()
    # delays of about 0.5 s then 1 s (jittered): a handful of sessions in 3 s, not hundreds
    assert 2 <= len(sessions) <= 8, len(sessions)
    assert all(b - a >= 0.2 for a, b in zip(sessions, sessions[1:], strict=False))
