"""Hostile task values reach the program literally: never run by the job script's shell, never
evaluated by Jinja. Checked on `fem-hpc render` output and in a real run through `fem-hpc run`."""

from __future__ import annotations

import shlex
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest

SENTINEL = Path(f"/tmp/fem-hostile-{uuid.uuid4().hex}")
S = str(SENTINEL)

HOSTILE = [
    f"$(touch {S})",
    f"`touch {S}`",
    f"; touch {S}",
    f"&& touch {S}",
    f"| touch {S}",
    f"> {S}",
    f"a\ntouch {S}\nb",
    "\n",
    f"'; touch {S}; '",
    f'"; touch {S}; "',
    "it's",
    'say "hi"',
    "{{ 7*7 }}",
    "{% for x in y %}loop{% endfor %}",
    "{# comment #}",
    "{{ self.__init__.__globals__ }}",
    "\\",
    "back\\slash\\n",
    "ünïcödé ✓ 日本語",
    "$HOME ${PATH} $0 $@",
    "*",
    "~",
    "!",
    "-n",
    "",
    " leading and trailing spaces ",
    "tab\there",
    "#not a comment",
]

# argv -> one NUL-terminated record per argument; the environment likewise (env -0).
SCRIPT = "printf '%s\\0' \"$@\" > argv.bin; env -0 > env.bin"


def hostile_task(task_id: str) -> dict[str, Any]:
    return {
        "id": task_id,
        "command": ["sh", "-c", SCRIPT, "x", *HOSTILE],
        "env": {f"H{i}": v for i, v in enumerate(HOSTILE)},
        "outputs": ["argv.bin", "env.bin"],
        "labels": {"note": "{{ 7*7 }} $(touch " + S + ")"},
        "resources": {"walltime": "00:01:00"},
    }


@pytest.fixture(autouse=True)
def no_sentinel():
    SENTINEL.unlink(missing_ok=True)
    yield
    created = SENTINEL.exists()
    SENTINEL.unlink(missing_ok=True)
    assert not created, f"a task value was executed: {SENTINEL} exists"


def exec_words(script: str) -> list[str]:
    """The words of the wrapper's `exec` command, as the shell will split them."""
    start = script.index("\n  exec ") + len("\n  exec ")
    end = script.index('\n) > "$FEM_DIR/stdout"', start)
    return shlex.split(script[start:end])


def export_words(script: str) -> list[str]:
    start = script.index("\n(\n") + 3
    end = script.index("\n  exec ", start)
    return shlex.split(script[start:end])


def render(cli, write_config, write_task, site: dict[str, Any], task: dict[str, Any]) -> str:
    proc = cli("render", "--config", write_config(site), write_task(task))
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_render_quotes_every_hostile_value(tmp_path: Path, site, cli, write_config, write_task) -> None:
    task = hostile_task("hostile-render")
    script = render(cli, write_config, write_task, site, task)
    # The argv splits back to exactly the task's command, and the env to exactly its values.
    assert exec_words(script) == task["command"]
    words = export_words(script)
    assert words[0::2] == ["export"] * len(HOSTILE)
    assert dict(w.split("=", 1) for w in words[1::2]) == task["env"]
    # Jinja saw them as data: no evaluation, and the template syntax is still there, quoted.
    assert "49" not in script.replace(S, "")
    assert shlex.quote("{{ 7*7 }}") in script
    assert shlex.quote("{% for x in y %}loop{% endfor %}") in script
    assert "__globals__" in script and "<function" not in script
    # The shell accepts the script, and so does bash.
    path = tmp_path / "job.sh"
    path.write_text(script)
    for shell in ("sh", "bash"):
        check = subprocess.run([shell, "-n", str(path)], capture_output=True, text=True)
        assert check.returncode == 0, check.stderr


def test_hostile_task_id_paths_quoted(site, cli, write_config, write_task) -> None:
    # ids are charset-checked, but the work dir path still goes through shell_quote: a work_root with
    # spaces and a quote must come out as one word.
    site["work_root"] = str(Path(site["work_root"]) / "it's a dir $(x)")
    script = render(cli, write_config, write_task, site, {"id": "t1", "command": ["pwd"]})
    cd_line = next(ln for ln in script.splitlines() if ln.startswith("if ! cd "))
    words = shlex.split(cd_line.removeprefix("if ! cd ").removesuffix("; then"))
    assert words == [f"{site['work_root']}/anonymous/t1/t1"]


def test_real_run_passes_hostile_values_literally(tmp_path: Path, site, cli, write_config, write_task) -> None:
    task = hostile_task("hostile-run")
    out = tmp_path / "out"
    proc = cli("run", "--config", write_config(site), write_task(task), "--outputs", out, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = (out / "outputs" / "argv.bin").read_bytes().decode().split("\0")
    assert argv[-1] == ""  # each record ends with a NUL
    assert argv[:-1] == HOSTILE
    env: dict[str, str] = {}
    for record in (out / "outputs" / "env.bin").read_bytes().decode().split("\0"):
        if record:
            name, _, value = record.partition("=")
            env[name] = value
    for i, value in enumerate(HOSTILE):
        assert env[f"H{i}"] == value, (i, value)
    # The job script that ran is also quoted the same way.
    job = Path(site["work_root"]) / "anonymous" / "hostile-run" / "hostile-run" / ".fem" / "job.sh"
    assert exec_words(job.read_text()) == task["command"]


def test_site_templates_dir_is_searched_first(tmp_path: Path, site, cli, write_config, write_task) -> None:
    templates = tmp_path / "site-templates"
    templates.mkdir()
    (templates / "local.sh.j2").write_text(
        "#!/bin/sh\n"
        "# site override for {{ task_id | shell_quote }}: local policy applies\n"
        '{% include "wrapper.sh.j2" %}\n'
    )
    site["templates_dir"] = str(templates)
    config = write_config(site)
    task = {"id": "override-1", "command": ["sh", "-c", "echo ran > ran.txt", f"$(touch {S})"],
            "outputs": ["ran.txt"]}
    proc = cli("render", "--config", config, write_task(task))
    assert proc.returncode == 0, proc.stderr
    assert "# site override for override-1: local policy applies" in proc.stdout
    assert "# --- fem-hpc common wrapper: task override-1 ---" in proc.stdout  # the built-in include
    assert exec_words(proc.stdout) == task["command"]
    # The override is what a real run uses too.
    out = tmp_path / "out"
    run = cli("run", "--config", config, write_task(task), "--outputs", out)
    assert run.returncode == 0, run.stderr
    assert (out / "outputs" / "ran.txt").read_text() == "ran\n"
    job = Path(site["work_root"]) / "anonymous" / "override-1" / "override-1" / ".fem" / "job.sh"
    assert "# site override for override-1" in job.read_text()


def test_builtin_template_used_without_override(site, cli, write_config, write_task) -> None:
    script = render(cli, write_config, write_task, site, {"id": "plain", "command": ["true"]})
    assert script.startswith("#!/bin/sh\n# fem-hpc job script (executor: local) for task plain\n")
    assert "site override" not in script
