"""The assets for the end-to-end test of the real flcore-server document, and the building blocks
together: placeholders -> host paths -> ports -> mirror -> a real container of the stand-in image ->
the reply body. (The handler wiring itself is the lead's; this runs the same pieces by hand.)"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from femkit import (
    BRANCH,
    FLCORE_STANDIN,
    flcore_document,
    flcore_image,
    flcore_mirrors,
    flcore_repository,
    flcore_source_url,
)
from gitkit import git, git_daemon
from services import require

from fem_hpc.config import LegacyVariable, VolumeConfig
from fem_hpc.protocols.legacy.hostpaths import HostPathRules, MountKind, map_volumes, working_dir
from fem_hpc.protocols.legacy.placeholders import PlaceholderContext, SiteVariables, resolve_document
from fem_hpc.protocols.legacy.ports import plan_ports, published_ports
from fem_hpc.protocols.legacy.result import FemFields, ReplyIds, submit_run_reply
from fem_hpc.staging.mirrors import rewrite_image

USER = "0e8f509e-3d43-4346-96da-aa744e7e8a75"
EXECUTION = "1e7b5310-7a2e-4f89-a4f7-320a89f67217"


def clone(url_with_flags: str, dest: Path) -> None:
    """What a site's git stage-in does with the document's url: the URL, then its '--branch B'."""
    url, flag, branch = shlex.split(url_with_flags)
    assert flag == "--branch"
    git(dest.parent, "clone", "-q", "--branch", branch, url, str(dest))


def command(doc: dict) -> list[str]:
    """The document's command with its default arguments (what the legacy mapping renders)."""
    argv = shlex.split(doc["command"]["base"])
    for arg in sorted(doc["command"]["args"], key=lambda a: a["position"]):
        argv += [arg["prefix"], str(arg["default_value"])]
    return argv


def test_the_source_repository_over_the_git_daemon(tmp_path: Path) -> None:
    served = tmp_path / "served"
    served.mkdir()
    flcore_repository(served)
    with git_daemon(served) as base:
        url = flcore_source_url(base)
        assert url.endswith(f"/flcore.git --branch {BRANCH}")
        clone(url, tmp_path / "flcore")
        git(tmp_path, "clone", "-q", shlex.split(url)[0], str(tmp_path / "default"))
    assert (tmp_path / "flcore" / "server_cmd.py").is_file()
    assert not (tmp_path / "default" / "server_cmd.py").exists()  # only the production branch has it
    sandbox = tmp_path / "sandbox"
    sandbox.mkdir()
    doc = flcore_document()
    argv = [sys.executable if a == "python3" else a for a in command(doc)]
    argv[argv.index("--sandbox_path") + 1] = str(sandbox)
    proc = subprocess.run(argv, cwd=tmp_path / "flcore", capture_output=True, text=True, timeout=30, check=True)
    ids = ReplyIds(execution_id=EXECUTION, tool_id="flcore", task_id=doc["_id"], user_id=USER, node="UB2")
    body = submit_run_reply(ids, stdout=proc.stdout, exit_code=proc.returncode, started=None, finished=None)
    assert body["status"] == "success"
    assert body["result"]["server"] == "flcore stand-in" and body["result"]["num_rounds"] == 5
    assert (sandbox / "log_server.txt").read_text().count("\n") == 5


@pytest.mark.docker
def test_the_real_document_runs_in_the_standin_image(tmp_path: Path) -> None:
    require("docker")
    require("flcore-image")
    import docker

    # the node: sandbox with the task's work area, the client's PKI dir, the served source
    sandbox, femc, served = tmp_path / "sandbox", tmp_path / "fem-client", tmp_path / "served"
    workdir = sandbox / USER / EXECUTION
    certs = femc / "config" / "rabbitmq-certificates"
    for d in (workdir, certs, served):
        d.mkdir(parents=True)
    workdir.chmod(0o777)  # the container runs as nobody; fem-hpc's docker executor chowns instead
    for name in ("rootCA_cert.pem", "UB2_client_cert.pem", "UB2_client_key.pem"):
        (certs / name).write_text("-----BEGIN TEST-----\n")
    flcore_repository(served)
    variables = SiteVariables.from_site({
        "HOST_FEMC_PATH": LegacyVariable(value=str(femc)),
        **{name: LegacyVariable(value=f"/app/config/certificates/{file}", mode="none") for name, file in (
            ("FLOWER_SSL_CACERT", "rootCA_cert.pem"), ("FLOWER_SSL_SERVER_CERT", "UB2_server_cert.pem"),
            ("FLOWER_SSL_SERVER_KEY", "UB2_server_key.pem"))},
    }, node="UB2", sandbox=sandbox)
    ctx = PlaceholderContext(user_id=USER, execution_id=EXECUTION, node_name="UB2", task_id="flcore-server",
                             tool_id="flcore")

    with git_daemon(served) as base:
        doc = flcore_document()
        doc["source_code"]["url"] = flcore_source_url(base)  # the only change: where the source lives
        info, params, errors = resolve_document(doc, {"num_rounds": 3}, ctx, variables)
        assert errors == []
        rules = HostPathRules.build(sandbox=sandbox, workdir=workdir, variables=variables,
                                    site_volumes={"unused": VolumeConfig(path=tmp_path)},
                                    source_url=info["source_code"]["url"], protected=[tmp_path / "state"])
        mounts, problems = map_volumes(info["volumes"], rules)
        assert problems == []
        checkout = workdir.parent / ".checkout-flcore"  # anywhere but the work area; the handler decides
        clone(info["source_code"]["url"], checkout)

    ports = published_ports(info["port_mappings"], [4433])
    plan = plan_ports(ports, "docker", "none")  # the test bed's dockerd has no bridge
    assert plan.publish == [] and "4433/tcp were not published" in (plan.note or "")
    image = rewrite_image(flcore_image(), flcore_mirrors()).image
    assert image == FLCORE_STANDIN

    binds = {str(m.source or checkout): {"bind": m.target, "mode": m.mode} for m in mounts}
    assert {m.kind for m in mounts} == set(MountKind) - {MountKind.SITE_VOLUME}
    argv = command(info)
    argv[argv.index("--num_rounds") + 1] = str(params["num_rounds"])
    client = docker.from_env(timeout=60)
    try:
        client.images.pull(image)  # from the local registry, through the mirror rule
        out = client.containers.run(image, argv, volumes=binds, working_dir=working_dir(mounts),
                                    environment=info["var_envs"], user="65534:65534", network_mode="none",
                                    remove=True, stdout=True, stderr=False)
    finally:
        client.close()
    ids = ReplyIds(execution_id=EXECUTION, tool_id="flcore", task_id=doc["_id"], user_id=USER, node="UB2")
    body = submit_run_reply(ids, stdout=out.decode(), exit_code=0, started="2026-11-30T10:00:00Z",
                            finished="2026-11-30T10:00:02Z", fem=FemFields(ports_note=plan.note))
    result = body["result"]
    assert result["server"] == "flcore stand-in"
    assert result["cwd"] == "/flcore"  # the command ran from the checkout, as the image's WORKDIR expects
    assert result["node_name"] == "UB2" and result["listen"] == "0.0.0.0:4433"
    assert result["num_rounds"] == 3 and result["num_clients"] == 1
    assert result["certificates"] == ["UB2_client_cert.pem", "UB2_client_key.pem", "rootCA_cert.pem"]
    assert body["fem_hpc"]["ports_note"] == plan.note
    log = (workdir / "log_server.txt").read_text().splitlines()
    assert log == [f"round {r}/3: model random_forest on random_forest" for r in (1, 2, 3)]
