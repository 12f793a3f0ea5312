"""The wire model of PROTOCOL.md v1: the TASK, its states, and the events sent back.

Everything that crosses a boundary is a pydantic model in strict mode, so a wrong type is an
error with a field path instead of a silent coercion.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

PROTOCOL_VERSION = 1
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"

Ident = Annotated[str, StringConstraints(pattern=ID_PATTERN)]


class State(StrEnum):
    RECEIVED = "RECEIVED"
    STAGING_IN = "STAGING_IN"
    SUBMITTED = "SUBMITTED"
    RUNNING = "RUNNING"
    STAGING_OUT = "STAGING_OUT"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    REJECTED = "REJECTED"
    UNKNOWN = "UNKNOWN"  # only in replies about a task this node never saw

    @property
    def final(self) -> bool:
        return self in FINAL_STATES


FINAL_STATES = frozenset({State.COMPLETED, State.FAILED, State.CANCELLED, State.REJECTED})


class Reason(StrEnum):
    EXIT_CODE = "EXIT_CODE"
    TIMEOUT = "TIMEOUT"
    OUT_OF_MEMORY = "OUT_OF_MEMORY"
    NODE_FAIL = "NODE_FAIL"
    STAGE_IN = "STAGE_IN"
    SUBMIT = "SUBMIT"
    STAGE_OUT = "STAGE_OUT"
    LOST = "LOST"


_MEMORY_RE = re.compile(r"^([1-9][0-9]*)([KMGT])$")
_MEMORY_UNITS = {"K": 1 / 1024, "M": 1, "G": 1024, "T": 1024 * 1024}
_WALLTIME_RE = re.compile(r"^(?:([0-9]+)-)?([0-9]{1,3}):([0-5][0-9]):([0-5][0-9])$")


def memory_mib(text: str) -> int:
    """'512M' -> 512, '4G' -> 4096. Raises ValueError naming the accepted form."""
    m = _MEMORY_RE.fullmatch(text)  # fullmatch: '$' alone would accept a trailing newline
    if not m:
        raise ValueError(f"memory {text!r} is not a positive integer followed by K, M, G or T (e.g. 512M, 4G)")
    return max(1, int(int(m.group(1)) * _MEMORY_UNITS[m.group(2)]))


def walltime_seconds(text: str) -> int:
    """'HH:MM:SS' or 'D-HH:MM:SS' -> seconds."""
    m = _WALLTIME_RE.fullmatch(text)
    if not m:
        raise ValueError(f"walltime {text!r} is not HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(g) if g else 0 for g in m.groups())
    total = ((days * 24 + hours) * 60 + minutes) * 60 + seconds
    if total == 0:
        raise ValueError("walltime must be longer than 00:00:00")
    return total


def format_walltime(seconds: int) -> str:
    hours, rest = divmod(seconds, 3600)
    return f"{hours:02d}:{rest // 60:02d}:{rest % 60:02d}"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Resources(_Strict):
    cpus: int | None = Field(default=None, ge=1)
    memory: str | None = None
    gpus: int | None = Field(default=None, ge=0)
    nodes: int | None = Field(default=None, ge=1)
    walltime: str | None = None

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: str | None) -> str | None:
        if v is not None:
            memory_mib(v)
        return v

    @field_validator("walltime")
    @classmethod
    def _walltime(cls, v: str | None) -> str | None:
        if v is not None:
            walltime_seconds(v)
        return v

    @property
    def memory_mib(self) -> int | None:
        return memory_mib(self.memory) if self.memory else None

    @property
    def walltime_seconds(self) -> int | None:
        return walltime_seconds(self.walltime) if self.walltime else None


VolumeKind = Literal["volume", "workdir", "checkout", "variable"]
_SUBPATH_BREAKERS = ("\0", "\n", ":", ",")


def _bind_target(v: str, what: str = "target") -> str:
    if not v.startswith("/"):
        raise ValueError(f"{what} {v!r} must be an absolute path")
    if ".." in v.split("/"):
        raise ValueError(f"{what} {v!r} must not contain '..'")
    if any(c in v for c in _SUBPATH_BREAKERS):
        raise ValueError(f"{what} {v!r} contains a forbidden character (NUL, newline, ':' or ',')")
    return v


class VolumeRequest(_Strict):
    """One mount of a task. What is mounted (`kind`, additive to v1's named site volumes):

    * ``volume`` (the default): the site volume ``name`` (config ``volumes``);
    * ``variable``: the host path of the site variable ``name`` (config ``legacy.variables``, declared
      with mode ro or rw): a site-declared path, never one the task names;
    * ``workdir``: the task's own work dir (so a container sees it where the tool expects it);
    * ``checkout``: the task's ``source``, which is then checked out beside the work dir (in
      ``.fem/source``, never part of the outputs) instead of into it; the command runs from this
      target (``source.path`` below it), as an image whose WORKDIR is the code expects.

    ``subpath`` selects a directory below a volume's, a variable's or the work dir's root; it never
    leaves that root (``..`` is refused, symlinks out of it are refused when it is mounted)."""

    kind: VolumeKind = "volume"  # before name: the name's rule depends on it
    name: str | None = Field(default=None, validate_default=True)
    subpath: str | None = None
    target: str
    mode: Literal["ro", "rw"] = "ro"

    @field_validator("target")
    @classmethod
    def _target(cls, v: str) -> str:
        return _bind_target(v)

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind", "volume")
        if kind == "volume" and (v is None or not re.fullmatch(ID_PATTERN, v)):
            raise ValueError(f"value {v!r} does not match {ID_PATTERN}" if v is not None else
                             "a site volume needs its name")
        if kind == "variable" and (v is None or not re.fullmatch(ENV_NAME_PATTERN, v)):
            raise ValueError(f"a variable volume needs the variable's name matching {ENV_NAME_PATTERN}, not {v!r}")
        if kind in ("workdir", "checkout") and v is not None:
            raise ValueError(f"a {kind} volume has no name")
        return v

    @field_validator("subpath")
    @classmethod
    def _subpath(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v or v.startswith("/") or ".." in v.split("/") or any(c in v for c in _SUBPATH_BREAKERS):
            raise ValueError(f"subpath {v!r} must be a relative path without '..', NUL, newline, ':' or ','")
        return v

    @model_validator(mode="after")
    def _checkout(self) -> VolumeRequest:
        if self.kind == "checkout" and self.subpath is not None:
            raise ValueError("a checkout volume has no subpath (use source.path to run from a subdirectory)")
        return self


class PortMapping(_Strict):
    """A port a container publishes on the host (docker executor on a bridge or named network,
    within the site's `policy.ports`)."""

    host_port: int = Field(ge=1, le=65535)
    container_port: int = Field(ge=1, le=65535)
    protocol: Literal["tcp", "udp"] = "tcp"


class Source(_Strict):
    git: str = Field(min_length=1)
    ref: str | None = None
    commit: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{7,64}$")] | None = None
    path: str | None = None

    @field_validator("ref")
    @classmethod
    def _ref(cls, v: str | None) -> str | None:
        # A ref that starts with '-' would be read by git as an option.
        if v is not None and (not v or v.startswith("-") or any(c in v for c in " \t\n\0~^:?*[\\")):
            raise ValueError(f"ref {v!r} is not a valid branch or tag name")
        return v

    @field_validator("path")
    @classmethod
    def _path(cls, v: str | None) -> str | None:
        if v is not None and (v.startswith("/") or ".." in v.split("/") or "\0" in v or not v):
            raise ValueError(f"path {v!r} must be a relative subdirectory without '..'")
        return v


class Task(_Strict):
    id: Ident
    execution_id: Ident | None = None
    user_id: Ident = "anonymous"
    executor: Ident | None = None
    image: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]{0,511}$")] | None = None
    source: Source | None = None
    command: list[str] = Field(min_length=1)
    env: dict[str, str] = Field(default_factory=dict)
    volumes: list[VolumeRequest] = Field(default_factory=list)
    ports: list[PortMapping] = Field(default_factory=list)
    resources: Resources = Field(default_factory=Resources)
    queue: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.@-]{1,128}$")] | None = None
    account: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.@-]{1,128}$")] | None = None
    outputs: list[str] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)

    @field_validator("command")
    @classmethod
    def _command(cls, v: list[str]) -> list[str]:
        if not v[0]:
            raise ValueError("command[0] must not be empty")
        if any("\0" in a for a in v):
            raise ValueError("command arguments must not contain NUL bytes")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        bad = [k for k in v if not re.fullmatch(ENV_NAME_PATTERN, k)]  # not 'A\n'
        if bad:
            raise ValueError(f"env names {bad!r} do not match {ENV_NAME_PATTERN}")
        if any("\0" in val for val in v.values()):
            raise ValueError("env values must not contain NUL bytes")
        return v

    @field_validator("outputs")
    @classmethod
    def _outputs(cls, v: list[str]) -> list[str]:
        for pattern in v:
            if not pattern or pattern.startswith("/") or ".." in pattern.split("/") or "\0" in pattern:
                raise ValueError(f"output pattern {pattern!r} must be relative to the work dir, without '..'")
        return v

    @model_validator(mode="after")
    def _unique_targets(self) -> Task:
        targets = [v.target for v in self.volumes]
        if len(targets) != len(set(targets)):
            raise ValueError("two volumes share one target")
        checkouts = [v for v in self.volumes if v.kind == "checkout"]
        if checkouts and self.source is None:
            raise ValueError("a checkout volume needs the task's source")
        if len(checkouts) > 1:
            raise ValueError("the source can be mounted once (two checkout volumes)")
        ports = [(p.host_port, p.protocol) for p in self.ports]
        if len(ports) != len(set(ports)):
            raise ValueError("two ports share one host port")
        return self

    @property
    def checkout(self) -> VolumeRequest | None:
        """The volume that mounts the source, when the task has one (the source then lives beside
        the work dir, not in it)."""
        return next((v for v in self.volumes if v.kind == "checkout"), None)

    @property
    def execution(self) -> str:
        return self.execution_id or self.id


