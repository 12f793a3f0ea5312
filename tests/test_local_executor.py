"""The local executor end to end, with real processes: `fem-hpc run`, and the Agent directly for
cancel and re-adoption after a restart."""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from fem_hpc.config import SiteConfig
from fem_hpc.executors import site_from_dict
from fem_hpc.journal import Journal
from fem_hpc.lifecycle.agent import Agent
from fem_hpc.model import State

PROGRESS = re.compile(r"^\[\s*[0-9.]+s\] (\S+) ([A-Z_]+)(.*)$")
ORDER = ["RECEIVED", "STAGING_IN", "SUBMITTED", "RUNNING", "STAGING_OUT"]


# -- helpers ----------------------------------------------------------------------------------
def processes_running(*argv: str) -> list[int]:
    """Pids of live processes whose argv ends with `argv` (zombies have no cmdline and are not listed)."""
    want = list(argv)
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parts = [p.decode(errors="replace") for p in (entry / "cmdline").read_bytes().split(b"\0") if p]
        except OSError:
            continue
        if parts[-len(want):] == want:
            pids.append(int(entry.name))
    return pids


def wait_until(predicate, timeout: float, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture
def sleep_arg() -> Iterator[Callable[[int], str]]:
    """sleep_arg(31) -> a `sleep` argument like '31.482913377', unique to this test run, so its process
    can be found in /proc even when other runs of the suite share the machine. Whatever sleep made
    this way is still running at teardown is killed (by pid) and fails the test."""
    registered: list[str] = []

    def make(seconds: int) -> str:
        arg = f"{seconds}.{secrets.randbelow(10**9):09d}"
        registered.append(arg)
        return arg

    yield make
    survivors = []
    for arg in registered:
        for pid in processes_running("sleep", arg):
            argv = ("sleep", arg)
            survivors.append((pid, argv))
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not survivors, f"processes left running: {survivors}"


def states(stderr: str, task_id: str) -> list[str]:
    out = []
    for line in stderr.splitlines():
        m = PROGRESS.match(line)
        if m and m.group(1) == task_id:
            out.append(m.group(2))
    return out


def assert_protocol_order(seen: list[str], final: str) -> None:
    assert seen[-1] == final, seen
    body = seen[:-1]
    assert body == sorted(body, key=ORDER.index), seen
    assert len(set(body)) == len(body), seen
    assert body[:2] == ["RECEIVED", "STAGING_IN"], seen


def workdir(site: dict[str, Any], task_id: str, user: str = "anonymous", execution: str | None = None) -> Path:
    return Path(site["work_root"]) / user / (execution or task_id) / task_id


def run(cli, write_config, write_task, site: dict[str, Any], task: dict[str, Any], outputs: Path | None = None,
        timeout: float = 60):
    args = ["run", "--config", write_config(site), write_task(task)]
    if outputs is not None:
        args += ["--outputs", outputs]
    return cli(*args, timeout=timeout)


# -- fem-hpc run --------------------------------------------------------------------------------
def test_exit_zero_with_outputs(tmp_path: Path, site, cli, write_config, write_task) -> None:
    task = {"id": "ok-1", "user_id": "alice", "execution_id": "exec-9",
            "command": ["sh", "-c", "mkdir -p out; echo 42 > out/answer.txt; echo skip > other.dat; "
                        "echo to-stdout; echo to-stderr >&2"],
            "outputs": ["out/*.txt"]}
    out = tmp_path / "out"
    proc = run(cli, write_config, write_task, site, task, out)
    assert proc.returncode == 0, proc.stderr
    assert_protocol_order(states(proc.stderr, "ok-1"), "COMPLETED")
    assert (out / "outputs" / "out" / "answer.txt").read_text() == "42\n"
    assert not (out / "outputs" / "other.dat").exists()
    assert (out / "logs" / "stdout").read_text() == "to-stdout\n"
    assert (out / "logs" / "stderr").read_text() == "to-stderr\n"
    wd = workdir(site, "ok-1", "alice", "exec-9")
    assert (wd / "out" / "answer.txt").is_file()
    # The marker: JSON with the exit code and the start and end times.
    marker = json.loads((wd / ".fem" / "exit_code").read_text())
    assert marker["exit_code"] == 0
    started = datetime.strptime(marker["started"], "%Y-%m-%dT%H:%M:%SZ")
    finished = datetime.strptime(marker["finished"], "%Y-%m-%dT%H:%M:%SZ")
    assert started <= finished
    assert not list((wd / ".fem").glob("exit_code.tmp*"))  # written by rename


def test_exit_code_3(tmp_path: Path, site, cli, write_config, write_task) -> None:
    task = {"id": "three", "command": ["sh", "-c", "echo half > part.txt; echo broken >&2; exit 3"],
            "outputs": ["part.txt"]}
    out = tmp_path / "out"
    proc = run(cli, write_config, write_task, site, task, out)
    assert proc.returncode == 3, proc.stderr
    assert_protocol_order(states(proc.stderr, "three"), "FAILED")
    assert "reason: EXIT_CODE" in proc.stderr and "exited with code 3" in proc.stderr
    assert (out / "outputs" / "part.txt").read_text() == "half\n"  # outputs of a failed task still come back
    assert (out / "logs" / "stderr").read_text() == "broken\n"
    assert json.loads((workdir(site, "three") / ".fem" / "exit_code").read_text())["exit_code"] == 3


def test_command_not_found(site, cli, write_config, write_task) -> None:
    proc = run(cli, write_config, write_task, site, {"id": "nf", "command": ["/nonexistent/fem-binary"]})
    assert proc.returncode == 127, proc.stderr
    assert "FAILED" in proc.stderr


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"bogus": True}, "task.bogus", "unknown field"),
        ({"id": "../x"}, "task.id", "'../x'"),
        ({"volumes": [{"name": "nope", "target": "/data"}]}, "task.volumes.0.name", "unknown volume 'nope'"),
        ({"executor": "slurm"}, "task.executor", "not configured"),
        ({"resources": {"memory": "4GB"}}, "task.resources.memory", "4GB"),
    ],
)
def test_rejected_exits_65_and_creates_nothing(tmp_path: Path, site, cli, write_config, write_task,
                                             change: dict[str, Any], field: str, words: str) -> None:
    task = {"id": "rej-1", "command": ["touch", str(tmp_path / "ran")], **change}
    proc = run(cli, write_config, write_task, site, task)
    assert proc.returncode == 65, proc.stderr
    assert "task rejected:" in proc.stderr
    line = next(ln for ln in proc.stderr.splitlines() if ln.startswith(f"  - {field}:"))
    assert words in line
    assert "Traceback" not in proc.stderr
    assert not Path(site["work_root"]).exists()  # no orphan work dir
    assert not (tmp_path / "ran").exists()


