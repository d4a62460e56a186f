"""QEMU's JSON dialect, as its command line reads ``-device {...}``, ``-blockdev {...}`` ...

QEMU's parser (``qobject/json-lexer.c``) differs from RFC 8259 where it matters
for reading a job's args exactly as QEMU will: strings may be quoted with ``'``
as well as ``"`` (``\\'`` escapes the single quote), and ``\\u0000`` is refused.
Objects come back as lists of ``(key, value)`` pairs, so a key given twice is
seen twice (whatever QEMU does with it, every value gets checked).
"""

from __future__ import annotations

import re

#: A parsed JSON value; objects are lists of pairs, arrays are tuples.
JSONValue = (str | int | float | bool | None | list[tuple[str, "JSONValue"]]
             | tuple["JSONValue", ...])

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\n\r]+)
  | (?P<punct>[{}\[\]:,])
  | (?P<dq>"(?:[^"\\]|\\.)*")
  | (?P<sq>'(?:[^'\\]|\\.)*')
  | (?P<num>-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?)
  | (?P<word>[A-Za-z]+)
""", re.VERBOSE | re.DOTALL)
_ESCAPES = {'"': '"', "'": "'", "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n",
            "r": "\r", "t": "\t"}
_WORDS: dict[str, JSONValue] = {"true": True, "false": False, "null": None}


class JSONSyntaxError(ValueError):
    """The text is not JSON QEMU would accept."""


def _unquote(token: str) -> str:
    out: list[str] = []
    i, body = 0, token[1:-1]
    while i < len(body):
        ch = body[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        esc = body[i + 1]
        if esc == "u":
            code = body[i + 2:i + 6]
            if not re.fullmatch(r"[0-9A-Fa-f]{4}", code) or int(code, 16) == 0:
                raise JSONSyntaxError(f"invalid escape \\u{code}")
            out.append(chr(int(code, 16)))
            i += 6
            continue
        if esc not in _ESCAPES:
            raise JSONSyntaxError(f"invalid escape \\{esc}")
        out.append(_ESCAPES[esc])
        i += 2
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, str]]:
    pos, out = 0, []
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise JSONSyntaxError(f"unexpected {text[pos:pos + 10]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind != "ws":
            out.append((kind, m.group()))
    return out


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, str]:
        return self.toks[self.i] if self.i < len(self.toks) else ("end", "")

    def take(self, want: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if tok[0] == "end" or (want is not None and tok[1] != want):
            raise JSONSyntaxError(f"expected {want or 'a value'}, got {tok[1] or 'the end'!r}")
        self.i += 1
        return tok

    def value(self) -> JSONValue:
        kind, text = self.take()
        if kind in ("dq", "sq"):
            return _unquote(text)
        if kind == "num":
            return float(text) if any(c in text for c in ".eE") else int(text)
        if kind == "word" and text in _WORDS:
            return _WORDS[text]
        if text == "{":
            return self.members()
        if text == "[":
            return self.elements()
        raise JSONSyntaxError(f"unexpected {text!r}")

    def members(self) -> list[tuple[str, JSONValue]]:
        pairs: list[tuple[str, JSONValue]] = []
        if self.peek()[1] == "}":
            self.take()
            return pairs
        while True:
            kind, key = self.take()
            if kind not in ("dq", "sq"):
                raise JSONSyntaxError(f"object key must be a string, got {key!r}")
            self.take(":")
            pairs.append((_unquote(key), self.value()))
            if self.take()[1] == "}":
                return pairs
            self.i -= 1
            self.take(",")

    def elements(self) -> tuple[JSONValue, ...]:
        items: list[JSONValue] = []
        if self.peek()[1] == "]":
            self.take()
            return ()
        while True:
            items.append(self.value())
            if self.take()[1] == "]":
                return tuple(items)
            self.i -= 1
            self.take(",")


def parse(text: str) -> JSONValue:
    """One JSON value in QEMU's dialect; raises :class:`JSONSyntaxError`."""
    parser = _Parser(text)
    result = parser.value()
    if parser.peek()[0] != "end":
        raise JSONSyntaxError("text after the JSON value")
    return result


def flatten(data: JSONValue, prefix: str = "") -> list[tuple[str, str | int | float | bool | None]]:
    """Dotted ``(key, scalar)`` pairs: ``{"file": {"filename": x}}`` → ``file.filename``."""
    if isinstance(data, list):
        return [pair for key, val in data
                for pair in flatten(val, f"{prefix}.{key}" if prefix else key)]
    if isinstance(data, tuple):
        return [pair for i, val in enumerate(data) for pair in flatten(val, f"{prefix}.{i}")]
    return [(prefix, data)]
