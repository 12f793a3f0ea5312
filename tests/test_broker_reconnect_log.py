"""How loud an outage is: the reconnect loop against a loopback port where nothing listens (no
broker needed), with an injected clock. One warning when the broker goes away, then a reminder
every REMIND_SECONDS of clock time, whatever the retry cap, never one line per attempt."""

from __future__ import annotations

import logging
import socket
import threading

import pytest

from fem_hpc.broker.connection import REMIND_SECONDS, run_connected
from fem_hpc.config import BrokerConfig


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class StepClock:
    """Each reading is `step` seconds after the previous one."""

    def __init__(self, step: float):
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def _run(attempts: int, step: float, caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    cfg = BrokerConfig(url=f"amqp://guest:guest@127.0.0.1:{_closed_port()}/", reconnect_max_seconds=0.01)
    stop, connected = threading.Event(), threading.Event()
    clock = StepClock(step)
    records: list[logging.LogRecord] = []

    class Count(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "cannot reach" in record.getMessage():
                records.append(record)
                if len(records) >= attempts:
                    stop.set()

    handler = Count(level=logging.DEBUG)
    logger = logging.getLogger("fem_hpc.broker")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        run_connected(cfg, "consumer", lambda conn: None, stop, connected, clock=clock)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old)
    return records


def test_an_unreachable_broker_warns_once_then_every_remind_interval(caplog: pytest.LogCaptureFixture) -> None:
    # 40 attempts, 5 s of clock each: 200 s of outage, a warning at 0 s, then about every 60 s
    records = _run(40, 5.0, caplog)
    warnings = [r for r in records if r.levelno == logging.WARNING]
    assert len(records) == 40
    assert len(warnings) == 1 + int(39 * 5.0 // REMIND_SECONDS), [r.getMessage() for r in warnings]
    assert warnings[0] is records[0]  # the first failure is said at once
    assert all(r.levelno == logging.DEBUG for r in records if r not in warnings)


def test_a_fast_retry_cap_does_not_make_a_short_outage_loud(caplog: pytest.LogCaptureFixture) -> None:
    # 30 quick attempts within 15 s of clock (the failure seen in CI: a 1 s cap, a warning at attempt 10)
    records = _run(30, 0.5, caplog)
    assert [r.levelno for r in records].count(logging.WARNING) == 1
