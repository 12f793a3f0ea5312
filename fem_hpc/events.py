"""Turning events into outbox messages: where each event goes and with which AMQP properties."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from .journal import Message

JSON = "application/json"


def destinations(node: str, exchange: str, task_id: str, kind: str, reply_to: str | None) -> list[tuple[str, str]]:
    """Every event goes to the topic exchange as <node>.<task_id>.<type>, and to reply_to if given."""
    out = [(exchange, f"{node}.{task_id}.{kind}")]
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


def chunk_message(node: str, exchange: str, task_id: str, seq: int, index: int, total: int, sha256: str,
                  file_ref: tuple[str, int, int], reply_to: str | None, correlation_id: str | None) -> Message:
    props: dict[str, Any] = {
        "content_type": "application/octet-stream",
        "type": "chunk",
        "message_id": f"{node}.{task_id}.{seq}",
        "headers": {"fem": 1, "task_id": task_id, "seq": seq, "index": index, "total": total, "sha256": sha256},
    }
    if correlation_id:
        props["correlation_id"] = correlation_id
    return Message(destinations(node, exchange, task_id, "chunk", reply_to), props, file_ref=file_ref)
