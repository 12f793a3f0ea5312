"""The legacy FEM-orchestrator protocol as a pure codec: request decoding, TASK mapping, reply framing.

No broker and no threads here (see DESIGN.md, "Legacy FEM protocol"). A request body is one UTF-8 string

    ACTION|tool_id|task_info|execution|parametric_args|user_id|public_ip|json_action|token

where ``task_info`` and ``parametric_args`` are Python-literal dicts and ``execution`` a JSON object. They
are read with the restricted parser of :mod:`fem_hpc.broker.literal`, never with ``eval`` or
``ast.literal_eval``. A reply is a JSON document sent as a ``chunk_start`` message and N base64 chunks.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import os
import posixpath
import re
import shlex
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, SecretStr, ValidationError

from fem_hpc.broker.literal import LiteralError, parse_literal_prefix
from fem_hpc.model import FieldError, parse_task

__all__ = [
    "LEGACY_ACTIONS",
    "LEGACY_FIELDS",
    "LegacyError",
    "LegacyRequest",
    "decode_reply",
    "decode_request",
    "encode_reply",
    "error_reply",
    "legacy_task_id",
    "legacy_time",
    "sanitize_id",
    "submit_reply",
    "to_task",
]

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
_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ID_COMPONENT = 57  # two components + 12 hex of parameters + 2 dots = 128 characters at most
_PARAMS_HASH_LEN = 12
_FLAG_TYPES = frozenset({"bool", "boolean", "flag"})
_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "y"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off", "n", ""})
_MEMORY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGTkmgt])[iI]?[bB]?)?$")
_MEMORY_FACTOR_K = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}


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


# --------------------------------------------------------------------------------------------------
# Mapping to a v1 TASK


def sanitize_id(value: Any, max_len: int = 128, *, allow_dot: bool = True) -> str:
    """Map ``value`` into the v1 id charset ``[A-Za-z0-9][A-Za-z0-9_.-]*`` (at most ``max_len`` chars).

    A value that already fits is returned unchanged. Otherwise every other character becomes ``_``, a
    leading non-alphanumeric is dropped, and ``-`` plus 8 hex digits of the SHA-256 of the original is
    appended, so two different originals do not map to the same id. Raises ValueError for an empty
    value.
    """
    text = "" if value is None else str(value).strip()
    if not text:
        raise ValueError("is empty")
    allowed = r"A-Za-z0-9_.\-" if allow_dot else r"A-Za-z0-9_\-"
    if len(text) <= max_len and re.fullmatch(rf"[A-Za-z0-9][{allowed}]*", text):
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    mapped = re.sub(rf"[^{allowed}]", "_", text).lstrip("_.-")
    return f"{mapped[: max_len - 9]}-{digest}" if mapped else f"x{digest}"


def _canonical(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _canonical(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_canonical(v) for v in value]
    return value


def legacy_task_id(legacy_id: Any, execution_id: Any, parametric_args: Mapping[str, Any] | None) -> str:
    """The v1 task id of a legacy submission: ``<execution_id>.<_id>.<12 hex>``.

    * ``execution_id`` and ``task_info._id`` go through :func:`sanitize_id` without dots (at most 57
      characters each), so the two dots are unambiguous separators and the id has at most 128 characters;
      ids that already fit the charset (Mongo ObjectIds, UUIDs) are kept verbatim.
    * The 12 hex digits are the SHA-256 of the canonical JSON of ``parametric_args``: the orchestrator
      may send one tool several times in one execution with different parameters (a sweep), and those
      are different tasks; the same tool with the same parameters in the same execution is the same task,
      so a redelivered request is idempotent (v1: a second submit with the same id runs nothing new).
    * All variants of one tool in one execution share the prefix ``<execution_id>.<_id>.``, which a
      status/cancel lookup can use; the raw values are also in the labels ``legacy_id`` and
      ``legacy_execution_id``.
    """
    canonical = json.dumps(_canonical(dict(parametric_args or {})), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:_PARAMS_HASH_LEN]
    exe = sanitize_id(execution_id, _ID_COMPONENT, allow_dot=False)
    tid = sanitize_id(legacy_id, _ID_COMPONENT, allow_dot=False)
    return f"{exe}.{tid}.{digest}"


def _truthy(value: Any, default: bool) -> bool:
    if value is None:
        return default
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, str):
        low = value.strip().lower()
        if low in _TRUE_WORDS:
            return True
        if low in _FALSE_WORDS:
            return False
    raise ValueError(f"{value!r} is not a boolean")


def _scalar_text(value: Any) -> str:
    """Render one argument value as argv text (str(); floats use Python's shortest repr)."""
    if isinstance(value, dict | list | tuple):
        raise ValueError(f"a value of type {type(value).__name__} cannot be an argument")
    return str(value)


def _position(value: Any) -> float:
    if value is None or value == "":
        return math.inf
    if isinstance(value, bool):
        raise ValueError(f"position {value!r} is not a number")
    return float(value)


def _command(task_info: dict[str, Any], params: dict[str, Any], errors: list[FieldError]) -> list[str]:
    command = task_info.get("command")
    if command is None:
        errors.append(FieldError(field="task_info.command", message="is required"))
        return []
    if isinstance(command, str):
        command = {"base": command}
    if not isinstance(command, dict):
        errors.append(FieldError(field="task_info.command", message="must be a dict with 'base' and 'args'"))
        return []
    base = command.get("base") or ""
    known = len(errors)
    argv: list[str] = []
    if isinstance(base, list) and all(isinstance(a, str) for a in base):
        argv = list(base)
    elif isinstance(base, str):
        try:
            argv = shlex.split(base)
        except ValueError as exc:
            errors.append(FieldError(field="task_info.command.base", message=f"cannot be split: {exc}"))
    else:
        errors.append(FieldError(field="task_info.command.base", message="must be a string"))
    args = command.get("args") or []
    if not isinstance(args, list):
        errors.append(FieldError(field="task_info.command.args", message="must be a list"))
        return argv
    ordered: list[tuple[float, int, dict[str, Any]]] = []
    for index, arg in enumerate(args):
        where = f"task_info.command.args[{index}]"
        if not isinstance(arg, dict):
            errors.append(FieldError(field=where, message="must be a dict"))
            continue
        try:
            ordered.append((_position(arg.get("position")), index, arg))
        except (TypeError, ValueError):
            errors.append(
                FieldError(field=f"{where}.position", message=f"{arg.get('position')!r} is not a number")
            )
    ordered.sort(key=lambda item: (item[0], item[1]))
    for _, index, arg in ordered:
        argv.extend(_render_arg(arg, index, params, errors))
    if not argv and len(errors) == known:
        errors.append(FieldError(field="task_info.command", message="gives an empty command"))
    return argv


def _render_arg(
    arg: dict[str, Any], index: int, params: dict[str, Any], errors: list[FieldError]
) -> list[str]:
    arg_id = arg.get("id")
    where = f"task_info.command.args[{index}]" + (f" ({arg_id!r})" if arg_id is not None else "")
    value = params[arg_id] if isinstance(arg_id, str) and arg_id in params else arg.get("default_value")
    prefix = arg.get("prefix") or ""
    if not isinstance(prefix, str):
        errors.append(FieldError(field=where, message="prefix must be a string"))
        return []
    try:
        required = _truthy(arg.get("required"), False)
        separate = _truthy(arg.get("separate"), True)
    except ValueError as exc:
        errors.append(FieldError(field=where, message=f"required/separate: {exc}"))
        return []
    arg_type = str(arg.get("type") or "").strip().lower()
    if arg_type in _FLAG_TYPES:
        if value is None or value == "":
            if required:
                errors.append(FieldError(field=where, message="required argument has no value"))
            return []
        try:
            on = _truthy(value, False)
        except ValueError as exc:
            errors.append(FieldError(field=where, message=f"flag value {exc}"))
            return []
        if on and not prefix:
            errors.append(FieldError(field=where, message="flag argument has no prefix"))
            return []
        return [prefix] if on else []
    values = list(value) if isinstance(value, list | tuple) else [value]
    values = [v for v in values if v is not None and v != ""]
    if not values:
        if required:
            errors.append(FieldError(field=where, message="required argument has no value"))
        return []
    out: list[str] = []
    for item in values:
        try:
            text = _scalar_text(item)
        except ValueError as exc:
            errors.append(FieldError(field=where, message=str(exc)))
            return []
        if not prefix:
            out.append(text)
        elif separate:
            out.extend([prefix, text])
        else:
            out.append(prefix + text)
    return out


def _source(task_info: dict[str, Any], errors: list[FieldError]) -> dict[str, str] | None:
    source = task_info.get("source_code")
    if source is None or source == "" or source == {}:
        return None
    if isinstance(source, str):
        source = {"url": source}
    if not isinstance(source, dict):
        errors.append(FieldError(field="task_info.source_code", message="must be a dict with 'url'"))
        return None
    url = source.get("url")
    if url is None or (isinstance(url, str) and not url.strip()):
        return None
    if not isinstance(url, str):
        errors.append(FieldError(field="task_info.source_code.url", message="must be a string"))
        return None
    try:
        words = shlex.split(url)
    except ValueError as exc:
        errors.append(FieldError(field="task_info.source_code.url", message=f"cannot be split: {exc}"))
        return None
    out = {"git": words[0]}
    ref = source.get("branch") or source.get("ref")
    rest = words[1:]
    while rest:
        word = rest.pop(0)
        if word in ("--branch", "-b") and rest:
            ref = rest.pop(0)
        elif word.startswith("--branch="):
            ref = word.removeprefix("--branch=")
        else:
            errors.append(
                FieldError(
                    field="task_info.source_code.url",
                    message=f"unexpected {word!r} after the URL (only '--branch B' or '-b B' is understood)",
                )
            )
            return None
    if ref is not None:
        out["ref"] = str(ref)
    return out


def _env_text(value: Any) -> str:
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)


