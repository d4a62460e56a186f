"""Checking a job's extra QEMU ``args``: flags against the allowlist, paths against policy.

The args are read once, by :mod:`vmdriver.qemu.cmdline`, exactly as QEMU will
read them: which elements are options, which are values and which are disk
images, and what each value holds as ``(key, value)`` pairs, sub-syntaxes
(``guestfwd=...-file:P``, ``vnc=unix:P``, chardev specs, JSON) included.
Policy then decides on that reading:

* an option must be in ``args_allowlist`` when one is set, and the options in
  :data:`REFUSED_UNLESS_LISTED` must be listed even when none is;
* without an allowlist, options and their keys must be in the safe set of
  :mod:`vmdriver.policy.safeset` (default-deny);
* block drivers that reach the network (``driver=http``, ``nbd``...) are refused
  in every key of every option, and ``-m``, ``-smp`` and memory backends are
  bounded by the host config (:mod:`vmdriver.policy.bounds`);
* every host file a value names must pass
  :func:`~vmdriver.policy.paths.resolve_allowed`, and every disk image too;
* keys naming programs (``script=``, ``guestfwd=...-cmd:``) or file descriptors
  (``fd=``) are refused outright;
* what QEMU would refuse to parse (an unknown option, ``-drive=x``, a bad
  ``key=value`` list) is refused before launch, with QEMU's reason.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from vmdriver.errors import PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.policy import safeset
from vmdriver.policy.bounds import ArgBounds
from vmdriver.policy.paths import PathPolicy, local_path, resolve_allowed
from vmdriver.qemu import options as o
from vmdriver.qemu.cmdline import (
    Arity,
    Kind,
    OptionSyntaxError,
    Pair,
    Scalar,
    option_pairs,
    parse_argv,
    split_opts,
)
from vmdriver.qemu.options import static_arity

__all__ = ["REFUSED_UNLESS_LISTED", "ArgsChecker", "ImageCheck", "allowlist_names",
           "check_args", "static_arity"]

#: Called with each existing image file a block option names: inspects what it references.
ImageCheck = Callable[[Path, str | None, str], object]

#: Options refused unless ``args_allowlist`` names them, even when it is empty,
#: and why: each reads more options, opens a control channel that can open any
#: file, runs a program, hands over file descriptors, or undoes vmdriver's controls.
REFUSED_UNLESS_LISTED: dict[str, str] = {
    "readconfig": "reads more options from a file",
    "writeconfig": "writes a config file",
    "set": "changes any option, paths included",
    "global": "sets device properties, file paths (romfile) included",
    "add-fd": "hands QEMU file descriptors",
    "monitor": "opens a monitor, which can open any host file",
    "mon": "opens a monitor, which can open any host file",
    "qmp": "opens a monitor, which can open any host file",
    "qmp-pretty": "opens a monitor, which can open any host file",
    "qtest": "opens a test channel that controls the machine",
    "incoming": "can run a shell command (exec:)",
    "plugin": "loads a shared library into QEMU",
    "daemonize": "lets QEMU leave vmdriver's supervision",
    "sandbox": "vmdriver sets the seccomp sandbox itself",
}
#: Values of ``script=``/``downscript=``/``helper=`` that run nothing.
NO_PROGRAM = ("", "no")


def allowlist_names(host: HostConfig) -> frozenset[str]:
    """The allowlist as bare option names, however the operator spelled them."""
    return frozenset(a.strip().lstrip("-") for a in host.args_allowlist)


class ArgsChecker:
    """One pass over a job's args. Raises the first violation found."""

    def __init__(self, host: HostConfig, policy: PathPolicy, *, where: str,
                 arity: Arity | None = None, image_check: ImageCheck | None = None) -> None:
        self.allow = allowlist_names(host)
        self.allowlist_text = sorted(host.args_allowlist)
        self.policy = policy
        self.where = where
        #: Asked about options missing from QEMU 7.2's tables (a newer binary's).
        self.ask = arity
        self.image_check = image_check
        self.bounds = ArgBounds(host)

    def check(self, args: tuple[str, ...]) -> None:
        """Read ``args`` as QEMU will; raise on the first element policy refuses."""
        for i, arg in enumerate(args):
            if not isinstance(arg, str):
                raise SpecError("args must be strings", where=f"{self.where}[{i}]", value=arg)
        for element in parse_argv(args, self.ask):
            here = f"{self.where}[{element.index}]"
            text = args[element.index]
            if element.kind is Kind.IMAGE:
                self._image(text, here)
            elif element.kind is Kind.UNKNOWN:
                hint = " (an option and its value are two elements)" if "=" in text else ""
                raise SpecError(f"not an option QEMU knows{hint}", where=here, value=text)
            elif element.kind is Kind.MISSING_VALUE:
                raise SpecError(f"-{element.name} needs a value", where=here, value=text)
            else:
                self._check_flag(element.name, text, here)
                if element.value is not None:
                    self._value(element.name, element.value,
                                f"{self.where}[{element.value_index}]")

    # Section: flags

    def _check_flag(self, name: str, arg: str, here: str) -> None:
        listed = name in self.allow
        if name in REFUSED_UNLESS_LISTED and not listed:
            raise PolicyError(f"option -{name} is refused unless args_allowlist lists it: it "
                              f"{REFUSED_UNLESS_LISTED[name]}", where=here, value=arg)
        if self.allow and not listed:
            raise PolicyError("flag is not in args_allowlist", where=here, value=arg,
                              allowed=self.allowlist_text)
        if not self.allow and name not in safeset.SAFE_OPTIONS:
            raise PolicyError(f"option -{name} is not in the safe set jobs may use without "
                              "an args_allowlist", where=here, value=arg,
                              allowed="the options listed in docs/policy.md (Default set), "
                              "or an operator's args_allowlist")

    # Section: values

    def _image(self, value: str, here: str) -> None:
        """A non-option element: QEMU opens it as a disk image (``-hda``)."""
        if value.strip().startswith("-"):
            raise SpecError("QEMU reads this as a disk image file name, not as an option "
                            "(an option has no spaces around it)", where=here, value=value)
        if not self.allow:
            raise PolicyError("a bare disk image (QEMU probes its format) is not in the safe "
                              "set", where=here, value=value,
                              allowed="-drive file=...,format=..., or an args_allowlist")
        self._path(value, here, block=True, option="hda")

    def _value(self, name: str, value: str, here: str) -> None:
        try:
            pairs = option_pairs(name, value)
        except OptionSyntaxError as exc:
            raise SpecError(f"QEMU cannot parse this -{name} value: {exc}", where=here,
                            value=value) from None
        if static_arity(name) is None:
            # An option only the binary knows: its value may name a file either way.
            self._path(value, here, block=True, option=name)
            pairs += split_opts(value)
        if not self.allow:
            self._safe_pairs(name, pairs, here, value)
        self.bounds.check(name, pairs, where=here, value=value)
        for key, val in pairs:
            self._network(key, val, here, value)
            self._pair(name, key, val, here, value)

    def _safe_pairs(self, option: str, pairs: list[Pair], here: str, value: str) -> None:
        """Default-deny: every key (and listed value) must be in the option's safe rule."""
        rule = safeset.SAFE_OPTIONS[option]
        for raw_key, val in pairs:
            key = safeset.safe_key(rule, raw_key.strip().replace("_", "-").lower())
            if key is None:
                raise PolicyError(f"-{option} key {raw_key!r} is not in the safe set jobs may "
                                  "use without an args_allowlist", where=here, value=value,
                                  allowed=_listing(rule.keys) or "no keys")
            if not safeset.value_allowed(rule, key, val):
                raise PolicyError(f"-{option} {key}={val} is not in the safe set jobs may use "
                                  "without an args_allowlist", where=here, value=value,
                                  allowed=_listing(rule.values[key]))
            if option == "fw_cfg" and key == "name" and not safeset.fw_cfg_name_ok(val):
                raise PolicyError("-fw_cfg names a job may set start with opt/", where=here,
                                  value=value, allowed="name=opt/...")

    def _network(self, raw_key: str, val: Scalar, here: str, value: str) -> None:
        """Refuse block drivers that make the host connect somewhere (SSRF), in any option."""
        key = o.normalize_key(raw_key)
        text = val.strip().lower() if isinstance(val, str) else ""
        if key == "driver" and text in safeset.NETWORK_BLOCK_DRIVERS:
            raise PolicyError(f"block driver {text!r} is refused: it makes the host open a "
                              "network connection or a host device", where=here, value=value,
                              allowed="local image files (driver=file and image formats)")
        if key == "smb" and text:
            raise PolicyError("smb= is refused: it makes QEMU run smbd on a host directory",
                              where=here, value=value)

    def _pair(self, option: str, raw_key: str, val: Scalar, here: str, value: str) -> None:
        key = o.normalize_key(raw_key)
        if key == "mon" and not {"monitor", "mon"} & self.allow:
            raise PolicyError("a monitor on a character device ('mon:') is refused unless "
                              "args_allowlist lists -monitor", where=here, value=value)
        if key in o.FD_KEYS and val is not None:
            raise PolicyError(f"{raw_key}= is refused: the only file descriptors QEMU "
                              "inherits are vmdriver's", where=here, value=value)
        if not isinstance(val, str):
            return
        if key in o.EXEC_KEYS:
            if key in ("cmd", "exec") or val.strip() not in NO_PROGRAM:
                raise PolicyError(f"{raw_key}= is refused: it makes QEMU run a program",
                                  where=here, value=value, allowed=f"{raw_key}=no")
            return
        if o.is_path_key(key, option):
            block = key in o.BLOCK_KEYS and (
                option in o.BLOCK_OPTIONS or (option == "set" and raw_key.startswith("drive.")))
            self._path(val, here, block=block, option=option)

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


def _listing(names: frozenset[str]) -> str:
    """A short list in full; a long one (the device drivers) by where it is documented."""
    if len(names) > 16:
        return "the list in docs/policy.md (Default set)"
    return ", ".join(sorted(names))


def check_args(args: tuple[str, ...], host: HostConfig, *, where: str = "args",
               task_dir: Path | None = None, alloc_dir: Path | None = None,
               arity: Arity | None = None, image_check: ImageCheck | None = None) -> None:
    """Check every flag of ``args`` against ``args_allowlist`` and every path in them.

    Without ``task_dir``, relative paths are taken from a scratch location that
    holds nothing, so only ``image_paths`` can admit absolute ones. ``arity`` is
    asked only about options QEMU 7.2's tables lack (see
    :func:`vmdriver.qemu.cmdline.arity_of`); an option nobody knows is refused.
    """
    if task_dir is None:
        task_dir = Path("/nonexistent/vmdriver-task")
    policy = PathPolicy.for_task(task_dir, alloc_dir or task_dir.parent, host)
    ArgsChecker(host, policy, where=where, arity=arity, image_check=image_check).check(args)
