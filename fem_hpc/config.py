"""Site configuration: YAML -> pydantic, with environment overrides and errors a person can act on.

Secrets stay out of the file when the admin wants: any string value may be written as
``${NAME}`` and is read from the environment, and ``FEM_HPC_BROKER_URL`` replaces ``broker.url``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .model import ID_PATTERN, Resources, memory_mib, walltime_seconds


class ConfigError(Exception):
    """A config that cannot be used; ``problems`` lists every issue as 'key.path: what is wrong'."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        lines = [f"invalid config {self.source}:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TLSConfig(_Section):
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    server_name: str | None = None  # hostname to verify; defaults to the URL's host

    @model_validator(mode="after")
    def _pair(self) -> TLSConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together (mutual TLS needs both)")
        for name in ("ca_file", "cert_file", "key_file"):
            p = getattr(self, name)
            if p is not None and not p.is_file():
                raise ValueError(f"{name} {str(p)!r} does not exist")
        return self


class BrokerConfig(_Section):
    url: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    queue: str | None = None  # defaults to the node name
    prefetch: int = Field(default=16, ge=1, le=1000)
    heartbeat: int = Field(default=30, ge=0, le=600)
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    events_exchange: str = "fem.events"
    reconnect_max_seconds: float = Field(default=30.0, gt=0)
    tls: TLSConfig | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^amqps?://", v):
            raise ValueError("must start with amqp:// or amqps://")
        return v


class VolumeConfig(_Section):
    path: Path
    mode: Literal["ro", "rw"] = "ro"


class PolicyConfig(_Section):
    images: list[str] = Field(default_factory=list)  # fnmatch globs; empty = no image allowed
    git: list[str] = Field(default_factory=list)  # fnmatch globs on the URL; empty = no git source allowed
    # The same fields and checks as a task's `resources`, read as upper limits.
    max_resources: Resources = Field(default_factory=Resources)
    default_resources: Resources = Field(default_factory=lambda: Resources(cpus=1, walltime="01:00:00"))
    executors: list[str] | None = None  # executors a task may name; None = every configured one


class StageOutConfig(_Section):
    max_bytes: int = Field(default=2 * 1024**3, ge=0)  # per task, uncompressed output size
    chunk_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024 * 1024)
    tail_bytes: int = Field(default=4096, ge=0, le=65536)
    # gzip level of the outputs archive; unset = 1 for compressible outputs, 0 (stored) for
    # outputs that would not shrink (model weights, archives)
    compress_level: int | None = Field(default=None, ge=0, le=9)


class LegacyConfig(_Section):
    enabled: bool = False
    sandbox_path: Path | None = None  # defaults to work_root
    reply_chunk_size: int = Field(default=512 * 1024, ge=64)
    submit_waits: bool = True
    executor: str | None = None
    token_env: str | None = None  # pass the request's token to the task under this env name
    send_files_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)


class RegistryCredential(_Section):
    username: str
    password: SecretStr


class GitCredential(_Section):
    username: str | None = None
    token: SecretStr | None = None  # https: sent as an Authorization header, never in the URL
    ssh_key: Path | None = None  # ssh: the private key for this host
    known_hosts: Path | None = None


class GitConfig(_Section):
    submodules: bool = False
    timeout_seconds: int = Field(default=600, ge=1)
    credentials: dict[str, GitCredential] = Field(default_factory=dict)  # by host name


class MetricsConfig(_Section):
    listen: str | None = None  # "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:
            from .metrics import parse_listen  # no prometheus import: metrics.py loads it lazily

            parse_listen(v)
        return v


