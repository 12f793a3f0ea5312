"""The scheduler call budget: the token bucket on an injected clock, the settings, how the batch
executors spend it (polls deferred at once, submits wait a moment), and the real thing: 30 tasks
through the local Slurm under a budget, checked against a log of every scheduler command the
service ran (recorded by wrappers in front of the real binaries)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node
from clusterkit import metric, metrics_text
from sshkit import free_port

from fem_hpc.client import Client
from fem_hpc.config import config_from_dict
from fem_hpc.executors import registry
from fem_hpc.executors.base import Deferred
from fem_hpc.executors.budget import BudgetSettings, CallBudget
from fem_hpc.executors.slurm import SlurmExecutor, SlurmSettings


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


REAL_SITE = BudgetSettings(bucket=40, refill=4, per_seconds=60)


def test_a_full_bucket_then_one_token_per_refill_interval() -> None:
    clock = Clock()
    b = CallBudget(REAL_SITE, clock)
    assert all(b.try_take() == 0.0 for _ in range(40))
    assert b.try_take() == pytest.approx(15.0)  # 4 per 60 s: one every 15 s
    clock.sleep(14.0)
    assert b.try_take() == pytest.approx(1.0)
    clock.sleep(1.0)
    assert b.try_take() == 0.0 and b.try_take() > 0
    clock.sleep(3600)
    assert b.tokens == pytest.approx(40.0)  # never more than the bucket


def test_no_window_gets_more_than_bucket_plus_refill() -> None:
    """Someone asks every 0.5 s for an hour: in any window of W seconds at most bucket + rate*W."""
    clock = Clock()
    b = CallBudget(REAL_SITE, clock)
    granted = []
    for _ in range(7200):
        if b.try_take() == 0.0:
            granted.append(clock.now)
        clock.sleep(0.5)
    assert len(granted) == pytest.approx(40 + 4 * 60, abs=2)  # 40 at once, then 4 a minute
    rate = 4 / 60
    for w in (1, 60, 600, 1800):
        worst = max(sum(1 for t in granted[i:] if t < start + w) for i, start in enumerate(granted))
        assert worst <= 40 + rate * w + 1, (w, worst)


def test_take_waits_up_to_max_wait_then_defers() -> None:
    clock = Clock()
    b = CallBudget(BudgetSettings(bucket=1, refill=1, per_seconds=10), clock)
    assert b.take(5, sleep=clock.sleep) == (True, 0.0)
    taken, wait = b.take(5, sleep=clock.sleep)  # the next token is 10 s away: not within 5 s
    assert not taken and wait == pytest.approx(5.0)
    taken, waited = b.take(10, sleep=clock.sleep)
    assert taken and waited == pytest.approx(5.0)
    taken, _ = b.take(60, cancelled=lambda: True, sleep=clock.sleep)
    assert not taken  # a closing executor's waiters give up at once


def test_settings_shorthand_and_conflict() -> None:
    s = SlurmSettings.model_validate({"max_scheduler_calls_per_minute": 10})
    assert s.budget() == BudgetSettings(bucket=10, refill=10, per_seconds=60)
    s = SlurmSettings.model_validate({"scheduler_budget": {"bucket": 40, "refill": 4, "per_seconds": 60}})
    assert s.budget() == REAL_SITE
    assert SlurmSettings().budget() is None
    problems = registry.validate_settings("slurm", {"max_scheduler_calls_per_minute": 10,
                                                    "scheduler_budget": {"bucket": 1, "refill": 1}})
    assert problems and "not both" in " ".join(problems)
    problems = registry.validate_settings("slurm", {"scheduler_budget": {"bucket": 0, "refill": 1}})
    assert problems and "bucket" in " ".join(problems)


def test_polls_are_deferred_and_submits_wait(tmp_path: Path) -> None:
    site = config_from_dict({"node": "n", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w"),
                             "executors": {"slurm": {}}})
    # A budget of its own (a cluster name nobody else uses): 2 calls, then one per 2 s.
    settings = SlurmSettings.model_validate({"scheduler_budget": {"bucket": 2, "refill": 1, "per_seconds": 2},
                                             "budget_wait_seconds": 3, "ssh": {"host": f"budget-{os.getpid()}"}})
    ex = SlurmExecutor("slurm", settings, site)
    try:
        ex.spend("poll")
        ex.spend("submit")
        with pytest.raises(Deferred) as deferred:
            ex.spend("poll")  # never waits
        assert 0 < deferred.value.retry_after <= 2
        start = time.monotonic()
        ex.spend("submit")  # waits for the next token (within budget_wait_seconds)
        assert 0.5 < time.monotonic() - start < 3
        ex.spend("other")  # not a scheduler call: free
        with pytest.raises(Deferred):
            ex.spend("check")
    finally:
        ex.close()


# -- the real Slurm ------------------------------------------------------------------------------
SCHEDULER = ("sbatch", "squeue", "scancel", "sacct", "sinfo", "scontrol")


def recording_path(tmp: Path) -> tuple[str, Path]:
    """A PATH whose scheduler commands append `<time> <name>` to a log, then exec the real one."""
    bindir, log = tmp / "recording-bin", tmp / "scheduler-calls.log"
    bindir.mkdir()
    for name in SCHEDULER:
        real = shutil.which(name)
        if real is None:
            continue
        script = bindir / name
        script.write_text(f'#!/bin/sh\necho "$(date +%s.%N) {name}" >> {log}\nexec {real} "$@"\n')
        script.chmod(0o755)
    return f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}", log


@pytest.mark.slurm
@pytest.mark.rabbitmq
@pytest.mark.slow
def test_thirty_tasks_under_a_budget_of_ten_per_window(tmp_path: Path) -> None:
    """Budget 10 calls, refilled by 10 every 6 s (a 10/minute site, time scaled down by 10)."""
    services.require("slurm")
    services.require("rabbitmq")
    path, log = recording_path(tmp_path)
    bucket, refill, per = 10, 10.0, 6.0
    node = unique_node("budget")
    serve = ServeProcess(tmp_path, node, {
        "default_executor": "slurm",
        "executors": {"slurm": {"partition": services.SLURM_PARTITION, "poll": {"min_seconds": 1, "max_seconds": 3},
                                "scheduler_budget": {"bucket": bucket, "refill": refill, "per_seconds": per}}},
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
    }, env={"PATH": path})
    serve.start()
    clients: dict[str, tuple[Any, str]] = {}
    try:
        started = time.monotonic()
        for i in range(30):
            tid = f"b{i}-{node}"
            c = Client(BROKER_URL, node)
            clients[tid] = (c, c.publish({"fem": 1, "op": "submit", "task": {"id": tid, "command": ["true"]}}))
        results = {tid: c.follow(corr, timeout=150) for tid, (c, corr) in clients.items()}
        elapsed = time.monotonic() - started
        text = metrics_text(serve)
    finally:
        for c, _ in clients.values():
            c.close()
        serve.stop()
    assert all(r.state == "COMPLETED" for r in results.values()), [r.result for r in results.values()]
    calls = sorted(float(line.split()[0]) for line in log.read_text().splitlines())
    names = [line.split()[1] for line in log.read_text().splitlines()]
    assert names.count("sbatch") == 30
    rate = refill / per
    for w in (0.5, 3.0, 6.0, 12.0, 30.0):
        worst = max(sum(1 for t in calls[i:] if t < start + w) for i, start in enumerate(calls))
        assert worst <= bucket + rate * w + 1, (w, worst, len(calls))
    # The budget was binding (more calls than one bucket), and so the run took at least the refill time.
    assert len(calls) > bucket and elapsed >= (len(calls) - bucket) / rate - 1, (len(calls), elapsed)
    assert (metric(text, "fem_scheduler_calls_total", executor="slurm", kind="submit") or 0) == 30
    waited = sum(metric(text, "fem_budget_wait_seconds_total", executor="slurm", kind=k) or 0
                 for k in ("submit", "poll"))
    assert waited > 0, text
    print(f"{len(calls)} scheduler calls for 30 tasks in {elapsed:.1f}s under {bucket} + {rate:.2f}/s: "
          f"{dict((n, names.count(n)) for n in set(names))}")
