"""`fem-hpc doctor` against the real services: it must say truthfully what works and what does
not, with exit status 1 on any error; and the same cheap checks in a running node's health reply."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import tempfile
from collections import namedtuple
from pathlib import Path
from typing import Any

import pika
import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, rabbitmqctl, unique_node

from fem_hpc.client import Client
from fem_hpc.config import config_from_dict
from fem_hpc.ops import doctor, health


def _doctor(cli, path: Path, timeout: float = 180) -> tuple[int, dict[str, Any]]:
    proc = cli("doctor", "--config", path, "--json", timeout=timeout)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise AssertionError(f"doctor printed no JSON (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}") \
            from None
    assert set(report) >= {"config", "ok", "counts", "checks"}
    for c in report["checks"]:
        assert c["status"] in ("ok", "warning", "error", "skip"), c
        assert c["name"] and c["detail"], c
        if c["status"] in ("warning", "error"):
            assert c["fix"], c  # every problem comes with a one-line fix
            assert "\n" not in c["fix"] and "\n" not in c["detail"], c
    return proc.returncode, report


def _by_name(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in report["checks"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def good(site: dict[str, Any]) -> dict[str, Any]:
    site = dict(site)
    site["node"] = unique_node("doc")
    # an events exchange of this test's own: whether it exists does not depend on which tests ran before
    site["broker"] = {"url": BROKER_URL, "events_exchange": f"fem.events.{site['node']}"}
    site["policy"] = {"git": ["file://*"]}
    return site


def _declare_exchange(name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        conn.channel().exchange_declare(name, exchange_type="topic", durable=True)
    finally:
        conn.close()


def _delete_exchange(name: str) -> None:
    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        conn.channel().exchange_delete(name)
    finally:
        conn.close()


@pytest.mark.rabbitmq
def test_good_config_is_all_ok(cli, write_config, good):
    services.require("rabbitmq")
    exchange = good["broker"]["events_exchange"]
    config = write_config(good)
    # before any serve: the exchange is missing, a warning with its fix, not an error
    code, report = _doctor(cli, config)
    assert code == 0, report
    missing = _by_name(report)["broker events exchange"]
    assert missing["status"] == "warning" and "will be declared at first serve" in missing["fix"], missing
    _declare_exchange(exchange)
    try:
        code, report = _doctor(cli, config)
    finally:
        _delete_exchange(exchange)
    checks = _by_name(report)
    assert code == 0, report
    assert report["ok"] is True and report["counts"]["error"] == 0
    for c in report["checks"]:
        assert c["status"] in ("ok", "warning", "skip"), c
        if c["status"] == "skip":
            assert c["name"] == "clock skew" and c["detail"].startswith("not visible"), c
    for name in ("config", "state_dir", "state_dir free space", "work_root", "work_root free space", "git",
                 "journal", "broker", "broker events exchange", "local: runtime"):
        assert checks[name]["status"] == "ok", checks.get(name)
    assert "RabbitMQ" in checks["broker"]["detail"]
    # A fresh node's queue is declared by its first serve: a warning with that fix, not an error.
    assert checks["broker queue"]["status"] == "warning"
    assert "will be declared at first serve" in checks["broker queue"]["fix"]
    assert "guest:guest" not in json.dumps(report)


@pytest.mark.rabbitmq
def test_text_report_and_queue_seen_once_declared(cli, write_config, good):
    services.require("rabbitmq")
    import pika

    conn = pika.BlockingConnection(pika.URLParameters(BROKER_URL))
    try:
        conn.channel().queue_declare(good["node"], durable=True)
        proc = cli("doctor", "--config", write_config(good), timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert re.search(r"OK\s+broker queue\s+queue '" + re.escape(good["node"]) + "': 0 message", proc.stdout)
        assert re.search(r"\d+ ok, \d+ warning\(s\), 0 error\(s\)", proc.stdout)
        assert proc.stderr == ""  # pika's own connection noise stays out of the report
    finally:
        conn.channel().queue_delete(good["node"])
        conn.close()


@pytest.mark.rabbitmq
def test_wrong_broker_password_is_an_error(cli, write_config, good):
    services.require("rabbitmq")
    good["broker"] = {"url": "amqp://guest:not-the-password-4711@127.0.0.1:5672/%2F"}
    code, report = _doctor(cli, write_config(good))
    broker = _by_name(report)["broker"]
    assert code == 1
    assert broker["status"] == "error" and "credentials refused" in broker["detail"], broker
    assert "broker.url" in broker["fix"]
    assert "not-the-password-4711" not in json.dumps(report)
    # The other checks still ran.
    assert _by_name(report)["local: runtime"]["status"] == "ok"


@pytest.mark.rabbitmq
def test_a_dedicated_user_and_a_missing_vhost(cli, write_config, good):
    """A real per-node user (as in production): accepted on its vhost, refused on one it may not use."""
    services.require("rabbitmq")
    user, password = f"doc-{os.urandom(4).hex()}", os.urandom(12).hex()
    assert rabbitmqctl("add_user", user, password).returncode == 0
    try:
        assert rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*").returncode == 0
        good["broker"] = {"url": f"amqp://{user}:{password}@127.0.0.1:5672/%2F"}
        code, report = _doctor(cli, write_config(good))
        assert code == 0, report
        assert f"as '{user}'" in _by_name(report)["broker"]["detail"]
        good["broker"] = {"url": f"amqp://{user}:{password}@127.0.0.1:5672/no-such-vhost"}
        code, report = _doctor(cli, write_config(good))
        broker = _by_name(report)["broker"]
        assert code == 1 and broker["status"] == "error" and "vhost" in broker["detail"], broker
        assert password not in json.dumps(report)
    finally:
        rabbitmqctl("delete_user", user)


def test_unreachable_broker_and_tls_mismatch_are_errors(cli, write_config, good):
    good["broker"] = {"url": f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F"}
    code, report = _doctor(cli, write_config(good))
    broker = _by_name(report)["broker"]
    assert code == 1 and broker["status"] == "error" and "cannot reach" in broker["detail"], broker
    assert "broker queue" not in _by_name(report)  # nothing more to look at without a connection


@pytest.mark.rabbitmq
def test_tls_against_a_plain_port_is_a_tls_error(cli, write_config, good):
    services.require("rabbitmq")
    good["broker"] = {"url": "amqps://guest:guest@127.0.0.1:5672/%2F"}
    code, report = _doctor(cli, write_config(good))
    broker = _by_name(report)["broker"]
    assert code == 1 and broker["status"] == "error" and "TLS handshake" in broker["detail"], broker
    assert "broker.tls" in broker["fix"]


def test_unwritable_work_root_is_an_error(cli, write_config, good, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    good["work_root"] = str(blocker / "work")
    good["broker"] = {"url": f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F"}
    code, report = _doctor(cli, write_config(good))
    work = _by_name(report)["work_root"]
    assert code == 1
    assert work["status"] == "error" and "is not a directory" in work["detail"], work
    assert _by_name(report)["state_dir"]["status"] == "ok"


def test_work_root_not_writable_by_the_service_account(tmp_path):
    if os.geteuid() != 0:
        target = tmp_path / "ro"
        target.mkdir(mode=0o555)
        checks = [c.model_dump() for c in health.check_directory("work_root", target)]
    else:
        # root writes anywhere: run the check as nobody, the way an unprivileged service would.
        target = Path(tempfile.mkdtemp(prefix="fem-doctor-root-only-", dir="/tmp"))
        target.chmod(0o755)
        try:
            checks = _as_nobody(lambda: [c.model_dump() for c in health.check_directory("work_root", target)])
        finally:
            shutil.rmtree(target)
    assert checks[0]["status"] == "error" and "not writable" in checks[0]["detail"], checks
    assert "Permission denied" in checks[0]["detail"]
    assert "install -d -o fem-hpc" in checks[0]["fix"]


def _as_nobody(fn: Any) -> Any:
    """fn() in a forked child running as uid/gid 65534; its JSON-able result comes back through a pipe."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on, only os._exit
        code = 1
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            os.write(w, json.dumps(fn()).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return json.loads(data)


def test_free_space_thresholds(tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    for free, status in ((100 * health.GiB, "ok"), (4 * health.GiB, "warning"), (400 * health.MiB, "error")):
        monkeypatch.setattr(health.shutil, "disk_usage", lambda _p, f=free: usage(1000 * health.GiB, 0, f))
        space = health.check_directory("state_dir", tmp_path)[1]
        assert space.status == status, (free, space)
        assert space.name == "state_dir free space"


def test_invalid_config_lists_every_problem(cli, write_config, good):
    good["workers"] = 0
    good["executors"] = {"local": {"kill_grace_secs": 1}}
    good["metrics"] = {"listen": "localhost"}
    code, report = _doctor(cli, write_config(good))
    assert code == 1 and report["ok"] is False
    config = _by_name(report)["config"]
    assert config["status"] == "error"
    for key in ("workers", "executors.local.kill_grace_secs", "metrics.listen"):
        assert key in config["detail"], config
    assert [c["name"] for c in report["checks"]] == ["config", "user"]


def test_missing_config_file(cli, tmp_path):
    code, report = _doctor(cli, tmp_path / "nope.yaml")
    assert code == 1 and "cannot read the file" in _by_name(report)["config"]["detail"]


def test_executor_without_checks_is_looked_for_on_path(good, monkeypatch):
    from fem_hpc.config import config_from_dict
    from fem_hpc.executors import registry
    from fem_hpc.executors.local import LocalExecutor

    site = config_from_dict(good)
    assert doctor.check_executor(site, "local")[0].status == "ok"
    info = registry.plugins()["local"]
    monkeypatch.setattr(info, "runtime", ["fem-no-such-binary"])
    monkeypatch.setattr(LocalExecutor, "checks", lambda self: [])
    check = doctor.check_executor(site, "local")[0]
    assert check.status == "error" and "fem-no-such-binary not on PATH" in check.detail, check


def _dead_slurm_conf(tmp_path: Path) -> Path:
    """This machine's slurm.conf, but its controller on a port nobody listens on."""
    text = Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")).read_text()
    text = re.sub(r"(?m)^\s*(SlurmctldHost|ControlMachine|ControlAddr|SlurmctldPort|MessageTimeout)\s*=.*$", "",
                  text)
    conf = tmp_path / "slurm.conf"
    # MessageTimeout: how long a client keeps retrying a controller that does not answer (10 s by
    # default, per command); 2 s makes the same error show sooner.
    conf.write_text(f"SlurmctldHost={socket.gethostname()}(127.0.0.1)\nSlurmctldPort={_free_port()}\n"
                    "MessageTimeout=2\n" + text)
    return conf


@pytest.mark.slurm
@pytest.mark.slow
def test_slurm_controller_down_is_an_error(cli, write_config, good, tmp_path):
    """The shared slurmctld keeps running: this executor's commands talk to a dead controller."""
    services.require("slurm")
    good["broker"] = {"url": f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F"}
    good["executors"] = {"local": {},
                         "slurm": {"partition": services.SLURM_PARTITION, "command_timeout": 30,
                                   "env": {"SLURM_CONF": str(_dead_slurm_conf(tmp_path))}},
                         "cluster": {"type": "slurm", "partition": services.SLURM_PARTITION}}
    code, report = _doctor(cli, write_config(good))
    assert code == 1
    dead = [c for c in report["checks"] if c["name"].startswith("slurm")]
    live = [c for c in report["checks"] if c["name"].startswith("cluster")]
    assert dead and all(c["status"] == "error" for c in dead), dead
    assert any("slurm controller" in c["detail"] or "controller" in c["name"] for c in dead), dead
    # The same executor type against the real controller answers.
    assert live and all(c["status"] == "ok" for c in live), live


@pytest.mark.ssh
@pytest.mark.slurm
@pytest.mark.slow
def test_doctor_checks_the_remote_work_root_of_an_off_cluster_executor(cli, write_config, good, tmp_path, sshd):
    """An executor without a shared file system: doctor runs its kind's check of the cluster-side
    work root (writable, python, tar, flock) over the real sshd, not only the scheduler's."""
    scratch = tmp_path / "cluster-scratch"
    good["executors"] = {"local": {},
                         "offc": {"type": "slurm", "partition": services.SLURM_PARTITION, "command_timeout": 30,
                                  "ssh": sshd.settings_dict(connect_timeout=5), "remote_work_root": str(scratch)}}
    code, report = _doctor(cli, write_config(good))
    checks = _by_name(report)
    root = checks.get("offc: remote work root")
    assert root is not None, sorted(checks)
    assert root["status"] == "ok", root
    assert root["detail"].startswith(f"{scratch} writable on the cluster, python3 ")
    assert root["detail"].endswith(", flock")  # util-linux's flock is on this machine, the SSH side
    assert scratch.is_dir()  # created by the check, over SSH
    assert any(name.startswith("offc") and name != "offc: remote work root" for name in checks)  # and sinfo's


@pytest.mark.docker
def test_docker_daemon_running_is_ok(cli, write_config, good):
    services.require("docker")
    good["broker"] = {"url": f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F"}
    good["executors"] = {"local": {}, "docker": {}}
    code, report = _doctor(cli, write_config(good))
    docker = [c for c in report["checks"] if c["name"].startswith("docker")]
    assert docker and docker[0]["status"] == "ok" and "Docker" in docker[0]["detail"], docker


def test_docker_daemon_not_answering_is_an_error(cli, write_config, good, tmp_path):
    """The shared dockerd keeps running: this executor points at a socket no daemon serves."""
    good["broker"] = {"url": f"amqp://guest:guest@127.0.0.1:{_free_port()}/%2F"}
    good["executors"] = {"local": {}, "docker": {"base_url": f"unix://{tmp_path}/no-docker.sock", "api_timeout": 5}}
    code, report = _doctor(cli, write_config(good))
    docker = [c for c in report["checks"] if c["name"].startswith("docker")]
    assert code == 1
    assert docker and docker[0]["status"] == "error", docker


@pytest.mark.rabbitmq
def test_health_reply_carries_the_checks(tmp_path):
    services.require("rabbitmq")
    node = unique_node("doch")
    serve = ServeProcess(tmp_path, node).start()
    try:
        with Client(BROKER_URL, node) as c:
            health = c.health(timeout=30)
    finally:
        serve.stop()
    checks = {c["name"]: c for c in health["checks"]}
    for name in ("state_dir", "state_dir free space", "work_root", "work_root free space", "git", "broker",
                 "local: runtime"):
        assert name in checks, sorted(checks)
        assert checks[name]["status"] == "ok", checks[name]
    assert "consumer connected, publisher connected" in checks["broker"]["detail"]
    assert all(set(c) == {"name", "status", "detail", "fix"} for c in health["checks"])


def test_runtime_check_honours_the_binary_setting_and_ssh(tmp_path):
    exe = tmp_path / "opt" / "apptainer"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\nexit 0\n")
    exe.chmod(0o755)
    site = config_from_dict({
        "node": "rt", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w"),
        "executors": {"app": {"type": "apptainer", "binary": str(exe)},
                      "gone": {"type": "apptainer", "binary": str(tmp_path / "nowhere")},
                      "hpc": {"type": "slurm", "ssh": {"host": "login.cluster.test", "user": "fem"}}},
    })
    found = health.runtime_check(site, "app")
    assert found.status == "ok" and found.detail == f"found {exe}", found
    missing = health.runtime_check(site, "gone")
    assert missing.status == "error" and "nowhere' (its binary setting) is not an executable" in missing.detail
    remote = health.runtime_check(site, "hpc")
    assert remote.status == "ok" and remote.detail == "sbatch on login.cluster.test, over SSH", remote
