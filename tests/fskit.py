"""A real small file system for the disk tests: a tmpfs of a few MB mounted on a test's own dir.

Mounting needs root (the test machine runs the suite as root). Where it cannot mount, a test is
skipped with the reason, and fails under CI=true, like a missing service (tests/services.py).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from services import in_ci


def _unavailable(reason: str) -> None:
    message = f"cannot mount a tmpfs: {reason} (the disk tests need root)"
    if in_ci():
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@contextmanager
def tmpfs(path: Path, size: str = "4m") -> Iterator[Path]:
    """`mount -t tmpfs -o size=SIZE tmpfs PATH` for the block; unmounted (lazily if busy) after."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        _unavailable(f"running as uid {os.geteuid()}")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        _unavailable(proc.stderr.strip() or f"mount exited {proc.returncode}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int, name: str = "filler") -> Path:
    """Write a file under `path` until about `leave` bytes stay free on its file system."""
    target = path / name
    with open(target, "ab") as f:
        while (room := free_bytes(path) - leave) > 0:
            try:
                f.write(b"\0" * min(room, 1 << 20))
                f.flush()
            except OSError:  # full: nothing more fits
                break
    return target
