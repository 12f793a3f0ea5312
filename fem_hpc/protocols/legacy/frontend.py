"""The legacy frontend: a legacy task's events go to the topic exchange as v1 events (for fem.events
subscribers), and its `submit_run` reply is framed here, as outbox rows of the transition it
reports (the final one, or SUBMITTED when `legacy.submit_waits` is false). A legacy reply queue
never gets a v1 frame: a legacy orchestrator reads every message with its correlation id as a
reply frame."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ...config import LegacyConfig
from ...journal import Message, Route
from ...layout import FEM_DIR
from ...lifecycle.ports import TaskEvent, TaskView
from ...model import ResultEvent, State, StatusEvent
from ..v1.frontend import V1Frontend
from .codec import encode_reply
from .result import MAX_SCAN_CHARS, FemFields, ReplyIds, command_result, reply_body

PROTOCOL = "legacy"


def reply_messages(route: Route, payload: dict[str, Any], chunk_size: int) -> list[Message]:
    """A legacy reply as its chunk_start + chunk messages to the requester's queue."""
    if not route.reply_to:
        return []
    props = {"content_type": "application/json", "correlation_id": route.correlation_id}
    return [Message([("", route.reply_to)], props, body=body) for body in encode_reply(payload, chunk_size)]


def read_stdout(workdir: Path, limit: int = MAX_SCAN_CHARS) -> str:
    """The end of a task's `.fem/stdout` (at most `limit` bytes; '' when it never ran): what the
    reply's `result` is read from, whole rather than the result event's short tail, so a long JSON
    the command printed is not cut."""
    try:
        with open(workdir / FEM_DIR / "stdout", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - limit))
            data = f.read(limit)
    except OSError:
        return ""
    return data.decode("utf-8", "replace")


def submit_payload(node: str, view: TaskView, result: ResultEvent | None, message: str | None) -> dict[str, Any]:
    """The submit_run reply of a task in the original client's shape (.result): final when `result`
    is given (`result` = the JSON object the command printed, else its stdout tail), else the
    "submitted" answer of `legacy.submit_waits: false`. fem-hpc's own fields go under `fem_hpc`."""
    task, labels = view.task, view.task.labels
    ids = ReplyIds(execution_id=labels.get("legacy_execution_id", task.execution),
                   tool_id=labels.get("legacy_tool_id", ""), task_id=labels.get("legacy_id", task.id),
                   user_id=labels.get("legacy_user_id", task.user_id), node=node)
    native_id = view.native_id or (result.native_id if result is not None else None)
    note = labels.get("legacy_ports_note")
    ports = [f"{p.host_port}->{p.container_port}/{p.protocol}" for p in task.ports] or None
    if result is None:
        fem = FemFields(task_id=task.id, native_id=native_id, state=State.SUBMITTED.value, message="submitted",
                        ports=ports, ports_note=note)
        return reply_body(ids, result={}, status="success", return_code=None, started=None, finished=None, fem=fem)
    outputs = None
    if result.outputs is not None:
        outputs = {"workdir": str(view.workdir), "files": task.outputs, "size": result.outputs.size,
                   "sha256": result.outputs.sha256}
    fem = FemFields(task_id=task.id, native_id=native_id, state=result.state.value, outputs=outputs,
                    message=message, stderr_tail=result.stderr_tail or None, ports=ports, ports_note=note)
    ok = result.state == State.COMPLETED and result.exit_code == 0
    return reply_body(ids, result=command_result(read_stdout(view.workdir)), status="success" if ok else "error",
                      return_code=result.exit_code, started=result.started, finished=result.finished, fem=fem)


class LegacyFrontend:
    def __init__(self, node: str, exchange: str, cfg: LegacyConfig):
        self.node = node
        self.cfg = cfg
        self.topic = V1Frontend(node, exchange, reply=False)

    def messages(self, view: TaskView | None, event: TaskEvent, *, to: Route | None = None,
                 note: str | None = None) -> list[Message]:
        out = self.topic.messages(view, event, to=to, note=note)
        if view is None:
            return out
        target = to if to is not None else view.route
        answered_at_submit = not self.cfg.submit_waits and view.native_id is not None and to is None
        if isinstance(event, StatusEvent) and to is None and event.state == State.SUBMITTED \
                and not self.cfg.submit_waits:
            out += reply_messages(target, submit_payload(self.node, view, None, note), self.cfg.reply_chunk_size)
        elif isinstance(event, ResultEvent) and not answered_at_submit:
            out += reply_messages(target, submit_payload(self.node, view, event, note), self.cfg.reply_chunk_size)
        return out
