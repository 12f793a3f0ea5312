"""Host paths of legacy task documents, mapped by rule (not by equality with a site volume).

A real document mounts templates such as ``$SANDBOX_PATH/%%user_id%%/%%execution_id%%``,
``$SANDBOX_PATH/flcore`` and ``$HOST_FEMC_PATH/config/rabbitmq-certificates`` (../shared/FEM-REAL.md).
After placeholder resolution (:mod:`.placeholders`) each path must fall under exactly one rule:

* ``workdir``: the task's own work area ``<sandbox>/<user_id>/<execution_id>`` (or a directory in it),
  read-write; the same directory the replies and ``send_files`` use.
* ``checkout``: ``<sandbox>/<repo>`` where ``source_code`` names repository ``<repo>``: the task's
  checkout of that source at the pinned ref, read-write (it is the task's own copy); the command runs
  from its target (:func:`working_dir`), as the image's WORKDIR expects.
* ``variable``: a path at or under the absolute value of a site-declared variable (``legacy.variables``)
  whose mode is ``ro`` (the default) or ``rw``; ``none`` variables are never mount roots.
* ``site_volume``: exactly a configured site volume's path, read-only (as the mapping did before).

Everything else is refused with the field and the reason: a relative path, ``..`` anywhere, a character
that breaks a bind spec, any other path inside the sandbox (another execution, the sandbox itself), a
symlink anywhere below the sandbox, a symlink leading out of a variable's root, a variable or volume path
that contains or lies inside the sandbox or another protected directory (state dir, work root), and a path
outside every root (``/etc``). Decisions look at the file system (``os.path.realpath``) at mapping time;
the executor binds the resolved source, so a symlink swapped in later cannot redirect an existing mount.
"""

from __future__ import annotations

import os
import posixpath
import re
import shlex
from collections.abc import Mapping, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from fem_hpc.config import VolumeConfig
from fem_hpc.model import FieldError

from .errors import DocumentError
from .placeholders import SiteVariables

__all__ = [
    "HostMount",
    "HostPathRules",
    "MountKind",
    "map_host_path",
    "map_volumes",
    "repository_name",
    "working_dir",
]

_BIND_BREAKERS = (":", ",", "\0", "\n")  # would change the meaning of a src:dst:mode bind spec
_REPO_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


class MountKind(StrEnum):
    WORKDIR = "workdir"
    CHECKOUT = "checkout"
    VARIABLE = "variable"
    SITE_VOLUME = "site_volume"


class HostMount(BaseModel):
    """One mapped ``volumes[i]`` entry.

    ``source`` is the host directory to bind: for ``workdir`` the work area (or the directory in it), for
    ``variable`` and ``site_volume`` the resolved host path; None for ``checkout``, whose source is the
    task's checkout, known only after stage-in. ``subpath`` is the part below the work area (``workdir``
    only, None for the work area itself). ``name`` is the variable, the site volume or the repository.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: MountKind
    host_path: str  # the document's path after placeholder resolution, normalized
    source: Path | None
    target: str
    mode: Literal["ro", "rw"]
    name: str | None = None
    subpath: str | None = None


class _Root(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: Path  # as configured (normalized, absolute)
    mode: Literal["ro", "rw"]


class HostPathRules(BaseModel):
    """What one request's host paths may be mapped to. Build it with :meth:`build`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sandbox: Path
    workdir: Path
    repository: str | None = None
    variables: dict[str, _Root]
    site_volumes: dict[str, _Root]
    protected: list[Path]

    @classmethod
    def build(
        cls,
        *,
        sandbox: Path,
        workdir: Path,
        variables: SiteVariables,
        site_volumes: Mapping[str, VolumeConfig],
        source_url: str | None = None,
        protected: Sequence[Path] = (),
    ) -> HostPathRules:
        """``workdir`` is the task's work area exactly as the handler makes it
        (``<sandbox>/<user_id>/<execution_id>``); ``source_url`` the document's ``source_code.url`` (flags
        allowed, e.g. ``... --branch production``); ``protected`` the directories no variable or site volume
        mount may expose (pass the state dir and the work root; the sandbox always is)."""
        sandbox = Path(os.path.normpath(os.path.abspath(sandbox)))
        workdir = Path(os.path.normpath(os.path.abspath(workdir)))
        if sandbox not in workdir.parents:
            raise ValueError(f"the work area {workdir} must be inside the sandbox {sandbox}")
        roots = {
            name: _Root(path=Path(os.path.normpath(value)), mode="rw" if variables.modes[name] == "rw" else "ro")
            for name, value in variables.values.items()
            if variables.modes.get(name) in ("ro", "rw") and value.startswith("/")
        }
        volumes = {name: _Root(path=Path(os.path.normpath(v.path)), mode="ro") for name, v in site_volumes.items()}
        return cls(
            sandbox=sandbox,
            workdir=workdir,
            repository=repository_name(source_url) if source_url else None,
            variables=roots,
            site_volumes=volumes,
            protected=[Path(os.path.normpath(os.path.abspath(p))) for p in (sandbox, *protected)],
        )


def repository_name(url: str) -> str | None:
    """``'https://host/org/flcore.git --branch production'`` -> ``'flcore'``; also ``git@host:org/x.git``,
    ``git://127.0.0.1:9418/x``. None when no safe name comes out."""
    try:
        words = shlex.split(url)
    except ValueError:
        return None
    if not words:
        return None
    last = words[0].rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    name = last.removesuffix(".git")
    return name if _REPO_NAME.fullmatch(name) and name not in (".", "..") else None


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _check_text(text: str, field: str, what: str) -> str:
    if not text.startswith("/"):
        raise DocumentError(field, f"{what} {text!r} must be an absolute path (after placeholders)")
    bad = [c for c in _BIND_BREAKERS if c in text]
    if bad:
        raise DocumentError(field, f"{what} {text!r} contains {bad[0]!r}, which cannot be bind-mounted")
    if ".." in text.split("/"):
        raise DocumentError(field, f"{what} {text!r} contains '..'")
    return posixpath.normpath(text)


