#!/usr/bin/env python3
"""Off-cluster (no shared file system) against shared file system, over the same SSH (run by hand).

    python bench/offcluster.py [-n 200] [--repeat 1]
    python bench/offcluster.py --latency 20 [--only offcluster]

Two phases with N trivial tasks (`true`) each, through a `fem-hpc serve` subprocess whose default
executor is the real Slurm reached over a real sshd on 127.0.0.1 (tests/sshkit.py starts it):
  shared    `ssh:` only: scheduler commands over SSH, work dirs read on the shared disk;
  offcluster `remote_work_root`: the work dir goes over as a tar stream, markers are read with one
            remote command per second, the outputs archive is built on the cluster and streamed
            back, the remote work dir removed afterwards. The service runs in a mount namespace
            where the cluster's scratch is an empty tmpfs (as in tests/test_offcluster.py).
Printed per phase: wall time (first publish -> last result), SSH round trips (channels opened,
from the service's metrics) and per task, SSH connections, the service's peak RSS (VmHWM), and
the scheduler calls by kind. Then the ratio of the wall times. Needs `scripts/testbed up`.

--latency N: completion latency on an idle link instead (issue 13: "completion seen within 2 s of
the job's end"). N tasks (`sleep 2`) one after the other, the next published when the previous
result is in, so the link carries nothing but that task and the tracker's cycles. A watcher
thread here (outside the service's namespace: it sees the cluster's scratch) records the mtime
(ns) of each job's `.fem/exit_code` as the wrapper wrote it; after the run the journal gives the
COMPLETED transition's time. Printed: median and p95 of marker -> COMPLETED, marker -> result
received here, and the split marker -> STAGING_OUT (the tracker saw it) / STAGING_OUT -> COMPLETED.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pika
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from clusterkit import HIDE  # noqa: E402 - the test bed's "no shared file system" mount
from sshkit import SSHD, free_port  # noqa: E402 - the test kit's real sshd

from fem_hpc.journal import Journal  # noqa: E402

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # loopback only
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def vmhwm_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def fem_hpc_argv() -> list[str]:
    beside = Path(sys.executable).parent / "fem-hpc"
    return [str(beside)] if beside.exists() else [sys.executable, "-m", "fem_hpc.cli"]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class MarkerWatch:
    """The mtime of every job's marker under `scan` (work dirs at */*/<task>), first seen within
    ~10 ms of its writing: off-cluster the service removes the remote dir soon after the result."""

    def __init__(self, scan: Path):
        self.scan = scan
        self.mtimes: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            for marker in self.scan.glob("*/*/*/.fem/exit_code"):
                tid = marker.parent.parent.name
                if tid not in self.mtimes:
                    try:
                        self.mtimes[tid] = marker.stat().st_mtime_ns / 1e9
                    except OSError:  # removed meanwhile
                        pass

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def transition_times(state_dir: Path, task_ids: list[str]) -> dict[str, dict[str, float]]:
    """{task: {state: time}} from the journal of a stopped service."""
    journal = Journal(state_dir / "journal.sqlite", outbox=False)
    try:
        return {tid: {t["state"]: t["time"] for t in journal.transitions(tid)} for tid in task_ids}
    finally:
        journal.close()


def run_phase(root: Path, sshd: SSHD, mode: str, n: int, timeout: float, channels: int,
              sequential: bool = False) -> dict[str, Any]:
    node = f"bench-oc-{uuid.uuid4().hex[:8]}"
    port = free_port()
    slurm: dict[str, Any] = {"partition": "debug", "ssh": sshd.settings_dict(max_channels=channels)}
    prefix: list[str] = []
    if mode == "offcluster":
        hidden = root / f"cluster-{node}"
        (hidden / "scratch").mkdir(parents=True)
        slurm["remote_work_root"] = str(hidden / "scratch")
        scan = hidden / "scratch"
        prefix = ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", HIDE, "sh", str(hidden)]
    else:
        scan = root / f"{node}-work"
    cfg = {"node": node, "broker": {"url": BROKER_URL}, "state_dir": str(root / f"{node}-state"),
           "work_root": str(root / f"{node}-work"), "default_executor": "slurm", "executors": {"slurm": slurm},
           "metrics": {"listen": f"127.0.0.1:{port}"}}
    cfg_path = root / f"{node}.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    serve_log = root / f"{node}.log"
    with open(serve_log, "ab") as out:
        proc = subprocess.Popen([*prefix, *fem_hpc_argv(), "serve", "--config", str(cfg_path)], stdout=out,
                                stderr=out, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 60
        while "consuming queue" not in serve_log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fem-hpc serve did not start:\n{serve_log.read_text(errors='replace')}")
            time.sleep(0.1)
        reply = f"{node}.bench-replies"
        conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        ch = conn.channel()
        ch.queue_declare(queue=reply, durable=True)
        watch = MarkerWatch(scan) if sequential else None
        command = ["sleep", "2"] if sequential else ["true"]

        def publish(i: int) -> None:
            body = json.dumps({"fem": 1, "op": "submit", "task": {"id": f"t{i:05d}-{node}", "command": command}})
            ch.basic_publish("", node, body.encode(), pika.BasicProperties(
                content_type="application/json", delivery_mode=2, correlation_id=uuid.uuid4().hex,
                message_id=uuid.uuid4().hex, reply_to=reply))

        t0 = time.monotonic()
        for i in range(1 if sequential else n):
            publish(i)
        results: dict[str, str] = {}
        received: dict[str, float] = {}  # wall clock, as the marker's mtime and the journal's times
        end = t0 + timeout
        while len(results) < n and time.monotonic() < end:
            try:
                if not conn.is_open:
                    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
                    ch = conn.channel()
                for method, props, body in ch.consume(reply, auto_ack=True, inactivity_timeout=0.2):
                    if method is not None and props.type != "chunk":
                        event = json.loads(body)
                        if event.get("type") == "result" and event["task_id"] not in results:
                            results[event["task_id"]] = event["state"]
                            if event["state"] != "COMPLETED":
                                log(f"{mode}: {event['task_id']} {event['state']} {event.get('reason')}: "
                                    f"{event.get('message') or ''} {event.get('stderr_tail') or ''} (log {serve_log})")
                            received[event["task_id"]] = time.time()
                            if sequential and len(results) < n:
                                publish(len(results))  # the next one only now: an idle link
                    if len(results) == n or time.monotonic() > end:
                        break
            except pika.exceptions.AMQPError as exc:
                log(f"{mode}: broker connection lost ({type(exc).__name__}); reconnecting")
                time.sleep(0.5)
        wall = time.monotonic() - t0
        time.sleep(1.5)  # the last remote cleanup cycle
        if watch is not None:
            watch.stop()
        m = metrics(port)
        rss = vmhwm_mb(proc.pid)
        try:
            ch.queue_delete(reply)
            conn.close()
        except pika.exceptions.AMQPError:
            pass
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    channels = m.get('fem_ssh_channels_total{host="127.0.0.1"}', 0.0)
    calls = {k.split('kind="')[1].rstrip('"}'): v for k, v in m.items()
             if k.startswith("fem_scheduler_calls_total{")}
    row = {"mode": mode, "n": n, "ok": sum(1 for s in results.values() if s == "COMPLETED"), "wall": wall,
           "channels": channels, "per_task": channels / n, "rss_mb": rss, "calls": calls,
           "connects": m.get('fem_ssh_connects_total{host="127.0.0.1"}')}
    if watch is not None:
        times = transition_times(Path(cfg["state_dir"]), list(watch.mtimes))
        lat: dict[str, list[float]] = {"marker->COMPLETED": [], "marker->received": [], "marker->STAGING_OUT": [],
                                       "STAGING_OUT->COMPLETED": []}
        for tid, at in watch.mtimes.items():
            t = times.get(tid, {})
            if "COMPLETED" in t and "STAGING_OUT" in t and tid in received:
                lat["marker->COMPLETED"].append(t["COMPLETED"] - at)
                lat["marker->received"].append(received[tid] - at)
                lat["marker->STAGING_OUT"].append(t["STAGING_OUT"] - at)
                lat["STAGING_OUT->COMPLETED"].append(t["COMPLETED"] - t["STAGING_OUT"])
        row["latency"] = lat
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--max-channels", type=int, default=4, help="ssh.max_channels (default 4, as the config's)")
    ap.add_argument("--only", choices=("shared", "offcluster"), help="one phase only")
    ap.add_argument("--latency", type=int, metavar="N", help="completion latency of N tasks one after the other "
                    "(an idle link) instead of the N-task throughput phases")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (serve logs, journals)")
    args = ap.parse_args(argv)
    if args.latency:
        args.n = args.latency
    kept = contextlib.nullcontext(tempfile.mkdtemp(prefix="fem-bench-oc-")) if args.keep else None
    with kept or tempfile.TemporaryDirectory(prefix="fem-bench-oc-") as tmp:
        root = Path(tmp)
        rows = []
        for r in range(args.repeat):
            for mode in [args.only] if args.only else ["shared", "offcluster"]:
                sshd = SSHD(root / f"sshd-{mode}-{r}").start()  # a fresh sshd: its own connection count
                try:
                    log(f"{mode} #{r + 1}: {args.n} tasks")
                    rows.append(run_phase(root, sshd, mode, args.n, args.timeout, args.max_channels,
                                          sequential=bool(args.latency)))
                    rows[-1]["accepted"] = sshd.accepted()
                finally:
                    sshd.stop()
    print(f"{'mode':<11} {'ok':>5} {'wall s':>8} {'SSH trips':>10} {'per task':>9} {'conns':>6} {'peak RSS MB':>12}"
          "  scheduler calls")
    for row in rows:
        print(f"{row['mode']:<11} {row['ok']:>5} {row['wall']:>8.1f} {row['channels']:>10.0f} {row['per_task']:>9.2f} "
              f"{row['accepted']:>6} {row['rss_mb']:>12.0f}  {row['calls']}")
    for row in rows:
        for name, values in row.get("latency", {}).items():
            if values:
                print(f"{row['mode']:<11} {name:<24} median {pct(values, .5):.3f}s  p95 {pct(values, .95):.3f}s  "
                      f"max {max(values):.3f}s  (n={len(values)})")
    by_mode = {mode: sorted(r["wall"] for r in rows if r["mode"] == mode) for mode in ("shared", "offcluster")}
    med = {mode: walls[len(walls) // 2] for mode, walls in by_mode.items() if walls}
    if len(med) == 2:
        print(f"wall time off-cluster / shared file system: {med['offcluster'] / med['shared']:.2f} "
              f"(median {med['offcluster']:.1f}s vs {med['shared']:.1f}s)")
    return 0 if all(r["ok"] == r["n"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
