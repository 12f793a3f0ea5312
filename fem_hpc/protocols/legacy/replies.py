"""The legacy reply payloads: a submit_run's answer, an error, the legacy time format."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any


def legacy_time(iso: str | None) -> str | None:
    """Our ISO time (``2026-11-30T10:00:00.123456Z``) -> the legacy ``2026-11-30 10:00:00`` in UTC.

    None stays None; a time without an offset is taken as UTC. Raises ValueError for other text.
    """
    if iso is None:
        return None
    moment = datetime.fromisoformat(iso.strip())
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def submit_reply(
    *,
    execution_id: str | None,
    tool_id: str,
    task_id: str | None,
    user_id: str | None,
    node: str,
    exit_code: int | None,
    native_id: str | None = None,
    outputs: Any = None,
    status: str | None = None,
    return_code: int | None = None,
    starting_time: str | None = None,
    finish_time: str | None = None,
    message: str | None = None,
    action: str = "submit_run",
) -> dict[str, Any]:
    """The legacy submit_run reply. ``status`` defaults to "success" for exit code 0, else "error";
    ``return_code`` defaults to ``exit_code``; the times are our ISO times (converted with
    :func:`legacy_time`)."""
    if status is None:
        status = "success" if exit_code == 0 else "error"
    if status not in ("success", "error"):
        raise ValueError(f"status must be 'success' or 'error', not {status!r}")
    return {
        "execution_id": execution_id,
        "action": action,
        "tool_id": tool_id,
        "task_id": task_id,
        "user_id": user_id,
        "node": node,
        "result": {"exit_code": exit_code, "native_id": native_id, "outputs": outputs},
        "status": status,
        "return_code": exit_code if return_code is None else return_code,
        "starting_time": legacy_time(starting_time),
        "finish_time": legacy_time(finish_time),
        "message": message,
    }


def error_reply(action: str, message: str, /, **ids: Any) -> dict[str, Any]:
    """A legacy error reply: ``{"action", "status": "error", "message", **ids}`` (e.g. the ``ids`` of a
    :class:`LegacyError` or :meth:`LegacyRequest.ids`)."""
    reply: dict[str, Any] = {key: value for key, value in ids.items() if key not in ("status", "message")}
    reply.update({"action": action, "status": "error", "message": message})
    return reply
