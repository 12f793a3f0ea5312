"""How a task's command runs inside a container: the launch argv of the job scripts, and the
container spec of the docker executor. Both spell the same security posture (all capabilities
dropped, no-new-privileges, no network unless configured) and the same resource limits.

`container_launch` is a pure function (job in, argv out) used at render time: the apptainer
executor and the batch executors (Slurm, PBS) put its result in the common wrapper's `launch`
prefix and `env_exports`, so the job script runs

    exec <launch...> <task argv...>

The image is staged before that, on this host (staging.images.ensure_image). Task env values never
appear in argv. The wrapper exports them in the subshell that execs the launcher; apptainer sees
them as APPTAINERENV_<NAME> (SINGULARITYENV_<NAME>), which survive `--cleanenv`; docker gets
`-e NAME` (by name only) and reads the value from its own environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..layout import FEM_DIR, SCRIPT_NAME
from ..model import memory_mib
from ..staging.images import Runtime, flavor
from ..staging.volumes import Mount, check_bind_path, check_targets
from .base import Job

WORK_MOUNT = "/fem/work"  # the work dir inside every container of the docker executor


def env_prefix(binary: str | None, runtime: str = "apptainer") -> str:
    """APPTAINERENV_ or SINGULARITYENV_: after the binary actually used when known."""
    return f"{flavor(binary, runtime).upper()}ENV_"


def container_name(task_id: str, node: str | None) -> str:
    """The name of a task's container, for the docker executor and docker inside batch jobs alike:
    a second container of one task on one node is then refused by the daemon (409)."""
    return f"fem-{node}-{task_id}" if node else f"fem-{task_id}"


def docker_cleanup_argv(task_id: str, node: str | None = None, binary: str = "docker") -> list[str]:
    """Removes a batch job's container if it outlived its `docker run` (a SIGKILLed client leaves
    the container running): for the batch executors' cancel and after_final."""
    return [binary, "rm", "-f", container_name(task_id, node)]


def resolve_user(user: str | None) -> str | None:
    """'auto' = the uid:gid of this process (who owns the work dir); None = the image's user."""
    if user == "auto":
        return f"{os.getuid()}:{os.getgid()}"
    return user


def container_launch(
    runtime: Runtime,
    job: Job,
    image: str,
    mounts: Sequence[Mount] = (),
    *,
    binary: str | None = None,
    user: str | None = "auto",
    node: str | None = None,
    extra_args: Sequence[str] = (),
) -> tuple[list[str], list[tuple[str, str]]]:
    """(launch argv prefix, env exports) to run `job`'s command in a container.

    runtime: "apptainer"/"singularity" (`image` is the SIF path, already staged on the login node)
    or "docker" (`image` a reference the daemon already holds: pulled at stage-in). The work dir is
    bound read-write at its own path, so the wrapper's paths are the same inside and out; `mounts`
    are the task's volumes (staging.volumes.resolve_volumes). Ports are never published here: a batch
    job's container shares no network (docker: `--network none`). Raises VolumeError when a
    volume target would hide the work dir, ValueError for an unknown runtime.
    """
    workdir = check_bind_path(str(job.workdir), "work dir")
    check_targets(list(mounts), workdir)  # VolumeError: a volume would hide the work dir
    rundir = job.container_rundir or str(job.rundir)  # a mounted checkout is run from its target
    task = job.task
    if runtime in ("apptainer", "singularity"):
        exe = binary or runtime
        argv = [exe, "exec", "--containall", "--cleanenv", "--pwd", rundir, "--bind", f"{workdir}:{workdir}:rw"]
        for m in mounts:
            argv += ["--bind", f"{m.source}:{m.target}:{m.mode}"]
        if task.resources.gpus:
            argv.append("--nv")
        argv += [*extra_args, image]
        prefix = env_prefix(exe, runtime)
        return argv, [(f"{prefix}{name}", value) for name, value in sorted(task.env.items())]
    if runtime == "docker":
        exe = binary or "docker"
        argv = [exe, "run", "--rm", "--init", "--name", container_name(task.id, node),
                "--label", f"fem.task_id={task.id}"]
        if node:
            argv += ["--label", f"fem.node={node}"]
        argv += ["--network", "none", "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]
        uid_gid = resolve_user(user)
        if uid_gid:
            argv += ["--user", uid_gid]
        argv += ["-v", f"{workdir}:{workdir}:rw"]
        for m in mounts:
            argv += ["-v", f"{m.source}:{m.target}:{m.mode}"]
        argv += ["-w", rundir]
        res = task.resources
        if res.cpus:
            argv += ["--cpus", str(res.cpus)]
        if res.memory:
            mib = memory_mib(res.memory)
            argv += ["--memory", f"{mib}m", "--memory-swap", f"{mib}m"]
        if res.gpus:
            argv += ["--gpus", str(res.gpus)]
        for name in sorted(task.env):
            argv += ["-e", name]
        # The task's command runs as given, not as arguments of the image's ENTRYPOINT.
        argv += ["--entrypoint", "", *extra_args, image]
        return argv, sorted(task.env.items())
    raise ValueError(f"unknown container runtime {runtime!r} (apptainer, singularity or docker)")


def in_container(job: Job, path: Path) -> str:
    """A path under the job's work dir as the docker executor's container sees it."""
    rel = path.relative_to(job.workdir)
    return WORK_MOUNT if str(rel) == "." else f"{WORK_MOUNT}/{rel.as_posix()}"


def docker_create_args(job: Job, image: str, mounts: Sequence[Mount], *, name: str, labels: Mapping[str, str],
                       user: tuple[int, int], network: str, init: bool = True,
                       cap_add: Sequence[str] = (), publish_host: str = "0.0.0.0") -> dict[str, Any]:
    """The keyword arguments of `containers.create` for the docker executor: the wrapper script
    (rendered for the inside, see `in_container`) run by /bin/sh as `user`, the work dir bound
    read-write at WORK_MOUNT, the task's volumes at their targets, its ports published on
    `publish_host`, never privileged."""
    import docker.types

    task = job.task
    binds = [docker.types.Mount(target=WORK_MOUNT, source=str(job.workdir), type="bind", read_only=False)]
    for m in mounts:
        binds.append(docker.types.Mount(target=m.target, source=str(m.source), type="bind", read_only=m.read_only))
    args: dict[str, Any] = {
        "image": image,
        "entrypoint": ["/bin/sh"],
        "command": [f"{WORK_MOUNT}/{FEM_DIR}/{SCRIPT_NAME}"],
        "name": name,
        "labels": dict(labels),
        "user": f"{user[0]}:{user[1]}",
        "working_dir": WORK_MOUNT,
        "mounts": binds,
        "network_mode": network,
        "privileged": False,
        "cap_drop": ["ALL"],
        "security_opt": ["no-new-privileges"],
        "init": init,
        "auto_remove": False,  # removed in after_final, once its exit code has been read
        "detach": True,
        "stdin_open": False,
    }
    if cap_add:
        args["cap_add"] = list(cap_add)
    if task.ports:
        args["ports"] = {f"{p.container_port}/{p.protocol}": (publish_host, p.host_port) for p in task.ports}
    res = task.resources
    if res.cpus:
        args["nano_cpus"] = int(res.cpus * 1_000_000_000)
    if res.memory:
        mib = memory_mib(res.memory)
        args["mem_limit"] = f"{mib}m"
        args["memswap_limit"] = f"{mib}m"  # no swap on top of the limit
    if res.gpus:
        args["device_requests"] = [docker.types.DeviceRequest(count=res.gpus, capabilities=[["gpu"]])]
    return args