def test_bad_task_file(tmp_path: Path, site, cli, write_config) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    proc = cli("run", "--config", write_config(site), bad)
    assert proc.returncode == 65 and "not valid JSON" in proc.stderr and "Traceback" not in proc.stderr
    proc = cli("run", "--config", write_config(site), tmp_path / "missing.json")
    assert proc.returncode == 66 and "cannot read task file" in proc.stderr


def test_same_task_id_twice_is_refused(tmp_path: Path, site, cli, write_config, write_task) -> None:
    first = {"id": "twice", "command": ["sh", "-c", "echo first > result.txt"], "outputs": ["result.txt"]}
    proc = run(cli, write_config, write_task, site, first, tmp_path / "out1")
    assert proc.returncode == 0, proc.stderr
    wd = workdir(site, "twice")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in wd.rglob("*") if p.is_file()}
    assert wd / "result.txt" in before
    second = {"id": "twice", "command": ["sh", "-c", "echo second > result.txt; echo x > extra.txt"],
              "outputs": ["result.txt"]}
    proc = run(cli, write_config, write_task, site, second, tmp_path / "out2")
    assert proc.returncode == 65, proc.stderr
    assert "task id 'twice' already exists on this node" in proc.stderr
    assert "COMPLETED" in proc.stderr  # it says which state the first run is in
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in wd.rglob("*") if p.is_file()}
    assert after == before
    assert not (tmp_path / "out2").exists()


