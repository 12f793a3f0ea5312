"""Images on the login node: reference parsing, docker pulls, and the Apptainer SIF cache.

Images are always pulled here, before a job is submitted, because compute nodes often have no
internet. Registry credentials come from the site config (`registries:` by host[:port]); they
are registered with the log redactor before first use and never put in argv: docker gets them
in the X-Registry-Auth header, apptainer in its environment (APPTAINER_DOCKER_USERNAME/PASSWORD).

The SIF cache lives under `state_dir/sif`. A SIF is named after the image's digest when the
reference pins one (`...@sha256:<hex>`), else after the sha256 of the normalized reference (a
mutable tag is then cached until `pull_policy: always` refreshes it). A per-image fcntl lock, a
temporary file in the cache dir and an atomic `os.replace` make concurrent callers, threads and
processes alike, download one image once, and no reader ever sees half a SIF.

`ensure_image(runtime, ref, pull_policy)` is the one place that decides, per pull policy, whether
an image is pulled: the docker executor, the apptainer executor and containers inside batch jobs
(`stage_image`) all go through it.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..logs import redact, register_secret
from .errors import ImageError
from .locks import exclusive

if TYPE_CHECKING:
    from ..config import RegistryCredential, SiteConfig

log = logging.getLogger("fem_hpc.staging.images")

DEFAULT_REGISTRY = "docker.io"
_DOCKER_HUB_ALIASES = ("docker.io", "index.docker.io", "registry-1.docker.io")
_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")

PullPolicy = Literal["if-not-present", "always", "never"]
Runtime = Literal["apptainer", "singularity", "docker"]
Flavor = Literal["apptainer", "singularity"]



@dataclass(frozen=True)
class ImageRef:
    registry: str  # host[:port]; docker.io when the reference names none
    repository: str  # path inside the registry, e.g. "fem/busybox" or "library/debian"
    tag: str | None
    digest: str | None  # "sha256:<hex>"

    @property
    def name(self) -> str:
        """registry/repository, as docker and registries spell it."""
        return f"{self.registry}/{self.repository}"

    @property
    def pull_tag(self) -> str:
        """What to ask the registry for: the digest when pinned (it wins over the tag), else the tag."""
        return self.digest or self.tag or "latest"

    @property
    def pull_ref(self) -> str:
        """A reference docker and apptainer both accept: name@digest or name:tag."""
        return f"{self.name}@{self.digest}" if self.digest else f"{self.name}:{self.tag or 'latest'}"

    def __str__(self) -> str:
        out = self.name
        if self.tag:
            out += f":{self.tag}"
        if self.digest:
            out += f"@{self.digest}"
        return out

    @property
    def normalized(self) -> str:
        """The canonical spelling: registry always named, tag `latest` when neither tag nor digest."""
        tag = self.tag or (None if self.digest else "latest")
        return str(ImageRef(self.registry, self.repository, tag, self.digest))


def parse_image_ref(text: str) -> ImageRef:
    """Split `[registry[:port]/]repo[/more][:tag][@sha256:hex]` the way docker does."""
    if not text or text != text.strip() or any(c.isspace() for c in text):
        raise ImageError(f"image reference {text!r} is empty or contains spaces")
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ImageError(f"image reference {text!r}: digest {digest!r} is not sha256:<64 hex digits>")
    parts = rest.split("/")
    registry = DEFAULT_REGISTRY
    if len(parts) > 1 and ("." in parts[0] or ":" in parts[0] or parts[0] == "localhost"):
        registry = parts[0]
        parts = parts[1:]
    tag = None
    if ":" in parts[-1]:
        parts[-1], tag = parts[-1].rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise ImageError(f"image reference {text!r}: tag {tag!r} is not valid")
    if not parts or not all(_COMPONENT.fullmatch(p) for p in parts):
        raise ImageError(f"image reference {text!r}: repository {'/'.join(parts)!r} is not valid "
                         "(lowercase letters, digits and . _ - separators)")
    if registry in _DOCKER_HUB_ALIASES:
        registry = DEFAULT_REGISTRY
        if len(parts) == 1:
            parts = ["library", *parts]
    return ImageRef(registry=registry, repository="/".join(parts), tag=tag, digest=digest)


def credentials_for(site: SiteConfig, ref: ImageRef) -> RegistryCredential | None:
    """The site's credentials for the reference's registry (Docker Hub under any of its names)."""
    names = _DOCKER_HUB_ALIASES if ref.registry == DEFAULT_REGISTRY else (ref.registry,)
    for name in names:
        if name in site.registries:
            return site.registries[name]
    return None


def docker_auth_config(credentials: RegistryCredential | None, registry: str) -> dict[str, str] | None:
    """The auth_config the docker SDK sends as X-Registry-Auth; every form of the secret is
    registered with the log redactor first."""
    if credentials is None:
        return None
    password = credentials.password.get_secret_value()
    register_secret(password)
    config = {"username": credentials.username, "password": password, "serveraddress": registry}
    # The header value docker-py builds (urlsafe base64 of the JSON), in case anything ever logs it.
    register_secret(base64.urlsafe_b64encode(json.dumps(config).encode()).decode())
    return config


Progress = Callable[[str], None]


def docker_pull(client: Any, ref: ImageRef | str, credentials: RegistryCredential | None = None,
                progress: Progress | None = None) -> None:
    """Pull one image through the daemon. Raises ImageError with the registry's own message
    (e.g. `manifest unknown`, `unauthorized`) and never with the credentials."""
    import docker.errors

    if isinstance(ref, str):
        ref = parse_image_ref(ref)
    auth = docker_auth_config(credentials, ref.registry)
    started = time.monotonic()
    last_note = 0.0
    if progress is not None:
        progress(f"pulling image {ref}")
    try:
        stream = client.api.pull(ref.name, tag=ref.pull_tag, stream=True, decode=True, auth_config=auth)
        for line in stream:
            if not isinstance(line, dict):
                continue
            if line.get("error"):
                detail = line.get("errorDetail", {}).get("message") or line["error"]
                raise ImageError(f"cannot pull image {ref}: {redact(str(detail))}")
            if progress is not None and time.monotonic() - last_note > 1.0:
                last_note = time.monotonic()
                status = " ".join(str(line[k]) for k in ("id", "status", "progress") if line.get(k))
                if status:
                    progress(status)
    except docker.errors.APIError as exc:
        raise ImageError(f"cannot pull image {ref}: {docker_explanation(exc)}") from None
    except docker.errors.DockerException as exc:
        raise ImageError(f"cannot pull image {ref}: {redact(str(exc))}") from None
    log.info("pulled %s in %.1fs", ref, time.monotonic() - started)
    if progress is not None:
        progress(f"pulled image {ref} in {time.monotonic() - started:.1f}s")


def docker_explanation(exc: BaseException) -> str:
    """What the daemon said (an APIError's `explanation`), redacted; str(exc) for anything else."""
    text = getattr(exc, "explanation", None) or str(exc)
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return redact(str(text))


# -- the Apptainer/Singularity runtime ------------------------------------------------------------
def flavor(binary: str | None, runtime: str = "apptainer") -> Flavor:
    """Which of the two a binary is (by its name; singularity still spells its options and its
    environment prefixes the old way): the one place that tells them apart."""
    return "singularity" if "singularity" in Path(binary or runtime).name else "apptainer"


def find_runtime_binary(runtime: Runtime, configured: str | None = None) -> str:
    """Absolute path of the runtime's binary: the configured one (a path or a name on PATH), else
    apptainer then singularity (docker: docker) on PATH. Raises ImageError naming what is missing."""
    if configured:
        found = shutil.which(configured)
        if found:
            return found
        raise ImageError(f"{configured!r} is not an executable")
    candidates = ("docker",) if runtime == "docker" else ("apptainer", "singularity")
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    raise ImageError("docker is not on PATH" if runtime == "docker" else "neither apptainer nor singularity is on PATH")


# -- the Apptainer SIF cache -----------------------------------------------------------------------
def default_sif_cache(site: SiteConfig) -> Path:
    """The SIF cache when none is configured: the batch executors always use this one."""
    return site.state_dir / "sif"


def cache_key(ref: ImageRef | str, digest: str | None = None) -> str:
    """File stem of an image's SIF: its digest when known, else the hash of the normalized ref."""
    if isinstance(ref, str):
        ref = parse_image_ref(ref)
    digest = digest or ref.digest
    if digest:
        if not _DIGEST.fullmatch(digest):
            raise ImageError(f"digest {digest!r} is not sha256:<64 hex digits>")
        return "sha256-" + digest.split(":", 1)[1]
    return "ref-" + hashlib.sha256(ref.normalized.encode()).hexdigest()


def sif_path(cache_dir: Path, ref: ImageRef | str, digest: str | None = None) -> Path:
    return Path(cache_dir) / f"{cache_key(ref, digest)}.sif"


def apptainer_env_credentials(binary: str, credentials: RegistryCredential | None) -> dict[str, str]:
    """Registry credentials for `apptainer pull` / `singularity pull`, passed in the environment."""
    if credentials is None:
        return {}
    password = credentials.password.get_secret_value()
    register_secret(password)
    prefix = flavor(binary).upper()
    return {f"{prefix}_DOCKER_USERNAME": credentials.username, f"{prefix}_DOCKER_PASSWORD": password}


def ensure_sif(runtime_binary: str, ref: ImageRef | str, cache_dir: Path, *, digest: str | None = None,
               pull_args: Sequence[str] = (), env: Mapping[str, str] | None = None, force: bool = False,
               timeout: float | None = 3600.0) -> Path:
    """The SIF of `ref` in `cache_dir`, pulled once: `<binary> pull [args] <tmp>.sif docker://<ref>`
    into a temp file next to the cache entry, then renamed over it atomically. `force` pulls again
    even when the SIF exists (`pull_policy: always`); the lock still makes concurrent forced
    callers pull one after another, never into the same file."""
    if isinstance(ref, str):
        ref = parse_image_ref(ref)
    cache_dir = Path(cache_dir)
    target = sif_path(cache_dir, ref, digest)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Under the entry's lock even when cached: the GC takes it too before it evicts a SIF. The
    # mtime is the entry's last use (least-recently-used entries are evicted first).
    with exclusive(cache_dir / ".locks" / f"{target.stem}.lock"):
        if target.exists() and not force:
            os.utime(target)
            return target
        tmp = cache_dir / f".{target.stem}.{os.getpid()}.{threading.get_ident()}.tmp.sif"
        argv = [runtime_binary, "pull", *pull_args, str(tmp), f"docker://{ref.pull_ref}"]
        full_env = {**os.environ, **(env or {})}
        started = time.monotonic()
        log.info("pulling %s into the SIF cache (%s)", ref, target.name)
        try:
            proc = subprocess.run(argv, env=full_env, stdin=subprocess.DEVNULL, capture_output=True,
                                  timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"{Path(runtime_binary).name} pull of {ref} did not finish within {timeout:.0f}s") \
                from None
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"cannot run {runtime_binary}: {exc.strerror}") from None
        if proc.returncode != 0:
            tmp.unlink(missing_ok=True)
            detail = _last_lines(proc.stderr or proc.stdout)
            raise ImageError(f"{Path(runtime_binary).name} pull of {ref} failed (exit {proc.returncode}): "
                             f"{redact(detail)}")
        if not tmp.is_file() or tmp.stat().st_size == 0:
            tmp.unlink(missing_ok=True)
            raise ImageError(f"{Path(runtime_binary).name} pull of {ref} succeeded but wrote no SIF file")
        tmp.chmod(0o644)
        os.replace(tmp, target)
        log.info("cached %s as %s in %.1fs", ref, target.name, time.monotonic() - started)
        return target


