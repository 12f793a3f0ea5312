"""The researcher's side of a run across several nodes: a plan file (which task goes to which node,
with what env) and the verdict over every node's run (the worst one decides the exit status)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .client import Client, ClientError, Run, Timeout
from .model import Ident, errors_from_validation, parse_task


class NodePlan(BaseModel):
    """What one node of a plan gets: the plan's task with these changes."""

    model_config = ConfigDict(extra="forbid")
    queue: str | None = Field(default=None, min_length=1, max_length=255)  # default: the node name
    env: dict[str, str] = Field(default_factory=dict)  # added to (and overriding) the task's env
    task: dict[str, Any] = Field(default_factory=dict)  # task fields that replace the plan's (e.g. command)


class Plan(BaseModel):
    """A small plan file (YAML or JSON): one task sent to several nodes, with per-node changes.

        task: {id: train-1, command: [python3, client.py]}
        nodes:
          hospital-a: {env: {PARTITION: "0"}}
          hpc-b: {env: {PARTITION: "1"}, task: {executor: slurm}}
    """

    model_config = ConfigDict(extra="forbid")
    task: dict[str, Any] = Field(default_factory=dict)
    nodes: dict[Ident, NodePlan] = Field(min_length=1)

    def tasks(self) -> dict[str, tuple[str, dict[str, Any]]]:
        """node -> (queue, TASK), each task checked against the protocol's TASK model."""
        out: dict[str, tuple[str, dict[str, Any]]] = {}
        problems: list[str] = []
        for node, np in self.nodes.items():
            task = {**self.task, **np.task}
            if np.env:
                task["env"] = {**dict(task.get("env") or {}), **np.env}
            _task, errors = parse_task(task)
            problems += [f"nodes.{node}: {e.field}: {e.message}" for e in errors]
            out[node] = (np.queue or node, task)
        if problems:
            raise PlanError(problems)
        return out


class PlanError(ClientError):
    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


def load_plan(path: str | Path) -> Plan:
    """Read and validate a plan file; PlanError lists every problem by key path."""
    try:
        data = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    except OSError as exc:
        raise PlanError([f"cannot read plan file {path}: {exc.strerror}"]) from None
    except yaml.YAMLError as exc:
        raise PlanError([f"plan file {path} is not valid YAML/JSON: {exc}"]) from None
    try:
        plan = Plan.model_validate(data)
    except ValidationError as exc:
        raise PlanError([f"{e.field.removeprefix('plan.')}: {e.message}"
                         for e in errors_from_validation(exc, prefix="plan")]) from None
    plan.tasks()
    return plan


# Exit status of a multi-node submit: the worst node's. Worst first.
_SEVERITY = ("REJECTED", "NO_ANSWER", "CANCELLED", "FAILED", "COMPLETED")


def outcome(run: Run) -> str:
    """COMPLETED, FAILED, CANCELLED, REJECTED, or NO_ANSWER (timed out, no such queue, broken stream)."""
    if run.result is None:
        return "NO_ANSWER"
    return run.state if run.state in _SEVERITY else "FAILED"


def worst(runs: Iterable[Run]) -> Run | None:
    """The run whose outcome is the worst (its exit status is the whole submit's)."""
    return min(runs, key=lambda r: _SEVERITY.index(outcome(r)), default=None)


def cancel_all(client: Client, targets: Iterable[tuple[str, str]],
               timeout: float = 10.0) -> dict[tuple[str, str], dict[str, Any] | str]:
    """Cancel every (queue, task id) at once and wait at most `timeout` seconds in all for the
    answers: (queue, task id) -> the node's status reply, or why there is none (a string). A node
    that is down costs one timeout, not one per node. Whether a node's first status came back does
    not matter: a cancel of a task the node never saw, or of a final one, is answered and changes
    nothing, and one queued behind its submit is handled after it (the node keeps one task's
    messages in their queue order)."""
    deadline = time.monotonic() + timeout
    answers: dict[tuple[str, str], dict[str, Any] | str] = {}
    asks: dict[tuple[str, str], str] = {}
    for queue, task_id in dict.fromkeys(targets):
        try:
            asks[(queue, task_id)] = client.publish({"fem": 1, "op": "cancel", "task_id": task_id}, queue=queue)
        except ClientError as exc:
            answers[(queue, task_id)] = f"not sent: {exc}"
    for key, corr in asks.items():
        try:
            for _props, body in client.replies(corr, max(0.0, deadline - time.monotonic())):
                answers[key] = json.loads(body)
                break
        except Timeout:
            answers[key] = f"no answer within {timeout:.0f}s (the request stays queued for the node)"
        except (ClientError, ValueError) as exc:
            answers[key] = f"no answer: {exc}"
        finally:
            client.forget(corr)
    return answers
