"""What every executor shares: the job record, the scheduler's view of a job, and the small
interface an executor implements. Threads and timing live in the tracker, not here."""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ..layout import FEM_DIR, MARKER_NAME, SCRIPT_NAME, job_name, source_dir
from ..model import Check, Reason, State, Task

if TYPE_CHECKING:
    from ..config import SiteConfig

class ExecutorError(Exception):
    """A submit or cancel that failed; the message is shown to the user as is."""


class ExecutorSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # A job gone from the runtime with no exit-code marker is declared LOST only after this long
    # (shared file systems can show the marker late).
    lost_grace_seconds: float = Field(default=60.0, ge=0)


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

    def after_final(self, job: Job) -> None:  # noqa: B027 - optional hook
        """Clean up runtime resources of a finished job (e.g. remove its container)."""

    def poll_interval(self, youngest_age: float) -> float:
        """Seconds until the next batched poll, given the age of the youngest tracked job."""
        return 1.0

    def checks(self) -> list[Check]:
        return []

    def close(self) -> None:  # noqa: B027 - optional hook
        pass
