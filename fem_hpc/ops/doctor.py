"""`fem-hpc doctor --config F [--json]`: is this node able to work, and if not, what to do.

Every check gives a status (``ok``, ``warning``, ``error``, or ``skip`` when there is nothing it
can see), a detail, and for anything not ok a one-line fix. `doctor` exits 1 when any check is
an error.

The cheap checks (directories, free space, git, TLS key permissions) are those of the running
service's health report (ops/health.py); doctor adds what only a separate process can see: the
broker from outside, the clock, the journal file, the metrics port and each executor's runtime.
"""

from __future__ import annotations

import errno
import os
import socket
import sqlite3
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pika
from pydantic import BaseModel, Field

from ..broker.connection import is_auth_error, parameters
from ..config import ConfigError, SiteConfig, parse_listen
from ..executors import load_site, registry
from ..journal import JournalReader
from ..model import FINAL_STATES, Check
from .health import STATUSES, cheap_checks, clean, make_check, named, runtime_check, whoami

SKEW_WARNING_SECONDS = 2.0


SKEW_ERROR_SECONDS = 60.0


OUTBOX_WARNING = 10_000


# -- config ---------------------------------------------------------------------------------
def check_config(path: str | Path) -> tuple[SiteConfig | None, Check]:
    try:
        site = load_site(path)
    except ConfigError as exc:
        return None, make_check("config", "error", f"{path}: " + "; ".join(exc.problems),
                        f"fix the listed keys in {path} (fem-hpc refuses to start with them)")
    return site, make_check("config", "ok", f"{path}: node {site.node}, queue {site.queue}, "
                    f"executors {', '.join(site.executors)} (default {site.default_executor})")


def check_user() -> Check:
    if os.geteuid() == 0:
        return make_check("user", "warning", "running as root: the checks below see what root may do, not the "
                  "service account", "run as the service account: sudo -u fem-hpc fem-hpc doctor --config F")
    return make_check("user", "ok", f"running as {whoami()}")


def check_journal(site: SiteConfig) -> Check:
    path = site.journal_path
    if not path.exists():
        return make_check("journal", "ok", f"{path} will be created at the first start")
    try:
        with JournalReader(path, timeout=5) as journal:
            counts = journal.counts_by_state()
            outbox = journal.outbox_depth()
    except sqlite3.Error as exc:
        return make_check("journal", "error", f"{path} cannot be read: {exc}",
                  "check its owner and permissions; never delete a journal while jobs run (they would be "
                  "orphaned)")
    finals = {s.value for s in FINAL_STATES}
    active = sum(n for s, n in counts.items() if s not in finals)
    detail = f"{path}: {sum(counts.values())} tasks ({active} active), {outbox} message(s) in the outbox"
    if outbox >= OUTBOX_WARNING:
        return make_check("journal", "warning", detail, "the outbox is not draining: check the broker connection of "
                  "the running service (fem-hpc status, the service log)")
    return make_check("journal", "ok", detail)


# -- broker ------------------------------------------------------------------------------------------
def _ssl_cause(exc: BaseException) -> BaseException | None:
    """The TLS error inside one of pika's wrappers, if that is what it is."""
    seen: list[Any] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, ssl.SSLError):
            return e
        if isinstance(e, BaseException):
            seen.extend(a for a in e.args if isinstance(a, BaseException))
            seen.extend(x for x in (getattr(e, "exception", None), e.__cause__, e.__context__) if x is not None)
            seen.extend(getattr(e, "exceptions", None) or [])
    return None


