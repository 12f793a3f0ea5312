"""The `apptainer` executor: the local executor's process handling (own process group, cancel,
walltime, re-adoption by /proc) with the task's command run inside the image by
`apptainer exec --containall --cleanenv --pwd <rundir> --bind <workdir>:<workdir>:rw ... <sif>`.

The binary is the configured one, else `apptainer`, else `singularity` on PATH. Images are pulled
at stage-in on this (login) host, under `pull_policy`, into the SIF cache under `state_dir/sif`
(staging.images.ensure_image: one download per image however many tasks ask at once). The task
env reaches the container as APPTAINERENV_<NAME> (SINGULARITYENV_<NAME> for singularity), the only
variables `--cleanenv` lets through; the work dir is bound read-write at its own path, named
volumes at their targets.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from pydantic import Field

from ..model import Check
from ..staging.errors import StageError
from ..staging.images import (
    PullPolicy,
    credentials_for,
    default_sif_cache,
    ensure_image,
    find_runtime_binary,
    sif_path,
)
from ..staging.mirrors import site_image
from ..staging.volumes import check_targets, resolve_volumes
from .base import ExecutorError, Job
from .containers import container_launch
from .local import LocalExecutor, LocalSettings

CANDIDATES = ("apptainer", "singularity")


class ApptainerSettings(LocalSettings):
    binary: str | None = None  # a path or a name on PATH; default: apptainer, else singularity
    cache_dir: Path | None = None  # the SIF cache; default state_dir/sif
    pull_policy: PullPolicy = "if-not-present"
    pull_timeout_seconds: float = Field(default=3600.0, gt=0)
    insecure_registries: list[str] = Field(default_factory=list)  # host[:port] pulled over plain HTTP
    pull_args: list[str] = Field(default_factory=list)  # extra `pull` options
    exec_args: list[str] = Field(default_factory=list)  # extra `exec` options, before the SIF


class ApptainerExecutor(LocalExecutor):
    kind = "apptainer"
    runtimes = CANDIDATES
    template = "apptainer.sh.j2"
    Settings = ApptainerSettings
    settings: ApptainerSettings

    # -- the runtime ------------------------------------------------------------------------------
    def binary(self) -> str:
        """Absolute path of the runtime binary; ExecutorError when there is none."""
        try:
            return find_runtime_binary("apptainer", self.settings.binary)
        except StageError as exc:
            key = f"executors.{self.name}.binary"
            raise ExecutorError(f"{key}: {exc}" if self.settings.binary else f"{exc}; install one or set {key}") \
                from None

    def _binary_for_render(self) -> str:
        try:
            return self.binary()
        except ExecutorError:  # `fem-hpc render` on a machine without the runtime still shows the script
            return self.settings.binary or CANDIDATES[0]

    @property
    def cache_dir(self) -> Path:
        return self.settings.cache_dir or default_sif_cache(self.site)

    def sif_for(self, job: Job) -> Path:
        return sif_path(self.cache_dir, site_image(self.site, job.task.image or ""))

    # -- job script -------------------------------------------------------------------------------
    def template_context(self, job: Job) -> dict[str, Any]:
        binary = self._binary_for_render()
        try:
            mounts = resolve_volumes(job.task, self.site, job.workdir)
            sif = self.sif_for(job)
        except StageError as exc:
            raise ExecutorError(str(exc)) from None
        # The binary's name tells apptainer from singularity (their env prefixes differ).
        launch, env = container_launch("apptainer", job, str(sif), mounts, binary=binary,
                                       extra_args=self.settings.exec_args)
        return {"launch": launch, "env_exports": env}

    # -- stage-in ---------------------------------------------------------------------------------
    def stage_in(self, job: Job, progress: Any = None) -> None:
        if not job.task.image:
            raise ExecutorError("the apptainer executor needs the task's image")
        binary = self.binary()
        try:
            ref = site_image(self.site, job.task.image)
            check_targets(resolve_volumes(job.task, self.site, job.workdir), str(job.workdir))
            ensure_image("apptainer", ref, self.settings.pull_policy, credentials=credentials_for(self.site, ref),
                         progress=progress, binary=binary, cache_dir=self.cache_dir,
                         pull_args=self.settings.pull_args, insecure_registries=self.settings.insecure_registries,
                         timeout=self.settings.pull_timeout_seconds)
        except StageError as exc:
            raise ExecutorError(str(exc)) from None

    # -- doctor -----------------------------------------------------------------------------------
    def checks(self) -> list[Check]:
        name = f"{self.name}: runtime"
        try:
            binary = self.binary()
        except ExecutorError as exc:
            return [Check(name=name, status="error", detail=str(exc),
                          fix="install apptainer (or singularity), or set the binary path")]
        try:
            proc = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30, check=False)
            version = (proc.stdout or proc.stderr).strip().splitlines()[0] if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, IndexError):
            version = None
        if not version:
            return [Check(name=name, status="error", detail=f"{binary} --version fails")]
        return [Check(name=name, status="ok", detail=f"{version} ({binary}); SIF cache {self.cache_dir}")]
