"""No secret in any log line, and every task line tagged, on a real `fem-hpc serve --log-format json`.

The run below uses every kind of secret a site has: the broker password (a dedicated RabbitMQ user
made for this test), a git token, a registry password and a legacy request token. It runs a task
that completes, one that fails, one that fails in a git stage-in that uses the token, a rejected
one and a legacy health-check, then reads the whole log. Plus unit tests of redact() and both
formatters.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import re
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services
from brokerkit import LegacyOrchestrator, ServeProcess, rabbitmqctl, task, unique_node

from fem_hpc.client import Client
from fem_hpc.logs import JSONFormatter, TextFormatter, _ContextFilter, redact, register_secret, setup_logging

# -- units -------------------------------------------------------------------------------------------


def _record(msg: str, *args: Any, task_id: str | None = None, native_id: str | None = None,
            exc_info: Any = None) -> logging.LogRecord:
    record = logging.LogRecord("fem_hpc.test", logging.INFO, __file__, 1, msg, args, exc_info)
    if task_id is not None:
        record.task_id = task_id
    if native_id is not None:
        record.native_id = native_id
    _ContextFilter().filter(record)
    return record


def test_redact_masks_url_passwords_and_registered_secrets() -> None:
    token = f"tok-{secrets.token_hex(8)}"
    assert redact(f"x {token} y") == f"x {token} y"  # not registered yet
    register_secret(token)
    assert redact(f"x {token} y {token}") == "x *** y ***"
    assert redact("amqp://user:pa55@host:5672/%2F and amqps://u:p%2Fq@h/v") == \
        "amqp://user:***@host:5672/%2F and amqps://u:***@h/v"
    assert redact("amqp://host:5672/%2F") == "amqp://host:5672/%2F"  # no password, nothing to mask
    register_secret("abc")  # too short to mask without mangling ordinary text
    register_secret(None)
    register_secret("")
    assert redact("abc cab") == "abc cab"
    # The longest secret wins where one contains another.
    inner = f"in-{secrets.token_hex(4)}"
    register_secret(inner)
    register_secret(f"{inner}-outer")
    assert redact(f"[{inner}-outer] [{inner}]") == "[***] [***]"


def test_text_formatter() -> None:
    secret = f"pw-{secrets.token_hex(6)}"
    register_secret(secret)
    line = TextFormatter().format(_record("job %s submitted with %s", "t1", secret, task_id="t1", native_id="42"))
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO    fem_hpc\.test task=t1 native=42: "
                    r"job t1 submitted with \*\*\*$", line), line
    plain = TextFormatter().format(_record("no task here"))
    assert plain.endswith(" INFO    fem_hpc.test: no task here")
    no_native = TextFormatter().format(_record("staging", task_id="t2"))
    assert "task=t2:" in no_native and "native=" not in no_native
    try:
        raise RuntimeError(f"boom {secret}")
    except RuntimeError:
        import sys

        with_exc = TextFormatter().format(_record("failed", task_id="t3", exc_info=sys.exc_info()))
    assert "RuntimeError: boom ***" in with_exc and secret not in with_exc


def test_json_formatter() -> None:
    secret = f"js-{secrets.token_hex(6)}"
    register_secret(secret)
    try:
        raise ValueError(f"bad {secret}")
    except ValueError:
        import sys

        exc = sys.exc_info()
    data = json.loads(JSONFormatter().format(_record('say "%s"\n', secret, task_id="t9", native_id="7",
                                                     exc_info=exc)))
    assert data["message"] == 'say "***"\n' and data["task_id"] == "t9" and data["native_id"] == "7"
    assert data["level"] == "INFO" and data["logger"] == "fem_hpc.test" and data["time"].endswith("Z")
    assert "ValueError: bad ***" in data["exception"]
    bare = json.loads(JSONFormatter().format(_record("hello")))
    assert bare["task_id"] is None and bare["native_id"] is None


def test_setup_logging_json_on_a_stream() -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        setup_logging("json", "INFO", stream)
        logging.getLogger("fem_hpc.x").info("t5 RECEIVED", extra={"task_id": "t5", "native_id": None})
        logging.getLogger("fem_hpc.x").debug("not shown")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["task_id"] == "t5"


# -- end to end -----------------------------------------------------------------------------------------
@pytest.fixture
def broker_user() -> Iterator[tuple[str, str]]:
    """A dedicated RabbitMQ user with a random password (with a character that URLs encode)."""
    services.require("rabbitmq")
    user = f"fem-sec-{uuid.uuid4().hex[:8]}"
    password = f"Pw/{secrets.token_hex(12)}"
    res = rabbitmqctl("add_user", user, password)
    assert res.returncode == 0, res.stderr
    try:
        res = rabbitmqctl("set_permissions", "-p", "/", user, ".*", ".*", ".*")
        assert res.returncode == 0, res.stderr
        yield user, password
    finally:
        rabbitmqctl("delete_user", user)


@pytest.mark.rabbitmq
def test_no_secret_in_any_log_line(tmp_path: Path, broker_user: tuple[str, str]) -> None:
    user, password = broker_user
    encoded = password.replace("/", "%2F")
    url = f"amqp://{user}:{encoded}@127.0.0.1:5672/%2F"
    git_token = f"ghp_{secrets.token_hex(16)}"
    registry_password = f"reg-{secrets.token_hex(12)}"
    legacy_token = f"legacy-{secrets.token_hex(12)}"
    git_host = "127.0.0.1"  # nothing listens on port 1: the clone fails after git got the token
    node = unique_node("sec")
    serve = ServeProcess(tmp_path, node, {
        "broker": {"url": url},
        "legacy": {"enabled": True},
        "git": {"credentials": {git_host: {"username": "fem-bot", "token": git_token}}, "timeout_seconds": 30},
        "registries": {"127.0.0.1:5001": {"username": "femuser", "password": registry_password}},
        "policy": {"git": ["file://*", f"https://{git_host}:1/*"], "max_resources": {"cpus": 4, "memory": "8G"}},
    }, args=["--log-format", "json", "--log-level", "DEBUG"])
    serve.start()
    try:
        with Client(url, node) as c:
            ok = c.submit(task("sec-ok-1", ["sh", "-c", "echo fine"]), timeout=60)
            fail = c.submit(task("sec-fail-2", ["sh", "-c", "echo nope >&2; exit 4"]), timeout=60)
            git_fail = c.submit(task("sec-git-3", ["true"], source={"git": f"https://{git_host}:1/repo.git"}),
                                timeout=90)
            rejected = c.submit(task("sec-rej-4", ["true"], resources={"cpus": 64}), timeout=60)
            health = c.health(timeout=30)
        orchestrator = LegacyOrchestrator(node, url)
        try:
            legacy = orchestrator.call("health-check|t|{}|{\"execution_id\": \"e\"}|{}|u|None|{}|" + legacy_token)
        finally:
            orchestrator.close()
    finally:
        code = serve.stop()
    assert (ok.state, fail.state, git_fail.state, rejected.state) == ("COMPLETED", "FAILED", "FAILED", "REJECTED")
    assert git_fail.result["reason"] == "STAGE_IN"
    assert health["node"] == node and legacy["status"] in ("success", "error")
    assert code == 0

    log = serve.log()
    secrets_used = {
        "broker password": password, "broker password (URL-encoded)": encoded,
        "broker password (core)": password.split("/", 1)[1],
        "git token": git_token,
        "git basic auth": base64.b64encode(f"fem-bot:{git_token}".encode()).decode(),
        "registry password": registry_password, "legacy token": legacy_token,
    }
    replies = json.dumps([health, legacy, ok.result, fail.result, git_fail.result, rejected.result])
    for what, value in secrets_used.items():
        assert value not in log, f"the {what} is in the log"
        assert value not in replies, f"the {what} is in a reply"

    lines = [ln for ln in log.splitlines() if ln.strip()]
    assert len(lines) > 20, log
    records = []
    for ln in lines:
        try:
            data = json.loads(ln)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON log line: {ln!r}") from None
        assert isinstance(data, dict), ln
        assert {"time", "level", "message", "task_id", "native_id"} <= set(data), ln
        records.append(data)

    task_ids = ["sec-ok-1", "sec-fail-2", "sec-git-3", "sec-rej-4"]
    for tid in task_ids:
        about = [r for r in records if re.search(rf"(?<![\w-]){re.escape(tid)}(?![\w-])", r["message"])]
        assert about, f"no log line about {tid}"
        for r in about:
            assert r["task_id"] == tid, r
    # Lines of a submitted job carry its native id (the local executor's pid).
    for tid in ("sec-ok-1", "sec-fail-2"):
        submitted = [r for r in records if r["task_id"] == tid and "SUBMITTED" in r["message"]]
        assert submitted and all(r["native_id"] and r["native_id"].isdigit() for r in submitted), submitted
        final = [r for r in records if r["task_id"] == tid and re.search(r"\b(COMPLETED|FAILED)\b", r["message"])]
        assert final and all(r["native_id"] for r in final), final
    assert any(r["level"] == "WARNING" and r["task_id"] == "sec-rej-4" for r in records)
    # The git failure is logged with its URL, and only the URL.
    assert any(f"https://{git_host}:1/repo.git" in r["message"] for r in records if r["task_id"] == "sec-git-3"), \
        [r for r in records if r["task_id"] == "sec-git-3"]
