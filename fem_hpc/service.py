"""`fem-hpc serve`: the broker consumer and publisher around the agent."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import sqlite3
import threading
import time
from typing import Any

from . import __version__
from . import metrics as metrics_hooks
from .agent import Agent
from .broker.connection import BrokerAuthError
from .broker.consumer import Consumer, Delivery
from .broker.protocol import Invalid, Request, decode, is_v1
from .broker.publisher import Publisher
from .config import SiteConfig
from .events import JSON
from .journal import Journal, Message
from .model import FieldError
from .ops.gc import GcCollector, PeriodicGC

log = logging.getLogger("fem_hpc.service")


def register_site_secrets(site: SiteConfig) -> None:
    """Mask every secret of the config in the logs from the start, before anything can log one:
    the broker password, git tokens and registry passwords."""
    from urllib.parse import unquote, urlsplit

    from .logs import register_secret

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
        self.agent = Agent(site, self.journal)
        self.reconnects = 0
        from .staging.git import install as install_git

        install_git(self.agent)
        self.legacy = None
        if site.legacy.enabled:
            from .broker.legacy_handler import LegacyHandler

            self.legacy = LegacyHandler(self)
        self.publisher = Publisher(site.broker, self.journal, on_reconnect=self._reconnected)
        self.consumer = Consumer(site.broker, site.queue, self.handle, workers=min(8, site.workers),
                                 on_reconnect=self._reconnected)
        self.metrics = None
        self.gc = PeriodicGC(site)  # retention: a low-priority pass every retention.interval_seconds
        self._stop = threading.Event()

    def _reconnected(self, who: str) -> None:
        self.reconnects += 1
        metrics_hooks.broker_reconnect(who)
        log.info("%s reconnected to the broker", who)

    # -- messages ------------------------------------------------------------------------
    def handle(self, d: Delivery) -> None:
        try:
            if is_v1(d.body) or self.legacy is None:
                self._handle_v1(d)
            else:
                self.legacy.handle(d)
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
                self.dead_letter(d, "internal error",
                                 [FieldError(field="body", message=f"internal error: {exc}")])
            except (sqlite3.Error, OSError):
                d.nack()
                return
        d.ack()

    def _handle_v1(self, d: Delivery) -> None:
        req = decode(d.body, self.site.broker.max_body_bytes)
        if isinstance(req, Invalid):
            if not is_v1(d.body) and len(d.body) <= self.site.broker.max_body_bytes:
                req.errors.insert(0, FieldError(field="body", message="not a protocol v1 JSON object, and the "
                                                "legacy FEM protocol is not enabled on this node"))
            self.agent.reject(req.task_id, req.errors, reply_to=d.reply_to, correlation_id=d.correlation_id,
                              labels=req.labels)
            self.dead_letter(d, req.reason, req.errors)
            return
        self.dispatch(req, d)

    def dispatch(self, req: Request, d: Delivery) -> None:
        if req.op == "submit":
            result = self.agent.intake(req.task, reply_to=d.reply_to, correlation_id=d.correlation_id)
            if result.errors:
                self.dead_letter(d, "rejected task", result.errors)
        elif req.op == "cancel":
            self.agent.cancel(req.task_id or "", reply_to=d.reply_to, correlation_id=d.correlation_id)
        elif req.op == "status":
            self.agent.status(req.task_id or "", reply_to=d.reply_to, correlation_id=d.correlation_id)
        elif req.op == "health":
            if d.reply_to:
                body = json.dumps(self.health()).encode()
                props = {"content_type": JSON, "type": "health", "correlation_id": d.correlation_id}
                self.journal.put(Message([("", d.reply_to)], props, body=body))

    def dead_letter(self, d: Delivery, reason: str, errors: list[FieldError]) -> None:
        """Keep a copy of a refused message, with why, in `<queue>.rejected`."""
        headers = {**{k: v for k, v in d.headers.items() if isinstance(v, (str, int, float, bool))},
                   "x-fem-reason": reason,
                   "x-fem-errors": json.dumps([e.model_dump() for e in errors])[:4000]}
        props: dict[str, Any] = {"headers": headers, "correlation_id": d.correlation_id,
                                 "message_id": d.message_id, "type": "rejected"}
        self.journal.put(Message([("", f"{self.site.queue}.rejected")], props, body=d.body))

    # -- health --------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        disk = {}
        for name, path in (("state_dir", self.site.state_dir), ("work_root", self.site.work_root)):
            try:
                usage = shutil.disk_usage(path)
                disk[name] = {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}
            except OSError as exc:
                disk[name] = {"path": str(path), "error": exc.strerror}
        from .doctor import health_checks

        executors = self.agent.executors_health()
        return {
            "fem": 1, "type": "health", "node": self.site.node, "version": __version__, "time": time.time(),
            "executors": executors,
            "broker": {"consumer_connected": self.consumer.connected.is_set(),
                       "publisher_connected": self.publisher.connected.is_set(),
                       "outbox_depth": self.journal.outbox_depth(), "reconnects": self.reconnects},
            "disk": disk, "load": list(os.getloadavg()),
            "tasks": self.journal.counts_by_state(),
            "disk_guard": self.agent.disk_guard.state(), "retention": self.gc.summary(),
            "checks": [c.model_dump() for c in health_checks(self, executors)],
        }

    # -- lifecycle -----------------------------------------------------------------------
    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def run(self, install_signals: bool = True) -> int:
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        self.site.work_root.mkdir(parents=True, exist_ok=True)
        if self.site.metrics.listen:
            from .metrics import Metrics

            self.metrics = Metrics(self)
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


def serve(site: SiteConfig) -> int:
    try:
        return Service(site).run()
    except BrokerAuthError as exc:
        log.error("%s", exc)
        return 77