def check_broker(site: SiteConfig, timeout: float = 10.0) -> list[Check]:
    """Connect with the configured credentials and TLS; look at the node queue, the events
    exchange and, if the broker shows it, the clock skew."""


    cfg = site.broker
    url = urlsplit(cfg.url)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    try:
        params = parameters(cfg, heartbeat=0)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [make_check("broker", "error", f"the TLS material cannot be loaded: {exc}",
                   "check broker.tls: PEM files, the key matches the certificate, readable by the service account")]
    params.socket_timeout = timeout
    params.stack_timeout = timeout + 5
    params.blocked_connection_timeout = timeout
    where = f"{params.host}:{params.port} vhost {vhost!r}"
    user = unquote(url.username or "guest")
    tls = "TLS" if params.ssl_options is not None else "no TLS"
    try:
        conn = pika.BlockingConnection(params)
    except Exception as exc:
        if isinstance(exc, pika.exceptions.ProbableAccessDeniedError):
            return [make_check("broker", "error",
                               f"credentials refused or vhost not allowed at {where} for user {user!r}: "
                       f"{exc}", f"create the vhost or grant it: rabbitmqctl set_permissions -p {vhost} {user} ...")]
        if is_auth_error(exc):
            return [make_check("broker", "error", f"credentials refused by {where} for user {user!r}",
                       "fix the user/password in broker.url (or FEM_HPC_BROKER_URL in /etc/fem-hpc/env)")]
        cause = _ssl_cause(exc)
        if cause is not None:
            return [make_check("broker", "error", f"TLS handshake with {where} failed: {cause}",
                       "check amqps vs amqp and the port (5671), broker.tls ca_file/cert_file/key_file and "
                       "server_name")]
        return [make_check("broker", "error", f"cannot reach {where} ({tls}): {exc!r}",
                   "check broker.url host and port, the firewall, and that RabbitMQ runs")]
    try:
        props = getattr(getattr(conn, "_impl", None), "server_properties", None) or {}
        version = props.get("version", "?")
        version = version.decode() if isinstance(version, bytes) else version
        out = [make_check("broker", "ok", f"connected to {where} as {user!r} ({tls}, RabbitMQ {version})")]
        out += _broker_queue_checks(conn, site)
        out.append(_clock_skew(conn))
    finally:
        try:
            conn.close()
        except Exception:
            pass
    return out


def _broker_queue_checks(conn: Any, site: SiteConfig) -> list[Check]:

    out = []
    queue = site.queue
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue=queue, passive=True)
        out.append(make_check("broker queue", "ok", f"queue {queue!r}: {ok.method.message_count} message(s) waiting, "
                      f"{ok.method.consumer_count} consumer(s)"))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            out.append(make_check("broker queue", "warning", f"queue {queue!r} does not exist yet",
                          "nothing to do: it will be declared at first serve"))
        else:
            out.append(make_check("broker queue", "error", f"queue {queue!r}: {exc.reply_text}",
                          f"grant the node's user configure/write/read on {queue!r} and {queue + '.rejected'!r}"))
        channel = conn.channel()
    exchange = site.broker.events_exchange
    try:
        channel.exchange_declare(exchange=exchange, passive=True)
        out.append(make_check("broker events exchange", "ok", f"exchange {exchange!r} exists"))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            out.append(make_check("broker events exchange", "warning", f"exchange {exchange!r} does not exist yet",
                          "nothing to do: it will be declared at first serve"))
        else:
            out.append(make_check("broker events exchange", "error", f"exchange {exchange!r}: {exc.reply_text}",
                          f"grant the node's user write on {exchange!r}"))
    try:
        channel.close()
    except Exception:
        pass
    return out


def _clock_skew(conn: Any) -> Check:
    """RabbitMQ shows its clock only when it stamps messages (the rabbitmq_message_timestamp
    plugin): publish a probe to a private queue and compare its stamp with ours."""

    name = "clock skew"
    try:
        channel = conn.channel()
        probe = channel.queue_declare(queue="", exclusive=True, auto_delete=True).method.queue
        t0 = time.time()
        channel.basic_publish(exchange="", routing_key=probe, body=b"fem-hpc doctor clock probe")
        method, props, _ = None, None, None
        deadline = time.monotonic() + 5
        while method is None and time.monotonic() < deadline:
            method, props, _ = channel.basic_get(probe, auto_ack=True)
            if method is None:
                time.sleep(0.05)
        t1 = time.time()
        channel.close()
    except pika.exceptions.AMQPError as exc:
        return make_check(name, "skip", f"not visible: no probe queue ({type(exc).__name__})")
    if method is None or props is None:
        return make_check(name, "skip", "not visible: the probe message did not come back")
    stamp = None
    ms = (props.headers or {}).get("timestamp_in_ms")
    if isinstance(ms, int):
        stamp = ms / 1000
    elif isinstance(props.timestamp, int):
        stamp = float(props.timestamp)  # second resolution
    if stamp is None:
        return make_check(name, "skip", "not visible: the broker does not stamp messages (RabbitMQ's "
                  "rabbitmq_message_timestamp plugin would show its clock)")
    resolution = 0.001 if isinstance(ms, int) else 1.0
    skew = stamp - (t0 + t1) / 2
    slack = (t1 - t0) / 2 + resolution
    excess = max(0.0, abs(skew) - slack)
    detail = f"broker clock {skew:+.2f}s from ours (+-{slack:.2f}s)"
    fix = "run chrony/ntpd on this node and the broker host"
    if excess >= SKEW_ERROR_SECONDS:
        return make_check(name, "error", detail, fix)
    if excess >= SKEW_WARNING_SECONDS:
        return make_check(name, "warning", detail, fix)
    return make_check(name, "ok", detail)