def test_walltime_timeout_kills_the_process_group(sleep_arg, site, cli, write_config, write_task) -> None:
    s = sleep_arg(31)
    task = {"id": "slow", "command": ["sh", "-c", f"sleep {s}; echo never"],
            "resources": {"walltime": "00:00:02"}}
    t0 = time.monotonic()
    proc = run(cli, write_config, write_task, site, task, timeout=30)
    elapsed = time.monotonic() - t0
    assert elapsed < 15, elapsed
    assert proc.returncode != 0
    assert_protocol_order(states(proc.stderr, "slow"), "FAILED")
    assert "reason: TIMEOUT" in proc.stderr and "walltime 00:00:02 exceeded" in proc.stderr
    assert wait_until(lambda: not processes_running("sleep", s), 3)


def test_timeout_kills_a_straggler_that_ignores_sigterm(sleep_arg, site, cli, write_config, write_task) -> None:
    bg = sleep_arg(36)
    fg = sleep_arg(36)
    # The command's main process dies of SIGTERM, so the wrapper writes its marker and exits at once;
    # a background process that ignores SIGTERM is still in the group and must get the SIGKILL.
    task = {"id": "straggler", "command": ["sh", "-c", f"(trap '' TERM; exec sleep {bg}) & exec sleep {fg}"],
            "resources": {"walltime": "00:00:01"}}
    proc = run(cli, write_config, write_task, site, task, timeout=30)
    assert "reason: TIMEOUT" in proc.stderr, proc.stderr
    assert wait_until(lambda: not processes_running("sleep", bg), 3)


def test_symlink_outside_not_followed(tmp_path: Path, site, cli, write_config, write_task) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("do not ship")
    task = {"id": "links",
            "command": ["sh", "-c", f"echo ok > ok.txt; ln -s {secret} leak.txt; ln -s {tmp_path} outdir; "
                        "ln -s ok.txt inside.txt"],
            "outputs": ["*.txt", "outdir", "outdir/*"]}
    out = tmp_path / "out"
    proc = run(cli, write_config, write_task, site, task, out)
    assert proc.returncode == 0, proc.stderr
    assert "leak.txt: symlink pointing outside the work dir, not followed" in proc.stderr
    assert "outdir: symlink pointing outside the work dir, not followed" in proc.stderr
    shipped = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert shipped == ["logs/stderr", "logs/stdout", "outputs/inside.txt", "outputs/ok.txt"]
    assert (out / "outputs" / "inside.txt").read_text() == "ok\n"  # a link inside the work dir ships its content
    archive = workdir(site, "links") / ".fem" / "outputs.tar.gz"
    with tarfile.open(archive) as tar:
        for member in tar:
            assert member.isfile(), member.name
            assert b"do not ship" not in tar.extractfile(member).read()  # type: ignore[union-attr]


def test_outputs_over_the_limit_fail_stage_out(tmp_path: Path, site, cli, write_config, write_task) -> None:
    site["stage_out"] = {"max_bytes": 4096}
    task = {"id": "big", "command": ["sh", "-c", "head -c 5000 /dev/zero > big.bin; echo wrote"],
            "outputs": ["big.bin"]}
    out = tmp_path / "out"
    proc = run(cli, write_config, write_task, site, task, out)
    assert proc.returncode == 1, proc.stderr
    assert_protocol_order(states(proc.stderr, "big"), "FAILED")
    assert "reason: STAGE_OUT" in proc.stderr and "stage_out.max_bytes" in proc.stderr
    assert not (out / "outputs").exists()
    assert (out / "logs" / "stdout").read_text() == "wrote\n"  # the logs still come back