def _env(task_info: dict[str, Any], errors: list[FieldError]) -> dict[str, str]:
    raw = task_info.get("var_envs")
    if raw is None or raw == "":
        return {}
    env: dict[str, str] = {}
    if isinstance(raw, dict):
        items = list(raw.items())
    elif isinstance(raw, list):
        items = []
        for index, entry in enumerate(raw):
            if isinstance(entry, dict) and "name" in entry:
                items.append((entry["name"], entry.get("value")))
            elif isinstance(entry, str) and "=" in entry:
                name, _, val = entry.partition("=")
                items.append((name, val))
            else:
                errors.append(
                    FieldError(
                        field=f"task_info.var_envs[{index}]",
                        message="must be {'name': N, 'value': V} or 'NAME=value'",
                    )
                )
    else:
        errors.append(FieldError(field="task_info.var_envs", message="must be a dict or a list"))
        return {}
    for name, value in items:
        if value is None:
            continue  # an unset variable
        env[str(name)] = _env_text(value)
    return env


def _count(value: Any) -> int | None:
    """An int from an int, an integral float or a numeric string; None for None/''."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a whole number")
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    try:
        number = float(text)
    except ValueError:
        raise ValueError(f"{value!r} is not a number") from None
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _memory(value: Any) -> str | None:
    """'4G', '4g', '4Gi', '4GB', '4096M', '1.5G' or an int (MiB) -> '4G' / '4096M' / '1536M'."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise ValueError(f"memory {value!r} is not a size")
    if isinstance(value, int | float):
        number, unit = float(value), "M"
    else:
        m = _MEMORY_RE.match(str(value).strip())
        if not m:
            raise ValueError(f"memory {value!r} is not a size like 4G, 4096M or 4Gi")
        number, unit = float(m.group(1)), (m.group(2) or "M").upper()
    if number <= 0 or not math.isfinite(number):
        raise ValueError(f"memory {value!r} must be positive")
    if number.is_integer():
        return f"{int(number)}{unit}"
    kib = math.ceil(number * _MEMORY_FACTOR_K[unit])
    return f"{kib // 1024}M" if kib % 1024 == 0 else f"{kib}K"


