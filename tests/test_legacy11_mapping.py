"""The real flcore-server document mapped to the v1 TASK fem-hpc runs, on a real file system (the
site's dirs in tmp_path); the submit_run reply built from a task's whole stdout; the 2024 form."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from femkit import flcore_document, flcore_image, flcore_literal

from fem_hpc.config import SiteConfig, config_from_dict
from fem_hpc.journal import Route
from fem_hpc.lifecycle.ports import TaskView
from fem_hpc.model import OutputsInfo, ResultEvent, State, Task, parse_task
from fem_hpc.protocols.legacy.codec import colon_form, decode_request
from fem_hpc.protocols.legacy.frontend import read_stdout, submit_payload
from fem_hpc.protocols.legacy.mapping import legacy_workdir, to_task
from fem_hpc.protocols.legacy.result import TAIL_CHARS

USER = "0e8f509e-3d43-4346-96da-aa744e7e8a75"
EXECUTION = "1e7b5310-7a2e-4f89-a4f7-320a89f67217"


def request(task_info: str | None = None, params: str = "{}", user: str = USER):
    execution = json.dumps({"execution_id": EXECUTION, "process_info": []})
    body = "|".join(["submit_run", "flcore", task_info or flcore_literal(), execution, params, user, "None",
                     "submit_run", "tok"])
    return decode_request(body.encode(), 1024 * 1024)


def make_site(tmp: Path, executor: str = "docker", **docker: Any) -> SiteConfig:
    (tmp / "femc" / "config" / "rabbitmq-certificates").mkdir(parents=True, exist_ok=True)
    return config_from_dict({
        "node": "UB2", "state_dir": str(tmp / "state"), "work_root": str(tmp / "work"),
        "executors": {"local": {}, "docker": {"network": "fl-net", **docker}, "slurm": {}},
        "policy": {"ports": [4433]},
        "legacy": {"enabled": True, "sandbox_path": str(tmp / "sandbox"), "executor": executor,
                   "variables": {"HOST_FEMC_PATH": str(tmp / "femc"),
                                 "FLOWER_SSL_CACERT": {"value": "/app/config/certificates/rootCA_cert.pem",
                                                       "mode": "none"},
                                 "FLOWER_SSL_SERVER_CERT": {"value": "/c/server.pem", "mode": "none"},
                                 "FLOWER_SSL_SERVER_KEY": {"value": "/c/server.key", "mode": "none"}}}})


def test_the_real_document_maps_to_a_task(tmp_path: Path) -> None:
    site = make_site(tmp_path)
    task, errors = to_task(request(), site)
    assert errors == []
    doc = flcore_document()
    assert task["executor"] == "docker"
    assert task["image"] == flcore_image()  # as asked: the site's image_mirrors apply where it is pulled
    assert task["source"] == {"git": doc["source_code"]["url"].split()[0], "ref": "production"}
    assert task["command"] == ["python3", "server_cmd.py", "--num_clients", "1", "--num_rounds", "5",
                               "--model", "random_forest", "--dataset", "random_forest",
                               "--sandbox_path", "/sandbox/", "--certs_path", "/app/config/certificates"]
    assert task["env"] == {"FLOWER_CENTRAL_SERVER_IP": "0.0.0.0", "FLOWER_CENTRAL_SERVER_PORT": "4433",
                           "FLOWER_SSL_CACERT": "/app/config/certificates/rootCA_cert.pem", "NODE_NAME": "UB2",
                           "FLOWER_SSL_SERVER_CERT": "/c/server.pem", "FLOWER_SSL_SERVER_KEY": "/c/server.key"}
    # the three host paths, each as what it names: the checkout, the node's PKI, the work area
    assert task["volumes"] == [
        {"kind": "checkout", "target": "/flcore", "mode": "rw"},
        {"kind": "variable", "name": "HOST_FEMC_PATH", "subpath": "config/rabbitmq-certificates",
         "target": "/app/config/certificates", "mode": "ro"},
        {"kind": "workdir", "target": "/sandbox", "mode": "rw"},
    ]
    assert task["ports"] == [{"host_port": 4433, "container_port": 4433, "protocol": "tcp"}]
    assert "resources" not in task and "outputs" not in task  # '' means not set
    assert "legacy_ports_note" not in task["labels"]
    parsed, problems = parse_task(task)
    assert problems == [] and parsed is not None
    assert legacy_workdir(site, request()) == (tmp_path / "sandbox").resolve() / USER / EXECUTION


def test_on_slurm_the_ports_are_a_note_not_a_publication(tmp_path: Path) -> None:
    task, errors = to_task(request(), make_site(tmp_path, "slurm"))
    assert errors == [] and task["executor"] == "slurm" and "ports" not in task
    assert task["labels"]["legacy_ports_note"].startswith("ports 4433/tcp were not published: the slurm executor")
    task, errors = to_task(request(), make_site(tmp_path, network="host", allow_host_network=True))
    assert errors == [] and "ports" not in task and "legacy_ports_note" not in task["labels"]  # 4433 is 4433


def test_parameters_and_placeholders_in_defaults(tmp_path: Path) -> None:
    doc = flcore_document()
    doc["command"]["args"].append({"id": "node_name", "type": "str", "default_value": "%%node_name%%",
                                   "position": 7, "prefix": "--node_name", "separate": True, "required": True})
    doc["command"]["args"].append({"id": "run", "type": "str", "default_value": "%%execution_id%%/%%task_id%%",
                                   "position": 8, "prefix": "--run", "separate": True, "required": True})
    task, errors = to_task(request(repr(doc), params="{'num_rounds': 3, 'model': 'cox-%%user_id%%'}"),
                           make_site(tmp_path))
    assert errors == []
    argv = task["command"]
    assert argv[argv.index("--num_rounds") + 1] == "3"
    assert argv[argv.index("--model") + 1] == f"cox-{USER}"
    assert argv[argv.index("--node_name") + 1] == "UB2"
    assert argv[argv.index("--run") + 1] == f"{EXECUTION}/flcore-server"
    # a user's parameter never reads a site variable: '$...' stays text
    task, errors = to_task(request(params="{'model': '$HOST_FEMC_PATH'}"), make_site(tmp_path))
    assert errors == [] and task["command"][task["command"].index("--model") + 1] == "$HOST_FEMC_PATH"


def test_a_document_without_a_checkout_mount_keeps_the_source_in_the_work_area(tmp_path: Path) -> None:
    doc = flcore_document()
    doc["volumes"] = doc["volumes"][1:]
    task, errors = to_task(request(repr(doc)), make_site(tmp_path))
    assert errors == [] and [v["kind"] for v in task["volumes"]] == ["variable", "workdir"]


# -- the reply -----------------------------------------------------------------------------------------
def view_of(tmp_path: Path, stdout: bytes) -> TaskView:
    task, errors = to_task(request(), make_site(tmp_path))
    assert errors == []
    workdir = tmp_path / "wd"
    (workdir / ".fem").mkdir(parents=True)
    (workdir / ".fem" / "stdout").write_bytes(stdout)
    return TaskView(Task.model_validate(task), Route("legacy", "q", "c"), workdir, native_id="4711")


def result_event(state: State = State.COMPLETED, exit_code: int | None = 0) -> ResultEvent:
    return ResultEvent(node="UB2", task_id="t", seq=9, state=state, exit_code=exit_code,
                       started="2025-03-23T09:40:56Z", finished="2025-03-23T09:41:12.5Z",
                       outputs=OutputsInfo(size=10, sha256="0" * 64, chunks=1), stdout_tail="(cut)")


def test_the_reply_reads_the_whole_stdout_not_the_events_tail(tmp_path: Path) -> None:
    big = {"history": [{"round": i, "loss": 1 / (i + 1)} for i in range(400)]}
    text = json.dumps(big)
    assert len(text) > TAIL_CHARS  # the result event's tail would cut it
    view = view_of(tmp_path, b"INFO starting\n" + text.encode() + b"\n")
    reply = submit_payload("UB2", view, result_event(), None)
    assert reply["result"] == big
    assert (reply["status"], reply["return_code"], reply["task_id"], reply["user_id"], reply["execution_id"]) == \
        ("success", 0, "flcore-server", USER, EXECUTION)
    assert (reply["starting_time"], reply["finish_time"]) == ("2025-03-23 09:40:56", "2025-03-23 09:41:12")
    assert reply["fem_hpc"]["native_id"] == "4711" and reply["fem_hpc"]["ports"] == ["4433->4433/tcp"]


def test_a_task_that_did_not_complete_is_an_error_whatever_its_exit_code(tmp_path: Path) -> None:
    view = view_of(tmp_path, b'{"ok": true}\n')
    failed = submit_payload("UB2", view, result_event(State.FAILED, 0), "stage-out failed: too big")
    assert failed["status"] == "error" and failed["fem_hpc"]["message"] == "stage-out failed: too big"
    submitted = submit_payload("UB2", view, None, None)
    assert (submitted["status"], submitted["return_code"], submitted["result"]) == ("success", None, {})
    assert submitted["fem_hpc"]["state"] == "SUBMITTED"


def test_read_stdout_is_bounded(tmp_path: Path) -> None:
    (tmp_path / ".fem").mkdir()
    (tmp_path / ".fem" / "stdout").write_bytes(b"a" * 1000 + b"END")
    assert read_stdout(tmp_path, limit=5) == "aaEND"
    assert read_stdout(tmp_path / "never-ran") == ""


# -- the 2024 form -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("body", "ids"), [
    (b"flcore:flcore-server:1e7b5310-7a2e-4f89-a4f7-320a89f67217",
     {"tool_id": "flcore", "task_id": "flcore-server", "execution_id": "1e7b5310-7a2e-4f89-a4f7-320a89f67217"}),
    (b"  health-check:health-check:e1\n", {"tool_id": "health-check", "task_id": "health-check", "execution_id": "e1"}),
    (b"a:b", None), (b"a:b:c:d", None), (b"submit_run|a:b:c|{}|{}|{}|u|None|{}|t", None), (b"a b:c:d", None),
    (b"\xff:b:c", None),
])
def test_the_2024_colon_form_is_recognised(body: bytes, ids: dict[str, str] | None) -> None:
    assert colon_form(body) == ids


def test_a_source_given_as_a_plain_url_is_mounted_too(tmp_path: Path) -> None:
    doc = flcore_document()
    doc["source_code"] = doc["source_code"]["url"]  # the short form the mapping also reads
    task, errors = to_task(request(repr(doc)), make_site(tmp_path))
    assert errors == [] and task["volumes"][0] == {"kind": "checkout", "target": "/flcore", "mode": "rw"}
    doc["source_code"] = ""  # no source: <sandbox>/flcore is then just another path in the sandbox
    _, errors = to_task(request(repr(doc)), make_site(tmp_path))
    assert [e.field for e in errors] == ["task_info.volumes[0].host_path"]
    assert "inside the sandbox" in errors[0].message
