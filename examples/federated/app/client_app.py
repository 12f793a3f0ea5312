"""The Flower client of one node: trains the global logistic regression on this node's own
partition, evaluates it on a local hold-out, and writes only metrics and weights (never a data
row) into out/.

Environment (set by the driver in the task's env; nothing is inherited from the service):
  FL_SERVER_ADDRESS   host:port of the aggregator (required)
  FL_NODE             this node's name, reported with its metrics
  FL_LOCAL_ITERATIONS solver iterations per round (default 1)
  FL_CONNECT_ATTEMPTS attempts to reach the server, 2 s apart (default 3, as the real clients)
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

import numpy as np
from common import get_params, load_partition, new_model, set_params
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

OUT = Path("out")


def server_reachable(address: str, attempts: int, pause: float = 2.0) -> bool:
    """A plain TCP connect first: Flower's own retry loop logs little, so this is where a client
    that was started before its server listens says so, attempt by attempt."""
    host, _, port = address.rpartition(":")
    for attempt in range(1, attempts + 1):
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
                return True
        except OSError as exc:
            print(f"attempt {attempt}/{attempts}: Flower server {address} not reachable ({exc})", file=sys.stderr,
                  flush=True)
            if attempt < attempts:
                time.sleep(pause)
    return False


def main() -> int:
    address = os.environ.get("FL_SERVER_ADDRESS")
    if not address:
        print("FL_SERVER_ADDRESS is not set (host:port of the Flower server)", file=sys.stderr)
        return 2
    node = os.environ.get("FL_NODE", socket.gethostname())
    iterations = int(os.environ.get("FL_LOCAL_ITERATIONS", "1"))
    attempts = int(os.environ.get("FL_CONNECT_ATTEMPTS", "3"))

    x, y = load_partition()
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    scaler = StandardScaler().fit(x_train)  # local statistics: no data leaves the node, not even its means
    x_train, x_test = scaler.transform(x_train), scaler.transform(x_test)
    model = new_model(iterations)
    rounds: list[dict] = []

    import flwr  # imported late: a missing Flower should not hide the data checks above
    from flwr.client import NumPyClient

    class Client(NumPyClient):
        def get_parameters(self, config):
            return get_params(model)

        def fit(self, parameters, config):
            set_params(model, parameters)
            model.fit(x_train, y_train)
            return get_params(model), len(x_train), {"node": node}

        def evaluate(self, parameters, config):
            set_params(model, parameters)
            proba = model.predict_proba(x_test)
            loss = float(log_loss(y_test, proba, labels=[0, 1]))
            accuracy = float(accuracy_score(y_test, model.predict(x_test)))
            rounds.append({"round": len(rounds) + 1, "loss": loss, "accuracy": accuracy, "n": len(x_test)})
            print(f"{node}: round {len(rounds)} loss {loss:.4f} accuracy {accuracy:.4f}", flush=True)
            return loss, len(x_test), {"node": node, "accuracy": accuracy}

    if not server_reachable(address, attempts):
        print(f"giving up: the Flower server {address} did not answer after {attempts} attempts 2 s apart "
              "(was the client started before its server listens, or is the address unreachable from this node?)",
              file=sys.stderr)
        return 3
    flwr.client.start_client(server_address=address, client=Client().to_client(), insecure=True,
                             max_retries=attempts, max_wait_time=30)
    OUT.mkdir(exist_ok=True)
    coef, intercept = get_params(model)
    np.savez(OUT / "local_model.npz", coef=coef, intercept=intercept)
    marker = Path("/etc/fem-testbed")  # present in the testbed's FL image: says where this ran
    runtime = {"python": sys.version.split()[0], "flwr": flwr.__version__, "hostname": socket.gethostname(),
               "image": marker.read_text().strip() if marker.exists() else None}
    (OUT / "metrics.json").write_text(json.dumps({
        "node": node, "train_examples": len(x_train), "test_examples": len(x_test), "rounds": rounds,
        "runtime": runtime}, indent=2))
    if not rounds:
        print("the server ended the run before this client evaluated any round", file=sys.stderr)
        return 4
    return 0


if __name__ == "__main__":
    sys.exit(main())
