"""What the Slurm and PBS executors share: the runner (local or SSH), a scrubbed environment for
the scheduler commands, the adaptive poll interval, and containers inside batch jobs.

The scheduler-specific parts are the pure functions of slurm_cmds.py / pbs_cmds.py; each
executor class only wires them to a runner.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from .. import metrics
from ..layout import Marker
from ..model import Check
from ..staging.errors import StageError
from ..staging.images import PullPolicy, default_sif_cache, sif_path, stage_image
from ..staging.mirrors import site_image
from ..staging.outputs import Archive
from ..staging.volumes import VolumeError, resolve_volumes, volume_env
from . import remote
from .base import Deferred, Executor, ExecutorError, ExecutorSettings, Job, TransportError
from .budget import BudgetSettings, CallBudget, budget_for
from .containers import container_launch, docker_cleanup_argv
from .offcluster import RemoteSide
from .runners import CommandResult, Runner, RunnerError, SSHSettings, release, runner_for, scrubbed_env

log = logging.getLogger("fem_hpc.executors.batch")
_T = TypeVar("_T")


class PollSettings(BaseModel):
    """squeue/qstat is the safety net behind the exit-code markers, so it can be slow: frequent
    while the youngest job is young, then slower. Keep max well below Slurm's MinJobAge (300 s
    by default), after which a finished job leaves squeue."""

    model_config = ConfigDict(extra="forbid")
    min_seconds: float = Field(default=2.0, ge=0.2)
    max_seconds: float = Field(default=30.0, ge=0.2)
    ramp_seconds: float = Field(default=120.0, ge=0)

    @model_validator(mode="after")
    def _order(self) -> PollSettings:
        if self.max_seconds < self.min_seconds:
            raise ValueError("max_seconds must not be below min_seconds")
        return self


class ContainerSettings(BaseModel):
    """How a task with an `image` runs inside a batch job."""

    model_config = ConfigDict(extra="forbid")
    runtime: Literal["apptainer", "docker"] = "apptainer"
    binary: str | None = None  # apptainer/singularity/docker path on the compute nodes
    docker_user: str | None = None  # uid:gid for `docker run --user`; default: the service's own
    # Whether the login node pulls the image before submit: if-not-present, always (a fresh pull of
    # a moving tag), never (only what is already in the SIF cache / the local daemon).
    pull_policy: PullPolicy = "if-not-present"


class BatchSettings(ExecutorSettings):
    ssh: SSHSettings | None = None
    command_timeout: float = Field(default=60.0, gt=0)
    extra_directives: list[str] = Field(default_factory=list)
    poll: PollSettings = Field(default_factory=PollSettings)
    env: dict[str, str] = Field(default_factory=dict)  # for the scheduler commands (e.g. SLURM_CONF)
    container: ContainerSettings = Field(default_factory=ContainerSettings)
    lost_grace_seconds: float = Field(default=120.0, ge=0)
    # The scheduler call budget of this cluster (a token bucket): the shorthand N calls per
    # minute (bucket N), or the bucket and its refill spelled out.
    max_scheduler_calls_per_minute: float | None = Field(default=None, gt=0)
    scheduler_budget: BudgetSettings | None = None
    budget_wait_seconds: float = Field(default=5.0, ge=0)  # a submit/cancel waits this long, then is re-queued
    # A cluster that shares no file system with this host: work dirs are sent to
    # <remote_work_root>/<user>/<execution>/<task> over the `ssh:` connection and outputs come back
    # from there. `shared_fs: false` says the same and requires remote_work_root.
    remote_work_root: PurePosixPath | None = None
    shared_fs: bool | None = None
    # Which remote work dirs the retention pass (ops/gc.py) removes once the broker confirmed the
    # result, and how many days after that: the journal records what it removed, so a restart or a
    # crash leaks nothing; an unreachable cluster is tried again at the next pass.
    remote_cleanup: Literal["always", "on-success", "never"] = "always"
    remote_keep_days: float = Field(default=0.0, ge=0)
    remote_python: str = "python3"  # on the cluster, for building the outputs archive there (>= 3.6)
    remote_sif_cache: PurePosixPath | None = None  # default <remote_work_root>/.sif
    marker_seconds: float = Field(default=1.0, ge=0.2)  # one remote marker read per this many seconds
    transfer_idle_seconds: float = Field(default=120.0, gt=0)  # a stream silent this long is a lost link
    pull_timeout: float = Field(default=3600.0, gt=0)  # an image pull on the cluster

    @model_validator(mode="after")
    def _one_budget(self) -> BatchSettings:
        if self.max_scheduler_calls_per_minute is not None and self.scheduler_budget is not None:
            raise ValueError("give max_scheduler_calls_per_minute or scheduler_budget, not both")
        if self.shared_fs is False and self.remote_work_root is None:
            raise ValueError("shared_fs: false needs remote_work_root (where the work dirs go on the cluster)")
        if self.remote_work_root is not None:
            if self.shared_fs:
                raise ValueError("remote_work_root means the cluster shares no file system: drop shared_fs: true")
            if self.ssh is None:
                raise ValueError("remote_work_root needs ssh: (the cluster is reached over SSH)")
            remote.check_root(self.remote_work_root)
            for name in ("remote_sif_cache",):
                value = getattr(self, name)
                if value is not None and not value.is_absolute():
                    raise ValueError(f"{name} must be an absolute path on the cluster")
        return self

    def budget(self) -> BudgetSettings | None:
        if self.max_scheduler_calls_per_minute is not None:
            return BudgetSettings.per_minute(self.max_scheduler_calls_per_minute)
        return self.scheduler_budget


# The kind of a scheduler call, by its command (callers name it where the command alone does not
# say, e.g. squeue as a look-up by name). Calls of WAITING kinds wait a moment for a budget token;
# the others are deferred at once. "other" (docker rm, the work-dir helpers) is no scheduler call.
KINDS = {"sbatch": "submit", "qsub": "submit", "squeue": "poll", "qstat": "poll", "scancel": "cancel",
         "qdel": "cancel", "sacct": "sacct", "sinfo": "check"}
WAITING = frozenset({"submit", "cancel", "find"})


class BatchExecutor(Executor):
    settings: BatchSettings

    def __init__(self, name: str, settings: Any, site: Any):
        super().__init__(name, settings, site)
        self.runner: Runner = runner_for(settings.ssh)
        self.host = settings.ssh.host if settings.ssh is not None else "localhost"
        self.calls: dict[str, int] = {}
        self._calls_lock = threading.Lock()
        self._down: TransportError | None = None  # the first link error of the current outage
        self._closing = False
        budget = settings.budget()
        cluster = f"{settings.ssh.host}:{settings.ssh.port}" if settings.ssh is not None else "localhost"
        self.budget: CallBudget | None = budget_for(cluster, budget) if budget is not None else None
        self.remote = RemoteSide(self) if settings.remote_work_root is not None else None

    def spend(self, kind: str) -> None:
        """Take a budget token for one call of `kind`, or raise Deferred."""
        if kind == "other":
            return
        waited = 0.0
        if self.budget is not None:
            if kind in WAITING:
                taken, waited = self.budget.take(self.settings.budget_wait_seconds, cancelled=lambda: self._closing)
            else:
                waited = self.budget.try_take()
                taken = waited == 0.0
            if not taken:
                metrics.scheduler_call(self.name, kind, waited, made=False)
                log.debug("scheduler call %s deferred by the budget (%.1fs to the next token)", kind, waited)
                raise Deferred(waited)
        metrics.scheduler_call(self.name, kind, waited)

    def command(self, argv: list[str], *, kind: str | None = None,
                extra_env: dict[str, str] | None = None) -> CommandResult:
        self.spend(kind or KINDS.get(os.path.basename(argv[0]), "other"))
        with self._calls_lock:
            self.calls[argv[0]] = self.calls.get(argv[0], 0) + 1
        env = scrubbed_env({**self.settings.env, **(extra_env or {})}, self.site.pass_env) \
            if self.settings.ssh is None else \
            ({**self.settings.env, **(extra_env or {})} or None)
        return self.over_link(lambda: self.runner.run(argv, timeout=self.settings.command_timeout, env=env))

    def over_link(self, call: Callable[[], _T]) -> _T:
        """Run `call` (anything using the runner) and keep the link state: a RunnerError that is a
        link problem becomes a TransportError carrying when the outage began; any answer ends it."""
        try:
            result = call()
        except RunnerError as exc:
            if not exc.transport:
                raise ExecutorError(str(exc)) from None
            with self._calls_lock:
                if self._down is None:
                    self._down = TransportError(str(exc), self.host, time.time())
                since = self._down.since
            raise TransportError(str(exc), self.host, since) from None
        if self._down is not None:
            with self._calls_lock:
                if self._down is not None:
                    log.info("%s answers again (unreachable for %.0fs)", self.host, time.time() - self._down.since)
                self._down = None
        return result

    def unreachable(self) -> TransportError | None:
        return self._down

    def close(self) -> None:
        self._closing = True
        if self.budget is not None:
            self.budget.wake()
        release(self.runner)

    def submit_script(self, job: Job) -> None:
        """With SSH the script is (re)written through SFTP, so it exists where the scheduler reads it
        (off-cluster it came with the work dir)."""
        if self.settings.ssh is not None and self.remote is None:
            text = job.script_path.read_text()
            self.over_link(lambda: self.runner.write_file(job.script_path, text))

    def poll_interval(self, youngest_age: float) -> float:
        p = self.settings.poll
        if p.ramp_seconds <= 0 or youngest_age >= p.ramp_seconds:
            return p.max_seconds
        return p.min_seconds + (p.max_seconds - p.min_seconds) * youngest_age / p.ramp_seconds

    # -- containers in batch jobs ----------------------------------------------------------
    # A task with an `image` runs its command inside the site's runtime, launched by the job
    # script. The image is staged here on the login node before submit: compute nodes often have
    # no internet. The launch line is derived from the task alone (the SIF path is a function of
    # the image reference), so a re-render after a restart gives the same script.
    def _image_argument(self, job: Job) -> str:
        assert job.task.image
        if self.remote is not None:  # the cluster's own cache, of the image the site's mirrors name
            return self.remote.image_argument(str(site_image(self.site, job.task.image)))
        ref = site_image(self.site, job.task.image)
        if self.settings.container.runtime == "docker":
            return ref.pull_ref
        return str(sif_path(default_sif_cache(self.site), ref))

    def template_context(self, job: Job) -> dict[str, Any]:
        seen = self.where(job)  # the paths the job script uses: the cluster's
        ctx: dict[str, Any] = {"directives": self.directives(seen)}
        if self.remote is not None:
            ctx.update(workdir=str(seen.workdir), rundir=str(seen.rundir), fem_dir=str(seen.fem_dir))
        if job.task.volumes and not job.task.image:
            try:
                ctx["env_exports"] = sorted({**job.task.env, **volume_env(job.task, self.site, job.workdir,
                                                                         in_container=False)}.items())
            except VolumeError as exc:
                raise ExecutorError(str(exc)) from None
        if job.task.image:
            c = self.settings.container
            try:
                launch, env_exports = container_launch(
                    c.runtime, seen, self._image_argument(job), resolve_volumes(job.task, self.site, job.workdir),
                    binary=c.binary, user=c.docker_user or "auto", node=self.site.node)
            except (StageError, ValueError) as exc:
                raise ExecutorError(str(exc)) from None
            ctx.update(launch=launch, env_exports=env_exports)
        return ctx

    def stage_in(self, job: Job, progress: Any = None) -> None:
        if not job.task.image:
            return
        if self.remote is not None:  # the image is needed where the job runs: on the cluster side
            self.remote.ensure_image(job, progress)
            return
        c = self.settings.container
        try:
            image = str(site_image(self.site, job.task.image))
            stage_image(c.runtime, self.site, image, c.pull_policy, binary=c.binary, progress=progress)
        except StageError as exc:
            raise ExecutorError(str(exc)) from None

    def after_final(self, job: Job) -> None:
        # A `docker run` client killed with its job (scancel, walltime) can leave its container
        # behind; removing it by name is harmless when it is already gone.
        if job.task.image and self.settings.container.runtime == "docker":
            try:
                self.command(docker_cleanup_argv(job.task.id, self.site.node, self.settings.container.binary
                                                 or "docker"))
            except ExecutorError as exc:
                log.warning("could not remove the container of %s: %s", job.task.id, exc)

    def directives(self, job: Job) -> list[str]:
        raise NotImplementedError

    # -- a cluster without a shared file system (remote_work_root) ----------------------------
    def where(self, job: Job) -> Job:
        """The job as the scheduler sees it: under remote_work_root off-cluster, else the job itself."""
        return self.remote.where(job) if self.remote is not None else job

    def stage_remote(self, job: Job) -> None:
        if self.remote is not None:
            self.remote.stage(job)

    def read_markers(self, jobs: list[Job]) -> dict[str, Marker]:
        if self.remote is None:
            return super().read_markers(jobs)
        return self.remote.read_markers(jobs)

    def marker_interval(self) -> float | None:
        return self.settings.marker_seconds if self.remote is not None else None

    def markers_are_local(self) -> bool:
        return self.remote is None

    def fetch_outputs(self, job: Job, patterns: list[str], *, max_bytes: int,
                      compress_level: int | None) -> Archive | None:
        if self.remote is None:
            return None
        return self.remote.fetch(job, patterns, max_bytes=max_bytes, compress_level=compress_level)

    def remove_remote(self, rels: list[str]) -> None:
        if self.remote is not None:
            self.remote.remove(rels)

    def health_checks(self) -> list[Check]:
        return ([self.remote.check()] if self.remote is not None else []) + self.checks()

    def check_command(self, name: str, argv: list[str], fix: str) -> Check:
        try:
            res = self.command(argv, kind="check")
        except Deferred as exc:
            return Check(name=name, status="warning", detail=f"not asked: {exc}",
                         fix="the scheduler call budget (scheduler_budget) keeps calls for the tasks")
        except ExecutorError as exc:
            return Check(name=name, status="error", detail=str(exc), fix=fix)
        if not res.ok:
            detail = (res.stderr or res.stdout).strip().splitlines()
            return Check(name=name, status="error", detail=detail[-1] if detail else f"exit {res.returncode}",
                         fix=fix)
        first = res.stdout.strip().splitlines()
        return Check(name=name, status="ok", detail=(first[0] if first else "answers") + f" ({res.seconds:.2f}s, "
                     f"{self.runner.describe()})")
