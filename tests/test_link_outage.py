"""A dropped SSH link costs time, never a task: the real `fem-hpc serve` in front of the real Slurm
over a real sshd (tests/sshkit.py), and the sshd stopped for 30 s in the middle of a run; with the
work dirs on a shared file system, and without one (remote_work_root: then even the markers and
the outputs are out of reach meanwhile).

While it is down: tracked tasks keep their state with the message `paused: <host> unreachable
since <time>`, tasks submitted meanwhile stay staged (paused too), the health report and the
metrics say so. When it is back: every task ends COMPLETED, each with exactly one Slurm job.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from brokerkit import BROKER_URL
from clusterkit import Runs, isolate, jobs_named, metric, metrics_text, rows, service_sees, slurm_over_ssh, wait_for
from sshkit import SSHD

from fem_hpc.client import Client

pytestmark = [pytest.mark.ssh, pytest.mark.slurm, pytest.mark.rabbitmq, pytest.mark.slow]

OUTAGE_SECONDS = 30
PAUSED = "paused: 127.0.0.1 unreachable since "




def task(tid: str, seconds: int) -> dict:
    return {"id": tid, "outputs": ["out.txt"],
            "command": ["sh", "-c", f'sleep {seconds}; echo "done $1" > out.txt', "sh", tid]}


@pytest.mark.parametrize("mode", ["shared-fs", "off-cluster"])
def test_sshd_down_for_30s_pauses_and_fails_nothing(sshd: SSHD, tmp_path: Path, mode: str):
    if mode == "off-cluster":  # markers, outputs and inputs all cross the link (see test_offcluster.py)
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
    try:
        runs.submit({tid: task(tid, 20) for tid in running})
        wait_for(lambda: all(rows(serve).get(t, {}).get("state") == "RUNNING" for t in running), 60,
                 "the first tasks to run")
        sshd.stop()
        down_at = time.monotonic()
        runs.submit({tid: task(tid, 1) for tid in later})  # while the cluster cannot be reached

        def all_paused() -> bool:
            r = rows(serve)
            return all((r.get(t, {}).get("message") or "").startswith(PAUSED) for t in running + later)

        wait_for(all_paused, 25, "every task to say it is paused")
        r = rows(serve)
        assert {r[t]["state"] for t in running} == {"RUNNING"}, r
        assert {r[t]["state"] for t in later} <= {"RECEIVED", "STAGING_IN"}, r
        with Client(BROKER_URL, node) as c:
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
    for tid, res in results.items():
        assert res.state == "COMPLETED", (tid, res.result, log[-3000:])
        assert (tmp_path / "out" / tid / "outputs" / "out.txt").read_text() == f"done {tid}\n"
        assert "FAILED" not in res.states
        assert len(jobs_named(f"fem-{tid}")) == 1, (tid, jobs_named(f"fem-{tid}"))  # never a second job
    assert metric(text, "fem_executor_unreachable", executor="slurm") == 0.0
    assert finished < 60, finished  # resumed within the backoff caps, not minutes later
    print(f"all {len(results)} tasks completed {finished:.1f}s after sshd came back")
