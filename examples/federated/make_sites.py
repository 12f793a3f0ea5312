#!/usr/bin/env python3
"""Lay out a three-node federation on one machine: site configs, each node's data partition in its
own read-only site volume, and federation.yaml for the driver.

    python examples/federated/make_sites.py --dir /tmp/fl-demo [--suffix=-x1] [--start]

Nodes (names get --suffix, so several federations can share one broker):
  hospital-a  docker executor, the FL test image 127.0.0.1:5000/fem/python-fl:1, host network
  hpc-b       slurm executor: the client is a Slurm batch job (partition debug)
  laptop-c    local executor; also runs the aggregator (the Flower server)

The partitions are scikit-learn's bundled breast-cancer data (569 rows, no download), shuffled
with a fixed seed and dealt out unevenly (40/35/25 %). `--start` also starts the three
`fem-hpc serve` processes in the background (logs and pids in DIR/run/).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
from sklearn.datasets import load_breast_cancer

BROKER = "amqp://guest:guest@127.0.0.1:5672/%2F"
FL_IMAGE = "127.0.0.1:5000/fem/python-fl:1"
SHARES = {"hospital-a": 0.40, "hpc-b": 0.35, "laptop-c": 0.25}
AGGREGATOR = "laptop-c"


def partitions(seed: int = 42) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    data = load_breast_cancer()
    order = np.random.default_rng(seed).permutation(len(data.target))
    x, y = data.data[order], data.target[order]
    out, start = {}, 0
    names = list(SHARES)
    for i, name in enumerate(names):
        end = len(y) if i == len(names) - 1 else start + round(SHARES[name] * len(y))
        out[name] = (x[start:end], y[start:end])
        start = end
    return out


def write_partition(directory: Path, x: np.ndarray, y: np.ndarray) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "partition.csv"
    if path.exists():
        path.chmod(0o644)
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    np.savetxt(path, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
    # Read-only for everyone, readable by the container's unprivileged user.
    path.chmod(0o444)
    directory.chmod(0o555)


def site_config(name: str, kind: str, base: Path, broker: str) -> dict:
    cfg: dict = {
        "node": name,
        "broker": {"url": broker, "heartbeat": 30, "reconnect_max_seconds": 5},
        "state_dir": str(base / "state" / name),
        "work_root": str(base / "work" / name),
        "default_executor": kind,
        "volumes": {"fl-data": {"path": str(base / "data" / name), "mode": "ro"}},
        "policy": {"git": ["file://*"], "images": ["127.0.0.1:5000/fem/*"],
                   "max_resources": {"cpus": 2, "memory": "4G", "walltime": "01:00:00"},
                   "default_resources": {"cpus": 1, "memory": "1G", "walltime": "00:20:00"}},
        "stage_out": {"max_bytes": 10 * 1024 * 1024},
    }
    if kind == "docker":
        # The Flower server listens on loopback; host networking lets the container reach it.
        # A site whose server is elsewhere would use a bridge network (network: bridge) instead.
        cfg["executors"] = {"docker": {"network": "host", "allow_host_network": True, "stop_grace_seconds": 5}}
    elif kind == "slurm":
        cfg["executors"] = {"slurm": {"partition": "debug", "poll": {"min_seconds": 1, "max_seconds": 5}}}
    else:
        cfg["executors"] = {"local": {"kill_grace_seconds": 5}}
    return cfg


def make(base: Path, suffix: str, python: str, broker: str) -> dict:
    base = base.resolve()
    kinds = {"hospital-a": "docker", "hpc-b": "slurm", "laptop-c": "local"}
    nodes = []
    for short, (x, y) in partitions().items():
        name = f"{short}{suffix}"
        write_partition(base / "data" / name, x, y)
        (base / "sites").mkdir(parents=True, exist_ok=True)
        (base / "sites" / f"{name}.yaml").write_text(yaml.safe_dump(site_config(name, kinds[short], base, broker)))
        entry = {"name": name, "executor": kinds[short], "rows": int(len(y))}
        if kinds[short] == "docker":
            entry["image"], entry["python"] = FL_IMAGE, "python3"
        else:
            entry["python"] = python  # a plain process: an interpreter of this machine with `.[fl]`
        nodes.append(entry)
    # Where the Flower server listens (bind) and where the clients dial (host). Port 0: the driver
    # picks a free one, which only works when the driver runs on the aggregator's machine; a real
    # federation names a port its firewall opens and the aggregator's public address as host.
    server = {"bind": "127.0.0.1", "host": "127.0.0.1", "port": 0}
    federation = {"broker": broker, "aggregator": f"{AGGREGATOR}{suffix}", "server": server, "nodes": nodes}
    (base / "federation.yaml").write_text(yaml.safe_dump(federation, sort_keys=False))
    return federation


def start(base: Path, federation: dict) -> None:
    run = base / "run"
    run.mkdir(exist_ok=True)
    fem_hpc = Path(sys.executable).parent / "fem-hpc"
    for node in federation["nodes"]:
        name = node["name"]
        log = open(run / f"{name}.log", "ab")  # noqa: SIM115 - handed to the service
        proc = subprocess.Popen([str(fem_hpc), "serve", "--config", str(base / "sites" / f"{name}.yaml")],
                                stdout=log, stderr=log, start_new_session=True)
        (run / f"{name}.pid").write_text(f"{proc.pid}\n")
        print(f"started fem-hpc serve for {name} (pid {proc.pid}, log {run / f'{name}.log'})")
    deadline = time.monotonic() + 60
    for node in federation["nodes"]:
        log = run / f"{node['name']}.log"
        while "consuming queue" not in log.read_text(errors="replace"):
            if time.monotonic() > deadline:
                raise SystemExit(f"{node['name']} did not start consuming; see {log}")
            time.sleep(0.2)
    print("all three nodes are consuming their queues; stop them with: kill $(cat " + str(run) + "/*.pid)")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, type=Path, help="where the federation lives")
    p.add_argument("--suffix", default="", help="appended to every node name (e.g. -$USER)")
    p.add_argument("--python", default=sys.executable,
                   help="the interpreter (with flwr, numpy, scikit-learn) for the slurm and local nodes")
    p.add_argument("--broker", default=os.environ.get("FEM_HPC_BROKER_URL", BROKER))
    p.add_argument("--start", action="store_true", help="start the three fem-hpc serve processes")
    args = p.parse_args()
    federation = make(args.dir, args.suffix, args.python, args.broker)
    print(f"wrote {args.dir}/federation.yaml, sites/ and data/ for: "
          + ", ".join(f"{n['name']} ({n['executor']}, {n['rows']} rows)" for n in federation["nodes"]))
    if args.start:
        start(args.dir.resolve(), federation)
    return 0


if __name__ == "__main__":
    sys.exit(main())
