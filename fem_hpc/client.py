"""The orchestrator side of protocol v1, as a small Python API shared by the CLI and the tests.

    with Client("amqp://guest:guest@127.0.0.1:5672/%2F", node="N") as c:
        result = c.submit(task, outputs_dir="out", on_event=print)

    with Client(url) as c:                       # several nodes, followed together
        runs = [c.start(task, node=n, outputs_dir=f"out/{n}") for n in ("a", "b")]
        c.follow_all(runs, timeout=600)          # each run has .result, .error, .state

Surviving the broker. An FL run lasts hours; the broker may restart meanwhile. The client's reply
queue therefore has a stable name and is durable with an expiry (`x-expires`) instead of being
exclusive: it outlives a lost connection and a RabbitMQ restart, and the node's events (persistent,
held in the node's outbox while the broker is away) land in it when the broker is back. After a
loss the client reconnects with the broker package's jittered backoff, re-declares that queue and
asks again for every request still open with the same correlation id: a resubmit of a known task
id re-sends its current state, and when it is final its output chunks and result, so whatever was
lost in flight comes again. Duplicates are dropped by `seq` (events) and `index` (chunks). A loss
is one warning line and a reconnect another; no pika traceback reaches the user.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pika
import pika.exceptions

from .broker.connection import Backoff, is_auth_error, parameters
from .config import BrokerConfig
from .staging.outputs import safe_extract

log = logging.getLogger("fem_hpc.client")

# An unused reply queue (its client gone for good) is deleted by the broker after this long.
REPLY_QUEUE_EXPIRES_MS = 60 * 60 * 1000
# What a lost connection or channel looks like: pika's own errors and the socket's.
_LOST = (pika.exceptions.AMQPError, OSError)
FINAL = ("COMPLETED", "FAILED", "CANCELLED", "REJECTED")


class ClientError(Exception):
    pass


class Timeout(ClientError):
    pass


class NoSuchQueue(ClientError):
    """The broker has no queue of that name: the node never started `fem-hpc serve` (or it is named
    differently), and a message sent there would be dropped."""


class TaskResult:
    def __init__(self, result: dict[str, Any], events: list[dict[str, Any]] | None = None,
                 outputs: list[str] | None = None):
        self.result = result
        self.events = events or []
        self.outputs = outputs or []  # names unpacked into outputs_dir

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

    def missing(self, result: dict[str, Any]) -> str | None:
        """Why the chunks received so far do not make the archive the result describes (None: they do)."""
        info = result.get("outputs")
        if not info:
            return None
        if self.next != info["chunks"] or (self.total is not None and self.total != info["chunks"]):
            return f"expected {info['chunks']} output chunks, received {self.next} in order"
        if self._sha.hexdigest() != info["sha256"]:
            return f"outputs checksum mismatch: got {self._sha.hexdigest()}, result says {info['sha256']}"
        return None

    def finish(self, result: dict[str, Any], outputs_dir: str | Path | None) -> list[str]:
        self.close()
        problem = self.missing(result)
        if problem:
            raise ClientError(problem)
        if not result.get("outputs") or outputs_dir is None:
            return []
        return safe_extract(self.archive, Path(outputs_dir))


class _Waiter:
    """One open request: its replies wait in `inbox` until somebody reads them."""

    def __init__(self, corr: str, queue: str, body: bytes, expiration_ms: int | None):
        self.corr = corr
        self.queue = queue
        self.body = body
        self.expiration_ms = expiration_ms
        self.asks = 1  # how often the request was published (re-asks after a loss, or for lost chunks)
        self.inbox: deque[tuple[Any, bytes]] = deque()
        self.error: str | None = None  # a re-ask that cannot be delivered (the queue is gone)


class Run:
    """One task on one node, followed to its result. After `follow_all`: `result` (a TaskResult),
    or `error` (why there is none: timed out, no such queue, a broken reply stream)."""

    def __init__(self, client: Client, waiter: _Waiter, node: str, task: Any, outputs_dir: str | Path | None,
                 on_event: Callable[[dict[str, Any]], None] | None):
        self.client = client
        self.waiter = waiter
        self.node = node
        self.task = task
        self.task_id = task.get("id") if isinstance(task, dict) else None
        self.outputs_dir = outputs_dir
        self.on_event = on_event
        self.events: list[dict[str, Any]] = []
        self.state: str | None = None  # the last state heard of
        self.native_id: str | None = None
        self.result: TaskResult | None = None
        self.error: str | None = None
        self.timed_out = False
        self._seen: set[int] = set()
        self._tmp = tempfile.TemporaryDirectory(prefix="fem-chunks-")
        self._joiner = _ChunkJoiner(Path(self._tmp.name))

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None

    def _close(self) -> None:
        self._joiner.close()
        self._tmp.cleanup()
        self.client._forget(self.waiter)

    def fail(self, error: str, *, timed_out: bool = False) -> None:
        if not self.done:
            self.error = error
            self.timed_out = timed_out
            self._close()

    def feed(self) -> None:
        """Consume the replies waiting for this run."""
        if self.waiter.error and not self.done:
            self.fail(f"node {self.node}: {self.waiter.error}")
        while self.waiter.inbox and not self.done:
            props, body = self.waiter.inbox.popleft()
            if props.type == "chunk":
                self._joiner.add(props.headers or {}, body)
                continue
            try:
                event = json.loads(body)
            except ValueError:
                log.warning("node %s sent a reply that is not JSON; ignored", self.node)
                continue
            seq = event.get("seq", 0)
            if seq and seq in self._seen:
                continue  # a duplicate from an at-least-once re-send
            if seq:
                self._seen.add(seq)
            if event.get("type") == "status":
                if event.get("state") == self.state and event.get("native_id") == self.native_id:
                    continue  # the same state again, re-sent after a re-ask: nothing new to report
                self.state = event.get("state")
                self.native_id = event.get("native_id") or self.native_id
            self.events.append(event)
            if self.on_event:
                self.on_event(event)
            if event.get("type") == "result":
                self._on_result(event)

    def _on_result(self, event: dict[str, Any]) -> None:
        self.state = event.get("state")
        self.native_id = event.get("native_id") or self.native_id
        problem = self._joiner.missing(event)
        if problem and event.get("outputs"):
            if self.waiter.asks > self.client.result_asks:
                self.fail(f"node {self.node}: {problem}")
                return
            # Chunks lost in flight (a connection lost between them): a resubmit of the same id
            # re-sends the archive and the result.
            log.warning("node %s, task %s: %s; asking for the outputs again", self.node, self.task_id, problem)
            self.client._reask(self.waiter)
            return
        try:
            names = self._joiner.finish(event, self.outputs_dir)
        except ClientError as exc:
            self.fail(f"node {self.node}: {exc}")
            return
        self.result = TaskResult(event, self.events, names)
        self._close()


class Client:
    """A connection to the broker that survives it: see the module docstring."""

    result_asks = 3  # how often a run asks again when its outputs arrived incomplete

    def __init__(self, url: str, node: str | None = None, *, queue: str | None = None, tls: Any = None,
                 reconnect_max_seconds: float = 10.0, connect_timeout: float = 30.0):
        self.node = node
        self.queue = queue or node
        self._cfg = BrokerConfig(url=url, tls=tls, heartbeat=60, reconnect_max_seconds=reconnect_max_seconds)
        self._reply = f"fem.reply.{uuid.uuid4().hex}"
        self._waiters: dict[str, _Waiter] = {}
        self._conn: pika.BlockingConnection | None = None
        self._ch: Any = None
        self.reconnects = 0
        self._connect_until(time.monotonic() + connect_timeout, first=True)

    # -- the connection ---------------------------------------------------------------------
    def _open(self) -> None:
        conn = pika.BlockingConnection(parameters(self._cfg))
        try:
            ch = conn.channel()
            ch.confirm_delivery()  # a publish returns once the broker has the message (or says why not)
            ch.queue_declare(queue=self._reply, durable=True, exclusive=False, auto_delete=False,
                             arguments={"x-expires": REPLY_QUEUE_EXPIRES_MS})
            ch.basic_consume(queue=self._reply, on_message_callback=self._on_reply, auto_ack=True)
        except BaseException:
            _quiet_close(conn)
            raise
        self._conn, self._ch = conn, ch

    def _connect_until(self, deadline: float | None, *, first: bool = False) -> None:
        backoff = Backoff(self._cfg.reconnect_max_seconds)
        where = self._cfg.url.split("@")[-1]
        while True:
            try:
                self._open()
                return
            except _LOST as exc:
                if is_auth_error(exc):
                    raise ClientError(f"the broker at {where} refused the credentials or vhost") from None
                delay = backoff.next()
                if deadline is not None and time.monotonic() + delay > deadline:
                    what = "cannot reach" if first else "could not reconnect to"
                    raise (ClientError if first else Timeout)(
                        f"{what} the broker at {where} ({type(exc).__name__}: {exc})") from None
                log.debug("broker at %s not reachable (%s); retrying in %.1fs", where, type(exc).__name__, delay)
                time.sleep(delay)

    def _recover(self, exc: BaseException, deadline: float | None) -> None:
        """After a lost connection: reconnect, re-declare the reply queue, ask again for every
        open request. Raises Timeout when the deadline passes first."""
        _quiet_close(self._conn)
        self._conn = self._ch = None
        t0 = time.monotonic()
        log.warning("lost the broker connection (%s); reconnecting", _describe(exc))
        self._connect_until(deadline)
        self.reconnects += 1
        for waiter in list(self._waiters.values()):
            self._reask(waiter)
        log.warning("reconnected to the broker after %.1fs; asked again for %d open request(s)",
                    time.monotonic() - t0, len(self._waiters))

    def _reask(self, waiter: _Waiter) -> None:
        waiter.asks += 1
        try:
            self._basic_publish(waiter)
        except NoSuchQueue as exc:
            waiter.error = str(exc)
        except _LOST as exc:  # the next pump notices the loss and recovers
            log.debug("re-ask of %s not sent (%s)", waiter.corr, _describe(exc))

    def close(self) -> None:
        if self._conn is not None and self._conn.is_open:
            try:
                self._ch.queue_delete(self._reply)  # the expiry would do it; no need to wait
            except _LOST:
                pass
            _quiet_close(self._conn)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- publishing and receiving --------------------------------------------------------------
    def _on_reply(self, channel: Any, method: Any, props: Any, body: bytes) -> None:
        waiter = self._waiters.get(props.correlation_id or "")
        if waiter is not None:
            waiter.inbox.append((props, body))

    def _basic_publish(self, waiter: _Waiter) -> None:
        props = pika.BasicProperties(content_type="application/json", delivery_mode=2, message_id=uuid.uuid4().hex,
                                     correlation_id=waiter.corr, reply_to=self._reply,
                                     expiration=None if waiter.expiration_ms is None else str(waiter.expiration_ms))
        try:
            self._ch.basic_publish(exchange="", routing_key=waiter.queue, body=waiter.body, properties=props,
                                   mandatory=True)
        except pika.exceptions.UnroutableError:
            raise NoSuchQueue(f"the broker has no queue {waiter.queue!r}: no fem-hpc serve has ever consumed it "
                              "(is the node name right, and has the node started?)") from None

    def publish(self, request: dict[str, Any] | bytes, correlation_id: str | None = None, *,
                queue: str | None = None, expiration_seconds: float | None = None) -> str:
        """Send a request to a node's queue (default: this client's node) and return its correlation
        id; its replies are kept until read with `replies` or `follow`."""
        target = queue or self.queue
        if not target:
            raise ClientError("no node queue given")
        body = request if isinstance(request, bytes) else json.dumps(request).encode()
        waiter = _Waiter(correlation_id or uuid.uuid4().hex, target, body,
                         None if expiration_seconds is None else max(1, int(expiration_seconds * 1000)))
        self._waiters[waiter.corr] = waiter
        while True:
            try:
                self._basic_publish(waiter)
                return waiter.corr
            except NoSuchQueue:
                self._forget(waiter)
                raise
            except _LOST as exc:
                # Re-asks include this waiter: after the recovery its request is sent.
                self._recover(exc, None)
                return waiter.corr

    def _forget(self, waiter: _Waiter) -> None:
        self._waiters.pop(waiter.corr, None)

    def forget(self, correlation_id: str) -> None:
        """Stop keeping the replies of a request sent with `publish` (late ones are dropped)."""
        self._waiters.pop(correlation_id, None)

    def _pump(self, time_limit: float, deadline: float | None) -> None:
        """Let pika deliver what has arrived (into the waiters' inboxes), recovering from a loss."""
        try:
            if self._conn is None:
                raise pika.exceptions.AMQPConnectionError("not connected")
            self._conn.process_data_events(time_limit=time_limit)
        except _LOST as exc:
            self._recover(exc, deadline)

    def replies(self, correlation_id: str, timeout: float | None) -> Iterator[tuple[Any, bytes]]:
        """Yield (properties, body) of replies with this correlation id until the deadline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        waiter = self._waiters.get(correlation_id)
        if waiter is None:
            raise ClientError(f"no request with correlation id {correlation_id!r} was sent by this client")
        while True:
            while waiter.inbox:
                yield waiter.inbox.popleft()
            if deadline is not None and time.monotonic() > deadline:
                raise Timeout(f"no final reply within {timeout}s")
            self._pump(0.25, deadline)

    # -- tasks -----------------------------------------------------------------------------------
    def start(self, task: dict[str, Any], *, node: str | None = None, queue: str | None = None,
              outputs_dir: str | Path | None = None, on_event: Callable[[dict[str, Any]], None] | None = None,
              expiration_seconds: float | None = None) -> Run:
        """Submit a task and return its Run, to be followed with `follow_all` (or `pump`).
        `expiration_seconds` lets the broker drop the request if no node took it by then."""
        node = node or self.node
        if not node:
            raise ClientError("no node given")
        if queue is None:
            queue = self.queue if node == self.node else node
        corr = self.publish({"fem": 1, "op": "submit", "task": task}, queue=queue,
                            expiration_seconds=expiration_seconds)
        return Run(self, self._waiters[corr], node, task, outputs_dir, on_event)

    def pump(self, runs: Iterable[Run], *, until: Callable[[], bool], timeout: float | None = None) -> bool:
        """Follow `runs` until `until()` is true (True) or the timeout passes (False)."""
        runs = list(runs)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            for run in runs:
                run.feed()
            if until():
                return True
            if deadline is not None and time.monotonic() >= deadline:
                return False
            try:
                self._pump(0.25, deadline)
            except Timeout:
                return False

    def follow_all(self, runs: Iterable[Run], *, timeout: float | None = None) -> list[Run]:
        """Follow every run to its result; runs still open at the deadline get a timed-out error."""
        runs = list(runs)
        if not self.pump(runs, until=lambda: all(r.done for r in runs), timeout=timeout):
            for run in runs:
                run.fail(f"node {run.node}: no final reply within {timeout}s (last state: {run.state or 'none'})",
                         timed_out=True)
        return runs

    def submit(self, task: dict[str, Any], *, wait: bool = True, timeout: float | None = None,
               outputs_dir: str | Path | None = None,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> TaskResult | None:
        run = self.start(task, outputs_dir=outputs_dir, on_event=on_event)
        if not wait:
            self._forget(run.waiter)
            return None
        return self._one_run(run, timeout)

    def follow(self, corr: str, *, timeout: float | None = None, outputs_dir: str | Path | None = None,
               on_event: Callable[[dict[str, Any]], None] | None = None) -> TaskResult:
        waiter = self._waiters.get(corr)
        if waiter is None:
            raise ClientError(f"no request with correlation id {corr!r} was sent by this client")
        return self._one_run(Run(self, waiter, self.node or waiter.queue, {}, outputs_dir, on_event), timeout)

    def _one_run(self, run: Run, timeout: float | None) -> TaskResult:
        self.follow_all([run], timeout=timeout)
        if run.result is not None:
            return run.result
        if run.timed_out:
            raise Timeout(f"no final reply within {timeout}s")
        raise ClientError(run.error or "no result")

    def _one(self, request: dict[str, Any], timeout: float, queue: str | None = None) -> dict[str, Any]:
        corr = self.publish(request, queue=queue)
        try:
            for _props, body in self.replies(corr, timeout):
                return json.loads(body)
        finally:
            self._waiters.pop(corr, None)
        raise ClientError("no reply")  # pragma: no cover

    def cancel(self, task_id: str, timeout: float = 30, *, node: str | None = None) -> dict[str, Any]:
        return self._one({"fem": 1, "op": "cancel", "task_id": task_id}, timeout, queue=node)

    def status(self, task_id: str, timeout: float = 30, *, node: str | None = None) -> dict[str, Any]:
        return self._one({"fem": 1, "op": "status", "task_id": task_id}, timeout, queue=node)

    def health(self, timeout: float = 30, *, node: str | None = None) -> dict[str, Any]:
        return self._one({"fem": 1, "op": "health"}, timeout, queue=node)


# -- several nodes -------------------------------------------------------------------------------
def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _quiet_close(conn: Any) -> None:
    try:
        if conn is not None and conn.is_open:
            conn.close()
    except Exception:
        pass
