"""What a QEMU binary supports, asked of the binary itself and cached.

QEMU parses every option before acting on any, and ``-version`` exits during
parsing; so ``qemu-system-x86_64 -sandbox <arg> -version`` exits 0 exactly when
this binary was built with seccomp *and* understands every key of ``<arg>``,
and 1 otherwise. The same trick tells whether an option takes a value
(:func:`option_takes_arg`). One ~10 ms run per binary, cached by the binary's identity
(path, inode, size, mtime), so an upgraded QEMU is asked again.
"""

from __future__ import annotations

import os
import subprocess
import threading
from pathlib import Path

_cache: dict[tuple[str, int, int, int, str], bool] = {}
_lock = threading.Lock()


def _identity(binary: Path) -> tuple[str, int, int, int] | None:
    try:
        st = os.stat(binary)
    except OSError:
        return None
    return (str(binary), st.st_ino, st.st_size, st.st_mtime_ns)


def supports_sandbox(binary: Path, arg: str = "on", timeout: float = 10.0) -> bool:
    """True if ``binary`` accepts ``-sandbox arg`` (seccomp built in, every key known)."""
    ident = _identity(binary)
    if ident is None:
        return False
    key = (*ident, arg)
    with _lock:
        if key in _cache:
            return _cache[key]
    try:
        proc = subprocess.run(
            (str(binary), "-sandbox", arg, "-version"),
            capture_output=True, timeout=timeout, check=False, stdin=subprocess.DEVNULL,
        )
        verdict = proc.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        verdict = False
    with _lock:
        _cache[key] = verdict
    return verdict


def clear_cache() -> None:
    """Forget every answer (tests, or after replacing binaries in place)."""
    with _lock:
        _cache.clear()
        _arity.clear()


_arity: dict[tuple[str, int, int, int, str], bool | None] = {}


def option_takes_arg(binary: Path, name: str, timeout: float = 10.0) -> bool | None:
    """Whether ``binary`` reads a value after ``-name``; ``None`` if it has no such option.

    QEMU's first pass over argv fails with "requires an argument" for a trailing
    option that takes one, before ``-version`` acts; so ``binary -version -name``
    exits 0 for an option without a value and 1 otherwise.
    """
    ident = _identity(binary)
    if ident is None or not name or not all(c.isalnum() or c in "_.-" for c in name):
        return None
    key = (*ident, name)
    with _lock:
        if key in _arity:
            return _arity[key]
    try:
        proc = subprocess.run(
            (str(binary), "-version", f"-{name}"),
            capture_output=True, text=True, timeout=timeout, check=False,
            stdin=subprocess.DEVNULL,
        )
        verdict: bool | None
        if proc.returncode == 0:
            verdict = False
        elif "requires an argument" in proc.stderr:
            verdict = True
        else:
            verdict = None
    except (OSError, subprocess.TimeoutExpired):
        return None
    with _lock:
        _arity[key] = verdict
    return verdict
