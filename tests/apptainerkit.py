"""The FAKE apptainer/singularity binary (tests/fakes/apptainer, not the real runtime: it records
its argv and writes a file shaped like a SIF on `pull`), shared by the apptainer and image tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

FAKE = Path(__file__).parent / "fakes" / "apptainer"
IMAGE = "127.0.0.1:5000/fem/busybox:1"


def install_fake(bindir: Path, name: str = "apptainer") -> Path:
    """A copy of the FAKE binary under `name`; it logs its calls to bindir/argv.jsonl."""
    bindir.mkdir(parents=True, exist_ok=True)
    target = bindir / name
    shutil.copy(FAKE, target)
    target.chmod(0o755)
    return target


def calls(bindir: Path, command: str | None = None) -> list[dict[str, Any]]:
    """The FAKE binary's logged calls, all or those of one subcommand (pull, exec, ...)."""
    log = bindir / "argv.jsonl"
    if not log.exists():
        return []
    out = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [c for c in out if command is None or (c["argv"] and c["argv"][0] == command)]
