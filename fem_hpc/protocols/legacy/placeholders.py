"""Placeholders of legacy task documents, resolved by fem-hpc itself (never by a shell).

Two kinds occur in the real documents (../shared/FEM-REAL.md):

* ``%%name%%`` anywhere in a string, for ``user_id``, ``execution_id``, ``node_name``, ``task_id`` (the
  document's ``_id``) and ``tool_id``, from the request and the site (:class:`PlaceholderContext`).
  A value is only substituted when it is a safe identifier (``[A-Za-z0-9][A-Za-z0-9_.-]*``, at most 128
  characters), so a ``user_id`` of ``../x`` cannot walk out of a path; an unknown name
  (``%%../../etc%%``) or an unterminated ``%%`` is an error.
* ``$NAME`` as the whole value or as a path prefix ``$NAME/...``, from the variables the **site**
  declares (``legacy.variables``, plus ``NODE_NAME`` = the node and ``SANDBOX_PATH`` = the legacy
  sandbox: :class:`SiteVariables`). The service's own environment is never read: ``$HOME`` or
  ``$FEM_HPC_BROKER_URL`` is an error naming the variable, unless the site declared that name.

Resolution is one pass: a variable's value (site-trusted) is not scanned for placeholders again, and
text substituted for ``%%name%%`` cannot form a new placeholder. Every error is a
:class:`~fem_hpc.protocols.legacy.errors.DocumentError` naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fem_hpc.config import LegacyVariable
from fem_hpc.model import FieldError

from .errors import DocumentError

__all__ = [
    "PLACEHOLDER_NAMES",
    "PlaceholderContext",
    "SiteVariables",
    "resolve_document",
    "resolve_text",
    "resolve_value",
]

PLACEHOLDER_NAMES = ("user_id", "execution_id", "node_name", "task_id", "tool_id")
# Where each placeholder's value comes from, for error messages.
_SOURCES = {
    "user_id": "the request's user_id",
    "execution_id": "execution.execution_id",
    "node_name": "the site's node",
    "task_id": "task_info._id",
    "tool_id": "the request's tool_id",
}
_SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_PLACEHOLDER = re.compile(r"%%(.*?)%%", re.DOTALL)
_VARIABLE = re.compile(r"\$([A-Za-z_][A-Za-z0-9_]*)(/.*)?", re.DOTALL)
_SHOWN = 80  # how much of a hostile value an error message repeats


def _show(text: str) -> str:
    return repr(text if len(text) <= _SHOWN else text[:_SHOWN] + "...")


class PlaceholderContext(BaseModel):
    """The values of the ``%%name%%`` placeholders for one request. A value is checked when a
    placeholder uses it, so a request whose odd ``_id`` is never used as ``%%task_id%%`` still runs;
    None means "not known for this request" and is an error when used."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    user_id: str | None = None
    execution_id: str | None = None
    node_name: str | None = None
    task_id: str | None = None  # the document's `_id` (e.g. 'flcore-server'), not fem-hpc's v1 task id
    tool_id: str | None = None

    def value(self, name: str, field: str) -> str:
        """The text for ``%%name%%`` used in ``field``; raises DocumentError when unknown or unsafe."""
        if name not in PLACEHOLDER_NAMES:
            known = ", ".join(f"%%{n}%%" for n in PLACEHOLDER_NAMES)
            raise DocumentError(field, f"unknown placeholder {_show('%%' + name + '%%')} (known: {known})")
        value = getattr(self, name)
        if value is None:
            raise DocumentError(field, f"%%{name}%% has no value in this request ({_SOURCES[name]} is missing)")
        if not _SAFE_ID.fullmatch(value):
            raise DocumentError(
                field,
                f"%%{name}%% would be {_show(value)} (from {_SOURCES[name]}), which is not a safe identifier "
                "([A-Za-z0-9][A-Za-z0-9_.-]*, at most 128 characters)",
            )
        return value


