"""Stage-out: the task's output matches and its logs as one tar.gz, written in a streaming way.

Globs resolve inside the work dir only: a match that is (or lies under) a symlink pointing
outside the work dir is skipped and reported, never followed. Memory stays flat whatever the
output size: files are streamed into the archive and the archive is hashed as it is written.
The selection and the archive format are packer.py's, shared with stage-out on a cluster
without a shared file system.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from ..layout import ARCHIVE_NAME, FEM_DIR
from .packer import OverLimit, check_size, collect, looks_compressible, write_archive

__all__ = ["Archive", "StageOutError", "build_archive", "collect", "looks_compressible", "safe_extract", "tail"]


class StageOutError(Exception):
    pass


@dataclass
class Archive:
    path: Path
    size: int
    sha256: str
    skipped: list[str] = field(default_factory=list)  # human notes on matches that were refused

    def chunks(self, chunk_bytes: int) -> int:
        return max(1, -(-self.size // chunk_bytes))


class _HashingWriter(io.RawIOBase):
    """A file wrapper that hashes and counts what passes through it."""

    def __init__(self, f: io.BufferedWriter):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.size += len(b)
        return self._f.write(b)


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def build_archive(workdir: Path, patterns: list[str], *, max_bytes: int, dest: Path | None = None,
                  compress_level: int | None = None) -> Archive:
    """`compress_level` None picks 1 for compressible outputs and 0 (stored, still gzip) for
    outputs that would not shrink, where deflate would only cost time."""
    files, skipped = collect(workdir, patterns)
    try:
        check_size(files, max_bytes)
    except OverLimit as exc:
        raise StageOutError(str(exc)) from None
    dest = dest or workdir / FEM_DIR / ARCHIVE_NAME
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "wb") as raw:
        writer = _HashingWriter(raw)
        write_archive(writer, workdir, files, compress_level)  # type: ignore[arg-type]
    os.replace(tmp, dest)
    return Archive(path=dest, size=writer.size, sha256=writer.sha.hexdigest(), skipped=skipped)


def tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def safe_extract(archive: Path | io.IOBase, dest: Path) -> list[str]:
    """Unpack an outputs archive into dest, refusing members that would land outside it."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    kwargs = {"fileobj": archive} if isinstance(archive, io.IOBase) else {"name": str(archive)}
    with tarfile.open(mode="r:gz", **kwargs) as tar:  # type: ignore[call-overload]
        for member in tar:
            if not (member.isfile() or member.isdir()):
                continue
            target = (dest / member.name).resolve()
            if not _inside(target, dest.resolve()):
                raise StageOutError(f"archive member {member.name!r} would land outside {dest}")
            tar.extract(member, str(dest), filter="data")
            names.append(member.name)
    return names
