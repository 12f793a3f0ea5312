"""The inotify wake-up for exit-code markers, on this machine's real kernel."""

from __future__ import annotations

import os
import threading
from pathlib import Path

from fem_hpc.lifecycle.markers import MarkerWatcher


def test_rename_into_a_watched_dir_wakes_at_once(tmp_path: Path):
    woke = threading.Event()
    watcher = MarkerWatcher(woke.set)
    try:
        assert watcher.active  # Linux with inotify: the case on every supported login node
        fem = tmp_path / ".fem"
        fem.mkdir()
        watcher.add(fem)
        (fem / "stdout").write_text("output is not a marker\n")
        assert not woke.wait(0.3)
        (fem / "exit_code.tmp.1").write_text('{"exit_code": 0}')
        os.replace(fem / "exit_code.tmp.1", fem / "exit_code")
        assert woke.wait(2)
        woke.clear()
        watcher.remove(fem)
        (fem / "other.tmp").write_text("x")
        os.replace(fem / "other.tmp", fem / "other")
        assert not woke.wait(0.3)
    finally:
        watcher.close()


def test_a_directory_that_cannot_be_watched_is_left_to_the_stat_loop(tmp_path: Path):
    woke = threading.Event()
    watcher = MarkerWatcher(woke.set)
    try:
        assert watcher.active  # inotify works here (the first test says so): the wake-up must come
        watcher.add(tmp_path / "missing")  # no error: the tracker's stat loop still finds markers
        assert str(tmp_path / "missing") not in watcher._watches  # nothing half-registered
        watcher.remove(tmp_path / "missing")  # removing what was never watched is harmless too
        watched = tmp_path / "fem"
        watched.mkdir()
        watcher.add(watched)  # and the watcher still works for the next directory
        (watched / "exit_code.tmp").write_text("{}")
        os.replace(watched / "exit_code.tmp", watched / "exit_code")
        assert woke.wait(5)
    finally:
        watcher.close()
