"""The submit_run reply body in the original's shape, with the command's printed JSON as `result`."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone

import pytest
from femkit import health_record

from fem_hpc.protocols.legacy.result import (
    FemFields,
    ReplyIds,
    command_result,
    legacy_time,
    reply_body,
    submit_run_reply,
)

IDS = ReplyIds(execution_id="1e7b5310-7a2e-4f89-a4f7-320a89f67217", tool_id="flcore", task_id="flcore-server",
               user_id="0e8f509e-3d43-4346-96da-aa744e7e8a75", node="UB2")


def test_the_envelope_has_the_orchestrators_record_keys() -> None:
    stored = health_record()["result"]["process_info"][0]
    ids = ReplyIds(execution_id=stored["execution_id"], tool_id=stored["tool_id"], task_id=stored["task_id"],
                   user_id=stored["user_id"], node=stored["node"])
    body = reply_body(ids, result=stored["result"], status="success", return_code=0,
                      started="2025-03-23T09:40:56.412Z", finished=datetime(2025, 3, 23, 9, 40, 57, tzinfo=UTC))
    assert body == stored  # byte for byte the node's answer as the orchestrator stored it


def test_a_command_that_prints_json() -> None:
    out = 'flcore stand-in: starting server\n{"server": "ok", "rounds": 5}\n'
    body = submit_run_reply(IDS, stdout=out, exit_code=0, started="2026-11-30T10:00:00Z",
                            finished="2026-11-30T10:00:16.9Z",
                            fem=FemFields(task_id="1e7b.flcore-server.abc", native_id="4711", state="COMPLETED",
                                          outputs={"files": ["log_server.txt"]}))
    assert body == {
        "execution_id": IDS.execution_id, "action": "submit_run", "tool_id": "flcore", "task_id": "flcore-server",
        "user_id": IDS.user_id, "node": "UB2", "result": {"server": "ok", "rounds": 5}, "status": "success",
        "return_code": 0, "starting_time": "2026-11-30 10:00:00", "finish_time": "2026-11-30 10:00:16",
        "fem_hpc": {"task_id": "1e7b.flcore-server.abc", "native_id": "4711", "state": "COMPLETED",
                    "outputs": {"files": ["log_server.txt"]}},
    }
    json.dumps(body, allow_nan=False)  # the reply is strict JSON


def test_a_failing_command_without_json() -> None:
    body = submit_run_reply(IDS, stdout="Traceback ...\nValueError: x\n", exit_code=2, started=None, finished=None)
    assert body["status"] == "error" and body["return_code"] == 2
    assert body["result"] == {"stdout": "Traceback ...\nValueError: x\n"}
    assert body["starting_time"] is None and "fem_hpc" not in body
    lost = submit_run_reply(IDS, stdout="", exit_code=None, started=None, finished=None, fem=FemFields())
    assert (lost["status"], lost["return_code"], lost["result"]) == ("error", None, {"stdout": ""})
    assert "fem_hpc" not in lost  # nothing to say


@pytest.mark.parametrize(("stdout", "result"), [
    ('{"a": 1}', {"a": 1}),
    ('  \n{"a": 1}\n\n', {"a": 1}),
    ('log 1\nlog 2\n{"a": 1}\n', {"a": 1}),
    ('{"first": 1}\nlog\n{"last": 2}\n', {"last": 2}),
    # pretty-printed after log lines: the object that ends stdout
    ('starting\n{\n  "a": {\n    "b": [1, 2]\n  }\n}\n', {"a": {"b": [1, 2]}}),
    # log lines after the result: the last one-line object
    ('{"a": 1}\nINFO shutting down\n', {"a": 1}),
    ('{"a": 1}\n{"b": broken\n', {"a": 1}),
    ('{"nested": "{\\"x\\": 1}"}', {"nested": '{"x": 1}'}),
])
def test_finding_the_printed_object(stdout: str, result: dict) -> None:
    assert command_result(stdout) == result


@pytest.mark.parametrize("stdout", [
    "", "plain text\n", "[1, 2]\n", '"a string"', "42", '{"a": NaN}', '{"a": Infinity}\n', "{not json}",
    '{"a": 1', "null",
])
def test_no_object_gives_the_stdout_tail(stdout: str) -> None:
    assert command_result(stdout) == {"stdout": stdout}


def test_the_tail_is_bounded() -> None:
    out = "x" * 10_000 + "END"
    assert command_result(out, tail_chars=5) == {"stdout": "xxEND"}
    assert command_result(out, tail_chars=0) == {"stdout": ""}


def test_a_hostile_stdout_is_bounded_work() -> None:
    # many lines starting with '{' that are not JSON: the search tries a bounded number of them
    out = "{\n" * 200_000 + '{"ok": true}'
    assert command_result(out) == {"ok": True}
    assert command_result("{" * 100_000) == {"stdout": ("{" * 100_000)[-4096:]}


def test_times() -> None:
    assert legacy_time("2026-11-30T10:00:00.999999Z") == "2026-11-30 10:00:00"
    assert legacy_time("2026-11-30T11:00:00+01:00") == "2026-11-30 10:00:00"
    assert legacy_time("2026-11-30T10:00:00") == "2026-11-30 10:00:00"  # no offset: UTC
    assert legacy_time(datetime(2026, 11, 30, 12, tzinfo=timezone(timedelta(hours=2)))) == "2026-11-30 10:00:00"
    assert legacy_time(None) is None
    with pytest.raises(ValueError):
        legacy_time("yesterday")
    with pytest.raises(ValueError, match="status must be"):
        reply_body(IDS, result={}, status="ok", return_code=0, started=None, finished=None)