def _last_lines(raw: bytes | str | None, n: int = 5) -> str:
    if not raw:
        return "(no output)"
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


# -- the one pull-policy decision ------------------------------------------------------------------
def pull_needed(pull_policy: PullPolicy, present: Callable[[], bool], missing: str) -> bool:
    """Whether to pull: `always` pulls without asking `present`; `if-not-present` pulls what is
    missing; `never` never pulls and raises ImageError("<missing> and pull_policy is 'never'")
    for a missing image."""
    if pull_policy == "always":
        return True
    if present():
        return False
    if pull_policy == "never":
        raise ImageError(f"{missing} and pull_policy is 'never'")
    return True


def ensure_image(runtime: Runtime, ref: ImageRef | str, pull_policy: PullPolicy, *,
                 credentials: RegistryCredential | None = None, progress: Progress | None = None,
                 docker_client: Any = None, binary: str | None = None, cache_dir: Path | None = None,
                 pull_args: Sequence[str] = (), insecure_registries: Sequence[str] = (),
                 timeout: float | None = 3600.0, state_dir: Path | None = None, base_url: str | None = None) -> str:
    """Make the image present on this host under `pull_policy` and return what the runtime runs.

    docker: `docker_client` (a docker.DockerClient) is asked and pulls; returns the reference the
    daemon now holds (with `state_dir`, under the image's GC lock, noting what fem-hpc pulled for
    retention; `base_url` names the daemon in the note). apptainer/singularity: the SIF in
    `cache_dir`, pulled by `binary` (found on PATH when None) with `pull_args`, over plain HTTP for
    a registry in `insecure_registries`; returns the SIF path. Raises ImageError with a message for the user."""
    if isinstance(ref, str):
        ref = parse_image_ref(ref)
    if runtime == "docker":
        if docker_client is None:
            raise ValueError("ensure_image('docker', ...) needs a docker_client")
        missing = f"image {ref} is not present on this host"
        # Under the image's lock, which the GC takes before it evicts an image fem-hpc pulled;
        # the note is what tells the GC that fem-hpc (and not the site) pulled it.
        with docker_image_lock(state_dir, ref) if state_dir is not None else nullcontext():
            pulled = pull_needed(pull_policy, lambda: _docker_has(docker_client, ref), missing)
            if pulled:
                docker_pull(docker_client, ref, credentials, progress=progress)
            if state_dir is not None:
                note_docker_use(state_dir, ref, pulled=pulled, base_url=base_url)
        return ref.pull_ref
    if cache_dir is None:
        raise ValueError(f"ensure_image({runtime!r}, ...) needs the SIF cache_dir")
    exe = find_runtime_binary(runtime, binary)
    target = sif_path(cache_dir, ref)
    cached = target.exists()
    if not pull_needed(pull_policy, lambda: cached, f"image {ref} is not in the SIF cache ({target})"):
        return str(target)
    args = list(pull_args)
    if ref.registry in insecure_registries:
        args.append("--nohttps" if flavor(exe) == "singularity" else "--no-https")
    if progress is not None:
        progress(f"pulling image {ref} into the SIF cache")
    # A pull over a cached SIF (`always`) is forced; a missing one is pulled by whichever caller
    # takes the cache lock first, and the others find it there (ensure_sif looks again).
    return str(ensure_sif(exe, ref, cache_dir, pull_args=args, env=apptainer_env_credentials(exe, credentials),
                          force=cached, timeout=timeout))


