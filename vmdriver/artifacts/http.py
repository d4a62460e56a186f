"""Downloading over HTTP(S) with httpx: streamed, resumed with Range after a broken
connection, bounded retries with exponential backoff, clear causes on failure."""

from __future__ import annotations

import errno
import random
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from vmdriver.artifacts.transfer import Sink, TooLarge, check_cancel
from vmdriver.errors import ArtifactError

#: Called with (bytes so far, total bytes if known).
DownloadProgress = Callable[[int, int | None], None]
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")
#: Statuses worth asking again: the server or a proxy is busy or restarting.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class HttpSettings:
    """Timeouts and retry bounds (seconds)."""

    connect_timeout: float = 15.0
    #: Longest wait for the next bytes of a response.
    read_timeout: float = 60.0
    #: Tries in a row without progress before giving up (a try that moved bytes resets
    #: the count); never more than four times this many tries in all.
    attempts: int = 5
    #: First backoff; it doubles each try, up to ``max_backoff``, with jitter.
    backoff: float = 1.0
    max_backoff: float = 30.0
    max_redirects: int = 10


class _Retry(Exception):
    """A failure worth another try; ``str()`` is the cause."""


def _root_cause(exc: BaseException) -> BaseException:
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        nxt = seen.__cause__ or seen.__context__
        assert nxt is not None
        if isinstance(seen, OSError) and not isinstance(nxt, OSError):
            break
        seen = nxt
    return seen


def _transport_cause(exc: httpx.TransportError, url: httpx.URL) -> tuple[str, bool]:
    """(cause, worth retrying) for a transport-level failure."""
    host = url.host + (f":{url.port}" if url.port else "")
    root = _root_cause(exc)
    text = str(exc) or type(exc).__name__
    if isinstance(root, socket.gaierror) or "name resolution" in text.lower() \
            or "not known" in text.lower():
        return f"cannot resolve host {url.host!r}: {root or text}", False
    if isinstance(exc, httpx.ConnectTimeout):
        return f"timed out connecting to {host}", True
    if isinstance(exc, httpx.ReadTimeout):
        return f"timed out waiting for data from {host}", True
    if isinstance(root, ConnectionRefusedError) or "refused" in text.lower():
        return f"connection refused by {host}", True
    if isinstance(root, ssl.SSLCertVerificationError) or "CERTIFICATE_VERIFY" in text:
        return f"TLS certificate of {host} not trusted: {text}", False
    if isinstance(root, OSError) and root.errno == errno.ENETUNREACH:
        return f"network unreachable for {host}", True
    return f"connection to {host} failed: {text}", True


def _sleep(delay: float, cancel: threading.Event | None) -> None:
    if cancel is None:
        time.sleep(delay)
    elif cancel.wait(delay):
        check_cancel(cancel)


def download(url: str, headers: tuple[tuple[str, str], ...], sink: Sink, display: str, *,
             settings: HttpSettings | None = None, progress: DownloadProgress | None = None,
             cancel: threading.Event | None = None) -> None:
    """Fill ``sink`` with the body of ``url``, resuming and retrying within bounds."""
    cfg = settings or HttpSettings()
    timeout = httpx.Timeout(cfg.read_timeout, connect=cfg.connect_timeout)
    base = {k: v for k, v in headers}
    # Ranges count encoded bytes; ask for the bytes as stored so a resume splices right.
    base.setdefault("Accept-Encoding", "identity")
    state = _State()
    failures = tries = 0
    with httpx.Client(timeout=timeout, follow_redirects=True, max_redirects=cfg.max_redirects,
                      headers=base, trust_env=True) as client:
        while True:
            check_cancel(cancel)
            before = sink.size
            try:
                _attempt(client, url, sink, state, display, progress, cancel)
                return
            except _Retry as exc:
                cause = str(exc)
            except httpx.TooManyRedirects:
                raise ArtifactError(display, f"more than {cfg.max_redirects} redirects") from None
            except httpx.TransportError as exc:
                cause, retry = _transport_cause(exc, httpx.URL(state.last_url or url))
                if not retry:
                    raise ArtifactError(display, cause) from None
            failures = 0 if sink.size > before else failures + 1
            tries += 1
            if failures >= cfg.attempts or tries >= cfg.attempts * 4:
                raise ArtifactError(display, f"{cause} (gave up after {tries} tries)")
            delay = min(cfg.max_backoff, cfg.backoff * 2 ** max(0, failures - 1))
            _sleep(delay * random.uniform(0.8, 1.2), cancel)


