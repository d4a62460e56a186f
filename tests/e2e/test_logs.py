"""Bounded console logs: the log writer process, and a flooding guest through it.

The writer is tested as the process the supervisor runs (fed through its pipe);
the guest test floods the serial console through the guest agent, with the
supervisor killed -9 and the VM re-attached before the flood.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.e2e.guest import READY, overlay, task_dirs
from vmdriver.host.config import HostConfig
from vmdriver.jail.plan import catches
from vmdriver.qemu.agent import GuestAgent
from vmdriver.runtime import logwriter
from vmdriver.runtime.console import follow, wait_for_line
from vmdriver.runtime.logs import LOG_WRITER, open_outputs, rotatable, rotated_name, tail
from vmdriver.runtime.logserver import WriterServer
from vmdriver.runtime.record import VMRecord
from vmdriver.runtime.state import ExitKind
from vmdriver.runtime.supervisor import Supervisor

BOOT_TIMEOUT = 90.0
MAX = 64 * 1024


def sizes(log: Path) -> tuple[int, int]:
    one = rotated_name(log)
    return (log.stat().st_size if log.exists() else 0, one.stat().st_size if one.exists() else 0)


def both(log: Path) -> str:
    """The rotated file and the current one, oldest first."""
    return rotated_name(log).read_text() + log.read_text()


def test_rotated_names() -> None:
    assert rotated_name(Path("/l/web.stdout.0")) == Path("/l/web.stdout.1")
    assert rotated_name(Path("/l/console.log")) == Path("/l/console.log.1")


def test_only_regular_files_are_rotated(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "link").symlink_to("/dev/stdout")
    assert rotatable(tmp_path / "new") and not rotatable(fifo)
    assert not rotatable(tmp_path / "link")


def test_fifos_and_links_go_to_qemu_as_they_are(tmp_path: Path) -> None:
    """Nomad's logmon FIFOs (Nomad rotates) and the runner's /dev/stdout: no writer."""
    fifo = tmp_path / "t.stdout.fifo"
    os.mkfifo(fifo)

    async def main() -> None:
        outputs = await open_outputs(fifo, Path("/dev/stderr"), max_bytes=MAX, log_dir=tmp_path,
                                     server=WriterServer())
        assert (outputs.stdout, outputs.stderr, outputs.writer) == (fifo, Path("/dev/stderr"), None)

    asyncio.run(main())


def test_writer_bounds_the_log_and_a_reader_follows_rotations(tmp_path: Path) -> None:
    """2 MiB of numbered lines through the pipe: never more than 2 x the limit on disk,
    no third file, every line whole, and a follower sees the last line."""
    out, err = tmp_path / "t.stdout.0", tmp_path / "t.stderr.0"

    async def main() -> None:
        server = WriterServer()
        outputs = await open_outputs(out, err, max_bytes=MAX, log_dir=tmp_path, server=server)
        assert outputs.writer is not None and isinstance(outputs.stdout, int)
        await server.close()  # the writer carries on without its server
        seen: list[int] = []

        async def read() -> None:
            async for line in follow(out):
                seen.append(int(line.split()[1]))
                if seen[-1] == 29999:
                    return

        reader = asyncio.create_task(read())
        worst = 0
        for start in range(0, 30000, 1000):
            block = "".join(f"line {i} {'x' * 60}\n" for i in range(start, start + 1000))
            await asyncio.to_thread(os.write, outputs.stdout, block.encode())
            worst = max(worst, sum(sizes(out)))
            await asyncio.sleep(0.01)
        os.write(outputs.stderr, b"qemu: last words\n")  # type: ignore[arg-type]
        outputs.close()  # EOF: the writer drains and exits by itself
        await asyncio.wait_for(outputs.writer.proc.wait(), 10)
        await asyncio.wait_for(reader, 10)
        assert (tmp_path / f"{LOG_WRITER}.log").read_text() == ""  # it ended without a word
        assert worst <= 2 * MAX and max(sizes(out)) <= MAX, (worst, sizes(out))
        assert not (tmp_path / "t.stdout.2").exists()
        assert seen == sorted(seen) and seen[-1] == 29999
        lines = both(out).splitlines()
        assert all(len(line.split()) == 3 for line in lines)  # none cut in two
        assert int(lines[-1].split()[1]) == 29999
        assert err.read_text() == "qemu: last words\n"

    asyncio.run(main())


def catches_sigterm(pid: int) -> None:
    """Wait until the writer handles SIGTERM (before, Python's start-up still runs)."""
    for _ in range(500):
        if catches(pid, signal.SIGTERM):
            return
        time.sleep(0.01)
    raise AssertionError("the writer never installed its SIGTERM handler")


def test_writer_drains_the_pipe_on_sigterm(tmp_path: Path) -> None:
    out = tmp_path / "t.stdout.0"

    async def main() -> None:
        server = WriterServer()
        outputs = await open_outputs(out, out, max_bytes=MAX, log_dir=tmp_path, server=server)
        assert outputs.writer is not None and outputs.stdout == outputs.stderr
        os.write(outputs.stdout, b"before the stop\n")  # type: ignore[arg-type]
        await asyncio.to_thread(catches_sigterm, outputs.writer.proc.pid)
        outputs.writer.proc.send_signal(signal.SIGTERM)  # a writer still held open
        await asyncio.wait_for(outputs.writer.proc.wait(), 10)
        outputs.close()
        await server.close()
        assert out.read_text() == "before the stop\n"

    asyncio.run(main())


def test_one_server_forks_a_writer_per_vm(tmp_path: Path) -> None:
    """Eight VMs' outputs at once: eight writers, each the server's child in a process
    group of its own, each copying only its own pipe; a server killed meanwhile is
    replaced, and its writers carry on."""

    async def main() -> None:
        server = WriterServer()
        dirs = [tmp_path / f"vm{i}" for i in range(8)]
        for d in dirs:
            d.mkdir()
        opened = await asyncio.gather(*(open_outputs(d / "t.stdout.0", d / "t.stderr.0",
                                                     max_bytes=MAX, log_dir=d, server=server)
                                        for d in dirs))
        writers = [o.writer for o in opened]
        assert all(w is not None for w in writers)
        procs = [psutil.Process(w.proc.pid) for w in writers if w is not None]
        assert len({p.pid for p in procs}) == 8 and len({p.ppid() for p in procs}) == 1
        assert all(os.getpgid(p.pid) == p.pid for p in procs)
        os.kill(procs[0].ppid(), signal.SIGKILL)  # the server; its writers are not its threads
        late = await open_outputs(tmp_path / "late.0", tmp_path / "late.0", max_bytes=MAX,
                                  log_dir=tmp_path, server=server)
        assert late.writer is not None and psutil.Process(late.writer.proc.pid).ppid() != procs[0].ppid()
        for i, o in enumerate([*opened, late]):
            os.write(o.stdout, f"console of {i}\n".encode())  # type: ignore[arg-type]
            o.close()
        await asyncio.wait_for(asyncio.gather(*(w.proc.wait() for w in writers if w)), 10)
        await server.close()
        for i, d in enumerate(dirs):
            assert (d / "t.stdout.0").read_text() == f"console of {i}\n"
        assert (tmp_path / "late.0").read_text() == "console of 8\n"

    asyncio.run(main())


def test_the_server_refuses_a_malformed_request() -> None:
    for bad in (b'{"max": 0, "log": "/l", "streams": [[0, "/x"]]}',
                b'{"max": 10, "log": "rel", "streams": [[0, "/x"]]}',
                b'{"max": 10, "log": "/l", "streams": []}',
                b'{"max": 10, "log": "/l", "streams": [[3, "/x"]]}', b"not json"):
        with pytest.raises((ValueError, IndexError)):
            logwriter._request(bad, [5])


_FIRST_SUPERVISOR = """
import asyncio, json, sys
from pathlib import Path
from vmdriver.host.config import HostConfig
from vmdriver.runtime.supervisor import Supervisor
from tests.e2e.guest import guest_spec, request
host = HostConfig(state_dir=Path(sys.argv[1]), image_paths=(sys.argv[2],), max_log_size="64KiB")
async def main():
    sup = Supervisor(host)
    req = request(host, "a/flood", guest_spec("flood", guest_agent=True), None)
    info = await sup.start(req)
    print(json.dumps({"record": str(req.dirs.record), "stdout": str(info.stdout)}), flush=True)
    await asyncio.sleep(3600)
asyncio.run(main())
"""


def gone(proc: psutil.Process) -> bool:
    """Exited (a zombie of a dead supervisor's child waits for init to reap it)."""
    try:
        return bool(proc.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def _writer_pid(record: VMRecord) -> int:
    return next(h.pid for h in record.helpers if h.name == LOG_WRITER)


@pytest.mark.e2e
@pytest.mark.usefixtures("no_leaks")
def test_flooding_guest_after_supervisor_kill(host: HostConfig, guest_dir: Path) -> None:
    """A supervisor killed -9 leaves QEMU and its writer running; after re-attaching, a
    guest printing ~1.5 MiB on its console leaves at most 2 x max_log_size on disk, and
    the console's lines keep arriving across rotations."""
    host = host.model_copy(update={"image_paths": (str(guest_dir),), "max_log_size": "64KiB"})
    overlay(guest_dir, task_dirs(host, "a/flood", None).task.local / "disk.qcow2")
    first = subprocess.Popen((sys.executable, "-c", _FIRST_SUPERVISOR, str(host.state_dir),
                              str(guest_dir)),
                             stdout=subprocess.PIPE, text=True, cwd=Path(__file__).parents[2])
    try:
        assert first.stdout is not None
        started = json.loads(first.stdout.readline())
        stdout = Path(started["stdout"])
        asyncio.run(wait_for_line(stdout, READY, BOOT_TIMEOUT))
    finally:
        first.kill()  # SIGKILL: no clean-up of its own
        first.wait()
        if first.stdout is not None:
            first.stdout.close()
    record = VMRecord.load(Path(started["record"]))
    assert record is not None
    writer = psutil.Process(_writer_pid(record))
    assert writer.is_running()

    async def main() -> None:
        sup = Supervisor(host)
        await sup.recover(record)
        agent = GuestAgent(Path(record.qga_socket))
        script = ("i=0; while [ $i -lt 20000 ]; do echo flood $i 0123456789abcdefghijklmnopqrstuvwxyz; "
                  "i=$((i+1)); done > /dev/ttyS0; echo FLOOD-DONE > /dev/ttyS0")
        await agent.call("guest-exec", {"path": "/bin/sh", "arg": ["-c", script]})
        worst, t0 = 0, time.monotonic()
        done = asyncio.ensure_future(wait_for_line(stdout, "FLOOD-DONE", 300))
        while not done.done():
            worst = max(worst, sum(sizes(stdout)))
            await asyncio.sleep(0.05)
        await done
        elapsed = time.monotonic() - t0
        assert worst <= 2 * MAX and max(sizes(stdout)) <= MAX, (worst, sizes(stdout))
        assert "flood 19999 " in both(stdout)
        assert writer.is_running()  # the same writer throughout
        result = await sup.stop("a/flood")
        assert result.kind is ExitKind.STOPPED
        assert gone(writer)
        print(f"flood of ~1.1 MB through the console: {elapsed:.1f}s")

    asyncio.run(main())


def test_tail_reaches_into_the_rotated_file(tmp_path: Path) -> None:
    """QEMU's last words for an exit report, also just after a rotation."""
    log = tmp_path / "t.stderr.0"
    rotated_name(log).write_text("x" * 5000 + "qemu: first half")
    log.write_text(" and the rest\n")
    assert tail(log, 40) == "x" * 10 + "qemu: first half and the rest\n"
    assert tail(tmp_path / "none", 40) == ""


def test_follow_reads_a_file_not_yet_rotated(tmp_path: Path) -> None:
    log = tmp_path / "x.stdout.0"
    log.write_text("a\nb\n")

    async def main() -> list[str]:
        got: list[str] = []
        async for line in follow(log):
            got.append(line)
            if len(got) == 2:
                return got
        return got

    assert asyncio.run(main()) == ["a", "b"]


def test_follow_a_whole_file_behind_loses_lines_never_yields_a_fragment(tmp_path: Path) -> None:
    """The writer rotates twice while the reader sleeps; the newest file begins with the
    end of a line whose start went with the file the reader missed."""
    log = tmp_path / "x.stdout.0"
    log.write_text("line 1\n")

    async def main() -> list[str]:
        got: list[str] = []
        lines = follow(log)
        got.append(await anext(lines))
        log.rename(rotated_name(log))                 # A → .1 (the reader still holds A)
        log.write_text("line 2\nline 3 begins")       # B
        log.rename(rotated_name(log))                 # B → .1: A is gone, B never read
        log.write_text(" and ends\nline 4\nline 5\n")  # C
        while len(got) < 3:
            got.append(await asyncio.wait_for(anext(lines), 5))
        await lines.aclose()
        return got

    assert asyncio.run(main()) == ["line 1", "line 4", "line 5"]
