"""The health-check tool's report: the real key set, from recorded outputs and on this machine."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from femkit import health_record
from services import TEST_IMAGE, require

from fem_hpc import __version__
from fem_hpc.config import config_from_dict
from fem_hpc.executors.runners import CommandResult, LocalRunner, RunnerError
from fem_hpc.protocols.legacy.healthcheck import (
    NO_GPU_MESSAGE,
    PEM_ERROR,
    HealthInputs,
    Probes,
    docker_api_images,
    docker_image_rows,
    docker_probe,
    health_report,
    inputs_from_site,
    is_health_check,
    pem_expiry,
)

FIX = Path(__file__).parent / "fixtures"
NOW = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


def recorded(name: str) -> str:
    return (FIX / name).read_text()


# What each command printed on the test machine (tests/fixtures/README.md); absent tools raise as
# LocalRunner does.
OUTPUTS = {
    ("docker", "--version"): recorded("docker-28-cli-version.txt"),
    ("sinfo", "--version"): recorded("slurm-22.05-sinfo-version.txt"),
    ("sinfo", "-h", "-o", "%P|%a|%D|%T"): recorded("slurm-22.05-sinfo-partitions.txt"),
    ("squeue", "-h", "-t", "RUNNING", "-o", "%i"): recorded("slurm-22.05-squeue-running-ids.txt"),
    ("qstat", "-Q"): recorded("slurm-wlm-torque-qstat-Q.txt"),
    ("qstat",): recorded("slurm-wlm-torque-qstat-running.txt"),
}


class Recorded:
    def __init__(self, outputs: dict[tuple[str, ...], str], failing: dict[tuple[str, ...], tuple[int, str]] | None
                 = None):
        self.outputs, self.failing, self.calls = outputs, failing or {}, []

    def __call__(self, argv: list[str], timeout: float) -> CommandResult:
        self.calls.append(tuple(argv))
        if tuple(argv) in self.failing:
            code, err = self.failing[tuple(argv)]
            return CommandResult(argv, code, "", err, 0.01)
        if tuple(argv) not in self.outputs:
            raise RunnerError(f"{argv[0]}: command not found on this host")
        return CommandResult(argv, 0, self.outputs[tuple(argv)], "", 0.01)


def stat_samples() -> list[str]:
    return recorded("linux-proc-stat-cpu-2-samples.txt").splitlines()


def probes(**over: Any) -> Probes:
    samples = iter(stat_samples())
    base = dict(
        run=Recorded(OUTPUTS),
        docker_images=lambda: json.loads(recorded("docker-20.10-api-images.json")),
        addresses=lambda: [{"interface": "lo", "address": "127.0.0.1"}, {"interface": "eth0", "address": "fe80::1"},
                           {"interface": "eth0", "address": "10.1.2.3"}, {"interface": "lo", "address": "::1"}],
        read=lambda path: recorded("linux-proc-meminfo.txt") if path == "/proc/meminfo" else next(samples),
        sleep=lambda s: None, now=lambda: NOW, hostname=lambda: "ub2-login", cpu_count=lambda: 12)
    base.update(over)
    return Probes(**base)


def make_pki(d: Path) -> list[Path]:
    """A CA (expires 2027-01-01), a client cert that expired, its key, a CSR, a bundle and garbage."""
    d.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())

    def cert(cn: str, before: dt.datetime, after: dt.datetime) -> x509.Certificate:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
        return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(before).not_valid_after(after)
                .sign(key, hashes.SHA256()))

    ca = cert("rootCA", dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.datetime(2027, 1, 1, 8, 30, tzinfo=dt.UTC))
    old = cert("UB2", dt.datetime(2024, 1, 1, tzinfo=dt.UTC), dt.datetime(2025, 12, 6, 12, 24, 58, tzinfo=dt.UTC))
    future = cert("later", dt.datetime(2030, 1, 1, tzinfo=dt.UTC), dt.datetime(2031, 1, 1, tzinfo=dt.UTC))
    pem = serialization.Encoding.PEM
    files = {
        "rootCA_cert.pem": ca.public_bytes(pem),
        "UB2_client_cert.pem": old.public_bytes(pem),
        "UB2_client_key.pem": key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()),
        "UB2_client_csr.pem": x509.CertificateSigningRequestBuilder().subject_name(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "UB2")])).sign(key, hashes.SHA256()).public_bytes(pem),
        "bundle.pem": ca.public_bytes(pem) + old.public_bytes(pem),
        "future.pem": future.public_bytes(pem),
        "garbage.pem": b"not a certificate\n",
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return [d / name for name in files]


def inputs(tmp: Path, **over: Any) -> HealthInputs:
    sandbox, data = tmp / "sandbox", tmp / "data"
    (sandbox / "0e8f509e").mkdir(parents=True, exist_ok=True)
    data.mkdir(exist_ok=True)
    for name in ("metadata.json", "kaggle_hf.csv"):
        (data / name).write_text("x")
    base: dict[str, Any] = dict(sandbox=sandbox, data_path=data, pem_files=make_pki(tmp / "pki"),
                                schedulers=["slurm", "pbs"])
    base.update(over)
    return HealthInputs(**base)


def assert_real_key_set(report: dict[str, Any]) -> None:
    """Every key of the recorded answer is in ours, section by section, with the same kind of value."""
    real = health_record()["result"]["process_info"][0]["result"]
    assert set(real) <= set(report), set(real) - set(report)
    for section, content in real.items():
        ours = report[section]
        if section == "pem_certificates":  # keyed by file name; each entry has the same keys
            for entry in ours.values():
                assert set(entry) >= {"expiry_date", "status"} or set(entry) >= {"error"}
            continue
        assert set(content) <= set(ours), (section, set(content) - set(ours))
    assert set(real["docker_images_installed"]["docker_images"][0]) == \
        {"repository", "tag", "image_id", "sha256_digest"}
    for row in report["docker_images_installed"]["docker_images"]:
        assert set(row) == {"repository", "tag", "image_id", "sha256_digest"}
    # ip_info: ours is the node's own address, never the lookup service's city/org fields
    assert "ip" in report["installation_check"]["ip_info"]


def test_report_from_recorded_outputs(tmp_path: Path) -> None:
    report = health_report(inputs(tmp_path), probes())
    assert_real_key_set(report)
    inst = report["installation_check"]
    assert inst["docker_version"] == "Docker version 28.2.2, build e6534b4"
    assert inst["ip_info"]["ip"] == "10.1.2.3"  # not loopback, not link-local, IPv4 first
    assert inst["ip_info"]["hostname"] == "ub2-login"
    assert inst["apptainer_version"] is None and "apptainer: command not found" in inst["apptainer_error"]
    assert inst["fem_hpc_version"] == __version__
    assert report["gpu_check"] == {"gpu_detected": False, "message": NO_GPU_MESSAGE}
    paths = report["paths_check"]
    assert paths["sandbox_path_exists"] and paths["data_path_exists"] and paths["sandbox_writable"]
    assert paths["sandbox_contents"] == ["0e8f509e"]
    assert paths["data_path_contents"] == ["kaggle_hf.csv", "metadata.json"]
    res = report["resources_check"]
    assert res["CPU Count"] == 12
    assert res["Memory Total"] == "23.54 GB" and res["Memory Available"] == "22.55 GB"  # recorded KiB / 1024**2
    # the recorded samples differ by user 68, system 16, idle 14 jiffies: 84 busy of 98 -> 85.7 %
    assert res["CPU Percent"] == 85.7
    assert res["GPU Count"] == 0 and res["Has Internet"] is None
    rows = report["docker_images_installed"]["docker_images"]
    assert rows == [
        {"repository": "127.0.0.1:5000/fem/busybox", "tag": "1", "image_id": "111826bd95c3",
         "sha256_digest": "sha256:452249e978e9e4cf24f2b10d7aecb12147ddf888e8d49cafe91d45c6fb0b42a7"},
        {"repository": "127.0.0.1:5001/fem/busybox", "tag": "1", "image_id": "111826bd95c3",
         "sha256_digest": "sha256:452249e978e9e4cf24f2b10d7aecb12147ddf888e8d49cafe91d45c6fb0b42a7"},
    ]
    sched = report["scheduler_check"]
    assert sched["configured"] == ["slurm", "pbs"]
    assert sched["slurm"]["version"] == "slurm-wlm 22.05.8" and sched["slurm"]["reachable"]
    assert [(p["name"], p["default"], p["nodes"], p["states"]) for p in sched["slurm"]["partitions"]] == [
        ("debug", True, 1, {"idle": 1}), ("short", False, 1, {"idle": 1})]
    assert sched["slurm"]["running_jobs"] == 1
    assert [(q["name"], q["enabled"], q["started"], q["running"]) for q in sched["pbs"]["queues"]] == [
        ("debug", True, True, None), ("short", True, True, None)]
    assert sched["pbs"]["running_jobs"] == 1  # '?' counts: the R rows of plain qstat
    json.dumps(report, allow_nan=False)


def test_certificates(tmp_path: Path) -> None:
    report = health_report(inputs(tmp_path), probes())["pem_certificates"]
    assert report["rootCA_cert.pem"] == {"expiry_date": "2027-01-01 08:30:00 UTC", "status": "Valid",
                                         "days_left": 31}
    assert report["UB2_client_cert.pem"]["status"] == "Expired"
    assert report["UB2_client_cert.pem"]["expiry_date"] == "2025-12-06 12:24:58 UTC"
    assert report["bundle.pem"]["expiry_date"] == "2025-12-06 12:24:58 UTC"  # the earliest in the file
    assert report["future.pem"]["status"] == "Not yet valid"
    for name in ("UB2_client_key.pem", "UB2_client_csr.pem", "garbage.pem"):
        assert report[name]["error"] == PEM_ERROR  # the original's wording for a key or a CSR
    gone = health_report(inputs(tmp_path, pem_files=[tmp_path / "nope.pem", tmp_path / "a" / "nope.pem"]),
                         probes())["pem_certificates"]
    assert set(gone) == {str(tmp_path / "nope.pem"), str(tmp_path / "a" / "nope.pem")}  # same name twice: paths
    assert all(e["error"] == PEM_ERROR and "cannot read" in e["detail"] for e in gone.values())
    assert pem_expiry(b"", NOW)["error"] == PEM_ERROR


def test_nothing_missing_fails_the_whole_check(tmp_path: Path) -> None:
    def no_daemon() -> list[dict[str, Any]]:
        raise ConnectionError("Error while fetching server API version: connection refused")

    def no_interfaces() -> list[dict[str, str]]:
        raise OSError("no /proc")

    def no_proc(path: str) -> str:
        raise OSError(f"{path}: no such file")

    run = Recorded({("nvidia-smi", "-L"): "GPU 0: NVIDIA A100-SXM4-40GB (UUID: GPU-1)\n"
                                         "GPU 1: NVIDIA A100-SXM4-40GB (UUID: GPU-2)\n"},
                   failing={("sinfo", "-h", "-o", "%P|%a|%D|%T"): (1, "slurm_load_partitions: Unable to contact "
                                                                     "slurm controller (connect failure)"),
                            ("qstat", "-Q"): (2, "qstat: cannot connect to server")})
    report = health_report(inputs(tmp_path, sandbox=tmp_path / "gone", data_path=None, pem_files=[]),
                           probes(run=run, docker_images=no_daemon, addresses=no_interfaces, read=no_proc))
    assert_real_key_set(report)
    assert report["installation_check"]["docker_version"] is None
    assert "docker: command not found" in report["installation_check"]["docker_error"]
    assert report["installation_check"]["ip_info"]["ip"] is None
    assert report["docker_images_installed"]["docker_images"] == []
    assert "connection refused" in report["docker_images_installed"]["error"]
    assert report["gpu_check"]["gpu_detected"] is True and report["resources_check"]["GPU Count"] == 2
    assert report["paths_check"]["sandbox_path_exists"] is False and not report["paths_check"]["sandbox_writable"]
    assert "no DATA_PATH" in report["paths_check"]["data_path_note"]
    assert report["resources_check"]["Memory Total"] is None and report["resources_check"]["CPU Percent"] is None
    slurm, pbs = report["scheduler_check"]["slurm"], report["scheduler_check"]["pbs"]
    assert slurm["reachable"] is False and "Unable to contact slurm controller" in slurm["error"]
    assert pbs["reachable"] is False and "exited 2: qstat: cannot connect" in pbs["error"]


def test_docker_rows_of_untagged_and_pulled_by_digest_images() -> None:
    images = [{"Id": "sha256:" + "1" * 64, "RepoTags": None, "RepoDigests": ["reg.example/x@sha256:" + "2" * 64]},
              {"Id": "sha256:" + "3" * 64, "RepoTags": ["<none>:<none>"], "RepoDigests": []},
              {"Id": "sha256:" + "4" * 64, "RepoTags": ["127.0.0.1:5000/noport", "localhost:5000/a/b:v1"],
               "RepoDigests": None}]
    assert docker_image_rows(images) == [
        {"repository": "reg.example/x", "tag": "<none>", "image_id": "1" * 12, "sha256_digest": "sha256:" + "2" * 64},
        {"repository": "<none>", "tag": "<none>", "image_id": "3" * 12, "sha256_digest": "<none>"},
        {"repository": "127.0.0.1:5000/noport", "tag": "<none>", "image_id": "4" * 12, "sha256_digest": "<none>"},
        {"repository": "localhost:5000/a/b", "tag": "v1", "image_id": "4" * 12, "sha256_digest": "<none>"},
    ]


def test_inputs_from_the_site_config(tmp_path: Path) -> None:
    pki = make_pki(tmp_path / "pki")
    cfg = config_from_dict({
        "node": "UB2", "state_dir": str(tmp_path / "s"), "work_root": str(tmp_path / "w"),
        "broker": {"url": "amqps://u:p@127.0.0.1:5671/%2F", "tls": {
            "ca_file": str(pki[0]), "cert_file": str(pki[1]), "key_file": str(pki[2])}},
        "executors": {"local": {}, "hpc": {"type": "slurm"},
                      "containers": {"type": "docker", "base_url": f"unix://{tmp_path}/none.sock"}},
        "legacy": {"sandbox_path": str(tmp_path / "sb")}})
    got = inputs_from_site(cfg, data_path=tmp_path / "data")
    assert got.sandbox == tmp_path / "sb" and got.data_path == tmp_path / "data"
    assert got.pem_files == pki[:3] and got.schedulers == ["slurm"]
    # the docker probe asks the site's own daemon (here: a socket nobody listens on)
    report = health_report(got, probes(docker_images=docker_probe(cfg)))
    assert f"docker daemon at unix://{tmp_path}/none.sock: " in report["docker_images_installed"]["error"]


@pytest.mark.docker
@pytest.mark.slurm
def test_on_this_machine(tmp_path: Path) -> None:
    require("docker")
    require("slurm")
    report = health_report(inputs(tmp_path))  # the real probes: docker, sinfo, squeue, qstat, /proc
    assert_real_key_set(report)
    inst = report["installation_check"]
    assert inst["docker_version"].startswith("Docker version ")
    assert inst["ip_info"]["addresses"] and all(a["address"] for a in inst["ip_info"]["addresses"])
    repos = {f"{r['repository']}:{r['tag']}" for r in report["docker_images_installed"]["docker_images"]}
    assert TEST_IMAGE in repos
    sched = report["scheduler_check"]
    assert sched["slurm"]["reachable"] and "debug" in [p["name"] for p in sched["slurm"]["partitions"]]
    assert isinstance(sched["slurm"]["running_jobs"], int)
    assert "debug" in [q["name"] for q in sched["pbs"]["queues"]] and isinstance(sched["pbs"]["running_jobs"], int)
    assert report["resources_check"]["CPU Count"] == os.cpu_count()
    assert report["resources_check"]["Memory Total"].endswith(" GB")


@pytest.mark.slurm
def test_on_this_machine_without_docker(tmp_path: Path) -> None:
    """An HPC login node: Slurm and its PBS wrappers on PATH, no docker CLI, no daemon behind the socket."""
    require("slurm")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sinfo", "squeue", "qstat"):
        (bin_dir / tool).symlink_to(f"/usr/bin/{tool}")
    runner = LocalRunner()
    dead = f"unix://{tmp_path / 'no-dockerd.sock'}"
    report = health_report(inputs(tmp_path), Probes(
        run=lambda argv, timeout: runner.run(argv, timeout=timeout, env={"PATH": str(bin_dir)}),
        docker_images=lambda: docker_api_images(dead, timeout=5)))
    assert_real_key_set(report)
    assert report["installation_check"]["docker_version"] is None
    assert "docker: command not found" in report["installation_check"]["docker_error"]
    assert report["docker_images_installed"]["docker_images"] == []
    assert report["docker_images_installed"]["error"].startswith(f"cannot list docker images: docker daemon at {dead}")
    assert report["scheduler_check"]["slurm"]["reachable"]
    assert report["pem_certificates"]["rootCA_cert.pem"]["status"] == "Valid"


@pytest.mark.parametrize(("tool", "info", "builtin"), [
    ("health-check", {"_id": "health-check"}, True),  # the real one: no image, no command
    ("health-check", {"_id": "health-check", "image": "", "command": None}, True),
    ("health-check", {"_id": "health-check", "image": "x:1", "command": {"base": "check"}, "pre_checks": True}, True),
    ("fem", {"_id": "health-check", "image": "x:1"}, True),  # the task named so, nothing to run
    ("health-check", {"_id": "site-check", "image": "x:1", "command": {"base": "check"}}, False),  # a site's own
    ("flcore", {"_id": "flcore-server", "image": "x:1", "command": {"base": "s"}, "pre_checks": True}, False),
    ("flcore", {"_id": "flcore-server"}, False),
])
def test_which_documents_the_built_in_checks_answer(tool: str, info: dict[str, Any], builtin: bool) -> None:
    assert is_health_check(tool, info) is builtin
