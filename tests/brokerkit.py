"""Helpers for tests that run the real `fem-hpc serve` against the real RabbitMQ.

Every test gets its own node name, so its queue, its dead-letter queue and its routing keys on
`fem.events` are its own: tests never share state.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pika
import yaml
from conftest import fem_hpc_command

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"

# Secrets used across the suite's end-to-end tests; ServeProcess.stop checks its log for each.
KNOWN_SECRETS = {"tok-SECRET-123", "fempass"}


def unique_node(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def rabbitmqctl(*args: str, node: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    argv = ["rabbitmqctl"] + (["-n", node] if node else []) + list(args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


class ServeProcess:
    """`fem-hpc serve` as a child process with its own config, state and work dirs."""

    def __init__(self, tmp: Path, node: str, extra: dict[str, Any] | None = None, args: list[str] | None = None,
                 env: dict[str, str] | None = None):
        self.tmp = tmp
        self.node = node
        self.secrets: set[str] = set()  # extra secrets this test gave the service
        self.args = list(args or [])  # extra `serve` flags, e.g. ["--log-format", "json"]
        self.env = dict(env or {})  # extra environment for the child
        self.prefix: list[str] = []  # argv run before fem-hpc (e.g. unshare, see clusterkit.isolate)
        self.config: dict[str, Any] = {
            "node": node,
            "broker": {"url": BROKER_URL, "heartbeat": 5, "reconnect_max_seconds": 2},
            "state_dir": str(tmp / "state"),
            "work_root": str(tmp / "work"),
            "executors": {"local": {"kill_grace_seconds": 2, "lost_grace_seconds": 3}},
            "policy": {"git": ["file://*"], "max_resources": {"cpus": 4, "memory": "8G"}},
        }
        for key, value in (extra or {}).items():
            if isinstance(value, dict) and isinstance(self.config.get(key), dict):
                self.config[key] = {**self.config[key], **value}
            else:
                self.config[key] = value
        self.config_path = tmp / f"{node}.yaml"
        self.log_path = tmp / f"{node}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, ready: str | None = "consuming queue") -> ServeProcess:
        """Start the service and wait until its log shows `ready` (None: return at once, for a
        service that is expected not to consume yet)."""
        self.config_path.write_text(yaml.safe_dump(self.config))
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        self.proc = subprocess.Popen([*self.prefix, *fem_hpc_command(), "serve", "--config", str(self.config_path),
                                      *self.args],
                                     stdout=log, stderr=log, env=env)
        log.close()
        if ready is None:
            return self
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if ready in self.log():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"fem-hpc serve exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        self.proc.kill()  # never leave a half-started service behind
        self.proc.wait()
        raise RuntimeError(f"fem-hpc serve did not start consuming:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            code = self.proc.returncode if self.proc else None
        else:
            self.proc.send_signal(sig)
            try:
                code = self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                code = self.proc.wait()
        self.assert_no_secrets()
        return code

    def assert_no_secrets(self) -> None:
        """Every end-to-end run of the suite is checked: no secret a test handed to the service
        (broker password, tokens, registry and git credentials) may appear in its log."""
        log = self.log()
        leaked = sorted(s for s in KNOWN_SECRETS | self.secrets if s and s in log)
        assert not leaked, f"secrets in the log of fem-hpc serve ({self.log_path}): {leaked}"

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class EventTap:
    """A durable queue bound to fem.events for one node: it survives broker restarts and client
    reconnects, so a test can read everything the node published."""

    def __init__(self, node: str):
        self.node = node
        self.queue = f"tap.{node}"
        conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        ch = conn.channel()
        ch.exchange_declare("fem.events", exchange_type="topic", durable=True)
        ch.queue_declare(self.queue, durable=True)
        ch.queue_bind(self.queue, "fem.events", routing_key=f"{node}.#")
        conn.close()
        self.events: list[dict[str, Any]] = []
        self.chunks: list[tuple[dict[str, Any], bytes]] = []

    def drain(self, until_result: str | None = None, timeout: float = 60) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
            except pika.exceptions.AMQPConnectionError:
                time.sleep(0.5)
                continue
            try:
                ch = conn.channel()
                while time.monotonic() < deadline:
                    method, props, body = ch.basic_get(self.queue, auto_ack=True)
                    if method is None:
                        if until_result is None or self.result(until_result):
                            return self.events
                        time.sleep(0.1)
                        continue
                    if props.type == "chunk":
                        self.chunks.append((dict(props.headers or {}), body))
                    else:
                        self.events.append(json.loads(body))
            except pika.exceptions.AMQPError:
                time.sleep(0.5)
            finally:
                try:
                    conn.close()
                except Exception:
                    pass
        if until_result is not None and not self.result(until_result):
            raise AssertionError(f"no result for {until_result} within {timeout}s; events: {self.events}")
        return self.events

    def result(self, task_id: str) -> dict[str, Any] | None:
        for ev in self.events:
            if ev.get("type") == "result" and ev.get("task_id") == task_id:
                return ev
        return None

    def states(self, task_id: str) -> list[str]:
        return [e["state"] for e in self.events if e.get("type") == "status" and e.get("task_id") == task_id]

    def delete(self) -> None:
        try:
            conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
            conn.channel().queue_delete(self.queue)
            conn.close()
        except Exception:
            pass


class LegacyOrchestrator:
    """The legacy FEM orchestrator's side, written from the wire facts only (FEM-REAL.md): a
    pipe-separated body on the node queue, an exclusive auto-named reply queue, a uuid4 correlation
    id, and a chunked reply joined by index and checked against its sha256."""

    def __init__(self, queue: str, url: str = BROKER_URL):
        self.queue = queue
        self.conn = pika.BlockingConnection(pika.URLParameters(url))
        self.ch = self.conn.channel()
        self.reply_queue = self.ch.queue_declare("", exclusive=True).method.queue

    def close(self) -> None:
        self.conn.close()

    def call(self, body: str | bytes, timeout: float = 60) -> dict:
        corr = str(uuid.uuid4())
        self.ch.basic_publish("", self.queue, body if isinstance(body, bytes) else body.encode(),
                              pika.BasicProperties(reply_to=self.reply_queue, correlation_id=corr))
        start, chunks = None, {}
        deadline = time.monotonic() + timeout
        for method, props, raw in self.ch.consume(self.reply_queue, inactivity_timeout=0.5):
            if time.monotonic() > deadline:
                raise AssertionError("no complete legacy reply in time")
            if method is None:
                continue
            self.ch.basic_ack(method.delivery_tag)
            if props.correlation_id != corr:
                continue
            msg = json.loads(raw)
            if msg["type"] == "chunk_start":
                start = msg
            else:
                chunks[msg["index"]] = base64.b64decode(msg["data"])
            if start is not None and len(chunks) == start["total"]:
                data = b"".join(chunks[i] for i in range(start["total"]))
                assert hashlib.sha256(data).hexdigest() == start["checksum"]
                return json.loads(data)
        raise AssertionError("unreachable")


def get_all(queue: str, timeout: float = 10, expect: int = 1) -> list[tuple[Any, bytes]]:
    """Messages of a queue (e.g. the dead-letter queue), waiting until `expect` are there."""
    out: list[tuple[Any, bytes]] = []
    deadline = time.monotonic() + timeout
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    ch = conn.channel()
    try:
        while time.monotonic() < deadline and len(out) < expect:
            try:
                method, props, body = ch.basic_get(queue, auto_ack=True)
            except pika.exceptions.ChannelClosedByBroker:  # queue not declared yet
                ch = conn.channel()
                time.sleep(0.2)
                continue
            if method is None:
                time.sleep(0.1)
                continue
            out.append((props, body))
    finally:
        conn.close()
    return out


def task(task_id: str, command: list[str], **extra: Any) -> dict[str, Any]:
    return {"id": task_id, "command": command, **extra}


PY = sys.executable
