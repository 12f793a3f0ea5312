"""The one error type of stage-in: its message is sent to the orchestrator as the task's reason."""


class StageError(Exception):
    """Stage-in failed (Git checkout, image, volume); the message says what."""
