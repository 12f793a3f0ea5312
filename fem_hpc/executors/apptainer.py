"""The `apptainer` executor: the local executor's process handling (own process group, cancel,
walltime, re-adoption by /proc) with the task's command run inside the image by
`apptainer exec --containall --cleanenv --pwd <rundir> --bind <workdir>:<workdir>:rw ... <sif>`.

The binary is the configured one, else `apptainer`, else `singularity` on PATH. Images are pulled
at stage-in on this (login) host into the SIF cache under `state_dir/sif` (staging.images.ensure_sif:
one download per image however many tasks ask at once). The task env reaches the container as
APPTAINERENV_<NAME> (SINGULARITYENV_<NAME> for singularity), the only variables `--cleanenv` lets
through; the work dir is bound read-write at its own path, named volumes at their targets.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from ..model import Check
from ..staging.containers import container_launch
from ..staging.images import (
    ImageError,
    apptainer_env_credentials,
    credentials_for,
    ensure_sif,
    parse_image_ref,
    sif_path,
)
from ..staging.volumes import VolumeError, check_targets, resolve_volumes
from .base import ExecutorError, Job
from .local import LocalExecutor, LocalSettings

CANDIDATES = ("apptainer", "singularity")


class ApptainerSettings(LocalSettings):
    binary: str | None = None  # a path or a name on PATH; default: apptainer, else singularity
    cache_dir: Path | None = None  # the SIF cache; default state_dir/sif
    pull_policy: Literal["if-not-present", "always", "never"] = "if-not-present"
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
        wanted = [self.settings.binary] if self.settings.binary else list(CANDIDATES)
        for name in wanted:
            found = shutil.which(name)
            if found:
                return found
        if self.settings.binary:
            raise ExecutorError(f"executors.{self.name}.binary {self.settings.binary!r} is not an executable")
        raise ExecutorError("neither apptainer nor singularity is on PATH; install one or set "
                            f"executors.{self.name}.binary")

    def _binary_for_render(self) -> str:
        try:
            return self.binary()
        except ExecutorError:  # `fem-hpc render` on a machine without the runtime still shows the script
            return self.settings.binary or CANDIDATES[0]

    def flavor(self, binary: str) -> Literal["apptainer", "singularity"]:
        return "singularity" if "singularity" in Path(binary).name else "apptainer"

    @property
    def cache_dir(self) -> Path:
        return self.settings.cache_dir or self.site.state_dir / "sif"

    def sif_for(self, job: Job) -> Path:
        return sif_path(self.cache_dir, parse_image_ref(job.task.image or ""))

    # -- job script -------------------------------------------------------------------------------
    def template_context(self, job: Job) -> dict[str, Any]:
        binary = self._binary_for_render()
        try:
            mounts = resolve_volumes(job.task, self.site)
            sif = self.sif_for(job)
        except (VolumeError, ImageError) as exc:
            raise ExecutorError(str(exc)) from None
        launch, env = container_launch(self.flavor(binary), job, str(sif), mounts, binary=binary,
                                       extra_args=self.settings.exec_args)
        return {"launch": launch, "env_exports": env}

    # -- stage-in ---------------------------------------------------------------------------------
    def stage_in(self, job: Job, progress: Any = None) -> None:
        if not job.task.image:
            raise ExecutorError("the apptainer executor needs the task's image")
        binary = self.binary()
        try:
            ref = parse_image_ref(job.task.image)
            check_targets(resolve_volumes(job.task, self.site), str(job.workdir))
        except (ImageError, VolumeError) as exc:
            raise ExecutorError(str(exc)) from None
        target = sif_path(self.cache_dir, ref)
        if self.settings.pull_policy == "never":
            if not target.exists():
                raise ExecutorError(f"image {ref} is not in the SIF cache ({target}) and pull_policy is 'never'")
            return
        pull_args = list(self.settings.pull_args)
        if ref.registry in self.settings.insecure_registries:
            pull_args.append("--nohttps" if self.flavor(binary) == "singularity" else "--no-https")
        if progress is not None and not target.exists():
            progress(f"pulling image {ref} into the SIF cache")
        try:
            ensure_sif(binary, ref, self.cache_dir, pull_args=pull_args,
                       env=apptainer_env_credentials(binary, credentials_for(self.site, ref)),
                       force=self.settings.pull_policy == "always", timeout=self.settings.pull_timeout_seconds)
        except ImageError as exc:
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
