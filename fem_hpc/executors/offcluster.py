"""A batch executor's cluster-side work dirs, for a cluster that shares no file system with this
host (`remote_work_root`): the operations of remote.py run over the executor's one SSH
connection, each a single command (a round trip), transfers streamed in constant memory.

- stage: the work dir staged here (checkout, script, inputs) goes to
  `<remote_work_root>/<user>/<execution>/<task>` as one tar stream;
- markers: one command per tracker cycle reads every tracked job's marker;
- remove: the work dirs whose results the broker confirmed, many in one command, when the
  retention pass (ops/gc.py, which keeps what is removed in the journal) says so;
- fetch: the outputs archive is built on the cluster by packer.py (the same selection rules and
  size cap as here) and streamed back, hashed as it arrives; the logs are unpacked beside it;
- images: `apptainer pull` into the cluster's SIF cache (flock + rename), or `docker pull` there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tarfile
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Protocol, TypeVar

from ..layout import ARCHIVE_NAME, Marker
from ..model import Check
from ..staging import packer
from ..staging.images import apptainer_env_credentials, cache_key, credentials_for, parse_image_ref
from ..staging.outputs import Archive, StageOutError
from . import remote
from .base import ExecutorError, Job
from .commands import Runner

log = logging.getLogger("fem_hpc.executors.offcluster")
_T = TypeVar("_T")


class Link(Protocol):
    """What the remote side needs of its batch executor: the runner, its link state, settings."""

    name: str
    settings: Any
    site: Any
    runner: Runner

    def over_link(self, call: Callable[[], _T]) -> _T: ...


def _tail(text: str, n: int = 5) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-n:]) or "(no output)"


class RemoteSide:
    def __init__(self, executor: Link):
        self.executor = executor
        s = executor.settings
        assert s.remote_work_root is not None
        self.root = remote.check_root(s.remote_work_root)
        self.sif_cache = PurePosixPath(str(s.remote_sif_cache or PurePosixPath(self.root) / ".sif"))

    @property
    def settings(self) -> Any:
        return self.executor.settings

    def where(self, job: Job) -> Job:
        """The job as the cluster sees it: its work dir under the remote root."""
        try:
            directory = remote.remote_dir(self.root, job.task)
        except ValueError as exc:
            raise ExecutorError(str(exc)) from None
        return dataclasses.replace(job, workdir=Path(str(directory)))

    def _stream(self, argv: list[str], idle: float, **kwargs: Any) -> Any:
        return self.executor.over_link(lambda: self.executor.runner.stream(argv, idle_timeout=idle, **kwargs))

    # -- stage-in -----------------------------------------------------------------------------
    def stage(self, job: Job) -> None:
        directory = self.where(job).workdir

        def feed(out: BinaryIO) -> None:
            # Uncompressed: inputs are mostly checkouts and data files; the link is the cluster's.
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                for entry in sorted(job.workdir.iterdir()):
                    tar.add(str(entry), arcname=entry.name)  # symlinks stay symlinks

        res = self._stream(remote.upload_argv(PurePosixPath(str(directory))), self.settings.transfer_idle_seconds,
                           feed=feed)
        if not res.ok:
            raise ExecutorError(f"cannot unpack the work dir in {directory} on the cluster "
                                f"(exit {res.returncode}): {_tail(res.stderr)}")

    # -- tracking -------------------------------------------------------------------------------
    def read_markers(self, jobs: list[Job]) -> dict[str, Marker]:
        rels = {remote.relative_dir(j.task): j.task.id for j in jobs}
        stdout = self._cycle(list(rels), [], "reading the markers on the cluster")
        return {rels[rel]: marker for rel, marker in remote.parse_cycle(stdout).items() if rel in rels}

    # -- retention --------------------------------------------------------------------------------
    def remove(self, rels: list[str]) -> None:
        """Remove these work dirs (`user/execution/task` under the root) in one command; one not
        there is no error. Raises TransportError while the cluster cannot be reached."""
        if rels:
            self._cycle([], rels, f"removing {len(rels)} work dir(s) on the cluster")

    def _cycle(self, markers: list[str], removals: list[str], what: str) -> str:
        """One run of the cluster-side cycle command (read these markers, remove these dirs); its stdout."""
        stdin = remote.cycle_input(markers, removals)  # checks every path: each line is one dir under the root
        res = self._stream(remote.cycle_argv(self.root), self.settings.command_timeout,
                           feed=lambda out: out.write(stdin))
        if not res.ok:
            raise ExecutorError(f"{what} failed (exit {res.returncode}): {_tail(res.stderr)}")
        return res.stdout

    # -- stage-out ------------------------------------------------------------------------------
    def fetch(self, job: Job, patterns: list[str], *, max_bytes: int, compress_level: int | None) -> Archive:
        directory = PurePosixPath(str(self.where(job).workdir))
        job.fem_dir.mkdir(parents=True, exist_ok=True)
        dest = job.fem_dir / ARCHIVE_NAME
        tmp = dest.with_name(dest.name + ".tmp")
        sha = hashlib.sha256()
        size = 0
        with open(tmp, "wb") as f:
            def sink(data: bytes) -> None:
                nonlocal size
                sha.update(data)
                size += len(data)
                f.write(data)

            argv = remote.pack_argv(self.settings.remote_python, directory, patterns, max_bytes, compress_level)
            res = self._stream(argv, self.settings.transfer_idle_seconds, sink=sink)
        skipped, said = remote.parse_pack_stderr(res.stderr)
        if res.returncode == packer.EXIT_OVER_LIMIT:
            tmp.unlink(missing_ok=True)
            raise StageOutError(said)
        if res.returncode == 127:
            tmp.unlink(missing_ok=True)
            raise ExecutorError(f"{self.settings.remote_python} was not found on the cluster; stage-out needs it "
                                "(set remote_python)")
        if not res.ok:
            tmp.unlink(missing_ok=True)
            raise ExecutorError(f"stage-out on the cluster failed (exit {res.returncode}): {_tail(said)}")
        os.replace(tmp, dest)
        self._unpack_logs(dest, job.fem_dir)
        return Archive(path=dest, size=size, sha256=sha.hexdigest(), skipped=skipped)

    @staticmethod
    def _unpack_logs(archive: Path, fem_dir: Path) -> None:
        """logs/stdout and logs/stderr beside the archive, for the result's tails."""
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar:
                if member.isfile() and member.name in ("logs/stdout", "logs/stderr"):
                    src = tar.extractfile(member)
                    if src is not None:
                        with src, open(fem_dir / member.name.split("/", 1)[1], "wb") as out:
                            shutil.copyfileobj(src, out)

    # -- images -----------------------------------------------------------------------------------
    def image_argument(self, image: str) -> str:
        ref = parse_image_ref(image)
        if self.settings.container.runtime == "docker":
            return ref.pull_ref
        return str(self.sif_cache / f"{cache_key(ref)}.sif")

    def ensure_image(self, job: Job, progress: Any = None) -> None:
        """The job's image present on the cluster side, under the executor's pull policy."""
        assert job.task.image
        c = self.settings.container
        ref = parse_image_ref(job.task.image)
        credentials = credentials_for(self.executor.site, ref)
        env: dict[str, str] | None = None
        if c.runtime == "docker":
            if credentials is not None:
                raise ExecutorError(f"registry credentials for {ref.registry} cannot be handed to the cluster's "
                                    "docker daemon; pull the image there beforehand or use apptainer")
            binary = c.binary or "docker"
            argv = remote.docker_pull_argv(binary, ref.pull_ref, c.pull_policy)
        else:
            binary = c.binary or "apptainer"
            argv = remote.sif_pull_argv(binary, self.sif_cache, cache_key(ref), ref.pull_ref, pull_args=[],
                                        force=c.pull_policy == "always", never=c.pull_policy == "never")
            env = apptainer_env_credentials(binary, credentials) or None
        if progress is not None:
            progress(f"making image {ref} present on the cluster")
        res = self.executor.over_link(lambda: self.executor.runner.run(argv, timeout=self.settings.pull_timeout,
                                                                       env=env))
        if not res.ok:
            raise ExecutorError(f"{Path(binary).name} pull of {ref} on the cluster failed (exit {res.returncode}): "
                                f"{_tail(res.stderr or res.stdout)}")

    # -- doctor -------------------------------------------------------------------------------------
    def check(self) -> Check:
        name = "remote work root"
        try:
            res = self.executor.over_link(lambda: self.executor.runner.run(
                remote.check_argv(self.root, self.settings.remote_python), timeout=self.settings.command_timeout))
        except ExecutorError as exc:
            return Check(name=name, status="error", detail=str(exc), fix=f"fix executors.{self.executor.name}.ssh")
        if not res.ok:
            return Check(name=name, status="error", detail=_tail(res.stderr or res.stdout),
                         fix="create remote_work_root on the cluster for the SSH user, and install python3 and tar "
                             "there (or set remote_python)")
        version, flock = remote.parse_check(res.stdout)
        found = f"{self.root} writable on the cluster, {self.settings.remote_python} {version}"
        if not flock and self.settings.container.runtime == "apptainer":
            return Check(name=name, status="warning", detail=f"{found}, but flock not found on the cluster: a task "
                         f"with an image would fail, the SIF cache ({self.sif_cache}) is locked with it",
                         fix="install flock on the cluster (Debian/Ubuntu: util-linux; RHEL: util-linux-core)")
        return Check(name=name, status="ok", detail=found + (", flock" if flock else ""))
