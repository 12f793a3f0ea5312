"""Logging: one line per event, text or JSON, every task line with its task_id and native id,
and secrets masked on their way out whatever logged them."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime

_secrets: set[str] = set()
_secrets_lock = threading.Lock()
_URL_PASSWORD = re.compile(r"(amqps?://[^:/@\s]+:)([^@\s]+)(@)")


def register_secret(value: str | None) -> None:
    """Mask this value in every log line from now on (passwords, tokens)."""
    if value and len(value) >= 4:
        with _secrets_lock:
            _secrets.add(value)


def redact(text: str) -> str:
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    with _secrets_lock:
        secrets = sorted(_secrets, key=len, reverse=True)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


TOKEN_REDACTED = b"<token redacted>"


def redact_pipe_token(body: bytes) -> tuple[bytes, str | None]:
    """`body` with its last '|'-separated field replaced, and that field's text. In the legacy FEM
    protocol it is the orchestrator's bearer token: neither a dead-lettered copy of a message nor
    an error message may keep it, whether or not the node speaks that protocol."""
    head, sep, token = body.rpartition(b"|")
    if not sep or not token.strip():
        return body, None
    return head + sep + TOKEN_REDACTED, token.decode("utf-8", "replace").strip()


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key in ("task_id", "native_id"):
            if not hasattr(record, key):
                setattr(record, key, None)
        return True


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        ctx = ""
        if record.task_id:
            ctx = f" task={record.task_id}" + (f" native={record.native_id}" if record.native_id else "")
        line = f"{ts} {record.levelname:<7} {record.name}{ctx}: {record.getMessage()}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return redact(line)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat().replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "task_id": record.task_id,
            "native_id": record.native_id,
        }
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return redact(json.dumps(data))


def setup_logging(fmt: str = "text", level: str = "INFO", stream=None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.setFormatter(JSONFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # pika logs every failed connection attempt at ERROR, with a traceback, and every attempt at
    # INFO. fem-hpc's own reconnect loop (broker/connection.py) already says what happened in one
    # warning line, so pika speaks only at DEBUG, where its detail is wanted.
    numeric = logging.getLevelName(level) if isinstance(level, str) else level
    logging.getLogger("pika").setLevel(logging.DEBUG if numeric == logging.DEBUG else logging.CRITICAL)
