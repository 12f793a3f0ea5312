"""A dropped SSH link costs time, never a task: the real `fem-hpc serve` in front of the real Slurm
over a real sshd (tests/sshkit.py), and the sshd stopped for 60 s (issue 13) in the middle of a
run; with the work dirs on a shared file system, and without one (remote_work_root: then even the
markers and the outputs are out of reach meanwhile).

While it is down: tracked tasks keep their state with the message `paused: <host> unreachable
since <time>`, tasks submitted meanwhile stay staged (paused too), the health report and the
metrics say so. When it is back: every task ends COMPLETED, each with exactly one Slurm job.

The two modes are two services side by side through one outage. The off-cluster one is also
restarted in the middle of it (SIGTERM, started again while sshd is still down): the new service
re-adopts every task without reaching the cluster, reports them paused itself (its own health
report and metrics, messages with its own `since`), fails nothing and submits nothing until the
link is back.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from brokerkit import BROKER_URL, ServeProcess
from clusterkit import Runs, isolate, jobs_named, metric, metrics_text, rows, service_sees, slurm_over_ssh, wait_for
from sshkit import SSHD

from fem_hpc.client import Client

pytestmark = [pytest.mark.ssh, pytest.mark.slurm, pytest.mark.rabbitmq, pytest.mark.slow]

OUTAGE_SECONDS = 60
PAUSED = "paused: 127.0.0.1 unreachable since "


def task(tid: str, seconds: int) -> dict:
    return {"id": tid, "outputs": ["out.txt"],
            "command": ["sh", "-c", f'sleep {seconds}; echo "done $1" > out.txt', "sh", tid]}


def all_paused(serve: ServeProcess, tids: list[str], since: str = "") -> bool:
    """Every task's message says paused, since `since` or later (ISO UTC strings compare in order)."""
    r = rows(serve)
    messages = [r.get(t, {}).get("message") or "" for t in tids]
    return all(m.startswith(PAUSED) and m[len(PAUSED):] >= since for m in messages)


def assert_paused(serve: ServeProcess, running: list[str], later: list[str]) -> None:
    """What the service says while the cluster cannot be reached: states kept, status, health, metrics."""
    r = rows(serve)
    assert {r[t]["state"] for t in running} == {"RUNNING"}, r
    assert {r[t]["state"] for t in later} <= {"RECEIVED", "STAGING_IN"}, r
    assert not any(r[t]["native_id"] for t in later), r  # nothing submitted while the link is down
    with Client(BROKER_URL, serve.node) as c:
        status = c.status(running[0])
        health = c.health()
    assert status["state"] == "RUNNING" and status["message"].startswith(PAUSED), status
    slurm = health["executors"]["slurm"]
    assert not slurm["works"] and slurm["unreachable"]["host"] == "127.0.0.1", slurm
    assert any(c["name"] == "slurm: cluster" and c["status"] == "warning" and PAUSED in c["detail"]
               for c in health["checks"]), health["checks"]
    text = metrics_text(serve)
    assert metric(text, "fem_executor_unreachable", executor="slurm") == 1.0
    assert (metric(text, "fem_executor_unreachable_seconds", executor="slurm") or 0) > 0


class Side:
    """One node of the test: a service in one mode, its tasks and its client."""

    def __init__(self, tmp: Path, sshd: SSHD, mode: str):
        self.mode, self.tmp = mode, tmp
        self.offcluster = mode == "off-cluster"
        tmp.mkdir(parents=True, exist_ok=True)
        if self.offcluster:  # markers, outputs and inputs all cross the link (see test_offcluster.py)
            root = tmp / "cluster" / "scratch"
            root.mkdir(parents=True)
            self.serve = isolate(slurm_over_ssh(tmp, sshd, remote_work_root=str(root)), root.parent).start()
            assert service_sees(self.serve, root.parent) == []
        else:
            self.serve = slurm_over_ssh(tmp, sshd).start()
        node = self.serve.node
        self.running = [f"run{i}-{node}" for i in range(4)]
        self.later = [f"late{i}-{node}" for i in range(2)]
        self.runs = Runs(node)


def test_sshd_down_for_60s_pauses_and_fails_nothing(sshd: SSHD, tmp_path: Path):
    """Both modes go through the same 60 s outage, side by side (one outage, not two)."""
    sides = [Side(tmp_path / mode, sshd, mode) for mode in ("shared-fs", "off-cluster")]
    off = sides[1]
    try:
        for s in sides:
            s.runs.submit({tid: task(tid, 20) for tid in s.running})
        for s in sides:
            wait_for(lambda s=s: all(rows(s.serve).get(t, {}).get("state") == "RUNNING" for t in s.running), 60,
                     f"the first tasks to run ({s.mode})")
        sshd.stop()
        down_at = time.monotonic()
        for s in sides:
            s.runs.submit({tid: task(tid, 1) for tid in s.later})  # while the cluster cannot be reached
        for s in sides:
            wait_for(lambda s=s: all_paused(s.serve, s.running + s.later), 25,
                     f"every task to say it is paused ({s.mode})")
            assert_paused(s.serve, s.running, s.later)
        # Off-cluster, the jobs end meanwhile (20 s): their markers and outputs wait on the cluster.
        # That service is restarted in the middle of the outage.
        assert off.serve.stop() == 0, off.serve.log()[-3000:]
        before = rows(off.serve)
        since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(time.time())))
        off.serve.start()
        assert not sshd.alive()
        wait_for(lambda: all_paused(off.serve, off.running + off.later, since), 25,
                 "the restarted service to report every task paused itself")
        assert_paused(off.serve, off.running, off.later)
        after = rows(off.serve)
        assert {t: after[t]["native_id"] for t in off.running} == {t: before[t]["native_id"] for t in off.running}
        assert down_at + OUTAGE_SECONDS - time.monotonic() > 5, "the restart ate the outage"
        for s in sides:
            for tid in s.running + s.later:  # the scheduler's own word, without the link: no second job
                assert len(jobs_named(f"fem-{tid}")) == (1 if tid in s.running else 0), (tid, jobs_named(f"fem-{tid}"))
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        sshd.start()
        back_at = time.monotonic()
        outcomes = {}
        for s in sides:
            results = s.runs.wait(s.running + s.later, 120, s.tmp / "out")
            outcomes[s.mode] = (results, time.monotonic() - back_at, metrics_text(s.serve))
    finally:
        for s in sides:
            s.runs.close()
            s.serve.stop()
    assert off.serve.log().count("carrying on with 6 task(s) from the journal") == 1, off.serve.log()[-3000:]
    for s in sides:
        results, finished, text = outcomes[s.mode]
        log = s.serve.log()
        for tid, res in results.items():
            assert res.state == "COMPLETED", (s.mode, tid, res.result, log[-3000:])
            assert (s.tmp / "out" / tid / "outputs" / "out.txt").read_text() == f"done {tid}\n"
            assert "FAILED" not in res.states
            assert len(jobs_named(f"fem-{tid}")) == 1, (tid, jobs_named(f"fem-{tid}"))  # never a second job
        assert metric(text, "fem_executor_unreachable", executor="slurm") == 0.0
        assert finished < 60, (s.mode, finished)  # resumed within the backoff caps, not minutes later
        print(f"{s.mode}: all {len(results)} tasks completed {finished:.1f}s after sshd came back"
              + (" (the service was restarted during the outage)" if s.offcluster else ""))
