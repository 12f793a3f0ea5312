"""The node-queue consumer: pika's BlockingConnection on its own thread.

pika is not thread-safe, so the I/O thread only receives and acks: each message is handed to a
worker, and the worker's ack comes back through `add_callback_threadsafe`. A message is acked
once its task is committed to the journal, never held until the task ends (RabbitMQ's
consumer_timeout would close the channel under a long job).

Messages about the same task are handled in the order the queue delivered them: a worker pool
alone would let a cancel that waited in the queue behind its submit (a node coming back after
an outage) be handled first, find no task, and leave the task to run. `order_key` names the
task a body is about (the protocols know how); messages with the same key form a lane that one
worker drains in order, while other tasks' messages go on in parallel.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pika

from ..config import BrokerConfig
from .connection import run_connected

log = logging.getLogger("fem_hpc.broker.consumer")


class QueueHeld(Exception):
    """The node queue is consumed by another connection (the consumer is exclusive)."""


@dataclass
class Delivery:
    body: bytes
    reply_to: str | None
    correlation_id: str | None
    message_id: str | None
    headers: dict[str, Any]
    ack: Callable[[], None]
    nack: Callable[[], None]  # give the message back to the queue (requeue)


class Consumer:
    def __init__(self, cfg: BrokerConfig, queue: str, handler: Callable[[Delivery], None], *, workers: int = 4,
                 on_reconnect: Callable[[str], None] | None = None, connection_name: str | None = None,
                 order_key: Callable[[bytes], str | None] | None = None):
        self.cfg = cfg
        self.order_key = order_key
        self._lanes: dict[str, deque[Delivery]] = {}  # key -> messages waiting behind the one in hand
        self.queue = queue
        self.connection_name = connection_name  # the node's name, as the broker lists the connection
        self.handler = handler
        self.on_reconnect = on_reconnect
        self.connected = threading.Event()
        self.fatal: BaseException | None = None
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fem-intake")
        # Reads each body's order key, one message after another in delivery order: a key can take a
        # parse (a legacy literal), which must not hold up pika's I/O thread (heartbeats, acks).
        self._sorter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fem-intake-order")
        self._stop = threading.Event()
        self._inflight = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="fem-consumer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop consuming, let intake in flight finish and ack, then close."""
        self._stop.set()
        self._thread.join(timeout=timeout)
        self._sorter.shutdown(wait=True)  # first: it still hands messages to the pool
        self._pool.shutdown(wait=True)

    @property
    def inflight(self) -> int:
        with self._lock:
            return self._inflight

    def _run(self) -> None:
        self.fatal = run_connected(self.cfg, "consumer", self._consume, self._stop, self.connected,
                                   self.on_reconnect, name=self.connection_name)
        if self.fatal is not None:
            log.error("%s", self.fatal)

    def _consume(self, conn: pika.BlockingConnection) -> None:
        channel = conn.channel()
        channel.basic_qos(prefetch_count=self.cfg.prefetch)
        channel.queue_declare(queue=self.queue, durable=True)
        channel.queue_declare(queue=f"{self.queue}.rejected", durable=True)
        on_message = functools.partial(self._on_message, conn)
        # Exclusive: the node queue has one consumer, ever. After a reconnect whose old connection
        # the broker has not dropped yet (a half-open TCP, until its heartbeat times out), or with a
        # second fem-hpc started for the same node, the broker refuses this consume (403) and
        # run_connected retries with backoff, instead of two consumers splitting the node's tasks.
        try:
            tag = channel.basic_consume(queue=self.queue, on_message_callback=on_message, exclusive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 403:
                raise QueueHeld(f"queue {self.queue} already has a consumer (an earlier connection of this node "
                                "that the broker has not dropped yet, or another fem-hpc for this node)") from None
            raise
        self.connected.set()
        log.info("consuming queue %s (prefetch %d)", self.queue, self.cfg.prefetch)
        while not self._stop.is_set():
            conn.process_data_events(time_limit=0.25)
        # Graceful stop: no new deliveries; wait for intake in flight so its acks go out.
        channel.basic_cancel(tag)
        for _ in range(200):
            if self.inflight == 0:
                break
            conn.process_data_events(time_limit=0.05)

    def _on_message(self, conn, channel, method, props, body: bytes) -> None:
        with self._lock:
            self._inflight += 1

        def ack() -> None:
            conn.add_callback_threadsafe(functools.partial(self._ack, channel, method.delivery_tag, True))

        def nack() -> None:
            conn.add_callback_threadsafe(functools.partial(self._ack, channel, method.delivery_tag, False))

        delivery = Delivery(body=body, reply_to=props.reply_to, correlation_id=props.correlation_id,
                            message_id=props.message_id, headers=dict(props.headers or {}),
                            ack=ack, nack=nack)
        self._sorter.submit(self.dispatch, delivery)

    def dispatch(self, delivery: Delivery) -> None:
        """Hand `delivery` to a worker, behind the earlier messages of its task (its lane)."""
        try:
            key = self.order_key(delivery.body) if self.order_key is not None else None
        except Exception:  # a body the key function cannot read is handled (and refused) on its own
            key = None
        if key is not None:
            with self._lock:
                lane = self._lanes.get(key)
                if lane is not None:
                    lane.append(delivery)
                    return
                self._lanes[key] = deque()
        self._pool.submit(self._drain, key, delivery)

    def _drain(self, key: str | None, delivery: Delivery) -> None:
        while True:
            self._handle(delivery)
            if key is None:
                return
            with self._lock:
                lane = self._lanes[key]
                if not lane:
                    del self._lanes[key]
                    return
                delivery = lane.popleft()

    def _handle(self, delivery: Delivery) -> None:
        try:
            self.handler(delivery)
        except Exception:  # the handler dead-letters what it cannot take; this is the last guard
            log.exception("message handler failed")
            delivery.ack()

    def _ack(self, channel, tag: int, ok: bool) -> None:
        with self._lock:
            self._inflight -= 1
        # A tag of a channel that died is void: the broker redelivers that message, and the
        # journal makes the second intake a no-op.
        if channel.is_open:
            if ok:
                channel.basic_ack(delivery_tag=tag)
            else:
                channel.basic_nack(delivery_tag=tag, requeue=True)
