"""A restricted parser for Python literals, for the legacy FEM protocol.

The legacy orchestrator sends its documents as ``repr()`` of Python dicts; the old client read them with
``ast.literal_eval`` or even ``eval``. Here CPython's own parser reads them (``ast.parse(mode="eval")``
builds a tree and runs nothing) and an iterative walk builds the value from a whitelist:

* dict ``{k: v}`` (keys: str, int, float, True/False/None), list ``[...]``, tuple ``(...)`` (returned as a
  list; ``(x)`` is just ``x``),
* str: single, double or triple quoted, with Python's escapes; prefixes ``u`` and ``r`` are accepted,
  ``b``/``f`` (bytes, f-strings) are refused,
* int (decimal, ``0x``/``0o``/``0b``, ``_`` separators, at most :data:`MAX_INT_DIGITS` digits), finite
  float (``1.5``, ``.5``, ``1e-3``; ``1e309`` is refused), with an optional unary minus,
* ``True``, ``False``, ``None`` (and, with ``json_constants=True``, JSON's ``true``/``false``/``null``).

Everything else (calls, attribute access, subscripts, other names, operators, lambdas, comprehensions,
sets, complex numbers, comments, adjacent-string concatenation, NUL characters, ...) raises
:class:`LiteralError` with a message naming what was found and the character offset where it was found.
The tree loses what only the characters show (comments, a backslash outside a string, adjacent strings,
where a literal followed by a stop character ends), so one regular-expression pass that steps over string
literals finds those first. Limits: the input size is checked before anything else; CPython refuses more
than 200 nested brackets and overlong operator chains itself (caught, never a crash); the walk bounds the
nesting depth and the number of items and never recurses.
"""

from __future__ import annotations

import ast
import keyword
import math
import re
import warnings
from functools import lru_cache
from typing import Any

__all__ = ["MAX_INT_DIGITS", "LiteralError", "parse_literal", "parse_literal_prefix"]

MAX_INT_DIGITS = 4300  # the same bound CPython puts on int <-> str conversions
_MAX_NUMBER_CHARS = MAX_INT_DIGITS + 64
_PARSER_MAX_DEPTH = 200  # CPython's tokenizer refuses deeper bracket nesting (MAXLEVEL)