def _resources(task_info: dict[str, Any], errors: list[FieldError]) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    for key in ("cpus", "gpus"):
        try:
            count = _count(task_info.get(key))
        except ValueError as exc:
            errors.append(FieldError(field=f"task_info.{key}", message=str(exc)))
            continue
        if count is None or (key == "cpus" and count == 0):
            continue  # 0 cpus means "not specified" in the legacy documents
        resources[key] = count
    try:
        memory = _memory(task_info.get("memory"))
    except ValueError as exc:
        errors.append(FieldError(field="task_info.memory", message=str(exc)))
    else:
        if memory is not None:
            resources["memory"] = memory
    return resources


def _volumes(
    task_info: dict[str, Any], site_volumes: Mapping[str, str | os.PathLike[str]], errors: list[FieldError]
) -> list[dict[str, str]]:
    raw = task_info.get("volumes")
    if raw is None or raw == "":
        return []
    if not isinstance(raw, list):
        errors.append(FieldError(field="task_info.volumes", message="must be a list"))
        return []
    by_path: dict[str, str] = {}
    for name in sorted(site_volumes):
        by_path.setdefault(os.path.normpath(os.fspath(site_volumes[name])), name)
    out = []
    for index, entry in enumerate(raw):
        where = f"task_info.volumes[{index}]"
        if not isinstance(entry, dict):
            errors.append(FieldError(field=where, message="must be a dict with container_path and host_path"))
            continue
        host, target = entry.get("host_path"), entry.get("container_path")
        if not isinstance(host, str) or not host or not isinstance(target, str) or not target:
            errors.append(FieldError(field=where, message="needs string host_path and container_path"))
            continue
        name = by_path.get(os.path.normpath(host))
        if name is None:
            errors.append(
                FieldError(
                    field=f"{where}.host_path", message=f"host_path {host} is not a configured site volume"
                )
            )
            continue
        out.append({"name": name, "target": target, "mode": "ro"})
    return out


