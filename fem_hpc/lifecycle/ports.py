"""What the lifecycle needs from the outside, as small explicit interfaces.

A protocol plugs in as a `Frontend`: for each event of a task it returns the outbox messages to
write, and the lifecycle writes them **in the same journal transaction** as the state change the
event reports. The lifecycle itself never decides where a message goes: it stores each task's
`Route` and hands it back to the frontend named by `Route.protocol`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..config import SiteConfig
from ..journal import Message, Route, TaskRecord
from ..model import ResultEvent, StatusEvent, Task

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Chunk:
    """One slice of a task's output archive, sent by reference to the file (never copied)."""

    task_id: str
    seq: int
    index: int
    total: int
    sha256: str
    file_ref: tuple[str, int, int]  # (path, offset, length)


TaskEvent = StatusEvent | ResultEvent | Chunk


@dataclass
class TaskView:
    """What a frontend may know about the task an event belongs to."""

    task: Task
    route: Route
    workdir: Path
    native_id: str | None = None
    extras: dict[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, record: TaskRecord) -> TaskView:
        return cls(record.task, record.route, Path(record.workdir or ""), record.native_id)


class Frontend(Protocol):
    def messages(self, view: TaskView | None, event: TaskEvent, *, to: Route | None = None,
                 note: str | None = None) -> list[Message]:
        """The outbox messages for `event`. `to` is set when the event answers a request (a status
        query, a re-sent submit): `to` is then the requester, else the task's own route. `note` is
        the message of the state change (a final result carries none of its own). `view` is None
        only for an answer about a task this node never saw."""
        ...


class Silent:
    """The frontend of tasks that nobody listens to over the broker (`fem-hpc run`)."""

    def messages(self, view: TaskView | None, event: TaskEvent, *, to: Route | None = None,
                 note: str | None = None) -> list[Message]:
        return []


# A stage-in step that runs before the executor's own (e.g. the Git checkout). It raises
# staging.errors.StageError (or OSError) with a message for the orchestrator.
StageStep = Callable[[Task, Path, SiteConfig, Progress], None]
