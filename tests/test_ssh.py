"""SSHRunner and the Slurm/PBS executors over SSH, against a real sshd on 127.0.0.1 (tests/sshkit.py)
in front of the real Slurm of the test bed.

The end-to-end tests put fake `sbatch`/`squeue`/... first on the service's PATH that record any
call and fail: every scheduler command must go over SSH, none may run locally.
"""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, unique_node
from sshkit import SSHD

from fem_hpc.client import Client
from fem_hpc.executors.runners import RunnerError, SSHRunner, release, runner_for
from fem_hpc.journal import Journal

pytestmark = [pytest.mark.ssh, pytest.mark.slurm]

SCHEDULER_COMMANDS = ("sbatch", "squeue", "scancel", "sacct", "sinfo", "scontrol", "qsub", "qstat", "qdel")

HOSTILE = [
    "$(touch {s})",
    "`touch {s}`",
    "; touch {s}",
    "&& touch {s}",
    "| touch {s}",
    "> {s}",
    "a'b",
    'a"b',
    "it's \"quoted\"",
    "line1\nline2; touch {s}\n",
    "  spaced  out  ",
    "",
    "*",
    "$HOME ${{HOME}}",
    "back\\slash",
    "--",
    "-n",
    "#not a comment",
    "tab\there",
    "ünïcödé ✓",
]




@pytest.fixture
def runner(sshd: SSHD):
    r = SSHRunner(sshd.settings())
    yield r
    r.close()


