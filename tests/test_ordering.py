"""Messages about one task are handled in their queue order (broker/consumer.py's lanes).

A node that comes back after an outage finds a submit and, behind it, the cancel the orchestrator
sent meanwhile. Handed to a pool of workers, the cancel could be handled first, find no task
(UNKNOWN) and leave the task to run for hours. The unit test drives the consumer's dispatch with
a slow handler; the integration test queues submit+cancel pairs before the real `fem-hpc serve`
starts, on the real RabbitMQ.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pika
import pytest
import services
from brokerkit import BROKER_URL, EventTap, ServeProcess, unique_node

from fem_hpc.broker.consumer import Consumer, Delivery
from fem_hpc.config import BrokerConfig
from fem_hpc.protocols.legacy.codec import order_key as legacy_key
from fem_hpc.protocols.v1.requests import order_key as v1_key


def delivery(body: bytes) -> Delivery:
    return Delivery(body=body, reply_to=None, correlation_id=None, message_id=None, headers={},
                    ack=lambda: None, nack=lambda: None)


def test_one_tasks_messages_in_order_other_tasks_in_parallel() -> None:
    spans: dict[bytes, list[float]] = {}
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def handler(d: Delivery) -> None:
        start = time.monotonic()
        time.sleep(0.4 if d.body.endswith(b"submit") else 0.05)
        with lock:
            spans[d.body] = [start, time.monotonic()]
        done.release()

    consumer = Consumer(BrokerConfig(url=BROKER_URL), "q", handler, workers=4,
                        order_key=lambda body: body.split(b":")[0].decode())
    try:
        for body in (b"t1:submit", b"t1:cancel", b"t2:submit", b"t1:status", b"t2:cancel"):
            consumer.dispatch(delivery(body))
        for _ in range(5):
            assert done.acquire(timeout=10)
    finally:
        consumer._pool.shutdown(wait=True)
    # t1's cancel and status waited for its submit, in queue order; t2 ran beside t1 meanwhile
    assert spans[b"t1:submit"][1] <= spans[b"t1:cancel"][0] <= spans[b"t1:cancel"][1] <= spans[b"t1:status"][0]
    assert spans[b"t2:submit"][0] < spans[b"t1:submit"][1]
    assert spans[b"t2:submit"][1] <= spans[b"t2:cancel"][0]
    assert consumer._lanes == {}  # drained lanes are dropped


def test_order_keys_name_the_task_or_the_execution() -> None:
    limit = 1 << 20
    assert v1_key(json.dumps({"fem": 1, "op": "submit", "task": {"id": "a1"}}).encode(), limit) == "a1"
    assert v1_key(json.dumps({"fem": 1, "op": "cancel", "task_id": "a1"}).encode(), limit) == "a1"
    for hostile in (b"{", b"[1]", b'{"task": {"id": "../x"}}', b'{"task_id": 7}', b"x" * 10):
        assert v1_key(hostile, limit) is None
    assert v1_key(json.dumps({"task_id": "a1"}).encode(), 5) is None  # over the size limit: not parsed
    submit = "submit_run|flcore|{'_id': 'flcore-server'}|{'execution_id': 'e42'}|{}|u1|None|None|tok"
    cancel = "cancel_run|flcore|{'_id': 'flcore-server'}|{'execution_id': 'e42'}|{}|u1|None|None|tok"
    assert legacy_key(submit.encode(), limit) == legacy_key(cancel.encode(), limit) == "legacy:e42"
    assert legacy_key(b"submit_run|x", limit) is None


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_cancels_queued_behind_their_submits_cancel_them(tmp_path: Path) -> None:
    services.require("rabbitmq")
    node = unique_node("order")
    tap = EventTap(node)
    ids = [f"long{i}" for i in range(8)]
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        ch = conn.channel()
        ch.queue_declare(node, durable=True)  # the node is down: its requests wait in its queue
        for tid in ids:
            for request in ({"fem": 1, "op": "submit", "task": {"id": tid, "command": ["sleep", "300"]}},
                            {"fem": 1, "op": "cancel", "task_id": tid}):
                ch.basic_publish("", node, json.dumps(request).encode(),
                                 pika.BasicProperties(delivery_mode=2, content_type="application/json"))
    finally:
        conn.close()
    serve = ServeProcess(tmp_path, node).start()
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not all(tap.result(t) for t in ids):
            tap.drain(timeout=2)
        results = {t: (tap.result(t) or {}).get("state") for t in ids}
        assert results == dict.fromkeys(ids, "CANCELLED"), (results, serve.log())
    finally:
        serve.stop()
        tap.delete()
