"""The errors of stage-in. Every stage-in step raises a StageError whose message is meant for the
user (it ends the task FAILED / STAGE_IN with that message); the subclasses say which step."""

from __future__ import annotations


class StageError(Exception):
    """A stage-in step that failed; the message says what and is sent to the orchestrator."""


class GitStageError(StageError):
    """A task's git source that cannot be fetched, resolved or checked out."""


class ImageError(StageError):
    """An image that cannot be resolved, pulled or cached."""


class VolumeError(StageError):
    """A volume that cannot be mounted; the message says which and why."""