def _no_symlink_below(path: Path, sandbox: Path, field: str) -> None:
    """Inside the sandbox no symlink is followed: the real path must be the sandbox's real path plus the
    same components."""
    expected = _real(sandbox) / path.relative_to(sandbox)
    real = _real(path)
    if real != expected:
        raise DocumentError(field, f"host_path {str(path)!r} goes through a symlink in the sandbox (it leads to "
                                   f"{str(real)!r}); symlinks are not followed there")


def _check_target(target: Any, field: str) -> str:
    if not isinstance(target, str) or not target:
        raise DocumentError(field, "container_path must be a non-empty string")
    text = _check_text(target, field, "container_path")
    if text == "/":
        raise DocumentError(field, "container_path '/' would hide the whole container")
    return text


def map_host_path(host_path: Any, target: Any, field: str, rules: HostPathRules) -> HostMount:
    """Map one resolved ``host_path`` (mounted at ``target``); ``field`` names the volume entry (e.g.
    ``task_info.volumes[2]``). Raises DocumentError naming ``field.host_path`` or ``field.container_path``."""
    hfield, tfield = f"{field}.host_path", f"{field}.container_path"
    if not isinstance(host_path, str) or not host_path:
        raise DocumentError(hfield, "host_path must be a non-empty string")
    path = Path(_check_text(host_path, hfield, "host_path"))
    target = _check_target(target, tfield)
    sandbox = rules.sandbox

    if _within(path, sandbox):
        if _within(path, rules.workdir):
            _no_symlink_below(path, sandbox, hfield)
            rel = path.relative_to(rules.workdir).as_posix()
            return HostMount(kind=MountKind.WORKDIR, host_path=str(path), source=path, target=target, mode="rw",
                             subpath=None if rel == "." else rel)
        if rules.repository is not None and path == sandbox / rules.repository:
            _no_symlink_below(path, sandbox, hfield)
            return HostMount(kind=MountKind.CHECKOUT, host_path=str(path), source=None, target=target, mode="rw",
                             name=rules.repository)
        checkout = f" and <sandbox>/{rules.repository} (the source checkout)" if rules.repository else ""
        raise DocumentError(hfield, f"host_path {str(path)!r} is inside the sandbox {str(sandbox)!r}, where only the "
                                    f"task's own work area {str(rules.workdir)!r}{checkout} may be mounted")

    real = _real(path)
    for protected in rules.protected:
        real_protected = _real(protected)
        if _within(real, real_protected) or _within(real_protected, real):
            shown = "" if real == path else f" (it resolves to {str(real)!r})"
            raise DocumentError(hfield, f"host_path {str(path)!r}{shown} would expose {str(protected)!r}, which "
                                        "no task may mount")

    for name, root in sorted(rules.site_volumes.items()):
        if path == root.path:
            return HostMount(kind=MountKind.SITE_VOLUME, host_path=str(path), source=real, target=target,
                             mode=root.mode, name=name)
    matches = [(len(root.path.parts), name, root) for name, root in rules.variables.items() if _within(path, root.path)]
    if matches:
        _, name, root = max(matches)
        if not _within(real, _real(root.path)):
            raise DocumentError(hfield, f"host_path {str(path)!r} leads through a symlink to {str(real)!r}, outside "
                                        f"${name} ({str(root.path)!r})")
        return HostMount(kind=MountKind.VARIABLE, host_path=str(path), source=real, target=target, mode=root.mode,
                         name=name)
    raise DocumentError(hfield, f"host_path {str(path)!r} is not the task's work area, its source checkout, under a "
                                "path variable of this site (legacy.variables) or a site volume")


def map_volumes(volumes: Any, rules: HostPathRules, field: str = "task_info.volumes"
                ) -> tuple[list[HostMount], list[FieldError]]:
    """Map a document's resolved ``volumes`` list (``[{'host_path', 'container_path'}]``; None or ``''`` =
    none). Returns the mounts and every problem (a target used twice included); use the mounts only when
    the problem list is empty. Call it only when :func:`~.placeholders.resolve_document` found no problem
    (an unresolved template would be reported a second time here, as not absolute)."""
    if volumes is None or volumes == "":
        return [], []
    if not isinstance(volumes, list):
        return [], [FieldError(field=field, message="must be a list of {host_path, container_path}")]
    mounts: list[HostMount] = []
    errors: list[FieldError] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(volumes):
        where = f"{field}[{index}]"
        if not isinstance(entry, dict):
            errors.append(FieldError(field=where, message="must be a dict with host_path and container_path"))
            continue
        try:
            mount = map_host_path(entry.get("host_path"), entry.get("container_path"), where, rules)
        except DocumentError as exc:
            errors.append(exc.to_field_error())
            continue
        if mount.target in seen:
            errors.append(FieldError(field=f"{where}.container_path",
                                     message=f"{mount.target!r} is also the target of {field}[{seen[mount.target]}]"))
            continue
        seen[mount.target] = index
        mounts.append(mount)
    return mounts, errors


def working_dir(mounts: Sequence[HostMount]) -> str | None:
    """Where the command runs: the checkout's target when the document mounts its source, else None (the
    executor's default)."""
    for mount in mounts:
        if mount.kind == MountKind.CHECKOUT:
            return mount.target
    return None