def _outputs(task_info: dict[str, Any], errors: list[FieldError]) -> list[str]:
    raw = task_info.get("outputs")
    if raw is None or raw == "" or raw == {}:
        return []
    if not isinstance(raw, dict):
        errors.append(FieldError(field="task_info.outputs", message="must be a dict with model_dir"))
        return []
    model_dir = raw.get("model_dir")
    if model_dir is None or model_dir == "":
        return []
    if not isinstance(model_dir, str):
        errors.append(FieldError(field="task_info.outputs.model_dir", message="must be a string"))
        return []
    if model_dir.startswith("/") or ".." in model_dir.split("/") or "\0" in model_dir:
        errors.append(
            FieldError(
                field="task_info.outputs.model_dir",
                message=f"{model_dir!r} must be relative to the work dir, without '..'",
            )
        )
        return []
    path = posixpath.normpath(model_dir)
    return ["**"] if path == "." else [f"{path}/**"]


def _image(task_info: dict[str, Any], errors: list[FieldError]) -> str | None:
    image = task_info.get("image")
    if image is None or image == "" or image == {}:
        return None
    if isinstance(image, str):
        return image.strip()
    if not isinstance(image, dict):
        errors.append(
            FieldError(field="task_info.image", message="must be a dict with name, repository, tag")
        )
        return None
    name = str(image.get("name") or "").strip().strip("/")
    if not name:
        errors.append(FieldError(field="task_info.image.name", message="is required"))
        return None
    repository = str(image.get("repository") or "").strip().rstrip("/")
    tag = str(image.get("tag") or "").strip() or "latest"
    ref = f"{repository}/{name}" if repository else name
    last = ref.rsplit("/", 1)[-1]
    if "@" in ref or ":" in last:
        return ref  # the name already carries a tag or a digest
    return f"{ref}:{tag}"


