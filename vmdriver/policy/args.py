"""Checking a job's extra QEMU ``args``: flags against the allowlist, paths against policy.

The walk follows QEMU's own parser (``vl.c``): an element starting with ``-`` is
an option (``--x`` is ``-x``); an option that takes a value consumes the next
element whatever it looks like; any other element is a disk image (``-hda``).
Where vmdriver's reading and QEMU's could differ, every reading is checked:

* a flag is recognised however spelled (``-x``, ``--x``, ``-x=v``, `` -x ``) and
  gets the same allowlist verdict; QEMU reads the odd spellings as a disk image
  name or an error, so they are also checked as a path;
* an element after an option vmdriver does not know is checked both as that
  option's value and as a disk image.

Values are checked by what the option does with them (tables in
:mod:`vmdriver.policy.options`): whole paths, ``key=value,...`` lists (and
their JSON form) whose path keys must pass :func:`~vmdriver.policy.paths.resolve_allowed`,
character-device specs (``file:/x``). Keys naming programs (``script=``) or
file descriptors (``fd=``) are refused outright.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from vmdriver.errors import PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.policy import options as o
from vmdriver.policy.paths import PathPolicy, local_path, resolve_allowed

#: ``name -> True/False`` (takes a value or not), ``None`` if QEMU has no such option.
Arity = Callable[[str], bool | None]
#: Called with each existing image file a block option names: inspects what it references.
ImageCheck = Callable[[Path, str | None, str], object]


def flag_name(arg: str) -> tuple[str, str | None] | None:
    """``(name, inline value)`` if ``arg`` is a flag in any spelling, else ``None``.

    ``"-drive"``, ``"--drive"``, ``" -drive "`` and ``"-drive=x"`` all give ``drive``;
    ``"-"`` gives an empty name (QEMU: "invalid option").
    """
    text = arg.strip()
    if not text.startswith("-"):
        return None
    name, sep, inline = text.lstrip("-").partition("=")
    return name.strip(), (inline if sep else None)


def allowlist_names(host: HostConfig) -> frozenset[str]:
    """The allowlist as bare option names, however the operator spelled them."""
    return frozenset(a.strip().lstrip("-") for a in host.args_allowlist)


def static_arity(name: str) -> bool | None:
    """Whether QEMU 7.2's ``-name`` takes a value, from the tables; ``None`` if unknown."""
    if name in o.WITH_ARG:
        return True
    if name in o.NO_ARG:
        return False
    return None


def split_opts(text: str) -> Iterator[tuple[str, str | None]]:
    """``key=value,...`` pairs as QEMU's option parser reads them (``,,`` is a comma).

    A bare element yields ``(element, None)``.
    """
    i, n = 0, len(text)
    while i < n:
        j = i
        while j < n and text[j] not in "=,":
            j += 1
        key = text[i:j]
        if j < n and text[j] == "=":
            value: list[str] = []
            j += 1
            while j < n:
                if text[j] == ",":
                    if j + 1 < n and text[j + 1] == ",":
                        value.append(",")
                        j += 2
                        continue
                    break
                value.append(text[j])
                j += 1
            yield key, "".join(value)
        else:
            yield key, None
        i = j + 1


