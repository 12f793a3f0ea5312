"""Protocol v1 routing: every event goes to the topic exchange as `<node>.<task_id>.<type>`, and
to the requester's `reply_to` (the submitter's for the task's own events, the asker's for an
answer), with the AMQP properties PROTOCOL.md names."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from ...journal import Message, Route
from ...lifecycle.ports import Chunk, TaskEvent, TaskView

JSON = "application/json"
PROTOCOL = "v1"


def destinations(node: str, exchange: str, task_id: str, kind: str, reply_to: str | None) -> list[tuple[str, str]]:
    """The topic exchange as <node>.<task_id>.<type> (when there is a task id), and reply_to if given."""
    out = [(exchange, f"{node}.{task_id}.{kind}")] if task_id else []
    if reply_to:
        out.append(("", reply_to))
    return out


def event_message(node: str, exchange: str, event: BaseModel, reply_to: str | None,
                  correlation_id: str | None) -> Message:
    data: dict[str, Any] = event.model_dump(mode="json")
    kind, task_id, seq = data["type"], data["task_id"], data["seq"]
    props: dict[str, Any] = {
        "content_type": JSON,
        "type": kind,
        "message_id": f"{node}.{task_id}.{seq}",
        "headers": {"fem": 1, "task_id": task_id, "seq": seq},
    }
    if correlation_id:
        props["correlation_id"] = correlation_id
    body = json.dumps(data, separators=(",", ":")).encode()
    return Message(destinations(node, exchange, task_id, kind, reply_to), props, body=body)


def chunk_message(node: str, exchange: str, chunk: Chunk, reply_to: str | None,
                  correlation_id: str | None) -> Message:
    props: dict[str, Any] = {
        "content_type": "application/octet-stream",
        "type": "chunk",
        "message_id": f"{node}.{chunk.task_id}.{chunk.seq}",
        "headers": {"fem": 1, "task_id": chunk.task_id, "seq": chunk.seq, "index": chunk.index,
                    "total": chunk.total, "sha256": chunk.sha256},
    }
    if correlation_id:
        props["correlation_id"] = correlation_id
    return Message(destinations(node, exchange, chunk.task_id, "chunk", reply_to), props, file_ref=chunk.file_ref)


class V1Frontend:
    """The v1 frontend. `reply=False` gives the topic-exchange copy only (what another protocol's
    tasks publish for fem.events subscribers)."""

    def __init__(self, node: str, exchange: str, *, reply: bool = True):
        self.node = node
        self.exchange = exchange
        self.reply = reply

    def messages(self, view: TaskView | None, event: TaskEvent, *, to: Route | None = None,
                 note: str | None = None) -> list[Message]:
        target = to if to is not None else (view.route if view is not None else None)
        reply_to = target.reply_to if self.reply and target is not None else None
        correlation_id = target.correlation_id if target is not None else None
        if isinstance(event, Chunk):
            msg = chunk_message(self.node, self.exchange, event, reply_to, correlation_id)
        else:
            msg = event_message(self.node, self.exchange, event, reply_to, correlation_id)
        return [msg] if msg.destinations else []
