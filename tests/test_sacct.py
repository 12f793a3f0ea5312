"""Real accounting (slurmdbd on MariaDB, started by scripts/testbed up): a job killed outside
fem-hpc, without a marker, after it left the queue ends by sacct's word, never LOST.

"Left the queue" in a test: a finished job stays in `squeue -t all` for MinJobAge (300 s on the
test bed), too long to wait for. The executor here polls `squeue -u nobody` (its `user:` setting),
so its polls never list the job, exactly what the tracker sees once a job has left the queue: every
word on the job then comes from the marker (there is none: SIGKILL) and sacct, which is real.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import services

from fem_hpc.config import config_from_dict
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State

pytestmark = pytest.mark.slurm


def site(tmp: Path) -> dict[str, Any]:
    return {
        "node": "sacct", "state_dir": str(tmp / "state"), "work_root": str(tmp / "work"),
        "default_executor": "slurm",
        # lost_grace far beyond the test: a LOST could only come from a bug, not from waiting.
        "executors": {"slurm": {"partition": services.SLURM_PARTITION, "user": "nobody", "sacct": True,
                                "poll": {"min_seconds": 1, "max_seconds": 2}, "lost_grace_seconds": 600}},
    }


def sacct_state(job_id: str) -> str:
    proc = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "State"], capture_output=True, text=True,
                          timeout=30)
    return proc.stdout.strip()


def test_a_job_scancelled_by_hand_ends_by_saccts_word_not_lost(tmp_path: Path) -> None:
    services.require("slurm-accounting")
    cfg = config_from_dict(site(tmp_path))
    agent = Agent(cfg, Journal(cfg.journal_path, outbox=False))
    try:
        res = agent.intake({"id": "killed-by-hand", "command": ["sleep", "300"]})
        assert res.record is not None, res.errors
        deadline = time.monotonic() + 60
        native = None
        while time.monotonic() < deadline:
            rec = agent.journal.get("killed-by-hand")
            assert rec is not None and not rec.final, rec
            native = rec.native_id
            if native and sacct_state(native) == "RUNNING":
                break
            time.sleep(0.5)
        assert native and sacct_state(native) == "RUNNING"
        time.sleep(5)  # polled and asked sacct meanwhile: RUNNING, so it is alive, not gone
        rec = agent.journal.get("killed-by-hand")
        assert rec is not None and not rec.final
        # Killed outside fem-hpc: SIGKILL to the batch shell alone (the wrapper), which so cannot write
        # a marker; Slurm then ends the job and kills what is left of it.
        subprocess.run(["scancel", "--signal=KILL", "--batch", native], check=True, timeout=30)
        done = agent.wait("killed-by-hand", timeout=90)
        assert done is not None and done.final, done
        marker = Path(done.workdir or "") / ".fem" / "exit_code"
        assert not marker.exists()
        assert done.state in (State.CANCELLED, State.FAILED) and done.reason != "LOST", done
        # by sacct's word: the state it reports is the task's, and so is the signal in its ExitCode
        word = sacct_state(native).split()[0]
        assert done.state == {"CANCELLED": State.CANCELLED, "FAILED": State.FAILED}[word], (word, done)
        assert word in (done.message or ""), done.message
        print(f"job {native}: sacct says {sacct_state(native)!r}; the task ended {done.state.value} ({done.message})")
    finally:
        agent.close()