def to_task(
    req: LegacyRequest,
    *,
    site_volumes: Mapping[str, str | os.PathLike[str]],
    default_executor: str | None,
) -> tuple[dict[str, Any], list[FieldError]]:
    """Map a legacy ``submit_run`` request to a v1 TASK dict (PROTOCOL.md).

    Returns the TASK and the problems found; the TASK is only usable when the list is empty, in which case
    :func:`fem_hpc.model.parse_task` accepted it (its own errors are returned otherwise). Decisions:

    * ``id``: :func:`legacy_task_id` (``<execution_id>.<_id>.<12 hex of parametric_args>``);
      ``execution_id`` and ``user_id``: :func:`sanitize_id` of the legacy values.
    * ``command``: ``command.base`` split with :func:`shlex.split`, then the ``args`` ordered by
      ``position`` (missing position last), then by list order. An arg's value is
      ``parametric_args[id]`` if present, else its ``default_value``. ``None``/``""`` values of optional
      args are skipped; a required arg without a value is an error. With a ``prefix``: ``separate``
      (default true) gives ``[prefix, value]``, otherwise ``[prefix + value]``. Types ``bool``/``boolean``/
      ``flag`` give ``[prefix]`` when true (True, "true", "yes", "1", 1) and nothing when false.
      A list value repeats the argument for each element (``--x a --x b``; without a prefix, ``a b``);
      dict values and nested lists are errors. Values are rendered with ``str()``.
    * ``memory``: an int is MiB; ``4g``/``4Gi``/``4GB`` -> ``4G``; fractions go to ``M`` or ``K``.
      ``cpus`` of 0 means unspecified. ``var_envs`` entries whose value is None are left unset.
    * ``volumes``: only host paths that are (after ``os.path.normpath``) a site volume's path, mounted
      read-only under the site volume's name.
    * ``labels``: ``legacy_tool_id``, ``legacy_action``, ``legacy_id`` (raw ``_id``),
      ``legacy_execution_id`` (raw execution id).
    """
    errors: list[FieldError] = []
    info, params = req.task_info, req.parametric_args
    task: dict[str, Any] = {}

    legacy_id, execution_id = info.get("_id"), req.execution.get("execution_id")
    if legacy_id is None or str(legacy_id).strip() == "":
        errors.append(FieldError(field="task_info._id", message="is required"))
    if execution_id is None or str(execution_id).strip() == "":
        errors.append(FieldError(field="execution.execution_id", message="is required"))
    if not errors:
        task["id"] = legacy_task_id(legacy_id, execution_id, params)
        task["execution_id"] = sanitize_id(execution_id)
    try:
        task["user_id"] = sanitize_id(req.user_id)
    except ValueError:
        task["user_id"] = "anonymous"
    if default_executor:
        task["executor"] = default_executor

    image = _image(info, errors)
    if image is not None:
        task["image"] = image
    source = _source(info, errors)
    if source is not None:
        task["source"] = source
    task["command"] = _command(info, params, errors)
    env = _env(info, errors)
    if env:
        task["env"] = env
    volumes = _volumes(info, site_volumes, errors)
    if volumes:
        task["volumes"] = volumes
    resources = _resources(info, errors)
    if resources:
        task["resources"] = resources
    outputs = _outputs(info, errors)
    if outputs:
        task["outputs"] = outputs
    labels = {"legacy_tool_id": req.tool_id, "legacy_action": req.action}
    if legacy_id is not None:
        labels["legacy_id"] = str(legacy_id)
    if execution_id is not None:
        labels["legacy_execution_id"] = str(execution_id)
    task["labels"] = labels

    if not errors:
        _, problems = parse_task(task)
        errors.extend(problems)
    return task, errors


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
