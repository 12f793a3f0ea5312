"""A dropped SSH link costs time, never a task: the real `fem-hpc serve` in front of the real Slurm
over a real sshd (tests/sshkit.py), and the sshd stopped for 60 s (issue 13) in the middle of a
run; with the work dirs on a shared file system, and without one (remote_work_root: then even the
markers and the outputs are out of reach meanwhile).

While it is down: tracked tasks keep their state with the message `paused: <host> unreachable
since <time>`, tasks submitted meanwhile stay staged (paused too), the health report and the
metrics say so. When it is back: every task ends COMPLETED, each with exactly one Slurm job.

In the off-cluster mode only (to keep the file near 3 minutes, each mode costs the full 60 s),
the service is also restarted in the middle of the outage (SIGTERM, started again while sshd is
still down): the new service re-adopts every task without reaching the cluster, reports them
paused itself (its own health report and metrics, messages with its own `since`), fails nothing
and submits nothing until the link is back.
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


@pytest.mark.parametrize("mode", ["shared-fs", "off-cluster"])
def test_sshd_down_for_60s_pauses_and_fails_nothing(sshd: SSHD, tmp_path: Path, mode: str):
    offcluster = mode == "off-cluster"
    if offcluster:  # markers, outputs and inputs all cross the link (see test_offcluster.py)
        root = tmp_path / "cluster" / "scratch"
        root.mkdir(parents=True)
        serve = isolate(slurm_over_ssh(tmp_path, sshd, remote_work_root=str(root)), root.parent).start()
        assert service_sees(serve, root.parent) == []
    else:
        serve = slurm_over_ssh(tmp_path, sshd).start()
    node = serve.node
    running = [f"run{i}-{node}" for i in range(4)]
    later = [f"late{i}-{node}" for i in range(2)]
    runs = Runs(node)
    restarted = False
    try:
        runs.submit({tid: task(tid, 20) for tid in running})
        wait_for(lambda: all(rows(serve).get(t, {}).get("state") == "RUNNING" for t in running), 60,
                 "the first tasks to run")
        sshd.stop()
        down_at = time.monotonic()
        runs.submit({tid: task(tid, 1) for tid in later})  # while the cluster cannot be reached
        wait_for(lambda: all_paused(serve, running + later), 25, "every task to say it is paused")
        assert_paused(serve, running, later)
        if offcluster:
            # The jobs end meanwhile (20 s): their markers and outputs wait on the cluster.
            assert serve.stop() == 0, serve.log()[-3000:]
            before = rows(serve)
            since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(int(time.time())))
            serve.start()
            restarted = True
            assert not sshd.alive()
            wait_for(lambda: all_paused(serve, running + later, since), 25,
                     "the restarted service to report every task paused itself")
            assert_paused(serve, running, later)
            after = rows(serve)
            assert {t: after[t]["native_id"] for t in running} == {t: before[t]["native_id"] for t in running}
            assert down_at + OUTAGE_SECONDS - time.monotonic() > 5, "the restart ate the outage"
        for tid in running + later:  # the scheduler's own word, without the link: no second job
            assert len(jobs_named(f"fem-{tid}")) == (1 if tid in running else 0), (tid, jobs_named(f"fem-{tid}"))
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        sshd.start()
        back_at = time.monotonic()
        results = runs.wait(running + later, 120, tmp_path / "out")
        finished = time.monotonic() - back_at
        text = metrics_text(serve)
    finally:
        runs.close()
        serve.stop()
    log = serve.log()
    if restarted:
        assert log.count("carrying on with 6 task(s) from the journal") == 1, log[-3000:]
    for tid, res in results.items():
        assert res.state == "COMPLETED", (tid, res.result, log[-3000:])
        assert (tmp_path / "out" / tid / "outputs" / "out.txt").read_text() == f"done {tid}\n"
        assert "FAILED" not in res.states
        assert len(jobs_named(f"fem-{tid}")) == 1, (tid, jobs_named(f"fem-{tid}"))  # never a second job
    assert metric(text, "fem_executor_unreachable", executor="slurm") == 0.0
    assert finished < 60, finished  # resumed within the backoff caps, not minutes later
    print(f"{mode}: all {len(results)} tasks completed {finished:.1f}s after sshd came back"
          + (" (the service was restarted during the outage)" if restarted else ""))
