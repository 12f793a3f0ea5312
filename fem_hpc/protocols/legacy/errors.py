"""The one error type of the legacy document building blocks: a field of the request and the reason.

Placeholders, host paths and ports each raise :class:`DocumentError`; the mapping collects them as
:class:`~fem_hpc.model.FieldError` for the error reply, so every refusal names what is wrong and where.
"""

from __future__ import annotations

from fem_hpc.model import FieldError


class DocumentError(ValueError):
    """``field`` (e.g. ``task_info.volumes[2].host_path``) cannot be used, for ``reason``."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    @property
    def message(self) -> str:
        return f"{self.field}: {self.reason}"

    def to_field_error(self) -> FieldError:
        return FieldError(field=self.field, message=self.reason)