def _flatten(data: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(data, dict):
        for k, v in data.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            yield from _flatten(v, f"{prefix}.{i}")
    else:
        yield prefix, data


class ArgsChecker:
    """One pass over a job's args. Raises the first violation found."""

    def __init__(self, host: HostConfig, policy: PathPolicy, *, where: str,
                 arity: Arity | None = None, image_check: ImageCheck | None = None) -> None:
        self.allow = allowlist_names(host)
        self.allowlist_text = sorted(host.args_allowlist)
        self.policy = policy
        self.where = where
        self.arity = arity or static_arity
        self.image_check = image_check

    def check(self, args: tuple[str, ...]) -> None:
        """Walk ``args`` as QEMU would; raise on the first element policy refuses."""
        i = 0
        while i < len(args):
            arg = args[i]
            here = f"{self.where}[{i}]"
            if not isinstance(arg, str):
                raise SpecError("args must be strings", where=here, value=arg)
            flag = flag_name(arg)
            if flag is None:
                self._positional(arg, here)
                i += 1
                continue
            name, inline = flag
            self._check_flag(name, arg, here)
            exact = arg in (f"-{name}", f"--{name}")
            if not exact:
                # QEMU reads " -x" as a disk image named " -x": check that reading too.
                self._positional(arg, here)
            if inline is not None:
                self._value(name, inline, here)
                i += 1
                continue
            takes = self.arity(name) if exact else False
            if takes and i + 1 < len(args):
                self._value(name, args[i + 1], f"{self.where}[{i + 1}]")
                i += 2
                continue
            if takes is None and i + 1 < len(args) and flag_name(args[i + 1]) is None:
                # Unknown option: its next element may be its value or a disk image.
                self._unknown_value(name, args[i + 1], f"{self.where}[{i + 1}]")
                i += 2
                continue
            i += 1

    # Section: flags

    def _check_flag(self, name: str, arg: str, here: str) -> None:
        if not name:
            raise SpecError("not a QEMU option", where=here, value=arg)
        listed = name in self.allow
        if name in o.REFUSED_UNLESS_LISTED and not listed:
            raise PolicyError(f"option -{name} is refused unless args_allowlist lists it: it "
                              f"{o.REFUSED_UNLESS_LISTED[name]}", where=here, value=arg)
        if self.allow and not listed:
            raise PolicyError("flag is not in args_allowlist", where=here, value=arg,
                              allowed=self.allowlist_text)

    # Section: values

    def _positional(self, value: str, here: str) -> None:
        """A non-option element: QEMU opens it as a disk image."""
        self._path(value, here, block=True, option="hda")

    def _unknown_value(self, name: str, value: str, here: str) -> None:
        self._positional(value, here)
        self._keyval(name, value, here)

    def _value(self, name: str, value: str, here: str) -> None:
        if name in o.WHOLE_PATH:
            self._path(value, here, block=name in o.BLOCK_WHOLE_PATH, option=name)
        if name in o.CHARDEV_SPEC:
            self._chardev_spec(name, value, here)
        if name == "vnc" and value.startswith("unix:"):
            self._path(value[5:].split(",", 1)[0], here, block=False, option=name)
        if name in o.KEYVAL:
            self._keyval(name, value, here)
        elif name not in o.WHOLE_PATH | o.CHARDEV_SPEC and static_arity(name) is None:
            self._unknown_value(name, value, here)

    def _chardev_spec(self, name: str, value: str, here: str) -> None:
        spec = value
        while spec.startswith("mon:"):
            if not {"monitor", "mon"} & self.allow:
                raise PolicyError("a monitor on a character device ('mon:') is refused unless "
                                  "args_allowlist lists -monitor", where=here, value=value)
            spec = spec[4:]
        for prefix in o.CHARDEV_PATH_PREFIXES:
            if spec.startswith(prefix):
                self._path(next(split_opts(spec[len(prefix):]), ("", None))[0] or "", here,
                           block=False, option=name)
                return
        if spec.startswith("/"):
            self._path(spec, here, block=False, option=name)

    def _keyval(self, name: str, value: str, here: str) -> None:
        text = value.strip()
        if text.startswith("{"):
            try:
                data = json.loads(text)
            except ValueError:
                raise SpecError(f"-{name} value starts with '{{' but is not valid JSON",
                                where=here, value=value) from None
            pairs: list[tuple[str, Any]] = list(_flatten(data))
        else:
            pairs = list(split_opts(value))
            if name in o.IMPLIED_PATH_FIRST and pairs and pairs[0][1] is None:
                self._path(pairs[0][0], here, block=False, option=name)
        for raw_key, val in pairs:
            if val is None or isinstance(val, bool | int | float):
                continue
            key = o.normalize_key(raw_key)
            text_val = val if isinstance(val, str) else str(val)
            if key in o.FD_KEYS:
                raise PolicyError(f"{raw_key}= is refused: the only file descriptors QEMU "
                                  "inherits are vmdriver's", where=here, value=value)
            if key in o.EXEC_KEYS:
                if text_val.strip() not in ("", "no"):
                    raise PolicyError(f"{raw_key}= is refused: it makes QEMU run a program",
                                      where=here, value=value, allowed=f"{raw_key}=no")
                continue
            if o.is_path_key(key, name):
                parts = text_val.split(":") if key == "data" else [text_val]
                block = key in o.BLOCK_KEYS and name in o.BLOCK_KEYVAL
                for part in parts:
                    self._path(part, here, block=block, option=name)

    def _path(self, value: str, here: str, *, block: bool, option: str) -> None:
        if value == "" or value.isspace():
            return
        path = local_path(value, where=here) if block else value
        if block and not path:
            return
        # /dev/null, /dev/urandom and the like are harmless wherever they go.
        resolved = resolve_allowed(path, self.policy, where=here, what=f"-{option} path",
                                   devices_ok=True)
        if block and self.image_check is not None and os.path.isfile(resolved):
            self.image_check(resolved, None, here)


def check_args(args: tuple[str, ...], host: HostConfig, *, where: str = "args",
               task_dir: Path | None = None, alloc_dir: Path | None = None,
               arity: Arity | None = None, image_check: ImageCheck | None = None) -> None:
    """Check every flag of ``args`` against ``args_allowlist`` and every path in them.

    Without ``task_dir``, relative paths are taken from a scratch location that
    holds nothing, so only ``image_paths`` can admit absolute ones.
    """
    if task_dir is None:
        task_dir = Path("/nonexistent/vmdriver-task")
    policy = PathPolicy.for_task(task_dir, alloc_dir or task_dir.parent, host)
    ArgsChecker(host, policy, where=where, arity=arity, image_check=image_check).check(args)
