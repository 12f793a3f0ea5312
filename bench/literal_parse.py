"""Speed of the legacy literal parser (fem_hpc.broker.literal) on the real FEM document and a 1 MB request.

    python bench/literal_parse.py [-n 200]

Three inputs: the production flcore-server task document (tests/fixtures/fem-flcore-server.task.py,
3 KB), a generated 1 MB task_info literal (repr of a list of realistic task dicts, strings with quotes
and pipes), and a whole 1 MB legacy submit_run body through decode_request (three fields read with
parse_literal_prefix(stop="|")). For each it prints the best per-call time of `parse_literal` (or
`decode_request`) and, as a floor for comparison, of `ast.literal_eval` on the same literal (it
refuses nothing and cannot bound anything, so it is not an option; it shows what the standard
library costs). No services needed; runs in a few seconds.
"""

from __future__ import annotations

import argparse
import ast
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from fem_hpc.broker.legacy import decode_request  # noqa: E402
from fem_hpc.broker.literal import parse_literal  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "fem-flcore-server.task.py"
LIMIT = 1_100_000


def flcore() -> str:
    """The real document, without the two-line header comment (comments are refused)."""
    return "".join(line for line in FIXTURE.read_text().splitlines(True) if not line.startswith("#"))


def big_literal(target: int = 1_000_000) -> str:
    doc = ast.literal_eval(flcore())
    items: list[dict[str, object]] = []
    text = "[]"
    while len(text) < target:
        for i in range(len(items), len(items) + 50):
            d = dict(doc, _id=f"task-{i}", name=f"trainer {i} | 'v2' \"q\"", cpus=i % 8, ratio=i / 7)
            items.append(d)
        text = repr(items)
    return text


def best(fn: object, n: int) -> float:
    return min(timeit.repeat(fn, number=n, repeat=5)) / n  # type: ignore[arg-type]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="calls per timing on the small document")
    args = parser.parse_args()
    small, big = flcore(), big_literal()
    info = "{'_id': 'flcore-server', 'runs': " + big + "}"  # task_info must be a dict
    fields = ["submit_run", "tool1", info, '{"execution_id": "e1"}', "{'lr': 0.1}", "u1", "None", "{}", "t"]
    body = "|".join(fields).encode()
    assert parse_literal(small) == ast.literal_eval(small)
    rows = [
        (f"flcore-server document ({len(small)} chars)", lambda: parse_literal(small), n := args.n,
         lambda: ast.literal_eval(small)),
        (f"1 MB literal ({len(big)} chars)", lambda: parse_literal(big, max_bytes=LIMIT), max(1, n // 100),
         lambda: ast.literal_eval(big)),
        (f"1 MB legacy body ({len(body)} bytes), decode_request", lambda: decode_request(body, LIMIT),
         max(1, n // 100), None),
    ]  # fmt: skip
    for name, fn, calls, floor in rows:
        ours = best(fn, calls)
        line = f"{name:55} fem_hpc {ours * 1e3:9.3f} ms"
        if floor is not None:
            line += f"   ast.literal_eval {best(floor, calls) * 1e3:9.3f} ms"
        print(line)


if __name__ == "__main__":
    main()
