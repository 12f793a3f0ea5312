"""`fem-hpc serve`: wiring only. The broker consumer and publisher, the journal, the lifecycle, the
protocol frontends and dispatchers, the health report and the metrics are put together here."""

from __future__ import annotations

import logging
import signal
import sqlite3
import threading
import time
from typing import Any
from urllib.parse import unquote, urlsplit

from . import __version__
from . import metrics as metrics_hooks
from .broker.connection import BrokerAuthError
from .broker.consumer import Consumer, Delivery
from .broker.publisher import Publisher
from .config import SiteConfig
from .journal import Journal
from .lifecycle.agent import Agent
from .lifecycle.ports import Frontend
from .logs import register_secret
from .metrics import Metrics, Sources, TrackerGauge
from .model import FieldError
from .ops.gc import GcCollector, PeriodicGC
from .ops.health import ServiceState, health_reply
from .protocols.legacy.codec import order_key as legacy_order_key
from .protocols.legacy.frontend import PROTOCOL as LEGACY
from .protocols.legacy.frontend import LegacyFrontend
from .protocols.legacy.handler import LegacyHandler
from .protocols.v1.dispatch import V1Dispatch, dead_letter_message
from .protocols.v1.frontend import PROTOCOL as V1
from .protocols.v1.frontend import V1Frontend
from .protocols.v1.requests import is_v1
from .protocols.v1.requests import order_key as v1_order_key
from .staging.git import stage_source

log = logging.getLogger("fem_hpc.service")


def register_site_secrets(site: SiteConfig) -> None:
    """Mask every secret of the config in the logs from the start, before anything can log one:
    the broker password, git tokens and registry passwords."""
    password = urlsplit(site.broker.url).password
    if password:
        register_secret(password)
        register_secret(unquote(password))
    for cred in site.git.credentials.values():
        if cred.token is not None:
            register_secret(cred.token.get_secret_value())
    for reg in site.registries.values():
        register_secret(reg.password.get_secret_value())