def _docker_has(client: Any, ref: ImageRef) -> bool:
    import docker.errors

    try:
        client.images.get(ref.pull_ref)
    except docker.errors.ImageNotFound:
        return False
    except Exception as exc:  # APIError, or requests' connection errors
        raise ImageError(f"cannot ask the docker daemon about image {ref}: {docker_explanation(exc)}") from None
    return True


def stage_image(runtime: Runtime, site: SiteConfig, image: str, pull_policy: PullPolicy = "if-not-present", *,
                binary: str | None = None, progress: Progress | None = None) -> str:
    """Stage a batch job's image on this (login) host before submit (compute nodes often have no
    internet) and return the image argument of its launch line: the SIF path in the site's SIF
    cache, or the reference the local daemon now holds. Credentials from `site.registries`."""
    ref = parse_image_ref(image)
    credentials = credentials_for(site, ref)
    if runtime != "docker":
        return ensure_image(runtime, ref, pull_policy, credentials=credentials, progress=progress, binary=binary,
                            cache_dir=default_sif_cache(site))
    import docker
    import docker.errors

    try:
        client = docker.from_env()
    except docker.errors.DockerException as exc:
        raise ImageError(f"cannot reach the docker daemon: {docker_explanation(exc)}") from None
    try:
        return ensure_image("docker", ref, pull_policy, credentials=credentials, progress=progress,
                            docker_client=client, state_dir=site.state_dir)
    finally:
        client.close()


