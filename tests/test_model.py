"""The strict TASK model of PROTOCOL.md: every problem is one error with its field path."""

from __future__ import annotations

from typing import Any

import pytest

from fem_hpc.model import Resources, Task, memory_mib, parse_task, walltime_seconds


def base(**extra: Any) -> dict[str, Any]:
    return {"id": "t1", "command": ["echo", "hi"], **extra}


def errors_of(data: Any) -> dict[str, str]:
    task, errors = parse_task(data)
    assert task is None, f"expected a rejection, got {task!r}"
    assert errors, "a rejected task must list its problems"
    return {e.field: e.message for e in errors}


def assert_one_error(data: Any, field: str, *words: str) -> str:
    errors = errors_of(data)
    assert list(errors) == [field], errors
    for word in words:
        assert word in errors[field], errors
    return errors[field]


# -- structure and types --------------------------------------------------------------------
def test_minimal_task_is_valid_with_defaults() -> None:
    task, errors = parse_task(base())
    assert errors == []
    assert task is not None
    assert task.execution == "t1"
    assert task.user_id == "anonymous"
    assert task.env == {} and task.volumes == [] and task.outputs == [] and task.labels == {}


def test_not_an_object() -> None:
    assert errors_of(["id", "t1"]) == {"task": "must be a JSON object"}


def test_unknown_field() -> None:
    assert_one_error(base(bogus=1), "task.bogus", "unknown field")


def test_unknown_nested_field() -> None:
    assert_one_error(base(resources={"cpu": 2}), "task.resources.cpu", "unknown field")
    assert_one_error(base(volumes=[{"name": "d", "target": "/d", "flags": "x"}]), "task.volumes.0.flags",
                     "unknown field")


def test_missing_required_fields() -> None:
    errors = errors_of({})
    assert set(errors) == {"task.id", "task.command"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"resources": {"cpus": "2"}}, "task.resources.cpus"),
        ({"resources": {"cpus": 2.0}}, "task.resources.cpus"),
        ({"resources": {"cpus": True}}, "task.resources.cpus"),
        ({"resources": {"gpus": "1"}}, "task.resources.gpus"),
        ({"command": "echo hi"}, "task.command"),
        ({"command": ["echo", 1]}, "task.command.1"),
        ({"env": {"A": 1}}, "task.env.A"),
        ({"labels": {"a": 1}}, "task.labels.a"),
        ({"outputs": "out/*"}, "task.outputs"),
        ({"volumes": {"name": "d"}}, "task.volumes"),
        ({"resources": {"memory": 512}}, "task.resources.memory"),
    ],
)
def test_wrong_types_are_not_coerced(extra: dict[str, Any], field: str) -> None:
    assert_one_error(base(**extra), field)


def test_empty_command() -> None:
    assert "task.command" in errors_of(base(command=[]))
    assert_one_error(base(command=[""]), "task.command", "command[0]")


def test_several_problems_reported_together() -> None:
    errors = errors_of({"id": "../x", "command": "ls", "bogus": 1, "resources": {"memory": "4GB"}})
    assert set(errors) == {"task.id", "task.command", "task.bogus", "task.resources.memory"}


# -- identifiers ----------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["../x", "a/b", "", "a" * 129, "-x", ".x", "_x", "a b", "a\nb", "é"])
@pytest.mark.parametrize("field", ["id", "execution_id", "user_id"])
def test_ids_outside_the_charset(field: str, bad: str) -> None:
    data = base()
    data[field] = bad
    message = assert_one_error(data, f"task.{field}")
    assert repr(bad) in message or "match" in message


@pytest.mark.parametrize("good", ["a", "A-1", "x.y_z-0", "9" * 128])
def test_ids_inside_the_charset(good: str) -> None:
    task, errors = parse_task(base(id=good, execution_id=good, user_id=good))
    assert errors == [] and task is not None and task.id == good


