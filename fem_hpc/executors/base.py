"""What every executor shares: the job record, the scheduler's view of a job, and the small
interface an executor implements. Threads and timing live in the tracker, not here."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..layout import FEM_DIR, MARKER_NAME, SCRIPT_NAME, STARTED_NAME, Marker, job_name, read_marker, source_dir
from ..model import Check, Reason, State, Task
from ..staging.outputs import Archive

if TYPE_CHECKING:
    from ..config import SiteConfig

class ExecutorError(Exception):
    """A submit or cancel that failed; the message is shown to the user as is."""


class TransportError(ExecutorError):
    """The cluster could not be reached (SSH down, network cut, authentication failing): nothing
    is known about the call's effect. Never a reason to fail a task: jobs keep their state, and
    submits, polls and stage-outs are retried with backoff until the link is back."""

    def __init__(self, message: str, host: str, since: float):
        super().__init__(message)
        self.host = host
        self.since = since

    @property
    def pause_message(self) -> str:
        """The status message of every task waiting for the link."""
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        return f"paused: {self.host} unreachable since {when}"


class Deferred(Exception):  # noqa: N818 - a signal to wait, not an error
    """The scheduler call budget has no token now: try again in `retry_after` seconds. A poll
    that gets this is simply later, the jobs are neither stale nor paused."""

    def __init__(self, retry_after: float):
        super().__init__(f"scheduler call budget exhausted; next token in {retry_after:.1f}s")
        self.retry_after = retry_after


class ExecutorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A job gone from the runtime with no exit-code marker is declared LOST only after this long
    # (shared file systems can show the marker late).
    lost_grace_seconds: float = Field(default=60.0, ge=0)
    # Longest wait between two attempts while the runtime (the cluster behind SSH) is unreachable:
    # polls, submits and stage-outs back off from 1 s up to this.
    retry_max_seconds: float = Field(default=30.0, ge=1)


@dataclass
class Job:
    """One task as an executor sees it."""

    task: Task
    workdir: Path
    native_id: str | None = None
    submitted_at: float = field(default_factory=time.time)
    # Values the job gets in its environment but that are never written to disk or the journal
    # (e.g. a legacy request's token, when the site asks to pass it on). Executors pass them in
    # the environment of the process that starts the job.
    secret_env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def fem_dir(self) -> Path:
        return self.workdir / FEM_DIR

    @property
    def source_dir(self) -> Path:
        """Where the task's source is checked out (layout.source_dir)."""
        return source_dir(self.task, self.workdir)

    @property
    def rundir(self) -> Path:
        """Where the command runs, on this host: the work dir, or the checkout (a task that mounts
        its source runs from it), or the source's subdirectory of either."""
        base = self.source_dir if self.task.source else self.workdir
        if self.task.source and self.task.source.path:
            return base / self.task.source.path
        return base

    @property
    def container_rundir(self) -> str | None:
        """Where the command runs inside a container when that is not a host path bound at its own
        place: the target of the task's `checkout` volume (with source.path below it); None otherwise."""
        checkout = self.task.checkout
        if checkout is None:
            return None
        path = self.task.source.path if self.task.source else None
        return f"{checkout.target.rstrip('/')}/{path}" if path else checkout.target

    @property
    def script_path(self) -> Path:
        return self.fem_dir / SCRIPT_NAME

    @property
    def marker_path(self) -> Path:
        return self.fem_dir / MARKER_NAME

    @property
    def job_name(self) -> str:
        return job_name(self.task.id)


class NativeStatus(BaseModel):
    """The scheduler's (or runtime's) word on one job."""

    native_id: str
    state: State  # SUBMITTED, RUNNING, or a final state
    reason: Reason | None = None
    exit_code: int | None = None
    message: str | None = None
    job_name: str | None = None
    # The scheduler put the job back in its queue after a run that ended (PBS's rerun/retry
    # Exit_status on a live job): a marker of that earlier run does not end the task.
    requeued: bool = False
    walltime_limit: int | None = None  # seconds, the limit the scheduler enforces (queue defaults included)


