"""One asyncio event loop in a thread of its own, called from gRPC's handler threads.

The supervisor is asyncio code; grpcio's server runs handlers on a thread pool.
Every handler hands its coroutine to this loop and blocks on the result; if the
RPC is cancelled (Nomad gave up on a WaitTask), the coroutine is cancelled too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

T = TypeVar("T")


class RpcContext(Protocol):
    """The part of ``grpc.ServicerContext`` this module uses."""

    def add_callback(self, callback: Any) -> bool:
        """Run ``callback`` when the RPC ends (done or cancelled)."""


class Cancelled(Exception):
    """The RPC was cancelled by the client while its coroutine ran."""


class LoopThread:
    """Owns an event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="vmdriver-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def call(self, coro: Coroutine[Any, Any, T], context: RpcContext | None = None,
             timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait for it; cancelled with the RPC."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        if context is not None:
            context.add_callback(fut.cancel)
        try:
            return fut.result(timeout)
        except concurrent.futures.CancelledError:
            raise Cancelled from None
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise

    def stop(self) -> None:
        """Stop the loop (after its work was handed off) and join the thread."""
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
