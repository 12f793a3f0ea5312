"""The restricted literal parser: what it accepts (as ast.literal_eval would) and what it refuses."""

from __future__ import annotations

import ast
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from fem_hpc.protocols.legacy.literal import MAX_INT_DIGITS, LiteralError, parse_literal, parse_literal_prefix


def _lists(value: Any) -> Any:
    """ast.literal_eval's result with tuples turned into lists, as parse_literal returns them."""
    if isinstance(value, tuple | list):
        return [_lists(v) for v in value]
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    return value


ACCEPTED = [
    "{}",
    "[]",
    "()",
    "(1)",
    "(1,)",
    "(1, 2,)",
    "[1, [2, [3, []]], {}]",
    "{'a': 1, 'b': [1, 2.5, -3, -.5e3], 'c': None, 'd': True, 'e': False}",
    "{1: 'x', 2.5: 'y', None: 1, True: 2, -4: 'neg'}",
    "'a\\nb\\tc\\x41\\u00e9\\U0001F600\\N{BULLET}\\101\\\\'",
    '"it\'s"',
    "'say \"hi\"'",
    '"""tri\nple \'quoted\'"""',
    "'''a'b''c'''",
    "r'a\\nb'",
    "u'x'",
    "'\\\nx'",
    "'a|b'",
    "'é😀'",
    "0x1F",
    "0o17",
    "0b101",
    "1_000_000",
    "0",
    "00",
    "1e-3",
    "1E+5",
    "1.",
    ".5",
    "-1",
    "- 2",
    "-0x10",
    "-1.5e-3",
    "  {'a' : ( 1 , 2 ) }  ",
    "{'a': {'b': {'c': [1, (2, 3)]}}}",
    "9" * MAX_INT_DIGITS,
]


@pytest.mark.parametrize("text", ACCEPTED)
def test_accepts_what_literal_eval_accepts(text: str) -> None:
    expected = _lists(ast.literal_eval(text))
    got = parse_literal(text)
    assert got == expected
    assert type(got) is type(expected)


def test_tuples_become_lists_and_parentheses_are_grouping() -> None:
    assert parse_literal("(1, (2, 3))") == [1, [2, 3]]
    assert parse_literal("((1))") == 1
    assert parse_literal("()") == []


def test_unknown_escapes_stay_as_written_like_python() -> None:
    assert parse_literal("'a\\qb\\/c'") == "a\\qb\\/c"


def test_duplicate_keys_keep_the_last_value_like_python() -> None:
    assert parse_literal("{'a': 1, 'a': 2}") == {"a": 2}


def test_repr_of_a_realistic_document_round_trips() -> None:
    doc = {
        "_id": "65f0c0ffee",
        "image": {"name": "trainer", "repository": "127.0.0.1:5000/fem", "tag": "1"},
        "command": {"base": "python train.py", "args": [{"id": "lr", "position": 1, "prefix": "--lr"}]},
        "text": "quotes ' \" and | pipes and \\ backslashes\nand newlines\t\x00\u2603",
        "numbers": [0, -1, 1.5, 1e300, -2.5e-300, 10**40],
        "nested": ({"a": None}, [True, False]),
    }
    assert parse_literal(repr(doc)) == _lists(doc)


