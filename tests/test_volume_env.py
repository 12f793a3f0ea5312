"""FEM_VOLUME_<NAME>: a task finds each of its volumes under one variable whatever the executor:
the mount target in a container, the host path for a plain process (local, Slurm without image).
Checked by running the rendered local script for real, and on the rendered scripts of the others."""

from __future__ import annotations

import os
from pathlib import Path


def _site(tmp_path: Path, data: Path) -> dict:
    return {"node": "vn", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
            "default_executor": "local",
            "executors": {"local": {}, "slurm": {"partition": "debug"}, "docker": {}},
            "volumes": {"fl-data": {"path": str(data), "mode": "ro"}, "other": {"path": str(data)}},
            "policy": {"images": ["127.0.0.1:5000/*"]}}


def test_local_task_reads_its_volume_through_the_variable(tmp_path, cli, write_config, write_task):
    data = tmp_path / "data"
    data.mkdir()
    (data / "partition.csv").write_text("a,b\n1,2\n")
    task = {"id": "v1", "command": ["sh", "-c", "mkdir -p out; cat \"$FEM_VOLUME_FL_DATA/partition.csv\" > out/copy;"
                                    " echo \"$FEM_VOLUME_OTHER\" > out/other; echo \"$KEEP\" > out/keep"],
            "env": {"KEEP": "kept"}, "outputs": ["out/*"],
            "volumes": [{"name": "fl-data", "target": "/data"}, {"name": "other", "target": "/other"}]}
    out = cli("run", "--config", write_config(_site(tmp_path, data)), write_task(task), "--outputs", tmp_path / "o")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "o/outputs/out/copy").read_text() == "a,b\n1,2\n"
    assert (tmp_path / "o/outputs/out/other").read_text() == f"{data.resolve()}\n"
    assert (tmp_path / "o/outputs/out/keep").read_text() == "kept\n"  # the task's own env is still there


def test_slurm_gets_the_host_path_and_docker_the_target(tmp_path, cli, write_config, write_task):
    data = tmp_path / "data"
    data.mkdir()
    cfg = write_config(_site(tmp_path, data))
    task = {"id": "v2", "command": ["true"], "volumes": [{"name": "fl-data", "target": "/data"}]}
    slurm = cli("render", "--config", cfg, write_task(task), "--executor", "slurm")
    assert slurm.returncode == 0, slurm.stderr
    assert f"export FEM_VOLUME_FL_DATA={data.resolve()}" in slurm.stdout
    docker = cli("render", "--config", cfg, write_task({**task, "image": "127.0.0.1:5000/fem/busybox:1"}),
                 "--executor", "docker")
    assert docker.returncode == 0, docker.stderr
    assert "export FEM_VOLUME_FL_DATA=/data" in docker.stdout
    none = cli("render", "--config", cfg, write_task({"id": "v3", "command": ["true"]}))
    assert "FEM_VOLUME" not in none.stdout  # no volume, no variable


def test_a_volume_gone_at_submit_fails_the_local_task_with_its_name(tmp_path, cli, write_config, write_task):
    data = tmp_path / "data"
    data.mkdir()
    cfg = write_config(_site(tmp_path, data))
    os.rmdir(data)
    out = cli("run", "--config", cfg, write_task({"id": "v4", "command": ["true"],
                                                   "volumes": [{"name": "fl-data", "target": "/data"}]}))
    assert out.returncode != 0
    assert "fl-data" in out.stderr and "does not exist" in out.stderr, out.stderr
