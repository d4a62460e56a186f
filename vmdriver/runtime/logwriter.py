"""A VM's log writer: QEMU's stdout and stderr through pipes into size-bounded files.

Run as ``python -m vmdriver.runtime.logwriter --max BYTES FD:PATH [FD:PATH ...]``.
Each FD (a pipe's read end QEMU writes into) is appended to its PATH. When PATH
would grow past BYTES it is renamed to its ``.1`` name (``web.stdout.0`` →
``web.stdout.1``, replacing the one before) and a new PATH is begun, so a stream
never holds more than twice BYTES on disk however much a guest prints. Readers
tail PATH and reopen it when it is replaced (:func:`vmdriver.runtime.console.follow`).

It runs as a process of the VM's own, not a task of the supervisor, so the
console keeps being logged while no supervisor runs (a re-attached VM's log has
no gap). It exits when every pipe is at EOF (QEMU and everything holding its
stdout have exited), and on SIGTERM after draining what is in the pipes.

It never stalls QEMU: a write that fails (disk full, log dir removed) drops
the data and the writer keeps reading. Standard library only, so it starts fast
and small (one per VM).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import os
import selectors
import signal
import sys
from pathlib import Path

#: Bytes read from a pipe at once (a pipe holds 64 KiB by default).
CHUNK = 65536


def rotated_name(path: Path) -> Path:
    """The name the full log moves to: ``x.stdout.0`` → ``x.stdout.1``, ``x.log`` → ``x.log.1``."""
    stem, dot, last = path.name.rpartition(".")
    if dot and last.isdigit():
        return path.with_name(f"{stem}.{int(last) + 1}")
    return path.with_name(f"{path.name}.1")


class Sink:
    """One log file, rotated before it would grow past ``max_bytes``."""

    def __init__(self, path: Path, max_bytes: int) -> None:
        self.path, self.max_bytes = path, max_bytes
        self._fd = -1
        self._size = 0
        self._reported = False
        self._open()

    def write(self, data: bytes) -> None:
        """Append ``data``, rotating first where it would not fit; whole lines stay whole
        unless one line alone is longer than the limit."""
        while data:
            room = self.max_bytes - self._size
            if len(data) <= room:
                self._append(data)
                return
            cut = data.rfind(b"\n", 0, room) + 1 if room > 0 else 0
            if cut == 0 and self._size == 0:
                cut = room  # one line longer than a whole file: cut it
            if cut:
                self._append(data[:cut])
                data = data[cut:]
            if not self._rotate():
                return  # cannot make room: dropped, the bound holds

    def close(self) -> None:
        """Close the file."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                               0o600)
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            self._fd, self._size = -1, 0
            self._report(exc)

    def _append(self, data: bytes) -> None:
        if self._fd < 0:
            self._open()  # the log dir may be back (or the disk has room again)
        try:
            while data:
                n = os.write(self._fd, data)
                self._size += n
                data = data[n:]
        except OSError as exc:
            # Dropped: QEMU must never wait on its log.
            self._report(exc)
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                self.close()

    def _rotate(self) -> bool:
        """Move the full file aside and begin a new one; False if there is still no room."""
        self.close()
        try:
            os.replace(self.path, rotated_name(self.path))
        except FileNotFoundError:
            pass  # removed meanwhile: a new file is what we want anyway
        except OSError as exc:
            self._report(exc)
            with contextlib.suppress(OSError):
                os.truncate(self.path, 0)
        self._open()
        return self._size < self.max_bytes

    def _report(self, exc: OSError) -> None:
        # Once: a full disk would otherwise fill this helper's own log.
        if not self._reported:
            self._reported = True
            sys.stderr.write(f"logwriter: {self.path}: {exc.strerror}; output dropped\n")
            sys.stderr.flush()


def _drain(fd: int, sink: Sink) -> None:
    """Copy what the pipe holds now, without waiting for more."""
    os.set_blocking(fd, False)
    with contextlib.suppress(BlockingIOError):
        while chunk := os.read(fd, CHUNK):
            sink.write(chunk)


def pump(inputs: dict[int, Sink]) -> None:
    """Copy every input to its sink until all are at EOF, or SIGTERM (then drain)."""
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGTERM, lambda *_: None)
    with selectors.DefaultSelector() as sel:
        sel.register(wake_r, selectors.EVENT_READ)
        for fd in inputs:
            sel.register(fd, selectors.EVENT_READ)
        while len(sel.get_map()) > 1:
            for key, _ in sel.select():
                if key.fd == wake_r:
                    for fd, sink in inputs.items():
                        _drain(fd, sink)
                    return
                chunk = os.read(key.fd, CHUNK)
                if chunk:
                    inputs[key.fd].write(chunk)
                else:
                    sel.unregister(key.fd)


def _parse(argv: list[str] | None) -> tuple[int, list[tuple[int, Path]]]:
    p = argparse.ArgumentParser(prog="python -m vmdriver.runtime.logwriter",
                                description="Copy pipes into size-bounded, rotated log files.")
    p.add_argument("--max", type=int, required=True, metavar="BYTES",
                   help="largest size of one log file before it is rotated")
    p.add_argument("streams", nargs="+", metavar="FD:PATH", help="a pipe fd and its log file")
    args = p.parse_args(argv)
    streams = []
    for item in args.streams:
        fd, sep, path = item.partition(":")
        if not sep or not fd.isdigit() or not path:
            p.error(f"expected FD:PATH, got {item!r}")
        streams.append((int(fd), Path(path)))
    if args.max <= 0:
        p.error("--max must be more than 0")
    return args.max, streams


def main(argv: list[str] | None = None) -> int:
    """The writer process."""
    max_bytes, streams = _parse(argv)
    # Its own process group already keeps a terminal's Ctrl-C away; a hangup too.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    sinks: dict[Path, Sink] = {}
    inputs = {fd: sinks.setdefault(path, Sink(path, max_bytes)) for fd, path in streams}
    try:
        pump(inputs)
    finally:
        for sink in sinks.values():
            sink.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