REFUSED = [
    ("__import__('os').system('touch /tmp/pwn')", "call of '__import__'", 0),
    ("{'a': __import__('os')}", "call of '__import__'", 6),
    ("(lambda: 1)()", "lambda", 1),
    ("()()", "call", 2),
    ("os.path", "attribute access on 'os'", 0),
    ("'x'.upper()", "attribute access", 3),
    ("{'a': 1}.keys()", "attribute access", 8),
    ("x", "name 'x'", 0),
    ("[1, open]", "name 'open'", 4),
    ("inf", "name 'inf'", 0),
    ("true", "name 'true'", 0),
    ("1+1", "operator '+'", 1),
    ("2**10**10", "operator '**'", 1),
    ("[1 - 2]", "operator '-'", 3),
    ("not 1", "operator 'not'", 0),
    ("1 if 1 else 2", "conditional expression", 2),
    ("+1", "operator '+'", 0),
    ("--1", "unary minus", 0),
    ("-'a'", "unary minus", 0),
    ("-True", "unary minus", 0),
    ("{1, 2}", "set literal", 0),
    ("{'a'}", "set literal", 0),
    ("[1 for x in y]", "comprehension", 3),
    ("[x for x in y]", "name 'x'", 1),
    ("{'a': 1 for a in b}", "comprehension", 8),
    ("f'x'", "f-string", 0),
    ("F'{x}'", "f-string", 0),
    ("b'x'", "bytes literal", 0),
    ("rb'x'", "bytes literal", 0),
    ("1j", "complex number", 0),
    ("'a' 'b'", "implicit concatenation", 4),
    ("...", "Ellipsis", 0),
    ("[*a]", "unpacking", 1),
    ("{**a}", "unpacking", 1),
    ("[1][0]", "subscript", 3),
    ("1 # comment", "comment", 2),
    ("012", "leading zeros", 0),
    ("1_", "invalid number", 0),
    ("1;2", "unexpected character ';'", 1),
    ("1, 2", "expected the end of the input", 1),
    ("1 2", "expected the end of the input but found a number", 2),
    ("[1,,]", "expected a value but found ','", 3),
    ("{'a':}", "expected a value but found '}'", 5),
    ("[", "'[' opened at offset 0 is not closed", 1),
    ("{'a': [1, 2}", "expected ',' or ']' but found '}'", 11),
    ("", "unexpected end of input", 0),
    ("'abc", "unterminated string", 0),
    ("'a\nb'", "unterminated string", 0),
    ("'\\x4'", "truncated \\x escape", 1),
    ("'\\N{NO SUCH NAME}'", "unknown Unicode character name", 1),
    ("'\\U00110000'", "out of the Unicode range", 1),
    ("{[1]: 2}", "dict key must be", 1),
    ("{(1, 2): 3}", "dict key must be", 1),
    ("a := 1", "name 'a'", 0),
    ("yield", "keyword 'yield'", 0),
    ("\\", "backslash", 0),
]


@pytest.mark.parametrize(("text", "fragment", "position"), REFUSED)
def test_refuses_with_a_message_naming_the_problem(text: str, fragment: str, position: int) -> None:
    with pytest.raises(LiteralError) as info:
        parse_literal(text)
    assert fragment in info.value.message
    assert info.value.position == position
    assert str(info.value) == f"{info.value.message} at offset {position}"


def test_nothing_is_executed(tmp_path: Any) -> None:
    marker = tmp_path / "pwn"
    for text in (
        f"__import__('os').system('touch {marker}')",
        f"[__import__('pathlib').Path('{marker}').touch()]",
        f"(lambda: open('{marker}', 'w'))()",
    ):
        with pytest.raises(LiteralError):
            parse_literal(text)
    assert not marker.exists()


def test_huge_ints_are_refused_by_digit_count() -> None:
    with pytest.raises(LiteralError, match=r"integer literal with 5000 digits is too large \(at most 4300\)"):
        parse_literal("9" * 5000)
    with pytest.raises(LiteralError, match="too large"):
        parse_literal("0x" + "f" * 5000)
    with pytest.raises(LiteralError, match="too large"):
        parse_literal("[1, " + "1_" * 4400 + "1]")
    assert parse_literal("-" + "9" * MAX_INT_DIGITS) == -int("9" * MAX_INT_DIGITS)


@pytest.mark.parametrize("opener", ["[", "(", "{'a': "])
def test_deep_nesting_fails_fast_without_recursion(opener: str) -> None:
    closer = {"[": "]", "(": ")", "{'a': ": "}"}[opener]
    text = opener * 100_000 + "1" + closer * 100_000
    started = time.monotonic()
    with pytest.raises(LiteralError, match="nesting deeper than 32 levels is not allowed"):
        parse_literal(text)
    assert time.monotonic() - started < 1.0


def test_depth_limit_is_exact() -> None:
    assert parse_literal("[" * 32 + "]" * 32, max_depth=32) is not None
    with pytest.raises(LiteralError, match="nesting deeper than 32"):
        parse_literal("[" * 33 + "]" * 33, max_depth=32)
    assert parse_literal("[[[1]]]", max_depth=3) == [[[1]]]
    with pytest.raises(LiteralError, match="deeper than 2") as info:
        parse_literal("[[[1]]]", max_depth=2)
    assert info.value.position == 2


