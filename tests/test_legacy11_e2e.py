"""The real FEM orchestrator's documents, byte for byte, through the real `fem-hpc serve` and RabbitMQ
(issue 11; ../shared/FEM-REAL.md).

The flcore-server document (tests/fixtures/fem/flcore-server.task.py) is sent as the text of the
`task_info` field exactly as recorded. The site makes it runnable the way a real node would: its image
comes from the local registry through an `image_mirrors` rule for the document's registry, its source
from a `git daemon` on loopback through a `git.mirrors` rule for the document's repository URL (a
stand-in `flcore.git` whose `production` branch holds a server_cmd.py that prints JSON and writes
log_server.txt into /sandbox), and the variables it names are declared in `legacy.variables`. Every
name of the original (registry, repository host) is read from the fixture, never written here.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import services
from brokerkit import LegacyOrchestrator, ServeProcess, unique_node
from femkit import REPO_NAME, flcore_document, flcore_image, flcore_literal, flcore_mirrors, flcore_repository
from gitkit import git_daemon

from fem_hpc.staging.images import parse_image_ref

pytestmark = [pytest.mark.rabbitmq, pytest.mark.docker, pytest.mark.slow]

USER = "0e8f509e-3d43-4346-96da-aa744e7e8a75"  # ids shaped like the real ones (uuids)
TIME = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d$")
CERTS = ("rootCA_cert.pem", "{node}_client_cert.pem", "{node}_client_key.pem")


def submit_body(task_info: str, execution_id: str, *, tool: str = "flcore", user: str = USER,
                params: str = "{}") -> str:
    """A 2025-form submit_run as the orchestrator sends it (public_ip None, json_action submit_run)."""
    execution = json.dumps({"execution_id": execution_id, "process_info": []})
    return "|".join(["submit_run", tool, task_info, execution, params, user, "None", "submit_run", "tok-SECRET-123"])


def other_body(action: str, execution_id: str, *, user: str = USER) -> str:
    execution = json.dumps({"execution_id": execution_id, "process_info": []})
    return "|".join([action, "flcore", "{'_id': 'flcore-server'}", execution, "{}", user, "None", action,
                     "tok-SECRET-123"])


def document_url_prefix() -> str:
    """The directory part of the document's source URL (its flags dropped), e.g. 'https://host/org/'."""
    url = flcore_document()["source_code"]["url"].split()[0]
    return url.rsplit("/", 1)[0] + "/"


@pytest.fixture
def docker_network() -> Iterator[str]:
    """A bridge network of this test's own: the test bed's dockerd runs with --bridge=none, so there is
    no default bridge to publish ports from; a user-defined one works (docker-proxy on loopback)."""
    services.require("docker")
    name = f"fem-test-{uuid.uuid4().hex[:10]}"
    subprocess.run(["docker", "network", "create", name], check=True, capture_output=True, timeout=60)
    try:
        yield name
    finally:
        subprocess.run(["docker", "network", "rm", name], capture_output=True, timeout=60)


@pytest.fixture
def flcore_git(tmp_path: Path) -> Iterator[str]:
    """The stand-in flcore repository served by a real git daemon; yields git://127.0.0.1:PORT."""
    base = tmp_path / "git"
    base.mkdir()
    flcore_repository(base)
    with git_daemon(base) as url:
        yield url


class Node:
    """A fem-hpc node set up for the document: its sandbox, the FEM client's PKI dir, the service."""

    def __init__(self, tmp: Path, git_url: str, executors: dict[str, Any], executor: str,
                 extra: dict[str, Any] | None = None, env: dict[str, str] | None = None):
        self.name = unique_node("fem")
        self.tmp = tmp
        self.sandbox = tmp / "sandbox"
        self.sandbox.mkdir()
        self.femc = tmp / "fem-client"
        certs = self.femc / "config" / "rabbitmq-certificates"
        certs.mkdir(parents=True)
        self.certs = sorted(c.format(node=self.name) for c in CERTS)
        for cert in self.certs:
            (certs / cert).write_text(f"stand-in {cert}\n")
        registry = parse_image_ref(flcore_image()).registry
        config: dict[str, Any] = {
            "executors": {"local": {}, **executors},
            "policy": {"images": [f"{registry}/fl/*"], "git": [f"{document_url_prefix()}*"], "ports": [4433],
                       "max_resources": {"cpus": 4, "memory": "8G"}},
            "image_mirrors": {key: {"mirror": rule.mirror} for key, rule in flcore_mirrors().items()},
            "git": {"mirrors": {document_url_prefix(): f"{git_url}/"}},
            "legacy": {"enabled": True, "sandbox_path": str(self.sandbox), "executor": executor,
                       "executor_no_image": "local", "variables": {
                           "HOST_FEMC_PATH": str(self.femc),
                           "FLOWER_SSL_CACERT": {"value": "/app/config/certificates/rootCA_cert.pem", "mode": "none"},
                           "FLOWER_SSL_SERVER_CERT": {"value": "/app/config/certificates/server.pem", "mode": "none"},
                           "FLOWER_SSL_SERVER_KEY": {"value": "/app/config/certificates/server.key", "mode": "none"},
                       }},
            **(extra or {}),
        }
        self.serve = ServeProcess(tmp, self.name, config, env=env)

    def __enter__(self) -> Node:
        self.serve.start()
        self.orch = LegacyOrchestrator(self.name)
        return self

    def __exit__(self, *exc: object) -> None:
        self.orch.close()
        self.serve.stop()

    def containers(self) -> list[str]:
        out = subprocess.run(["docker", "ps", "-aq", "--filter", f"label=fem.node={self.name}"],
                             capture_output=True, text=True, timeout=60).stdout
        return out.split()