@dataclass
class _State:
    """What a resume needs to know about the first response."""

    #: ETag or Last-Modified: a resume is only spliced onto the same version.
    validator: str | None = None
    total: int | None = None
    last_url: str | None = None


def _attempt(client: httpx.Client, url: str, sink: Sink, state: _State, display: str,
             progress: DownloadProgress | None, cancel: threading.Event | None) -> None:
    req: dict[str, str] = {}
    if sink.size:
        req["Range"] = f"bytes={sink.size}-"
        if state.validator:
            req["If-Range"] = state.validator
    with client.stream("GET", url, headers=req) as resp:
        state.last_url = str(resp.url)
        if not _accept(resp, sink, state, display):
            return
        try:
            for chunk in resp.iter_raw():  # as it arrives: a drop loses no buffered bytes
                check_cancel(cancel)
                sink.write(chunk)
                if progress:
                    progress(sink.size, state.total)
        except httpx.RemoteProtocolError as exc:
            raise _Retry(_truncated(sink.size, state.total, exc)) from None
        except httpx.ReadError as exc:
            raise _Retry(_truncated(sink.size, state.total, exc)) from None
        if state.total is not None and sink.size < state.total:
            raise _Retry(_truncated(sink.size, state.total, None))


def _accept(resp: httpx.Response, sink: Sink, state: _State, display: str) -> bool:
    """Check the response status and headers; False when there is nothing left to read."""
    status = resp.status_code
    if status == 416 and sink.size and state.total == sink.size:
        return False  # everything had arrived; only the end of the last try was lost
    if status in _RETRY_STATUS:
        raise _Retry(f"HTTP {status} {resp.reason_phrase} from {_short(resp.url)}")
    if status >= 400:
        raise ArtifactError(display, f"HTTP {status} {resp.reason_phrase} from "
                                     f"{_short(resp.url)}")
    if status == 206 and sink.size:
        m = _CONTENT_RANGE.match(resp.headers.get("content-range", ""))
        if not m or int(m.group(1)) != sink.size:
            sink.reset()  # a range we did not ask for: start over without it
            raise _Retry("server answered a resume with the wrong range")
        if m.group(3) != "*":
            state.total = int(m.group(3))
    elif status == 200:
        if sink.size:
            sink.reset()  # Range ignored (or the file changed): the body is all of it
        length = resp.headers.get("content-length")
        state.total = int(length) if length and length.isascii() and length.isdigit() else None
        etag = resp.headers.get("etag", "")
        state.validator = (etag if etag and not etag.startswith("W/")
                           else resp.headers.get("last-modified"))
    else:
        raise ArtifactError(display, f"unexpected HTTP {status} from {_short(resp.url)}")
    if state.total is not None and sink.limit is not None and state.total > sink.limit:
        raise TooLarge(f"the server announces {state.total} bytes, more than {sink.limit}")
    return True


def _truncated(size: int, total: int | None, exc: Exception | None) -> str:
    of = f" of {total}" if total is not None else ""
    why = f": {exc}" if exc else ""
    return f"connection closed after {size}{of} bytes{why}"


def _short(url: httpx.URL) -> str:
    """The URL without credentials or query (it may hold tokens)."""
    port = f":{url.port}" if url.port else ""
    return f"{url.scheme}://{url.host}{port}{url.path}"
