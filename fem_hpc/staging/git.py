"""Git stage-in: one bare mirror per URL under state_dir, the pinned commit checked out per task.

The mirror is updated under a per-URL file lock (threads and processes alike), so concurrent
tasks of one repository fetch it once at a time. Credentials travel in the environment of the
git process (GIT_CONFIG_* / GIT_SSH_COMMAND): never in argv, the logs, the mirror's config or
the task's work dir.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import git

from ..layout import source_dir
from ..logs import redact, register_secret
from .errors import GitStageError
from .locks import exclusive

if TYPE_CHECKING:
    from ..config import SiteConfig
    from ..model import Task

log = logging.getLogger("fem_hpc.staging.git")


def _host(url: str) -> str:
    if "://" in url:
        return urlsplit(url).hostname or ""
    if "@" in url and ":" in url:  # scp-like user@host:path
        return url.split("@", 1)[1].split(":", 1)[0]
    return ""


def git_env(site: SiteConfig, url: str) -> dict[str, str]:
    """Environment for git commands on this URL: no prompts, and the host's credentials if any."""
    # BatchMode: ssh must never stop to ask (a password, an unknown host key) in a service.
    env = {"GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "/bin/false", "SSH_ASKPASS": "/bin/false",
           "GIT_SSH_COMMAND": "ssh -o BatchMode=yes"}
    cred = site.git.credentials.get(_host(url))
    if cred is None:
        return env
    if cred.token:
        token = cred.token.get_secret_value()
        register_secret(token)
        basic = base64.b64encode(f"{cred.username or 'git'}:{token}".encode()).decode()
        register_secret(basic)
        env.update({"GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "http.extraHeader",
                    "GIT_CONFIG_VALUE_0": f"Authorization: Basic {basic}"})
    if cred.ssh_key:
        known = f"-o UserKnownHostsFile={cred.known_hosts}" if cred.known_hosts else ""
        env["GIT_SSH_COMMAND"] = f"ssh -i {cred.ssh_key} -o IdentitiesOnly=yes -o BatchMode=yes {known}".strip()
    return env


def _explain(exc: git.GitCommandError, url: str) -> str:
    stderr = (exc.stderr or "").strip().replace("stderr: ", "").strip("' \n")
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    detail = lines[-1] if lines else str(exc)
    low = stderr.lower()
    if "authentication failed" in low or "could not read username" in low or "permission denied" in low:
        kind = "authentication failed"
    elif "could not resolve host" in low or "connection refused" in low or "unable to connect" in low \
            or "does not appear to be a git repository" in low or "not found" in low:
        kind = "repository unreachable"
    else:
        kind = "git failed"
    return redact(f"{kind} for {url}: {detail}")


def mirror_path(site: SiteConfig, url: str) -> Path:
    return site.state_dir / "git" / (hashlib.sha256(url.encode()).hexdigest()[:32] + ".git")


def update_mirror(site: SiteConfig, url: str) -> Path:
    """Create or fetch the bare mirror of `url`; returns its path."""
    mirror = mirror_path(site, url)
    env = git_env(site, url)
    timeout = site.git.timeout_seconds
    with exclusive(mirror.with_suffix(".lock")):
        try:
            if (mirror / "HEAD").exists():
                git.Repo(mirror).git.fetch("--prune", "--tags", "origin", "+refs/*:refs/*", env=env,
                                           kill_after_timeout=timeout)
            else:
                tmp = mirror.with_name(mirror.name + f".tmp{os.getpid()}")
                shutil.rmtree(tmp, ignore_errors=True)
                git.Git().clone("--mirror", "--", url, str(tmp), env=env, kill_after_timeout=timeout)
                os.replace(tmp, mirror)
        except git.GitCommandError as exc:
            raise GitStageError(_explain(exc, url)) from None
        os.utime(mirror)  # the mirror's mtime is its last use: the GC evicts least-recently-used first
    return mirror


def resolve(mirror: Path, ref: str | None, commit: str | None) -> str:
    repo = git.Repo(mirror)
    try:
        if commit:
            return repo.git.rev_parse("--verify", "--end-of-options", f"{commit}^{{commit}}")
        if ref:
            for candidate in (f"refs/heads/{ref}", f"refs/tags/{ref}", ref):
                try:
                    return repo.git.rev_parse("--verify", "--end-of-options", f"{candidate}^{{commit}}")
                except git.GitCommandError:
                    continue
            raise GitStageError(f"ref {ref!r} not found in the repository")
        return repo.git.rev_parse("--verify", "HEAD^{commit}")
    except git.GitCommandError:
        what = f"commit {commit!r}" if commit else "HEAD"
        raise GitStageError(f"{what} not found in the repository") from None


def checkout(site: SiteConfig, url: str, ref: str | None, commit: str | None, dest: Path) -> str:
    """Check the wanted commit out into `dest` (an empty or missing dir); returns the sha."""
    mirror = update_mirror(site, url)
    sha = resolve(mirror, ref, commit)
    if dest.exists() and any(dest.iterdir()):
        raise GitStageError(f"work dir {dest} is not empty; cannot check the source out into it")
    try:
        # A local clone from the mirror: hard-linked objects, the origin is the mirror path.
        git.Git().clone("--no-checkout", "--quiet", "--", str(mirror), str(dest))
        repo = git.Repo(dest)
        repo.git.checkout("--quiet", "--detach", sha)
        if site.git.submodules and (dest / ".gitmodules").exists():
            repo.git.submodule("update", "--init", "--recursive", env=git_env(site, url),
                               kill_after_timeout=site.git.timeout_seconds)
    except git.GitCommandError as exc:
        raise GitStageError(_explain(exc, url)) from None
    return sha


def stage_source(task: Task, workdir: Path, site: SiteConfig, progress: Callable[[str], None] | None = None) -> None:
    """Check the task's source (if any) out into its work dir, or into `.fem/source` beside the
    task's files when the task mounts its source (layout.source_dir). Raises GitStageError (a
    StageError) with a message for the user."""
    src = task.source
    if src is None:
        return
    url = site.git.fetch_url(src.git)  # the site's mirror of the repository, when it has one
    if progress is not None:
        action = "fetching" if (mirror_path(site, url) / "HEAD").exists() else "cloning"
        progress(f"{action} {redact(url)}" + (f" (mirror of {redact(src.git)})" if url != src.git else ""))
    dest = source_dir(task, workdir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    sha = checkout(site, url, src.ref, src.commit, dest)
    if src.path and not (dest / src.path).is_dir():
        raise GitStageError(f"source path {src.path!r} is not a directory at commit {sha[:12]}")
    log.info("%s: %s checked out at %s", task.id, redact(url), sha[:12], extra={"task_id": task.id})
    if progress is not None:
        progress(f"checked out {sha[:12]}")
