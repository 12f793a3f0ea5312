"""Stage-out: the task's output matches and its logs as one tar.gz, written in a streaming way.

Globs resolve inside the work dir only: a match that is (or lies under) a symlink pointing
outside the work dir is skipped and reported, never followed. Memory stays flat whatever the
output size: files are streamed into the archive and the archive is hashed as it is written.
The selection and the archive format are packer.py's, shared with stage-out on a cluster
without a shared file system.
"""

from __future__ import annotations

import copy
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


# tarfile's extraction filters (PEP 706) exist from Python 3.11.4 on; Debian 12 ships 3.11.2, where
# `filter=` is a TypeError. Without them the same rules as the "data" filter are applied here.
HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


def _relative_parts(what: str, name: str) -> list[str]:
    if name.startswith(("/", os.sep)) or os.path.isabs(name):
        raise StageOutError(f"{what} is an absolute path")
    parts = [p for p in name.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise StageOutError(f"{what} has a '..' component")
    return parts


def check_member(member: tarfile.TarInfo, dest: Path) -> None:
    """Refuse a member that could write outside dest: an absolute name, a `..` component, a link
    whose target is absolute, has `..` or leads outside, a device, FIFO or other special file, or
    a path through an existing symlink that leads outside. With no `..` and no absolute targets a
    link can only point down into dest, so links made earlier in the archive cannot lead out either."""
    what = f"archive member {member.name!r}"
    _relative_parts(what, member.name)
    root = os.path.realpath(dest)
    target = os.path.realpath(os.path.join(root, member.name))
    if os.path.commonpath([root, target]) != root:
        raise StageOutError(f"{what} would land outside {dest} (through {target})")
    if member.issym() or member.islnk():
        _relative_parts(f"the link target {member.linkname!r} of {what}", member.linkname)
        base = os.path.dirname(os.path.join(root, member.name)) if member.issym() else root
        link_target = os.path.realpath(os.path.join(base, member.linkname))
        if os.path.commonpath([root, link_target]) != root:
            raise StageOutError(f"{what} links outside {dest} (to {link_target})")
    elif not (member.isreg() or member.isdir()):
        kind = "a device" if member.ischr() or member.isblk() else "a FIFO" if member.isfifo() else "special"
        raise StageOutError(f"{what} is {kind}, not a file, directory or link")


def _as_data(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """What tarfile's "data" filter does to the attributes: no setuid/setgid/sticky bits, no group or
    other write, owner read/write on files, and the extracting user as owner (never a chown to the
    archive's uid/gid, which extract() does when run as root)."""
    clean = copy.copy(member)
    mode = member.mode & 0o755
    if member.isreg() or member.islnk():
        if not mode & 0o100:
            mode &= ~0o111
        mode |= 0o600
    elif member.isdir():
        mode |= 0o700
    clean.mode = mode
    clean.uid, clean.gid = os.geteuid(), os.getegid()
    clean.uname = clean.gname = ""
    return clean


def safe_extract(archive: Path | io.IOBase, dest: Path) -> list[str]:
    """Unpack an outputs archive into dest, refusing (StageOutError) members that could land or
    point outside it, and special files."""
    dest.mkdir(parents=True, exist_ok=True)
    names = []
    kwargs = {"fileobj": archive} if isinstance(archive, io.IOBase) else {"name": str(archive)}
    with tarfile.open(mode="r:gz", **kwargs) as tar:  # type: ignore[call-overload]
        for member in tar:
            check_member(member, dest)  # checked as it comes: earlier members may have made links
            if HAS_DATA_FILTER:
                tar.extract(member, str(dest), filter="data")
            else:
                tar.extract(_as_data(member), str(dest))
            names.append(member.name)
    return names
