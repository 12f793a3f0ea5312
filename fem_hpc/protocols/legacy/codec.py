"""The legacy FEM-orchestrator protocol's wire format: request decoding and reply framing.

No broker and no threads here (see DESIGN.md and FEM-REAL.md). A request body is one UTF-8 string

    ACTION|tool_id|task_info|execution|parametric_args|user_id|public_ip|json_action|token

where ``task_info`` and ``parametric_args`` are Python-literal dicts and ``execution`` a JSON object. They
are read with the restricted parser of :mod:`.literal`, never with ``eval``. A reply is a JSON document
sent as a ``chunk_start`` message and N base64 chunks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from .literal import LiteralError, parse_literal_prefix

LEGACY_ACTIONS = (
    "submit_run",
    "run_status",
    "cancel_run",
    "run_report",
    "health-check",
    "send_files",
    "print_images",
)
LEGACY_FIELDS = (
    "action",
    "tool_id",
    "task_info",
    "execution",
    "parametric_args",
    "user_id",
    "public_ip",
    "json_action",
    "token",
)
_FIELD_LIST = "|".join(["ACTION", *LEGACY_FIELDS[1:]])


class LegacyError(ValueError):
    """A legacy request or reply could not be decoded.

    ``ids`` holds what could be read before the problem (``action``, ``tool_id``, ``user_id``,
    ``execution_id``) so that the caller can still address an error reply.
    """

    def __init__(self, message: str, *, ids: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.ids = dict(ids or {})


class LegacyRequest(BaseModel):
    """One decoded legacy request. ``token`` is a SecretStr: it never shows in repr/str/logs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    action: str
    tool_id: str
    task_info: dict[str, Any]
    execution: dict[str, Any]
    parametric_args: dict[str, Any]
    user_id: str
    public_ip: str | None = None
    json_action: str | None = None  # raw text as received; None for an empty field or the literal None
    token: SecretStr

    @property
    def execution_id(self) -> str | None:
        value = self.execution.get("execution_id")
        return None if value is None else str(value)

    def ids(self) -> dict[str, str]:
        """The identifiers of this request, for error replies and logs (never the token)."""
        out = {"action": self.action, "tool_id": self.tool_id, "user_id": self.user_id}
        if self.execution_id is not None:
            out["execution_id"] = self.execution_id
        return out


# --------------------------------------------------------------------------------------------------
# Request decoding


def _field_count_error(text: str, ids: dict[str, str], after: str | None = None) -> LegacyError:
    if after is None:
        found = f"found {text.count('|') + 1}"
    else:
        found = f"no '|' follows {after} (a '|' inside a quoted value is not a separator)"
    return LegacyError(f"expected 9 '|'-separated fields ({_FIELD_LIST}) but {found}", ids=ids)


def _short(text: str) -> str:
    """An identifier for error replies, bounded so that a hostile field cannot bloat them."""
    text = text.strip()
    return text if len(text) <= 256 else text[:256] + "..."


def _read_field(
    middle: str, pos: int, name: str, offset: int, max_bytes: int, ids: dict[str, str], *, json_object: bool
) -> tuple[Any, int]:
    """Read the literal field ``name`` at ``middle[pos:]``; return its value (None if empty) and its end."""
    n = len(middle)
    while pos < n and middle[pos] in " \t\r\n":
        pos += 1
    if pos >= n or middle[pos] == "|":
        return None, pos
    try:
        value, end = parse_literal_prefix(
            middle, pos, stop="|", max_bytes=max_bytes, json_constants=json_object
        )
    except LiteralError as exc:
        raise LegacyError(
            f"{name}: {exc.message} at offset {exc.position - pos} of {name} "
            f"(body offset {offset + exc.position})",
            ids=ids,
        ) from exc
    if json_object:
        # The literal parser found the end and bounded size and depth; JSON's own rules (surrogate
        # pairs, "\/") then give the exact value when the field is JSON. A Python-literal dict is
        # accepted as well.
        try:
            value = json.loads(middle[pos:end])
        except ValueError:
            pass
    return value, end


def _as_dict(value: Any, name: str, ids: dict[str, str]) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if not isinstance(value, dict):
        raise LegacyError(f"{name} must be a dict, got {type(value).__name__}", ids=ids)
    bad = [k for k in value if not isinstance(k, str)]
    if bad:
        raise LegacyError(f"{name} keys must be strings, got {bad[0]!r}", ids=ids)
    return value


