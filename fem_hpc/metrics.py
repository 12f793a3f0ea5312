"""Prometheus metrics of `fem-hpc serve` (optional: `metrics: {listen: "127.0.0.1:9464"}`).

The rest of the code reports through the module-level hook functions below. They are no-ops
until a `Metrics` is started, and this module imports `prometheus_client` only then, so the core
pays nothing (and imports nothing) when metrics are off. A hook never raises: a metrics problem
must not fail a task.

Hook points (all cheap, all thread-safe):

- ``observe_command(cmd, seconds, ok)``: one scheduler command (sbatch, squeue, sacct, qsub,
  qstat, ...) ran for ``seconds``; ``ok`` is False when it failed (non-zero exit, timeout, not
  found, SSH error). ``cmd`` is the command's base name (``os.path.basename(argv[0])``), never
  its arguments. The runners in ``fem_hpc.executors.runners`` call it for every command they run.
- ``intake(executor, outcome)``: a request for a task was accepted, rejected or a duplicate.
- ``completion(executor, state, reason)``: a task reached a final state.
- ``poll_cycle(executor, seconds, ok)``: one batched poll of an executor's tracker.
- ``broker_reconnect(connection)``: the consumer or the publisher reconnected.
- ``stage_in(executor, seconds, workdir)`` / ``stage_out(executor, seconds, nbytes)``.
- ``legacy_request(action, outcome)``: a legacy FEM request was answered ``ok`` or with an ``error``
  (``action`` is the request's action, ``invalid`` for a body that is not one, ``colon-form-2024``
  for the 2024 form ``tool:task:execution`` that fem-hpc cannot run).

Series (all on the service's own registry, not prometheus_client's global one):

=================================================  ======================================================
``fem_info{node,version}``                         1
``fem_tasks{state}``                               tasks in the journal by state (read at scrape time)
``fem_intake_total{executor,outcome}``             accepted / rejected / duplicate
``fem_completions_total{executor,state,reason}``   final states (reason "" when none)
``fem_scheduler_command_seconds{command}``         histogram of scheduler command latency
``fem_scheduler_command_errors_total{command}``    failed scheduler commands
``fem_poll_cycle_seconds{executor}``               histogram of one batched poll
``fem_poll_errors_total{executor}``                failed polls (jobs are marked stale, never failed)
``fem_tracked_jobs{executor}``                     jobs a tracker follows
``fem_tracker_stale{executor}``                    1 while an executor's last poll failed
``fem_outbox_depth``                               messages waiting in the outbox for the broker
``fem_outbox_published_total``                    outbox messages the broker confirmed
``fem_broker_connected{connection}``               1 while the consumer / publisher is connected
``fem_broker_reconnects_total{connection}``        reconnects after a lost broker connection
``fem_stage_in_bytes_total{executor}``             bytes in the work dirs after stage-in
``fem_stage_in_seconds{executor}``                 histogram of stage-in (checkout, image pull)
``fem_stage_out_bytes_total{executor}``            bytes of the output archives
``fem_stage_out_seconds{executor}``                histogram of stage-out (archive, sha256)
``fem_legacy_requests_total{action,outcome}``      legacy FEM requests by action, ok / error
``fem_ssh_connects_total{host}``                   SSH connections opened (one per host, reopened after a drop)
``fem_ssh_channels_total{host}``                   SSH channels opened: round trips (commands, streams)
``fem_scheduler_calls_total{executor,kind}``       scheduler calls by kind (submit, poll, cancel, find, sacct, check)
``fem_budget_wait_seconds_total{executor,kind}``   time calls waited for (or were deferred by) the call budget
``fem_executor_unreachable{executor}``             1 while the executor's cluster is unreachable (tasks paused)
``fem_executor_unreachable_seconds{executor}``     how long it has been unreachable
``process_*``                                      the service process (CPU, memory, fds)
=================================================  ======================================================
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .config import parse_listen
from .model import State

log = logging.getLogger("fem_hpc.metrics")

INTAKE_OUTCOMES = ("accepted", "rejected", "duplicate")
LEGACY_OUTCOMES = ("ok", "error")
CONNECTIONS = ("consumer", "publisher")
_LABEL_OK = re.compile(r"^[A-Za-z0-9_.+-]{1,64}$")

_active: Metrics | None = None
_active_lock = threading.Lock()


def _label(value: Any, default: str = "-") -> str:
    """A label value from our own names only; anything odd collapses (bounded cardinality)."""
    text = "" if value is None else str(value)
    return text if _LABEL_OK.match(text) else default


# -- hooks (no-ops unless metrics are on) ------------------------------------------------------
def observe_command(cmd: str, seconds: float, ok: bool) -> None:
    """Record one scheduler command: its base name (``squeue``, ``sbatch``, ``qstat`` ...), how
    long it took in seconds, and whether it worked (exit status 0, no timeout, no SSH error).
    Called by the command runners (``fem_hpc.executors.runners``) for every command; a no-op when metrics are
    off. Feeds ``fem_scheduler_command_seconds{command}`` and, when not ok,
    ``fem_scheduler_command_errors_total{command}``."""
    m = _active
    if m is not None:
        m._safe(m._command, cmd, seconds, ok)


def intake(executor: str | None, outcome: str) -> None:
    """A task request was ``accepted``, ``rejected`` or a ``duplicate`` of a known task id."""
    m = _active
    if m is not None:
        m._safe(m._intake, executor, outcome)


def completion(executor: str | None, state: str, reason: str | None) -> None:
    """A task reached its final state (COMPLETED, FAILED, CANCELLED) with this reason."""
    m = _active
    if m is not None:
        m._safe(m._completion, executor, state, reason)


def poll_cycle(executor: str, seconds: float, ok: bool) -> None:
    """One batched poll of the tracker of ``executor`` took ``seconds``."""
    m = _active
    if m is not None:
        m._safe(m._poll, executor, seconds, ok)


def ssh_connect(host: str) -> None:
    """An SSH connection to ``host`` was opened (the first, or again after the link dropped)."""
    m = _active
    if m is not None:
        m._safe(m._ssh, m.ssh_connects, host)


def ssh_channel(host: str) -> None:
    """A channel was opened on the connection to ``host``: one round trip."""
    m = _active
    if m is not None:
        m._safe(m._ssh, m.ssh_channels, host)


def scheduler_call(executor: str, kind: str, throttled_seconds: float = 0.0, made: bool = True) -> None:
    """One scheduler call of ``kind`` (submit, poll, cancel, find, sacct, check) by ``executor``;
    ``throttled_seconds`` is how long the call budget held it, or (``made`` False: the call was
    deferred, not made) how long until the budget has a token for it."""
    m = _active
    if m is not None:
        m._safe(m._scheduler_call, executor, kind, throttled_seconds, made)


def broker_reconnect(connection: str) -> None:
    """The ``consumer`` or the ``publisher`` reconnected to the broker."""
    m = _active
    if m is not None:
        m._safe(m._reconnect, connection)


def stage_in(executor: str | None, seconds: float, workdir: Path | None = None) -> None:
    """Stage-in of one task took ``seconds``; its work dir is measured only when metrics are on."""
    m = _active
    if m is not None:
        m._safe(m._stage_in, executor, seconds, workdir)


def stage_out(executor: str | None, seconds: float, nbytes: int) -> None:
    """Stage-out of one task took ``seconds`` and produced an archive of ``nbytes``."""
    m = _active
    if m is not None:
        m._safe(m._stage_out, executor, seconds, nbytes)


def legacy_request(action: str, outcome: str) -> None:
    """A legacy FEM request (``action``: its action, ``invalid`` or ``colon-form-2024``) was taken
    (``ok``: answered, or its task committed) or refused (``error``)."""
    m = _active
    if m is not None:
        m._safe(m._legacy, action, outcome)


def _tree_bytes(root: Path, limit: int = 200_000) -> int:
    """Total size of the regular files under root (symlinks not followed), at most `limit` entries."""
    total = 0
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in filenames:
            seen += 1
            if seen > limit:
                return total
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                total += st.st_size
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    return total


# -- the registry and the endpoint ----------------------------------------------------------------------
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_STAGE_BUCKETS = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)


class Metrics:
    """The metrics of one service: its own registry, and an HTTP endpoint once started."""

    def __init__(self, node: str = "", executors: tuple[str, ...] = (), sources: Sources | None = None):
        from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector

        self.node = node
        self.executors = executors
        self.sources = sources
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.intake_total = Counter("fem_intake", "Task requests by executor and outcome "
                                    "(accepted, rejected, duplicate).", ["executor", "outcome"], registry=r)
        self.completions_total = Counter("fem_completions", "Tasks that reached a final state, by executor, "
                                         "state and reason.", ["executor", "state", "reason"], registry=r)
        self.command_seconds = Histogram("fem_scheduler_command_seconds", "Latency of scheduler commands "
                                         "(sbatch, squeue, sacct, qsub, qstat, ...).", ["command"],
                                         buckets=_LATENCY_BUCKETS, registry=r)
        self.command_errors = Counter("fem_scheduler_command_errors", "Scheduler commands that failed "
                                      "(non-zero exit, timeout, missing, SSH error).", ["command"], registry=r)
        self.poll_seconds = Histogram("fem_poll_cycle_seconds", "Duration of one batched poll of an executor's "
                                      "jobs.", ["executor"], buckets=_LATENCY_BUCKETS, registry=r)
        self.poll_errors = Counter("fem_poll_errors", "Polls that failed (the executor's jobs are marked stale, "
                                   "never failed).", ["executor"], registry=r)
        self.reconnects = Counter("fem_broker_reconnects", "Reconnects to the broker after a lost connection.",
                                  ["connection"], registry=r)
        self.stage_in_bytes = Counter("fem_stage_in_bytes", "Bytes in task work dirs after stage-in "
                                      "(source checkouts, staged files; cached images not counted).",
                                      ["executor"], registry=r)
        self.stage_in_seconds = Histogram("fem_stage_in_seconds", "Duration of stage-in (git checkout, image "
                                          "pull, executor preparation).", ["executor"], buckets=_STAGE_BUCKETS,
                                          registry=r)
        self.stage_out_bytes = Counter("fem_stage_out_bytes", "Bytes of output archives (tar.gz of outputs and "
                                       "logs).", ["executor"], registry=r)
        self.stage_out_seconds = Histogram("fem_stage_out_seconds", "Duration of stage-out (archive and sha256).",
                                           ["executor"], buckets=_STAGE_BUCKETS, registry=r)
        self.legacy_requests = Counter("fem_legacy_requests", "Legacy FEM requests by action and outcome (ok, "
                                       "error); action colon-form-2024 counts the 2024 form fem-hpc cannot run.",
                                       ["action", "outcome"], registry=r)
        self.ssh_connects = Counter("fem_ssh_connects", "SSH connections opened, by host.", ["host"], registry=r)
        self.ssh_channels = Counter("fem_ssh_channels", "SSH channels opened (round trips), by host.", ["host"],
                                    registry=r)
        self.scheduler_calls = Counter("fem_scheduler_calls", "Scheduler calls by executor and kind.",
                                       ["executor", "kind"], registry=r)
        self.throttled_seconds = Counter("fem_budget_wait_seconds", "Seconds scheduler calls waited for, "
                                         "or were deferred by, the call budget.", ["executor", "kind"], registry=r)
        ProcessCollector(registry=r)
        r.register(_ServiceCollector(self))
        # Known label values start at 0, so rates and alerts work before the first event.
        for name in executors:
            for outcome in INTAKE_OUTCOMES:
                self.intake_total.labels(name, outcome)
            self.stage_in_bytes.labels(name)
            self.stage_out_bytes.labels(name)
        self.intake_total.labels("-", "rejected")
        for connection in CONNECTIONS:
            self.reconnects.labels(connection)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    # -- recording ----------------------------------------------------------------------
    def _safe(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:  # a metrics bug must never fail the caller
            log.debug("metrics hook %s failed", getattr(fn, "__name__", fn), exc_info=True)

    def _command(self, cmd: str, seconds: float, ok: bool) -> None:
        name = _label(os.path.basename(cmd or ""), "other")
        self.command_seconds.labels(name).observe(max(0.0, seconds))
        if not ok:
            self.command_errors.labels(name).inc()

    def _intake(self, executor: str | None, outcome: str) -> None:
        self.intake_total.labels(_label(executor), outcome if outcome in INTAKE_OUTCOMES else "rejected").inc()

    def _completion(self, executor: str | None, state: str, reason: str | None) -> None:
        self.completions_total.labels(_label(executor), _label(state), _label(reason, "")).inc()

    def _poll(self, executor: str, seconds: float, ok: bool) -> None:
        name = _label(executor)
        self.poll_seconds.labels(name).observe(max(0.0, seconds))
        if not ok:
            self.poll_errors.labels(name).inc()

    def _ssh(self, counter: Any, host: str) -> None:
        counter.labels(_label(host)).inc()

    def _scheduler_call(self, executor: str, kind: str, throttled: float, made: bool) -> None:
        if made:
            self.scheduler_calls.labels(_label(executor), _label(kind)).inc()
        if throttled > 0:
            self.throttled_seconds.labels(_label(executor), _label(kind)).inc(throttled)

    def _reconnect(self, connection: str) -> None:
        self.reconnects.labels(_label(connection)).inc()

    def _legacy(self, action: str, outcome: str) -> None:
        self.legacy_requests.labels(_label(action, "other"), outcome if outcome in LEGACY_OUTCOMES else "error").inc()

    def _stage_in(self, executor: str | None, seconds: float, workdir: Path | None) -> None:
        name = _label(executor)
        self.stage_in_seconds.labels(name).observe(max(0.0, seconds))
        if workdir is not None:
            self.stage_in_bytes.labels(name).inc(_tree_bytes(workdir))

    def _stage_out(self, executor: str | None, seconds: float, nbytes: int) -> None:
        name = _label(executor)
        self.stage_out_seconds.labels(name).observe(max(0.0, seconds))
        self.stage_out_bytes.labels(name).inc(max(0, nbytes))

    # -- exposition ------------------------------------------------------------------------
    def render(self) -> bytes:
        """The exposition text, as the endpoint serves it."""
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

    def start(self, listen: str) -> None:
        """Serve /metrics on `listen` ("host:port") and make the hooks record into this registry.
        Raises OSError when the address cannot be bound (e.g. the port is taken)."""
        global _active
        from socketserver import ThreadingMixIn
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        from prometheus_client import make_wsgi_app

        host, port = parse_listen(listen)
        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class _Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = family

        class _Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = make_server(host, port, make_wsgi_app(self.registry), server_class=_Server,
                                   handler_class=_Quiet)
        self.address = (host, self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, name="fem-metrics", daemon=True)
        self._thread.start()
        with _active_lock:
            _active = self
        log.info("metrics on http://%s/metrics", listen)

    def stop(self) -> None:
        global _active
        with _active_lock:
            if _active is self:
                _active = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def activate(self) -> None:
        """Record hook calls into this registry without serving it (tests, embedding)."""
        global _active
        with _active_lock:
            _active = self


@dataclass
class TrackerGauge:
    tracked: int
    stale: bool
    unreachable_since: float | None = None  # epoch seconds; None while the cluster answers


@dataclass
class Sources:
    """What the running service lets the collector read at scrape time, one callable per source, so
    one failing source hides only its own series (and this module knows nothing of the service)."""

    tasks_by_state: Callable[[], dict[str, int]]
    outbox_depth: Callable[[], int]
    connected: Callable[[], dict[str, bool]]  # consumer / publisher
    published: Callable[[], int]
    trackers: Callable[[], dict[str, TrackerGauge]]
    extra: list[Callable[[], list[Any]]] = field(default_factory=list)  # more metric families


def _read(what: str, source: Callable[[], Any], default: Any) -> Any:
    try:
        return source()
    except Exception:
        log.debug("%s not collected", what, exc_info=True)
        return default


class _ServiceCollector:
    """Gauges read at scrape time from the service's `Sources`: the journal, the outbox, the broker
    links, the trackers."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def describe(self) -> list[Any]:
        return []  # collected at scrape time only (no duplicate checks needed on our own registry)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        info = GaugeMetricFamily("fem_info", "fem-hpc version and node.", labels=["node", "version"])
        info.add_metric([self.metrics.node, __version__], 1)
        yield info
        src = self.metrics.sources
        if src is None:
            return
        counts = _read("fem_tasks", src.tasks_by_state, None)
        if counts is not None:
            tasks = GaugeMetricFamily("fem_tasks", "Tasks in the journal by state.", labels=["state"])
            for state in State:
                if state in (State.REJECTED, State.UNKNOWN):
                    continue  # never journalled as tasks
                tasks.add_metric([state.value], counts.pop(state.value, 0))
            for state, n in counts.items():
                tasks.add_metric([_label(state)], n)
            yield tasks
        depth = _read("fem_outbox_depth", src.outbox_depth, None)
        if depth is not None:
            gauge = GaugeMetricFamily("fem_outbox_depth", "Messages waiting in the outbox for the broker.")
            gauge.add_metric([], depth)
            yield gauge
        connected = GaugeMetricFamily("fem_broker_connected", "1 while connected to the broker.",
                                      labels=["connection"])
        for name, up in _read("fem_broker_connected", src.connected, {}).items():
            connected.add_metric([name], 1 if up else 0)
        yield connected
        published = CounterMetricFamily("fem_outbox_published", "Outbox messages the broker confirmed.")
        published.add_metric([], _read("fem_outbox_published", src.published, 0))
        yield published
        tracked = GaugeMetricFamily("fem_tracked_jobs", "Jobs a tracker follows.", labels=["executor"])
        stale = GaugeMetricFamily("fem_tracker_stale", "1 while the executor's last poll failed.",
                                  labels=["executor"])
        trackers = _read("fem_tracked_jobs", src.trackers, {})
        for name in self.metrics.executors:
            gauge = trackers.get(name)
            tracked.add_metric([_label(name)], gauge.tracked if gauge is not None else 0)
            stale.add_metric([_label(name)], 1 if gauge is not None and gauge.stale else 0)
        yield tracked
        yield stale
        down = GaugeMetricFamily("fem_executor_unreachable", "1 while the executor's cluster cannot be reached "
                                 "(its tasks are paused, never failed).", labels=["executor"])
        down_for = GaugeMetricFamily("fem_executor_unreachable_seconds", "How long the executor's cluster has "
                                     "been unreachable (0 while it answers).", labels=["executor"])
        now = time.time()
        for name in self.metrics.executors:
            gauge = trackers.get(name)
            since = gauge.unreachable_since if gauge is not None else None
            down.add_metric([_label(name)], 0 if since is None else 1)
            down_for.add_metric([_label(name)], 0 if since is None else max(0.0, now - since))
        yield down
        yield down_for
        for more in src.extra:
            yield from _read("extra metrics", more, [])
