"""The legacy frontend: a legacy task's events go to the topic exchange as v1 events (for fem.events
subscribers), and its `submit_run` reply is framed here, as outbox rows of the transition it
reports (the final one, or SUBMITTED when `legacy.submit_waits` is false). A legacy reply queue
never gets a v1 frame: a legacy orchestrator reads every message with its correlation id as a
reply frame."""

from __future__ import annotations

from typing import Any

from ...config import LegacyConfig
from ...journal import Message, Route
from ...lifecycle.ports import TaskEvent, TaskView
from ...model import ResultEvent, State, StatusEvent
from ..v1.frontend import V1Frontend
from .codec import encode_reply
from .replies import submit_reply

PROTOCOL = "legacy"


def reply_messages(route: Route, payload: dict[str, Any], chunk_size: int) -> list[Message]:
    """A legacy reply as its chunk_start + chunk messages to the requester's queue."""
    if not route.reply_to:
        return []
    props = {"content_type": "application/json", "correlation_id": route.correlation_id}
    return [Message([("", route.reply_to)], props, body=body) for body in encode_reply(payload, chunk_size)]


def submit_payload(node: str, view: TaskView, result: ResultEvent | None, message: str | None) -> dict[str, Any]:
    """The submit_run reply of a task: final when `result` is given, else "submitted"."""
    task, labels = view.task, view.task.labels
    final = result is not None
    outputs = None
    if result is not None and result.outputs is not None:
        outputs = {"workdir": str(view.workdir), "files": task.outputs, "size": result.outputs.size,
                   "sha256": result.outputs.sha256}
    status = "success" if result is None or result.state == State.COMPLETED else "error"
    payload = submit_reply(
        execution_id=labels.get("legacy_execution_id", task.execution), tool_id=labels.get("legacy_tool_id", ""),
        task_id=task.id, user_id=task.user_id, node=node, exit_code=result.exit_code if final else None,
        native_id=view.native_id or (result.native_id if result is not None else None), outputs=outputs,
        status=status, return_code=result.exit_code if final else None,
        starting_time=result.started if final else None, finish_time=result.finished if final else None,
        message=message if final else "submitted")
    if result is not None:
        payload["state"] = result.state.value
        payload["stdout"] = result.stdout_tail
        payload["stderr"] = result.stderr_tail
    return payload


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
