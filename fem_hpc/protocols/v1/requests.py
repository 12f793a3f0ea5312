"""Protocol v1 requests: decode one message body into an operation, or the list of what is wrong."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from ...model import ID_PATTERN, PROTOCOL_VERSION, FieldError

OPS = ("submit", "cancel", "status", "health")
_ALLOWED = {"submit": {"fem", "op", "task"}, "cancel": {"fem", "op", "task_id"},
            "status": {"fem", "op", "task_id"}, "health": {"fem", "op"}}


@dataclass
class Request:
    op: str
    task: Any = None  # the raw TASK object (validated by the agent)
    task_id: str | None = None


@dataclass
class Invalid:
    errors: list[FieldError]
    task_id: str | None = None  # when one could be read, so the REJECTED result can be routed
    labels: dict[str, str] = field(default_factory=dict)
    reason: str = "invalid request"


def is_v1(body: bytes) -> bool:
    return body[:1] == b"{"


def order_key(body: bytes, max_bytes: int) -> str | None:
    """The task a v1 body is about (a submit's task.id, a cancel's or status's task_id), so the
    consumer handles the messages of one task in their queue order; None when it names none."""
    if len(body) > max_bytes or not is_v1(body):
        return None
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(data, dict):
        return None
    task = data.get("task")
    task_id = task.get("id") if isinstance(task, dict) else data.get("task_id")
    return task_id if isinstance(task_id, str) and re.fullmatch(ID_PATTERN, task_id) else None


def decode(body: bytes, max_bytes: int) -> Request | Invalid:
    if len(body) > max_bytes:  # not parsed at all: size alone decides
        return Invalid([FieldError(field="body", message=f"{len(body)} bytes is over the limit of {max_bytes}")],
                       reason="too large")
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Invalid([FieldError(field="body", message=f"not valid JSON: {exc}")], reason="not JSON")
    if not isinstance(data, dict):
        return Invalid([FieldError(field="body", message=f"must be a JSON object, not {type(data).__name__}")],
                       reason="not an object")
    task = data.get("task")
    task_id = data.get("task_id")
    if isinstance(task, dict):
        task_id = task.get("id")
    if not (isinstance(task_id, str) and re.fullmatch(ID_PATTERN, task_id)):
        task_id = None
    labels = task.get("labels") if isinstance(task, dict) and isinstance(task.get("labels"), dict) else {}
    errors: list[FieldError] = []
    if data.get("fem") != PROTOCOL_VERSION or isinstance(data.get("fem"), bool):
        errors.append(FieldError(field="fem", message=f"protocol version must be {PROTOCOL_VERSION}, "
                                 f"got {data.get('fem')!r}"))
    op = data.get("op")
    if op not in OPS:
        errors.append(FieldError(field="op", message=f"unknown op {op!r} (expected one of {', '.join(OPS)})"))
        return Invalid(errors, task_id, labels, reason="unknown op")
    for key in sorted(set(data) - _ALLOWED[op]):
        errors.append(FieldError(field=key, message=f"unknown field for op {op!r}"))
    if op == "submit" and "task" not in data:
        errors.append(FieldError(field="task", message="required for op 'submit'"))
    if op in ("cancel", "status"):
        raw = data.get("task_id")
        if not (isinstance(raw, str) and re.fullmatch(ID_PATTERN, raw)):
            errors.append(FieldError(field="task_id", message=f"must match {ID_PATTERN}, got {raw!r}"))
    if errors:
        return Invalid(errors, task_id, labels)
    return Request(op=op, task=task, task_id=data.get("task_id"))
