"""safe_extract() with tarfile's "data" filter (Python >= 3.11.4) and with fem-hpc's own rules
where the filter is missing (Debian 12's 3.11.2): both paths, forced in turn, refuse the same
hostile members and leave the same files. scripts/test also runs this under /usr/bin/python3."""

from __future__ import annotations

import io
import os
import stat
import sys
import tarfile
from pathlib import Path

import pytest

from fem_hpc.staging import outputs
from fem_hpc.staging.outputs import StageOutError, build_archive, safe_extract


@pytest.fixture(params=["data_filter", "fallback"])
def path(request, monkeypatch) -> str:
    if request.param == "data_filter":
        if not hasattr(tarfile, "data_filter"):
            pytest.skip(f"this Python ({sys.version.split()[0]}) has no tarfile.data_filter")
        monkeypatch.setattr(outputs, "HAS_DATA_FILTER", True)
    else:
        monkeypatch.setattr(outputs, "HAS_DATA_FILTER", False)
    return request.param


def archive(tmp_path: Path, *members: tuple[tarfile.TarInfo, bytes | None]) -> Path:
    dest = tmp_path / "hostile.tar.gz"
    with tarfile.open(dest, "w:gz") as tar:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return dest


def member(name: str, kind: bytes = tarfile.REGTYPE, *, mode: int = 0o644, link: str = "",
           uid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid = kind, mode, link, uid, uid
    info.uname = info.gname = "nobody-in-particular"
    return info


def test_an_outputs_archive_round_trips(tmp_path: Path, path: str) -> None:
    work = tmp_path / "work"
    (work / "out" / "deep").mkdir(parents=True)
    (work / "out" / "a.txt").write_text("a\n")
    (work / "out" / "deep" / "b.bin").write_bytes(os.urandom(3000))
    (work / "run.sh").write_text("#!/bin/sh\n")
    (work / "run.sh").chmod(0o755)
    (work / ".fem").mkdir()
    (work / ".fem" / "stdout").write_text("hello\n")
    built = build_archive(work, ["out", "run.sh"], max_bytes=10**6)
    names = safe_extract(built.path, tmp_path / "unpacked")
    with tarfile.open(built.path) as archive:
        assert names == archive.getnames()  # every member, in the archive's order
    got = tmp_path / "unpacked"
    assert (got / "outputs/out/a.txt").read_text() == "a\n"
    assert (got / "outputs/out/deep/b.bin").read_bytes() == (work / "out/deep/b.bin").read_bytes()
    assert (got / "logs/stdout").read_text() == "hello\n"
    assert os.access(got / "outputs/run.sh", os.X_OK)


@pytest.mark.parametrize(("members", "words"), [
    ([(member("/etc/fem-hpc-owned"), b"x")], "absolute path"),
    ([(member("../escaped"), b"x")], "'..' component"),
    ([(member("outputs/../../escaped"), b"x")], "'..' component"),
    ([(member("ok/inner/../fine"), b"x")], "'..' component"),
    ([(member("link", tarfile.SYMTYPE, link="/etc/passwd"), None)], "absolute path"),
    ([(member("link", tarfile.SYMTYPE, link="../../etc/passwd"), None)], "'..' component"),
    ([(member("hard", tarfile.LNKTYPE, link="../outside"), None)], "'..' component"),
    ([(member("hard", tarfile.LNKTYPE, link="/etc/shadow"), None)], "absolute path"),
    ([(member("null", tarfile.CHRTYPE), None)], "is a device"),
    ([(member("disk", tarfile.BLKTYPE), None)], "is a device"),
    ([(member("pipe", tarfile.FIFOTYPE), None)], "is a FIFO"),
    # each link alone points down; together they would climb out if `..` were allowed in targets
    ([(member("b", tarfile.SYMTYPE, link="."), None), (member("a", tarfile.SYMTYPE, link="b/b/b/.."), None)],
     "'..' component"),
])
def test_hostile_members_are_refused(tmp_path: Path, path: str, members, words: str) -> None:
    dest = tmp_path / "dest"
    with pytest.raises(StageOutError, match=words):
        safe_extract(archive(tmp_path, *members), dest)
    assert not (tmp_path / "escaped").exists()
    assert not list(tmp_path.glob("outside*"))


def test_an_existing_symlink_in_dest_is_not_followed_out(tmp_path: Path, path: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "out").symlink_to(elsewhere)
    with pytest.raises(StageOutError, match="would land outside"):
        safe_extract(archive(tmp_path, (member("out/planted"), b"x")), dest)
    assert not (elsewhere / "planted").exists()


def test_links_inside_are_kept(tmp_path: Path, path: str) -> None:
    dest = tmp_path / "dest"
    names = safe_extract(archive(tmp_path, (member("d/f.txt"), b"data\n"),
                                 (member("d/sym", tarfile.SYMTYPE, link="f.txt"), None),
                                 (member("hard", tarfile.LNKTYPE, link="d/f.txt"), None)), dest)
    assert names == ["d/f.txt", "d/sym", "hard"]
    assert os.readlink(dest / "d/sym") == "f.txt" and (dest / "d/sym").read_text() == "data\n"
    assert (dest / "hard").read_text() == "data\n"


def test_modes_and_owners_are_tamed(tmp_path: Path, path: str) -> None:
    """As the data filter: no setuid/setgid/sticky, no group/other write, owner rw, our own uid."""
    dest = tmp_path / "dest"
    safe_extract(archive(tmp_path, (member("suid", mode=0o4777, uid=4242), b"#!/bin/sh\n"),
                         (member("ro", mode=0o444, uid=4242), b"r\n"),
                         (member("shared", tarfile.DIRTYPE, mode=0o1777, uid=4242), None)), dest)
    assert stat.S_IMODE((dest / "suid").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "ro").stat().st_mode) == 0o644
    assert not stat.S_IMODE((dest / "shared").stat().st_mode) & (stat.S_ISVTX | stat.S_IWOTH)
    for name in ("suid", "ro", "shared"):
        assert (dest / name).stat().st_uid == os.geteuid()


def test_the_flag_matches_this_python() -> None:
    assert outputs.HAS_DATA_FILTER == hasattr(tarfile, "data_filter")
