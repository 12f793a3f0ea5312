"""How a task's command runs inside a container runtime from a job script.

`stage_image` puts the image on the login node before the job is submitted (compute nodes often
have no internet) and returns what `container_launch` runs. `container_launch` is a pure function
(argv in, argv out): the executors put its result in the common wrapper's `launch` prefix and
`env_exports`. It serves the apptainer executor and the batch executors (Slurm, PBS), whose job
scripts run the task's command inside the site's runtime:

    exec <launch...> <task argv...>

Task env values never appear in argv. The wrapper exports them in the subshell that execs the
launcher; apptainer sees them as APPTAINERENV_<NAME> (SINGULARITYENV_<NAME>), which survive
`--cleanenv`; docker gets `-e NAME` (by name only) and reads the value from its own environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..model import memory_mib
from .volumes import Mount, check_bind_path, check_targets

if TYPE_CHECKING:
    from ..config import SiteConfig
    from ..executors.base import Job

Runtime = Literal["apptainer", "singularity", "docker"]


def env_prefix(runtime: str, binary: str | None = None) -> str:
    """APPTAINERENV_ or SINGULARITYENV_: after the binary actually used when known."""
    name = Path(binary).name if binary else runtime
    return "SINGULARITYENV_" if "singularity" in name else "APPTAINERENV_"


def docker_container_name(task_id: str, node: str | None) -> str:
    return f"fem-{node}-{task_id}" if node else f"fem-{task_id}"


def docker_cleanup_argv(task_id: str, node: str | None = None, binary: str = "docker") -> list[str]:
    """Removes a batch job's container if it outlived its `docker run` (a SIGKILLed client leaves
    the container running): for the batch executors' cancel and after_final."""
    return [binary, "rm", "-f", docker_container_name(task_id, node)]


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
    network: str = "none",
    node: str | None = None,
    labels: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
) -> tuple[list[str], list[tuple[str, str]]]:
    """(launch argv prefix, env exports) to run `job`'s command in a container.

    runtime: "apptainer"/"singularity" (`image` is the SIF path, already staged on the login node)
    or "docker" (`image` a reference the daemon already holds: pulled at stage-in). The work dir is
    bound read-write at its own path, so the wrapper's paths are the same inside and out; `mounts`
    are the task's named volumes (staging.volumes.resolve_volumes). Raises VolumeError when a
    volume target would hide the work dir, ValueError for an unknown runtime.
    """
    workdir = check_bind_path(str(job.workdir), "work dir")
    check_targets(list(mounts), workdir)  # VolumeError: a volume would hide the work dir
    rundir = str(job.rundir)
    task = job.task
    if runtime in ("apptainer", "singularity"):
        exe = binary or runtime
        argv = [exe, "exec", "--containall", "--cleanenv", "--pwd", rundir, "--bind", f"{workdir}:{workdir}:rw"]
        for m in mounts:
            argv += ["--bind", f"{m.source}:{m.target}:{m.mode}"]
        if task.resources.gpus:
            argv.append("--nv")
        argv += [*extra_args, image]
        prefix = env_prefix(runtime, exe)
        return argv, [(f"{prefix}{name}", value) for name, value in sorted(task.env.items())]
    if runtime == "docker":
        exe = binary or "docker"
        argv = [exe, "run", "--rm", "--init", "--name", docker_container_name(task.id, node),
                "--label", f"fem.task_id={task.id}"]
        if node:
            argv += ["--label", f"fem.node={node}"]
        for key, value in sorted((labels or {}).items()):
            argv += ["--label", f"{key}={value}"]
        argv += ["--network", network, "--security-opt", "no-new-privileges", "--cap-drop", "ALL"]
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


def find_runtime_binary(runtime: Runtime, configured: str | None = None) -> str:
    """Absolute path of the runtime's binary: the configured one, else (apptainer) apptainer then
    singularity, (docker) docker, on PATH. Raises ImageError naming what is missing."""
    import shutil

    from .images import ImageError

    if configured:
        candidates: tuple[str, ...] = (configured,)
    elif runtime == "docker":
        candidates = ("docker",)
    else:
        candidates = ("apptainer", "singularity")
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise ImageError(f"container runtime not found: {' or '.join(candidates)} is not on PATH")


def stage_image(
    runtime: Runtime,
    site: SiteConfig,
    image: str,
    *,
    binary: str | None = None,
    cache_dir: Path | None = None,
    pull_policy: Literal["if-not-present", "always", "never"] = "if-not-present",
    insecure_registries: Sequence[str] = (),
    docker_client: Any = None,
    progress: Any = None,
) -> str:
    """Stage `image` on this (login) host for a batch job and return the `image` argument of
    `container_launch`: the SIF path for apptainer/singularity (cache `state_dir/sif` unless
    `cache_dir`), the pulled reference for docker (through `docker_client`, default docker.from_env()).
    Credentials come from `site.registries`. Raises ImageError with a message for the user."""
    from .images import (
        ImageError,
        apptainer_env_credentials,
        credentials_for,
        docker_image_lock,
        ensure_sif,
        note_docker_use,
        parse_image_ref,
        sif_path,
    )

    ref = parse_image_ref(image)
    if runtime == "docker":
        # Under the image's lock, which the GC takes before it evicts an image fem-hpc pulled.
        with docker_image_lock(site.state_dir, ref):
            pulled = _docker_stage(site, ref, pull_policy, docker_client, progress)
            note_docker_use(site.state_dir, ref, pulled=pulled)
        return ref.pull_ref
    exe = find_runtime_binary(runtime, binary)
    cache = cache_dir or site.state_dir / "sif"
    if pull_policy == "never":
        target = sif_path(cache, ref)
        if not target.exists():
            raise ImageError(f"image {ref} is not in the SIF cache ({target}) and pull_policy is 'never'")
        return str(target)
    args = []
    if ref.registry in insecure_registries:
        args.append("--nohttps" if "singularity" in Path(exe).name else "--no-https")
    return str(ensure_sif(exe, ref, cache, pull_args=args, force=pull_policy == "always",
                          env=apptainer_env_credentials(exe, credentials_for(site, ref))))


def _docker_stage(site: SiteConfig, ref: Any, pull_policy: str, docker_client: Any, progress: Any) -> bool:
    """Make the daemon hold `ref`; True when it had to be pulled."""
    import docker
    import docker.errors

    from .images import ImageError, credentials_for, docker_pull

    try:
        client = docker_client or docker.from_env()
        if pull_policy != "always":
            try:
                client.images.get(ref.pull_ref)
                return False
            except docker.errors.ImageNotFound:
                if pull_policy == "never":
                    raise ImageError(f"image {ref} is not present and pull_policy is 'never'") from None
    except docker.errors.DockerException as exc:
        raise ImageError(f"cannot reach the docker daemon: {exc}") from None
    docker_pull(client, ref, credentials_for(site, ref), progress=progress)
    return True
