"""Mutual TLS to the broker: a second, real RabbitMQ node with only an amqps listener on loopback,
started by the test with a CA and certificates the test generates."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from pathlib import Path

import pika
import pytest
import services
from brokerkit import ServeProcess, unique_node
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fem_hpc.client import Client
from fem_hpc.config import TLSConfig

pytestmark = pytest.mark.rabbitmq

NODE = "femtls@localhost"
PORT = 5671
URL = f"amqps://guest:guest@127.0.0.1:{PORT}/%2F"


def _key():
    return ec.generate_private_key(ec.SECP256R1())


def _cert(subject: str, key, issuer_cert=None, issuer_key=None, *, ca: bool = False, server: bool = False):
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name)
               .issuer_name(issuer_cert.subject if issuer_cert else name)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    return builder.sign(issuer_key or key, hashes.SHA256())


def _write(path: Path, obj, key: bool = False) -> None:
    if key:
        data = obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
    else:
        data = obj.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(data)


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def tls_broker():
    services.require("rabbitmq")
    if shutil.which("rabbitmq-server") is None:
        pytest.fail("rabbitmq-server is not installed")
    # The node runs as user rabbitmq: its files live in a directory that user can read.
    base = Path(tempfile.mkdtemp(prefix="fem-tls-", dir="/tmp"))
    ca_key, server_key, client_key = _key(), _key(), _key()
    ca = _cert("fem-test-ca", ca_key, ca=True)
    server = _cert("localhost", server_key, ca, ca_key, server=True)
    client = _cert("fem-test-node", client_key, ca, ca_key)
    for name, obj, is_key in (("ca.pem", ca, False), ("server.pem", server, False), ("server.key", server_key, True),
                              ("client.pem", client, False), ("client.key", client_key, True)):
        _write(base / name, obj, is_key)
    (base / "rabbitmq.conf").write_text(
        "listeners.tcp = none\n"
        f"listeners.ssl.default = 127.0.0.1:{PORT}\n"
        f"ssl_options.cacertfile = {base}/ca.pem\n"
        f"ssl_options.certfile = {base}/server.pem\n"
        f"ssl_options.keyfile = {base}/server.key\n"
        "ssl_options.verify = verify_peer\n"
        "ssl_options.fail_if_no_peer_cert = true\n"
        "loopback_users = none\n")
    (base / "enabled_plugins").write_text("[].\n")
    for sub in ("mnesia", "log"):
        (base / sub).mkdir()
    subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(base)], check=True)
    os.chmod(base, 0o755)
    env = {**os.environ, "RABBITMQ_NODENAME": NODE, "RABBITMQ_DIST_PORT": "25673",
           "RABBITMQ_CONFIG_FILE": f"{base}/rabbitmq", "RABBITMQ_MNESIA_BASE": f"{base}/mnesia",
           "RABBITMQ_LOG_BASE": f"{base}/log", "RABBITMQ_ENABLED_PLUGINS_FILE": f"{base}/enabled_plugins"}
    # A node left by an interrupted run holds other certificates: replace it.
    subprocess.run(["rabbitmqctl", "-n", NODE, "stop"], capture_output=True, timeout=120)
    subprocess.run(["rabbitmq-server", "-detached"], env=env, check=True, timeout=60)
    # -detached returns before the node has registered with epmd: retry until it answers.
    deadline = time.monotonic() + 90
    while True:
        out = subprocess.run(["rabbitmqctl", "-n", NODE, "await_startup", "--timeout", "60"],
                             capture_output=True, text=True, timeout=120)
        if out.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert out.returncode == 0, f"the TLS RabbitMQ node did not start: {out.stderr}\n" + "".join(
        p.read_text() for p in (base / "log").glob("*.log"))
    deadline = time.monotonic() + 30
    while not _port_open(PORT) and time.monotonic() < deadline:
        time.sleep(0.2)
    yield base
    subprocess.run(["rabbitmqctl", "-n", NODE, "stop"], capture_output=True, timeout=120)
    shutil.rmtree(base, ignore_errors=True)


def test_serve_and_client_over_mutual_tls(tls_broker, tmp_path):
    base = tls_broker
    tls = {"ca_file": str(base / "ca.pem"), "cert_file": str(base / "client.pem"),
           "key_file": str(base / "client.key"), "server_name": "localhost"}
    node = unique_node("tls")
    s = ServeProcess(tmp_path, node, {"broker": {"url": URL, "tls": tls}}).start()
    try:
        with Client(URL, node, tls=TLSConfig(**tls)) as c:
            res = c.submit({"id": "tls1", "command": ["sh", "-c", "echo over-tls"]}, timeout=60)
        assert res.state == "COMPLETED" and res.result["stdout_tail"] == "over-tls\n"
    finally:
        s.stop()


def test_without_a_client_certificate_the_broker_refuses(tls_broker):
    base = tls_broker
    ctx = ssl.create_default_context(cafile=str(base / "ca.pem"))
    params = pika.URLParameters(URL)
    params.ssl_options = pika.SSLOptions(ctx, "localhost")
    params.connection_attempts = 1
    with pytest.raises(pika.exceptions.AMQPConnectionError):
        pika.BlockingConnection(params)