class Service:
    JOURNAL_RETRY_SECONDS = 2.0

    def __init__(self, site: SiteConfig):
        self.site = site
        register_site_secrets(site)
        self.journal = Journal(site.journal_path)
        exchange = site.broker.events_exchange
        frontends: dict[str, Frontend] = {V1: V1Frontend(site.node, exchange)}
        if site.legacy.enabled:
            frontends[LEGACY] = LegacyFrontend(site.node, exchange, site.legacy)
        self.agent = Agent(site, self.journal, frontends=frontends, steps=[stage_source])
        self.v1 = V1Dispatch(site, self.journal, self.agent, self.health, legacy_enabled=site.legacy.enabled)
        self.legacy = LegacyHandler(site, self.journal, self.agent, self.health) if site.legacy.enabled else None
        self.reconnects = 0
        # The connections carry the node's name: the orchestrator's "heartbeat" lists a node's
        # connections on the broker (FEM-REAL.md), the consumer's under the node name itself.
        self.publisher = Publisher(site.broker, self.journal, on_reconnect=self._reconnected,
                                   connection_name=f"{site.node} (events)")
        self.consumer = Consumer(site.broker, site.queue, self.handle, workers=min(8, site.workers),
                                 on_reconnect=self._reconnected, connection_name=site.node,
                                 order_key=self.order_key)
        self.metrics: Metrics | None = None
        # Retention: a low-priority pass every retention.interval_seconds; remote work dirs go over
        # the connection of the service's own executor instance (one per cluster).
        self.gc = PeriodicGC(site, remover=lambda name, rels: self.agent.executors.start(name)[0].remove_remote(rels))
        self._stop = threading.Event()

    def order_key(self, body: bytes) -> str | None:
        """The task (v1) or execution (legacy) a message is about: the consumer keeps their order."""
        limit = self.site.broker.max_body_bytes
        if is_v1(body):
            return v1_order_key(body, limit)
        return legacy_order_key(body, limit) if self.legacy is not None else None

    def _reconnected(self, who: str) -> None:
        self.reconnects += 1
        metrics_hooks.broker_reconnect(who)
        log.info("%s reconnected to the broker", who)

    # -- messages ------------------------------------------------------------------------
    def handle(self, d: Delivery) -> None:
        try:
            if self.legacy is not None and not is_v1(d.body):
                self.legacy.handle(d)
            else:
                self.v1.handle(d)
        except (sqlite3.Error, OSError) as exc:
            # The journal cannot take it (disk full, I/O error): the message must not be acked,
            # or it would be lost. It goes back to the queue; the pause keeps this from spinning.
            log.error("cannot write the journal (%s); the message goes back to the queue", exc)
            time.sleep(self.JOURNAL_RETRY_SECONDS)
            d.nack()
            return
        except Exception as exc:
            log.exception("could not handle a message; dead-lettering it")
            try:
                self.journal.put(dead_letter_message(self.site.queue, d, "internal error",
                                                     [FieldError(field="body", message=f"internal error: {exc}")]))
            except (sqlite3.Error, OSError):
                d.nack()
                return
        d.ack()

    # -- health and metrics ----------------------------------------------------------------
    def state(self) -> ServiceState:
        return ServiceState(consumer_connected=self.consumer.connected.is_set(),
                            publisher_connected=self.publisher.connected.is_set(),
                            outbox_depth=self.journal.outbox_depth(), reconnects=self.reconnects,
                            tasks=self.journal.counts_by_state(), disk_guard=self.agent.disk_guard.state(),
                            retention=self.gc.summary())

    def health(self) -> dict[str, Any]:
        return health_reply(self.site, self.state(), self.agent.executors_health())

    def metrics_sources(self) -> Sources:
        return Sources(
            tasks_by_state=self.journal.counts_by_state,
            outbox_depth=self.journal.outbox_depth,
            connected=lambda: {"consumer": self.consumer.connected.is_set(),
                               "publisher": self.publisher.connected.is_set()},
            published=lambda: self.publisher.published,
            trackers=lambda: {name: TrackerGauge(len(t), t.stale, _since(t.executor.unreachable()))
                              for name, t in self.agent.executors.trackers().items()})

    # -- lifecycle -----------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self, install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self.site.work_root.mkdir(parents=True, exist_ok=True)
        if self.site.metrics.listen:
            self.metrics = Metrics(self.site.node, tuple(self.site.executors), self.metrics_sources())
            try:
                self.metrics.start(self.site.metrics.listen)
            except OSError as exc:  # metrics are optional: serve on, and say why they are missing
                log.error("metrics endpoint cannot listen on %s (%s); serving without metrics",
                          self.site.metrics.listen, exc.strerror or exc)
                self.metrics = None
        if self.metrics:
            self.metrics.registry.register(GcCollector(self.gc, self.agent.disk_guard))
        self.publisher.start()
        recovered = self.agent.recover(skip_protocols=("cli",))
        if recovered:
            log.info("carrying on with %d task(s) from the journal", recovered)
        self.consumer.start()
        self.gc.start()
        log.info("fem-hpc %s serving node %s on queue %s", __version__, self.site.node, self.site.queue)
        code = 0
        while not self._stop.wait(0.5):
            fatal = self.consumer.fatal or self.publisher.fatal
            if fatal is not None:
                log.error("%s; stopping (fix the broker credentials in the config and start again)", fatal)
                code = 77
                break
        log.info("stopping: no new messages; running jobs keep running and are re-adopted at the next start")
        self.consumer.stop()
        self.gc.stop()
        self.publisher.stop(flush_seconds=5.0)
        self.agent.close()
        if self.metrics:
            self.metrics.stop()
        self.journal.close()
        return code


def _since(down: Any) -> float | None:
    return None if down is None else down.since


def serve(site: SiteConfig) -> int:
    try:
        return Service(site).run()
    except BrokerAuthError as exc:
        log.error("%s", exc)
        return 77
