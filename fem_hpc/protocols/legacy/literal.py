"""A restricted parser for Python literals, for the legacy FEM protocol.

The legacy orchestrator sends its documents as ``repr()`` of Python dicts; the old client read them with
``ast.literal_eval`` or even ``eval``. This module reads them with its own tokenizer and an iterative
(non-recursive) parser that accepts only:

* dict ``{k: v}`` (keys: str, int, float, True/False/None), list ``[...]``, tuple ``(...)`` (returned as a
  list; ``(x)`` is just ``x``),
* str: single, double or triple quoted, with Python's escapes; prefixes ``u`` and ``r`` are accepted,
  ``b``/``f``/``t`` (bytes, f-strings, template strings) are refused,
* int (decimal, ``0x``/``0o``/``0b``, ``_`` separators, at most :data:`MAX_INT_DIGITS` digits), finite
  float (``1.5``, ``.5``, ``1e-3``; ``1e309`` is refused), with an optional unary minus,
* ``True``, ``False``, ``None`` (and, with ``json_constants=True``, JSON's ``true``/``false``/``null``).

Everything else (calls, attribute access, subscripts, other names, operators, lambdas, comprehensions,
sets, complex numbers, comments, adjacent-string concatenation, NUL characters, ...) raises
:class:`LiteralError` with a message naming what was found and the character offset where it was found.
Limits are enforced while reading: the input size before anything else, the nesting depth when a bracket
opens, the number of items when one is added, so hostile input fails fast and never recurses.
"""

from __future__ import annotations

import keyword
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MAX_INT_DIGITS", "LiteralError", "parse_literal", "parse_literal_prefix"]

MAX_INT_DIGITS = 4300  # the same bound CPython puts on int <-> str conversions
_MAX_NUMBER_CHARS = MAX_INT_DIGITS + 64


