"""Named volumes: a task names a site volume and a target; the site config maps the name to a host
path. A task never names a host path, and a volume is read-only unless both the site allows rw and
the task asks for it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import VolumeError

if TYPE_CHECKING:
    from ..config import SiteConfig
    from ..model import Task



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


def resolve_volumes(task: Task, site: SiteConfig) -> list[Mount]:
    """The host side of every volume the task asks for. Raises VolumeError when a name is unknown,
    a path is gone, or rw is asked of a read-only site volume (the policy check says the same at
    intake; this is the check at the moment of use)."""
    mounts: list[Mount] = []
    for req in task.volumes:
        vol = site.volumes.get(req.name)
        if vol is None:
            raise VolumeError(f"unknown volume {req.name!r} (this site has: {sorted(site.volumes)})")
        if req.mode == "rw" and vol.mode != "rw":
            raise VolumeError(f"volume {req.name!r} is read-only on this site")
        source = Path(vol.path).resolve()
        if not source.exists():
            raise VolumeError(f"volume {req.name!r}: host path {str(source)!r} does not exist")
        check_bind_path(str(source), f"volume {req.name!r}: host path")
        check_bind_path(req.target, f"volume {req.name!r}: target")
        mounts.append(Mount(source=source, target=req.target, read_only=not (req.mode == "rw" and vol.mode == "rw")))
    return mounts


def volume_env(task: Task, site: SiteConfig, *, in_container: bool) -> dict[str, str]:
    """`FEM_VOLUME_<NAME>` for every volume of the task: where the task finds it. In a container
    that is the volume's target; a plain process (local, or a batch job without an image) cannot
    have anything mounted at the target, so it gets the host path instead. One variable name, so
    the same code finds its data under every executor. (A plain process is not sandboxed: read-only
    is then up to the file system's permissions, not to a mount.)"""
    if not task.volumes:
        return {}
    if in_container:
        return {_env_name(req.name): req.target for req in task.volumes}
    mounts = resolve_volumes(task, site)  # in the task's order
    return {_env_name(req.name): str(m.source) for req, m in zip(task.volumes, mounts, strict=True)}


def _env_name(volume: str) -> str:
    return "FEM_VOLUME_" + "".join(c if c.isalnum() else "_" for c in volume.upper())


def check_targets(mounts: list[Mount], reserved: str) -> None:
    """A volume may not sit on the work dir's own mount point or above it (it would hide the job)."""
    for m in mounts:
        t = m.target.rstrip("/") or "/"
        if t == reserved or reserved.startswith(t + "/") or t == "/":
            raise VolumeError(f"volume target {m.target!r} would hide the work dir mounted at {reserved}")
