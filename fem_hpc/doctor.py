"""`fem-hpc doctor --config F [--json]`: is this node able to work, and if not, what to do.

Every check gives a status (``ok``, ``warning``, ``error``, or ``skip`` when there is nothing it
can see), a detail, and for anything not ok a one-line fix. `doctor` exits 1 when any check is
an error.

The cheap checks (directories, free space, git, TLS key permissions) also back the v1 ``health``
reply of a running service (``health_checks``): the service does not connect to the broker again
for them, it reports its own connection state, and it reuses the executor checks it already ran.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import subprocess
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, Field

from .config import ConfigError, SiteConfig, load_config
from .diskguard import DiskGuard, guard_check
from .logs import redact
from .model import Check

GiB = 1024**3
MiB = 1024**2
FREE_WARNING_BYTES = 5 * GiB
FREE_ERROR_BYTES = 500 * MiB
SKEW_WARNING_SECONDS = 2.0
SKEW_ERROR_SECONDS = 60.0
OUTBOX_WARNING = 10_000
STATUSES = ("ok", "warning", "error", "skip")


def _c(name: str, status: str, detail: str, fix: str | None = None) -> Check:
    return Check(name=name, status=status, detail=detail, fix=fix if status not in ("ok", "skip") else None)


def _size(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def _whoami() -> str:
    try:
        import pwd

        return f"{pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (KeyError, ImportError):
        return f"uid {os.geteuid()}"


# -- config ---------------------------------------------------------------------------------
def check_config(path: str | Path) -> tuple[SiteConfig | None, Check]:
    try:
        site = load_config(path)
    except ConfigError as exc:
        return None, _c("config", "error", f"{path}: " + "; ".join(exc.problems),
                        f"fix the listed keys in {path} (fem-hpc refuses to start with them)")
    return site, _c("config", "ok", f"{path}: node {site.node}, queue {site.queue}, "
                    f"executors {', '.join(site.executors)} (default {site.default_executor})")


def check_user() -> Check:
    if os.geteuid() == 0:
        return _c("user", "warning", "running as root: the checks below see what root may do, not the "
                  "service account", "run as the service account: sudo -u fem-hpc fem-hpc doctor --config F")
    return _c("user", "ok", f"running as {_whoami()}")


# -- directories --------------------------------------------------------------------------------
def _existing_ancestor(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def _try_write(directory: Path) -> str | None:
    """None when a file can be created in directory (truthful for root and on NFS), else why not."""
    try:
        fd, name = tempfile.mkstemp(prefix=".fem-doctor-", dir=directory)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    try:
        os.unlink(name)
    except OSError:
        pass
    return None


def check_directory(label: str, path: Path) -> list[Check]:
    """`path` exists as a writable directory or can be created; and its file system has room."""
    fix_perm = f"create it and give it to the service account: install -d -o fem-hpc -g fem-hpc {path}"
    out: list[Check] = []
    where = path
    if path.exists():
        if not path.is_dir():
            return [_c(label, "error", f"{path} exists and is not a directory", f"point {label} at a directory")]
        why = _try_write(path)
        if why:
            out.append(_c(label, "error", f"{path} is not writable by {_whoami()}: {why}", fix_perm))
        else:
            out.append(_c(label, "ok", f"{path} is writable by {_whoami()}"))
    else:
        parent = _existing_ancestor(path)
        where = parent
        if not parent.is_dir():
            return [_c(label, "error", f"{path} cannot be created: {parent} is not a directory",
                       f"point {label} at a path under a directory, or remove the file {parent}")]
        why = _try_write(parent)
        if why:
            out.append(_c(label, "error", f"{path} does not exist and cannot be created in {parent} "
                          f"by {_whoami()}: {why}", fix_perm))
        else:
            out.append(_c(label, "ok", f"{path} does not exist yet; it will be created (in {parent})"))
    try:
        usage = shutil.disk_usage(where)
    except OSError as exc:
        out.append(_c(f"{label} free space", "error", f"cannot stat {where}: {exc.strerror}",
                      f"check the file system of {label}"))
        return out
    detail = f"{_size(usage.free)} free of {_size(usage.total)} on the file system of {where}"
    if usage.free < FREE_ERROR_BYTES:
        out.append(_c(f"{label} free space", "error", detail,
                      f"free space there (under {_size(FREE_ERROR_BYTES)} tasks fail), or move {label}"))
    elif usage.free < FREE_WARNING_BYTES:
        out.append(_c(f"{label} free space", "warning", detail,
                      f"free space there (under {_size(FREE_WARNING_BYTES)} large outputs may not fit)"))
    else:
        out.append(_c(f"{label} free space", "ok", detail))
    return out


def check_journal(site: SiteConfig) -> Check:
    path = site.journal_path
    if not path.exists():
        return _c("journal", "ok", f"{path} will be created at the first start")
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            counts = dict(db.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state").fetchall())
            outbox = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
        finally:
            db.close()
    except sqlite3.Error as exc:
        return _c("journal", "error", f"{path} cannot be read: {exc}",
                  "check its owner and permissions; never delete a journal while jobs run (they would be "
                  "orphaned)")
    from .model import FINAL_STATES

    finals = {s.value for s in FINAL_STATES}
    active = sum(n for s, n in counts.items() if s not in finals)
    detail = f"{path}: {sum(counts.values())} tasks ({active} active), {outbox} message(s) in the outbox"
    if outbox >= OUTBOX_WARNING:
        return _c("journal", "warning", detail, "the outbox is not draining: check the broker connection of "
                  "the running service (fem-hpc status, the service log)")
    return _c("journal", "ok", detail)


# -- tools and TLS material --------------------------------------------------------------------------
def check_git(site: SiteConfig) -> Check:
    needed = bool(site.policy.git)
    missing = "error" if needed else "warning"
    fix = "install git (Debian: apt-get install git)"
    try:
        proc = subprocess.run(["git", "--version"], capture_output=True, text=True, timeout=10, check=False)
    except FileNotFoundError:
        return _c("git", missing, "git is not on PATH" + ("" if needed else " (no git source is allowed by policy)"),
                  fix)
    except subprocess.TimeoutExpired:
        return _c("git", missing, "git --version did not answer within 10s", fix)
    if proc.returncode != 0:
        return _c("git", missing, f"git --version exited {proc.returncode}: {proc.stderr.strip()[:200]}", fix)
    return _c("git", "ok", f"{proc.stdout.strip()} ({shutil.which('git')})")


def check_tls_files(site: SiteConfig) -> list[Check]:
    tls = site.broker.tls
    if tls is None:
        if site.broker.url.startswith("amqps://"):
            return [_c("broker TLS files", "ok", "amqps with the system CA store, no client certificate")]
        return []
    out = []
    if tls.key_file is not None:
        try:
            mode = stat.S_IMODE(tls.key_file.stat().st_mode)
        except OSError as exc:
            return [_c("broker TLS files", "error", f"{tls.key_file}: {exc.strerror}",
                       "make the key readable by the service account only (chmod 0600)")]
        if mode & 0o077:
            out.append(_c("broker TLS files", "warning", f"client key {tls.key_file} has mode {mode:04o}: other "
                          "users may read it", f"chown fem-hpc:fem-hpc {tls.key_file}; chmod 0600 {tls.key_file}"))
        elif not os.access(tls.key_file, os.R_OK):
            out.append(_c("broker TLS files", "error", f"client key {tls.key_file} is not readable by {_whoami()}",
                          f"chown fem-hpc:fem-hpc {tls.key_file}; chmod 0600 {tls.key_file}"))
    if not out:
        kind = "mutual TLS (client certificate)" if tls.cert_file else "TLS (server verified, no client certificate)"
        out.append(_c("broker TLS files", "ok", f"{kind}; CA {tls.ca_file}"))
    return out


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
    import pika

    from .broker.connection import is_auth_error, parameters

    cfg = site.broker
    url = urlsplit(cfg.url)
    vhost = unquote(url.path[1:]) if len(url.path) > 1 else "/"
    try:
        params = parameters(cfg, heartbeat=0)
    except (OSError, ssl.SSLError, ValueError) as exc:
        return [_c("broker", "error", f"the TLS material cannot be loaded: {exc}",
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
            return [_c("broker", "error", f"credentials refused or vhost not allowed at {where} for user {user!r}: "
                       f"{exc}", f"create the vhost or grant it: rabbitmqctl set_permissions -p {vhost} {user} ...")]
        if is_auth_error(exc):
            return [_c("broker", "error", f"credentials refused by {where} for user {user!r}",
                       "fix the user/password in broker.url (or FEM_HPC_BROKER_URL in /etc/fem-hpc/env)")]
        cause = _ssl_cause(exc)
        if cause is not None:
            return [_c("broker", "error", f"TLS handshake with {where} failed: {cause}",
                       "check amqps vs amqp and the port (5671), broker.tls ca_file/cert_file/key_file and "
                       "server_name")]
        return [_c("broker", "error", f"cannot reach {where} ({tls}): {exc!r}",
                   "check broker.url host and port, the firewall, and that RabbitMQ runs")]
    try:
        props = getattr(getattr(conn, "_impl", None), "server_properties", None) or {}
        version = props.get("version", "?")
        version = version.decode() if isinstance(version, bytes) else version
        out = [_c("broker", "ok", f"connected to {where} as {user!r} ({tls}, RabbitMQ {version})")]
        out += _broker_queue_checks(conn, site)
        out.append(_clock_skew(conn))
    finally:
        try:
            conn.close()
        except Exception:
            pass
    return out


def _broker_queue_checks(conn: Any, site: SiteConfig) -> list[Check]:
    import pika

    out = []
    queue = site.queue
    channel = conn.channel()
    try:
        ok = channel.queue_declare(queue=queue, passive=True)
        out.append(_c("broker queue", "ok", f"queue {queue!r}: {ok.method.message_count} message(s) waiting, "
                      f"{ok.method.consumer_count} consumer(s)"))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            out.append(_c("broker queue", "warning", f"queue {queue!r} does not exist yet",
                          "nothing to do: it will be declared at first serve"))
        else:
            out.append(_c("broker queue", "error", f"queue {queue!r}: {exc.reply_text}",
                          f"grant the node's user configure/write/read on {queue!r} and {queue + '.rejected'!r}"))
        channel = conn.channel()
    exchange = site.broker.events_exchange
    try:
        channel.exchange_declare(exchange=exchange, passive=True)
        out.append(_c("broker events exchange", "ok", f"exchange {exchange!r} exists"))
    except pika.exceptions.ChannelClosedByBroker as exc:
        if exc.reply_code == 404:
            out.append(_c("broker events exchange", "warning", f"exchange {exchange!r} does not exist yet",
                          "nothing to do: it will be declared at first serve"))
        else:
            out.append(_c("broker events exchange", "error", f"exchange {exchange!r}: {exc.reply_text}",
                          f"grant the node's user write on {exchange!r}"))
    try:
        channel.close()
    except Exception:
        pass
    return out


def _clock_skew(conn: Any) -> Check:
    """RabbitMQ shows its clock only when it stamps messages (the rabbitmq_message_timestamp
    plugin): publish a probe to a private queue and compare its stamp with ours."""
    import pika

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
        return _c(name, "skip", f"not visible: no probe queue ({type(exc).__name__})")
    if method is None or props is None:
        return _c(name, "skip", "not visible: the probe message did not come back")
    stamp = None
    ms = (props.headers or {}).get("timestamp_in_ms")
    if isinstance(ms, int):
        stamp = ms / 1000
    elif isinstance(props.timestamp, int):
        stamp = float(props.timestamp)  # second resolution
    if stamp is None:
        return _c(name, "skip", "not visible: the broker does not stamp messages (RabbitMQ's "
                  "rabbitmq_message_timestamp plugin would show its clock)")
    resolution = 0.001 if isinstance(ms, int) else 1.0
    skew = stamp - (t0 + t1) / 2
    slack = (t1 - t0) / 2 + resolution
    excess = max(0.0, abs(skew) - slack)
    detail = f"broker clock {skew:+.2f}s from ours (+-{slack:.2f}s)"
    fix = "run chrony/ntpd on this node and the broker host"
    if excess >= SKEW_ERROR_SECONDS:
        return _c(name, "error", detail, fix)
    if excess >= SKEW_WARNING_SECONDS:
        return _c(name, "warning", detail, fix)
    return _c(name, "ok", detail)


def broker_state_check(*, consumer_connected: bool, publisher_connected: bool, outbox_depth: int,
                       reconnects: int) -> Check:
    """The running service's own view of its broker links (no new connection)."""
    detail = (f"consumer {'connected' if consumer_connected else 'disconnected'}, publisher "
              f"{'connected' if publisher_connected else 'disconnected'}, outbox {outbox_depth}, "
              f"reconnects {reconnects}")
    if consumer_connected and publisher_connected:
        return _c("broker", "ok", detail)
    return _c("broker", "warning", detail, "the service reconnects by itself; check the broker and the network "
              "(events wait in the outbox, nothing is lost)")


