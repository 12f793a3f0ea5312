"""What the server and the clients share: the model (logistic regression), its parameters as
numpy arrays, and how a node reads its own partition.

A node's partition is a CSV file `partition.csv` (30 features, then the label) in the node's
read-only site volume `fl-data`. The task finds the volume through `FEM_VOLUME_FL_DATA`, which
fem-hpc sets for every executor: the mount target in a container, the host path for a plain
process (local executor, Slurm job without an image).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

N_FEATURES = 30  # scikit-learn's breast-cancer data
CLASSES = np.array([0, 1])

# One round of local training is a few solver iterations from the global model: the solver does
# not converge in that budget on purpose (FedAvg does the rest), so its warning is noise.
warnings.filterwarnings("ignore", category=ConvergenceWarning)


def data_dir() -> Path:
    where = os.environ.get("FEM_VOLUME_FL_DATA")
    if not where:
        raise SystemExit("FEM_VOLUME_FL_DATA is not set: the task must ask for the site volume 'fl-data'")
    return Path(where)


def load_partition() -> tuple[np.ndarray, np.ndarray]:
    path = data_dir() / "partition.csv"
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
    except OSError as exc:
        raise SystemExit(f"cannot read this node's partition {path}: {exc}") from None
    return table[:, :-1], table[:, -1].astype(int)


def new_model(local_iterations: int) -> LogisticRegression:
    model = LogisticRegression(max_iter=local_iterations, warm_start=True, C=1.0)
    set_params(model, zero_params())
    return model


def zero_params() -> list[np.ndarray]:
    return [np.zeros((1, N_FEATURES)), np.zeros(1)]


def get_params(model: LogisticRegression) -> list[np.ndarray]:
    return [model.coef_.copy(), model.intercept_.copy()]


def set_params(model: LogisticRegression, params: list[np.ndarray]) -> None:
    model.coef_ = np.array(params[0], dtype=float).reshape(1, N_FEATURES)
    model.intercept_ = np.array(params[1], dtype=float).reshape(1)
    model.classes_ = CLASSES
