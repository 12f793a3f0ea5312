#!/usr/bin/env python3
"""End-to-end benchmark of fem-hpc on the real Slurm, against the floor and PSI/J (run by hand).

    python bench/slurm_e2e.py [-n 100]            # floor, fem-hpc, PSI/J; N trivial jobs each
    python bench/slurm_e2e.py --only fem -n 20    # one phase
    python bench/slurm_e2e.py --tracker-scale 10000

Default mode, three phases on the real Slurm (partition debug), each with N jobs that run `true`:
  floor   plain `sbatch --parsable --wrap true` N times, then one `squeue` every 0.2 s until every
          job is in a final state (finished jobs stay visible as CD for MinJobAge).
  fem     a `fem-hpc serve` subprocess with `default_executor: slurm`; N tasks published to its
          queue on the broker; done when every result has been received.
  psij    psij-python's `JobExecutor.get_instance('slurm')` with its default config: submit all,
          wait all.
Scheduler commands are counted with PATH wrappers: a temp dir of sbatch/squeue/scancel/sacct/
sinfo/scontrol/qstat scripts that log their name and `exec` the real binary by absolute path.

--tracker-scale JOBS feeds ONE fem_hpc.lifecycle.tracker.Tracker with JOBS jobs through an in-process
executor whose poll() parses a squeue output in the real SQUEUE_FORMAT (generated, JOBS lines),
with the jobs' work dirs (and later their exit-code markers) in a temp dir.

Needs: the test bed (`scripts/testbed up`: RabbitMQ, munge, slurmctld, slurmd) and, for the PSI/J
phase, `pip install -e '.[bench]'` (psij-python). Not run in CI.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BROKER_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
COUNTED = ("sbatch", "squeue", "scancel", "sacct", "sinfo", "scontrol", "qstat")
FINAL_SLURM = {"CD", "F", "CA", "TO", "NF", "OOM", "BF", "DL", "PR"}
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")

# Targets from issue 4.
TARGET_FLOOR_RATIO = 1.5
TARGET_PSIJ_RATIO = 0.25
TARGET_P95_DETECTION = 1.0
TARGET_PARSE_SECONDS = 0.100
TARGET_RSS_MB = 150.0


# --- helpers -------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation; nan when empty."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def make_wrappers(root: Path, phase: str) -> tuple[Path, Path]:
    """A PATH dir whose scheduler commands log their name to calls.log and exec the real binary."""
    bindir = root / f"wrap-{phase}"
    bindir.mkdir(parents=True)
    calls = root / f"calls-{phase}.log"
    calls.touch()
    for name in COUNTED:
        real = shutil.which(name)
        body = (f"exec {shlex.quote(real)} \"$@\"" if real
                else f"echo '{name}: not installed' >&2; exit 127")
        # A call made inside a job (a job script calling scontrol, say) is logged as NAME@job: it
        # is not a call of the client being measured.
        (bindir / name).write_text(f"#!/bin/sh\nprintf '%s%s\\n' {name} \"${{SLURM_JOB_ID:+@job}}\" >> "
                                   f"{shlex.quote(str(calls))}\n{body}\n")
        (bindir / name).chmod(0o755)
    return bindir, calls


def count_calls(calls: Path) -> Counter[str]:
    return Counter(line.strip() for line in calls.read_text().splitlines() if line.strip())


def proc_cpu(pid: int) -> tuple[float, float]:
    """(own utime+stime, waited-for children's cutime+cstime) in seconds, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # after "pid (comm)": state=0 ppid=1 ... utime=11 stime=12 cutime=13 cstime=14
    return (int(fields[11]) + int(fields[12])) / CLK_TCK, (int(fields[13]) + int(fields[14])) / CLK_TCK


def proc_status_kb(pid: int | str, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def slurm_busy() -> int:
    """Jobs of any user pending or running right now (another workload skews the figures)."""
    out = subprocess.run(["squeue", "-h", "-t", "PD,R,CG", "-o", "%i"], capture_output=True, text=True,
                         timeout=60).stdout
    return len(out.split())


def fem_hpc_argv() -> list[str]:
    beside = Path(sys.executable).parent / "fem-hpc"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fem-hpc")
    return [found] if found else [sys.executable, "-m", "fem_hpc.cli"]


@dataclass
class Phase:
    name: str
    label: str = ""  # name, or name#run with --repeat
    wall: float = float("nan")
    submit: float = float("nan")  # seconds until the last job was handed to sbatch
    calls: Counter[str] = field(default_factory=Counter)
    detection: list[float] = field(default_factory=list)  # result time - marker mtime (fem only)
    cpu: float = float("nan")
    children_cpu: float = float("nan")
    rss_mb: float = float("nan")
    ok: int = 0
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


# --- floor ---------------------------------------------------------------------------------------


def run_floor(root: Path, n: int, partition: str, timeout: float) -> Phase:
    bindir, calls = make_wrappers(root, "floor")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    ph = Phase("floor")
    start_self = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    ids = []
    for i in range(n):
        out = subprocess.run(["sbatch", "--parsable", "-p", partition, "-J", f"floor-{i}", "-o", "/dev/null",
                              "--wrap", "true"], capture_output=True, text=True, env=env, timeout=60, check=True)
        ids.append(out.stdout.strip().split(";")[0])
    ph.submit = time.monotonic() - t0
    pending = set(ids)
    listed: set[str] = set()  # a job counts as ended when it left the queue only after it was listed
    failed_polls = 0
    deadline = t0 + timeout
    while pending and time.monotonic() < deadline:
        proc = subprocess.run(["squeue", "--me", "-h", "-t", "all", "-o", "%i|%t"], capture_output=True, text=True,
                              env=env, timeout=60)
        if proc.returncode != 0:
            failed_polls += 1
            time.sleep(0.2)
            continue
        seen = {}
        for line in proc.stdout.splitlines():
            job_id, _, state = line.partition("|")
            seen[job_id.strip()] = state.strip()
        listed.update(j for j in pending if j in seen)
        for job_id in list(pending):
            if (job_id not in seen and job_id in listed) or seen.get(job_id) in FINAL_SLURM:
                pending.discard(job_id)
        if pending:
            time.sleep(0.2)
    if failed_polls:
        ph.extra["failed_squeue"] = failed_polls
    ph.wall = time.monotonic() - t0
    ph.ok = n - len(pending)
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    ph.children_cpu = (used.ru_utime + used.ru_stime) - (start_self.ru_utime + start_self.ru_stime)
    ph.calls = count_calls(calls)
    ph.note = "sequential sbatch, squeue every 0.2 s"
    return ph


# --- fem-hpc serve -------------------------------------------------------------------------------


def run_fem(root: Path, n: int, partition: str, timeout: float, broker: str) -> Phase:
    import pika
    import yaml

    bindir, calls = make_wrappers(root, "fem")
    node = f"bench-{uuid.uuid4().hex[:8]}"
    work_root = root / "fem-work"
    config = {
        "node": node,
        "broker": {"url": broker},
        "state_dir": str(root / "fem-state"),
        "work_root": str(work_root),
        "default_executor": "slurm",
        "executors": {"slurm": {"partition": partition}},
    }
    cfg_path = root / "fem.yaml"
    cfg_path.write_text(yaml.safe_dump(config))
    serve_log = root / "fem-serve.log"
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    with open(serve_log, "ab") as out:
        proc = subprocess.Popen([*fem_hpc_argv(), "serve", "--config", str(cfg_path)], stdout=out, stderr=out,
                                env=env)
    ph = Phase("fem")
    try:
        deadline = time.monotonic() + 60
        while "consuming queue" not in serve_log.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fem-hpc serve did not start:\n{serve_log.read_text(errors='replace')}")
            time.sleep(0.1)
        cpu0 = proc_cpu(proc.pid)
        # A named reply queue that outlives a connection: if the broker drops the bench's
        # connection (another test restarting RabbitMQ), it reconnects and nothing is lost.
        reply = f"{node}.bench-replies"
        conn = pika.BlockingConnection(pika.URLParameters(broker))
        ch = conn.channel()
        ch.queue_declare(queue=reply, durable=True)
        task_ids = [f"b{i:05d}-{node}" for i in range(n)]
        received: dict[str, tuple[float, dict[str, Any]]] = {}
        t0 = time.monotonic()
        t0_wall = time.time()
        for tid in task_ids:
            body = json.dumps({"fem": 1, "op": "submit", "task": {"id": tid, "command": ["true"]}}).encode()
            ch.basic_publish("", node, body, pika.BasicProperties(
                content_type="application/json", delivery_mode=2, correlation_id=uuid.uuid4().hex,
                message_id=uuid.uuid4().hex, reply_to=reply))
        published = time.monotonic() - t0
        last_submitted = 0.0
        end = t0 + timeout
        while len(received) < n and time.monotonic() < end:
            try:
                if not conn.is_open:
                    conn = pika.BlockingConnection(pika.URLParameters(broker))
                    ch = conn.channel()
                    ph.extra["bench_reconnects"] = ph.extra.get("bench_reconnects", 0) + 1
                for method, props, body in ch.consume(reply, auto_ack=True, inactivity_timeout=0.2):
                    now_wall = time.time()
                    if method is not None and props.type != "chunk":
                        event = json.loads(body)
                        if event.get("type") == "result":
                            received[event["task_id"]] = (now_wall, event)
                        elif event.get("state") == "SUBMITTED":
                            last_submitted = max(last_submitted, now_wall - t0_wall)
                    if len(received) == n or time.monotonic() > end:
                        break
            except pika.exceptions.AMQPError as exc:
                log(f"fem: broker connection lost ({type(exc).__name__}); reconnecting")
                time.sleep(0.5)
        ph.wall = time.monotonic() - t0
        try:
            ch.cancel()
            ch.queue_delete(reply)
            conn.close()
        except pika.exceptions.AMQPError:
            pass
        ph.submit = last_submitted
        # The service's own cost, read while it is still alive.
        cpu1 = proc_cpu(proc.pid)
        ph.cpu = cpu1[0]
        ph.children_cpu = cpu1[1]
        ph.rss_mb = proc_status_kb(proc.pid, "VmHWM") / 1024
        ph.extra["cpu_during_run"] = cpu1[0] - cpu0[0]
        ph.extra["publish_seconds"] = published
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    states = Counter(ev.get("state") for _, ev in received.values())
    ph.ok = states.get("COMPLETED", 0)
    # Where the time between the job's end and the result goes, from the journal's transition
    # times: marker -> STAGING_OUT (tracker saw the marker, a worker took the stage-out),
    # STAGING_OUT -> final (archive, journal), final -> received (outbox, broker, client).
    from fem_hpc.journal import Journal

    journal = Journal(root / "fem-state" / "journal.sqlite", outbox=False)
    seen, staged, published = [], [], []
    try:
        for tid, (t_result, ev) in received.items():
            markers = list(work_root.glob(f"*/*/{tid}/.fem/exit_code"))
            if not markers:
                continue
            end = markers[0].stat().st_mtime_ns / 1e9
            ph.detection.append(t_result - end)
            times = {t["state"]: t["time"] for t in journal.transitions(tid)}
            if "STAGING_OUT" in times and ev.get("state") in times:
                seen.append(times["STAGING_OUT"] - end)
                staged.append(times[ev["state"]] - times["STAGING_OUT"])
                published.append(t_result - times[ev["state"]])
    finally:
        journal.close()
    for name, values in (("marker->STAGING_OUT", seen), ("STAGING_OUT->final", staged),
                         ("final->received", published)):
        if values:
            ph.extra[f"{name} p50/p95"] = f"{pct(values, .5):.3f}/{pct(values, .95):.3f}s"
    ph.calls = count_calls(calls)
    ph.extra["states"] = dict(states)
    ph.note = "fem-hpc serve, default poll settings, results over the broker"
    if len(received) < n:
        ph.note += f"; ONLY {len(received)}/{n} results within {timeout:.0f}s (see {serve_log})"
    return ph


# --- PSI/J ---------------------------------------------------------------------------------------


def run_psij(root: Path, n: int, partition: str, timeout: float) -> Phase:
    from datetime import timedelta

    from psij import Job, JobAttributes, JobExecutor, JobSpec
    from psij.executors.batch.slurm import SlurmExecutorConfig

    bindir, calls = make_wrappers(root, "psij")
    old_path = os.environ["PATH"]
    os.environ["PATH"] = f"{bindir}{os.pathsep}{old_path}"  # PSI/J runs sbatch/squeue with our environment
    ph = Phase("psij")
    try:
        work = root / "psij-work"
        work.mkdir()
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        executor = JobExecutor.get_instance("slurm", config=SlurmExecutorConfig(work_directory=work))
        jobs = [Job(JobSpec(executable="/bin/true", directory=work,
                            attributes=JobAttributes(queue_name=partition, duration=timedelta(minutes=10))))
                for _ in range(n)]
        t0 = time.monotonic()
        for job in jobs:
            executor.submit(job)
        ph.submit = time.monotonic() - t0
        end = t0 + timeout
        for job in jobs:
            job.wait(timedelta(seconds=max(0.1, end - time.monotonic())))
        ph.wall = time.monotonic() - t0
        ph.ok = sum(1 for j in jobs if j.status.state.name == "COMPLETED")
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        ph.cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime)
        ph.children_cpu = (ch1.ru_utime + ch1.ru_stime) - (ch0.ru_utime + ch0.ru_stime)
        cfg = executor.config
        ph.note = (f"psij-python default config: queue_polling_interval={cfg.queue_polling_interval}s, "
                   f"initial delay {cfg.initial_queue_polling_delay}s")
    finally:
        os.environ["PATH"] = old_path
    ph.calls = count_calls(calls)
    return ph


# --- the report ----------------------------------------------------------------------------------


def fmt(x: float, digits: int = 2) -> str:
    return "-" if x != x else f"{x:.{digits}f}"  # nan -> "-"


def report(phases: list[Phase], n: int, poll_min: float) -> int:
    """One row per run; the checks use the median wall time of each phase's runs and the
    detection times of all fem runs together."""
    rows = [("phase", "ok", "wall s", "submit s", "p50 det s", "p95 det s", "max det s", "cpu s", "child cpu s",
             "peak RSS MB", "scheduler calls")]
    for p in phases:
        calls = " ".join(f"{k}={v}" for k, v in sorted(p.calls.items())) or "-"
        rows.append((p.label, f"{p.ok}/{n}", fmt(p.wall), fmt(p.submit), fmt(pct(p.detection, .5), 3),
                     fmt(pct(p.detection, .95), 3), fmt(max(p.detection) if p.detection else float("nan"), 3),
                     fmt(p.cpu), fmt(p.children_cpu), fmt(p.rss_mb, 1), calls))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    for p in phases:
        extra = ", ".join(f"{k}={fmt(v) if isinstance(v, float) else v}" for k, v in p.extra.items())
        print(f"  {p.label}: {p.note}" + (f" ({extra})" if extra else ""))
    runs: dict[str, list[Phase]] = {}
    for p in phases:
        runs.setdefault(p.name, []).append(p)
    wall = {name: pct([p.wall for p in ps], .5) for name, ps in runs.items()}
    verdicts = []
    fems = runs.get("fem", [])
    if fems:
        if len(fems) > 1 or len(runs.get("floor", [])) > 1:
            print("median wall: " + ", ".join(f"{name}={w:.2f}s" for name, w in wall.items()))
        if "floor" in wall:
            r = wall["fem"] / wall["floor"]
            print(f"fem/floor wall ratio: {r:.2f} (target <= {TARGET_FLOOR_RATIO})")
            verdicts.append(("fem/floor", f"{r:.2f}", r <= TARGET_FLOOR_RATIO))
        if "psij" in wall:
            r = wall["fem"] / wall["psij"]
            print(f"fem/psij wall ratio: {r:.2f} (target <= {TARGET_PSIJ_RATIO})")
            verdicts.append(("fem/psij", f"{r:.2f}", r <= TARGET_PSIJ_RATIO))
        detection = [d for p in fems for d in p.detection]
        p95 = pct(detection, .95)
        verdicts.append(("p95_detection_s", fmt(p95, 3), p95 <= TARGET_P95_DETECTION))
        squeue_ok = True
        for p in fems:
            squeues = p.calls.get("squeue", 0)
            max_squeue = int(p.wall / poll_min) + 1
            print(f"{p.label} squeue calls: {squeues} in {p.wall:.1f}s; at most one per cycle allows <= {max_squeue} "
                  f"(cycles are >= {poll_min:g}s apart)")
            squeue_ok = squeue_ok and squeues <= max_squeue
        verdicts.append(("squeue_per_cycle", "ok" if squeue_ok else "exceeded", squeue_ok))
        per_job = sum(v for p in fems for k, v in p.calls.items()
                      if k not in ("sbatch", "squeue") and not k.endswith("@job"))
        sbatch_ok = all(p.calls.get("sbatch", 0) == n for p in fems)
        verdicts.append(("per_job_calls_besides_sbatch", str(per_job), per_job == 0 and sbatch_ok))
        completed = sum(p.ok for p in fems)
        verdicts.append(("all_completed", f"{completed}/{n * len(fems)}", completed == n * len(fems)))
    failed = [v for v in verdicts if not v[2]]
    print("RESULT " + ("PASS" if not failed else "MISS") + f" n={n} runs={max(map(len, runs.values()), default=0)} " +
          " ".join(f"{name}={value}{'' if good else '(MISS)'}" for name, value, good in verdicts) +
          "".join(f" {name}_wall={w:.2f}s" for name, w in wall.items()))
    return 0 if not failed else 1


def run_e2e(args: argparse.Namespace) -> int:
    from fem_hpc.executors.batch import PollSettings

    busy = slurm_busy()
    if busy:
        log(f"warning: {busy} job(s) of others pending/running on this Slurm; the figures will be skewed")
    root = Path(tempfile.mkdtemp(prefix="fem_bench_", dir=args.tmp))
    phases: list[Phase] = []
    try:
        order = [p for p in ("floor", "fem", "psij") if p in (args.only or ("floor", "fem", "psij"))]
        psij_missing = False
        for i in range(1, args.repeat + 1):
            for name in order:
                if name == "psij" and (psij_missing or i > 1 and not args.repeat_psij):
                    continue
                label = name if args.repeat == 1 else f"{name}#{i}"
                log(f"{label}: {args.n} jobs")
                run_root = root / label.replace("#", "")
                run_root.mkdir()
                if name == "floor":
                    phase = run_floor(run_root, args.n, args.partition, args.timeout)
                elif name == "fem":
                    phase = run_fem(run_root, args.n, args.partition, args.timeout, args.broker)
                else:
                    try:
                        phase = run_psij(run_root, args.n, args.partition, args.timeout)
                    except ImportError as exc:
                        log(f"psij: skipped ({exc}); pip install -e '.[bench]'")
                        psij_missing = True
                        continue
                phase.label = label
                phases.append(phase)
                log(f"{label}: {phase.wall:.2f}s")
        return report(phases, args.n, PollSettings().min_seconds)
    finally:
        if args.keep:
            log(f"kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


# --- one tracker, many jobs ----------------------------------------------------------------------


def run_tracker_scale(args: argparse.Namespace) -> int:
    from fem_hpc.executors.base import Executor, ExecutorSettings, Job, NativeStatus
    from fem_hpc.executors.slurm_cmds import SQUEUE_FORMAT, parse_squeue
    from fem_hpc.lifecycle.tracker import Tracker
    from fem_hpc.model import Task

    jobs_n = args.tracker_scale
    root = Path(tempfile.mkdtemp(prefix="fem_tracker_", dir=args.tmp))
    rss0 = proc_status_kb("self", "VmRSS") / 1024

    # A squeue answer in the real format: "%i|%t|%T|%r|%j", one line per job, all still queued.
    assert SQUEUE_FORMAT == "%i|%t|%T|%r|%j", SQUEUE_FORMAT
    states = [("R", "RUNNING", "None"), ("R", "RUNNING", "None"), ("PD", "PENDING", "Priority"),
              ("PD", "PENDING", "Resources"), ("CG", "COMPLETING", "None")]
    first_id = 500000
    task_ids = [f"scale{i:06d}" for i in range(jobs_n)]
    lines = []
    for i, tid in enumerate(task_ids):
        compact, long, reason = states[i % len(states)]
        lines.append(f"{first_id + i}|{compact}|{long}|{reason}|fem-{tid}")
    squeue_text = "\n".join(lines) + "\n"

    class RecordedSqueue(Executor):
        kind = "recorded-squeue"
        template = "local.sh.j2"

        def __init__(self) -> None:
            super().__init__("recorded", ExecutorSettings(), None)  # type: ignore[arg-type]
            self.parse_seconds: list[float] = []

        def submit(self, job: Job) -> str:  # pragma: no cover - never called
            raise NotImplementedError

        def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
            start = time.perf_counter()
            out = parse_squeue(squeue_text)
            self.parse_seconds.append(time.perf_counter() - start)
            return out

        def cancel(self, job: Job) -> None:
            pass

        def poll_interval(self, youngest_age: float) -> float:
            return args.poll_seconds

    finals = 0
    finals_lock = threading.Lock()
    all_final = threading.Event()

    class Listener:
        """Counts final jobs; every other tracker callback (on_running, on_pending, ...) is a no-op."""

        def __getattr__(self, name: str) -> Any:
            if name.startswith("on_"):
                return lambda *args, **kwargs: None
            raise AttributeError(name)

        def on_final(self, job: Job, outcome: Any) -> None:
            nonlocal finals
            with finals_lock:
                finals += 1
                if finals == jobs_n:
                    all_final.set()

    executor = RecordedSqueue()
    tracker = Tracker(executor, Listener())
    cycle_seconds: list[tuple[float, bool, int]] = []  # (seconds, polled, tracked)
    inner_cycle = tracker._cycle  # noqa: SLF001 - timing the real cycle

    cycle_errors: list[BaseException] = []

    def timed_cycle() -> None:
        polls = len(executor.parse_seconds)
        start = time.perf_counter()
        try:
            inner_cycle()
        except BaseException as exc:
            cycle_errors.append(exc)
            raise
        cycle_seconds.append((time.perf_counter() - start, len(executor.parse_seconds) > polls, len(tracker)))

    tracker._cycle = timed_cycle  # type: ignore[method-assign]  # noqa: SLF001

    t0 = time.perf_counter()
    for i, tid in enumerate(task_ids):
        workdir = root / "anonymous" / "default" / tid
        (workdir / ".fem").mkdir(parents=True)
        job = Job(task=Task(id=tid, command=["true"]), workdir=workdir, native_id=str(first_id + i))
        tracker.track(job)
    setup = time.perf_counter() - t0
    log(f"tracker-scale: {jobs_n} jobs tracked in {setup:.2f}s; running {args.cycles} cycles")
    tracker.start()
    rss_samples = []
    while len(cycle_seconds) < args.cycles:
        if cycle_errors:
            tracker.stop()
            shutil.rmtree(root, ignore_errors=True)
            print(f"RESULT ERROR tracker cycle failed: {cycle_errors[0]!r}")
            return 2
        time.sleep(0.05)
        rss_samples.append(proc_status_kb("self", "VmRSS") / 1024)
    steady = list(cycle_seconds)
    # Then every job ends: markers appear, the tracker must see all of them.
    log("tracker-scale: writing all markers")
    marker = json.dumps({"exit_code": 0, "started": "2026-01-01T00:00:00Z", "finished": "2026-01-01T00:00:01Z",
                         "signal": ""}) + "\n"
    t_markers = time.perf_counter()
    for tid in task_ids:
        fem = root / "anonymous" / "default" / tid / ".fem"
        tmp = fem / "exit_code.tmp"
        tmp.write_text(marker)
        os.replace(tmp, fem / "exit_code")
    t_written = time.perf_counter()
    done = all_final.wait(120)
    t_done = time.perf_counter()
    tracker.stop()
    shutil.rmtree(root, ignore_errors=True)

    poll_cycles = [s for s, polled, _ in steady if polled]
    scan_cycles = [s for s, polled, _ in steady if not polled]
    half = len(steady) // 2
    first_half = [s for s, _, _ in steady[1:half]]
    second_half = [s for s, _, _ in steady[half:]]
    parse = executor.parse_seconds
    hwm = proc_status_kb("self", "VmHWM") / 1024
    rows = [
        ("jobs tracked", f"{jobs_n}"),
        ("squeue lines parsed per poll", f"{len(lines)} ({len(squeue_text) / 1024:.0f} KiB)"),
        ("cycles measured (polled / marker scan only)", f"{len(steady)} ({len(poll_cycles)} / {len(scan_cycles)})"),
        (f"parse time, {len(lines):,}-line squeue: first / p50 / max ms",
         f"{parse[0] * 1e3:.1f} / {pct(parse, .5) * 1e3:.1f} / {max(parse) * 1e3:.1f}"),
        ("cycle time with a poll: p50 / max ms",
         f"{pct(poll_cycles, .5) * 1e3:.1f} / {max(poll_cycles or [float('nan')]) * 1e3:.1f}"),
        ("cycle time, marker scan only: p50 / max ms",
         f"{pct(scan_cycles, .5) * 1e3:.1f} / {max(scan_cycles or [float('nan')]) * 1e3:.1f}"),
        ("cycle time p50, first half / second half ms",
         f"{pct(first_half, .5) * 1e3:.1f} / {pct(second_half, .5) * 1e3:.1f}"),
        ("RSS before jobs / during cycles (min..max) MB",
         f"{rss0:.1f} / {min(rss_samples):.1f}..{max(rss_samples):.1f}"),
        ("peak RSS (VmHWM) MB", f"{hwm:.1f}"),
        ("markers written (s) / all final after (s)",
         f"{t_written - t_markers:.2f} / {t_done - t_markers:.2f}" + ("" if done else f" (ONLY {finals})")),
    ]
    w = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(w)}  {v}")
    p50_parse = pct(parse, .5)
    ok = p50_parse <= TARGET_PARSE_SECONDS and hwm <= TARGET_RSS_MB and done
    print(f"RESULT {'PASS' if ok else 'MISS'} tracker_scale={jobs_n} parse_ms_p50={p50_parse * 1e3:.1f}"
          f"{'' if p50_parse <= TARGET_PARSE_SECONDS else '(MISS)'} "
          f"cycle_ms_p50={pct([s for s, _, _ in steady], .5) * 1e3:.1f} "
          f"peak_rss_mb={hwm:.1f}{'' if hwm <= TARGET_RSS_MB else '(MISS)'} "
          f"all_final_s={t_done - t_markers:.2f}{'' if done else '(MISS)'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=100, help="jobs per phase (default 100)")
    ap.add_argument("--repeat", type=int, default=1, help="run floor and fem this many times, alternating; the "
                    "ratios use the median wall times (default 1)")
    ap.add_argument("--repeat-psij", action="store_true", help="with --repeat, repeat the PSI/J phase too "
                    "(about 32 s each)")
    ap.add_argument("--only", action="append", choices=("floor", "fem", "psij"), help="run only this phase "
                    "(repeatable)")
    ap.add_argument("--partition", default="debug")
    ap.add_argument("--broker", default=os.environ.get("FEM_BENCH_BROKER", BROKER_URL))
    ap.add_argument("--timeout", type=float, default=600, help="per phase, seconds")
    ap.add_argument("--tmp", default=None, help="parent of the temp dir (default: $TMPDIR or /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, work dirs)")
    ap.add_argument("--tracker-scale", type=int, metavar="JOBS", help="the one-tracker mode with JOBS jobs")
    ap.add_argument("--cycles", type=int, default=30, help="tracker-scale: cycles to measure (default 30)")
    ap.add_argument("--poll-seconds", type=float, default=1.0,
                    help="tracker-scale: seconds between polls of the recorded squeue (default 1)")
    args = ap.parse_args(argv)
    if args.tracker_scale:
        return run_tracker_scale(args)
    return run_e2e(args)


if __name__ == "__main__":
    sys.exit(main())
