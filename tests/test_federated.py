"""The federated example end to end (examples/federated): a real Flower run across three real
`fem-hpc serve` nodes on the real broker: hospital-a (docker, the testbed's FL image), hpc-b
(Slurm: the client is a batch job) and laptop-c (local, also the aggregator). Then the failure
behaviour: a client started before its server listens, and a node whose queue has no service."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pika
import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node

from fem_hpc.client import Client

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slurm, pytest.mark.docker, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "federated"


def _require_fl() -> None:
    for service in ("rabbitmq", "slurm", "docker", "registry", "fl-image"):
        services.require(service)
    missing = [m for m in ("flwr", "sklearn", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        message = f"{missing} not installed: pip install '.[fl]' (scripts/test does)"
        if services.in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _example_module(name: str):
    sys.path.insert(0, str(EXAMPLE))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(EXAMPLE))


def _make_sites(base: Path) -> dict:
    return _example_module("make_sites").make(base, f"-{unique_node('')[1:]}", sys.executable, BROKER_URL)


def _serve(base: Path, name: str) -> ServeProcess:
    import yaml

    (base / "serve" / name).mkdir(parents=True, exist_ok=True)
    s = ServeProcess(base / "serve" / name, name)
    s.config = yaml.safe_load((base / "sites" / f"{name}.yaml").read_text())  # the example's own site config
    return s.start()


def _driver(base: Path, *args: str, timeout: float = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(EXAMPLE / "driver.py"), "--dir", str(base), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _latest_run(base: Path) -> Path:
    return max((base / "results").iterdir(), key=lambda p: p.stat().st_mtime)


def test_federated_training_across_docker_slurm_and_local_nodes(tmp_path):
    _require_fl()
    import numpy as np  # the fl extra

    t0 = time.monotonic()
    fed = _make_sites(tmp_path)
    nodes = {n["executor"]: n["name"] for n in fed["nodes"]}
    serves = [_serve(tmp_path, n["name"]) for n in fed["nodes"]]
    try:
        out = _driver(tmp_path, "--rounds", "5", "--timeout", "180")
    finally:
        for s in serves:
            s.stop()
    took = time.monotonic() - t0
    assert out.returncode == 0, out.stdout + out.stderr
    results = _latest_run(tmp_path)
    run = json.loads((results / "run.json").read_text())
    assert run["server"]["state"] == "COMPLETED"
    assert {n: c["state"] for n, c in run["clients"].items()} == {n["name"]: "COMPLETED" for n in fed["nodes"]}
    assert run["missing"] == []

    # hpc-b's client was a real Slurm job; hospital-a's a container of the FL image.
    slurm_id = run["clients"][nodes["slurm"]]["native_id"]
    assert re.fullmatch(r"[0-9]+", slurm_id), slurm_id
    deadline = time.monotonic() + 60  # the batch job may still be completing when the marker is read
    while True:
        job = subprocess.run(["scontrol", "show", "job", slurm_id], capture_output=True, text=True, timeout=30)
        assert job.returncode == 0 and "JobName=fem-fl-client-" in job.stdout, job.stdout + job.stderr
        if "JobState=COMPLETED" in job.stdout or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "JobState=COMPLETED" in job.stdout, job.stdout
    assert re.fullmatch(r"[0-9a-f]{64}", run["clients"][nodes["docker"]]["native_id"])
    runtimes = {n: json.loads((results / n / "outputs/out/metrics.json").read_text())["runtime"]
                for n in run["clients"]}
    assert "python-fl image" in (runtimes[nodes["docker"]]["image"] or "")
    assert runtimes[nodes["slurm"]]["image"] is None and runtimes[nodes["local"]]["image"] is None
    assert {r["flwr"] for r in runtimes.values()} == {"1.42.0"}

    # The global model beats a fixed threshold on the nodes' own hold-outs, every node in every round.
    metrics = json.loads((results / "server/outputs/out/metrics.json").read_text())
    assert len(metrics["rounds"]) == 5
    assert all(set(r["nodes"]) == set(run["clients"]) for r in metrics["rounds"])
    assert metrics["rounds"][-1]["accuracy"] > 0.9
    model = np.load(results / "server/outputs/out/global_model.npz")
    assert model["coef"].shape == (1, 30) and model["intercept"].shape == (1,)

    # Each client's outputs hold metrics and weights, and none of its data rows.
    for name in run["clients"]:
        rows = (tmp_path / "data" / name / "partition.csv").read_text().splitlines()[1:]
        files = [p for p in (results / name).rglob("*") if p.is_file()]
        assert {p.name for p in files} >= {"metrics.json", "local_model.npz"}
        for path in files:
            blob = path.read_bytes()
            # A whole row, or its first three values as written (specific enough never to occur by chance).
            leaked = [r for r in rows if r.encode() in blob or ",".join(r.split(",")[:3]).encode() in blob]
            assert not leaked, f"{path} contains data rows of {name}: {leaked[:2]}"
        local = np.load(results / name / "outputs/out/local_model.npz")
        assert sorted(local.files) == ["coef", "intercept"] and local["coef"].shape == (1, 30)

    png = (results / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")
    assert width > 400 and height > 200
    summary = (results / "summary.txt").read_text()
    assert "global model after round 5" in summary and summary in out.stdout
    assert took < 240, f"the whole example took {took:.0f}s"


def test_fl_failures_are_reported_by_name(tmp_path):
    """A client started before its server listens says so and fails; a node whose queue has no
    service leaves the round to the others, and the report names it, in bounded time."""
    _require_fl()
    fed = _make_sites(tmp_path)
    by_kind = {n["executor"]: n for n in fed["nodes"]}
    down = by_kind["docker"]["name"]
    # The down node's queue exists (it ran before) but no service consumes it.
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    conn.channel().queue_declare(down, durable=True)
    conn.close()
    serves = [_serve(tmp_path, n["name"]) for n in fed["nodes"] if n["name"] != down]
    try:
        # The client app as the driver would send it, but to an address where nothing listens.
        driver = _example_module("driver")
        url, commit = driver.commit_app(tmp_path)
        local = by_kind["local"]
        task = driver.task_for("client", "early", local, {"git": url, "commit": commit},
                               {"FL_SERVER_ADDRESS": f"127.0.0.1:{driver.free_port()}", "FL_NODE": local["name"]},
                               "00:05:00")
        t0 = time.monotonic()
        with Client(BROKER_URL, local["name"]) as c:
            result = c.submit(task, timeout=60)
        assert result.state == "FAILED" and result.exit_code == 3, result.result
        assert "did not answer after 3 attempts" in result.result["stderr_tail"]
        assert result.result["stderr_tail"].count("not reachable") == 3
        assert time.monotonic() - t0 < 45

        t0 = time.monotonic()
        out = _driver(tmp_path, "--min-clients", "2", "--grace", "5", "--connect-timeout", "60", "--timeout", "150")
        took = time.monotonic() - t0
    finally:
        for s in serves:
            s.stop()
        conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
        conn.channel().queue_delete(down)
        conn.close()
    assert out.returncode == 1, out.stdout + out.stderr
    run = json.loads((_latest_run(tmp_path) / "run.json").read_text())
    assert run["server"]["state"] == "COMPLETED"
    assert run["missing"] == [down]
    assert run["clients"][down]["state"] == "NO_ANSWER"
    assert "never received the task" in run["clients"][down]["error"]
    assert f"missing nodes (no completed client): {down}" in out.stdout
    assert set(run["final"]["nodes"]) == {n["name"] for n in fed["nodes"]} - {down}
    # The down node's request may still be taken later: the driver cancels it too (only it: the
    # others have their results), and does not wait for the down node longer than its cancel timeout.
    assert "cancelling 1 task(s) without a result" in out.stderr, out.stderr
    assert re.search(rf"{down}/fl-client-\S+: cancel not confirmed \(no answer within 10s", out.stderr), out.stderr
    assert took < 120, f"the run with a node down took {took:.0f}s"


def _readme_commands() -> list[str]:
    """The shell lines of the example README's "Run it" block, as a researcher would paste them."""
    text = (EXAMPLE / "README.md").read_text()
    block = re.search(r"## Run it[^\n]*\n+```sh\n(.*?)```", text, re.S)
    assert block, "examples/federated/README.md has no 'Run it' sh block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_commands_as_written(tmp_path):
    """The example README's two commands, run as written (the venv's python, a demo dir and a suffix
    of this test's own, so it shares the broker with nobody); pip install is the suite's own."""
    _require_fl()
    lines = _readme_commands()
    assert len(lines) == 2, lines
    demo, suffix = tmp_path / "fl-demo", f"-{unique_node('')[1:]}"
    argvs = []
    for line in lines:
        words = shlex.split(line.split("&&")[-1].replace("/tmp/fl-demo", str(demo)))
        assert words[0] == ".venv/bin/python", line
        argvs.append([sys.executable, *words[1:]])
    make, drive = argvs
    assert make[1:2] == ["examples/federated/make_sites.py"] and "--start" in make
    assert drive[1:2] == ["examples/federated/driver.py"]
    try:
        made = subprocess.run([*make, f"--suffix={suffix}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
        assert made.returncode == 0, made.stdout + made.stderr
        assert "all three nodes are consuming their queues" in made.stdout
        out = subprocess.run([*drive, "--timeout", "180"], capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert out.returncode == 0, out.stdout + out.stderr
        clients = [ln for ln in out.stdout.splitlines() if ln.startswith("  ")]
        assert len(clients) == 3 and all(" COMPLETED " in ln for ln in clients), out.stdout
        run = _latest_run(demo)
        assert (run / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        for pid_file in (demo / "run").glob("*.pid"):
            try:
                os.killpg(int(pid_file.read_text()), signal.SIGTERM)  # started in a session of its own
            except (ProcessLookupError, ValueError):
                pass