def test_executor_and_queue_names_checked() -> None:
    assert_one_error(base(executor="../local"), "task.executor")
    assert_one_error(base(queue="a b"), "task.queue")
    assert_one_error(base(account="x;y"), "task.account")
    assert_one_error(base(image="-rm"), "task.image")


# -- volumes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["data", "./data", "", "/a/../b", "/..", "/a/b/..", "/x:y"])
def test_bad_volume_targets(target: str) -> None:
    assert_one_error(base(volumes=[{"name": "d", "target": target}]), "task.volumes.0.target")


def test_volume_mode_and_defaults() -> None:
    assert_one_error(base(volumes=[{"name": "d", "target": "/d", "mode": "wr"}]), "task.volumes.0.mode")
    task, _ = parse_task(base(volumes=[{"name": "d", "target": "/data/in"}]))
    assert task is not None and task.volumes[0].mode == "ro"


def test_volume_name_checked_and_targets_unique() -> None:
    assert_one_error(base(volumes=[{"name": "../etc", "target": "/d"}]), "task.volumes.0.name")
    errors = errors_of(base(volumes=[{"name": "a", "target": "/d"}, {"name": "b", "target": "/d"}]))
    assert any("target" in m for m in errors.values())


# -- env -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["1A", "A-B", "", "A B", "A=B", "Ä", "A\n"])
def test_bad_env_names(name: str) -> None:
    message = assert_one_error(base(env={name: "x"}), "task.env")
    assert repr(name) in message


def test_good_env_names() -> None:
    task, errors = parse_task(base(env={"_A": "1", "a9": "", "PATH_X": "$(x)"}))
    assert errors == [] and task is not None and task.env["PATH_X"] == "$(x)"


# -- resources -------------------------------------------------------------------------------
@pytest.mark.parametrize("memory", ["512", "4GB", "0M", "-1G", "1.5G", "G", "512m", " 512M", "512M ", "512M\n"])
def test_malformed_memory(memory: str) -> None:
    assert_one_error(base(resources={"memory": memory}), "task.resources.memory", "512M")


@pytest.mark.parametrize(
    ("memory", "mib"), [("512M", 512), ("4G", 4096), ("1T", 1024 * 1024), ("2048K", 2), ("1K", 1), ("1M", 1)]
)
def test_memory_mib(memory: str, mib: int) -> None:
    assert memory_mib(memory) == mib
    task, errors = parse_task(base(resources={"memory": memory}))
    assert errors == [] and task is not None and task.resources.memory_mib == mib


@pytest.mark.parametrize("walltime", ["1:00", "00:60:00", "00:00:60", "60", "1-00:00", "x-01:00:00", "00:00:00",
                                      "0-00:00:00", "1:2:3", "-1:00:00", "01:00:00 ", "01:00:00\n"])
def test_malformed_walltime(walltime: str) -> None:
    assert_one_error(base(resources={"walltime": walltime}), "task.resources.walltime")


@pytest.mark.parametrize(
    ("walltime", "seconds"),
    [("00:00:01", 1), ("01:00:00", 3600), ("1:00:00", 3600), ("00:59:59", 3599), ("100:00:00", 360000),
     ("1-00:00:00", 86400), ("2-03:04:05", 2 * 86400 + 3 * 3600 + 4 * 60 + 5)],
)
def test_walltime_seconds(walltime: str, seconds: int) -> None:
    assert walltime_seconds(walltime) == seconds
    task, errors = parse_task(base(resources={"walltime": walltime}))
    assert errors == [] and task is not None and task.resources.walltime_seconds == seconds


def test_resource_bounds() -> None:
    assert_one_error(base(resources={"cpus": 0}), "task.resources.cpus")
    assert_one_error(base(resources={"nodes": 0}), "task.resources.nodes")
    assert_one_error(base(resources={"gpus": -1}), "task.resources.gpus")
    assert Resources().memory_mib is None and Resources().walltime_seconds is None