class LiteralError(ValueError):
    """A literal was refused. ``message`` says what was found, ``position`` is a character offset."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at offset {position}")
        self.message = message
        self.position = position


# One string literal as CPython's tokenizer delimits it (a prefix is left to the tree: b/f are refused there);
# `'''` always opens a triple-quoted string, never an empty one and a quote.
_STRING = r"""(?:'''(?:[^'\\]++|\\[\s\S]|'(?!''))*+'''|\"\"\"(?:[^"\\]++|\\[\s\S]|"(?!""))*+\"\"\"|'(?!'')(?:[^'\\\n\r]++|\\(?:\r\n|[\s\S]))*+'|"(?!"")(?:[^"\\\n\r]++|\\(?:\r\n|[\s\S]))*+")"""  # noqa: E501
_STRING_RE = re.compile(_STRING)
_NEXT_STRING = r"""[ \t\f\r\n]*+[rRuUbBfF]{0,2}['"]"""  # a string right after a string: Python joins them
_STRING_OR_BRACKET = re.compile(_STRING + r"|[][(){}]")
_STRING_OR_NUMBER = re.compile(_STRING + r"|(?<![\w.])[0-9][0-9_]*")
_NEWLINE = re.compile(r"\r\n|\r|\n")  # what CPython counts as a line end (str.splitlines counts more)
_WHITESPACE = " \t\n\r\f"
_CLOSE = {"[": "]", "(": ")", "{": "}"}
_JSON_CONSTANTS: dict[str, Any] = {"true": True, "false": False, "null": None}
_WORD_OPERATORS = frozenset({"and", "or", "not", "in", "is"})
_FIRST_OPERAND = {ast.BinOp: "left", ast.Compare: "left", ast.BoolOp: "values", ast.Call: "func",
                  ast.Attribute: "value", ast.Subscript: "value", ast.IfExp: "body", ast.ListComp: "elt",
                  ast.SetComp: "elt", ast.GeneratorExp: "elt", ast.DictComp: "key", ast.NamedExpr: "target",
                  ast.Set: "elts"}  # fmt: skip
_CONSTRUCT = {ast.Call: "call", ast.Attribute: "attribute access", ast.Subscript: "subscript",
              ast.IfExp: "conditional expression", ast.ListComp: "comprehension", ast.SetComp: "comprehension",
              ast.GeneratorExp: "comprehension", ast.DictComp: "comprehension"}  # fmt: skip
_OPERATOR = {
    ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.MatMult: "@", ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%",
    ast.Pow: "**", ast.LShift: "<<", ast.RShift: ">>", ast.BitOr: "|", ast.BitXor: "^", ast.BitAnd: "&",
    ast.And: "and", ast.Or: "or", ast.Not: "not", ast.UAdd: "+", ast.Invert: "~", ast.Eq: "==", ast.NotEq: "!=",
    ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.Is: "is", ast.IsNot: "is not", ast.In: "in",
    ast.NotIn: "not in",
}  # fmt: skip
_FINISH, _KEY = object(), object()


@lru_cache(maxsize=8)
def _scanner(stop: str) -> re.Pattern[str]:
    """Match up to the first stop character, comment, backslash or bad quote that is not inside a string."""
    other = f"""[^'"#\\\\{re.escape(stop)}]*+"""
    return re.compile(f"{other}(?:{_STRING}(?!{_NEXT_STRING}){other})*+")


def _first_operand(node: ast.AST) -> ast.AST | None:
    """The leftmost sub-expression of a refused construct: what the text shows before the construct itself."""
    attr = _FIRST_OPERAND.get(type(node))
    first = getattr(node, attr) if attr else None
    return first[0] if isinstance(first, list) else first


class _Reader:
    def __init__(self, text: str, base: int, end: int, stop: str, *, max_depth: int, max_items: int, json: bool):
        self.text, self.base, self.end, self.stop = text, base, end, stop
        self.max_depth, self.max_items, self.json = max_depth, max_items, json
        self.items = 0
        self._lines: list[int] | None = None

    # -- positions: CPython gives (line, UTF-8 byte column) in the field; errors give character offsets

    def offset(self, lineno: int, col: int, *, chars: bool = False) -> int:
        if self._lines is None:
            field = self.text[self.base : self.end]
            self._lines = [0] + [m.end() for m in _NEWLINE.finditer(field)]
        start = self.base + self._lines[max(lineno, 1) - 1]
        if chars:
            return start + col
        return start + len(self.text[start : start + col].encode()[:col].decode("utf-8", "ignore"))

    def pos(self, node: ast.AST) -> int:
        return self.offset(node.lineno, node.col_offset)  # type: ignore[attr-defined]

    def after(self, node: ast.AST) -> int:
        """Where the token after ``node`` starts (past the closing parentheses of a grouped operand)."""
        i = self.offset(node.end_lineno, node.end_col_offset)  # type: ignore[attr-defined]
        while i < self.end and self.text[i] in _WHITESPACE + ")":
            i += 1
        return i

    # -- the walk ------------------------------------------------------------------------------------

    def value(self, root: ast.AST, depth: int = 0) -> Any:
        out: list[Any] = []
        todo: list[tuple[Any, int, object | None]] = [(root, depth, None)]
        while todo:
            node, depth, job = todo.pop()
            if job is _FINISH:
                n = len(node.keys) * 2 if isinstance(node, ast.Dict) else len(node.elts)
                values = out[len(out) - n :]
                del out[len(out) - n :]
                out.append(dict(zip(values[::2], values[1::2], strict=True)) if type(node) is ast.Dict else values)
            elif job is _KEY:
                if isinstance(out[-1], list | dict):
                    raise LiteralError("dict key must be a string, number, True, False or None", self.pos(node))
            elif type(node) is ast.Constant:
                out.append(self.constant(node))
            elif type(node) in (ast.List, ast.Tuple, ast.Dict):
                if depth >= self.max_depth:
                    raise LiteralError(f"nesting deeper than {self.max_depth} levels is not allowed", self.pos(node))
                children = node.values if type(node) is ast.Dict else node.elts
                self.items += len(children)
                if self.items > self.max_items:
                    over = children[len(children) - (self.items - self.max_items)]
                    raise LiteralError(f"more than {self.max_items} items", self.pos(over))
                todo.append((node, depth, _FINISH))
                if type(node) is ast.Dict:
                    for key, val in zip(reversed(node.keys), reversed(node.values), strict=True):
                        if key is None:
                            star = self.text.rfind("**", self.base, self.pos(val))
                            raise LiteralError("unpacking ('**') is not allowed", star)
                        todo += ((val, depth + 1, None), (key, depth + 1, _KEY), (key, depth + 1, None))
                else:
                    todo += ((elt, depth + 1, None) for elt in reversed(node.elts))
            elif type(node) is ast.UnaryOp and type(node.op) is ast.USub:
                operand = node.operand
                if type(operand) is not ast.Constant or type(operand.value) not in (int, float):
                    raise LiteralError("unary minus is only allowed before a number", self.pos(node))
                out.append(-self.constant(operand))
            elif type(node) is ast.Name and self.json and node.id in _JSON_CONSTANTS:
                out.append(_JSON_CONSTANTS[node.id])
            else:
                raise self.refuse(node, depth)
        return out[0]

    def constant(self, node: ast.Constant) -> Any:
        value = node.value
        kind = type(value)
        if kind is int and value.bit_length() > MAX_INT_DIGITS:  # cheap guard: only long ones are counted
            literal = self.text[self.pos(node) : self.offset(node.end_lineno, node.end_col_offset)]  # type: ignore[arg-type]
            digits = literal.replace("_", "")
            digits = digits[2:] if digits[1:2].isalpha() else digits
            if len(digits) > MAX_INT_DIGITS:
                raise LiteralError(self._too_many_digits(len(digits)), self.pos(node))
        elif kind is float:
            if node.end_col_offset - node.col_offset > _MAX_NUMBER_CHARS:  # type: ignore[operator]
                length = node.end_col_offset - node.col_offset  # type: ignore[operator]
                raise LiteralError(f"number literal of {length} characters is too long", self.pos(node))
            if not math.isfinite(value):
                raise LiteralError("float literal out of range (it is not finite)", self.pos(node))
        elif kind is bytes:
            raise LiteralError("bytes literal is not allowed", self.pos(node))
        elif kind is complex:
            raise LiteralError("complex number is not allowed", self.pos(node))
        elif value is Ellipsis:
            raise LiteralError("Ellipsis is not allowed", self.pos(node))
        return value

    @staticmethod
    def _too_many_digits(n: int) -> str:
        return f"integer literal with {n} digits is too large (at most {MAX_INT_DIGITS})"

    def refuse(self, node: ast.AST, depth: int) -> LiteralError:
        """The error for a refused node: like a left-to-right reader, report its leftmost problem first."""
        parent = None
        while (first := _first_operand(node)) is not None:  # a loop: `x.x.x...` can be deep
            parent, node = node, first
        if type(node) is ast.Name and not (self.json and node.id in _JSON_CONSTANTS):
            name, at = node.id, self.pos(node)
            if type(parent) is ast.Call:
                return LiteralError(f"call of {name!r} is not allowed", at)
            if type(parent) is ast.Attribute:
                return LiteralError(f"attribute access on {name!r} is not allowed", at)
            if type(parent) is ast.Subscript:
                return LiteralError(f"subscript of {name!r} is not allowed", at)
            return LiteralError(f"name {name!r} is not allowed (only True, False and None)", at)
        if parent is None:
            return self._leaf(node)
        self.value(node, depth)  # raises if the leftmost operand is refused itself
        if isinstance(parent, ast.DictComp):
            self.value(parent.value, depth)
            node = parent.value
        what = _CONSTRUCT.get(type(parent))
        if type(parent) is ast.Set:
            return LiteralError("set literal is not allowed", self.pos(parent))
        if what is None:
            op = parent.ops[0] if isinstance(parent, ast.Compare) else parent.op  # type: ignore[attr-defined]
            what = f"operator {_OPERATOR.get(type(op), type(op).__name__)!r}"
        return LiteralError(f"{what} is not allowed", self.after(node))

    def _leaf(self, node: ast.AST) -> LiteralError:
        at = self.pos(node)
        if isinstance(node, ast.Lambda):
            return LiteralError("lambda is not allowed", at)
        if isinstance(node, ast.JoinedStr | ast.FormattedValue):
            return LiteralError("f-string is not allowed", at)
        if isinstance(node, ast.Starred):
            return LiteralError("unpacking ('*') is not allowed", at)
        if isinstance(node, ast.UnaryOp):
            return LiteralError(f"operator {_OPERATOR[type(node.op)]!r} is not allowed", at)
        if isinstance(node, ast.Yield | ast.YieldFrom | ast.Await):
            return LiteralError(f"keyword {'await' if isinstance(node, ast.Await) else 'yield'!r} is not allowed", at)
        return LiteralError(f"{type(node).__name__} expression is not allowed", at)

    # -- what the tree cannot show ------------------------------------------------------------------

    def expected_end(self) -> str:
        return "the end of the input" + "".join(f" or {c!r}" for c in self.stop)

    def check_bare_tuple(self, root: ast.AST) -> None:
        """``1, 2`` is a tuple to Python but not one literal: parentheses before the first item must outnumber
        those after it (``(1), 2`` has one each)."""
        if type(root) is not ast.Tuple or not root.elts:
            return
        first, start = root.elts[0], self.pos(root)
        comma = self.after(first)
        closes = self.text.count(")", self.offset(first.end_lineno, first.end_col_offset), comma)  # type: ignore[arg-type]
        if self.text.count("(", start, self.pos(first)) <= closes:
            raise LiteralError(f"expected {self.expected_end()} but found ','", comma)

    def describe(self, at: int) -> str:
        if at >= self.end:
            return "the end of the input"
        ch = self.text[at]
        if _STRING_RE.match(self.text, at) or re.match(r"""[rRuUbBfF]{1,2}['"]""", self.text[at : at + 3]):
            return "a string"
        if ch.isdigit() or (ch == "." and self.text[at + 1 : at + 2].isdigit()):
            return "a number"
        if m := re.compile(r"[^\W\d]\w*").match(self.text, at):
            return f"name {m.group()!r}"
        return repr(ch)

    def syntax_error(self, exc: SyntaxError) -> LiteralError:
        """Say what CPython refused the way a left-to-right reader would: what was expected, what was found."""
        msg = exc.msg or ""
        at = min(self.offset(exc.lineno or 1, (exc.offset or 1) - 1, chars=True), self.end)
        if m := re.match(r"'(.)' was never closed", msg):
            found = repr(self.text[self.end]) if self.end < len(self.text) else None
            prefix = f"found {found} but" if found else "unexpected end of input:"
            return LiteralError(f"{prefix} {m[1]!r} opened at offset {at} is not closed", self.end)
        if m := re.match(r"closing parenthesis '(.)' does not match opening parenthesis '(.)'", msg):
            return LiteralError(f"expected ',' or {_CLOSE[m[2]]!r} but found {m[1]!r}", at)
        if "too many nested parentheses" in msg:
            return self.too_deep()
        if m := re.search(r"value has (\d+) digits", msg):
            number = next((n for n in _STRING_OR_NUMBER.finditer(self.text, self.base, self.end)
                           if n[0][0].isdigit() and len(n[0].replace("_", "")) > MAX_INT_DIGITS), None)  # fmt: skip
            return LiteralError(self._too_many_digits(int(m[1])), number.start() if number else at)
        if "leading zeros" in msg:
            return LiteralError("leading zeros in a decimal integer are not allowed", at)
        if re.match(r"invalid (decimal|hexadecimal|octal|binary) literal|invalid digit", msg):
            start = at
            while start > self.base and (self.text[start - 1].isalnum() or self.text[start - 1] in "_."):
                start -= 1
            literal = re.compile(r"[\w.]+").match(self.text, start)
            return LiteralError(f"invalid number literal {literal[0] if literal else ''!r}", start)
        if m := re.match(
            r"\(unicode error\) 'unicodeescape' codec can't decode bytes in position (\d+)-\d+: (.*)", msg
        ):
            return self._escape_error(at, int(m[1]), m[2])
        if msg.startswith("f-string"):  # a malformed f-string is still an f-string
            string = next((s for s in _STRING_RE.finditer(self.text, self.base, self.end) if s.start() <= at), None)
            return LiteralError("f-string is not allowed", self._prefix_start(string.start() if string else at))
        if msg.startswith("invalid character"):
            return LiteralError(f"unexpected character {self.text[at]!r}", at)
        if not msg.startswith(("invalid syntax", "expression expected after", "unmatched")):
            return LiteralError(f"invalid literal: {msg}", at)
        if "forgot a comma" in msg:  # CPython points at the first of two values; the problem is the second
            try:
                ast.parse(self.text[at : self.offset(exc.end_lineno or 1, (exc.end_offset or 1) - 1, chars=True)],
                          mode="eval")  # fmt: skip
            except SyntaxError as inner:
                at += (inner.offset or 1) - 1 if inner.lineno == 1 else 0
        elif msg.startswith("expression expected after"):
            at += 1
        while at < self.end and self.text[at] in _WHITESPACE:
            at += 1
        return self._unexpected(at)

    def _unexpected(self, at: int) -> LiteralError:
        found = self.describe(at)
        word = found[6:-1] if found.startswith("name ") else ""
        if at < self.end and (self.text[at] in ";$?`" or found == "'!'" and not self.text.startswith("!=", at)):
            return LiteralError(f"unexpected character {self.text[at]!r}", at)
        if word in _WORD_OPERATORS:
            return LiteralError(f"operator {word!r} is not allowed", at)
        if keyword.iskeyword(word) and word not in ("True", "False", "None"):
            return LiteralError("lambda is not allowed" if word == "lambda" else f"keyword {word!r} is not allowed", at)
        try:  # a complete value before `at` (refused or not) comes first, as it does for a reader
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                head = ast.parse(self.text[self.base : at], mode="eval").body
        except SyntaxError as exc:
            m = re.match(r"'(.)' was never closed", exc.msg or "")
            before = self.text[self.base : at].rstrip(_WHITESPACE)[-1:]
            if self.text.startswith("*", at):
                return LiteralError(
                    f"unpacking ({'**' if self.text.startswith('**', at) else '*'!r}) is not allowed", at
                )
            if not before or before in "([{,:":
                return LiteralError(f"expected a value but found {found}", at)
            expected = f"',' or {_CLOSE[m[1]]!r}" if m else "',' or a closing bracket"
            return LiteralError(f"expected {expected} but found {found}", at)
        except (RecursionError, MemoryError):
            return self.too_deep()
        self.value(head)
        return LiteralError(f"expected {self.expected_end()} but found {found}", at)

    def _escape_error(self, at: int, unit: int, reason: str) -> LiteralError:
        """Point at the escape CPython's decoder refused (its position counts a non-ASCII character as 10)."""
        string = next((s for s in _STRING_RE.finditer(self.text, self.base, self.end) if s.start() <= at <= s.end()),
                      None)  # fmt: skip
        if string is None:
            return LiteralError(f"invalid escape: {reason}", at)
        body = string.start() + (3 if string[0][:3] in ("'''", '"""') else 1)
        i = body
        while unit > 0 and i < string.end():
            unit -= 1 if ord(self.text[i]) < 128 else 10
            i += 1
        if m := re.match(r"truncated \\([xuU])", reason):
            reason = f"truncated \\{m[1]} escape"
        elif reason == "illegal Unicode character":
            reason = "\\U escape out of the Unicode range"
        elif reason.startswith("malformed"):
            reason = "malformed \\N{...} escape"
        elif reason.startswith("unknown Unicode character name") and (n := re.match(r"\\N\{([^}]*)\}", self.text[i:])):
            reason = f"unknown Unicode character name {n[1]!r}"
        return LiteralError(reason, i)

    def too_deep(self) -> LiteralError:
        depth = 0
        for m in _STRING_OR_BRACKET.finditer(self.text, self.base, self.end):
            if m[0] in "([{":
                depth += 1
                if depth > self.max_depth:
                    return LiteralError(f"nesting deeper than {self.max_depth} levels is not allowed", m.start())
            elif m[0] in ")]}":
                depth -= 1
        limit = min(self.max_depth, _PARSER_MAX_DEPTH)
        return LiteralError(f"expression nested deeper than {limit} levels (brackets or operators) is not allowed",
                            self.base)  # fmt: skip

    def _prefix_start(self, quote: int) -> int:
        while quote > self.base and self.text[quote - 1] in "rRuUbBfF":
            quote -= 1
        return quote

    def lexical_error(self, at: int) -> LiteralError:
        """The scan stopped at ``at``, inside the field: a comment, a backslash or a quote."""
        ch = self.text[at]
        if ch == "#":
            return LiteralError("comment is not allowed", at)
        if ch == "\\":
            return LiteralError("backslash outside a string is not allowed", at)
        string = _STRING_RE.match(self.text, at)
        if string is not None:
            nxt = re.compile(_NEXT_STRING).match(self.text, string.end())
            start = nxt.end() - 1 if nxt else string.end()
            while start > string.end() and self.text[start - 1] in "rRuUbBfF":
                start -= 1
            return LiteralError("implicit concatenation of adjacent strings is not allowed", start)
        single_line = re.compile(rf"{ch}(?:[^\\{ch}\n\r]|\\[\s\S])*[\n\r]")
        if not self.text.startswith(ch * 3, at) and single_line.match(self.text, at):
            return LiteralError("unterminated string (newline in a single-quoted string)", self._prefix_start(at))
        return LiteralError("unterminated string", self._prefix_start(at))


def _check_size(text: str | bytes, max_bytes: int) -> str:
    if len(text) > max_bytes:
        raise LiteralError(f"input of {len(text)} characters is larger than the limit of {max_bytes} bytes", 0)
    if isinstance(text, bytes):
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise LiteralError("input is not valid UTF-8", exc.start) from None
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > max_bytes:
        raise LiteralError(f"input of {size} bytes is larger than the limit of {max_bytes} bytes", 0)
    return text


def parse_literal_prefix(
    text: str | bytes,
    start: int = 0,
    *,
    stop: str = "",
    max_bytes: int = 1_000_000,
    max_depth: int = 32,
    max_items: int = 100_000,
    json_constants: bool = False,
) -> tuple[Any, int]:
    """Read one literal starting at ``text[start:]``; return it and the offset where it ends.

    After the literal only whitespace may follow before the end of ``text`` or a character of ``stop``
    (e.g. ``"|"``); the returned offset is that of the end or of the stop character. Offsets in errors
    and in the result are character offsets into ``text``. ``max_bytes`` bounds the UTF-8 size of the
    whole ``text`` and is checked before parsing; ``max_depth`` bounds the nesting of containers
    (``[[1]]`` has depth 2; CPython itself refuses more than 200 nested brackets); ``max_items`` bounds the
    total number of list/tuple elements and dict entries.
    """
    source = _check_size(text, max_bytes)
    if not 0 <= start <= len(source):
        raise ValueError(f"start {start} is outside the input")
    while start < len(source) and source[start] in _WHITESPACE:  # CPython calls leading blanks an indent
        start += 1
    end = _scanner(stop).match(source, start).end()
    reader = _Reader(source, start, end, stop, max_depth=max_depth, max_items=max_items, json=json_constants)
    if end < len(source) and source[end] not in stop:
        raise reader.lexical_error(end)
    if (nul := source.find("\0", start, end)) >= 0:
        raise LiteralError("NUL character is not allowed", nul)
    if start == end:
        raise LiteralError("unexpected end of input, expected a value", start)
    try:
        with warnings.catch_warnings():  # unknown escapes stay as written; never print or raise for them
            warnings.simplefilter("ignore")
            tree = ast.parse(source[start:end], mode="eval")
    except SyntaxError as exc:
        raise reader.syntax_error(exc) from None
    except (RecursionError, MemoryError):  # CPython's own bound on operator chains / nesting
        raise reader.too_deep() from None
    reader.check_bare_tuple(tree.body)
    return reader.value(tree.body), end


def parse_literal(
    text: str | bytes,
    *,
    max_bytes: int = 1_000_000,
    max_depth: int = 32,
    max_items: int = 100_000,
    json_constants: bool = False,
) -> Any:
    """Parse ``text`` as one restricted Python literal (see the module docstring); tuples become lists.

    Raises :class:`LiteralError` naming what was refused and where.
    """
    value, _ = parse_literal_prefix(
        text, 0, max_bytes=max_bytes, max_depth=max_depth, max_items=max_items, json_constants=json_constants
    )
    return value
