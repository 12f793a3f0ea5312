"""The work-dir contract shared by the wrapper, the executors, the tracker and stage-out.

A task runs in `<work_root>/<user_id>/<execution>/<task_id>`; everything fem-hpc itself writes
there lives under `.fem/`: the job script, stdout/stderr, the wrapper's exit-code marker, the
output archive and, for a task that mounts its source (a `checkout` volume), the source checkout.
This module is the one place that knows those names.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from .model import Task

FEM_DIR = ".fem"
ARCHIVE_NAME = "outputs.tar.gz"
MARKER_NAME = "exit_code"
STARTED_NAME = "started"  # written by the wrapper (wrapper.sh.j2) when the command starts
SCRIPT_NAME = "job.sh"
SOURCE_NAME = "source"  # .fem/source: the checkout of a task that mounts its source (a `checkout` volume)


def task_workdir(work_root: Path, task: Task) -> Path:
    return work_root / task.user_id / task.execution / task.id


def source_dir(task: Task, workdir: Path) -> Path:
    """Where a task's source is checked out: the work dir itself (v1's default), or `.fem/source`
    when the task mounts its source with a `checkout` volume, so the code never mixes with (or is
    returned as) the task's own files."""
    return workdir / FEM_DIR / SOURCE_NAME if task.checkout is not None else workdir


def job_name(task_id: str) -> str:
    """The scheduler/runtime name of a task's job: how a restart finds a job whose id was never written."""
    return f"fem-{task_id}"


class Marker(BaseModel):
    """What the common wrapper writes to .fem/exit_code when the command has ended."""

    exit_code: int
    started: str | None = None
    finished: str | None = None
    signal: str | None = None  # set when the wrapper itself was told to stop (cancel, walltime)


def parse_marker(text: str) -> Marker | None:
    try:
        data = json.loads(text)
        marker = Marker.model_validate(data)
    except (ValueError, TypeError):
        return None
    if marker.signal == "":
        marker.signal = None
    return marker


def read_marker(path: Path) -> Marker | None:
    try:
        return parse_marker(path.read_text())
    except OSError:
        return None