class SiteVariables(BaseModel):
    """The ``$NAME`` map of one site: name -> value, and name -> what a host path under the value may
    be mounted as (``ro``, ``rw``, or ``none`` for a plain value)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    values: dict[str, str]
    modes: dict[str, Literal["ro", "rw", "none"]]

    @classmethod
    def from_site(cls, declared: Mapping[str, LegacyVariable], *, node: str, sandbox: Path) -> SiteVariables:
        """``legacy.variables`` plus ``NODE_NAME`` (= ``node``, a plain value) and ``SANDBOX_PATH`` (=
        ``sandbox``; only the rules of :mod:`.hostpaths` decide what under it may be mounted, so its mode
        here is ``none``). The config model already refuses a declared NODE_NAME or SANDBOX_PATH."""
        values = {name: var.value for name, var in declared.items()}
        modes: dict[str, Literal["ro", "rw", "none"]] = {name: var.mode for name, var in declared.items()}
        values["NODE_NAME"], modes["NODE_NAME"] = node, "none"
        values["SANDBOX_PATH"], modes["SANDBOX_PATH"] = str(sandbox), "none"
        return cls(values=values, modes=modes)

    def get(self, name: str, field: str) -> str:
        if name not in self.values:
            raise DocumentError(
                field,
                f"${name} is not a variable this site declares (declared: "
                f"{', '.join('$' + n for n in sorted(self.values))}; add it under legacy.variables). "
                "fem-hpc never reads its own environment for a task document",
            )
        return self.values[name]


def _percent(text: str, field: str, ctx: PlaceholderContext) -> str:
    out: list[str] = []
    pos = 0
    for m in _PLACEHOLDER.finditer(text):
        out.append(text[pos : m.start()])
        out.append(ctx.value(m.group(1), field))
        pos = m.end()
    rest = text[pos:]
    if "%%" in rest:
        raise DocumentError(field, f"unterminated %% placeholder in {_show(text)} (placeholders are %%name%%)")
    out.append(rest)
    return "".join(out)


def resolve_text(text: str, field: str, ctx: PlaceholderContext, variables: SiteVariables | None = None) -> str:
    """Resolve the placeholders of one string used in ``field``.

    With ``variables``, a value starting with ``$`` must be ``$NAME`` or ``$NAME/rest`` with NAME declared
    by the site; the rest (and without ``$`` the whole text) then has its ``%%name%%`` substituted. Without
    ``variables`` a ``$`` is plain text (e.g. a user's parameter value). Raises DocumentError.
    """
    if variables is not None and text.startswith("$"):
        m = _VARIABLE.fullmatch(text)
        if m is None:
            raise DocumentError(
                field, f"{_show(text)} starts with '$' but is not $NAME or $NAME/path (NAME: letters, digits, _)"
            )
        value = variables.get(m.group(1), field)
        return value + _percent(m.group(2) or "", field, ctx)
    return _percent(text, field, ctx)


def resolve_value(value: Any, field: str, ctx: PlaceholderContext, variables: SiteVariables | None = None) -> Any:
    """:func:`resolve_text` on a string, element-wise on a list (``field[i]``) or dict (``field.key``);
    any other value (int, bool, None) is returned unchanged."""
    if isinstance(value, str):
        return resolve_text(value, field, ctx, variables)
    if isinstance(value, list | tuple):
        return [resolve_value(v, f"{field}[{i}]", ctx, variables) for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {k: resolve_value(v, f"{field}.{k}", ctx, variables) for k, v in value.items()}
    return value


def resolve_document(
    task_info: dict[str, Any], parametric_args: dict[str, Any], ctx: PlaceholderContext, variables: SiteVariables
) -> tuple[dict[str, Any], dict[str, Any], list[FieldError]]:
    """Copies of ``task_info`` and ``parametric_args`` with their placeholders resolved, and every problem.

    * ``volumes[i].host_path``, ``var_envs`` values and ``command.args[i].default_value``: ``%%name%%`` and
      ``$NAME`` (documents are written by tool authors for the site's variables);
    * ``parametric_args`` values: ``%%name%%`` only; a leading ``$`` stays plain text, since these are the
      user's own values and must not be able to read site variables;
    * other fields are left as they are (the mapping does not use placeholders there).

    Shapes the mapping rejects anyway (volumes not a list, ...) are left untouched for it to report.
    """
    errors: list[FieldError] = []
    info = dict(task_info)

    def attempt(value: Any, field: str, with_variables: bool) -> Any:
        try:
            return resolve_value(value, field, ctx, variables if with_variables else None)
        except DocumentError as exc:
            errors.append(exc.to_field_error())
            return value

    volumes = info.get("volumes")
    if isinstance(volumes, list):
        resolved_volumes = []
        for i, entry in enumerate(volumes):
            if isinstance(entry, dict) and isinstance(entry.get("host_path"), str):
                entry = {**entry, "host_path": attempt(entry["host_path"], f"task_info.volumes[{i}].host_path", True)}
            resolved_volumes.append(entry)
        info["volumes"] = resolved_volumes
    envs = info.get("var_envs")
    if isinstance(envs, dict):
        info["var_envs"] = {k: attempt(v, f"task_info.var_envs.{k}", True) for k, v in envs.items()}
    elif isinstance(envs, list):  # [{'name': N, 'value': V}] or ['N=V']
        resolved_envs: list[Any] = []
        for i, entry in enumerate(envs):
            if isinstance(entry, dict) and "value" in entry:
                entry = {**entry, "value": attempt(entry["value"], f"task_info.var_envs[{i}].value", True)}
            elif isinstance(entry, str) and "=" in entry:
                name, _, val = entry.partition("=")
                entry = f"{name}={attempt(val, f'task_info.var_envs[{i}]', True)}"
            resolved_envs.append(entry)
        info["var_envs"] = resolved_envs
    command = info.get("command")
    if isinstance(command, dict) and isinstance(command.get("args"), list):
        args = []
        for i, arg in enumerate(command["args"]):
            if isinstance(arg, dict) and "default_value" in arg:
                arg = {**arg, "default_value": attempt(arg["default_value"],
                                                       f"task_info.command.args[{i}].default_value", True)}
            args.append(arg)
        info["command"] = {**command, "args": args}
    params = {k: attempt(v, f"parametric_args.{k}", False) for k, v in parametric_args.items()}
    return info, params, errors