def expected_result(node: str, certs: list[str]) -> dict[str, Any]:
    """What the stand-in server_cmd.py prints for the document's defaults (femkit.SERVER_CMD), on `node`."""
    doc = flcore_document()
    defaults = {arg["id"]: arg["default_value"] for arg in doc["command"]["args"]}
    return {"server": "flcore stand-in", "num_clients": defaults["num_clients"], "num_rounds": defaults["num_rounds"],
            "model": defaults["model"], "dataset": defaults["dataset"], "node_name": node,
            "listen": f"{doc['var_envs']['FLOWER_CENTRAL_SERVER_IP']}:{doc['var_envs']['FLOWER_CENTRAL_SERVER_PORT']}",
            "cwd": "/flcore", "log": "log_server.txt", "certificates": certs}


def run_the_document(node: Node) -> dict[str, Any]:
    """Send the recorded document byte for byte, check the reply and send_files; return the reply."""
    execution = str(uuid.uuid4())
    reply = node.orch.call(submit_body(flcore_literal(), execution), timeout=300)
    assert reply["status"] == "success", reply
    assert reply["return_code"] == 0
    result = dict(reply["result"])
    python = result.pop("python")
    assert re.fullmatch(r"3\.\d+\.\d+", python), python  # the image's python, not the service's
    assert result == expected_result(node.name, node.certs)
    # the record the orchestrator stores (FEM-REAL.md): its keys, the legacy ids and times
    assert (reply["execution_id"], reply["action"], reply["tool_id"], reply["task_id"], reply["user_id"],
            reply["node"]) == (execution, "submit_run", "flcore", "flcore-server", USER, node.name)
    assert TIME.match(reply["starting_time"]) and TIME.match(reply["finish_time"])
    assert reply["starting_time"] <= reply["finish_time"]
    assert reply["fem_hpc"]["state"] == "COMPLETED"

    files = node.orch.call(other_body("send_files", execution))
    assert files["status"] == "success", files
    got = {f["path"]: base64.b64decode(f["data"]).decode() for f in files["files"]}
    rounds = flcore_document()["command"]["args"][1]["default_value"]
    assert list(got) == ["log_server.txt"]  # the work area only: not the source, not fem-hpc's own files
    assert got["log_server.txt"].splitlines() == [f"round {r}/{rounds}: model random_forest on random_forest"
                                                  for r in range(1, rounds + 1)]
    workdir = node.sandbox / USER / execution
    assert sorted(p.name for p in workdir.iterdir()) == [".fem", "log_server.txt"]
    assert (workdir / ".fem" / "source" / "server_cmd.py").is_file()  # the checkout lives beside, in .fem
    assert not (node.sandbox / REPO_NAME).exists()  # nothing is cloned into the shared sandbox
    assert "tok-SECRET-123" not in node.serve.log()
    return {**reply, "result": {**reply["result"], "node_name": None}}


def test_the_flcore_document_on_docker(tmp_path: Path, flcore_git: str, docker_network: str) -> None:
    services.require("registry")
    services.require("flcore-image")
    executors = {"docker": {"network": docker_network, "publish_host": "127.0.0.1", "stop_grace_seconds": 2}}
    with Node(tmp_path, flcore_git, executors, "docker") as node:
        reply = run_the_document(node)
        # port_mappings [{'host_port': 4433, 'container_port': 4433}], inside policy.ports: published
        assert reply["fem_hpc"]["ports"] == ["4433->4433/tcp"] and "ports_note" not in reply["fem_hpc"]
        assert node.containers() == []  # removed once its exit code was read


