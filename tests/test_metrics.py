"""The Prometheus endpoint of `fem-hpc serve`: the listed series on a real scrape after real tasks,
its own registry, hooks that cost nothing when metrics are off, and `metrics.listen` validation."""

from __future__ import annotations

import json
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import services
from brokerkit import BROKER_URL, ServeProcess, rabbitmqctl, task, unique_node
from prometheus_client.parser import text_string_to_metric_families

from fem_hpc import metrics
from fem_hpc.client import Client
from fem_hpc.config import ConfigError, config_from_dict

SERIES = [
    "fem_info", "fem_tasks", "fem_intake_total", "fem_completions_total", "fem_scheduler_command_seconds",
    "fem_scheduler_command_errors_total", "fem_poll_cycle_seconds", "fem_poll_errors_total", "fem_tracked_jobs",
    "fem_tracker_stale", "fem_outbox_depth", "fem_outbox_published_total", "fem_broker_connected",
    "fem_broker_reconnects_total", "fem_stage_in_bytes_total", "fem_stage_in_seconds", "fem_stage_out_bytes_total",
    "fem_stage_out_seconds", "fem_legacy_requests_total",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    with urllib.request.urlopen(url, timeout=10) as resp:  # our own loopback endpoint
        assert resp.status == 200
        text = resp.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def declared(text: str, name: str) -> bool:
    """A metric family is declared (HELP/TYPE), even with no labelled child yet."""
    base = name.removesuffix("_total")
    return f"# TYPE {base} " in text or f"# TYPE {name} " in text


# -- units -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("listen,expected", [
    ("127.0.0.1:9464", ("127.0.0.1", 9464)), ("0.0.0.0:1", ("0.0.0.0", 1)), ("[::1]:9464", ("::1", 9464)),
    ("localhost:65535", ("localhost", 65535)), ("metrics.example.org:9464", ("metrics.example.org", 9464)),
])
def test_parse_listen(listen: str, expected: tuple[str, int]) -> None:
    assert metrics.parse_listen(listen) == expected


@pytest.mark.parametrize("listen", ["9464", ":9464", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000",
                                    "300.1.1.1:9464", "[::g]:9464", "::1:9464", "http://127.0.0.1:9464", ""])
def test_bad_listen_is_a_config_error(site: dict[str, Any], listen: str) -> None:
    site["metrics"] = {"listen": listen}
    with pytest.raises(ConfigError) as err:
        config_from_dict(site)
    assert any(p.startswith("metrics.listen:") for p in err.value.problems), err.value.problems


def test_hooks_are_free_without_metrics() -> None:
    """With metrics off, nothing imports prometheus_client and every hook is a no-op."""
    code = ("import sys\n"
            "from fem_hpc import metrics, service, cli\n"
            "from fem_hpc.lifecycle import agent, tracker\n"
            "from fem_hpc.ops import doctor\n"
            "metrics.observe_command('squeue', 0.1, True); metrics.intake('local', 'accepted')\n"
            "metrics.completion('local', 'COMPLETED', None); metrics.poll_cycle('local', 0.1, False)\n"
            "metrics.broker_reconnect('consumer'); metrics.stage_in('local', 1.0, None); "
            "metrics.stage_out('local', 1.0, 10)\n"
            "print('prometheus_client' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_own_registry_and_hooks(tmp_path: Path) -> None:
    from prometheus_client import REGISTRY

    m = metrics.Metrics()
    m.activate()
    try:
        (tmp_path / "a").write_bytes(b"x" * 1000)
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "b").write_bytes(b"y" * 24)
        (tmp_path / "link").symlink_to("/etc/passwd")  # not followed
        metrics.observe_command("/usr/bin/squeue", 0.05, True)
        metrics.observe_command("squeue", 0.2, False)
        metrics.observe_command("sbatch --wrap 'rm -rf /'", 0.2, False)  # odd names collapse into one label
        metrics.intake("local", "accepted")
        metrics.intake("../../etc", "weird")
        metrics.completion("local", "FAILED", "EXIT_CODE")
        metrics.completion("local", "COMPLETED", None)
        metrics.poll_cycle("local", 0.01, True)
        metrics.poll_cycle("local", 0.01, False)
        metrics.stage_in("local", 0.5, tmp_path)
        metrics.stage_out("local", 0.5, 4096)
        metrics.broker_reconnect("publisher")
        metrics.legacy_request("submit_run", "ok")
        metrics.legacy_request("colon-form-2024", "error")
        metrics.legacy_request("send_files", "weird")  # an unknown outcome counts as an error
    finally:
        m.stop()
    metrics.observe_command("squeue", 1.0, True)  # after stop: not recorded
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(m.render().decode()) for s in f.samples}
    assert value(samples, "fem_scheduler_command_seconds_count", command="squeue") == 2
    assert value(samples, "fem_scheduler_command_errors_total", command="squeue") == 1
    assert value(samples, "fem_scheduler_command_errors_total", command="other") == 1
    assert value(samples, "fem_intake_total", executor="local", outcome="accepted") == 1
    assert value(samples, "fem_intake_total", executor="-", outcome="rejected") == 1
    assert value(samples, "fem_completions_total", executor="local", state="FAILED", reason="EXIT_CODE") == 1
    assert value(samples, "fem_completions_total", executor="local", state="COMPLETED", reason="") == 1
    assert value(samples, "fem_poll_cycle_seconds_count", executor="local") == 2
    assert value(samples, "fem_poll_errors_total", executor="local") == 1
    assert value(samples, "fem_stage_in_bytes_total", executor="local") == 1024
    assert value(samples, "fem_stage_out_bytes_total", executor="local") == 4096
    assert value(samples, "fem_broker_reconnects_total", connection="publisher") == 1
    assert value(samples, "fem_legacy_requests_total", action="submit_run", outcome="ok") == 1
    assert value(samples, "fem_legacy_requests_total", action="colon-form-2024", outcome="error") == 1
    assert value(samples, "fem_legacy_requests_total", action="send_files", outcome="error") == 1
    # Nothing leaked into prometheus_client's global registry.
    assert REGISTRY.get_sample_value("fem_intake_total", {"executor": "local", "outcome": "accepted"}) is None


