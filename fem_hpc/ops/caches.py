"""Retention of the caches: git mirrors, SIF files and the docker images fem-hpc pulled, least
recently used first, never an entry a task still needs or whose lock is held."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import SiteConfig
from ..config_retention import CacheLimits
from ..diskguard import human_bytes
from ..journal import Journal
from ..staging.errors import ImageError
from ..staging.git import mirror_path
from ..staging.images import ImageRef, cache_key, docker_image_lock_path, docker_notes_dir, parse_image_ref
from ..staging.locks import try_exclusive
from ..staging.mirrors import site_image
from .gc_model import DAY, STALE_TEMP_SECONDS, Area, Item, days_ago, path_size, rmtree, tree_bytes

log = logging.getLogger("fem_hpc.ops.gc")


# -- caches -------------------------------------------------------------------------------------------
@dataclass
class Entry:
    area: Area
    what: str  # shown to the admin: a path or an image reference
    key: str  # what an active task names when it needs this entry
    path: Path  # the file or dir to remove (a docker image: its note)
    lock: Path
    bytes: int
    last_used: float
    base_url: str | None = None  # docker: the daemon that holds the image


def sif_dirs(site: SiteConfig) -> list[Path]:
    dirs = [site.state_dir / "sif"]
    for name, settings in site.executors.items():
        if site.executor_type(name) == "apptainer" and settings.get("cache_dir"):
            dirs.append(Path(settings["cache_dir"]))
    return list(dict.fromkeys(dirs))


def in_use(site: SiteConfig, journal: Journal) -> dict[str, set[str]]:
    """The cache keys the journal's active tasks need: their mirror, SIF and image, as stage-in and the
    executors name them, i.e. after the site's `git.mirrors` and `image_mirrors` rewrites (the entry
    on disk is the rewritten one). The task's own spelling is kept too, so an entry made before a
    mirror rule was added is protected as well."""
    out: dict[str, set[str]] = {"git": set(), "sif": set(), "docker": set()}
    for rec in journal.active():
        try:
            task = rec.task
        except (ValueError, AssertionError):
            continue
        if task.source is not None:
            for url in {task.source.git, site.git.fetch_url(task.source.git)}:
                out["git"].add(str(mirror_path(site, url)))
        if task.image:
            for ref in _image_refs(site, task.image):
                out["sif"].add(cache_key(ref))
                out["docker"].add(ref.pull_ref)
    return out


def _image_refs(site: SiteConfig, image: str) -> list[ImageRef]:
    refs = []
    for resolve in (parse_image_ref, lambda text: site_image(site, text)):
        try:
            refs.append(resolve(image))
        except ImageError:  # an invalid reference has no cache entry to protect
            continue
    return refs


def last_use(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def git_entries(site: SiteConfig) -> Iterator[Entry]:
    base = site.state_dir / "git"
    if not base.is_dir():
        return
    for p in sorted(base.iterdir()):
        if p.is_dir() and p.name.endswith(".git"):
            yield Entry("git", str(p), str(p), p, p.with_suffix(".lock"), tree_bytes(p), last_use(p))


def sif_entries(site: SiteConfig) -> Iterator[Entry]:
    for d in sif_dirs(site):
        if not d.is_dir():
            continue
        for p in sorted(d.glob("*.sif")):
            if p.is_file() and not p.name.startswith("."):
                yield Entry("sif", str(p), p.stem, p, d / ".locks" / f"{p.stem}.lock", p.stat().st_size, last_use(p))


def stale_temps(site: SiteConfig, now: float) -> list[Item]:
    """Half-written clones and pulls a crash left behind (the live ones are younger, and locked)."""
    found = [p for p in (site.state_dir / "git").glob("*.git.tmp*")]
    for d in sif_dirs(site):
        found += list(d.glob(".*.tmp.sif"))
    return [Item(area="git" if p.parent.name == "git" else "sif", what=str(p), bytes=path_size(p),
                 reason=f"left by an interrupted clone or pull {days_ago(last_use(p), now)}")
            for p in sorted(found) if now - last_use(p) > STALE_TEMP_SECONDS]


class Docker:
    """Docker clients by daemon address, for one pass (the docker SDK, imported only when needed)."""

    def __init__(self, factory: Callable[[str | None], Any] | None = None):
        self._factory = factory or self._connect
        self._clients: dict[str | None, Any] = {}

    @staticmethod
    def _connect(base_url: str | None) -> Any:
        import docker

        return docker.DockerClient(base_url=base_url, timeout=60) if base_url else docker.from_env(timeout=60)

    def client(self, base_url: str | None) -> Any:
        if base_url not in self._clients:
            self._clients[base_url] = self._factory(base_url)
        return self._clients[base_url]

    def close(self) -> None:
        for client in self._clients.values():
            try:
                client.close()
            except Exception:
                pass
        self._clients.clear()


def docker_entries(site: SiteConfig, docker: Docker, errors: list[str]) -> Iterator[Entry]:
    """The images fem-hpc pulled and still noted; a note whose image is gone is dropped."""
    import docker.errors as derr

    base = docker_notes_dir(site.state_dir)
    if not base.is_dir():
        return
    for note in sorted(base.glob("*.json")):
        try:
            data = json.loads(note.read_text())
            ref, base_url = str(data["ref"]), data.get("base_url")
        except (OSError, ValueError, KeyError, TypeError):
            continue
        try:
            size = int(docker.client(base_url).images.get(ref).attrs.get("Size") or 0)
        except derr.ImageNotFound:
            note.unlink(missing_ok=True)  # removed by someone else: nothing left to evict
            continue
        except Exception as exc:  # the daemon is down or unreachable: this cache waits for the next pass
            errors.append(f"docker{f' at {base_url}' if base_url else ''}: {exc}")
            return
        yield Entry("docker", ref, ref, note, docker_image_lock_path(site.state_dir, ref), size, last_use(note),
                    base_url)


def plan_cache(entries: list[Entry], limits: CacheLimits, now: float, busy: set[str], limit: int) -> list[Item]:
    """Least recently used first: what is too old, then what keeps the cache over max_bytes."""
    total = sum(e.bytes for e in entries)
    items = []
    for e in sorted(entries, key=lambda e: e.last_used):
        if len(items) >= limit:
            break
        if e.key in busy:
            continue
        age = now - e.last_used
        if limits.max_age_days is not None and age > limits.max_age_days * DAY:
            reason = f"unused since {days_ago(e.last_used, now)} (max_age_days {limits.max_age_days:g})"
        elif limits.max_bytes is not None and total > limits.max_bytes:
            reason = (f"least recently used ({days_ago(e.last_used, now)}) while the cache holds "
                      f"{human_bytes(total)} (max_bytes {human_bytes(limits.max_bytes)})")
        else:
            continue
        total -= e.bytes
        items.append(Item(area=e.area, what=e.what, bytes=e.bytes, reason=reason))
    return items


def evict(site: SiteConfig, journal: Journal, entry: Entry, item: Item, docker: Docker) -> None:
    """Remove one cache entry under its lock, after a fresh look at what the active tasks need."""
    with try_exclusive(entry.lock) as held:
        if not held:
            item.skipped = "in use: a stage-in holds its lock"
            return
        if entry.key in in_use(site, journal)[entry.area]:
            item.skipped = "in use by a task that is not final"
            return
        try:
            if entry.area == "docker":
                docker.client(entry.base_url).images.remove(entry.what)  # refused while a container uses it
            rmtree(entry.path)
        except Exception as exc:
            item.skipped = f"cannot remove it: {exc}"
            return
    item.done = True
    log.info("retention: evicted %s %s (%s, %s)", entry.area, entry.what, human_bytes(entry.bytes), item.reason)