# -- executors ----------------------------------------------------------------------------------------
def _runtime_check(site: SiteConfig, name: str) -> Check:
    from .executors import registry

    info = registry.plugins().get(site.executor_type(name))
    if info is None:
        return _c(f"{name}: runtime", "error", f"no executor plugin {site.executor_type(name)!r}",
                  "install the package that provides it")
    found, where = info.runtime_found()
    if found:
        return _c(f"{name}: runtime", "ok", "needs no runtime binary" if where == "-" else f"found {where}")
    return _c(f"{name}: runtime", "error", where, f"install {' or '.join(info.runtime)} or add it to PATH")


def _named(name: str, check: Check) -> Check:
    if check.name == name or check.name.startswith(f"{name}:") or check.name.startswith(f"{name} "):
        return check
    return check.model_copy(update={"name": f"{name}: {check.name}"})


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
    """The executor's own checks (runtime present and answering; over SSH when configured);
    an executor without checks is looked for on PATH."""
    from .executors import registry

    try:
        executor = registry.create(name, site)
    except Exception as exc:
        return [_c(f"{name}: executor", "error", f"cannot be set up: {exc}", f"fix executors.{name} in the config")]
    try:
        checks = _with_timeout(executor.checks, timeout)
    except Exception as exc:
        return [_c(f"{name}: executor", "error", f"its checks failed: {exc}",
                   f"check the runtime of executors.{name} (and its SSH host, if any)")]
    finally:
        try:
            executor.close()
        except Exception:
            pass
    if not checks:
        return [_runtime_check(site, name)]
    return [_named(name, c) for c in checks]