def test_the_flcore_document_on_slurm_with_docker_in_the_job(tmp_path: Path, flcore_git: str) -> None:
    services.require("slurm")
    services.require("registry")
    services.require("flcore-image")
    executors = {"slurm": {"partition": services.SLURM_PARTITION, "poll": {"min_seconds": 1},
                           "container": {"runtime": "docker"}}}
    with Node(tmp_path, flcore_git, executors, "slurm") as node:
        reply = run_the_document(node)
        assert reply["fem_hpc"]["native_id"].isdigit()  # a Slurm job id
        # a batch job's container publishes nothing, and the reply says so instead of pretending
        assert "ports" not in reply["fem_hpc"]
        assert "4433/tcp were not published: the slurm executor cannot publish ports" in reply["fem_hpc"]["ports_note"]


# -- the hostile list: each refused with the field and the reason, nothing mounted, nothing run -------
def _edit(change) -> str:
    doc = flcore_document()
    change(doc)
    return repr(doc)  # a Python literal, as the orchestrator sends documents


def _set_volume(index: int, host_path: str):
    return lambda doc: doc["volumes"][index].update(host_path=host_path)


# (document, user_id, field, what the message says); volumes: [0] $SANDBOX_PATH/flcore, [1] the
# certificates under $HOST_FEMC_PATH, [2] $SANDBOX_PATH/%%user_id%%/%%execution_id%%
HOSTILE = [
    ("$HOME", _edit(lambda d: d["var_envs"].update(NODE_NAME="$HOME")), USER,
     "task_info.var_envs.NODE_NAME", "$HOME is not a variable this site declares"),
    ("$FEM_HPC_BROKER_URL", _edit(_set_volume(1, "$FEM_HPC_BROKER_URL/x")), USER,
     "task_info.volumes[1].host_path", "$FEM_HPC_BROKER_URL is not a variable this site declares"),
    ("%%../../etc%%", _edit(_set_volume(2, "$SANDBOX_PATH/%%../../etc%%")), USER,
     "task_info.volumes[2].host_path", "unknown placeholder '%%../../etc%%'"),
    ("%%user_id%% = ../x", flcore_literal(), "../x",
     "task_info.volumes[2].host_path", "%%user_id%% would be '../x'"),
    ("/etc", _edit(_set_volume(1, "/etc")), USER,
     "task_info.volumes[1].host_path", "host_path '/etc' is not the task's work area"),
    ("$SANDBOX_PATH/../..", _edit(_set_volume(0, "$SANDBOX_PATH/../..")), USER,
     "task_info.volumes[0].host_path", "contains '..'"),
    ("a parameter %%../../etc%%", flcore_literal(), USER,
     "parametric_args.model", "unknown placeholder '%%../../etc%%'"),
    ("host port outside policy.ports", _edit(lambda d: d["port_mappings"][0].update(host_port=22)), USER,
     "task_info.port_mappings", "host port 22 is not allowed by site policy"),
]


def test_hostile_documents_are_refused_and_nothing_runs(tmp_path: Path, flcore_git: str) -> None:
    # FEM_HPC_BROKER_URL is set in the service's environment (it is the broker's URL): a document
    # must not be able to read it, nor anything else of the service's environment
    from brokerkit import BROKER_URL
    env = {"FEM_HPC_BROKER_URL": BROKER_URL}
    with Node(tmp_path, flcore_git, {"docker": {}}, "docker", env=env) as node:
        executions = []
        for name, literal, user, field, fragment in HOSTILE:
            execution = str(uuid.uuid4())
            executions.append((execution, user))
            params = "{'model': '%%../../etc%%'}" if name.startswith("a parameter") else "{}"
            reply = node.orch.call(submit_body(literal, execution, user=user, params=params))
            assert reply["status"] == "error", (name, reply)
            assert [e["field"] for e in reply["errors"]] == [field], (name, reply["errors"])
            assert fragment in reply["errors"][0]["message"], (name, reply["errors"][0]["message"])
            assert f"{field}: " in reply["message"]
        # a symlink planted in the sandbox, to / : as the work area, and as the source checkout
        for planted, field in ((node.sandbox / USER / "planted", "task_info.volumes[2].host_path"),
                               (node.sandbox / REPO_NAME, "task_info.volumes[0].host_path")):
            planted.parent.mkdir(parents=True, exist_ok=True)
            planted.symlink_to("/")
            execution = "planted" if planted.name == "planted" else str(uuid.uuid4())
            executions.append((execution, USER))
            reply = node.orch.call(submit_body(flcore_literal(), execution))
            assert reply["status"] == "error", reply
            assert [e["field"] for e in reply["errors"]] == [field], reply["errors"]
            assert "symlink" in reply["errors"][0]["message"]
            planted.unlink()
        # nothing was journalled, no work dir made, no container created
        for execution, user in executions:
            status = node.orch.call(other_body("run_status", execution, user=user))
            assert status["status"] == "error" and status["message"] == "no such task on this node"
        assert sorted(p.name for p in node.sandbox.rglob("*")) == [USER]  # only the planted link's dir
        assert node.containers() == []
        assert BROKER_URL not in node.serve.log()


