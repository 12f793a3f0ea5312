"""The orchestrator side of protocol v1, as a small Python API shared by the CLI and the tests.

    with Client("amqp://guest:guest@127.0.0.1:5672/%2F", node="N") as c:
        result = c.submit(task, outputs_dir="out", on_event=print)
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pika

from .broker.connection import parameters
from .config import BrokerConfig
from .staging.outputs import safe_extract


class ClientError(Exception):
    pass


class Timeout(ClientError):
    pass


@dataclass
class TaskResult:
    result: dict[str, Any]
    events: list[dict[str, Any]] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)  # names unpacked into outputs_dir

    @property
    def state(self) -> str:
        return self.result["state"]

    @property
    def exit_code(self) -> int | None:
        return self.result.get("exit_code")


class _ChunkJoiner:
    """Joins output chunks into the archive as they arrive, hashing on the way, so memory stays
    flat and little is left to do when the result comes. Chunks that arrive early wait in files."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.archive = tmp / "outputs.tar.gz"
        self._out = open(self.archive, "wb")  # noqa: SIM115 - closed in finish/close
        self._sha = hashlib.sha256()
        self.next = 0
        self.total: int | None = None

    def _append(self, data: bytes) -> None:
        self._sha.update(data)
        self._out.write(data)
        self.next += 1

    def add(self, headers: dict[str, Any], body: bytes) -> None:
        index = int(headers["index"])
        self.total = int(headers["total"])
        if index < self.next:
            return  # a duplicate
        if index > self.next:
            (self.tmp / f"{index:08d}.part").write_bytes(body)
            return
        self._append(body)
        while (early := self.tmp / f"{self.next:08d}.part").exists():
            data = early.read_bytes()
            early.unlink()
            self._append(data)

    def close(self) -> None:
        if not self._out.closed:
            self._out.close()

    def finish(self, result: dict[str, Any], outputs_dir: str | Path | None) -> list[str]:
        self.close()
        info = result.get("outputs")
        if not info:
            return []
        if self.next != info["chunks"] or (self.total is not None and self.total != info["chunks"]):
            raise ClientError(f"expected {info['chunks']} output chunks, received {self.next} in order")
        if self._sha.hexdigest() != info["sha256"]:
            raise ClientError(f"outputs checksum mismatch: got {self._sha.hexdigest()}, result says {info['sha256']}")
        if outputs_dir is None:
            return []
        return safe_extract(self.archive, Path(outputs_dir))


class Client:
    def __init__(self, url: str, node: str, *, queue: str | None = None, tls: Any = None):
        self.node = node
        self.queue = queue or node
        cfg = BrokerConfig(url=url, tls=tls, heartbeat=60)
        self._conn = pika.BlockingConnection(parameters(cfg))
        self._ch = self._conn.channel()
        self._reply = self._ch.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue

    def close(self) -> None:
        if self._conn.is_open:
            self._conn.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def publish(self, request: dict[str, Any] | bytes, correlation_id: str | None = None) -> str:
        corr = correlation_id or uuid.uuid4().hex
        body = request if isinstance(request, bytes) else json.dumps(request).encode()
        self._ch.basic_publish(
            exchange="", routing_key=self.queue, body=body,
            properties=pika.BasicProperties(content_type="application/json", delivery_mode=2,
                                            message_id=uuid.uuid4().hex, correlation_id=corr,
                                            reply_to=self._reply))
        return corr

    def replies(self, correlation_id: str, timeout: float | None):
        """Yield (properties, body) of replies with this correlation id until the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for method, props, body in self._ch.consume(self._reply, inactivity_timeout=0.5):
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"no final reply within {timeout}s")
            if method is None:
                continue
            self._ch.basic_ack(method.delivery_tag)
            if props.correlation_id == correlation_id:
                yield props, body

    def submit(self, task: dict[str, Any], *, wait: bool = True, timeout: float | None = None,
               outputs_dir: str | Path | None = None,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> TaskResult | None:
        corr = self.publish({"fem": 1, "op": "submit", "task": task})
        if not wait:
            return None
        return self.follow(corr, timeout=timeout, outputs_dir=outputs_dir, on_event=on_event)

    def follow(self, corr: str, *, timeout: float | None = None, outputs_dir: str | Path | None = None,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> TaskResult:
        events: list[dict[str, Any]] = []
        seen: set[int] = set()
        with tempfile.TemporaryDirectory(prefix="fem-chunks-") as tmp:
            joiner = _ChunkJoiner(Path(tmp))
            try:
                for props, body in self.replies(corr, timeout):
                    if props.type == "chunk":
                        joiner.add(props.headers or {}, body)
                        continue
                    event = json.loads(body)
                    seq = event.get("seq", 0)
                    if seq and seq in seen:
                        continue  # a duplicate from an at-least-once re-send
                    seen.add(seq)
                    events.append(event)
                    if on_event:
                        on_event(event)
                    if event.get("type") == "result":
                        names = joiner.finish(event, outputs_dir)
                        return TaskResult(event, events, names)
            finally:
                joiner.close()
        raise ClientError("reply stream ended without a result")  # pragma: no cover

    def _one(self, request: dict[str, Any], timeout: float) -> dict[str, Any]:
        corr = self.publish(request)
        for _props, body in self.replies(corr, timeout):
            return json.loads(body)
        raise ClientError("no reply")  # pragma: no cover

    def cancel(self, task_id: str, timeout: float = 30) -> dict[str, Any]:
        return self._one({"fem": 1, "op": "cancel", "task_id": task_id}, timeout)

    def status(self, task_id: str, timeout: float = 30) -> dict[str, Any]:
        return self._one({"fem": 1, "op": "status", "task_id": task_id}, timeout)

    def health(self, timeout: float = 30) -> dict[str, Any]:
        return self._one({"fem": 1, "op": "health"}, timeout)
