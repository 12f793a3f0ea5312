"""Docker executor overhead and stage-out throughput, measured in one run on this machine.

    python bench/docker_overhead.py [-n 20] [--size-mb 256]

1. N trivial tasks (`true`) through the docker executor (fem-hpc's Agent in this process, one after
   another: stage-in, render, create + start through the docker SDK, marker, stage-out, cleanup)
   against the baseline of N bare `docker run --rm IMAGE true` of the same image, one after
   another. Prints both wall times and the ratio (target <= 1.2x).
2. Stage-out throughput through the real broker: `fem-hpc serve` produces one output of SIZE MB of
   random bytes; the time from the task's STAGING_OUT event to the result at the client (archive,
   sha256, chunks through RabbitMQ with publisher confirms, joined and checked by the client).
   Target >= 100 MB/s on loopback.
Needs the test bed (scripts/testbed up): dockerd, the local registry image, RabbitMQ.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

IMAGE = "127.0.0.1:5000/fem/busybox:1"


def bare_docker(n: int) -> float:
    start = time.monotonic()
    for _ in range(n):
        subprocess.run(["docker", "run", "--rm", "--network", "none", IMAGE, "true"], check=True,
                       stdout=subprocess.DEVNULL)
    return time.monotonic() - start


def fem_docker(n: int, tmp: Path) -> float:
    from fem_hpc.config import config_from_dict
    from fem_hpc.journal import Journal
    from fem_hpc.lifecycle.agent import Agent

    site = config_from_dict({"node": "bench", "state_dir": str(tmp / "state"), "work_root": str(tmp / "work"),
                             "default_executor": "docker", "executors": {"docker": {}},
                             "policy": {"images": ["127.0.0.1:5000/*"]}})
    agent = Agent(site, Journal(site.journal_path, outbox=False))
    try:
        # One warm-up task so imports and the first daemon connection are not counted.
        agent.intake({"id": "warm", "image": IMAGE, "command": ["true"]})
        assert agent.wait("warm", 60).state.value == "COMPLETED"
        start = time.monotonic()
        for i in range(n):
            agent.intake({"id": f"t{i}", "image": IMAGE, "command": ["true"]})
            rec = agent.wait(f"t{i}", 60)
            assert rec is not None and rec.state.value == "COMPLETED", rec
        return time.monotonic() - start
    finally:
        agent.close()


def stage_out_throughput(size_mb: int, tmp: Path) -> tuple[float, float]:
    from brokerkit import BROKER_URL, ServeProcess, unique_node

    from fem_hpc.client import Client

    node = unique_node("bench")
    serve = ServeProcess(tmp, node).start()
    try:
        marks: dict[str, float] = {}

        def on_event(ev: dict) -> None:
            if ev.get("type") == "status":
                marks.setdefault(ev["state"], time.monotonic())

        task = {"id": "big", "outputs": ["big.bin"],
                "command": ["sh", "-c", f"head -c {size_mb * 1024 * 1024} /dev/urandom > big.bin"]}
        with Client(BROKER_URL, node) as c:
            res = c.submit(task, timeout=600, outputs_dir=tmp / "out", on_event=on_event)
        done = time.monotonic()
        assert res is not None and res.state == "COMPLETED", res
        seconds = done - marks["STAGING_OUT"]
        return seconds, size_mb / seconds
    finally:
        serve.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=20)
    p.add_argument("--size-mb", type=int, default=256)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="fem-bench-") as t:
        tmp = Path(t)
        subprocess.run(["docker", "run", "--rm", IMAGE, "true"], check=True)  # image present and warm
        bare = bare_docker(args.n)
        fem = fem_docker(args.n, tmp)
        so_seconds, so_rate = stage_out_throughput(args.size_mb, tmp)
    ratio = fem / bare
    print(f"{'measure':<44} {'value':>12}")
    print(f"{f'{args.n} x bare docker run --rm (s)':<44} {bare:>12.2f}")
    print(f"{f'{args.n} x fem-hpc docker executor (s)':<44} {fem:>12.2f}")
    print(f"{'ratio fem-hpc / bare docker run (target <= 1.2)':<44} {ratio:>12.2f}")
    print(f"{f'stage-out of {args.size_mb} MB through RabbitMQ (s)':<44} {so_seconds:>12.2f}")
    print(f"{'stage-out throughput MB/s (target >= 100)':<44} {so_rate:>12.1f}")
    print(f"RESULT docker_ratio={ratio:.2f} stage_out_mb_s={so_rate:.1f} "
          f"{'OK' if ratio <= 1.2 and so_rate >= 100 else 'MISSED'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