# -- the real endpoint ---------------------------------------------------------------------------------
@pytest.fixture
def served(tmp_path: Path):
    services.require("rabbitmq")
    started: list[ServeProcess] = []

    def start(extra: dict[str, Any] | None = None) -> tuple[ServeProcess, str]:
        port = _free_port()
        cfg = {"metrics": {"listen": f"127.0.0.1:{port}"}, **(extra or {})}
        s = ServeProcess(tmp_path, unique_node("met"), cfg).start()
        started.append(s)
        return s, f"http://127.0.0.1:{port}/metrics"

    yield start
    for s in started:
        s.stop()


def _wait_for(url: str, name: str, labels: dict[str, str], at_least: float, timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        _, samples = scrape(url)
        v = value(samples, name, **labels)
        if v is not None and v >= at_least:
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"{name}{labels} = {v}, want >= {at_least}")
        time.sleep(0.2)


@pytest.mark.rabbitmq
def test_endpoint_serves_the_listed_series(served, tmp_path: Path) -> None:
    s, url = served()
    node = s.node
    with Client(BROKER_URL, node) as c:
        ok = c.submit(task("m-ok", ["sh", "-c", "mkdir -p out; head -c 20000 /dev/urandom > out/r.bin"],
                           outputs=["out/*"]), timeout=60)
        bad = c.submit(task("m-fail", ["sh", "-c", "exit 3"]), timeout=60)
        rejected = c.submit(task("m-rej", ["true"], resources={"cpus": 64}), timeout=60)
        again = c.submit(task("m-ok", ["true"]), timeout=60)  # a duplicate id: its known result again
    assert (ok.state, bad.state, rejected.state, again.state) == ("COMPLETED", "FAILED", "REJECTED", "COMPLETED")
    samples = _wait_for(url, "fem_completions_total", {"executor": "local", "state": "FAILED",
                                                       "reason": "EXIT_CODE"}, 1)
    text, samples = scrape(url)
    for name in SERIES:
        assert declared(text, name), name
    assert value(samples, "fem_info", node=node, version=__import__("fem_hpc").__version__) == 1
    assert value(samples, "fem_tasks", state="COMPLETED") == 1
    assert value(samples, "fem_tasks", state="FAILED") == 1
    assert value(samples, "fem_tasks", state="RUNNING") == 0
    assert value(samples, "fem_intake_total", executor="local", outcome="accepted") == 2
    assert value(samples, "fem_intake_total", executor="local", outcome="rejected") == 1
    assert value(samples, "fem_intake_total", executor="local", outcome="duplicate") == 1
    assert value(samples, "fem_completions_total", executor="local", state="COMPLETED", reason="") == 1
    assert value(samples, "fem_completions_total", executor="local", state="FAILED", reason="EXIT_CODE") == 1
    assert value(samples, "fem_poll_cycle_seconds_count", executor="local") >= 1
    assert value(samples, "fem_stage_in_seconds_count", executor="local") == 2
    assert value(samples, "fem_stage_out_seconds_count", executor="local") == 2
    assert value(samples, "fem_stage_out_bytes_total", executor="local") > 20000  # random data does not compress
    assert value(samples, "fem_outbox_depth") is not None
    assert value(samples, "fem_outbox_published_total") > 0
    assert value(samples, "fem_broker_connected", connection="consumer") == 1
    assert value(samples, "fem_broker_connected", connection="publisher") == 1
    assert value(samples, "fem_broker_reconnects_total", connection="consumer") == 0
    assert value(samples, "fem_tracked_jobs", executor="local") == 0
    assert value(samples, "fem_tracker_stale", executor="local") == 0
    assert value(samples, "process_resident_memory_bytes") > 0
    # Nothing about tasks' content reaches the labels.
    assert "m-ok" not in text and "m-fail" not in text