def test_cli_sigterm_cancels_the_task(sleep_arg, site, write_config, write_task, fem_hpc_argv) -> None:
    s = sleep_arg(32)
    task = {"id": "interrupted", "command": ["sleep", s]}
    proc = subprocess.Popen([*fem_hpc_argv, "run", "--config", str(write_config(site)),
                             str(write_task(task))], stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if " RUNNING" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _, rest = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = "".join(lines) + rest
    assert proc.returncode != 0
    assert_protocol_order(states(stderr, "interrupted"), "CANCELLED")
    assert wait_until(lambda: not processes_running("sleep", s), 3)


# -- the agent directly -------------------------------------------------------------------------------
@pytest.fixture
def make_agent(site):
    """make_agent() -> (agent, journal) on the site config; all are closed at teardown."""
    opened: list[tuple[Agent, Journal]] = []

    def make(**changes: Any) -> tuple[SiteConfig, Agent, Journal]:
        cfg = site_from_dict({**site, **changes})
        journal = Journal(cfg.journal_path, outbox=False)
        agent = Agent(cfg, journal)
        opened.append((agent, journal))
        return cfg, agent, journal

    yield make
    for agent, journal in opened:
        agent.close()
        journal.close()


def wait_state(journal: Journal, task_id: str, state: State, timeout: float) -> None:
    assert wait_until(lambda: (r := journal.get(task_id)) is not None and r.state == state, timeout), \
        journal.get(task_id)


def test_cancel_kills_the_whole_group(sleep_arg, make_agent) -> None:
    s = sleep_arg(33)
    _, agent, journal = make_agent()
    seen: list[str] = []
    agent.observers.append(lambda tid, ev: seen.append(ev.state.value))
    result = agent.intake({"id": "c1", "command": ["sh", "-c", f"sleep {s} & wait"]})
    assert result.created
    wait_state(journal, "c1", State.RUNNING, 10)
    assert wait_until(lambda: processes_running("sleep", s), 5)
    t0 = time.monotonic()
    agent.cancel("c1")
    record = agent.wait("c1", 10)
    assert record is not None and record.state == State.CANCELLED, record
    assert time.monotonic() - t0 < 8
    assert wait_until(lambda: not processes_running("sleep", s), 3)
    assert seen[-2:] == ["CANCELLED", "CANCELLED"]  # the status event, then the result
    assert_protocol_order(seen[:-1], "CANCELLED")


def test_cancel_sigkills_a_child_that_ignores_sigterm(sleep_arg, make_agent) -> None:
    s = sleep_arg(33)
    _, agent, journal = make_agent(executors={"local": {"kill_grace_seconds": 2}})
    agent.intake({"id": "stubborn", "command": ["sh", "-c", f"trap '' TERM; sleep {s}; echo survived"]})
    wait_state(journal, "stubborn", State.RUNNING, 10)
    assert wait_until(lambda: processes_running("sleep", s), 3)
    t0 = time.monotonic()
    agent.cancel("stubborn")
    # SIGTERM is ignored: still there before the grace period ends...
    time.sleep(0.3)
    assert processes_running("sleep", s)
    # ...and SIGKILLed after it.
    assert wait_until(lambda: not processes_running("sleep", s), 8)
    record = agent.wait("stubborn", 15)
    assert record is not None and record.state == State.CANCELLED, record
    assert time.monotonic() - t0 < 12
    assert "survived" not in (Path(record.workdir or "") / ".fem" / "stdout").read_text()


def test_cancel_kills_a_straggler_after_the_wrapper_ended(sleep_arg, make_agent) -> None:
    bg = sleep_arg(37)
    fg = sleep_arg(37)
    _, agent, journal = make_agent(executors={"local": {"kill_grace_seconds": 1}})
    agent.intake({"id": "straggler2",
                  "command": ["sh", "-c", f"(trap '' TERM; exec sleep {bg}) & exec sleep {fg}"]})
    wait_state(journal, "straggler2", State.RUNNING, 10)
    assert wait_until(lambda: processes_running("sleep", bg), 3)
    agent.cancel("straggler2")
    record = agent.wait("straggler2", 10)
    assert record is not None and record.state == State.CANCELLED, record
    assert wait_until(lambda: not processes_running("sleep", bg), 5)


def test_readopt_after_restart_by_pid(sleep_arg, make_agent) -> None:
    s = sleep_arg(2)
    cfg, agent, journal = make_agent()
    agent.intake({"id": "readopt", "command": ["sh", "-c", f"sleep {s}; echo done > done.txt"],
                  "outputs": ["done.txt"]})
    assert wait_until(lambda: (r := journal.get("readopt")) is not None and r.native_id is not None, 10)
    native_id = journal.get("readopt").native_id  # type: ignore[union-attr]
    assert wait_until(lambda: processes_running("sleep", s), 2)
    agent.close()  # the service stops; the job keeps running
    journal.close()
    rec = Journal(cfg.journal_path, outbox=False).get("readopt")
    assert rec is not None and not rec.final

    _, agent2, journal2 = make_agent()
    assert agent2.recover() == 1
    record = agent2.wait("readopt", 15)
    assert record is not None and record.state == State.COMPLETED, record
    assert record.exit_code == 0 and record.native_id == native_id
    assert record.result_json is not None
    result = json.loads(record.result_json)
    assert result["state"] == "COMPLETED" and result["outputs"]["size"] > 0
    with tarfile.open(Path(record.workdir or "") / ".fem" / "outputs.tar.gz") as tar:
        assert tar.extractfile("outputs/done.txt").read() == b"done\n"  # type: ignore[union-attr]
    states_seen = [t["state"] for t in journal2.transitions("readopt")]
    assert states_seen[-2:] == ["STAGING_OUT", "COMPLETED"]


def test_killed_job_is_lost_after_restart(sleep_arg, make_agent) -> None:
    s = sleep_arg(35)
    cfg, agent, journal = make_agent()
    agent.intake({"id": "lost", "command": ["sleep", s]})
    wait_state(journal, "lost", State.RUNNING, 10)
    native_id = journal.get("lost").native_id  # type: ignore[union-attr]
    agent.close()
    journal.close()
    os.killpg(int(native_id or 0), signal.SIGKILL)  # the wrapper dies without writing its marker
    assert wait_until(lambda: not processes_running("sleep", s), 3)

    _, agent2, journal2 = make_agent()
    agent2.executors.start("local")[1].lost_grace = 1.0  # the default waits a minute before giving up on a job
    assert agent2.recover() == 1
    record = agent2.wait("lost", 15)
    assert record is not None and record.state == State.FAILED, record
    assert record.reason == "LOST"
    assert record.message and "without an exit-code marker" in record.message
    assert not (Path(record.workdir or "") / ".fem" / "exit_code").exists()


def test_cancel_journalled_before_a_restart_is_carried_out(sleep_arg, make_agent) -> None:
    """The cancel was committed, then the service died before it stopped the job: the next start
    stops the job instead of only remembering the wish."""
    s = sleep_arg(35)
    _, first, journal = make_agent()
    first.intake({"id": "cr1", "command": ["sleep", s]})
    wait_state(journal, "cr1", State.RUNNING, 10)
    first.close()
    journal.update("cr1", cancel_requested=1)
    assert processes_running("sleep", s)
    _, second, journal2 = make_agent()
    assert second.recover() == 1
    record = second.wait("cr1", 20)
    assert record is not None and record.state == State.CANCELLED, record
    assert wait_until(lambda: not processes_running("sleep", s), 15)


def test_walltime_kill_survives_a_restart_before_the_job_ends(make_agent) -> None:
    """The service is stopped between the walltime kill and the job's end: the next start still
    reports TIMEOUT (from the marker's times), not a plain exit code."""
    _, first, journal = make_agent(executors={"local": {"kill_grace_seconds": 5}})
    first.intake({"id": "wt-restart", "resources": {"walltime": "00:00:02"},
                  "command": ["sh", "-c", 'trap "sleep 2; exit 143" TERM; sleep 30 & wait']})
    wait_state(journal, "wt-restart", State.RUNNING, 10)
    time.sleep(3)  # past the walltime: the first agent has sent SIGTERM, the job is still ending
    first.close()
    _, second, _ = make_agent(executors={"local": {"kill_grace_seconds": 5}})
    second.recover()
    record = second.wait("wt-restart", 30)
    assert record is not None and record.state == State.FAILED, record
    assert record.reason == "TIMEOUT", (record.reason, record.message)