# -- source ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("source", "field"),
    [
        ({"git": ""}, "task.source.git"),
        ({"ref": "main"}, "task.source.git"),
        ({"git": "file:///r", "ref": "-upload-pack=evil"}, "task.source.ref"),
        ({"git": "file:///r", "ref": ""}, "task.source.ref"),
        ({"git": "file:///r", "ref": "a b"}, "task.source.ref"),
        ({"git": "file:///r", "ref": "HEAD~1"}, "task.source.ref"),
        ({"git": "file:///r", "commit": "xyz1234"}, "task.source.commit"),
        ({"git": "file:///r", "commit": "abc12"}, "task.source.commit"),
        ({"git": "file:///r", "path": "/etc"}, "task.source.path"),
        ({"git": "file:///r", "path": "a/../../b"}, "task.source.path"),
        ({"git": "file:///r", "path": ""}, "task.source.path"),
        ({"git": "file:///r", "extra": 1}, "task.source.extra"),
    ],
)
def test_bad_source(source: dict[str, Any], field: str) -> None:
    assert_one_error(base(source=source), field)


def test_good_source() -> None:
    src = {"git": "file:///r", "ref": "release/1.0", "commit": "0123abcd", "path": "sub/dir"}
    task, errors = parse_task(base(source=src))
    assert errors == [] and task is not None and task.source is not None
    assert task.source.model_dump() == src


@pytest.mark.parametrize("pattern", ["/etc/passwd", "../x", "a/../../b", ""])
def test_bad_output_patterns(pattern: str) -> None:
    assert_one_error(base(outputs=[pattern]), "task.outputs")


# -- round trip ------------------------------------------------------------------------------
FULL_TASK: dict[str, Any] = {
    "id": "t-1.a_b",
    "execution_id": "exec-1",
    "user_id": "alice",
    "executor": "local",
    "image": "127.0.0.1:5000/fem/solver:1.2@sha256:" + "a" * 64,
    "source": {"git": "file:///srv/repo.git", "ref": "main", "commit": "a" * 40, "path": "src"},
    "command": ["python3", "-c", "print('$(x)')", ""],
    "env": {"A": "1", "_B": "two words"},
    "volumes": [{"kind": "volume", "name": "cardio", "subpath": None, "target": "/data/cardio", "mode": "ro"},
                {"kind": "volume", "name": "scratch", "subpath": "run-1", "target": "/scratch", "mode": "rw"},
                {"kind": "variable", "name": "HOST_FEMC_PATH", "subpath": "config/certs", "target": "/certs",
                 "mode": "ro"},
                {"kind": "workdir", "name": None, "subpath": None, "target": "/sandbox", "mode": "rw"},
                {"kind": "checkout", "name": None, "subpath": None, "target": "/code", "mode": "rw"}],
    "ports": [{"host_port": 4433, "container_port": 4433, "protocol": "tcp"}],
    "resources": {"cpus": 2, "memory": "4G", "gpus": 0, "nodes": 1, "walltime": "1-02:03:04"},
    "queue": "debug",
    "account": "proj-1",
    "outputs": ["out/*.txt", "results"],
    "labels": {"run": "42", "who": "orchestrator"},
}


def test_full_task_round_trips() -> None:
    task, errors = parse_task(FULL_TASK)
    assert errors == [] and task is not None
    assert task.model_dump() == FULL_TASK
    again = Task.model_validate_json(task.model_dump_json())
    assert again == task
    assert task.execution == "exec-1"
    assert task.resources.memory_mib == 4096
    assert task.resources.walltime_seconds == 86400 + 2 * 3600 + 3 * 60 + 4


def test_task_is_frozen() -> None:
    task, _ = parse_task(base())
    assert task is not None
    with pytest.raises(Exception):  # noqa: B017 - pydantic's frozen-instance error
        task.id = "other"  # type: ignore[misc]
