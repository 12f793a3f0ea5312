"""The ``submit_run`` reply body in the original FEM-client's shape (../shared/FEM-REAL.md).

The orchestrator stores each node's answer as ``{"execution_id", "action": "submit_run", "tool_id",
"task_id", "user_id", "node", "result": {...}, "status": "success", "return_code": 0,
"starting_time": "2025-03-23 09:40:56", "finish_time": "2025-03-23 09:40:57"}``, where ``result`` is
the JSON object the command printed on stdout. fem-hpc's own fields (its task id, the scheduler's job
id, outputs, state, notes) go under the one extra key ``fem_hpc``, so they can never collide with
what the orchestrator reads.

How ``result`` is found in stdout (:func:`command_result`), since the original only says "the command
must print JSON": the whole stdout when it is one JSON object; else the JSON object that ends stdout
(one line or pretty-printed over several, after log lines); else the last line that is a JSON object
on its own (logs printed after it); else ``{"stdout": <tail>}``. ``NaN``/``Infinity`` are not JSON and
do not count. ``task_id`` is the document's ``_id`` (``flcore-server``), as in the original; fem-hpc's
v1 task id is ``fem_hpc.task_id``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict

__all__ = ["FemFields", "ReplyIds", "command_result", "legacy_time", "reply_body", "submit_run_reply"]

TAIL_CHARS = 4096
MAX_SCAN_CHARS = 1024 * 1024  # only this much of the end of stdout is searched for the result object
_MAX_CANDIDATES = 256  # object starts tried from the end (bounds the work on a hostile stdout)


class ReplyIds(BaseModel):
    """Who the reply is about, in the legacy spelling (raw request values, not sanitized ids)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    execution_id: str | None
    tool_id: str
    task_id: str | None  # the document's _id
    user_id: str | None
    node: str


class FemFields(BaseModel):
    """fem-hpc's own reply fields, sent under ``fem_hpc`` (None fields are left out)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str | None = None  # fem-hpc's v1 task id
    native_id: str | None = None  # the scheduler's / runtime's job id
    state: str | None = None  # COMPLETED, FAILED, ...
    outputs: dict[str, Any] | None = None  # e.g. {"workdir", "files", "size", "sha256"}
    message: str | None = None
    stderr_tail: str | None = None
    ports: list[str] | None = None  # what was published, "host->container/protocol"
    ports_note: str | None = None  # what could not be published (ports.plan_ports)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _loads_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _line_starts(text: str) -> list[int]:
    """Offsets of the lines whose first non-blank character is '{', last first."""
    starts, pos = [], 0
    for line in text.splitlines(keepends=True):
        stripped = line.lstrip()
        if stripped.startswith("{"):
            starts.append(pos + len(line) - len(stripped))
        pos += len(line)
    return starts[::-1][:_MAX_CANDIDATES]


def command_result(stdout: str, tail_chars: int = TAIL_CHARS) -> dict[str, Any]:
    """The reply's ``result``: the JSON object the command printed (see the module docstring), else
    ``{"stdout": <the last tail_chars characters>}``."""
    text = stdout[-MAX_SCAN_CHARS:].strip()
    whole = _loads_object(text)
    if whole is not None:
        return whole
    decoder = json.JSONDecoder(parse_constant=_no_constants)
    starts = _line_starts(text)
    for start in starts:  # the object that ends stdout, possibly over several lines
        try:
            value, end = decoder.raw_decode(text, start)
        except ValueError:
            continue
        if isinstance(value, dict) and not text[end:].strip():
            return value
    for line in reversed(text.splitlines()):  # a one-line object with log lines after it
        if line.strip().startswith("{"):
            value = _loads_object(line.strip())
            if value is not None:
                return value
    return {"stdout": stdout[-tail_chars:] if tail_chars > 0 else ""}


def legacy_time(value: datetime | str | None) -> str | None:
    """A datetime or our ISO time (``2026-11-30T10:00:00.123456Z``) -> ``2026-11-30 10:00:00`` in UTC (a
    time without an offset is taken as UTC). None stays None; raises ValueError for other text."""
    if value is None:
        return None
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(value.strip())
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def reply_body(
    ids: ReplyIds,
    *,
    result: Mapping[str, Any],
    status: str,
    return_code: int | None,
    started: datetime | str | None,
    finished: datetime | str | None,
    fem: FemFields | None = None,
    action: str = "submit_run",
) -> dict[str, Any]:
    """The reply envelope around any ``result`` (a command's, or the health-check report)."""
    if status not in ("success", "error"):
        raise ValueError(f"status must be 'success' or 'error', not {status!r}")
    body: dict[str, Any] = {
        "execution_id": ids.execution_id,
        "action": action,
        "tool_id": ids.tool_id,
        "task_id": ids.task_id,
        "user_id": ids.user_id,
        "node": ids.node,
        "result": dict(result),
        "status": status,
        "return_code": return_code,
        "starting_time": legacy_time(started),
        "finish_time": legacy_time(finished),
    }
    if fem is not None:
        extra = fem.model_dump(exclude_none=True)
        if extra:
            body["fem_hpc"] = extra
    return body


def submit_run_reply(
    ids: ReplyIds,
    *,
    stdout: str,
    exit_code: int | None,
    started: datetime | str | None,
    finished: datetime | str | None,
    fem: FemFields | None = None,
    tail_chars: int = TAIL_CHARS,
) -> dict[str, Any]:
    """The final ``submit_run`` reply of a task that ran: ``result`` from its stdout (pass the whole
    stdout file, not the event's short tail: a long JSON would be cut), ``status`` success exactly when
    the exit code is 0 (None, a task that never ran or was lost, is an error)."""
    return reply_body(ids, result=command_result(stdout, tail_chars), status="success" if exit_code == 0 else "error",
                      return_code=exit_code, started=started, finished=finished, fem=fem)