class Executor(ABC):
    """An executor is a template plus a few calls. The tracker decides when to call them."""

    kind: ClassVar[str]
    runtimes: ClassVar[tuple[str, ...]] = ()  # binaries, any one of which must be on PATH
    template: ClassVar[str]
    Settings: ClassVar[type[ExecutorSettings]] = ExecutorSettings

    def __init__(self, name: str, settings: Any, site: SiteConfig):
        self.name = name
        self.settings = settings
        self.site = site

    # -- job script ---------------------------------------------------------------
    def template_context(self, job: Job) -> dict[str, Any]:
        """Extra values for this executor's template (directives, container launch argv)."""
        return {}

    # -- lifecycle ----------------------------------------------------------------
    def stage_in(self, job: Job, progress: Any = None) -> None:  # noqa: B027 - optional hook
        """Prepare what the job needs on this host before submit (e.g. pull its image)."""

    @abstractmethod
    def submit(self, job: Job) -> str:
        """Start the job whose script is at job.script_path; return its native id."""

    @abstractmethod
    def poll(self, jobs: list[Job]) -> dict[str, NativeStatus]:
        """The state of every given job in one call; jobs the runtime no longer knows are absent.
        Raises on a failed poll (the tracker then marks itself stale, never the jobs failed)."""

    @abstractmethod
    def cancel(self, job: Job) -> None:
        """Ask the runtime to stop the job."""

    def find_by_name(self, job: Job) -> str | None:
        """The native id of a job started for this task, if the runtime still knows one."""
        return None

    def lookup_finished(self, job: Job) -> NativeStatus | None:
        """Second opinion for a job that left the queue without a marker (e.g. sacct)."""
        return None

    def no_record_note(self) -> str | None:
        """Why a job this runtime no longer lists has no record of its end, when the runtime keeps
        none (PBS without job history); None when it keeps one or has a second opinion. The outcome
        of such a job is then decided from the evidence there is (outcome.vanished, decide)."""
        return None

    def started_stamp(self, job: Job) -> str | None:
        """The UTC time the wrapper wrote to .fem/started when the job's command last started; None
        when it has not started or the file is not on this host (markers not local)."""
        if not self.markers_are_local():
            return None
        try:
            return (job.fem_dir / STARTED_NAME).read_text().strip() or None
        except OSError:
            return None

    def after_final(self, job: Job) -> None:  # noqa: B027 - optional hook
        """Clean up runtime resources of a finished job (e.g. remove its container)."""

    def poll_interval(self, youngest_age: float) -> float:
        """Seconds until the next batched poll, given the age of the youngest tracked job."""
        return 1.0

    # -- the work dir as the job sees it ------------------------------------------------
    # By default the job runs in `job.workdir` on a file system this process sees. An executor
    # whose jobs run where this host's disk is not (a cluster without a shared file system)
    # overrides these: the lifecycle calls them and knows nothing of how they reach the cluster.
    def stage_remote(self, job: Job) -> None:  # noqa: B027 - optional hook
        """After render, before submit: make the staged work dir present where the job runs."""

    def read_markers(self, jobs: list[Job]) -> dict[str, Marker]:
        """The exit-code markers that exist, by task id (one call for all `jobs`)."""
        out: dict[str, Marker] = {}
        for job in jobs:
            marker = read_marker(job.marker_path)
            if marker is not None:
                out[job.task.id] = marker
        return out

    def marker_interval(self) -> float | None:
        """Seconds between two read_markers() calls; None: cheap, every tracker cycle (local stat)."""
        return None

    def markers_are_local(self) -> bool:
        """Whether markers appear on this host's disk (so an inotify watch sees them)."""
        return True

    def fetch_outputs(self, job: Job, patterns: list[str], *, max_bytes: int,
                      compress_level: int | None) -> Archive | None:
        """The outputs archive built where the job ran and brought to job.fem_dir (with the logs
        in job.fem_dir/stdout, stderr); None: the work dir is here, stage-out builds it itself."""
        return None

    def remove_remote(self, rels: list[str]) -> None:  # noqa: B027 - optional hook
        """Remove these runtime-side work dirs (`user/execution/task` under its remote root) in one
        go: the retention pass calls it for the results the broker confirmed."""

    def unreachable(self) -> TransportError | None:
        """The link error while the runtime cannot be reached (host and since when), else None."""
        return None

    def checks(self) -> list[Check]:
        return []

    def health_checks(self) -> list[Check]:
        """Everything the health report asks: the executor's own checks and its kind's (e.g. the
        remote work root of a batch executor without a shared file system)."""
        return self.checks()

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
