"""A VM's log writer: QEMU's stdout and stderr through pipes into size-bounded files.

Writers are forked, one per VM, by ``python -I -S logwriter.py --serve FD`` (this
file), a server the supervisor starts once (:func:`serve`).
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
the data and the writer keeps reading. A few standard modules only, run without
``site`` (``-S``): argparse, pathlib and site's import machinery were ~3/4 of an
interpreter's start-up. Writers are forked from the server rather than started
(one start per supervisor, not per VM): a burst of 32 launches paid 1.6x bare
QEMU's time with a start-up per VM, against 1.1x without any writer.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import selectors
import signal
import socket
import sys

#: Bytes read from a pipe at once (a pipe holds 64 KiB by default).
CHUNK = 65536


USAGE = "usage: logwriter.py --serve FD\n"


def rotated_name(path: str) -> str:
    """The name the full log moves to: ``x.stdout.0`` → ``x.stdout.1``, ``x.log`` → ``x.log.1``."""
    head, sep, name = path.rpartition("/")
    stem, dot, last = name.rpartition(".")
    if dot and last.isdigit():
        return f"{head}{sep}{stem}.{int(last) + 1}"
    return f"{path}.1"


class Sink:
    """One log file, rotated before it would grow past ``max_bytes``."""

    def __init__(self, path: str, max_bytes: int) -> None:
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
            with contextlib.suppress(OSError):  # else the data is dropped: the bound holds
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
    try:
        while chunk := os.read(fd, CHUNK):
            sink.write(chunk)
    except BlockingIOError:
        pass  # empty for now: QEMU is still writing, but we were told to stop


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


def write(max_bytes: int, streams: list[tuple[int, str]]) -> int:
    """Be a writer: pump ``streams`` (FD, PATH) into their bounded files until EOF."""
    sinks: dict[str, Sink] = {}
    inputs = {fd: sinks.setdefault(path, Sink(path, max_bytes)) for fd, path in streams}
    try:
        pump(inputs)
    finally:
        for sink in sinks.values():
            sink.close()
    return 0


# --- serving: one process per supervisor forks the writers -------------------------------

def _reap(*_: object) -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def _request(msg: bytes, fds: list[int]) -> tuple[int, list[tuple[int, str]], str]:
    """``{"max": BYTES, "log": PATH, "streams": [[INDEX, PATH], ...]}``, INDEX into ``fds``."""
    req = json.loads(msg)
    max_bytes, log = int(req["max"]), str(req["log"])
    if max_bytes <= 0 or not log.startswith("/"):
        raise ValueError("max must be more than 0 and log an absolute path")
    streams = [(fds[int(i)], str(path)) for i, path in req["streams"]]
    if not streams or any(not path.startswith("/") for _, path in streams):
        raise ValueError("streams must be given, with absolute paths")
    return max_bytes, streams, log


def _become_writer(control: socket.socket, max_bytes: int, streams: list[tuple[int, str]],
                   log: str) -> None:
    """In the forked child: a writer of its own (own process group, its own log), never
    returning to the serving loop."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        control.close()
        os.setpgid(0, 0)
        out = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
        code = write(max_bytes, streams)
    except BaseException as exc:  # a forked child must end in _exit, whatever happened
        with contextlib.suppress(OSError):
            os.write(2, f"logwriter: {exc!r}\n".encode())
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(control_fd: int) -> int:
    """Answer each request on ``control_fd`` (a SOCK_SEQPACKET socket, the read ends of
    the request's pipes attached) by forking a writer for them; reply its pid as
    ``{"pid": N}`` or ``{"error": "..."}``. A fork of this small process costs ~1 ms,
    an interpreter start-up ~15 ms of CPU: in a burst of launches that is the
    difference. The writers are ordinary processes of their own: they outlive this
    one, which ends at EOF (the supervisor closed it, or is gone)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGCHLD, _reap)  # writers that end while we run are reaped
    control = socket.socket(fileno=control_fd)
    while True:
        msg, fds, _, _ = socket.recv_fds(control, 65536, 16)
        if not msg:
            return 0
        try:
            max_bytes, streams, log = _request(msg, fds)
            pid = os.fork()
            if pid == 0:
                _become_writer(control, max_bytes, streams, log)
            # The child sets its process group too; set here as well, so it is in place
            # before the reply (a group kill right after must not miss the writer).
            with contextlib.suppress(OSError):
                os.setpgid(pid, pid)
            reply: dict[str, object] = {"pid": pid}
        except (ValueError, KeyError, TypeError, IndexError, OSError) as exc:
            reply = {"error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        control.send(json.dumps(reply).encode())


def main(argv: list[str]) -> int:
    """The writers' forking server; 2 for a bad command line."""
    if len(argv) == 2 and argv[0] == "--serve" and argv[1].isdigit():
        return serve(int(argv[1]))
    sys.stderr.write(USAGE)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
