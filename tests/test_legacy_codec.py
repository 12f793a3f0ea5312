"""The pure legacy FEM codec: request decoding, mapping to a v1 TASK, reply framing."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from fem_hpc.config import SiteConfig, config_from_dict
from fem_hpc.model import parse_task
from fem_hpc.protocols.legacy.codec import (
    LEGACY_ACTIONS,
    LegacyError,
    LegacyRequest,
    decode_reply,
    decode_request,
    encode_reply,
)
from fem_hpc.protocols.legacy.mapping import legacy_task_id, sanitize_id, to_task
from fem_hpc.protocols.legacy.replies import error_reply, legacy_time
from fem_hpc.protocols.legacy.result import FemFields, ReplyIds, reply_body

MAX = 1024 * 1024
TOKEN = "secret-token-5f1d"
SITE_VOLUMES = {"datasets": "/srv/data/sets", "models": "/srv/models/"}


def site_for(executor: str | None = None, *, executor_no_image: str | None = "local") -> SiteConfig:
    """A docker + local site with the two site volumes (paths never created: the mapping only compares
    them); `executor` is legacy.executor."""
    root = "/nonexistent/fem-codec"
    return config_from_dict({
        "node": "node-a", "state_dir": f"{root}/state", "work_root": f"{root}/work",
        "executors": {"docker": {}, "local": {}}, "default_executor": "docker",
        "volumes": {name: {"path": path} for name, path in SITE_VOLUMES.items()},
        "legacy": {"enabled": True, "sandbox_path": f"{root}/sandbox", "executor": executor,
                   "executor_no_image": executor_no_image},
    }, check_paths=False)


SITE = site_for()

TASK_INFO: dict[str, Any] = {
    "_id": "65f0c0ffee00112233445566",
    "name": "Trainer | v2",
    "description": "trains a model; pipes | and 'quotes' and \"double quotes\" inside",
    "image": {"name": "trainer", "repository": "127.0.0.1:5000/fem", "tag": "1"},
    "command": {
        "base": "python train.py --config 'conf/a b.yaml'",
        "args": [
            {"id": "epochs", "type": "int", "default_value": 10, "position": 2, "prefix": "--epochs",
             "separate": True, "required": True},
            {"id": "lr", "type": "float", "default_value": 0.01, "position": 1, "prefix": "--lr",
             "separate": True, "required": False},
            {"id": "verbose", "type": "bool", "default_value": False, "position": 3, "prefix": "-v",
             "separate": True, "required": False},
            {"id": "name", "type": "str", "default_value": "", "position": 4, "prefix": "--name=",
             "separate": False, "required": False},
            {"id": "dataset", "type": "file", "default_value": "data/x|y.csv", "position": 0, "prefix": "",
             "separate": True, "required": True},
        ],
    },
    "source_code": {"url": "https://git.example.org/ml/trainer.git --branch dev"},
    "volumes": [{"container_path": "/data", "host_path": "/srv/data/sets/"}],
    "var_envs": {"OMP_NUM_THREADS": 4, "MODE": "train|eval"},
    "cpus": "4",
    "memory": "8g",
    "gpus": 0,
    "outputs": {"model_dir": "./models", "move_to": "/remote/store"},
}  # fmt: skip


def body(
    action: str = "submit_run",
    tool_id: str = "tool1",
    task_info: Any = TASK_INFO,
    execution: str = '{"execution_id": "ex1", "process_info": []}',
    params: Any = None,
    user_id: str = "user7",
    public_ip: str = "None",
    json_action: str = "{}",
    token: str = TOKEN,
) -> bytes:
    info = task_info if isinstance(task_info, str) else repr(task_info)
    args = (
        repr({"lr": 0.1, "verbose": True} if params is None else params)
        if not isinstance(params, str)
        else params
    )
    return "|".join([action, tool_id, info, execution, args, user_id, public_ip, json_action, token]).encode()


def submit_request(**kwargs: Any) -> LegacyRequest:
    return decode_request(body(**kwargs), MAX)


# --------------------------------------------------------------------------------------------------
# decode_request


def test_decodes_a_realistic_request_with_pipes_inside_values() -> None:
    req = submit_request()
    assert req.action == "submit_run"
    assert req.tool_id == "tool1"
    assert req.task_info == TASK_INFO  # including the pipes in name, description, args and env
    assert req.execution == {"execution_id": "ex1", "process_info": []}
    assert req.execution_id == "ex1"
    assert req.parametric_args == {"lr": 0.1, "verbose": True}
    assert req.user_id == "user7"
    assert req.public_ip is None
    assert req.json_action == "{}"
    assert req.token.get_secret_value() == TOKEN
    assert req.ids() == {
        "action": "submit_run",
        "tool_id": "tool1",
        "user_id": "user7",
        "execution_id": "ex1",
    }


def test_token_never_in_repr_str_or_dumps(caplog: pytest.LogCaptureFixture) -> None:
    req = submit_request()
    assert TOKEN not in repr(req)
    assert TOKEN not in str(req)
    assert TOKEN not in f"{req}"
    assert TOKEN not in req.model_dump_json()
    assert TOKEN not in str(req.model_dump())
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("request %s %r", req, req)
    assert TOKEN not in caplog.text


@pytest.mark.parametrize("action", LEGACY_ACTIONS)
def test_non_submit_actions_accept_empty_fields(action: str) -> None:
    for empty in ("", "{}", "None", "  "):
        req = decode_request(
            body(action=action, task_info=empty, params=empty, execution='{"execution_id": "ex9"}'), MAX
        )
        assert req.task_info == {} and req.parametric_args == {}
        assert req.execution_id == "ex9"


def test_empty_execution_and_trailing_fields() -> None:
    req = decode_request(b"health-check|||||||None|", MAX)
    assert req.action == "health-check"
    assert req.task_info == req.execution == req.parametric_args == {}
    assert req.user_id == "" and req.public_ip is None and req.json_action is None
    assert req.token.get_secret_value() == ""


def test_public_ip_and_json_action() -> None:
    req = submit_request(public_ip="10.0.0.5", json_action='{"a": [1, 2]}')
    assert req.public_ip == "10.0.0.5"
    assert req.json_action == '{"a": [1, 2]}'
    assert submit_request(json_action="None").json_action is None


def test_execution_may_be_a_python_literal_or_json_with_json_semantics() -> None:
    assert submit_request(execution="{'execution_id': 'ex2', 'process_info': ()}").execution == {
        "execution_id": "ex2",
        "process_info": [],
    }
    req = submit_request(
        execution='{"execution_id": "ex3", "ok": true, "n": null, "s": "\\ud83d\\ude00 a\\/b"}'
    )
    assert req.execution == {"execution_id": "ex3", "ok": True, "n": None, "s": "\U0001f600 a/b"}


def test_pipes_and_whitespace_around_fields() -> None:
    info = {"_id": "a|b", "command": {"base": "echo '|'"}}
    req = decode_request(
        f"submit_run|tool1| {info!r} | {{\"execution_id\": \"e|1\"}} | {{'p': '||'}} "
        "|u|None|{}|tok".encode(),
        MAX,
    )
    assert req.task_info == info
    assert req.execution_id == "e|1"
    assert req.parametric_args == {"p": "||"}


@pytest.mark.parametrize(
    "raw",
    [
        b"submit_run|tool1|{}|{}|{}|user|None|token",  # 8 fields
        b"submit_run",
        b"",
        b"run_status|tool1|{}",
    ],
)
def test_too_few_fields(raw: bytes) -> None:
    with pytest.raises(LegacyError, match=r"expected 9 '\|'-separated fields .* but found \d+"):
        decode_request(raw, MAX)


def test_too_many_fields() -> None:
    raw = b'submit_run|tool1|{}|{"execution_id": "e"}|{}|extra|user|None|{}|token'
    with pytest.raises(LegacyError, match="extra '\\|' after parametric_args") as info:
        decode_request(raw, MAX)
    assert info.value.ids["execution_id"] == "e"


def test_nine_pipes_but_unclosed_task_info_is_reported_as_such() -> None:
    raw = b"submit_run|tool1|{'a': 1|{}|{}|user|None|{}|token"
    with pytest.raises(
        LegacyError, match="task_info: found '\\|' but '\\{' opened at offset 0 is not closed"
    ):
        decode_request(raw, MAX)


def test_pipes_inside_values_do_not_count_as_separators() -> None:
    raw = b"submit_run|tool1|{'a': '|'}|{\"execution_id\": \"e\"}|user|None|{}|token"  # no parametric_args
    with pytest.raises(LegacyError, match="no '\\|' follows execution"):
        decode_request(raw, MAX)


def test_unknown_action_keeps_ids_for_the_error_reply() -> None:
    with pytest.raises(LegacyError, match="unknown action 'rm_rf'") as info:
        decode_request(body(action="rm_rf"), MAX)
    assert info.value.ids == {
        "action": "rm_rf",
        "tool_id": "tool1",
        "user_id": "user7",
        "execution_id": "ex1",
    }
    reply = error_reply("rm_rf", info.value.message, **info.value.ids)
    assert reply["status"] == "error" and reply["action"] == "rm_rf" and reply["execution_id"] == "ex1"


def test_non_dict_fields_are_refused() -> None:
    with pytest.raises(LegacyError, match="task_info must be a dict, got list"):
        submit_request(task_info="[1, 2]")
    with pytest.raises(LegacyError, match="parametric_args must be a dict, got str"):
        submit_request(params="'x'")
    with pytest.raises(LegacyError, match="execution must be a dict, got int"):
        submit_request(execution="3")
    with pytest.raises(LegacyError, match="parametric_args keys must be strings"):
        submit_request(params="{1: 2}")


def test_non_utf8_body() -> None:
    raw = body().replace(b"user7", b"user\xff\xfe")
    with pytest.raises(LegacyError, match=r"not valid UTF-8 \(byte offset \d+\)"):
        decode_request(raw, MAX)


def test_body_over_the_limit_is_refused_before_decoding() -> None:
    info = "{'_id': 'x', 'blob': '" + "A" * 10_000_000 + "'}"
    raw = body(task_info=info)
    started = time.monotonic()
    with pytest.raises(
        LegacyError, match=f"request body of {len(raw)} bytes is larger than the limit of {MAX}"
    ):
        decode_request(raw, MAX)
    assert time.monotonic() - started < 0.5


def test_a_large_literal_inside_an_allowed_body_is_bounded_by_the_item_limit() -> None:
    info = "{'_id': 'x', 'l': [" + "1," * 200_000 + "]}"
    with pytest.raises(LegacyError, match="task_info: more than 100000 items"):
        decode_request(body(task_info=info), 10 * MAX)


HOSTILE = [
    ("task_info", "__import__('os').system('touch {marker}')", "call of '__import__' is not allowed"),
    (
        "task_info",
        "{'_id': __import__('os').system('touch {marker}')}",
        "call of '__import__' is not allowed",
    ),
    ("parametric_args", "__import__('os').system('touch {marker}')", "call of '__import__' is not allowed"),
    ("parametric_args", "{'lr': __import__('os').system('touch {marker}')}", "call of '__import__'"),
    ("execution", "__import__('os').system('touch {marker}')", "call of '__import__' is not allowed"),
    ("task_info", "(lambda: open('{marker}', 'w'))()", "lambda is not allowed"),
    ("parametric_args", "{'a': (lambda: 1)()}", "lambda is not allowed"),
    ("task_info", "{'a': os.system}", "attribute access on 'os'"),
    ("task_info", "{'a': ().__class__.__bases__}", "attribute access is not allowed"),
    ("parametric_args", "{'a': x}", "name 'x' is not allowed"),
    ("parametric_args", "{'a': 1+1}", "operator '+' is not allowed"),
    ("parametric_args", "{'a': 2**10**10}", "operator '**' is not allowed"),
    ("task_info", "{'a': [i for i in range(10**9)]}", "name 'i' is not allowed"),
    ("task_info", "{'a': {1, 2}}", "set literal is not allowed"),
    ("task_info", "{'a': f'{{open(1)}}'}", "f-string is not allowed"),
    ("task_info", "{'a': b'x'}", "bytes literal is not allowed"),
    ("task_info", "{'a': " + "9" * 5000 + "}", "integer literal with 5000 digits is too large"),
    ("task_info", "[" * 100_000 + "]" * 100_000, "nesting deeper than 32 levels is not allowed"),
    ("parametric_args", "{'a': " + "[" * 100_000 + "]" * 100_000 + "}", "nesting deeper than 32 levels"),
    ("execution", "[" * 100_000 + "]" * 100_000, "nesting deeper than 32 levels"),
]


@pytest.mark.parametrize(("field", "text", "fragment"), HOSTILE)
def test_hostile_literals_are_refused_and_nothing_runs(field: str, text: str, fragment: str) -> None:
    marker = Path(f"/tmp/pwn-{uuid.uuid4().hex}")
    text = text.replace("{marker}", str(marker))
    kwargs = {"task_info": text} if field == "task_info" else {}
    if field == "parametric_args":
        kwargs["params"] = text
    if field == "execution":
        kwargs["execution"] = text
    started = time.monotonic()
    with pytest.raises(LegacyError) as info:
        decode_request(body(**kwargs), MAX)
    assert time.monotonic() - started < 1.0
    message = str(info.value)
    assert message.startswith(f"{field}: ")
    assert fragment in message
    assert "body offset" in message
    assert not isinstance(info.value.__cause__, RecursionError)
    assert not marker.exists()


def test_error_offsets_point_into_the_body() -> None:
    raw = body(params="{'lr': x}")
    with pytest.raises(LegacyError) as info:
        decode_request(raw, MAX)
    offset = int(str(info.value).rsplit("body offset ", 1)[1].rstrip(")"))
    assert raw.decode()[offset] == "x"
    assert "at offset 7 of parametric_args" in str(info.value)


# --------------------------------------------------------------------------------------------------
# to_task


def test_realistic_request_maps_to_a_valid_task() -> None:
    req = submit_request()
    task, errors = to_task(req, site_for("docker"))
    assert errors == []
    parsed, problems = parse_task(task)
    assert problems == [] and parsed is not None
    assert task["id"] == legacy_task_id("65f0c0ffee00112233445566", "ex1", {"lr": 0.1, "verbose": True})
    assert task["id"].startswith("ex1.65f0c0ffee00112233445566.")
    assert task["execution_id"] == "ex1"
    assert task["user_id"] == "user7"
    assert task["executor"] == "docker"
    assert task["image"] == "127.0.0.1:5000/fem/trainer:1"
    assert task["source"] == {"git": "https://git.example.org/ml/trainer.git", "ref": "dev"}
    assert task["command"] == [
        "python", "train.py", "--config", "conf/a b.yaml",
        "data/x|y.csv",  # position 0, no prefix: default value
        "--lr", "0.1",  # position 1: parametric_args wins over the default
        "--epochs", "10",  # position 2: default value
        "-v",  # position 3: flag set to True by parametric_args
        # position 4: optional with "" default is skipped
    ]  # fmt: skip
    assert task["env"] == {"OMP_NUM_THREADS": "4", "MODE": "train|eval"}
    assert task["volumes"] == [{"name": "datasets", "target": "/data", "mode": "ro"}]
    assert task["resources"] == {"cpus": 4, "gpus": 0, "memory": "8G"}
    assert task["outputs"] == ["models/**"]
    assert task["labels"] == {
        "legacy_tool_id": "tool1",
        "legacy_action": "submit_run",
        "legacy_id": "65f0c0ffee00112233445566",
        "legacy_execution_id": "ex1",
        "legacy_user_id": "user7",
    }
    assert TOKEN not in json.dumps(task)


def test_task_id_is_stable_per_parameters_and_differs_between_them() -> None:
    a1 = to_task(
        submit_request(params={"lr": 0.1, "verbose": True}), SITE)
    a2 = to_task(
        submit_request(params={"verbose": True, "lr": 0.1}), SITE)
    b = to_task(
        submit_request(params={"lr": 0.2, "verbose": True}), SITE)
    c = to_task(
        submit_request(params={"lr": 0.1, "verbose": True}, execution='{"execution_id": "ex2"}'), SITE)
    assert a1[0]["id"] == a2[0]["id"]  # a redelivery is the same task
    assert a1[0]["id"] != b[0]["id"]  # a sweep over lr is several tasks
    assert a1[0]["id"] != c[0]["id"]
    assert a1[0]["id"].rsplit(".", 1)[0] == b[0]["id"].rsplit(".", 1)[0]  # shared prefix exec._id
    assert "executor" not in a1[0]


def test_ids_outside_the_charset_are_mapped_with_a_hash() -> None:
    assert sanitize_id("ex1") == "ex1"
    assert sanitize_id("550e8400-e29b-41d4-a716-446655440000") == "550e8400-e29b-41d4-a716-446655440000"
    mapped = sanitize_id("alice@example.org")
    assert mapped.startswith("alice_example.org-") and len(mapped) == len("alice_example.org-") + 8
    assert sanitize_id("a/b") != sanitize_id("a:b")
    assert sanitize_id("x" * 300) != sanitize_id("x" * 301)
    assert len(sanitize_id("x" * 300)) <= 128
    assert sanitize_id("a.b", allow_dot=False).startswith("a_b-")
    assert sanitize_id("../..").startswith("x")
    with pytest.raises(ValueError):
        sanitize_id("  ")
    long_id = legacy_task_id("i" * 200, "e/" * 200, {"p": 1})
    assert len(long_id) <= 128
    assert parse_task({"id": long_id, "command": ["true"]})[1] == []

    req = submit_request(user_id="bob@lab", execution='{"execution_id": "run 1/2"}', task_info={
        **TASK_INFO, "_id": "tool.v2"})  # fmt: skip
    task, errors = to_task(req, SITE)
    assert errors == []
    assert task["user_id"].startswith("bob_lab-")
    assert task["execution_id"].startswith("run_1_2-")
    assert task["id"].count(".") == 2
    assert task["labels"]["legacy_execution_id"] == "run 1/2"


@pytest.mark.parametrize(
    ("arg", "params", "expected"),
    [
        ({"id": "a", "prefix": "--lr", "separate": True}, {"a": 0.1}, ["--lr", "0.1"]),
        ({"id": "a", "prefix": "--lr", "separate": False}, {"a": 0.1}, ["--lr0.1"]),
        ({"id": "a", "prefix": "--lr=", "separate": False}, {"a": 0.1}, ["--lr=0.1"]),
        ({"id": "a", "prefix": "--lr", "separate": "false"}, {"a": 1e-05}, ["--lr1e-05"]),
        ({"id": "a", "prefix": "--lr"}, {"a": 3}, ["--lr", "3"]),  # separate defaults to true
        ({"id": "a", "prefix": ""}, {"a": "x y"}, ["x y"]),  # never split by a shell
        ({"id": "a", "default_value": 5}, {}, ["5"]),
        ({"id": "a", "default_value": 5}, {"a": None}, []),  # explicitly unset optional
        ({"id": "a", "prefix": "--x"}, {"a": ""}, []),
        ({"id": "a", "prefix": "--x"}, {}, []),
        ({"id": "a", "type": "bool", "prefix": "--v"}, {"a": True}, ["--v"]),
        ({"id": "a", "type": "boolean", "prefix": "--v"}, {"a": "true"}, ["--v"]),
        ({"id": "a", "type": "flag", "prefix": "--v", "default_value": "yes"}, {}, ["--v"]),
        ({"id": "a", "type": "bool", "prefix": "--v"}, {"a": False}, []),
        ({"id": "a", "type": "bool", "prefix": "--v"}, {"a": "False"}, []),
        ({"id": "a", "type": "bool", "prefix": "--v", "separate": False}, {"a": 1}, ["--v"]),
        ({"id": "a", "prefix": "--in"}, {"a": ["x", "y"]}, ["--in", "x", "--in", "y"]),
        ({"id": "a", "prefix": "--in=", "separate": False}, {"a": ("x", "y")}, ["--in=x", "--in=y"]),
        ({"id": "a"}, {"a": ["x", None, "y"]}, ["x", "y"]),
        ({"id": "a", "prefix": "--n"}, {"a": True}, ["--n", "True"]),  # a bool in a non-flag arg is str()'d
    ],
)
def test_argument_rendering(arg: dict[str, Any], params: dict[str, Any], expected: list[str]) -> None:
    info = {**TASK_INFO, "command": {"base": "prog", "args": [arg]}}
    task, errors = to_task(
        submit_request(task_info=info, params=params), SITE)
    assert errors == []
    assert task["command"] == ["prog", *expected]


def test_argument_order_is_position_then_list_order() -> None:
    args = [
        {"id": "c", "default_value": "c", "position": None},
        {"id": "b", "default_value": "b", "position": "2"},
        {"id": "a1", "default_value": "a1", "position": 1},
        {"id": "a2", "default_value": "a2", "position": 1},
        {"id": "z", "default_value": "z", "position": 0},
    ]
    info = {**TASK_INFO, "command": {"base": "prog", "args": args}}
    task, errors = to_task(
        submit_request(task_info=info, params={}), SITE)
    assert errors == []
    assert task["command"] == ["prog", "z", "a1", "a2", "b", "c"]


@pytest.mark.parametrize(
    ("arg", "params", "fragment"),
    [
        ({"id": "data", "required": True}, {}, "required argument has no value"),
        ({"id": "data", "required": "true", "default_value": ""}, {}, "required argument has no value"),
        (
            {"id": "data", "required": True, "type": "bool", "prefix": "-x"},
            {},
            "required argument has no value",
        ),
        ({"id": "v", "type": "bool", "prefix": "-v"}, {"v": "maybe"}, "'maybe' is not a boolean"),
        ({"id": "v", "type": "bool"}, {"v": True}, "flag argument has no prefix"),
        ({"id": "d"}, {"d": {"k": 1}}, "a value of type dict cannot be an argument"),
        ({"id": "d"}, {"d": [[1]]}, "a value of type list cannot be an argument"),
        ({"id": "d", "position": "first"}, {}, "'first' is not a number"),
    ],
)
def test_argument_errors_name_the_argument(
    arg: dict[str, Any], params: dict[str, Any], fragment: str
) -> None:
    info = {**TASK_INFO, "command": {"base": "prog", "args": [arg]}}
    _, errors = to_task(
        submit_request(task_info=info, params=params), SITE)
    assert len(errors) == 1
    assert errors[0].field.startswith("task_info.command.args[0]")
    assert fragment in errors[0].message
    if arg.get("position") is None:
        assert repr(arg["id"]) in errors[0].field


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        ({"name": "trainer", "repository": "127.0.0.1:5000/fem", "tag": "1"}, "127.0.0.1:5000/fem/trainer:1"),
        ({"name": "trainer", "repository": "", "tag": "2.0"}, "trainer:2.0"),
        ({"name": "trainer", "repository": "reg.example.org/"}, "reg.example.org/trainer:latest"),
        ({"name": "trainer", "tag": None}, "trainer:latest"),
        ({"name": "trainer:3"}, "trainer:3"),
        ({"name": "busybox", "repository": "localhost:5000"}, "localhost:5000/busybox:latest"),
        ("docker.io/library/busybox:1", "docker.io/library/busybox:1"),
    ],
)
def test_image_reference(image: Any, expected: str) -> None:
    task, errors = to_task(
        submit_request(task_info={**TASK_INFO, "image": image}), SITE)
    assert errors == []
    assert task["image"] == expected


def test_no_image_and_no_source() -> None:
    info = {k: v for k, v in TASK_INFO.items() if k not in ("image", "source_code", "volumes")}
    task, errors = to_task(submit_request(task_info=info), SITE)
    assert errors == []
    assert "image" not in task and "source" not in task
    assert task["executor"] == "local"  # legacy.executor_no_image


def test_no_image_needs_executor_no_image_and_mounts_nothing() -> None:
    info = {k: v for k, v in TASK_INFO.items() if k not in ("image", "source_code", "volumes")}
    _, errors = to_task(submit_request(task_info=info), site_for(executor_no_image=None))
    assert [e.field for e in errors] == ["task_info.image"]
    assert "legacy.executor_no_image" in errors[0].message and "not set" in errors[0].message
    info["volumes"] = TASK_INFO["volumes"]  # a host path with no container to mount it in
    _, errors = to_task(submit_request(task_info=info), SITE)
    assert [e.field for e in errors] == ["task_info.volumes"]
    assert "names no image" in errors[0].message


def test_an_image_needs_a_container_executor() -> None:
    local = site_for("local")
    _, errors = to_task(submit_request(), local)
    assert [e.field for e in errors] == ["task_info.image"]
    assert "legacy.executor names 'local'" in errors[0].message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://h/r.git", {"git": "https://h/r.git"}),
        ("https://h/r.git --branch main", {"git": "https://h/r.git", "ref": "main"}),
        ("https://h/r.git -b v1.2", {"git": "https://h/r.git", "ref": "v1.2"}),
        ("https://h/r.git --branch=feature/x", {"git": "https://h/r.git", "ref": "feature/x"}),
    ],
)
def test_source_code(url: str, expected: dict[str, str]) -> None:
    task, errors = to_task(
        submit_request(task_info={**TASK_INFO, "source_code": {"url": url}}), SITE)
    assert errors == []
    assert task["source"] == expected


def test_source_code_with_unknown_options_or_bad_ref_is_an_error() -> None:
    _, errors = to_task(
        submit_request(task_info={**TASK_INFO, "source_code": {"url": "https://h/r.git --upload-pack=evil"}}), SITE)
    assert [e.field for e in errors] == ["task_info.source_code.url"]
    _, errors = to_task(
        submit_request(task_info={**TASK_INFO, "source_code": {"url": "https://h/r.git -b --upload-pack=x"}}), SITE)
    assert errors and "ref" in errors[0].message


@pytest.mark.parametrize(
    ("var_envs", "expected"),
    [
        ({"A": 1, "B": "x", "C": None, "D": 1.5, "E": True}, {"A": "1", "B": "x", "D": "1.5", "E": "True"}),
        ([{"name": "A", "value": 2}, "B=x=y", {"name": "C", "value": None}], {"A": "2", "B": "x=y"}),
        ({"J": {"k": [1]}}, {"J": '{"k": [1]}'}),
        (None, None),
        ({}, None),
    ],
)
def test_environment(var_envs: Any, expected: dict[str, str] | None) -> None:
    task, errors = to_task(
        submit_request(task_info={**TASK_INFO, "var_envs": var_envs}), SITE)
    assert errors == []
    assert task.get("env") == expected


def test_bad_env_names_are_reported_by_the_task_model() -> None:
    _, errors = to_task(
        submit_request(task_info={**TASK_INFO, "var_envs": {"BAD-NAME": "x"}}), SITE)
    assert [e.field for e in errors] == ["task.env"]
    _, errors = to_task(
        submit_request(task_info={**TASK_INFO, "var_envs": ["NOEQUALS"]}), SITE)
    assert [e.field for e in errors] == ["task_info.var_envs[0]"]


@pytest.mark.parametrize(
    ("memory", "expected"),
    [
        ("4G", "4G"),
        ("4g", "4G"),
        ("4Gi", "4G"),
        ("4GB", "4G"),
        ("4096M", "4096M"),
        ("512Mi", "512M"),
        (4096, "4096M"),
        ("4096", "4096M"),
        ("1.5G", "1536M"),
        ("0.5M", "512K"),
        ("2T", "2T"),
        ("100K", "100K"),
        (None, None),
        ("", None),
    ],
)
def test_memory(memory: Any, expected: str | None) -> None:
    task, errors = to_task(
        submit_request(task_info={**TASK_INFO, "memory": memory}), SITE)
    assert errors == []
    assert task["resources"].get("memory") == expected


@pytest.mark.parametrize("memory", ["lots", "4B", "-1G", "0", True, "4 X"])
def test_bad_memory(memory: Any) -> None:
    _, errors = to_task(
        submit_request(task_info={**TASK_INFO, "memory": memory}), SITE)
    assert [e.field for e in errors] == ["task_info.memory"]


@pytest.mark.parametrize(
    ("cpus", "gpus", "expected"),
    [
        (2, 1, {"cpus": 2, "gpus": 1}),
        ("8", "2", {"cpus": 8, "gpus": 2}),
        (2.0, None, {"cpus": 2}),
        (0, 0, {"gpus": 0}),
        (None, "", {}),
    ],
)
def test_cpus_and_gpus(cpus: Any, gpus: Any, expected: dict[str, int]) -> None:
    info = {**TASK_INFO, "cpus": cpus, "gpus": gpus, "memory": None}
    task, errors = to_task(submit_request(task_info=info), SITE)
    assert errors == []
    assert task.get("resources", {}) == expected


def test_bad_counts() -> None:
    info = {**TASK_INFO, "cpus": "many", "gpus": 1.5}
    _, errors = to_task(submit_request(task_info=info), SITE)
    assert sorted(e.field for e in errors) == ["task_info.cpus", "task_info.gpus"]


def test_volumes_only_for_configured_site_paths() -> None:
    info = {
        **TASK_INFO,
        "volumes": [
            {"container_path": "/data", "host_path": "/srv/data/sets"},
            {"container_path": "/models", "host_path": "/srv/models/./"},
        ],
    }
    task, errors = to_task(submit_request(task_info=info), SITE)
    assert errors == []
    assert task["volumes"] == [
        {"name": "datasets", "target": "/data", "mode": "ro"},
        {"name": "models", "target": "/models", "mode": "ro"},
    ]
    info["volumes"] = [
        {"container_path": "/etc", "host_path": "/etc"},
        {"container_path": "/x", "host_path": "/srv/data/sets/../../../etc"},
        {"container_path": "/y", "host_path": "/srv/data"},
    ]
    _, errors = to_task(submit_request(task_info=info), SITE)
    outside = ("is not the task's work area, its source checkout, under a path variable of this site "
               "(legacy.variables) or a site volume")
    assert [e.message for e in errors] == [
        f"host_path '/etc' {outside}",
        "host_path '/srv/data/sets/../../../etc' contains '..'",
        f"host_path '/srv/data' {outside}",
    ]
    assert [e.field for e in errors] == [f"task_info.volumes[{i}].host_path" for i in range(3)]


def test_volume_target_is_checked() -> None:
    info = {**TASK_INFO, "volumes": [{"container_path": "relative", "host_path": "/srv/models"}]}
    _, errors = to_task(submit_request(task_info=info), SITE)
    assert [e.field for e in errors] == ["task_info.volumes[0].container_path"]
    assert "must be an absolute path" in errors[0].message


@pytest.mark.parametrize(
    ("model_dir", "expected"),
    [
        ("./models", ["models/**"]),
        ("models/", ["models/**"]),
        ("out/run1", ["out/run1/**"]),
        (".", ["**"]),
        (None, None),
    ],
)
def test_outputs(model_dir: str | None, expected: list[str] | None) -> None:
    info = {**TASK_INFO, "outputs": {"model_dir": model_dir, "move_to": "/somewhere"}}
    task, errors = to_task(submit_request(task_info=info), SITE)
    assert errors == []
    assert task.get("outputs") == expected


@pytest.mark.parametrize("model_dir", ["/abs/models", "../up", "a/../../b"])
def test_outputs_outside_the_work_dir_are_refused(model_dir: str) -> None:
    info = {**TASK_INFO, "outputs": {"model_dir": model_dir}}
    _, errors = to_task(submit_request(task_info=info), SITE)
    assert [e.field for e in errors] == ["task_info.outputs.model_dir"]


def test_missing_ids_and_command() -> None:
    info = {k: v for k, v in TASK_INFO.items() if k not in ("_id", "command")}
    _, errors = to_task(
        submit_request(task_info=info, execution="{}"), SITE)
    assert sorted(e.field for e in errors) == ["execution.execution_id", "task_info._id", "task_info.command"]


def test_unsplittable_base_is_an_error() -> None:
    info = {**TASK_INFO, "command": {"base": "python 'unclosed", "args": []}}
    _, errors = to_task(submit_request(task_info=info), SITE)
    assert [e.field for e in errors] == ["task_info.command.base"]


# --------------------------------------------------------------------------------------------------
# Replies


# A submit_run reply as the frontend builds it (.result.reply_body; its shape is tested in
# test_legacy11_result.py), with non-ASCII text, as a payload for the framing tests.
PAYLOAD = reply_body(
    ReplyIds(execution_id="ex1", tool_id="tool1", task_id="abc", user_id="user7", node="node-a"),
    result={"files": ["models/w.bin", "ünïcödé ✓.txt"], "score": 0.93},
    status="success",
    return_code=0,
    started="2026-11-30T10:00:00.123456Z",
    finished="2026-11-30T10:05:09Z",
    fem=FemFields(task_id="ex1.abc.0123456789ab", native_id="1234"),
)


def test_error_reply() -> None:
    assert error_reply("run_status", "unknown task", execution_id="e1", tool_id="t1") == {
        "execution_id": "e1",
        "tool_id": "t1",
        "action": "run_status",
        "status": "error",
        "message": "unknown task",
    }
    # ids from LegacyError may carry "action"; the explicit one wins and nothing clashes
    assert error_reply("x", "m", action="y", status="ok")["action"] == "x"
    assert error_reply("x", "m", action="y", status="ok")["status"] == "error"


@pytest.mark.parametrize(
    ("iso", "expected"),
    [
        ("2026-11-30T10:00:00.123456Z", "2026-11-30 10:00:00"),
        ("2026-11-30T10:00:00Z", "2026-11-30 10:00:00"),
        ("2026-11-30T11:00:00+01:00", "2026-11-30 10:00:00"),
        ("2026-11-30T10:00:00", "2026-11-30 10:00:00"),
        (None, None),
    ],
)
def test_legacy_time(iso: str | None, expected: str | None) -> None:
    assert legacy_time(iso) == expected


def test_legacy_time_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        legacy_time("yesterday")


@pytest.mark.parametrize("chunk_size", [1, 7, 1024 * 1024])
@pytest.mark.parametrize("payload", [PAYLOAD, {}, {"blob": "x" * 20_000, "n": [1, 2.5, None, True]}])
def test_reply_round_trip(chunk_size: int, payload: dict[str, Any]) -> None:
    messages = encode_reply(payload, chunk_size)
    raw = json.dumps(payload, ensure_ascii=False).encode("utf-8")
    start = json.loads(messages[0])
    expected_total = max(1, -(-len(raw) // chunk_size))
    assert start == {
        "type": "chunk_start",
        "total": expected_total,
        "checksum": hashlib.sha256(raw).hexdigest(),
    }
    assert len(messages) == expected_total + 1
    joined = b""
    for index, message in enumerate(messages[1:]):
        chunk = json.loads(message)
        assert chunk["type"] == "chunk" and chunk["index"] == index
        piece = base64.b64decode(chunk["data"])
        assert len(piece) <= chunk_size
        joined += piece
    assert joined == raw
    assert decode_reply(messages) == payload
    assert decode_reply([messages[0], *reversed(messages[1:])]) == payload  # joined by index
    assert decode_reply([*messages, messages[-1]]) == payload  # an identical duplicate is harmless


def test_empty_payload_is_one_chunk() -> None:
    messages = encode_reply({}, 1024 * 1024)
    assert len(messages) == 2
    assert json.loads(messages[0])["total"] == 1
    assert decode_reply(messages) == {}


def test_decode_reply_detects_corruption() -> None:
    messages = encode_reply(PAYLOAD, 7)
    with pytest.raises(LegacyError, match="missing 1 of"):
        decode_reply(messages[:-1])
    with pytest.raises(LegacyError, match="no chunk_start"):
        decode_reply(messages[1:])
    start = json.loads(messages[0])
    bad_sum = json.dumps({**start, "checksum": "0" * 64}).encode()
    with pytest.raises(LegacyError, match="checksum mismatch"):
        decode_reply([bad_sum, *messages[1:]])
    bad_total = json.dumps({**start, "total": start["total"] - 1}).encode()
    with pytest.raises(LegacyError, match="outside"):
        decode_reply([bad_total, *messages[1:]])
    chunk = json.loads(messages[1])
    altered = json.dumps({**chunk, "data": base64.b64encode(b"XXXXXXX").decode()}).encode()
    with pytest.raises(LegacyError, match="checksum mismatch"):
        decode_reply([messages[0], altered, *messages[2:]])
    with pytest.raises(LegacyError, match="different data"):
        decode_reply([*messages, altered])
    with pytest.raises(LegacyError, match="not valid base64"):
        decode_reply([messages[0], json.dumps({**chunk, "data": "!!"}).encode(), *messages[2:]])
    with pytest.raises(LegacyError, match="not JSON"):
        decode_reply([messages[0], b"garbage"])


def test_encode_reply_rejects_bad_chunk_size() -> None:
    with pytest.raises(ValueError):
        encode_reply({}, 0)
