"""Assets for running the real FEM orchestrator's documents (tests/fixtures/fem/) against fem-hpc.

* :func:`flcore_document` / :func:`health_record`: the recorded documents, loaded as the orchestrator
  sent them.
* :func:`flcore_repository`: a local Git repository standing in for the FL tool's source: branch
  ``production`` (not the default branch) holds a ``server_cmd.py`` that takes the document's arguments,
  writes ``log_server.txt`` into ``--sandbox_path`` and prints one JSON object on stdout (after a log
  line, as a real tool does). Serve it with ``gitkit.git_daemon(base)`` and use
  :func:`flcore_source_url` as the document's ``source_code.url``.
* The stand-in image: ``scripts/testbed`` builds and pushes :data:`FLCORE_STANDIN` (busybox + Debian's
  python3, WORKDIR /flcore); :func:`flcore_mirrors` is the site rule that sends the document's image
  there. The original image's registry is read from the fixture, never written here.
"""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any

from gitkit import Repo, git
from services import FLCORE_IMAGE, REGISTRY

from fem_hpc.config import ImageMirror
from fem_hpc.staging.images import parse_image_ref

FIXTURES = Path(__file__).parent / "fixtures" / "fem"
FLCORE_STANDIN = FLCORE_IMAGE
STANDIN_REGISTRY = REGISTRY
REPO_NAME = "flcore"
BRANCH = "production"

SERVER_CMD = '''"""Stand-in for the FL tool's server_cmd.py: same arguments, same outputs, no Flower."""
import argparse
import json
import os
import sys

parser = argparse.ArgumentParser()
parser.add_argument("--num_clients", type=int, required=True)
parser.add_argument("--num_rounds", type=int, required=True)
parser.add_argument("--model", required=True)
parser.add_argument("--dataset", required=True)
parser.add_argument("--sandbox_path", required=True)
parser.add_argument("--certs_path", required=True)
args = parser.parse_args()

print("flcore stand-in: starting server for", args.num_clients, "clients", flush=True)
log = os.path.join(args.sandbox_path, "log_server.txt")
with open(log, "w") as f:
    for r in range(1, args.num_rounds + 1):
        f.write(f"round {r}/{args.num_rounds}: model {args.model} on {args.dataset}\\n")
certs = sorted(os.listdir(args.certs_path)) if os.path.isdir(args.certs_path) else None
print(json.dumps({
    "server": "flcore stand-in",
    "num_clients": args.num_clients,
    "num_rounds": args.num_rounds,
    "model": args.model,
    "dataset": args.dataset,
    "node_name": os.environ.get("NODE_NAME"),
    "listen": f"{os.environ.get('FLOWER_CENTRAL_SERVER_IP')}:{os.environ.get('FLOWER_CENTRAL_SERVER_PORT')}",
    "cwd": os.getcwd(),
    "log": os.path.basename(log),
    "certificates": certs,
    "python": sys.version.split()[0],
}))
'''


def flcore_document() -> dict[str, Any]:
    """The flcore-server task document (a fresh copy each call). The file is the Python literal the
    orchestrator sends; a trusted recording, so ``ast.literal_eval`` reads it here (never a request)."""
    return copy.deepcopy(ast.literal_eval((FIXTURES / "flcore-server.task.py").read_text()))


def flcore_literal() -> str:
    """The document as the text of the ``task_info`` field (the recorded literal, comments dropped)."""
    lines = (FIXTURES / "flcore-server.task.py").read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("#"))


def health_record() -> dict[str, Any]:
    """The orchestrator's stored health-check answer (``result.process_info[0]`` is the node's reply)."""
    return json.loads((FIXTURES / "health-check.orchestrator-record.json").read_text())


def flcore_image() -> str:
    """The image reference the document names (repository + name + tag)."""
    image = flcore_document()["image"]
    return f"{image['repository'].rstrip('/')}/{image['name']}:{image['tag']}"


def flcore_mirrors() -> dict[str, ImageMirror]:
    """The site rule ``image_mirrors: {<the document's registry>: {mirror: 127.0.0.1:5000}}``."""
    return {parse_image_ref(flcore_image()).registry: ImageMirror(mirror=STANDIN_REGISTRY)}


def flcore_repository(base: Path) -> Path:
    """``base/flcore.git``, a bare repository: ``main`` with a README only, ``production`` with
    server_cmd.py. Returns its path (serve ``base`` with ``gitkit.git_daemon``)."""
    work = Repo(base / "flcore-work")
    work.commit({"README.md": "flcore stand-in: the server is on the production branch\n"}, "init")
    git(work.path, "checkout", "-q", "-b", BRANCH)
    work.commit({"server_cmd.py": SERVER_CMD}, "server_cmd.py")
    git(work.path, "checkout", "-q", "main")
    bare = base / f"{REPO_NAME}.git"
    git(base, "clone", "-q", "--bare", str(work.path), str(bare))
    return bare


def flcore_source_url(daemon_url: str) -> str:
    """The document's ``source_code.url`` for the served repository, git flags inside as in the original."""
    return f"{daemon_url}/{REPO_NAME}.git --branch {BRANCH}"
