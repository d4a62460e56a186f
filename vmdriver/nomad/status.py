"""vmdriver errors as gRPC statuses Nomad understands.

Every handler runs inside :func:`rpc`, so no exception ever escapes into grpcio
(which would answer UNKNOWN with a Python repr) and none can take the plugin
down. Start errors that a retry may cure carry Nomad's RecoverableError detail
(FAILED_PRECONDITION plus ``google.rpc.Status.details[0]``), which is what makes
Nomad's restart policy apply; bad input carries none, so Nomad does not retry it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from google.protobuf import any_pb2

from vmdriver.errors import (
    ArtifactError,
    HostError,
    InputError,
    LaunchError,
    MonitorError,
    StateError,
    TaskNotFound,
    VmdriverError,
)
from vmdriver.nomad.loop import Cancelled
from vmdriver.nomad.proto import status_pb2, structs_pb2

log = logging.getLogger(__name__)

DETAILS_KEY = "grpc-status-details-bin"
F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class Status(grpc.Status):  # type: ignore[misc]
    """A status with code, message and (optionally) the details trailer."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, bytes], ...] = ()


def recoverable_status(code: grpc.StatusCode, message: str, recoverable: bool) -> Status:
    """A status carrying Nomad's RecoverableError detail."""
    detail = any_pb2.Any()
    detail.Pack(structs_pb2.RecoverableError(recoverable=recoverable))
    body = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return Status(code, message, ((DETAILS_KEY, body.SerializeToString()),))


def status_for(exc: BaseException) -> Status:
    """The status for an exception raised by a handler."""
    msg = str(exc) or type(exc).__name__
    if isinstance(exc, Cancelled):
        return Status(grpc.StatusCode.CANCELLED, "cancelled by the client")
    if isinstance(exc, TaskNotFound):
        return Status(grpc.StatusCode.NOT_FOUND, msg)
    if isinstance(exc, InputError):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, msg)
    if isinstance(exc, HostError):
        return recoverable_status(grpc.StatusCode.FAILED_PRECONDITION, msg, False)
    if isinstance(exc, LaunchError | ArtifactError | MonitorError):
        return recoverable_status(grpc.StatusCode.FAILED_PRECONDITION, msg, True)
    if isinstance(exc, StateError):
        return Status(grpc.StatusCode.FAILED_PRECONDITION, msg)
    if isinstance(exc, VmdriverError):
        return Status(grpc.StatusCode.INTERNAL, msg)
    if isinstance(exc, NotImplementedError):
        return Status(grpc.StatusCode.UNIMPLEMENTED, msg)
    return Status(grpc.StatusCode.INTERNAL, f"internal error in the vmdriver plugin: "
                                            f"{type(exc).__name__}: {msg}")


def _abort(context: grpc.ServicerContext, name: str, exc: BaseException) -> None:
    status = status_for(exc)
    if status.code is grpc.StatusCode.INTERNAL:
        log.error("%s failed", name, exc_info=exc)
    elif status.code is not grpc.StatusCode.CANCELLED:
        log.info("%s: %s: %s", name, status.code.name, status.details)
    context.abort_with_status(status)


def rpc(func: F) -> F:
    """Wrap a unary handler: any exception becomes a readable gRPC status."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return func(self, request, context)
        except Exception as exc:
            _abort(context, func.__name__, exc)
            raise  # abort_with_status raised already; this is never reached

    return cast(F, wrapper)


def stream(func: F) -> F:
    """Wrap a server-streaming handler the same way as :func:`rpc`."""

    @functools.wraps(func)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from func(self, request, context)
        except Exception as exc:
            _abort(context, func.__name__, exc)
            raise

    return cast(F, wrapper)
