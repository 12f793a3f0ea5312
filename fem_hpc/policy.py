"""Site policy: what a valid task may still not do on this site."""

from __future__ import annotations

from fnmatch import fnmatchcase

from .config import SiteConfig, parse_port_ranges
from .model import FieldError, Task, memory_mib, walltime_seconds

CONTAINER_TYPES = ("docker", "apptainer")  # executors that run a task only inside its image


def executor_for(task: Task, site: SiteConfig) -> str:
    return task.executor or site.default_executor


def check_policy(task: Task, site: SiteConfig) -> list[FieldError]:
    errors: list[FieldError] = []

    def err(field: str, message: str) -> None:
        errors.append(FieldError(field=f"task.{field}", message=message))

    executor = executor_for(task, site)
    if executor not in site.executors:
        err("executor", f"executor {executor!r} is not configured on this node (configured: {sorted(site.executors)})")
    elif site.policy.executors is not None and executor not in site.policy.executors:
        err("executor", f"executor {executor!r} is not allowed by site policy")
    # The executor's *type* decides, whatever name the site gave it (`containers: {type: docker}`).
    elif site.executor_type(executor) in CONTAINER_TYPES and not task.image:
        err("image", f"executor {executor!r} (type {site.executor_type(executor)}) needs an image")

    if task.image and not any(fnmatchcase(task.image, g) for g in site.policy.images):
        err("image", f"image {task.image!r} is not allowed by site policy (policy.images)")
    if task.source and not any(fnmatchcase(task.source.git, g) for g in site.policy.git):
        err("source.git", f"git URL {task.source.git!r} is not allowed by site policy (policy.git)")

    for i, vol in enumerate(task.volumes):
        if vol.kind == "volume":
            site_vol = site.volumes.get(vol.name or "")
            if site_vol is None:
                err(f"volumes.{i}.name", f"unknown volume {vol.name!r} (this site has: {sorted(site.volumes)})")
            elif vol.mode == "rw" and site_vol.mode != "rw":
                err(f"volumes.{i}.mode", f"volume {vol.name!r} is read-only on this site")
        elif vol.kind == "variable":
            mountable = site.legacy.mountable()
            var = mountable.get(vol.name or "")
            if var is None:
                err(f"volumes.{i}.name", f"variable {vol.name!r} is not a path this site lets tasks mount "
                                         f"(legacy.variables with mode ro or rw: {sorted(mountable)})")
            elif vol.mode == "rw" and var.mode != "rw":
                err(f"volumes.{i}.mode", f"variable {vol.name!r} is read-only on this site")
    errors += _port_errors(task, site, executor)

    limits = site.policy.max_resources
    res = task.resources
    for name in ("cpus", "gpus", "nodes"):
        asked, cap = getattr(res, name), getattr(limits, name)
        if asked is not None and cap is not None and asked > cap:
            err(f"resources.{name}", f"{asked} exceeds the site maximum of {cap}")
    if res.memory and limits.memory and memory_mib(res.memory) > memory_mib(limits.memory):
        err("resources.memory", f"{res.memory} exceeds the site maximum of {limits.memory}")
    if res.walltime and limits.walltime and walltime_seconds(res.walltime) > walltime_seconds(limits.walltime):
        err("resources.walltime", f"{res.walltime} exceeds the site maximum of {limits.walltime}")
    return errors


def _port_errors(task: Task, site: SiteConfig, executor: str) -> list[FieldError]:
    """Published ports: only where the site allows them (policy.ports) and only on a docker executor
    whose containers have a network to publish them from."""
    if not task.ports:
        return []
    ranges = parse_port_ranges(list(site.policy.ports))
    errors = [FieldError(field=f"task.ports.{i}.host_port", message=f"host port {p.host_port} is not allowed by site "
                         f"policy (policy.ports: {site.policy.ports or 'none'})")
              for i, p in enumerate(task.ports) if not any(a <= p.host_port <= b for a, b in ranges)]
    if executor in site.executors:
        kind = site.executor_type(executor)
        network = site.executors[executor].get("network", "none")
        if kind != "docker":
            errors.append(FieldError(field="task.ports", message=f"executor {executor!r} (type {kind}) cannot "
                                     "publish ports; only a docker executor on a bridge or named network can"))
        elif network in ("none", "host"):
            errors.append(FieldError(field="task.ports", message=f"executor {executor!r} runs containers with network "
                                     f"{network!r}, where ports cannot be published"))
    return errors


def effective_task(task: Task, site: SiteConfig) -> Task:
    """The task with the site's default resources filled in where it asked for none."""
    defaults = site.policy.default_resources.model_dump(exclude_none=True)
    asked = task.resources.model_dump(exclude_none=True)
    merged = {**defaults, **asked}
    return task.model_copy(update={"resources": type(task.resources).model_validate(merged)})