@pytest.mark.rabbitmq
@pytest.mark.slurm
@pytest.mark.slow
def test_scheduler_commands_are_timed(served, tmp_path: Path) -> None:
    services.require("slurm")
    s, url = served({"executors": {"local": {}, "slurm": {"partition": services.SLURM_PARTITION,
                                                          "poll": {"min_seconds": 1, "max_seconds": 2}}}})
    with Client(BROKER_URL, s.node) as c:
        res = c.submit(task("m-slurm", ["sh", "-c", "echo hi"], executor="slurm"), timeout=120)
    assert res.state == "COMPLETED", res.result
    _, samples = scrape(url)
    assert value(samples, "fem_scheduler_command_seconds_count", command="sbatch") == 1
    assert value(samples, "fem_completions_total", executor="slurm", state="COMPLETED", reason="") == 1
    assert value(samples, "fem_intake_total", executor="slurm", outcome="accepted") == 1


@pytest.mark.rabbitmq
def test_a_taken_port_does_not_stop_the_service(served, tmp_path: Path) -> None:
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        port = blocker.getsockname()[1]
        s = ServeProcess(tmp_path, unique_node("met"), {"metrics": {"listen": f"127.0.0.1:{port}"}}).start()
        try:
            assert s.alive()
            assert "metrics endpoint cannot listen on" in s.log()
        finally:
            s.stop()
    finally:
        blocker.close()


def test_serve_refuses_a_bad_listen(cli, write_config, site: dict[str, Any]) -> None:
    site["metrics"] = {"listen": "127.0.0.1:99999"}
    proc = cli("serve", "--config", write_config(site), timeout=60)
    assert proc.returncode == 78
    assert "metrics.listen" in proc.stderr and "not in 1-65535" in proc.stderr


@pytest.mark.rabbitmq
def test_doctor_sees_the_endpoint_of_a_running_service(served, cli) -> None:
    s, url = served()
    proc = cli("doctor", "--config", s.config_path, "--json", timeout=120)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    assert checks["metrics"]["status"] == "ok" and "served by a running fem-hpc" in checks["metrics"]["detail"]


@pytest.mark.rabbitmq
def test_broker_reconnects_are_counted(tmp_path: Path) -> None:
    """Close this node's connections on the broker side (a dedicated user picks them out)."""
    services.require("rabbitmq")
    user, password = f"fem-met-{secrets.token_hex(4)}", secrets.token_hex(12)
    assert rabbitmqctl("add_user", user, password).returncode == 0
    try:
        assert rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*").returncode == 0
        port = _free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        s = ServeProcess(tmp_path, unique_node("met"), {
            "broker": {"url": f"amqp://{user}:{password}@127.0.0.1:5672/%2F"},
            "metrics": {"listen": f"127.0.0.1:{port}"}}).start()
        try:
            _wait_for(url, "fem_broker_connected", {"connection": "publisher"}, 1)
            listed = rabbitmqctl("-q", "list_connections", "pid", "user").stdout.splitlines()
            pids = [ln.split("\t")[0] for ln in listed if ln.endswith(f"\t{user}")]
            assert len(pids) == 2, listed  # the consumer's and the publisher's
            for pid in pids:
                res = rabbitmqctl("close_connection", pid, "test: reconnect please")
                assert res.returncode == 0, res.stdout + res.stderr
            for connection in ("consumer", "publisher"):
                _wait_for(url, "fem_broker_reconnects_total", {"connection": connection}, 1, timeout=60)
            _wait_for(url, "fem_broker_connected", {"connection": "consumer"}, 1)
        finally:
            s.stop()
    finally:
        rabbitmqctl("delete_user", user)