def local_images(site: SiteConfig) -> dict[str, Any]:
    """The images this node has at hand: the Docker engine's tags (when a docker executor is
    configured) and the SIF cache. A runtime that does not answer is an error entry, not a failure."""
    out: dict[str, Any] = {}
    if any(site.executor_type(name) == "docker" for name in site.executors):
        try:
            import docker  # optional: only a docker node needs the SDK

            client = docker.from_env(timeout=10)
            out["docker"] = sorted(t for img in client.images.list() for t in img.tags)
        except Exception as exc:
            out["docker"] = {"error": str(exc)}
    sif_dir = site.state_dir / "sif"
    if sif_dir.is_dir():
        out["sif"] = sorted(p.name for p in sif_dir.glob("*.sif"))
    return out


# -- docker images fem-hpc pulled (what the GC may evict) ------------------------------------------
# The daemon keeps images in its own store, next to images the site pulled itself. fem-hpc notes
# the ones it pulled in `state_dir/docker-images/<key>.json` (the note's mtime is the image's last
# use) and the GC evicts only those. A per-image lock, taken by stage-in around the presence check
# and pull and by the GC around a removal, keeps an eviction from racing a task's stage-in.
def docker_notes_dir(state_dir: Path) -> Path:
    return Path(state_dir) / "docker-images"


