"""Protocol v1 requests on the node queue: decode, hand to the lifecycle, answer refusals."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from ... import metrics
from ...broker.consumer import Delivery
from ...config import SiteConfig
from ...journal import Journal, Message, Route
from ...lifecycle.agent import Agent
from ...logs import redact_pipe_token
from ...model import ID_PATTERN, FieldError, ResultEvent, State, utcnow
from .frontend import JSON, PROTOCOL, event_message
from .requests import Invalid, Request, decode, is_v1


def dead_letter_message(queue: str, d: Delivery, reason: str, errors: list[FieldError]) -> Message:
    """The copy of a refused message, with why, for `<queue>.rejected`; the caller puts it in the
    same journal transaction as its reply, so neither goes without the other. A body that is not
    v1 JSON never keeps a legacy token (its last '|' field)."""
    headers = {**{k: v for k, v in d.headers.items() if isinstance(v, (str, int, float, bool))},
               "x-fem-reason": reason,
               "x-fem-errors": json.dumps([e.model_dump() for e in errors])[:4000]}
    props: dict[str, Any] = {"headers": headers, "correlation_id": d.correlation_id,
                             "message_id": d.message_id, "type": "rejected"}
    body = d.body if is_v1(d.body) else redact_pipe_token(d.body)[0]
    return Message([("", f"{queue}.rejected")], props, body=body)


def rejection(node: str, exchange: str, task_id: Any, labels: Any, errors: list[FieldError],
              route: Route) -> list[Message]:
    """The REJECTED result of a task that was never journalled (so a corrected resubmit with the
    same id is accepted later): to the topic exchange when it has a valid id, and to reply_to."""
    tid = task_id if isinstance(task_id, str) and re.fullmatch(ID_PATTERN, task_id) else ""
    labels = labels if isinstance(labels, dict) and all(
        isinstance(k, str) and isinstance(v, str) for k, v in labels.items()) else {}
    result = ResultEvent(node=node, task_id=tid, seq=1, state=State.REJECTED, errors=errors, labels=labels,
                         finished=utcnow())
    msg = event_message(node, exchange, result, route.reply_to, route.correlation_id)
    return [msg] if msg.destinations else []


class V1Dispatch:
    def __init__(self, site: SiteConfig, journal: Journal, agent: Agent, health: Callable[[], dict[str, Any]],
                 legacy_enabled: bool):
        self.site = site
        self.journal = journal
        self.agent = agent
        self.health = health
        self.legacy_enabled = legacy_enabled

    def handle(self, d: Delivery) -> None:
        req = decode(d.body, self.site.broker.max_body_bytes)
        route = Route(PROTOCOL, d.reply_to, d.correlation_id)
        if isinstance(req, Invalid):
            if not is_v1(d.body) and len(d.body) <= self.site.broker.max_body_bytes and not self.legacy_enabled:
                req.errors.insert(0, FieldError(field="body", message="not a protocol v1 JSON object, and the "
                                                "legacy FEM protocol is not enabled on this node"))
            metrics.intake(None, "rejected")
            self._refuse(d, route, req.task_id, req.labels, req.errors, req.reason)
            return
        self.dispatch(req, d, route)

    def _refuse(self, d: Delivery, route: Route, task_id: Any, labels: Any, errors: list[FieldError],
                reason: str) -> None:
        self.journal.put(*rejection(self.site.node, self.site.broker.events_exchange, task_id, labels, errors, route),
                         dead_letter_message(self.site.queue, d, reason, errors))

    def dispatch(self, req: Request, d: Delivery, route: Route) -> None:
        if req.op == "submit":
            result = self.agent.intake(req.task, route)
            if result.errors:
                task = req.task if isinstance(req.task, dict) else {}
                self._refuse(d, route, task.get("id"), task.get("labels"), result.errors, "rejected task")
        elif req.op == "cancel":
            self.agent.cancel(req.task_id or "", route)
        elif req.op == "status":
            self.agent.status(req.task_id or "", route)
        elif req.op == "health":
            if d.reply_to:
                body = json.dumps(self.health()).encode()
                props = {"content_type": JSON, "type": "health", "correlation_id": d.correlation_id}
                self.journal.put(Message([("", d.reply_to)], props, body=body))
