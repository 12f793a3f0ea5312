"""The docker image cache against the real Docker engine: only images fem-hpc pulled are noted
and evicted (least recently used, by age), never an image the site pulled itself, never one a
task that is not final needs. The images are local tags of the test bed's busybox, unique per
test, so removing them never touches what other tests use."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import services
from retentionkit import FakeClock, add_task, make_site

from fem_hpc.journal import Journal
from fem_hpc.model import State
from fem_hpc.ops.gc import run_pass
from fem_hpc.ops.gc_model import DAY
from fem_hpc.staging.images import docker_notes_dir, note_docker_use, parse_image_ref, stage_image

pytestmark = pytest.mark.docker


@pytest.fixture
def client():
    services.require("docker")
    services.require("registry")
    import docker

    c = docker.from_env()
    try:
        c.images.get(services.TEST_IMAGE)
    except docker.errors.ImageNotFound:
        c.images.pull(services.TEST_IMAGE)
    yield c
    c.close()


def test_a_pull_is_noted_and_a_present_image_is_not(tmp_path: Path, client):
    site = make_site(tmp_path / "a")
    stage_image("docker", site, services.TEST_IMAGE)  # present already: not ours
    assert not list(docker_notes_dir(site.state_dir).glob("*.json"))
    stage_image("docker", site, services.TEST_IMAGE, "always")
    [note] = docker_notes_dir(site.state_dir).glob("*.json")
    assert parse_image_ref(services.TEST_IMAGE).pull_ref in note.read_text()
    old = note.stat().st_mtime - 5 * DAY
    os.utime(note, (old, old))
    stage_image("docker", site, services.TEST_IMAGE)  # a later use refreshes it
    assert note.stat().st_mtime > old + 4 * DAY


def test_docker_images_fem_hpc_pulled_are_evicted_and_no_others(tmp_path: Path, client):
    import docker

    tag = uuid.uuid4().hex[:10]
    refs = {name: f"127.0.0.1:5000/fem/gc-{name}-{tag}:1" for name in ("ours", "theirs", "busy")}
    base = client.images.get(services.TEST_IMAGE)
    for ref in refs.values():
        repo, version = ref.rsplit(":", 1)
        base.tag(repo, version)
    site = make_site(tmp_path, caches={"docker": {"max_age_days": 30, "max_bytes": None}})
    journal = Journal(site.journal_path)
    clock = FakeClock()
    try:
        for name in ("ours", "busy"):  # what stage-in notes after it pulled
            note_docker_use(site.state_dir, parse_image_ref(refs[name]), pulled=True)
        for note in docker_notes_dir(site.state_dir).glob("*.json"):
            old = clock.t - 40 * DAY
            os.utime(note, (old, old))
        add_task(journal, site, "dock1", State.RUNNING, image=refs["busy"])
        report = run_pass(site, journal, now=clock)
        [item] = [i for i in report.items if i.area == "docker"]
        assert item.what == refs["ours"] and item.done and item.bytes == base.attrs["Size"]
        assert "max_age_days 30" in item.reason
        with pytest.raises(docker.errors.ImageNotFound):
            client.images.get(refs["ours"])
        client.images.get(refs["theirs"])  # never noted: the site's own
        client.images.get(refs["busy"])  # a running task needs it
        assert len(list(docker_notes_dir(site.state_dir).glob("*.json"))) == 1
        client.images.get(services.TEST_IMAGE)  # untagging never removes the shared image
    finally:
        journal.close()
        for ref in refs.values():
            try:
                client.images.remove(ref)
            except docker.errors.ImageNotFound:
                pass