class LiteralError(ValueError):
    """A literal was refused. ``message`` says what was found, ``position`` is a character offset."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"{message} at offset {position}")
        self.message = message
        self.position = position


@dataclass(frozen=True, slots=True)
class _Tok:
    kind: str  # "op", "str", "num", "name", "end"
    text: str
    start: int
    value: Any = None


_NO_KEY = object()
_CLOSE = {"[": "]", "(": ")", "{": "}"}
_CONSTANTS: dict[str, Any] = {"True": True, "False": False, "None": None}
_JSON_CONSTANTS: dict[str, Any] = {"true": True, "false": False, "null": None}
_WHITESPACE = " \t\n\r\f"
_NAME_RE = re.compile(r"[^\W\d]\w*")
_DIGITS = r"[0-9](?:_?[0-9])*"
_EXPONENT = rf"[eE][+-]?{_DIGITS}"
_NUMBER_RE = re.compile(
    rf"""
      (?P<hex>0[xX](?:_?[0-9a-fA-F])+)
    | (?P<oct>0[oO](?:_?[0-7])+)
    | (?P<bin>0[bB](?:_?[01])+)
    | (?P<float>(?:{_DIGITS})?\.{_DIGITS}(?:{_EXPONENT})?
              | {_DIGITS}\.(?:{_EXPONENT})?
              | {_DIGITS}{_EXPONENT})
    | (?P<int>{_DIGITS})
    """,
    re.VERBOSE,
)
_OPS = sorted(
    [
        "...", "**=", "//=", ">>=", "<<=",
        "**", "//", "<<", ">>", "<=", ">=", "==", "!=", "->", ":=",
        "+=", "-=", "*=", "/=", "%=", "&=", "|=", "^=", "@=",
        "{", "}", "[", "]", "(", ")", ",", ":", ".", "+", "-", "*", "/", "%", "@", "&", "|", "^", "~",
        "<", ">", "=", "!",
    ],
    key=len,
    reverse=True,
)  # fmt: skip
_PUNCTUATION = frozenset("{}[](),")
_OPERATORS = frozenset(_OPS) - {"{", "}", "[", "]", "(", ")", ",", ":", ".", "..."}
_WORD_OPERATORS = frozenset({"and", "or", "not", "in", "is"})
_SIMPLE_ESCAPES = {
    "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t",
    "v": "\v",
}  # fmt: skip
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_OCTAL_RE = re.compile(r"[0-7]{1,3}")
_HEX_RE = {n: re.compile(rf"[0-9a-fA-F]{{{n}}}") for n in _HEX_ESCAPES.values()}
_NAMED_RE = re.compile(r"\{([^}\n]{1,100})\}")
_STRING_END = {
    ("'", False): re.compile(r"[\\'\n\r]"),
    ('"', False): re.compile(r'[\\"\n\r]'),
    ("'", True): re.compile(r"[\\']"),
    ('"', True): re.compile(r'[\\"]'),
}


@dataclass(slots=True)
class _Frame:
    kind: str  # "[", "(", "{"
    start: int
    items: list[Any] = field(default_factory=list)
    mapping: dict[Any, Any] = field(default_factory=dict)
    key: Any = _NO_KEY
    comma: bool = False

    def result(self) -> Any:
        if self.kind == "{":
            return self.mapping
        if self.kind == "(" and len(self.items) == 1 and not self.comma:
            return self.items[0]  # a parenthesised value, not a tuple
        return self.items


class _Parser:
    def __init__(self, text: str, pos: int, *, max_depth: int, max_items: int, stop: str, json: bool):
        self.text = text
        self.pos = pos
        self.max_depth = max_depth
        self.max_items = max_items
        self.stop = stop
        self.json = json
        self.items = 0
        self.peeked: _Tok | None = None

    # -- lexer ---------------------------------------------------------------------------------------

    def next(self) -> _Tok:
        if self.peeked is not None:
            tok, self.peeked = self.peeked, None
            return tok
        return self._lex()

    def peek(self) -> _Tok:
        if self.peeked is None:
            self.peeked = self._lex()
        return self.peeked

    def skip_whitespace(self) -> int:
        text, pos, n = self.text, self.pos, len(self.text)
        while pos < n and text[pos] in _WHITESPACE:
            pos += 1
        self.pos = pos
        return pos

    def _lex(self) -> _Tok:
        pos = self.skip_whitespace()
        text = self.text
        if pos >= len(text):
            return _Tok("end", "", pos)
        ch = text[pos]
        if ch in "'\"":
            return self._lex_string(pos, pos, raw=False)
        if ch.isdigit() or (ch == "." and text[pos + 1 : pos + 2].isdigit()):
            return self._lex_number(pos)
        if ch in _PUNCTUATION:  # fast path: none of these starts a longer operator
            self.pos = pos + 1
            return _Tok("op", ch, pos)
        m = _NAME_RE.match(text, pos)
        if m:
            name = m.group()
            if m.end() < len(text) and text[m.end()] in "'\"":
                return self._lex_prefixed_string(name, pos, m.end())
            self.pos = m.end()
            return _Tok("name", name, pos)
        for op in _OPS:
            if text.startswith(op, pos):
                self.pos = pos + len(op)
                return _Tok("op", op, pos)
        if ch == "#":
            raise LiteralError("comment is not allowed", pos)
        if ch == "\\":
            raise LiteralError("backslash outside a string is not allowed", pos)
        raise LiteralError(f"unexpected character {ch!r}", pos)

    def _lex_prefixed_string(self, prefix: str, pos: int, quote_pos: int) -> _Tok:
        low = prefix.lower()
        if low in ("u", "r"):
            return self._lex_string(pos, quote_pos, raw=low == "r")
        if "b" in low and len(low) <= 2:
            raise LiteralError("bytes literal is not allowed", pos)
        if "f" in low and len(low) <= 2:
            raise LiteralError("f-string is not allowed", pos)
        if "t" in low and len(low) <= 2:
            raise LiteralError("template string is not allowed", pos)
        raise LiteralError(f"string prefix {prefix!r} is not allowed", pos)

    def _lex_string(self, start: int, quote_pos: int, *, raw: bool) -> _Tok:
        text, n = self.text, len(self.text)
        quote = text[quote_pos]
        triple = text.startswith(quote * 3, quote_pos)
        body_start = quote_pos + (3 if triple else 1)
        special = _STRING_END[(quote, triple)]
        i = body_start
        while True:
            m = special.search(text, i)
            if m is None:
                raise LiteralError("unterminated string", start)
            j = m.start()
            c = text[j]
            if c == "\\":
                if j + 1 >= n:
                    raise LiteralError("unterminated string", start)
                i = j + 3 if text.startswith("\r\n", j + 1) else j + 2
                continue
            if c in "\n\r":
                raise LiteralError("unterminated string (newline in a single-quoted string)", start)
            if triple:
                if text.startswith(quote * 3, j):
                    body_end, end = j, j + 3
                    break
                i = j + 1
                continue
            body_end, end = j, j + 1
            break
        body = text[body_start:body_end]
        if "\0" in body:  # repr() writes \x00; a raw NUL can only be hostile (and cannot reach argv or env)
            raise LiteralError("NUL character in a string is not allowed", body_start + body.index("\0"))
        self.pos = end
        value = body if raw else _unescape(body, body_start)
        return _Tok("str", text[start:end], start, value)

    def _lex_number(self, pos: int) -> _Tok:
        text = self.text
        m = _NUMBER_RE.match(text, pos)
        if m is None:  # pragma: no cover - the caller saw a digit or ".digit"
            raise LiteralError("invalid number", pos)
        end = m.end()
        token = m.group()
        following = text[end : end + 1]
        if following in ("j", "J"):
            raise LiteralError("complex number is not allowed", pos)
        if following and (following.isalnum() or following == "_"):
            raise LiteralError(f"invalid number literal {text[pos : end + 1]!r}", pos)
        digits = token.replace("_", "")
        kind = m.lastgroup
        if kind == "float":
            if len(token) > _MAX_NUMBER_CHARS:
                raise LiteralError(f"number literal of {len(token)} characters is too long", pos)
            value: Any = float(digits)
            if not math.isfinite(value):  # 1e309: JSON cannot carry inf, and no real document means it
                raise LiteralError(f"float literal {token!r} is out of range (not finite)", pos)
        else:
            body = digits if kind == "int" else digits[2:]
            if len(body) > MAX_INT_DIGITS:
                raise LiteralError(
                    f"integer literal with {len(body)} digits is too large (at most {MAX_INT_DIGITS})", pos
                )
            if kind == "int" and len(body) > 1 and body[0] == "0" and body.strip("0"):
                raise LiteralError("leading zeros in a decimal integer are not allowed", pos)
            value = int(body, {"int": 10, "hex": 16, "oct": 8, "bin": 2}[kind or "int"])
        self.pos = end
        return _Tok("num", token, pos, value)

    # -- parser --------------------------------------------------------------------------------------

    def parse(self) -> Any:
        stack: list[_Frame] = []
        while True:
            tok = self.next()
            start = tok.start
            if tok.kind == "op" and tok.text in _CLOSE:
                if len(stack) >= self.max_depth:
                    raise LiteralError(f"nesting deeper than {self.max_depth} levels is not allowed", start)
                frame = _Frame(tok.text, start)
                stack.append(frame)
                nxt = self.peek()
                if not (nxt.kind == "op" and nxt.text == _CLOSE[tok.text]):
                    continue
                self.next()
                stack.pop()
                value = frame.result()
            else:
                value = self._scalar(tok, stack)
            last = tok
            # Hand the finished value to the enclosing containers, closing those that end here.
            while True:
                if not stack:
                    return value
                frame = stack[-1]
                closer = _CLOSE[frame.kind]
                if frame.kind == "{" and frame.key is _NO_KEY:
                    if isinstance(value, list | dict):
                        raise LiteralError("dict key must be a string, number, True, False or None", start)
                    frame.key = value
                    tok = self.next()
                    if tok.kind == "op" and tok.text == ":":
                        break
                    if tok.kind == "op" and tok.text in (",", "}"):
                        raise LiteralError("set literal is not allowed", frame.start)
                    raise self._unexpected(tok, "':'", stack, last)
                self.items += 1
                if self.items > self.max_items:
                    raise LiteralError(f"more than {self.max_items} items", start)
                if frame.kind == "{":
                    frame.mapping[frame.key] = value
                    frame.key = _NO_KEY
                else:
                    frame.items.append(value)
                tok = self.next()
                if tok.kind == "op" and tok.text == ",":
                    frame.comma = True
                    nxt = self.peek()
                    if not (nxt.kind == "op" and nxt.text == closer):
                        break
                    tok = self.next()
                if tok.kind == "op" and tok.text == closer:
                    stack.pop()
                    value, start, last = frame.result(), frame.start, tok
                    continue
                raise self._unexpected(tok, f"',' or {closer!r}", stack, last)

    def _scalar(self, tok: _Tok, stack: list[_Frame]) -> Any:
        if tok.kind in ("str", "num"):
            return tok.value
        if tok.kind == "name":
            if tok.text in _CONSTANTS:
                return _CONSTANTS[tok.text]
            if self.json and tok.text in _JSON_CONSTANTS:
                return _JSON_CONSTANTS[tok.text]
            raise self._bad_name(tok)
        if tok.kind == "end":
            raise self._end_of_input(tok, stack, "a value")
        op = tok.text
        if op == "-":
            nxt = self.next()
            if nxt.kind == "num":
                return -nxt.value
            raise LiteralError("unary minus is only allowed before a number", tok.start)
        if op == "...":
            raise LiteralError("Ellipsis is not allowed", tok.start)
        if op in ("*", "**"):
            raise LiteralError(f"unpacking ({op!r}) is not allowed", tok.start)
        if op in _OPERATORS and op[0] not in self.stop:
            raise LiteralError(f"operator {op!r} is not allowed", tok.start)
        raise self._unexpected_op(tok, stack, "a value")

    def _bad_name(self, tok: _Tok) -> LiteralError:
        name = tok.text
        if name == "lambda":
            return LiteralError("lambda is not allowed", tok.start)
        if name in _WORD_OPERATORS:
            return LiteralError(f"operator {name!r} is not allowed", tok.start)
        if keyword.iskeyword(name):
            return LiteralError(f"keyword {name!r} is not allowed", tok.start)
        try:
            nxt: _Tok | None = self.peek()
        except LiteralError:
            nxt = None
        if nxt is not None and nxt.kind == "op":
            if nxt.text == "(":
                return LiteralError(f"call of {name!r} is not allowed", tok.start)
            if nxt.text == ".":
                return LiteralError(f"attribute access on {name!r} is not allowed", tok.start)
            if nxt.text == "[":
                return LiteralError(f"subscript of {name!r} is not allowed", tok.start)
        return LiteralError(f"name {name!r} is not allowed (only True, False and None)", tok.start)

    def _unexpected(self, tok: _Tok, expected: str, stack: list[_Frame], last: _Tok) -> LiteralError:
        """What follows a complete value is neither a separator nor a closing bracket."""
        if tok.kind == "end":
            return self._end_of_input(tok, stack, expected)
        if tok.kind == "op":
            op = tok.text
            if op == "(":
                return LiteralError("call is not allowed", tok.start)
            if op == ".":
                return LiteralError("attribute access is not allowed", tok.start)
            if op == "[":
                return LiteralError("subscript is not allowed", tok.start)
            if op in _OPERATORS and op[0] not in self.stop:
                return LiteralError(f"operator {op!r} is not allowed", tok.start)
            return self._unexpected_op(tok, stack, expected)
        if tok.kind == "name":
            if tok.text == "for":
                return LiteralError("comprehension is not allowed", tok.start)
            if tok.text == "if":
                return LiteralError("conditional expression is not allowed", tok.start)
            if tok.text in _WORD_OPERATORS:
                return LiteralError(f"operator {tok.text!r} is not allowed", tok.start)
            return LiteralError(f"expected {expected} but found name {tok.text!r}", tok.start)
        if tok.kind == "str" and last.kind == "str":
            return LiteralError("implicit concatenation of adjacent strings is not allowed", tok.start)
        what = "a string" if tok.kind == "str" else "a number"
        return LiteralError(f"expected {expected} but found {what}", tok.start)

    def _unexpected_op(self, tok: _Tok, stack: list[_Frame], expected: str) -> LiteralError:
        if tok.text[0] in self.stop and stack:
            frame = stack[-1]
            return LiteralError(
                f"found {tok.text[0]!r} but {frame.kind!r} opened at offset {frame.start} is not closed",
                tok.start,
            )
        return LiteralError(f"expected {expected} but found {tok.text!r}", tok.start)

    def _end_of_input(self, tok: _Tok, stack: list[_Frame], expected: str) -> LiteralError:
        if stack:
            frame = stack[-1]
            return LiteralError(
                f"unexpected end of input: {frame.kind!r} opened at offset {frame.start} is not closed",
                tok.start,
            )
        return LiteralError(f"unexpected end of input, expected {expected}", tok.start)


def _unescape(body: str, base: int) -> str:
    """Apply Python's string escapes to ``body`` (which starts at offset ``base`` of the input)."""
    if "\\" not in body:
        return body
    out: list[str] = []
    i = 0
    while True:
        j = body.find("\\", i)
        if j < 0:
            out.append(body[i:])
            return "".join(out)
        out.append(body[i:j])
        c = body[j + 1]  # the lexer guarantees a character after every backslash
        k = j + 2
        if c == "\n":
            pass  # line continuation
        elif c == "\r":
            if body.startswith("\n", k):
                k += 1
        elif c in _SIMPLE_ESCAPES:
            out.append(_SIMPLE_ESCAPES[c])
        elif c in "01234567":
            m = _OCTAL_RE.match(body, j + 1)
            assert m is not None
            out.append(chr(int(m.group(), 8)))
            k = m.end()
        elif c in _HEX_ESCAPES:
            width = _HEX_ESCAPES[c]
            m = _HEX_RE[width].match(body, j + 2)
            if m is None:
                raise LiteralError(f"truncated \\{c} escape", base + j)
            code = int(m.group(), 16)
            if code > 0x10FFFF:
                raise LiteralError(f"\\{c} escape out of the Unicode range", base + j)
            out.append(chr(code))
            k = m.end()
        elif c == "N":
            m = _NAMED_RE.match(body, j + 2)
            if m is None:
                raise LiteralError("malformed \\N{...} escape", base + j)
            try:
                out.append(unicodedata.lookup(m.group(1)))
            except KeyError:
                raise LiteralError(f"unknown Unicode character name {m.group(1)!r}", base + j) from None
            k = m.end()
        else:
            out.append("\\" + c)  # unknown escapes stay as they are, like Python's
        i = k


def _check_size(text: str | bytes, max_bytes: int) -> str:
    if len(text) > max_bytes:
        raise LiteralError(
            f"input of {len(text)} characters is larger than the limit of {max_bytes} bytes", 0
        )
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
    (``[[1]]`` has depth 2); ``max_items`` bounds the total number of list/tuple elements and dict
    entries.
    """
    source = _check_size(text, max_bytes)
    if not 0 <= start <= len(source):
        raise ValueError(f"start {start} is outside the input")
    parser = _Parser(source, start, max_depth=max_depth, max_items=max_items, stop=stop, json=json_constants)
    value = parser.parse()
    assert parser.peeked is None
    end = parser.skip_whitespace()
    if end < len(source) and source[end] not in stop:
        tok = parser.next()
        last = _Tok("str" if isinstance(value, str) else "value", "", start)
        expected = "the end of the input" + "".join(f" or {c!r}" for c in stop)
        raise parser._unexpected(tok, expected, [], last)
    return value, end


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
