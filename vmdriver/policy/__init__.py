"""Operator policy: which images, QEMU flags, paths and emulators a job may use.

See docs/policy.md for the decisions. What QEMU would make of a job's input
(which elements are options, what a value holds, which files an image names)
comes from :mod:`vmdriver.qemu.cmdline` and :mod:`vmdriver.qemu.image`; this
package only decides on it. The entry points:

* :func:`check_emulator`: ``emulator`` against ``emulators_allowlist``;
* :func:`check_args`: ``args`` against ``args_allowlist`` (or, without one, the
  default set of :mod:`vmdriver.policy.safeset`) and the path policy;
* :func:`check_resources`: RAM, vCPUs and forwarded ports against the host's bounds;
* :func:`check_image_path`, :func:`open_image`, :func:`inspect_image`: an image
  resolved, opened once, and checked for the files it references.
"""

from vmdriver.policy.args import check_args
from vmdriver.policy.bounds import check_resources
from vmdriver.policy.checks import DEFAULT_EMULATOR, check_emulator
from vmdriver.policy.images import KNOWN_FORMATS, inspect_image
from vmdriver.policy.paths import (
    OpenedImage,
    PathPolicy,
    check_image_path,
    open_image,
    resolve_allowed,
)

__all__ = [
    "DEFAULT_EMULATOR",
    "KNOWN_FORMATS",
    "OpenedImage",
    "PathPolicy",
    "check_args",
    "check_emulator",
    "check_image_path",
    "check_resources",
    "inspect_image",
    "open_image",
    "resolve_allowed",
]