def executor_health_checks(site: SiteConfig, executors: dict[str, dict[str, Any]]) -> list[Check]:
    """Checks from the agent's executors_health() (already run by the service)."""
    out: list[Check] = []
    for name, h in executors.items():
        if h.get("error"):
            out.append(_c(f"{name}: executor", "error", str(h["error"]), f"fix executors.{name} or its runtime"))
            continue
        checks = [Check.model_validate(c) for c in h.get("checks", [])]
        out += [_named(name, c) for c in checks] if checks else [_runtime_check(site, name)]
        if h.get("stale"):
            out.append(_c(f"{name}: tracker", "warning", "its last poll failed: its jobs keep their state until "
                          "a poll works again", f"check the scheduler behind executors.{name}"))
    return out


# -- metrics endpoint ----------------------------------------------------------------------------------
def check_metrics(site: SiteConfig) -> Check | None:
    listen = site.metrics.listen
    if not listen:
        return None
    from .metrics import parse_listen

    host, port = parse_listen(listen)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        return _c("metrics", "ok", f"{listen} is free for the metrics endpoint")
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return _c("metrics", "error", f"cannot listen on {listen}: {exc.strerror}",
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
        return _c("metrics", "ok", f"{listen} is served by a running fem-hpc")
    return _c("metrics", "error", f"{listen} is taken by another program",
              "choose a free port for metrics.listen")


# -- the whole set -------------------------------------------------------------------------------------
def cheap_checks(site: SiteConfig) -> list[Check]:
    """What the running service reports in its health reply too: no broker connect, no executor."""
    out = check_directory("state_dir", site.state_dir) + check_directory("work_root", site.work_root)
    out += check_tls_files(site)
    out.append(check_git(site))
    out.append(guard_check(DiskGuard(site)))  # why intake is paused, when it is
    return out


def health_checks(service: Any, executors: dict[str, dict[str, Any]] | None = None) -> list[Check]:
    """The checks of the v1 health reply, from a running Service: the cheap checks, its broker
    links as it sees them (no new connection), and the executor checks of `executors` (the
    agent's executors_health(), already run for the same reply)."""
    site = service.site
    out = cheap_checks(site)
    out.append(broker_state_check(consumer_connected=service.consumer.connected.is_set(),
                                  publisher_connected=service.publisher.connected.is_set(),
                                  outbox_depth=service.journal.outbox_depth(), reconnects=service.reconnects))
    if executors is not None:
        out += executor_health_checks(site, executors)
    return [_clean(c) for c in out]


def _clean(c: Check) -> Check:
    """One line each, and nothing secret (a password in an error message, a URL)."""
    return c.model_copy(update={"detail": redact(" ".join(c.detail.split())),
                                "fix": redact(" ".join(c.fix.split())) if c.fix else None})


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
    checks = [_clean(c) for c in checks]
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