def test_size_is_checked_before_parsing() -> None:
    text = "[" + "1, " * 3_500_000 + "]"  # about 10 MB
    assert len(text) > 10_000_000
    started = time.monotonic()
    with pytest.raises(LiteralError, match="larger than the limit of 1000000 bytes") as info:
        parse_literal(text)
    assert info.value.position == 0
    assert time.monotonic() - started < 0.5
    # multi-byte characters count by their UTF-8 size
    with pytest.raises(LiteralError, match="1500 bytes is larger than the limit of 1000 bytes"):
        parse_literal("'" + "é" * 749 + "'", max_bytes=1000)


def test_item_limit() -> None:
    assert len(parse_literal(repr(list(range(100))), max_items=100)) == 100
    with pytest.raises(LiteralError, match="more than 100 items"):
        parse_literal(repr(list(range(101))), max_items=100)
    with pytest.raises(LiteralError, match="more than 3 items"):
        parse_literal("{'a': [1, 2], 'b': 3}", max_items=3)


def test_bytes_input_is_utf8() -> None:
    assert parse_literal("{'k': 'é'}".encode()) == {"k": "é"}
    with pytest.raises(LiteralError, match="not valid UTF-8") as info:
        parse_literal(b"{'k': '\xff'}")
    assert info.value.position == 7


def test_json_constants_only_when_asked() -> None:
    assert parse_literal('{"a": true, "b": false, "c": null}', json_constants=True) == {
        "a": True,
        "b": False,
        "c": None,
    }
    with pytest.raises(LiteralError, match="name 'null'"):
        parse_literal('{"c": null}')


def test_prefix_stops_at_a_stop_character() -> None:
    text = "{'a': 'x|y'} |{\"b\": 1}"
    value, end = parse_literal_prefix(text, stop="|")
    assert value == {"a": "x|y"}
    assert end == 13 and text[end] == "|"
    value, end = parse_literal_prefix(text, end + 1, stop="|")
    assert value == {"b": 1}
    assert end == len(text)


def test_prefix_reports_unclosed_container_at_the_stop_character() -> None:
    with pytest.raises(LiteralError, match="'\\{' opened at offset 0 is not closed") as info:
        parse_literal_prefix("{'a': 1|rest", stop="|")
    assert info.value.position == 7
    with pytest.raises(LiteralError, match="expected the end of the input or '\\|'"):
        parse_literal_prefix("{'a': 1} junk|rest", stop="|")
    with pytest.raises(LiteralError, match="operator '\\|'"):
        parse_literal("{'a': 1} | {'b': 2}")


def test_large_valid_input_is_reasonably_fast() -> None:
    text = repr({f"key{i}": [i, float(i), str(i), None] for i in range(10_000)})
    started = time.monotonic()
    assert len(parse_literal(text)) == 10_000
    assert time.monotonic() - started < 5.0


# --------------------------------------------------------------------------------------------------
# The real document, and hostile input as an attacker would write it (issue 10 item 5)

FLCORE = Path(__file__).parent / "fixtures" / "fem" / "flcore-server.task.py"


def _flcore() -> str:
    """The recorded document without its two-line ``#`` header (comments are refused)."""
    return "".join(line for line in FLCORE.read_text().splitlines(True) if not line.startswith("#"))


def test_the_real_flcore_document_parses_as_python_reads_it() -> None:
    text = _flcore()
    value = parse_literal(text)
    assert value == _lists(ast.literal_eval(text))
    assert value["_id"] == "flcore-server"
    assert value["port_mappings"] == [{"host_port": 4433, "container_port": 4433}]
    assert value["persistent"] is False and value["pre_checks"] is True
    assert value["source_code"]["url"] == "https://github.com/DataTools4Heart/flcore.git --branch production"
    # as the legacy codec reads it: the task_info field, ended by the next '|'
    field, end = parse_literal_prefix(text + '|{"execution_id": "e1"}|', stop="|")
    assert field == value
    assert (text + "|")[end] == "|"


