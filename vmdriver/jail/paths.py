"""The read-only paths a QEMU binary needs inside its jail, asked of the host once.

* the binary itself and the helper tools of the jail (``setpriv``);
* the directories of the shared libraries ``ldd`` names (on Debian:
  ``/usr/lib/x86_64-linux-gnu``, which also holds QEMU's loadable modules) and
  the directory of each library's link as named (``/usr/lib64`` for the loader);
* QEMU's firmware search path as the binary reports it (``-L help``: on Debian
  ``/usr/share/qemu``, ``/usr/share/seabios``, ``/usr/lib/ipxe/qemu``) and the
  directories its symlinks lead to (``OVMF.fd -> ../ovmf/OVMF.fd``).

``ldd`` and ``-L help`` run the operator's trusted binary, never a job's; the
answer is cached by the binary's identity (path, inode, size, mtime).
"""

from __future__ import annotations

import os
import re
import subprocess
import threading

from vmdriver.errors import HostError

_cache: dict[tuple[str, int, int, int], tuple[str, ...]] = {}
_libs: dict[tuple[str, int, int, int], tuple[str, ...]] = {}
_lock = threading.Lock()
_LIB = re.compile(r"(?:=>\s*)?(/\S+)\s+\(0x[0-9a-f]+\)")


def _identity(binary: str) -> tuple[str, int, int, int]:
    st = os.stat(binary)
    return (binary, st.st_ino, st.st_size, st.st_mtime_ns)


def _run(argv: tuple[str, ...]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False,
                              stdin=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin", "LANG": "C"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"jail: cannot run {argv[0]}: {exc}") from exc
    if proc.returncode != 0:
        raise HostError(f"jail: {' '.join(argv)} failed: {proc.stderr.strip()[-200:]}")
    return proc.stdout


def library_dirs(binary: str) -> tuple[str, ...]:
    """Directories holding ``binary``'s shared libraries, as linked and as resolved (cached)."""
    try:
        key = _identity(os.path.realpath(binary))
    except OSError as exc:
        raise HostError(f"jail: {binary}: {exc.strerror}") from exc
    with _lock:
        cached = _libs.get(key)
    if cached is not None:
        return cached
    dirs: list[str] = []
    for match in _LIB.finditer(_run(("ldd", binary))):
        lib = match.group(1)
        dirs.append(os.path.realpath(os.path.dirname(lib)))
        dirs.append(os.path.dirname(os.path.realpath(lib)))
    found = tuple(dict.fromkeys(dirs))
    with _lock:
        _libs[key] = found
    return found


def firmware_dirs(emulator: str) -> tuple[str, ...]:
    """QEMU's firmware search path (``-L help``) and where its symlinks point."""
    dirs: list[str] = []
    for line in _run((emulator, "-L", "help")).splitlines():
        path = os.path.realpath(line.strip())
        if not line.strip() or not os.path.isdir(path):
            continue
        dirs.append(path)
        for root, subdirs, files in os.walk(path):
            for name in (*subdirs, *files):
                entry = os.path.join(root, name)
                if os.path.islink(entry) and os.path.exists(entry):
                    target = os.path.realpath(entry)
                    dirs.append(target if os.path.isdir(target) else os.path.dirname(target))
    return tuple(dict.fromkeys(dirs))


def _minimal(paths: list[str]) -> tuple[str, ...]:
    """Drop paths already inside another one of the list."""
    out: list[str] = []
    for p in sorted(dict.fromkeys(paths), key=lambda x: (x.count("/"), x)):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return tuple(out)


def program_ro_paths(binary: str, tools: tuple[str, ...] = ()) -> tuple[str, ...]:
    """What any program (a helper: swtpm, virtiofsd, ...) and ``tools`` need to start."""
    found: list[str] = []
    for path in (binary, *tools):
        found += [os.path.abspath(path), *library_dirs(os.path.realpath(path))]
    return _minimal(found)


def qemu_ro_paths(emulator: str, tools: tuple[str, ...] = ()) -> tuple[str, ...]:
    """Everything ``emulator`` (and each of ``tools``) needs to start, read-only."""
    # Bound at the path the argv names; a symlinked binary is bound as its target's content.
    named, emulator = os.path.abspath(emulator), os.path.realpath(emulator)
    try:
        key = _identity(emulator)
    except OSError as exc:
        raise HostError(f"jail: emulator {emulator}: {exc.strerror}") from exc
    with _lock:
        cached = _cache.get(key)
    if cached is None:
        found = [named, *library_dirs(emulator), *firmware_dirs(emulator)]
        cached = _minimal(found)
        with _lock:
            _cache[key] = cached
    extra: list[str] = []
    for tool in tools:
        extra += [os.path.abspath(tool), *library_dirs(os.path.realpath(tool))]
    return _minimal([*cached, *extra])