def _none_or_text(text: str) -> str | None:
    text = text.strip()
    return None if text in ("", "None", "null") else text


def decode_request(body: bytes, max_bytes: int) -> LegacyRequest:
    """Decode one legacy request body; raise :class:`LegacyError` with a clear message if it is invalid.

    The body is checked against ``max_bytes`` before anything else, then decoded as strict UTF-8.
    Fields are separated by ``|``, which may also occur inside values: ``action`` and ``tool_id`` are
    taken from the left, ``user_id``, ``public_ip``, ``json_action`` and ``token`` from the right (so these
    six must not contain ``|``), and the middle is read literal by literal: ``task_info`` (a dict
    literal), ``execution`` (a JSON object, or a dict literal) and ``parametric_args`` (a dict literal).
    An empty field or the literal ``None`` in those three means ``{}``; ``public_ip`` and ``json_action``
    of ``None`` (or empty) become None.
    """
    if len(body) > max_bytes:
        raise LegacyError(f"request body of {len(body)} bytes is larger than the limit of {max_bytes} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LegacyError(f"request body is not valid UTF-8 (byte offset {exc.start})") from None
    ids: dict[str, str] = {}
    if text.count("|") < len(LEGACY_FIELDS) - 1:
        first = text.split("|", 1)[0].strip()
        if first:
            ids["action"] = _short(first)
        raise _field_count_error(text, ids)
    action, tool_id, rest = text.split("|", 2)
    ids["action"], ids["tool_id"] = _short(action), _short(tool_id)
    middle, user_id, public_ip, json_action, token = rest.rsplit("|", 4)
    ids["user_id"] = _short(user_id)
    offset = len(action) + len(tool_id) + 2  # offset of `middle` in the body

    task_info, pos = _read_field(middle, 0, "task_info", offset, max_bytes, ids, json_object=False)
    if pos >= len(middle):
        raise _field_count_error(text, ids, "task_info")
    execution, pos = _read_field(middle, pos + 1, "execution", offset, max_bytes, ids, json_object=True)
    execution = _as_dict(execution, "execution", ids)
    if execution.get("execution_id") is not None:
        ids["execution_id"] = _short(str(execution["execution_id"]))
    if pos >= len(middle):
        raise _field_count_error(text, ids, "execution")
    params, pos = _read_field(middle, pos + 1, "parametric_args", offset, max_bytes, ids, json_object=False)
    if pos < len(middle):
        raise LegacyError(
            f"expected 9 '|'-separated fields ({_FIELD_LIST}) but found more: extra '|' after "
            f"parametric_args at body offset {offset + pos} (user_id, public_ip, json_action and token "
            "must not contain '|')",
            ids=ids,
        )
    task_info = _as_dict(task_info, "task_info", ids)
    params = _as_dict(params, "parametric_args", ids)

    action = action.strip()
    if action not in LEGACY_ACTIONS:
        raise LegacyError(f"unknown action {action!r}; expected one of {', '.join(LEGACY_ACTIONS)}", ids=ids)
    try:
        return LegacyRequest(
            action=action,
            tool_id=tool_id.strip(),
            task_info=task_info,
            execution=execution,
            parametric_args=params,
            user_id=user_id.strip(),
            public_ip=_none_or_text(public_ip),
            json_action=_none_or_text(json_action),
            token=SecretStr(token.strip()),
        )
    except ValidationError as exc:  # pragma: no cover - the checks above make this unreachable
        raise LegacyError(f"invalid request: {exc.errors()[0]['msg']}", ids=ids) from None


_COLON_FORM = re.compile(r"([^\s:|]{1,256}):([^\s:|]{1,256}):([^\s:|]{1,256})")
COLON_FORM_MESSAGE = (
    "this is the 2024 request form tool_id:task_id:execution_id, which made the client fetch the task document "
    "from the orchestrator's REST API; fem-hpc makes no HTTP requests and runs only the 2025 form "
    f"{_FIELD_LIST}, which carries the document itself")


def colon_form(body: bytes) -> dict[str, str] | None:
    """The ids of a 2024-style request ``tool_id:task_id:execution_id`` (three ':'-separated words and
    nothing else), else None."""
    if len(body) > 1024:
        return None
    try:
        text = body.decode("utf-8").strip()
    except UnicodeDecodeError:
        return None
    m = _COLON_FORM.fullmatch(text)
    if m is None:
        return None
    return {"tool_id": m.group(1), "task_id": m.group(2), "execution_id": m.group(3)}


# --------------------------------------------------------------------------------------------------
# Replies


def encode_reply(payload: dict[str, Any], chunk_size: int) -> list[bytes]:
    """Frame ``payload`` as the legacy reply messages: one ``chunk_start`` and N >= 1 ``chunk``\\ s.

    The raw reply is the JSON of ``payload`` in UTF-8; it is cut into slices of ``chunk_size`` raw bytes,
    each sent base64-encoded; ``checksum`` is the SHA-256 hex of the raw reply.
    """
    if chunk_size < 1:
        raise ValueError("chunk_size must be at least 1")
    raw = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    slices = [raw[i : i + chunk_size] for i in range(0, len(raw), chunk_size)] or [b""]
    start = {"type": "chunk_start", "total": len(slices), "checksum": hashlib.sha256(raw).hexdigest()}
    messages = [json.dumps(start).encode()]
    for index, piece in enumerate(slices):
        chunk = {"type": "chunk", "index": index, "data": base64.b64encode(piece).decode("ascii")}
        messages.append(json.dumps(chunk).encode())
    return messages


def decode_reply(messages: list[bytes]) -> dict[str, Any]:
    """Join reply messages (in any order) by index, check the count and SHA-256, return the payload.

    Raises :class:`LegacyError` on a missing/duplicate ``chunk_start``, a missing, conflicting or
    out-of-range chunk, bad base64, a checksum mismatch, or a payload that is not a JSON object.
    """
    start: dict[str, Any] | None = None
    chunks: dict[int, bytes] = {}
    for number, message in enumerate(messages):
        try:
            doc = json.loads(message)
        except ValueError as exc:
            raise LegacyError(f"reply message {number} is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise LegacyError(f"reply message {number} is not a JSON object")
        if doc.get("type") == "chunk_start":
            if start is not None and start != doc:
                raise LegacyError("two different chunk_start messages")
            start = doc
        elif doc.get("type") == "chunk":
            index, data = doc.get("index"), doc.get("data")
            if not isinstance(index, int) or isinstance(index, bool) or not isinstance(data, str):
                raise LegacyError(f"reply message {number} is a malformed chunk")
            try:
                piece = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError):
                raise LegacyError(f"chunk {index} is not valid base64") from None
            if index in chunks and chunks[index] != piece:
                raise LegacyError(f"chunk {index} received twice with different data")
            chunks[index] = piece
        else:
            raise LegacyError(f"reply message {number} has unknown type {doc.get('type')!r}")
    if start is None:
        raise LegacyError("no chunk_start message")
    total, checksum = start.get("total"), start.get("checksum")
    if not isinstance(total, int) or isinstance(total, bool) or total < 1 or not isinstance(checksum, str):
        raise LegacyError("chunk_start needs an integer total >= 1 and a checksum")
    unexpected = sorted(i for i in chunks if not 0 <= i < total)
    if unexpected:
        raise LegacyError(f"chunk index {unexpected[0]} is outside 0..{total - 1}")
    missing = [i for i in range(total) if i not in chunks]
    if missing:
        raise LegacyError(f"missing {len(missing)} of {total} chunks (first: {missing[0]})")
    raw = b"".join(chunks[i] for i in range(total))
    digest = hashlib.sha256(raw).hexdigest()
    if digest != checksum.lower():
        raise LegacyError(f"checksum mismatch: chunk_start says {checksum}, the joined reply has {digest}")
    try:
        payload = json.loads(raw.decode("utf-8"))
    except ValueError as exc:
        raise LegacyError(f"the joined reply is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise LegacyError("the joined reply is not a JSON object")
    return payload


def order_key(body: bytes, max_bytes: int) -> str | None:
    """The execution a legacy request is about (its `execution_id`), so the consumer handles a
    submit_run and a cancel_run of one execution in their queue order; None when it names none."""
    try:
        req = decode_request(body, max_bytes)
    except (LegacyError, LiteralError):
        return None
    execution_id = req.execution.get("execution_id")
    return None if execution_id is None else f"legacy:{execution_id}"
