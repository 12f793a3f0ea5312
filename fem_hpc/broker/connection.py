"""Connection parameters (URL, heartbeat, mutual TLS) and the reconnect loop."""

from __future__ import annotations

import logging
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit

import pika

from ..backoff import Backoff
from ..config import BrokerConfig
from ..logs import register_secret

log = logging.getLogger("fem_hpc.broker")


class BrokerAuthError(Exception):
    """The broker refused our credentials: retrying would only lock the account or spam the logs."""


def parameters(cfg: BrokerConfig, *, heartbeat: int | None = None, name: str | None = None) -> pika.URLParameters:
    """pika's parameters for `cfg`. `name` is the connection's `connection_name` client property: what
    the broker (rabbitmqctl list_connections, the management API) shows for it, so an orchestrator
    that lists a node's connections as its heartbeat sees the node by name."""
    url = urlsplit(cfg.url)
    register_secret(url.password)
    params = pika.URLParameters(cfg.url)
    if name:
        params.client_properties = {"connection_name": name}
    params.heartbeat = cfg.heartbeat if heartbeat is None else heartbeat
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    params.socket_timeout = 10
    if cfg.tls is not None:
        ctx = ssl.create_default_context(cafile=str(cfg.tls.ca_file))
        if cfg.tls.cert_file and cfg.tls.key_file:
            ctx.load_cert_chain(str(cfg.tls.cert_file), str(cfg.tls.key_file))
        params.ssl_options = pika.SSLOptions(ctx, cfg.tls.server_name or url.hostname or "localhost")
        if not url.port and url.scheme == "amqp":
            params.port = 5671
    return params


def is_auth_error(exc: BaseException) -> bool:
    return isinstance(exc, (pika.exceptions.ProbableAuthenticationError,
                            pika.exceptions.AuthenticationError,
                            pika.exceptions.ProbableAccessDeniedError))


STEADY_SECONDS = 10.0  # a session that lasted this long was a working one: the next reconnect is at once
REMIND_SECONDS = 60.0  # a broker still unreachable is reported again this often, whatever the retry delay


def run_connected(cfg: BrokerConfig, who: str, session: Callable[[pika.BlockingConnection], None],
                  stop: threading.Event, connected: threading.Event,
                  on_reconnect: Callable[[str], None] | None = None, name: str | None = None,
                  clock: Callable[[], float] = time.monotonic) -> BrokerAuthError | None:
    """Run `session` on a fresh connection (named `name`) until `stop`, reconnecting with jittered
    backoff after any loss. A session that fails soon after it started (the queue is held by an
    exclusive consumer, a declare is refused) backs off too, so a refusal never turns into a
    connect loop. Returns the error when the broker refuses the credentials (retrying would not help)."""
    backoff = Backoff(cfg.reconnect_max_seconds)
    first = True
    # When the outage was last reported (a loss, or a failed attempt): the attempts that follow are
    # expected and logged at DEBUG until REMIND_SECONDS have passed. Counted in time, not in attempts,
    # so a short retry cap does not turn a ten-second outage into a stream of warnings.
    reported_at: float | None = None
    while not stop.is_set():
        try:
            conn = pika.BlockingConnection(parameters(cfg, name=name))
        except Exception as exc:
            if is_auth_error(exc):
                return BrokerAuthError(
                    f"the broker at {cfg.url.split('@')[-1]} refused the credentials or vhost ({exc!r})")
            delay = backoff.next()
            now = clock()
            quiet = reported_at is not None and now - reported_at < REMIND_SECONDS
            if not quiet:
                reported_at = now
            log.log(logging.DEBUG if quiet else logging.WARNING, "%s cannot reach the broker (%s); retrying in %.1fs"
                    " (attempt %d)", who, type(exc).__name__, delay, backoff.attempt)
            stop.wait(delay)
            continue
        reported_at = None
        if not first and on_reconnect:
            on_reconnect(who)
        first = False
        began = clock()
        delay = 0.0
        try:
            session(conn)
        except Exception as exc:
            if stop.is_set():
                break
            # A broker that shuts down (CONNECTION_FORCED) ended a working session, however short:
            # a loss, reported once. A session refused at once (an exclusive consumer holds the
            # queue, a declare is refused) backs off instead, so it never turns into a connect loop.
            forced = isinstance(exc, pika.exceptions.ConnectionClosedByBroker) and exc.reply_code == 320
            if forced or clock() - began >= STEADY_SECONDS:
                backoff.reset()
                log.warning("%s lost the broker connection (%s: %s); reconnecting", who, type(exc).__name__, exc)
                reported_at = clock()
            else:
                delay = backoff.next()
                log.warning("%s: the broker ended the session at once (%s: %s); retrying in %.1fs", who,
                            type(exc).__name__, exc, delay)
        finally:
            connected.clear()
            try:
                if conn.is_open:
                    conn.close()
            except Exception:
                pass
        if delay:
            stop.wait(delay)
    return None
