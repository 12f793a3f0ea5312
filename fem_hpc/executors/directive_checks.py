"""Checks for values that go into scheduler directives (`#SBATCH`, `#PBS`).

sbatch tokenizes its directive lines itself (whitespace, quotes, backslash, '#' comments, %-patterns
in paths), and Debian's qsub wrapper passes some of them through a shell. Rather than quote for
each of those readers, a value is restricted to characters that are plain in all of them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

SAFE_WORD_RE = re.compile(r"[A-Za-z0-9_.@+-]{1,256}")  # partition, queue, account
SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9_./-]*")


def reject_control(what: str, value: str) -> None:
    if any(c in value for c in "\n\r\0"):
        raise ValueError(f"{what} {value!r} contains a newline or NUL")


def check_plain(what: str, value: str, pattern: re.Pattern[str]) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, not {type(value).__name__}")
    reject_control(what, value)
    if not pattern.fullmatch(value):
        raise ValueError(f"{what} {value!r} has characters other than {pattern.pattern}")
    return value


def check_path(what: str, value: str | os.PathLike[str], where: str) -> str:
    text = os.fspath(value)
    reject_control(what, text)
    if not SAFE_PATH_RE.fullmatch(text):
        raise ValueError(f"{what} {text!r} must be an absolute path of letters, digits and _ . - / only ({where})")
    return text


def directive_lines(prefix: str, options: list[str], extra_directives: Sequence[str]) -> list[str]:
    """`#SBATCH`/`#PBS` lines: the computed options, then the site's trusted extra directives
    (an option, or a whole line with the prefix), last so that they can override."""
    out = [f"{prefix} {option}" for option in options]
    for extra in extra_directives:
        reject_control("extra directive", extra)
        text = extra.strip()
        if text:
            out.append(text if text.startswith(prefix) else f"{prefix} {text}")
    return out