def _docker_key(ref: ImageRef) -> str:
    return hashlib.sha256(ref.pull_ref.encode()).hexdigest()[:32]


def docker_image_lock(state_dir: Path, ref: ImageRef) -> Any:
    return exclusive(docker_notes_dir(state_dir) / ".locks" / f"{_docker_key(ref)}.lock")


def docker_image_lock_path(state_dir: Path, ref_text: str) -> Path:
    return docker_notes_dir(state_dir) / ".locks" / f"{_docker_key(parse_image_ref(ref_text))}.lock"


def note_docker_use(state_dir: Path, ref: ImageRef, *, pulled: bool, base_url: str | None = None) -> None:
    """Note an image fem-hpc pulled, or refresh the last use of one it pulled before. Images it
    did not pull are never noted (so never evicted). A failure here only costs the eviction."""
    note = docker_notes_dir(state_dir) / f"{_docker_key(ref)}.json"
    try:
        if pulled:
            note.parent.mkdir(parents=True, exist_ok=True)
            tmp = note.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
            tmp.write_text(json.dumps({"ref": ref.pull_ref, "base_url": base_url, "pulled": time.time()}))
            os.replace(tmp, note)
        elif note.exists():
            os.utime(note)
    except OSError as exc:
        log.warning("cannot note the use of image %s for the GC (%s); it will not be evicted", ref, exc)
