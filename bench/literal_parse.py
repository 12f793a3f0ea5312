"""Speed of the legacy literal parser (fem_hpc.broker.literal) on the real FEM document and a 1 MB request.

    python bench/literal_parse.py [-n 200]

Four inputs: the production flcore-server task document (tests/fixtures/fem/flcore-server.task.py,
3 KB), a generated 1 MB task_info literal (repr of a list of realistic task dicts, strings with quotes
and pipes), a whole 1 MB legacy submit_run body through decode_request (three fields read with
parse_literal_prefix(stop="|")), and a hostile 1 MB list of 500 000 zeros (over max_items, refused).
For each it prints the best per-call time, the tracemalloc peak of one call, and, as a floor for
comparison, the time of `ast.literal_eval` on the same literal (it refuses nothing and bounds nothing,
so it is not an option; it shows what the standard library's parser costs). No services needed.
The figures of the ast.parse-based rewrite that was measured and rejected are in bench/README.md.
"""

from __future__ import annotations

import argparse
import ast
import sys
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout, not an installed copy

from fem_hpc.protocols.legacy.codec import decode_request  # noqa: E402
from fem_hpc.protocols.legacy.literal import LiteralError, parse_literal  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "fem" / "flcore-server.task.py"
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


def refused(fn: Callable[[], object]) -> Callable[[], None]:
    def call() -> None:
        try:
            fn()
        except LiteralError:
            pass

    return call


def peak(fn: Callable[[], object]) -> float:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=200, help="calls per timing on the small document")
    args = parser.parse_args()
    small, big = flcore(), big_literal()
    info = "{'_id': 'flcore-server', 'runs': " + big + "}"  # task_info must be a dict
    fields = ["submit_run", "tool1", info, '{"execution_id": "e1"}', "{'lr': 0.1}", "u1", "None", "{}", "t"]
    body = "|".join(fields).encode()
    dense = "[" + "0," * 499_999 + "]"
    assert parse_literal(small) == ast.literal_eval(small)
    rows = [
        (f"flcore-server document ({len(small)} chars)", lambda: parse_literal(small), n := args.n,
         lambda: ast.literal_eval(small)),
        (f"1 MB literal ({len(big)} chars)", lambda: parse_literal(big, max_bytes=LIMIT), max(1, n // 100),
         lambda: ast.literal_eval(big)),
        (f"1 MB legacy body ({len(body)} bytes), decode_request", lambda: decode_request(body, LIMIT),
         max(1, n // 100), None),
        (f"dense list over max_items ({len(dense)} chars), refused", refused(lambda: parse_literal(dense)),
         max(1, n // 100), None),
    ]  # fmt: skip
    for name, fn, calls, floor in rows:
        ours = best(fn, calls)
        line = f"{name:55} fem_hpc {ours * 1e3:9.3f} ms, peak {peak(fn) / 1e6:6.1f} MB"
        if floor is not None:
            line += f"   ast.literal_eval {best(floor, calls) * 1e3:9.3f} ms"
        print(line)


if __name__ == "__main__":
    main()
