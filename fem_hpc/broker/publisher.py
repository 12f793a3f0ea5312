"""The outbox publisher: sends journal outbox rows in order with publisher confirms and deletes
a row only once the broker confirmed it for every destination. While the broker is down rows
wait in the journal; after a reconnect they go out in the same order."""

from __future__ import annotations

import logging
import threading
import time

import pika

from ..config import BrokerConfig
from ..journal import Journal, OutboxRow
from .connection import run_connected

log = logging.getLogger("fem_hpc.broker.publisher")


def declare_topology(channel, exchange: str) -> None:
    channel.exchange_declare(exchange=exchange, exchange_type="topic", durable=True)


def properties(row: OutboxRow) -> pika.BasicProperties:
    p = row.properties
    return pika.BasicProperties(
        content_type=p.get("content_type"),
        correlation_id=p.get("correlation_id"),
        message_id=p.get("message_id"),
        type=p.get("type"),
        headers=p.get("headers"),
        delivery_mode=pika.DeliveryMode.Persistent,
        timestamp=int(time.time()),
    )


class Publisher:
    def __init__(self, cfg: BrokerConfig, journal: Journal, *, on_reconnect=None, connection_name: str | None = None):
        self.cfg = cfg
        self.connection_name = connection_name
        self.journal = journal
        self.on_reconnect = on_reconnect
        self.connected = threading.Event()
        self.fatal: BaseException | None = None
        self.published = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fem-publisher", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, flush_seconds: float = 5.0) -> None:
        """Stop after the outbox is empty or flush_seconds passed, whichever comes first."""
        deadline = time.monotonic() + flush_seconds
        while time.monotonic() < deadline and self.journal.outbox_depth() and self._thread.is_alive() \
                and self.connected.is_set():
            time.sleep(0.05)
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        self.fatal = run_connected(self.cfg, "publisher", self._publish_loop, self._stop, self.connected,
                                   self.on_reconnect, name=self.connection_name)

    def _publish_loop(self, conn: pika.BlockingConnection) -> None:
        channel = conn.channel()
        channel.confirm_delivery()
        declare_topology(channel, self.cfg.events_exchange)
        self.connected.set()
        log.info("publisher connected")
        while not self._stop.is_set():
            rows = self.journal.pending(limit=200)
            if not rows:
                conn.process_data_events(time_limit=0)  # heartbeats while idle
                self.journal.wait_outbox(0.2)
                continue
            done: list[int] = []
            try:
                self._publish_rows(channel, rows, done)
            finally:
                if done:  # one commit for the batch; a crash before it only means a re-send
                    self.journal.delete(*done)

    def _publish_rows(self, channel, rows: list[OutboxRow], done: list[int]) -> None:
        for row in rows:
            if self._stop.is_set():
                return
            try:
                body = row.payload()
            except OSError as exc:  # the archive is gone (work dir removed): nothing left to send
                log.error("outbox row %s of task %s cannot be read (%s); dropping it", row.id, row.task_id, exc,
                          extra={"task_id": row.task_id})
                done.append(row.id)
                continue
            props = properties(row)
            for exchange, routing_key in row.destinations:
                # With confirms on, basic_publish returns once the broker has taken the message
                # (and raises on a nack), so the row is deleted only after every confirm.
                channel.basic_publish(exchange=exchange, routing_key=routing_key, body=body, properties=props)
            done.append(row.id)
            self.published += 1
