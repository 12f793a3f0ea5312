"""Service checks for integration tests (placeholder until the testbed helper lands its version)."""

import os
import socket

import pytest


def require(service: str) -> None:
    ok = True
    if service == "rabbitmq":
        try:
            socket.create_connection(("127.0.0.1", 5672), timeout=2).close()
        except OSError:
            ok = False
    if not ok:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{service} is not running")
        pytest.skip(f"{service} is not running")
