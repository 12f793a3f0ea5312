"""Job scripts of the batch executors, rendered without a scheduler: directives and the container
launch line for tasks with an image (apptainer by default, docker where the site says so)."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest
import yaml


@pytest.fixture
def cfg(tmp_path: Path):
    data = tmp_path / "data"
    data.mkdir()
    return {
        "node": "rn", "state_dir": str(tmp_path / "state"), "work_root": str(tmp_path / "work"),
        "default_executor": "slurm",
        "executors": {"slurm": {"partition": "debug", "extra_directives": ["--qos=normal"]},
                      "pbs": {"dialect": "pbspro", "container": {"runtime": "docker"}}},
        "volumes": {"ds": {"path": str(data)}},
        "policy": {"images": ["127.0.0.1:5000/*"]},
    }


TASK = {"id": "r1", "image": "127.0.0.1:5000/fem/busybox:1", "command": ["python", "t.py", "$(x)"],
        "env": {"TOKEN_NAME": "v;`y`"}, "volumes": [{"name": "ds", "target": "/data"}],
        "resources": {"cpus": 2, "memory": "1G", "walltime": "1-00:00:00"}}


def render(cli, write_config, write_task, cfg, executor=None):
    args = ["render", "--config", write_config(cfg), write_task(TASK)] + (["--executor", executor] if executor else [])
    out = cli(*args)
    assert out.returncode == 0, out.stderr
    return out.stdout


def exec_words(script: str) -> list[str]:
    line = next(ln for ln in script.splitlines() if ln.strip().startswith("exec "))
    return shlex.split(line)[1:]


def test_slurm_with_image_runs_apptainer_from_the_sif_cache(cli, write_config, write_task, cfg, tmp_path):
    script = render(cli, write_config, write_task, cfg)
    assert "#SBATCH --partition=debug" in script and "#SBATCH --qos=normal" in script
    assert "#SBATCH --time=1-00:00:00" in script and "#SBATCH --mem=1024M" in script
    words = exec_words(script)
    assert words[:4] == ["apptainer", "exec", "--containall", "--cleanenv"]
    assert f"{tmp_path / 'data'}:/data:ro" in words
    assert words[-4].startswith(str(tmp_path / "state" / "sif")) and words[-4].endswith(".sif")
    assert words[-3:] == ["python", "t.py", "$(x)"]
    assert "export APPTAINERENV_TOKEN_NAME='v;`y`'" in script
    path = tmp_path / "s.sh"
    path.write_text(script)
    assert subprocess.run(["sh", "-n", str(path)]).returncode == 0


def test_pbs_with_docker_runtime_passes_env_by_name(cli, write_config, write_task, cfg):
    script = render(cli, write_config, write_task, cfg, "pbs")
    assert "#PBS -l select=1:ncpus=2:mem=1024mb" in script and "#PBS -l walltime=24:00:00" in script
    words = exec_words(script)
    assert words[:2] == ["docker", "run"] and "--rm" in words
    assert words[words.index("-e") + 1] == "TOKEN_NAME"  # the value never appears in argv
    assert "v;`y`" not in " ".join(words)
    assert words[-4:] == ["127.0.0.1:5000/fem/busybox:1", "python", "t.py", "$(x)"]


def test_example_config_still_loads(cli):
    out = cli("plugins")
    assert out.returncode == 0 and "slurm" in out.stdout and "pbs" in out.stdout
    yaml.safe_load(Path("etc/fem-hpc.example.yaml").read_text())
