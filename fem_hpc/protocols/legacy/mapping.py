"""A legacy ``submit_run`` request mapped to a v1 TASK: command, arguments, source, env, resources,
volumes, outputs and image, with every problem reported by field."""

from __future__ import annotations

import hashlib
import json
import math
import posixpath
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ...config import SiteConfig
from ...model import FieldError, parse_task
from .codec import LegacyRequest
from .errors import DocumentError
from .hostpaths import HostMount, HostPathRules, MountKind, map_volumes
from .placeholders import PlaceholderContext, SiteVariables, resolve_document
from .ports import plan_ports, published_ports

_ID_COMPONENT = 57  # two components + 12 hex of parameters + 2 dots = 128 characters at most
_PARAMS_HASH_LEN = 12
_FLAG_TYPES = frozenset({"bool", "boolean", "flag"})
_TRUE_WORDS = frozenset({"true", "1", "yes", "on", "y"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off", "n", ""})
_MEMORY_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)\s*(?:([KMGTkmgt])[iI]?[bB]?)?$")
_MEMORY_FACTOR_K = {"K": 1, "M": 1024, "G": 1024**2, "T": 1024**3}

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


def legacy_workdir(site: SiteConfig, req: LegacyRequest) -> Path:
    """The legacy protocol's one work dir per execution: ``<sandbox>/<user_id>/<execution_id>`` (the
    sandbox is ``legacy.sandbox_path``, else ``work_root``), the same dir ``send_files`` returns."""
    sandbox = (site.legacy.sandbox_path or site.work_root).resolve()
    return sandbox / sanitize_id(req.user_id or "anonymous") / sanitize_id(req.execution_id or "none")


def _v1_volume(mount: HostMount, rules: HostPathRules) -> dict[str, str]:
    """A mapped host path as the v1 volume that names it (never the host path itself)."""
    out: dict[str, str] = {"target": mount.target, "mode": mount.mode}
    if mount.kind == MountKind.WORKDIR:
        out["kind"] = "workdir"
        if mount.subpath:
            out["subpath"] = mount.subpath
    elif mount.kind == MountKind.CHECKOUT:
        out["kind"] = "checkout"
    elif mount.kind == MountKind.VARIABLE:
        out.update(kind="variable", name=str(mount.name))
        rel = Path(mount.host_path).relative_to(rules.variables[str(mount.name)].path).as_posix()
        if rel != ".":
            out["subpath"] = rel
    else:
        out["name"] = str(mount.name)
    return out


def _volumes(info: dict[str, Any], site: SiteConfig, workdir: Path, variables: SiteVariables,
             source: dict[str, str] | None, errors: list[FieldError]) -> list[dict[str, str]]:
    raw = info.get("volumes")
    if raw is None or raw == "" or raw == []:
        return []
    code = info.get("source_code")
    url = code.get("url") if isinstance(code, dict) else code  # {'url': ...} or the URL itself
    url = url if isinstance(url, str) and source is not None else None
    rules = HostPathRules.build(sandbox=workdir.parents[1], workdir=workdir, variables=variables,
                                site_volumes=site.volumes, source_url=url,
                                protected=[site.state_dir, site.work_root])
    mounts, problems = map_volumes(raw, rules)
    errors.extend(problems)
    return [_v1_volume(m, rules) for m in mounts]


_CONTAINER_KINDS = ("docker", "apptainer", "slurm", "pbs")  # types that run a document's image


def _executor(site: SiteConfig, has_image: bool, has_volumes: bool, errors: list[FieldError]) -> str | None:
    """The executor a document runs on (legacy.executor, else default_executor / legacy.executor_no_image);
    None on error."""
    if has_image:
        name = site.legacy.executor or site.default_executor
        kind = site.executor_type(name)
        if kind == "local":
            key = "legacy.executor" if site.legacy.executor else "default_executor (legacy.executor is not set)"
            errors.append(FieldError(field="task_info.image", message=(
                f"the document runs in an image, but {key} names {name!r}, a local executor that runs no "
                f"containers; set legacy.executor to an executor of type {', '.join(_CONTAINER_KINDS)}")))
            return None
        return name
    name = site.legacy.executor_no_image
    if name is None:
        errors.append(FieldError(field="task_info.image", message=(
            "the document names no image, and this site runs legacy documents without an image only where "
            "legacy.executor_no_image says (e.g. local or slurm); it is not set")))
        return None
    if has_volumes and site.executor_type(name) not in ("docker", "apptainer"):
        errors.append(FieldError(field="task_info.volumes", message=(
            "the document mounts host paths but names no image: paths are mounted only into a container")))
        return None
    return name


def _ports(info: dict[str, Any], site: SiteConfig, executor: str | None,
           errors: list[FieldError]) -> tuple[list[dict[str, Any]], str | None]:
    """(the v1 ports to publish, the note for the reply about what could not be published)."""
    try:
        ports = published_ports(info.get("port_mappings"), site.policy.ports)
    except DocumentError as exc:
        errors.append(exc.to_field_error())
        return [], None
    if not ports or executor is None:
        return [], None
    settings = site.executors.get(executor, {})
    plan = plan_ports(ports, site.executor_type(executor), str(settings.get("network", "none")))
    return [p.model_dump() for p in plan.publish], plan.note


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


def to_task(req: LegacyRequest, site: SiteConfig) -> tuple[dict[str, Any], list[FieldError]]:
    """Map a legacy ``submit_run`` request to a v1 TASK dict (PROTOCOL.md) for this site.

    Returns the TASK and the problems found; the TASK is only usable when the list is empty, in which case
    :func:`fem_hpc.model.parse_task` accepted it (its own errors are returned otherwise). Decisions:

    * placeholders (``%%name%%``, ``$NAME`` from ``legacy.variables``) are resolved first
      (:func:`.placeholders.resolve_document`); any problem there ends the mapping with that problem.
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
    * ``volumes``: host paths mapped by rule (:mod:`.hostpaths`) to v1 volumes that name what they mount:
      the work area (``workdir``), the source checkout (``checkout``: the command then runs from it), a
      site variable's path (``variable``), a site volume. Nothing is mounted by host path.
    * executor: with an image ``legacy.executor`` (else ``default_executor``), which must run containers;
      without one ``legacy.executor_no_image``, which must be set.
    * ``port_mappings``: every host port inside ``policy.ports``; published where the executor can
      (docker on a bridge or named network), else the reply says so (label ``legacy_ports_note``).
    * ``pre_checks`` and ``persistent`` change nothing: what the original's pre-checks verify (the image
      is there, every host path maps, the source is allowed) stage-in always checks before anything
      runs, and a task's container is always removed after its run (what it wrote is in the work area).
    * ``labels``: ``legacy_tool_id``, ``legacy_action``, ``legacy_id`` (raw ``_id``),
      ``legacy_execution_id`` (raw execution id), ``legacy_user_id`` (raw user id).
    """
    errors: list[FieldError] = []
    task: dict[str, Any] = {}

    legacy_id, execution_id = req.task_info.get("_id"), req.execution.get("execution_id")
    if legacy_id is None or str(legacy_id).strip() == "":
        errors.append(FieldError(field="task_info._id", message="is required"))
    if execution_id is None or str(execution_id).strip() == "":
        errors.append(FieldError(field="execution.execution_id", message="is required"))
    if not errors:
        task["id"] = legacy_task_id(legacy_id, execution_id, req.parametric_args)
        task["execution_id"] = sanitize_id(execution_id)
    try:
        task["user_id"] = sanitize_id(req.user_id)
    except ValueError:
        task["user_id"] = "anonymous"

    workdir = legacy_workdir(site, req)
    variables = SiteVariables.from_site(site.legacy.variables, node=site.node, sandbox=workdir.parents[1])
    ctx = PlaceholderContext(user_id=req.user_id or None, execution_id=req.execution_id, node_name=site.node,
                             task_id=None if legacy_id is None else str(legacy_id), tool_id=req.tool_id or None)
    info, params, problems = resolve_document(req.task_info, req.parametric_args, ctx, variables)
    if problems:
        return task, errors + problems

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
    volumes = _volumes(info, site, workdir, variables, source, errors)
    if volumes:
        task["volumes"] = volumes
    executor = _executor(site, image is not None, bool(volumes), errors)
    if executor is not None and executor in (site.legacy.executor, site.legacy.executor_no_image):
        task["executor"] = executor  # else the site's default_executor, left to the task's default
    ports, note = _ports(info, site, executor, errors)
    if ports:
        task["ports"] = ports
    resources = _resources(info, errors)
    if resources:
        task["resources"] = resources
    outputs = _outputs(info, errors)
    if outputs:
        task["outputs"] = outputs
    labels = {"legacy_tool_id": req.tool_id, "legacy_action": req.action, "legacy_user_id": req.user_id}
    if legacy_id is not None:
        labels["legacy_id"] = str(legacy_id)
    if execution_id is not None:
        labels["legacy_execution_id"] = str(execution_id)
    if note:
        labels["legacy_ports_note"] = note
    task["labels"] = labels

    if not errors:
        _, problems = parse_task(task)
        errors.extend(problems)
    return task, errors