# -- the health-check tool -------------------------------------------------------------------------
def health_body(execution: str) -> str:
    return submit_body("{'_id': 'health-check', 'name': 'health-check'}", execution, tool="health-check")


def assert_the_record_keys(reply: dict[str, Any]) -> None:
    """The reply has every key of the node answer the orchestrator stored (fixtures/fem), section by
    section, image row by image row."""
    from femkit import health_record
    stored = health_record()["result"]["process_info"][0]
    assert set(stored) <= set(reply), set(stored) - set(reply)
    for section, keys in stored["result"].items():
        assert section in reply["result"], section
        if section != "pem_certificates":  # keyed by the site's own file names
            assert set(keys) <= set(reply["result"][section]), (section, set(keys) - set(reply["result"][section]))
    assert (reply["status"], reply["return_code"], reply["tool_id"], reply["task_id"]) == \
        ("success", 0, "health-check", "health-check")
    assert TIME.match(reply["starting_time"]) and TIME.match(reply["finish_time"])
    assert "scheduler_check" in reply["result"]  # what an HPC site adds


def test_health_check_with_docker(tmp_path: Path) -> None:
    services.require("rabbitmq")
    services.require("docker")
    data = tmp_path / "data"
    data.mkdir()
    (data / "metadata.json").write_text("{}")
    node = unique_node("hc")
    s = ServeProcess(tmp_path, node, {"executors": {"local": {}, "docker": {}}, "legacy": {
        "enabled": True, "sandbox_path": str(tmp_path), "variables": {"DATA_PATH": str(data)}}}).start()
    orch = LegacyOrchestrator(node)
    try:
        reply = orch.call(health_body(str(uuid.uuid4())), timeout=60)
        assert_the_record_keys(reply)
        result = reply["result"]
        assert result["installation_check"]["docker_version"].startswith("Docker version")
        rows = result["docker_images_installed"]["docker_images"]
        assert {"repository": "127.0.0.1:5000/fem/busybox", "tag": "1"}.items() <= \
            next(r for r in rows if r["repository"] == "127.0.0.1:5000/fem/busybox").items()
        assert result["paths_check"]["data_path_exists"] is True
        assert result["paths_check"]["data_path_contents"] == ["metadata.json"]
        assert "ipinfo" not in json.dumps(result)  # no outbound lookup
    finally:
        orch.close()
        s.stop()


def test_health_check_without_docker(tmp_path: Path) -> None:
    """An HPC login node without docker: the docker parts are error fields, the check still answers."""
    services.require("rabbitmq")
    empty = tmp_path / "no-docker"  # a PATH with git (GitPython needs it to import) and no docker
    empty.mkdir()
    (empty / "git").symlink_to(shutil.which("git") or "/usr/bin/git")
    node = unique_node("hc")
    s = ServeProcess(tmp_path, node, {"legacy": {"enabled": True, "sandbox_path": str(tmp_path)}},
                     env={"PATH": str(empty), "DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}).start()
    orch = LegacyOrchestrator(node)
    try:
        reply = orch.call(health_body(str(uuid.uuid4())), timeout=60)
        assert_the_record_keys(reply)
        installation = reply["result"]["installation_check"]
        assert installation["docker_version"] is None and "not found" in installation["docker_error"]
        images = reply["result"]["docker_images_installed"]
        assert images["docker_images"] == [] and "cannot list docker images" in images["error"]
        assert reply["result"]["paths_check"]["data_path_exists"] is False  # no DATA_PATH declared
    finally:
        orch.close()
        s.stop()


# -- the 2024 form -------------------------------------------------------------------------------------
def test_the_2024_colon_form_is_refused_and_counted(tmp_path: Path) -> None:
    services.require("rabbitmq")
    import urllib.request

    from sshkit import free_port
    port = free_port()
    node = unique_node("old")
    s = ServeProcess(tmp_path, node, {"metrics": {"listen": f"127.0.0.1:{port}"},
                                      "legacy": {"enabled": True, "sandbox_path": str(tmp_path)}}).start()
    orch = LegacyOrchestrator(node)
    try:
        execution = str(uuid.uuid4())
        reply = orch.call(f"flcore:flcore-server:{execution}")
        assert reply["status"] == "error"
        assert (reply["tool_id"], reply["task_id"], reply["execution_id"]) == ("flcore", "flcore-server", execution)
        assert "2024 request form" in reply["message"] and "no HTTP requests" in reply["message"]
        assert orch.call(other_body("run_status", execution))["status"] == "error"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:  # our own endpoint
            text = resp.read().decode()
        assert 'fem_legacy_requests_total{action="colon-form-2024",outcome="error"} 1.0' in text
        assert 'fem_legacy_requests_total{action="run_status",outcome="error"} 1.0' in text
    finally:
        orch.close()
        s.stop()
