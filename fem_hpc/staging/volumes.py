"""A task's mounts: a task names what to mount and where, the site config maps names to host paths.
A task never names a host path. What a task may name: a site volume (config `volumes`), a path
variable the site declares (config `legacy.variables` with mode ro/rw), its own work dir, and its
source checkout; a site volume or variable is read-only unless both the site allows rw and the task
asks for it, and a `subpath` below any of them never leads out of it."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..layout import source_dir
from .errors import VolumeError

if TYPE_CHECKING:
    from ..config import SiteConfig
    from ..model import Task, VolumeRequest



@dataclass(frozen=True)
class Mount:
    source: Path  # host path, resolved
    target: str  # absolute path inside the container
    read_only: bool = True

    @property
    def mode(self) -> str:
        return "ro" if self.read_only else "rw"


# Characters that would change the meaning of a `src:dst:mode` bind spec (docker -v, apptainer --bind).
_SPEC_BREAKERS = (":", ",", "\0", "\n")


def check_bind_path(path: str, what: str) -> str:
    if any(c in path for c in _SPEC_BREAKERS):
        raise VolumeError(f"{what} {path!r} contains ':' or ',' and cannot be bind-mounted")
    return path


def _under(root: Path, subpath: str | None, what: str) -> Path:
    """`root/subpath` resolved, refused when a symlink leads it out of the root (real paths compared)."""
    real_root = Path(os.path.realpath(root))
    if subpath is None:
        return real_root
    source = Path(os.path.realpath(real_root / subpath))
    if source != real_root and real_root not in source.parents:
        raise VolumeError(f"{what}: subpath {subpath!r} leads to {str(source)!r}, outside {str(real_root)!r}")
    return source


def _variable_root(req: VolumeRequest, site: SiteConfig) -> Path:
    mountable = site.legacy.mountable()
    var = mountable.get(req.name or "")
    if var is None:
        raise VolumeError(f"variable {req.name!r} is not a path this site lets tasks mount (legacy.variables with "
                          f"mode ro or rw: {sorted(mountable)})")
    if req.mode == "rw" and var.mode != "rw":
        raise VolumeError(f"variable {req.name!r} is read-only on this site")
    return Path(var.value)


def resolve_volumes(task: Task, site: SiteConfig, workdir: Path) -> list[Mount]:
    """The host side of every volume the task asks for (`workdir` is the task's work dir). Raises
    VolumeError when a name is unknown, a path is gone, a subpath leaves its root, or rw is asked of
    a read-only site volume or variable (the policy check says the same at intake; this is the check
    at the moment of use). A subpath of the work dir is created (it is the task's own area)."""
    mounts: list[Mount] = []
    for req in task.volumes:
        what = f"volume {req.name!r}" if req.name else f"{req.kind} volume at {req.target!r}"
        if req.kind == "workdir":
            if req.subpath is not None:
                (workdir / req.subpath).mkdir(parents=True, exist_ok=True)
            source, read_only = _under(workdir, req.subpath, what), req.mode == "ro"
        elif req.kind == "checkout":
            source, read_only = Path(os.path.realpath(source_dir(task, workdir))), req.mode == "ro"
        elif req.kind == "variable":
            source, read_only = _under(_variable_root(req, site), req.subpath, what), req.mode != "rw"
        else:
            vol = site.volumes.get(req.name or "")
            if vol is None:
                raise VolumeError(f"unknown volume {req.name!r} (this site has: {sorted(site.volumes)})")
            if req.mode == "rw" and vol.mode != "rw":
                raise VolumeError(f"volume {req.name!r} is read-only on this site")
            source = _under(Path(vol.path), req.subpath, what)
            read_only = not (req.mode == "rw" and vol.mode == "rw")
        # (a checkout is made at stage-in: `fem-hpc render` shows the launch line before it exists)
        if not source.exists() and req.kind != "checkout":
            raise VolumeError(f"{what}: host path {str(source)!r} does not exist")
        check_bind_path(str(source), f"{what}: host path")
        check_bind_path(req.target, f"{what}: target")
        mounts.append(Mount(source=source, target=req.target, read_only=read_only))
    return mounts


def volume_env(task: Task, site: SiteConfig, workdir: Path, *, in_container: bool) -> dict[str, str]:
    """`FEM_VOLUME_<NAME>` for every volume of the task: where the task finds it. In a container
    that is the volume's target; a plain process (local, or a batch job without an image) cannot
    have anything mounted at the target, so it gets the host path instead. One variable name, so
    the same code finds its data under every executor. (A plain process is not sandboxed: read-only
    is then up to the file system's permissions, not to a mount.) Only named volumes get one: the
    work area and a checkout are the task's own directories."""
    if not task.volumes:
        return {}
    if in_container:
        return {_env_name(req.name): req.target for req in task.volumes if req.name}
    mounts = resolve_volumes(task, site, workdir)  # in the task's order
    return {_env_name(req.name): str(m.source) for req, m in zip(task.volumes, mounts, strict=True) if req.name}


def _env_name(volume: str) -> str:
    return "FEM_VOLUME_" + "".join(c if c.isalnum() else "_" for c in volume.upper())


def check_targets(mounts: list[Mount], reserved: str) -> None:
    """A volume may not sit on the work dir's own mount point or above it (it would hide the job)."""
    for m in mounts:
        t = m.target.rstrip("/") or "/"
        if t == reserved or reserved.startswith(t + "/") or t == "/":
            raise VolumeError(f"volume target {m.target!r} would hide the work dir mounted at {reserved}")
