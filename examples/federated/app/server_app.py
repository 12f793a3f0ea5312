"""The Flower aggregator: FedAvg over the clients' logistic-regression weights, for a fixed number
of rounds. It holds no data. It writes into out/:

  global_model.npz   the final global weights (coef, intercept)
  metrics.json       per round: loss and accuracy of every node (evaluated on its own hold-out)
                     and aggregated (weighted by the nodes' hold-out sizes), plus the failures;
                     a round whose evaluations all failed is kept with loss and accuracy null
                     ("evaluated": false, listed in "rounds_not_evaluated"), and training goes on

Environment (set by the driver in the task's env):
  FL_SERVER_ADDRESS  where to listen, host:port (e.g. 127.0.0.1:4433)
  FL_ROUNDS          rounds (default 5)
  FL_MIN_CLIENTS     clients needed to start a round (default 2)
  FL_EXPECTED        comma-separated node names the driver sent a client task to (for the report)
  FL_CONNECT_TIMEOUT seconds to wait for FL_MIN_CLIENTS clients before giving up (default 120)
  FL_ROUND_TIMEOUT   seconds a round waits for its clients (default 120)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import flwr
import numpy as np
from common import zero_params
from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server import ServerConfig, SimpleClientManager
from flwr.server.strategy import FedAvg

OUT = Path("out")


class RecordingFedAvg(FedAvg):
    """FedAvg that keeps every node's evaluation per round and the latest global weights."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.rounds: dict[int, dict] = {}
        self.weights = zero_params()
        self.failures: list[str] = []

    def aggregate_fit(self, server_round, results, failures):
        params, metrics = super().aggregate_fit(server_round, results, failures)
        if params is not None:
            self.weights = parameters_to_ndarrays(params)
        self.failures += [f"round {server_round} fit: {f!r}" for f in failures]
        return params, metrics

    def aggregate_evaluate(self, server_round, results, failures):
        loss, _metrics = super().aggregate_evaluate(server_round, results, failures)
        evaluations = [(str(res.metrics.get("node", proxy.cid if proxy is not None else "?")), res)
                       for proxy, res in results]
        entry = record_round(server_round, loss, evaluations, len(failures))
        self.rounds[server_round] = entry
        self.failures += [f"round {server_round} evaluate: {f!r}" for f in failures]
        print(round_line(entry), flush=True)
        # Flower's metrics are scalars: a round nobody evaluated has no accuracy to give it.
        return loss, ({} if entry["accuracy"] is None else {"accuracy": entry["accuracy"]})


def num(value: float | None, spec: str = ".4f") -> str:
    """A metric as text; a round without evaluation has none (n/a), which must not stop the run."""
    return "n/a" if value is None else format(value, spec)


def record_round(server_round: int, loss: float | None, evaluations: list, failed: int) -> dict:
    """One round of metrics.json from the evaluations that came back, as (node, EvaluateRes).
    A round in which every evaluation failed (or none was run) is kept, with loss and accuracy
    None and `evaluated` false: FedAvg gives no loss then, and an accuracy of 0 would be a lie."""
    nodes = {name: {"loss": float(res.loss), "accuracy": float(res.metrics["accuracy"]), "n": int(res.num_examples)}
             for name, res in evaluations}
    total = sum(n["n"] for n in nodes.values())
    accuracy = sum(n["accuracy"] * n["n"] for n in nodes.values()) / total if total else None
    evaluated = loss is not None and accuracy is not None
    return {"round": server_round, "loss": None if loss is None else float(loss),
            "accuracy": accuracy if evaluated else None, "nodes": nodes, "evaluated": evaluated,
            "failed_evaluations": failed}


def round_line(entry: dict) -> str:
    if not entry["evaluated"]:
        return (f"round {entry['round']}: no evaluation ({entry['failed_evaluations']} failed, "
                f"{len(entry['nodes'])} came back); training goes on")
    return (f"round {entry['round']}: aggregated loss {num(entry['loss'])} accuracy {num(entry['accuracy'])} "
            f"from {', '.join(sorted(entry['nodes']))}")


def metrics_report(strategy: RecordingFedAvg, rounds: int, expected: list[str], seconds: float) -> dict:
    """metrics.json: every configured round, those Flower ran no evaluation for included as such."""
    entries = [strategy.rounds.get(k) or {"round": k, "loss": None, "accuracy": None, "nodes": {}, "evaluated": False,
                                          "failed_evaluations": 0} for k in range(1, rounds + 1)]
    seen = sorted({n for r in entries for n in r["nodes"]})
    return {"rounds": entries, "rounds_not_evaluated": [r["round"] for r in entries if not r["evaluated"]],
            "failures": strategy.failures, "nodes_seen": seen, "nodes_missing": [n for n in expected if n not in seen],
            "seconds": round(seconds, 1), "flwr": flwr.__version__}


def watch_connections(manager: SimpleClientManager, needed: int, timeout: float, expected: list[str]) -> None:
    """Flower waits for clients for a day by default; a batch job must not. Give up, saying so."""
    if manager.wait_for(needed, timeout=int(timeout)):
        return
    print(f"giving up: only {manager.num_available()} of the {needed} clients needed connected within "
          f"{timeout:.0f}s (clients sent to: {', '.join(expected) or 'unknown'})", file=sys.stderr, flush=True)
    os._exit(5)


def main() -> int:
    address = os.environ.get("FL_SERVER_ADDRESS", "127.0.0.1:4433")
    rounds = int(os.environ.get("FL_ROUNDS", "5"))
    min_clients = int(os.environ.get("FL_MIN_CLIENTS", "2"))
    expected = [n for n in os.environ.get("FL_EXPECTED", "").split(",") if n]
    connect_timeout = float(os.environ.get("FL_CONNECT_TIMEOUT", "120"))
    round_timeout = float(os.environ.get("FL_ROUND_TIMEOUT", "120"))

    strategy = RecordingFedAvg(
        fraction_fit=1.0, fraction_evaluate=1.0, min_fit_clients=min_clients, min_evaluate_clients=min_clients,
        min_available_clients=min_clients, initial_parameters=ndarrays_to_parameters(zero_params()))
    manager = SimpleClientManager()
    threading.Thread(target=watch_connections, args=(manager, min_clients, connect_timeout, expected),
                     daemon=True).start()
    t0 = time.monotonic()
    print(f"Flower server listening on {address}: {rounds} rounds, at least {min_clients} clients", flush=True)
    try:
        flwr.server.start_server(server_address=address, config=ServerConfig(num_rounds=rounds,
                                                                             round_timeout=round_timeout),
                                 strategy=strategy, client_manager=manager)
    finally:
        # Whatever ended the training, the rounds recorded so far are the researcher's.
        OUT.mkdir(exist_ok=True)
        coef, intercept = strategy.weights
        np.savez(OUT / "global_model.npz", coef=coef, intercept=intercept)
        report = metrics_report(strategy, rounds, expected, time.monotonic() - t0)
        (OUT / "metrics.json").write_text(json.dumps(report, indent=2))
    if report["rounds_not_evaluated"]:
        print(f"only {rounds - len(report['rounds_not_evaluated'])} of {rounds} rounds were evaluated "
              f"(not evaluated: {', '.join(map(str, report['rounds_not_evaluated']))})", file=sys.stderr)
        return 6
    return 0

if __name__ == "__main__":
    sys.exit(main())
