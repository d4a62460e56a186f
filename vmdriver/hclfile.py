"""Reading HCL2 job files with python-hcl2 into plain, normalized Python data.

python-hcl2 returns every block as a list of one-key dicts and keeps block
labels as keys; :func:`blocks` and :func:`labelled` turn that into the shapes
the models want, and parse errors become one :class:`JobFileError` line.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import hcl2
from hcl2 import SerializationOptions
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedInput, UnexpectedToken

from vmdriver.errors import JobFileError

_OPTIONS = SerializationOptions(
    strip_string_quotes=True, explicit_blocks=False, with_comments=False, with_meta=False
)
#: The size past which a job file is refused unread.
MAX_JOB_FILE = 4 * 1024 * 1024
_ESCAPES = re.compile(r"\\(.)")


def _unescape(text: str) -> str:
    table = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}
    return _ESCAPES.sub(lambda m: table.get(m.group(1), m.group(0)), text)


def _clean(value: Any) -> Any:
    """Apply HCL string escapes (python-hcl2 leaves them in) throughout."""
    if isinstance(value, str):
        return _unescape(value) if "\\" in value else value
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    return value


def loads(text: str, where: str) -> dict[str, Any]:
    """Parse HCL text; errors name ``where`` and the line."""
    try:
        data = hcl2.loads(text, serialization_options=_OPTIONS)
    except UnexpectedInput as exc:
        what = "unexpected character"
        if isinstance(exc, UnexpectedToken):
            what = f"unexpected {exc.token!r}"
        elif isinstance(exc, UnexpectedCharacters):
            what = f"unexpected character {exc.char!r}"
        raise JobFileError(f"HCL syntax error: {what}",
                           where=f"{where}:{exc.line}:{exc.column}") from None
    except (LarkError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            RecursionError, AssertionError) as exc:
        # python-hcl2 raises a zoo of exceptions for odd input; each is a bad file.
        raise JobFileError(f"cannot parse HCL: {type(exc).__name__}: {str(exc)[:160]}",
                           where=where) from None
    if not isinstance(data, dict):
        raise JobFileError("expected HCL blocks at top level", where=where)
    return _clean(data)  # type: ignore[no-any-return]


def load(path: Path) -> dict[str, Any]:
    """Read and parse an HCL file."""
    try:
        if path.stat().st_size > MAX_JOB_FILE:
            raise JobFileError(f"file is larger than {MAX_JOB_FILE} bytes", where=str(path))
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobFileError("file does not exist", where=str(path)) from None
    except UnicodeDecodeError:
        raise JobFileError("file is not UTF-8 text", where=str(path)) from None
    except OSError as exc:
        raise JobFileError(f"cannot read file: {exc.strerror}", where=str(path)) from None
    return loads(text, str(path))


def blocks(value: Any, where: str) -> list[dict[str, Any]]:
    """Unlabelled blocks (``resources { }``): a list of bodies."""
    if value is None:
        return []
    items = value if isinstance(value, list) else [value]
    for item in items:
        if not isinstance(item, dict):
            raise JobFileError("expected a block", where=where, value=item)
    return items


def one_block(value: Any, where: str) -> dict[str, Any]:
    """A block that may appear at most once; an empty body if absent."""
    items = blocks(value, where)
    if len(items) > 1:
        raise JobFileError("block may appear only once", where=where)
    return items[0] if items else {}


def labelled(value: Any, where: str) -> list[tuple[str, dict[str, Any]]]:
    """Labelled blocks (``task "web" { }``): ``(label, body)`` pairs in file order."""
    out: list[tuple[str, dict[str, Any]]] = []
    for item in blocks(value, where):
        if len(item) != 1:
            raise JobFileError("expected a block with one label", where=where)
        (label, body), = item.items()
        if not isinstance(body, dict):
            raise JobFileError("expected a labelled block", where=f"{where} {label!r}")
        out.append((label, body))
    return out
