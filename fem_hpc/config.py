"""Site configuration: YAML -> pydantic, with environment overrides and errors a person can act on.

Secrets stay out of the file when the admin wants: any string value may be written as
``${NAME}`` and is read from the environment, and ``FEM_HPC_BROKER_URL`` replaces ``broker.url``.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from .config_retention import DiskGuardConfig, RetentionConfig
from .model import ENV_NAME_PATTERN, ID_PATTERN, Resources, errors_from_validation, memory_mib, walltime_seconds


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


def parse_listen(value: str) -> tuple[str, int]:
    """``host:port`` (IPv4, a host name, or ``[v6]:port``) -> (host, port). Raises ValueError."""
    value = value.strip()
    m = re.match(r"^\[([0-9A-Fa-f:.]+)\]:(\d{1,5})$", value) or re.match(r"^([A-Za-z0-9.-]+):(\d{1,5})$", value)
    if not m:
        raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464, 0.0.0.0:9464 or [::1]:9464)")
    host, port = m.group(1), int(m.group(2))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is not in 1-65535")
    if value.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    elif re.match(r"^[0-9.]+$", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
    return host, port


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


def parse_port_ranges(items: list[int | str]) -> list[tuple[int, int]]:
    """`[4433, "8000-8010"]` -> `[(4433, 4433), (8000, 8010)]`. Raises ValueError naming the bad item."""
    out = []
    for item in items:
        if isinstance(item, bool):  # True would otherwise be port 1
            raise ValueError(f"{item!r} is not a port or a range 'a-b'")
        text = str(item).strip()
        low, sep, high = text.partition("-")
        try:
            a, b = int(low), int(high if sep else low)
        except ValueError:
            raise ValueError(f"{item!r} is not a port or a range 'a-b'") from None
        if not 1 <= a <= b <= 65535:
            raise ValueError(f"{item!r}: ports are 1..65535 and a range is 'low-high'")
        out.append((a, b))
    return out


class PolicyConfig(_Section):
    images: list[str] = Field(default_factory=list)  # fnmatch globs; empty = no image allowed
    git: list[str] = Field(default_factory=list)  # fnmatch globs on the URL; empty = no git source allowed
    # The same fields and checks as a task's `resources`, read as upper limits.
    max_resources: Resources = Field(default_factory=Resources)
    default_resources: Resources = Field(default_factory=lambda: Resources(cpus=1, walltime="01:00:00"))
    executors: list[str] | None = None  # executors a task may name; None = every configured one
    # host ports a task may publish (a legacy document's port_mappings): ports or "a-b" ranges; empty = none
    ports: list[int | str] = Field(default_factory=list)

    @field_validator("ports", mode="before")
    @classmethod
    def _ports(cls, v: Any) -> Any:
        if isinstance(v, list):
            parse_port_ranges(v)
        return v


class StageOutConfig(_Section):
    max_bytes: int = Field(default=2 * 1024**3, ge=0)  # per task, uncompressed output size
    chunk_bytes: int = Field(default=1024 * 1024, ge=1024, le=1024 * 1024)
    tail_bytes: int = Field(default=4096, ge=0, le=65536)
    # gzip level of the outputs archive; unset = 1 for compressible outputs, 0 (stored) for
    # outputs that would not shrink (model weights, archives)
    compress_level: int | None = Field(default=None, ge=0, le=9)


# $NAMEs a legacy document may not declare: fem-hpc derives them (node, legacy.sandbox_path).
RESERVED_LEGACY_VARIABLES = ("NODE_NAME", "SANDBOX_PATH")


class LegacyVariable(_Section):
    """One `$NAME` a legacy task document may use. `mode` says what a host path under an absolute
    `value` may be mounted as: ro (the default), rw, or none (a plain value, never a mount root).
    A bare string in the YAML is the short form of `{value: ..., mode: ro}`."""

    value: str
    mode: Literal["ro", "rw", "none"] = "ro"

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, v: Any) -> Any:
        return {"value": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _rw_is_a_path(self) -> LegacyVariable:
        if self.mode == "rw" and not self.value.startswith("/"):
            raise ValueError(f"mode rw needs an absolute path as value, not {self.value!r}")
        return self


class LegacyConfig(_Section):
    enabled: bool = False
    sandbox_path: Path | None = None  # defaults to work_root
    reply_chunk_size: int = Field(default=512 * 1024, ge=64)
    submit_waits: bool = True
    # A document with an image runs on `executor` (docker, apptainer, or slurm/pbs with containers;
    # default: default_executor); one without an image on `executor_no_image`, and is refused when
    # that is not set (a plain command on the login node is the site's choice, never a default).
    executor: str | None = None
    executor_no_image: str | None = None
    token_env: str | None = None  # pass the request's token to the task under this env name
    send_files_max_bytes: int = Field(default=64 * 1024 * 1024, ge=0)
    # The `$NAME`s task documents may use (never the service's own environment); NODE_NAME and
    # SANDBOX_PATH are always there and come from `node` and `sandbox_path`.
    variables: dict[str, LegacyVariable] = Field(default_factory=dict)

    def mountable(self) -> dict[str, LegacyVariable]:
        """The declared variables a task may mount (an absolute path with mode ro or rw)."""
        return {name: v for name, v in self.variables.items() if v.mode != "none" and v.value.startswith("/")}

    @field_validator("variables")
    @classmethod
    def _variables(cls, v: dict[str, LegacyVariable]) -> dict[str, LegacyVariable]:
        for name in v:
            if not re.fullmatch(ENV_NAME_PATTERN, name):
                raise ValueError(f"variable name {name!r} does not match {ENV_NAME_PATTERN}")
            if name in RESERVED_LEGACY_VARIABLES:
                raise ValueError(f"{name} is set by fem-hpc (NODE_NAME = node, SANDBOX_PATH = "
                                 "legacy.sandbox_path) and cannot be declared")
        return v


_REGISTRY_PREFIX = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?(?::[0-9]{1,5})?(?:/[a-z0-9._-]+)*$")


def check_registry_prefix(text: str) -> str:
    """`host[:port][/path/prefix]` with no scheme, no tag and no trailing '/'."""
    host = text.split("/", 1)[0]
    # docker's own rule: the first component names a registry only with a '.' or ':' or as localhost
    if not _REGISTRY_PREFIX.fullmatch(text) or not ("." in host or ":" in host or host == "localhost"):
        raise ValueError(f"{text!r} is not a registry host[:port][/path] (e.g. 127.0.0.1:5000 or "
                         "mirror.example.org/team; no scheme, no tag, no trailing '/')")
    return text


class ImageMirror(_Section):
    """`image_mirrors: {<host[:port][/prefix]>: {mirror: <host[:port][/prefix]>}}`: an image whose
    reference starts with the key is pulled from the mirror instead (the rest of the reference, tag
    and digest are kept). The credentials used are those of the mirror host in `registries`."""

    mirror: str

    @field_validator("mirror")
    @classmethod
    def _mirror(cls, v: str) -> str:
        return check_registry_prefix(v)


class RegistryCredential(_Section):
    username: str
    password: SecretStr


class GitCredential(_Section):
    username: str | None = None
    token: SecretStr | None = None  # https: sent as an Authorization header, never in the URL
    ssh_key: Path | None = None  # ssh: the private key for this host
    known_hosts: Path | None = None


_GIT_PREFIX = re.compile(r"^(?:[a-z][a-z0-9+.-]*://[^\s]+|[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:[^\s]*|/[^\s]*)$")


class GitConfig(_Section):
    submodules: bool = False
    timeout_seconds: int = Field(default=600, ge=1)
    credentials: dict[str, GitCredential] = Field(default_factory=dict)  # by host name
    # Fetch a source whose URL starts with a key from the value instead (the rest of the URL kept):
    # a site's own mirror of the repositories its documents name. Policy (policy.git) is checked
    # against the URL the task named; credentials are those of the mirror's host.
    mirrors: dict[str, str] = Field(default_factory=dict)

    @field_validator("mirrors")
    @classmethod
    def _mirrors(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            for text in (key, value):
                if not _GIT_PREFIX.fullmatch(text):
                    raise ValueError(f"{text!r} is not a git URL prefix (scheme://host/path/, user@host:path or "
                                     "/abs/path)")
        return v

    def fetch_url(self, url: str) -> str:
        """`url` with the longest matching `mirrors` prefix replaced (unchanged when none matches)."""
        best = max((key for key in self.mirrors if url.startswith(key)), key=len, default=None)
        return url if best is None else self.mirrors[best] + url[len(best):]


class MetricsConfig(_Section):
    listen: str | None = None  # "127.0.0.1:9464"

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str | None) -> str | None:
        if v is not None:

            parse_listen(v)
        return v


class LoggingConfig(_Section):
    format: Literal["text", "json"] = "text"
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"


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
    # Names of the service's own environment variables that tasks may see (e.g. a site's
    # proxy or license server). Everything else of the service's environment (the broker URL,
    # credentials) stays out of every task, whatever the executor.
    pass_env: list[Annotated[str, StringConstraints(pattern=ENV_NAME_PATTERN)]] = Field(default_factory=list)
    stage_out: StageOutConfig = Field(default_factory=StageOutConfig)
    legacy: LegacyConfig = Field(default_factory=LegacyConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    git: GitConfig = Field(default_factory=GitConfig)
    registries: dict[str, RegistryCredential] = Field(default_factory=dict)  # by registry host[:port]
    image_mirrors: dict[str, ImageMirror] = Field(default_factory=dict)  # by registry host[:port][/prefix]
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

    @field_validator("legacy")
    @classmethod
    def _legacy_executors(cls, v: LegacyConfig, info: ValidationInfo) -> LegacyConfig:
        executors = info.data.get("executors")
        for key in ("executor", "executor_no_image"):
            name = getattr(v, key)
            if executors is not None and name is not None and name not in executors:
                raise ValueError(f"{key}: {name!r} is not configured under executors (configured: {sorted(executors)})")
        return v

    @field_validator("image_mirrors")
    @classmethod
    def _image_mirrors(cls, v: dict[str, ImageMirror]) -> dict[str, ImageMirror]:
        for key in v:
            check_registry_prefix(key)
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


def format_errors(exc: ValidationError) -> list[str]:
    """A config's (or an executor section's) problems as 'key.path: message' lines."""
    return [f"{e.field or '(top level)'}: {e.message}" for e in errors_from_validation(exc, "", unknown="unknown key")]


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


ExecutorCheck = Callable[[str, Any], list[str]]  # (type, settings) -> 'key: message' problems


def config_from_dict(raw: Any, source: str = "<config>", check_paths: bool = True,
                     executor_check: ExecutorCheck | None = None) -> SiteConfig:
    """The validated site config. `executor_check` validates each executor section with that
    executor's own settings model (executors.registry.validate_settings; passed in, because the
    config sits below the executors); without it the sections are only checked to be mappings."""
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
        problems += format_errors(exc)
    # The checks below read the raw mapping, so they are listed together with the model's own
    # problems (every problem at once) even when the model did not validate.
    # Executor settings are validated by each executor's own model, so a typo in
    # executors.slurm.partiton is reported here and not when the first job arrives.
    executors = raw.get("executors", {"local": {}})
    if executor_check is not None and isinstance(executors, dict):
        for name, settings in executors.items():
            if not isinstance(settings, dict):
                continue  # the model already said it must be a mapping
            kind = str(settings.get("type", name))
            problems += [f"executors.{name}.{p}" for p in executor_check(kind, settings)]
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


def load_config(path: str | Path, executor_check: ExecutorCheck | None = None) -> SiteConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(str(path), [f"cannot read the file: {exc.strerror}"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(str(path), [f"not valid YAML: {exc}"]) from None
    return config_from_dict(raw, str(path), executor_check=executor_check)