class FieldError(BaseModel):
    field: str
    message: str


def errors_from_validation(exc: ValidationError, prefix: str = "task", *,
                           unknown: str = "unknown field") -> list[FieldError]:
    """pydantic's errors as 'dotted.key.path: message', the one formatter of the wire model, the
    config and the executor settings (`unknown` names an extra key: "field" on the wire, "key"
    in a config file)."""
    out = []
    for err in exc.errors():
        path = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = unknown
        elif err["type"] == "string_pattern_mismatch":
            msg = f"value {err.get('input')!r} does not match {err['ctx']['pattern']}"
        out.append(FieldError(field=path, message=msg.removeprefix("Value error, ")))
    return out


def parse_task(data: Any) -> tuple[Task | None, list[FieldError]]:
    """Validate a decoded TASK object; return the task or the list of problems."""
    if not isinstance(data, dict):
        return None, [FieldError(field="task", message="must be a JSON object")]
    try:
        return Task.model_validate(data), []
    except ValidationError as exc:
        return None, errors_from_validation(exc)


def utcnow() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class OutputsInfo(BaseModel):
    format: str = "tar.gz"
    size: int
    sha256: str
    chunks: int


class StatusEvent(BaseModel):
    fem: int = PROTOCOL_VERSION
    type: Literal["status"] = "status"
    node: str
    task_id: str
    seq: int
    state: State
    time: str
    native_id: str | None = None
    message: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)


class ResultEvent(BaseModel):
    fem: int = PROTOCOL_VERSION
    type: Literal["result"] = "result"
    node: str
    task_id: str
    seq: int
    state: State
    exit_code: int | None = None
    reason: Reason | None = None
    errors: list[FieldError] = Field(default_factory=list)
    started: str | None = None
    finished: str | None = None
    outputs: OutputsInfo | None = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    native_id: str | None = None  # additive extension: the scheduler's job id


class Check(BaseModel):
    """One line of `fem-hpc doctor` and of the health reply."""

    name: str
    status: str  # ok | warning | error
    detail: str
    fix: str | None = None