def _with_timeout(fn: Callable[[], Any], timeout: float) -> Any:
    """Call fn on a daemon thread; raise TimeoutError if it does not return in time."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=run, name="fem-doctor-check", daemon=True)
    t.start()
    t.join(timeout)
    if t.is_alive():
        raise TimeoutError(f"no answer within {timeout:.0f}s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def check_executor(site: SiteConfig, name: str, timeout: float = 120.0) -> list[Check]:
    """The executor's health checks (runtime present and answering, over SSH when configured; the
    remote work root of one without a shared file system);
    an executor without checks is looked for on PATH."""
    try:
        executor = registry.create(name, site)
    except Exception as exc:
        return [make_check(f"{name}: executor", "error", f"cannot be set up: {exc}",
                           f"fix executors.{name} in the config")]
    try:
        # health_checks, not checks: also the checks of the executor's kind, e.g. the remote work
        # root (writable, python, tar, flock) of a batch executor without a shared file system.
        checks = _with_timeout(executor.health_checks, timeout)
    except Exception as exc:
        return [make_check(f"{name}: executor", "error", f"its checks failed: {exc}",
                   f"check the runtime of executors.{name} (and its SSH host, if any)")]
    finally:
        try:
            executor.close()
        except Exception:
            pass
    if not checks:
        return [runtime_check(site, name)]
    return [named(name, c) for c in checks]


# -- metrics endpoint ----------------------------------------------------------------------------------
def check_metrics(site: SiteConfig) -> Check | None:
    listen = site.metrics.listen
    if not listen:
        return None
    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return make_check("metrics", "ok", f"{listen} is free for the metrics endpoint")
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return make_check("metrics", "error", f"cannot listen on {listen}: {exc.strerror}",
                      "set metrics.listen to an address of this host")
    finally:
        sock.close()
    target = f"[{host}]" if ":" in host else host
    try:
        with urllib.request.urlopen(f"http://{target}:{port}/metrics", timeout=3) as resp:  # our own endpoint
            text = resp.read(1 << 20).decode(errors="replace")
    except OSError:
        text = ""
    if "fem_info" in text:
        return make_check("metrics", "ok", f"{listen} is served by a running fem-hpc")
    return make_check("metrics", "error", f"{listen} is taken by another program",
              "choose a free port for metrics.listen")


class DoctorReport(BaseModel):
    config: str
    node: str | None = None
    ok: bool
    counts: dict[str, int] = Field(default_factory=dict)
    checks: list[Check]


def run(config_path: str | Path, *, broker_timeout: float = 10.0, executor_timeout: float = 120.0) -> DoctorReport:
    site, config_check = check_config(config_path)
    checks = [config_check, check_user()]
    if site is not None:
        checks += cheap_checks(site)
        checks.append(check_journal(site))
        metrics_check = check_metrics(site)
        if metrics_check is not None:
            checks.append(metrics_check)
        checks += check_broker(site, timeout=broker_timeout)
        for name in site.executors:
            checks += check_executor(site, name, timeout=executor_timeout)
    checks = [clean(c) for c in checks]
    counts = {s: sum(1 for c in checks if c.status == s) for s in STATUSES}
    return DoctorReport(config=str(config_path), node=site.node if site else None, ok=counts["error"] == 0,
                        counts=counts, checks=checks)


def render_text(report: DoctorReport) -> str:
    width = max([len(c.name) for c in report.checks] + [10])
    lines = [f"fem-hpc doctor: {report.config}" + (f" (node {report.node})" if report.node else "")]
    for c in report.checks:
        lines.append(f"  {c.status.upper():<8} {c.name:<{width}}  {c.detail}")
        if c.fix:
            lines.append(f"  {'':<8} {'':<{width}}  fix: {c.fix}")
    n = report.counts
    lines.append(f"{n.get('ok', 0)} ok, {n.get('warning', 0)} warning(s), {n.get('error', 0)} error(s)"
                 + (f", {n['skip']} skipped" if n.get("skip") else ""))
    return "\n".join(lines)