HOSTILE = [
    ("[" * 100_000, "nesting deeper than 32 levels"),
    ("(" * 100_000 + "1", "nesting deeper than 32 levels"),
    ("[{(" * 40_000, "nesting deeper than 32 levels"),
    ("1" + "0" * 999_998, "integer literal with 999999 digits is too large (at most 4300)"),  # 10**999998
    ("1" + "0" * 1_000_000, "larger than the limit of 1000000 bytes"),  # 10**10**6 written out
    ("0x" + "f" * 999_990, "integer literal with 999990 digits is too large"),
    ("1" * 999_990 + ".5", "number literal of 999992 characters is too long"),
    ("1e309", "out of range (not finite)"),
    ("[1, -1e400]", "out of range (not finite)"),
    ("__import__('os')", "call of '__import__' is not allowed"),
    ("lambda: __import__('os').system('id')", "lambda is not allowed"),
    ("().__class__.__base__.__subclasses__()", "attribute access is not allowed"),
    ("{'a': os.environ}", "attribute access on 'os' is not allowed"),
    ('f\'{__import__("os").system("id")}\'', "f-string is not allowed"),
    ("{'a': 1, **x}", "unpacking ('**') is not allowed"),
    ("{1 for x in y}", "comprehension is not allowed"),
    ("{x for x in y}", "name 'x' is not allowed"),
    ("(x := 1)", "name 'x' is not allowed"),
    ("[1, (y := 2)]", "name 'y' is not allowed"),
    ("-None", "unary minus is only allowed before a number"),
    ("-[1]", "unary minus is only allowed before a number"),
    ("1+" * 300_000 + "1", "operator '+' is not allowed"),
    ("x." * 300_000 + "x", "attribute access on 'x' is not allowed"),
    ("-" * 300_000 + "1", "unary minus is only allowed before a number"),
    ("not " * 200_000 + "1", "operator 'not' is not allowed"),
    ("'" + "A" * 10_000_000 + "'", "larger than the limit of 1000000 bytes"),
    ("'" + "a" * 999_000, "unterminated string"),
    ("'\\N{" + "A" * 999_000 + "}'", "malformed \\N{...} escape"),
    ("\x00", "unexpected character '\\x00'"),
    ("{'cmd': 'a\x00b'}", "NUL character in a string is not allowed"),
    (b"{'k': '\xed\xa0\x80'}", "not valid UTF-8"),  # a UTF-8-encoded surrogate
    (b"\xff\xfe[\x00]", "not valid UTF-8"),
]


@pytest.mark.parametrize(("text", "fragment"), HOSTILE, ids=lambda v: repr(v)[:40])
def test_hostile_input_gets_the_library_error_fast(text: str | bytes, fragment: str) -> None:
    started = time.monotonic()
    with pytest.raises(LiteralError) as info:
        parse_literal(text)
    assert time.monotonic() - started < 1.0
    assert fragment in info.value.message
    assert str(info.value) == f"{info.value.message} at offset {info.value.position}"


def test_error_positions_point_at_the_refused_character() -> None:
    for text, position in (("[1, 1e309]", 4), ("{'cmd': 'a\x00b'}", 10), ("[" * 40, 32), ("[1, -1e999]", 5)):
        with pytest.raises(LiteralError) as info:
            parse_literal(text)
        assert info.value.position == position, text


def test_dense_input_over_the_item_limit_fails_fast_in_bounded_memory() -> None:
    """The limits are applied while reading: a 1 MB list of 500 000 items stops at item 100 001.

    (An ast.parse-based reader builds the whole tree first: 489 MB and 1.8 s for this input, see
    bench/README.md.)"""
    text = "[" + "0," * 499_999 + "]"
    assert len(text) <= 1_000_000  # within the default size limit
    started = time.monotonic()
    with pytest.raises(LiteralError, match="more than 100000 items") as info:
        parse_literal(text)
    assert time.monotonic() - started < 2.0
    assert info.value.position == 200_001  # where item 100 001 starts: nothing after it was read
    tracemalloc.start()
    try:
        with pytest.raises(LiteralError, match="more than 100000 items"):
            parse_literal(text)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000  # about 1 MB is used: the values read so far
