"""The federated example's metrics when a round has no evaluation (every client's evaluation
failed): FedAvg gives no loss then. The server records the round as not evaluated and trains on,
writes metrics.json, and the driver's summary and plot name the round instead of failing on it.

No broker, no fem-hpc node: the example's real server_app.py and a real Flower client, both
processes on loopback (about 10 s)."""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "federated"
APP = EXAMPLE / "app"
NEEDS = ("flwr", "sklearn", "matplotlib")

# A real Flower client (flwr's low-level Client API, so a failed evaluation is reported to the
# server as a non-OK status and the client lives on, as a node whose evaluation broke would).
CLIENT = """
import os, sys
sys.path.insert(0, os.environ["APP_DIR"])
import flwr
from flwr.client import Client
from flwr.common import Code, EvaluateRes, FitRes, GetParametersRes, Status, ndarrays_to_parameters
from common import zero_params

FAIL = {int(r) for r in os.environ["FAIL_ROUNDS"].split(",") if r}
calls = []

class Failing(Client):
    def get_parameters(self, ins):
        return GetParametersRes(status=Status(Code.OK, ""), parameters=ndarrays_to_parameters(zero_params()))

    def fit(self, ins):
        return FitRes(status=Status(Code.OK, ""), parameters=ins.parameters, num_examples=10, metrics={})

    def evaluate(self, ins):
        calls.append(1)
        if len(calls) in FAIL:
            return EvaluateRes(status=Status(Code.EVALUATE_NOT_IMPLEMENTED, "evaluation broke"), loss=0.0,
                               num_examples=0, metrics={})
        return EvaluateRes(status=Status(Code.OK, ""), loss=1.0 / len(calls), num_examples=10,
                           metrics={"node": os.environ["FL_NODE"], "accuracy": 0.5 + 0.1 * len(calls)})

flwr.client.start_client(server_address=os.environ["FL_SERVER_ADDRESS"], client=Failing(), insecure=True,
                         max_retries=5, max_wait_time=30)
print("evaluations asked:", len(calls))
"""


def _require_fl() -> None:
    missing = [m for m in NEEDS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{missing} not installed: pip install '.[fl]'")


def _module(directory: Path, name: str):
    sys.path.insert(0, str(directory))
    try:
        spec = importlib.util.spec_from_file_location(f"fl_example_{name}", directory / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(directory))


def test_a_round_whose_evaluations_all_failed_is_recorded_not_fatal(capsys):
    _require_fl()
    server_app = _module(APP, "server_app")
    strategy = server_app.RecordingFedAvg(min_fit_clients=1, min_evaluate_clients=1, min_available_clients=1)
    # Flower's own FedAvg: no result, one failure -> loss None (the TypeError of `loss:.4f` before).
    loss, metrics = strategy.aggregate_evaluate(2, [], [RuntimeError("evaluation broke")])
    assert loss is None and metrics == {}
    entry = strategy.rounds[2]
    assert entry == {"round": 2, "loss": None, "accuracy": None, "nodes": {}, "evaluated": False,
                     "failed_evaluations": 1}
    assert "round 2: no evaluation (1 failed, 0 came back); training goes on" in capsys.readouterr().out
    report = server_app.metrics_report(strategy, 3, ["a"], 1.0)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]  # a round Flower ran no evaluation for is listed
    assert report["rounds_not_evaluated"] == [1, 2, 3] and report["nodes_missing"] == ["a"]
    json.dumps(report)  # metrics.json can be written

    driver = _module(EXAMPLE, "driver")
    assert driver.global_lines(report)[0] == "no round was evaluated: no plot"
    assert driver.num(None) == "n/a" and driver.num(0.96123) == "0.9612"


@pytest.mark.slow
def test_the_server_trains_on_past_a_round_without_evaluation(tmp_path):
    _require_fl()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1",
           "FL_SERVER_ADDRESS": f"127.0.0.1:{port}", "FL_ROUNDS": "3",
           "FL_MIN_CLIENTS": "1", "FL_EXPECTED": "t1", "FL_CONNECT_TIMEOUT": "60",
           "FL_ROUND_TIMEOUT": "60", "APP_DIR": str(APP), "FL_NODE": "t1", "FAIL_ROUNDS": "2"}
    (tmp_path / "client.py").write_text(CLIENT)
    server = subprocess.Popen([sys.executable, str(APP / "server_app.py")], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while True:  # the client dials only once the server listens
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.3).close()
                break
            except OSError:
                assert server.poll() is None and time.monotonic() < deadline, "the server did not listen"
                time.sleep(0.2)
        client = subprocess.run([sys.executable, str(tmp_path / "client.py")], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=120)
        out, err = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert client.returncode == 0 and "evaluations asked: 3" in client.stdout, client.stdout + client.stderr
    # Rounds 1 and 3 evaluated; round 2 recorded as such; the exit status says not every round was.
    assert server.returncode == 6, out + err
    assert "round 2: no evaluation (1 failed, 0 came back); training goes on" in out, out
    assert "round 3: aggregated loss 0.3333 accuracy 0.8000 from t1" in out, out
    assert "only 2 of 3 rounds were evaluated (not evaluated: 2)" in err, err
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert [(r["round"], r["evaluated"], r["loss"]) for r in metrics["rounds"]] == \
        [(1, True, 1.0), (2, False, None), (3, True, pytest.approx(1 / 3))]
    assert metrics["rounds_not_evaluated"] == [2] and metrics["nodes_missing"] == []
    assert "round 2 evaluate" in metrics["failures"][0]
    assert (tmp_path / "out" / "global_model.npz").stat().st_size > 0

    # The driver's summary and plot take the gap.
    driver = _module(EXAMPLE, "driver")
    lines = driver.global_lines(metrics)
    assert lines[0] == "global model after round 3: accuracy 0.8000, loss 0.3333 (weighted over t1)"
    assert lines[1] == "rounds without evaluation (every client's evaluation failed or none ran): 2 of 3"
    driver.plot(metrics, tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