class LoggingConfig(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


class CacheLimits(_Section):
    """One cache: entries are evicted least-recently-used first when the cache is over `max_bytes`,
    and any entry unused for `max_age_days`; never one a task is using. None = no limit."""

    max_bytes: int | None = Field(default=None, ge=0)
    max_age_days: float | None = Field(default=30.0, ge=0)


class CachesConfig(_Section):
    git: CacheLimits = Field(default_factory=lambda: CacheLimits(max_bytes=10 * 1024**3))
    sif: CacheLimits = Field(default_factory=lambda: CacheLimits(max_bytes=50 * 1024**3))
    docker: CacheLimits = Field(default_factory=lambda: CacheLimits(max_bytes=50 * 1024**3))


class RetentionConfig(_Section):
    """How long what fem-hpc writes is kept (every `*_days` may be None: kept forever).

    The clock of a final task starts when fem-hpc sees its result confirmed by the broker (the
    task's outbox rows are all published and gone), not when it ended: nothing is removed before
    the orchestrator had it."""

    workdirs_days: float | None = Field(default=7.0, ge=0)  # work dirs (and .fem/) of COMPLETED/CANCELLED tasks
    keep_failed_days: float | None = Field(default=14.0, ge=0)  # work dirs of FAILED tasks
    journal_days: float | None = Field(default=30.0, ge=0)  # then the task's rows become a tombstone
    idempotency_days: float | None = Field(default=365.0, ge=0)  # tombstones: a late duplicate runs nothing
    interval_seconds: float = Field(default=3600.0, ge=0)  # periodic pass in `serve`; 0 = only `fem-hpc gc`
    max_items_per_pass: int = Field(default=500, ge=1)  # per kind (work dirs, tasks, tombstones, cache entries)
    caches: CachesConfig = Field(default_factory=CachesConfig)

    @model_validator(mode="after")
    def _order(self) -> RetentionConfig:
        # The journal row is what tells the GC which work dir is whose: it may not go first. And a
        # tombstone only makes sense once the row is gone.
        if self.journal_days is not None:
            for name in ("workdirs_days", "keep_failed_days"):
                value = getattr(self, name)
                if value is None or value > self.journal_days:
                    raise ValueError(f"journal_days ({self.journal_days:g}) must be at least {name} "
                                     f"({'never' if value is None else f'{value:g}'}): a task's journal row "
                                     "names its work dir, so it is kept until the work dir is gone")
            if self.idempotency_days is not None and self.idempotency_days < self.journal_days:
                raise ValueError(f"idempotency_days ({self.idempotency_days:g}) must be at least journal_days "
                                 f"({self.journal_days:g}): the tombstone outlives the task's row")
        return self


class DiskGuardConfig(_Section):
    """Below these, new tasks are not started: the areas are state_dir, work_root, the legacy
    sandbox, the SIF caches and `paths`. Running tasks finish. 0 and 0 turn the guard off."""

    min_free_bytes: int = Field(default=1024**3, ge=0)
    min_free_percent: float = Field(default=1.0, ge=0, lt=100)
    on_low_disk: Literal["queue", "reject"] = "queue"
    check_seconds: float = Field(default=2.0, gt=0, le=60)  # a check is reused this long (intake stays fast)
    paths: dict[str, Path] = Field(default_factory=dict)  # more areas to watch, by name


class SiteConfig(_Section):
    node: str = Field(pattern=ID_PATTERN)
    broker: BrokerConfig = Field(default_factory=BrokerConfig)
    state_dir: Path
    work_root: Path
    # executors comes before default_executor so the check below sees it even when other keys are bad
    executors: dict[str, dict[str, Any]] = Field(default_factory=lambda: {"local": {}})
    default_executor: str = "local"
    volumes: dict[str, VolumeConfig] = Field(default_factory=dict)
    policy: PolicyConfig = Field(default_factory=PolicyConfig)
    templates_dir: Path | None = None
    stage_out: StageOutConfig = Field(default_factory=StageOutConfig)
    legacy: LegacyConfig = Field(default_factory=LegacyConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    git: GitConfig = Field(default_factory=GitConfig)
    registries: dict[str, RegistryCredential] = Field(default_factory=dict)  # by registry host[:port]
    workers: int = Field(default=8, ge=1, le=256)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    disk_guard: DiskGuardConfig = Field(default_factory=DiskGuardConfig)

    @field_validator("default_executor")
    @classmethod
    def _default_executor(cls, v: str, info: ValidationInfo) -> str:
        # A field validator (not a model validator) so it runs, and is reported under its own key,
        # even when other keys of the config are wrong too.
        executors = info.data.get("executors")
        if executors is not None and v not in executors:
            raise ValueError(f"{v!r} is not configured under executors (configured: {sorted(executors)})")
        return v

    @property
    def queue(self) -> str:
        return self.broker.queue or self.node

    @property
    def journal_path(self) -> Path:
        return self.state_dir / "journal.sqlite"

    def executor_type(self, name: str) -> str:
        return str(self.executors.get(name, {}).get("type", name))


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, path: str, problems: list[str]) -> Any:
    if isinstance(value, dict):
        return {k: _expand_env(v, f"{path}.{k}" if path else str(k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, f"{path}[{i}]", problems) for i, v in enumerate(value)]
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in os.environ:
                problems.append(f"{path}: environment variable {m.group(1)} is not set")
                return ""
            return os.environ[m.group(1)]

        return _ENV_REF.sub(sub, value)
    return value


def _format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        out.append(f"{loc}: {msg}")
    return out


def _defaults_over_limits(policy: PolicyConfig) -> list[str]:
    """Default resources are filled in after the policy check, so they must fit under the caps."""
    out = []
    defaults, limits = policy.default_resources, policy.max_resources
    for name, size in (("cpus", int), ("gpus", int), ("nodes", int), ("memory", memory_mib),
                       ("walltime", walltime_seconds)):
        value, cap = getattr(defaults, name), getattr(limits, name)
        if value is not None and cap is not None and size(value) > size(cap):
            out.append(f"policy.default_resources.{name}: {value} exceeds policy.max_resources.{name} ({cap}); "
                       "a task that asks for none would get more than the site allows")
    return out


def config_from_dict(raw: Any, source: str = "<config>", check_paths: bool = True) -> SiteConfig:
    if not isinstance(raw, dict):
        raise ConfigError(source, ["(top level): must be a mapping of keys"])
    problems: list[str] = []
    raw = _expand_env(raw, "", problems)
    if os.environ.get("FEM_HPC_BROKER_URL"):
        raw.setdefault("broker", {})
        if isinstance(raw["broker"], dict):
            raw["broker"]["url"] = os.environ["FEM_HPC_BROKER_URL"]
    cfg: SiteConfig | None = None
    try:
        cfg = SiteConfig.model_validate(raw)
    except ValidationError as exc:
        problems += _format_errors(exc)
    # The checks below read the raw mapping, so they are listed together with the model's own
    # problems (every problem at once) even when the model did not validate.
    # Executor settings are validated by each executor's own model, so a typo in
    # executors.slurm.partiton is reported here and not when the first job arrives.
    from .executors import registry

    executors = raw.get("executors", {"local": {}})
    if isinstance(executors, dict):
        for name, settings in executors.items():
            if not isinstance(settings, dict):
                continue  # the model already said it must be a mapping
            kind = str(settings.get("type", name))
            problems += [f"executors.{name}.{p}" for p in registry.validate_settings(kind, settings)]
    volumes = raw.get("volumes")
    if check_paths and isinstance(volumes, dict):
        for name, vol in volumes.items():
            path = vol.get("path") if isinstance(vol, dict) else None
            if isinstance(path, str) and path and not Path(path).exists():
                problems.append(f"volumes.{name}.path: {path!r} does not exist")
    templates_dir = raw.get("templates_dir")
    if check_paths and isinstance(templates_dir, str) and templates_dir and not Path(templates_dir).is_dir():
        # A typo here would silently fall back to the built-in templates.
        problems.append(f"templates_dir: {templates_dir!r} is not a directory")
    if cfg is not None:
        problems += _defaults_over_limits(cfg.policy)
    if problems or cfg is None:
        raise ConfigError(source, problems)
    # Volumes are resolved once, so a symlink swapped later cannot redirect a mount.
    for vol in cfg.volumes.values():
        vol.path = vol.path.resolve()
    return cfg


def load_config(path: str | Path) -> SiteConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return config_from_dict(raw, str(path))
