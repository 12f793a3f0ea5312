"""Connection parameters (URL, heartbeat, mutual TLS) and the reconnect backoff."""

from __future__ import annotations

import random
import ssl
from urllib.parse import urlsplit

import pika

from ..config import BrokerConfig
from ..logs import register_secret


class BrokerAuthError(Exception):
    """The broker refused our credentials: retrying would only lock the account or spam the logs."""


def parameters(cfg: BrokerConfig, *, heartbeat: int | None = None) -> pika.URLParameters:
    url = urlsplit(cfg.url)
    register_secret(url.password)
    params = pika.URLParameters(cfg.url)
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


class Backoff:
    """Jittered exponential backoff: 0.5 s, 1 s, 2 s ... capped, each scaled by a random 50-100%."""

    def __init__(self, cap: float = 30.0, base: float = 0.5):
        self.cap = cap
        self.base = base
        self.attempt = 0

    def next(self) -> float:
        delay = min(self.cap, self.base * (2 ** self.attempt))
        self.attempt += 1
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self.attempt = 0
