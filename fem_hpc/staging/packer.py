"""Which files of a work dir go back, and the tar.gz that carries them with the logs: ONE
implementation for both sides. Stage-out on this host uses it as a module (staging/outputs.py);
for a cluster without a shared file system this very file is sent as `python3 -c <source> ...`
and writes the archive to stdout, so the rules (globs by path segment, symlinks out of the work
dir refused and never followed, the size cap) are enforced there exactly as here.

Hence its constraints: the standard library only, no fem_hpc import, and Python 3.6 syntax (the
python3 of an older cluster login node): no `from __future__`, typing.List, no walrus.
"""

import gzip
import os
import sys
import tarfile
import zlib
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import BinaryIO, List, Optional, Sequence, Tuple

FEM_DIR = ".fem"  # layout.FEM_DIR (a test keeps them equal)
EXIT_OVER_LIMIT = 3  # the outputs are over the size cap (the message is on stderr)
EXIT_NO_WORKDIR = 4
SKIPPED_PREFIX = "fem-skipped: "  # one stderr line per refused match


class OverLimit(Exception):
    pass


def _inside(path: Path, root: Path) -> bool:
    try:
        path.relative_to(root)
        return True
    except ValueError:
        return False


def _matches(parts: Tuple[str, ...], pattern: Tuple[str, ...]) -> bool:
    """Glob matching by path segment: `**` is any number of segments, other segments are fnmatch."""
    if not pattern:
        return not parts
    if pattern[0] == "**":
        return any(_matches(parts[i:], pattern[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatchcase(parts[0], pattern[0]) and _matches(parts[1:], pattern[1:])


def _glob(workdir: Path, pattern: str) -> List[Path]:
    """The entries of the work dir matching `pattern`, found by a walk that never descends through
    a symlinked directory (Path.glob does, and would list the names behind a link to /etc)."""
    wanted = PurePosixPath(pattern).parts
    out = []
    for dirpath, dirnames, filenames in os.walk(str(workdir), followlinks=False):
        base = Path(dirpath).relative_to(workdir).parts
        for name in dirnames + filenames:
            if _matches(tuple(base) + (name,), wanted):
                out.append(Path(dirpath) / name)
    return sorted(out)


def collect(workdir: Path, patterns: Sequence[str]) -> Tuple[List[Path], List[str]]:
    """Regular files matched by the patterns (a matched directory brings its files), relative to
    the work dir, plus notes on what was refused."""
    workdir = Path(workdir)
    root = workdir.resolve()
    found = {}
    skipped = []  # type: List[str]

    def consider(p: Path) -> None:
        rel = p.relative_to(workdir)
        if rel.parts and rel.parts[0] == FEM_DIR:
            return
        # Check every component: a symlinked parent directory could lead outside too.
        real = p.resolve()
        if not _inside(real, root):
            skipped.append(f"{rel}: symlink pointing outside the work dir, not followed")
            return
        if p.is_symlink() and p.is_dir():
            skipped.append(f"{rel}: symlinked directory, not followed")
            return
        if p.is_file():
            found.setdefault(str(rel), p)
        elif p.is_dir():
            for dirpath, dirnames, filenames in os.walk(str(p), followlinks=False):
                links = [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
                for name in sorted(filenames) + links:
                    consider(Path(dirpath) / name)

    for pattern in patterns:
        for match in _glob(workdir, pattern):
            consider(match)
    # A refused entry reached by two patterns (`out/**` matches `out` and what is under it) is one note.
    return [found[k] for k in sorted(found)], list(dict.fromkeys(skipped))


def looks_compressible(files: Sequence[Path], sample: int = 64 * 1024, max_files: int = 64) -> bool:
    """Whether deflate would gain anything on these files, judged on a sample of each of the
    largest ones (model weights and other binaries barely compress; logs and CSVs do)."""
    largest = sorted(files, key=lambda f: f.stat().st_size, reverse=True)[:max_files]
    raw = packed = 0
    for f in largest:
        with open(str(f), "rb") as fh:
            head = fh.read(sample)
        if head:
            weight = max(1, f.stat().st_size // max(1, len(head)))
            raw += len(head) * weight
            packed += len(zlib.compress(head, 1)) * weight
    return raw == 0 or packed < 0.9 * raw


def check_size(files: Sequence[Path], max_bytes: int) -> int:
    total = sum(f.stat().st_size for f in files)
    if total > max_bytes:
        raise OverLimit(f"outputs are {total} bytes, over this site's limit of {max_bytes} bytes per task "
                        "(stage_out.max_bytes)")
    return total


def write_archive(out: BinaryIO, workdir: Path, files: Sequence[Path], compress_level: Optional[int]) -> None:
    """`outputs/<path>` for every file, then `logs/stdout` and `logs/stderr`, as one tar.gz
    written to `out` as a stream (no seek): memory stays flat whatever the size. Level None picks
    1 for compressible outputs and 0 (stored, still gzip) for those that would not shrink."""
    workdir = Path(workdir)
    if compress_level is None:
        compress_level = 1 if looks_compressible(files) else 0
    fem = workdir / FEM_DIR
    # Never above the configured level: gzip -6/-9 would cap stage-out far below what the broker
    # moves on a LAN. mtime 0: the same files give the same bytes.
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=compress_level, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for f in files:
                # The resolved path: a symlink to a file inside the work dir goes in as its content.
                tar.add(str(f.resolve()), arcname=f"outputs/{f.relative_to(workdir)}", recursive=False)
            for stream in ("stdout", "stderr"):
                log_file = fem / stream
                info = tarfile.TarInfo(f"logs/{stream}")
                if log_file.is_file():
                    info.size = log_file.stat().st_size
                    with open(str(log_file), "rb") as lf:
                        tar.addfile(info, lf)
                else:
                    tar.addfile(info, None)


def main(argv: List[str]) -> int:
    """`packer.py WORKDIR MAX_BYTES LEVEL|auto [PATTERN...]`: the archive on stdout; refused
    matches as `fem-skipped: ...` lines on stderr; exit 3 (message on stderr) over the cap."""
    workdir, max_bytes, level = Path(argv[0]), int(argv[1]), argv[2]
    if not workdir.is_dir():
        sys.stderr.write(f"the work dir {workdir} does not exist on the cluster\n")
        return EXIT_NO_WORKDIR
    files, skipped = collect(workdir, argv[3:])
    try:
        check_size(files, max_bytes)
    except OverLimit as exc:
        sys.stderr.write(f"{exc}\n")
        return EXIT_OVER_LIMIT
    for note in skipped:
        sys.stderr.write(SKIPPED_PREFIX + note.replace("\n", " ") + "\n")
    write_archive(sys.stdout.buffer, workdir, files, None if level == "auto" else int(level))
    sys.stdout.buffer.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