def _wait(predicate, timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


# --- SSHRunner ------------------------------------------------------------------------------------


def test_hostile_arguments_reach_the_remote_program_literally(runner: SSHRunner, sshd: SSHD, tmp_path: Path):
    sentinel = tmp_path / "pwned"
    args = [a.format(s=sentinel) for a in HOSTILE]
    res = runner.run(["printf", "%s\\0", *args])
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\0")[:-1] == args
    res = runner.run(["printf", "%s\\n", *args])
    assert res.stdout == "".join(a + "\n" for a in args)
    # argv[0] itself is quoted too: a "command" with shell syntax is one (missing) program name.
    res = runner.run([f"true; touch {sentinel}"])
    assert res.returncode == 127
    assert not sentinel.exists()


def test_environment_is_passed_as_words(runner: SSHRunner, tmp_path: Path):
    sentinel = tmp_path / "pwned"
    env = {"FEM_A": f"$(touch {sentinel}) `id` 'q' \"d\"\nsecond line; touch {sentinel}", "FEM_B": "", "FEM_C": "x=y"}
    res = runner.run(["sh", "-c", 'printf "%s\\0" "$FEM_A" "$FEM_B" "$FEM_C"'], env=env)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split("\0")[:-1] == [env["FEM_A"], "", "x=y"]
    assert not sentinel.exists()
    with pytest.raises(RunnerError, match="invalid environment variable"):
        runner.run(["true"], env={"A; touch x": "1"})


def test_environment_values_never_appear_on_a_command_line(runner: SSHRunner):
    # The values travel on stdin: neither the command sshd runs nor the final process shows them.
    res = runner.run(["sh", "-c", 'tr "\\0" " " < /proc/$$/cmdline; echo; tr "\\0" " " < /proc/$PPID/cmdline; echo; '
                      'echo "$FEM_SECRET"'], env={"FEM_SECRET": "s3cr3t-value"})
    lines = res.stdout.splitlines()
    assert lines[-1] == "s3cr3t-value"
    assert all("s3cr3t-value" not in line for line in lines[:-1]), lines


def test_exit_codes_and_stderr(runner: SSHRunner):
    res = runner.run(["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (res.returncode, res.stdout, res.stderr) == (7, "out\n", "err\n")
    assert not res.ok
    assert runner.run(["true"]).ok
    assert runner.run(["false"]).returncode == 1
    missing = runner.run(["fem-no-such-command-xyz"])
    assert missing.returncode == 127


def test_large_output_is_read_to_the_end(runner: SSHRunner):
    # sshd may send the exit status before the last of the output: the runner reads until EOF.
    for _ in range(5):
        res = runner.run(["sh", "-c", "seq 1 100000; seq 1 50000 >&2"])
        assert res.stdout.count("\n") == 100000 and res.stdout.endswith("\n100000\n")
        assert res.stderr.count("\n") == 50000 and res.stderr.endswith("\n50000\n")


def test_timeout_raises_and_keeps_the_connection(runner: SSHRunner, sshd: SSHD):
    runner.run(["true"])
    start = time.monotonic()
    with pytest.raises(RunnerError, match="did not answer within"):
        runner.run(["sleep", "20"], timeout=1)
    assert time.monotonic() - start < 5
    assert runner.run(["echo", "still here"]).stdout == "still here\n"
    assert runner.connects == 1
    assert sshd.accepted() == 1


def test_write_file_over_sftp_is_atomic_with_mode(runner: SSHRunner, tmp_path: Path):
    target = tmp_path / "job.sh"
    runner.write_file(target, "#!/bin/sh\necho one\n", mode=0o640)
    assert target.read_text() == "#!/bin/sh\necho one\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o640
    first_inode = target.stat().st_ino
    text = "#!/bin/sh\n" + "echo two ünï\n" * 20000
    runner.write_file(target, text)  # default mode 0o700
    assert target.read_text() == text
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    assert target.stat().st_ino != first_inode  # replaced by a rename, never rewritten in place
    assert not (tmp_path / "job.sh.tmp").exists()
    # An error the server answers (no such directory) fails the write but not the connection.
    with pytest.raises(RunnerError, match="cannot write"):
        runner.write_file(tmp_path / "missing" / "job.sh", "x")
    assert runner.run(["cat", str(target)]).stdout == text
    assert runner.connects == 1


def test_one_connection_for_twenty_commands(runner: SSHRunner, sshd: SSHD):
    for i in range(20):
        assert runner.run(["echo", str(i)]).stdout == f"{i}\n"
    runner.write_file(sshd.dir / "written", "x")
    assert runner.connects == 1
    assert sshd.accepted() == 1, sshd.log()


def test_concurrent_commands_are_bounded_by_max_channels(sshd: SSHD):
    runner = SSHRunner(sshd.settings(max_channels=3))
    try:
        results: list = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                results.append(runner.run(["sh", "-c", "date +%s.%N; sleep 0.6; date +%s.%N"], timeout=60))
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert not errors, errors
        assert len(results) == 10 and all(r.ok for r in results)
        spans = [tuple(float(x) for x in r.stdout.split()) for r in results]
        events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
        running = peak = 0
        for _, delta in events:
            running += delta
            peak = max(peak, running)
        assert peak <= 3, spans
        assert peak >= 2, spans  # they did run side by side
        assert runner.connects == 1
        assert sshd.accepted() == 1
    finally:
        runner.close()


def test_host_key_mismatch_is_refused_and_nothing_runs(sshd: SSHD, tmp_path: Path):
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"{sshd.host_pattern} {sshd.other_host_key_entry()}\n")
    sentinel = tmp_path / "ran"
    runner = SSHRunner(sshd.settings(known_hosts=wrong))
    with pytest.raises(RunnerError, match="cannot connect"):
        runner.run(["touch", str(sentinel)])
    assert not sentinel.exists()
    assert runner.connects == 0
    assert sshd.accepted() == 0
    # even with auto-add: a known host whose key changed is never accepted
    auto = SSHRunner(sshd.settings(known_hosts=wrong, auto_add_host_key=True))
    with pytest.raises(RunnerError, match="cannot connect"):
        auto.run(["touch", str(sentinel)])
    assert not sentinel.exists()
    assert sshd.accepted() == 0
    assert sshd.other_host_key_entry() not in wrong.read_text()


def test_unknown_host_key_is_refused_without_auto_add(sshd: SSHD, tmp_path: Path):
    sentinel = tmp_path / "ran"
    other = tmp_path / "known_hosts_other"
    other.write_text(f"[127.0.0.1]:1 {sshd.host_key_entry}\n")  # the key, but for another port
    for known in (other, tmp_path / "does_not_exist"):
        runner = SSHRunner(sshd.settings(known_hosts=known))
        with pytest.raises(RunnerError, match="cannot connect"):
            runner.run(["touch", str(sentinel)])
        assert runner.connects == 0
    assert not sentinel.exists()
    assert sshd.accepted() == 0
    assert not (tmp_path / "does_not_exist").exists()


def test_auto_add_host_key_accepts_and_saves(sshd: SSHD, tmp_path: Path):
    known = tmp_path / "tofu_known_hosts"
    runner = SSHRunner(sshd.settings(known_hosts=known, auto_add_host_key=True))
    assert runner.run(["echo", "hi"]).stdout == "hi\n"
    runner.close()
    saved = known.read_text()
    assert sshd.host_pattern in saved and sshd.host_key_entry.split()[1] in saved
    # the saved key is now trusted without auto-add
    strict = SSHRunner(sshd.settings(known_hosts=known))
    assert strict.run(["echo", "again"]).stdout == "again\n"
    strict.close()


def test_reconnects_after_sshd_restart(runner: SSHRunner, sshd: SSHD):
    assert runner.run(["echo", "1"]).ok
    assert runner.connects == 1
    # Restarted while the runner is idle: the next command reconnects and runs (the dead
    # connection is found when the channel is opened, before anything ran, so it is retried).
    sshd.restart()
    assert runner.run(["echo", "2"]).stdout == "2\n"
    assert runner.connects == 2
    assert sshd.accepted() == 2
    # the same for a job script written over SFTP
    sshd.restart()
    runner.write_file(sshd.dir / "after-restart.sh", "echo 3\n")
    assert (sshd.dir / "after-restart.sh").read_text() == "echo 3\n"
    assert runner.connects == 3


def test_backs_off_while_sshd_is_down_then_reconnects(runner: SSHRunner, sshd: SSHD):
    assert runner.run(["echo", "1"]).ok
    sshd.stop()
    with pytest.raises(RunnerError, match="cannot connect"):
        runner.run(["echo", "down"])
    failed_at = time.monotonic()
    sshd.start()
    accepted = sshd.accepted()
    # Within the backoff no connection is even attempted.
    if time.monotonic() - failed_at < 0.8:
        with pytest.raises(RunnerError, match="next attempt"):
            runner.run(["echo", "too soon"])
        assert sshd.accepted() == accepted
    outputs: list[str] = []

    def attempt() -> bool:
        try:
            outputs.append(runner.run(["echo", "3"]).stdout)
            return True
        except RunnerError:
            return False

    assert _wait(attempt, 15, interval=0.2)
    assert outputs == ["3\n"]
    assert time.monotonic() - failed_at >= 0.9  # not before the backoff (1 s after the first failure)
    assert runner.connects == 2
    assert sshd.accepted() == accepted + 1


def test_stream_in_and_out_over_one_channel_in_constant_memory(runner: SSHRunner):
    """20 MB up (hashed by the remote sha256sum) and 20 MB down (hashed here), one channel each,
    with a peak allocation far below the data's size."""
    import hashlib
    import tracemalloc

    block = bytes(range(256)) * 4096  # 1 MiB
    expected = hashlib.sha256(block * 20).hexdigest()

    def feed(out) -> None:
        for _ in range(20):
            out.write(block)

    before = runner.channels
    tracemalloc.start()
    try:
        up = runner.stream(["sha256sum"], feed=feed)
        got = hashlib.sha256()
        size = 0

        def sink(data: bytes) -> None:
            nonlocal size
            got.update(data)
            size += len(data)

        down = runner.stream(["sh", "-c", "head -c 20971520 /dev/zero; echo done >&2"], sink=sink)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert up.ok and up.stdout.split()[0] == expected
    assert down.ok and size == 20 * 1024 * 1024 and down.stdout == "" and down.stderr == "done\n"
    assert got.hexdigest() == hashlib.sha256(b"\0" * size).hexdigest()
    assert peak < 8 * 1024 * 1024, peak
    assert runner.channels - before == 2 and runner.connects == 1


def test_stream_into_a_command_that_stops_reading(runner: SSHRunner):
    """The remote command exits while it is still being fed: its status comes back, and the
    connection stays (nothing was lost on the link)."""
    def feed(out) -> None:
        for _ in range(200):
            out.write(b"x" * 1024 * 1024)

    start = time.monotonic()
    res = runner.stream(["sh", "-c", "head -c 10 >/dev/null; echo gave up >&2; exit 3"], feed=feed)
    assert res.returncode == 3 and "gave up" in res.stderr
    assert time.monotonic() - start < 30
    assert runner.run(["echo", "still"]).stdout == "still\n" and runner.connects == 1


def test_stream_on_a_lost_link_is_a_transport_error(runner: SSHRunner, sshd: SSHD):
    runner.run(["true"])
    stopper = threading.Timer(1.0, sshd.stop)
    stopper.start()
    try:
        with pytest.raises(RunnerError) as err:
            runner.stream(["sh", "-c", "sleep 30"], sink=lambda b: None, idle_timeout=20)
    finally:
        stopper.join()  # the fixture's own stop must not race this one
    assert err.value.transport


def test_runner_for_shares_one_runner_per_set_of_settings(sshd: SSHD):
    """One connection per host *and* settings: an executor asking for other settings (here
    another channel limit) gets its own runner, never silently the first one's."""
    a = runner_for(sshd.settings())
    same = runner_for(sshd.settings())
    other = runner_for(sshd.settings(max_channels=2))
    try:
        assert a is same and isinstance(a, SSHRunner)
        assert other is not a and other.settings.max_channels == 2
        assert runner_for(sshd.settings(port=1)) is not a
    finally:
        for r in (a, same, other):
            release(r)


# --- fem-hpc serve over SSH -----------------------------------------------------------------------


def _fake_scheduler_dir(tmp: Path) -> tuple[Path, Path]:
    """A PATH entry whose scheduler commands record the call and fail."""
    fake = tmp / "fake-bin"
    fake.mkdir()
    called = tmp / "LOCAL_CALLED"
    for name in SCHEDULER_COMMANDS:
        script = fake / name
        script.write_text(f'#!/bin/sh\necho "{name} $*" >> {called}\necho "local {name} must not run" >&2\nexit 1\n')
        script.chmod(0o755)
    return fake, called


def _serve(tmp: Path, sshd: SSHD, executor: str, settings: dict) -> tuple[ServeProcess, Path]:
    services.require("rabbitmq")
    fake, called = _fake_scheduler_dir(tmp)
    node = unique_node("ssh")
    serve = ServeProcess(tmp, node, {
        "default_executor": executor,
        "executors": {executor: {**settings, "ssh": sshd.settings_dict(), "poll": {"min_seconds": 1}}},
    }, env={"PATH": f"{fake}{os.pathsep}{os.environ.get('PATH', '')}"})
    return serve, called


def _squeue_name(native_id: str) -> str:
    """The job's name as the real (local) Slurm knows it."""
    proc = subprocess.run(["squeue", "-h", "-t", "all", "-j", native_id, "-o", "%j"], capture_output=True,
                          text=True, timeout=30)
    return proc.stdout.strip()


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_serve_runs_slurm_tasks_over_ssh_and_no_local_scheduler_command(sshd: SSHD, tmp_path: Path):
    serve, called = _serve(tmp_path, sshd, "slurm", {"partition": services.SLURM_PARTITION})
    node = serve.node
    tasks = {
        f"ok{i}-{node}": {"id": f"ok{i}-{node}", "outputs": ["out.txt"],
                          "command": ["sh", "-c", 'echo "hello $1" > out.txt; echo done $1', "sh", f"n{i}; $(x)"]}
        for i in range(3)
    }
    fail_id = f"fail-{node}"
    tasks[fail_id] = {"id": fail_id, "command": ["sh", "-c", "echo bad >&2; exit 3"]}
    serve.start()
    clients: dict[str, tuple[Client, str]] = {}
    try:
        for tid, t in tasks.items():
            c = Client(BROKER_URL, node)
            clients[tid] = (c, c.publish({"fem": 1, "op": "submit", "task": t}))
        results = {}
        for tid, (c, corr) in clients.items():
            results[tid] = c.follow(corr, timeout=120, outputs_dir=tmp_path / "out" / tid)
        health = clients[fail_id][0].health()
    finally:
        for c, _ in clients.values():
            c.close()
        serve.stop()
    log = serve.log()
    for i in range(3):
        tid = f"ok{i}-{node}"
        r = results[tid]
        assert r.state == "COMPLETED", (r.result, log)
        assert r.exit_code == 0
        assert (tmp_path / "out" / tid / "outputs" / "out.txt").read_text() == f"hello n{i}; $(x)\n"
        assert r.result["stdout_tail"] == f"done n{i}; $(x)\n"
        assert "RUNNING" in [e["state"] for e in r.events if e.get("type") == "status"]
    failed = results[fail_id]
    assert (failed.state, failed.result["reason"], failed.exit_code) == ("FAILED", "EXIT_CODE", 3), failed.result
    assert failed.result["stderr_tail"] == "bad\n"
    assert health["executors"]["slurm"]["works"], health

    # Nothing ran locally; everything went through ONE ssh connection to the real Slurm.
    assert not called.exists(), called.read_text()
    assert sshd.accepted() == 1, sshd.log()
    journal = Journal(serve.tmp / "state" / "journal.sqlite", outbox=False)
    try:
        for tid in tasks:
            rec = journal.get(tid)
            assert rec is not None and rec.native_id and rec.native_id.isdigit(), rec
            assert results[tid].result["native_id"] == rec.native_id
            assert _squeue_name(rec.native_id) == f"fem-{tid}"
    finally:
        journal.close()


@pytest.mark.rabbitmq
@pytest.mark.pbs
@pytest.mark.slow
def test_serve_runs_a_torque_pbs_task_over_ssh(sshd: SSHD, tmp_path: Path):
    services.require("pbs")
    serve, called = _serve(tmp_path, sshd, "pbs", {"dialect": "torque"})
    node = serve.node
    tid = f"pbs-{node}"
    serve.start()
    try:
        with Client(BROKER_URL, node) as c:
            r = c.submit({"id": tid, "outputs": ["out.txt"], "command": ["sh", "-c", "echo pbs > out.txt; echo ok"]},
                         timeout=120, outputs_dir=tmp_path / "out")
    finally:
        serve.stop()
    assert r is not None
    assert r.state == "COMPLETED", (r.result, serve.log())
    assert (tmp_path / "out" / "outputs" / "out.txt").read_text() == "pbs\n"
    assert r.result["stdout_tail"] == "ok\n"
    assert not called.exists(), called.read_text()
    assert sshd.accepted() == 1, sshd.log()
    assert _squeue_name(r.result["native_id"]) == f"fem-{tid}"
