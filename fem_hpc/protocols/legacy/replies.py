"""The legacy reply payloads other than submit_run's (which is .result's): an error, the legacy time
format."""

from __future__ import annotations

from typing import Any

from .result import legacy_time

__all__ = ["error_reply", "legacy_time"]


def error_reply(action: str, message: str, /, **ids: Any) -> dict[str, Any]:
    """A legacy error reply: ``{"action", "status": "error", "message", **ids}`` (e.g. the ``ids`` of a
    :class:`LegacyError` or :meth:`LegacyRequest.ids`)."""
    reply: dict[str, Any] = {key: value for key, value in ids.items() if key not in ("status", "message")}
    reply.update({"action": action, "status": "error", "message": message})
    return reply
