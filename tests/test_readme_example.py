"""The README's first command, as a user on a fresh machine would run it (paths moved to tmp)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_example_runs(cli, tmp_path):
    site = (ROOT / "examples/site.yaml").read_text().replace("/tmp/fem-hpc-example", str(tmp_path / "ex"))
    config = tmp_path / "site.yaml"
    config.write_text(site)
    out = cli("run", "--config", config, ROOT / "examples/hello.json", "--outputs", tmp_path / "out")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "out/outputs/out/answer.txt").read_text() == "42\n"
    assert (tmp_path / "out/logs/stdout").read_text() == "hello from fem-hpc\n"
    states = [line.split("] ", 1)[1].split()[1] for line in out.stderr.splitlines() if line.startswith("[")]
    assert states[:1] == ["RECEIVED"] and states[-1] == "COMPLETED"
    # The same id again is refused, and says why.
    again = cli("run", "--config", config, ROOT / "examples/hello.json")
    assert again.returncode == 65 and "already exists on this node" in again.stderr


def test_help_and_plugins(cli):
    assert cli("--help").returncode == 0
    plugins = cli("plugins")
    assert plugins.returncode == 0
    for name in ("local", "docker", "apptainer", "slurm", "pbs"):
        assert name in plugins.stdout
