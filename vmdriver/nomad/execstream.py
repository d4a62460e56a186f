"""ExecTask and ExecTaskStreaming (`nomad alloc exec`, script checks) over the guest agent.

grpcio runs a bidi handler on a pool thread with a blocking request iterator;
the exec itself runs on the plugin's event loop. A reader thread moves stdin
from the iterator into an asyncio queue; output comes back through a thread-safe
queue that the handler drains into the response stream as it arrives.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

import grpc

from vmdriver.errors import InputError
from vmdriver.nomad.base import PluginState
from vmdriver.nomad.loop import Cancelled
from vmdriver.nomad.proto import driver_pb2 as pb
from vmdriver.runtime.guestexec import ExecResult

NO_TTY = ("no TTY over the guest agent: qemu-ga runs commands with pipes only; "
          "run `nomad alloc exec -t=false ...`")
#: Output pieces larger than this are split (Nomad's own executor sends 32 KiB frames).
FRAME = 32 * 1024


def _timed_out_note(result: ExecResult, timeout: float | None) -> bytes:
    if not result.timed_out:
        return b""
    return f"vmdriver: the command ran longer than {timeout:g}s and was killed\n".encode()


def exec_unary(state: PluginState, request: pb.ExecTaskRequest,
               context: grpc.ServicerContext) -> pb.ExecTaskResponse:
    """ExecTask: run, wait (up to ``timeout``), answer with all output and the exit code."""
    argv = list(request.command)
    timeout = request.timeout.ToTimedelta().total_seconds() if request.HasField("timeout") else 0
    out: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
    result = state.loop.call(state.tasks.exec(request.task_id, argv,
                                              lambda s, d: out[s].extend(d),
                                              timeout=timeout or None), context)
    out["stderr"] += _timed_out_note(result, timeout)
    return pb.ExecTaskResponse(stdout=bytes(out["stdout"]), stderr=bytes(out["stderr"]),
                               result=pb.ExitResult(exit_code=result.exit_code,
                                                    signal=result.signal))


def _read_stdin(requests: Iterator[pb.ExecTaskStreamingRequest], loop: asyncio.AbstractEventLoop,
                inbox: asyncio.Queue[bytes | None]) -> None:
    """Thread: stdin messages into ``inbox``; ``None`` once stdin is closed or the RPC ends."""
    try:
        for msg in requests:
            if msg.HasField("stdin"):
                if msg.stdin.data:
                    loop.call_soon_threadsafe(inbox.put_nowait, msg.stdin.data)
                if msg.stdin.close:
                    break
            # tty_size and empty heartbeats: nothing to do without a TTY.
    except grpc.RpcError:
        pass
    finally:
        loop.call_soon_threadsafe(inbox.put_nowait, None)


async def _stdin(inbox: asyncio.Queue[bytes | None]) -> AsyncIterator[bytes]:
    while (data := await inbox.get()) is not None:
        yield data


def exec_streaming(state: PluginState, requests: Iterator[pb.ExecTaskStreamingRequest],
                   context: grpc.ServicerContext) -> Iterator[pb.ExecTaskStreamingResponse]:
    """ExecTaskStreaming: setup first, then stdin in and stdout/stderr out as they come."""
    first = next(requests, None)
    if first is None or not first.HasField("setup"):
        raise InputError("the first message of ExecTaskStreaming must be its setup",
                         where="ExecTaskStreaming")
    setup = first.setup
    if setup.tty:
        raise InputError(NO_TTY, where=setup.task_id)
    state.tasks.get(setup.task_id)
    loop = state.loop.loop
    inbox: asyncio.Queue[bytes | None] = asyncio.Queue()
    outbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
    threading.Thread(target=_read_stdin, args=(requests, loop, inbox), daemon=True,
                     name="exec stdin").start()
    fut = asyncio.run_coroutine_threadsafe(
        state.tasks.exec(setup.task_id, list(setup.command),
                         lambda s, d: outbox.put((s, d)), stdin=_stdin(inbox)), loop)
    context.add_callback(fut.cancel)
    while not (fut.done() and outbox.empty()):
        try:
            stream, data = outbox.get(timeout=0.1)
        except queue.Empty:
            continue
        for off in range(0, len(data), FRAME):
            op = pb.ExecTaskStreamingIOOperation(data=data[off:off + FRAME])
            yield (pb.ExecTaskStreamingResponse(stdout=op) if stream == "stdout"
                   else pb.ExecTaskStreamingResponse(stderr=op))
    if fut.cancelled():
        raise Cancelled
    result = fut.result()
    close = pb.ExecTaskStreamingIOOperation(close=True)
    yield pb.ExecTaskStreamingResponse(stdout=close)
    yield pb.ExecTaskStreamingResponse(stderr=close)
    yield pb.ExecTaskStreamingResponse(
        exited=True, result=pb.ExitResult(exit_code=result.exit_code, signal=result.signal))
