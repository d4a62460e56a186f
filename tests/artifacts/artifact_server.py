"""A real HTTP server on 127.0.0.1 for artifact tests, with switchable misbehaviour."""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class Route:
    """What one path serves and how badly."""

    body: bytes = b""
    #: Answer this status instead (while ``fail_times`` lasts; 0 means always).
    status: int = 200
    fail_times: int = 0
    #: Redirect here (a path on this server).
    redirect: str = ""
    #: Close the connection after this many body bytes, the first ``drop_times`` times.
    drop_after: int | None = None
    drop_times: int = 1
    #: Honour Range requests.
    ranges: bool = True
    #: Sleep this long before each 64 KiB of body.
    delay: float = 0.0
    etag: str = '"v1"'


class ArtifactServer:
    """Serve :class:`Route` s; count requests per path."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.ranges: list[str] = []
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                server._handle(self)

        class Server(ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # clients that hang up early are part of the tests

        self.httpd = Server(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def url(self, path: str) -> str:
        return self.base + path

    def add(self, path: str, body: bytes = b"", **kw: object) -> str:
        self.routes[path] = Route(body=body, **kw)  # type: ignore[arg-type]
        return self.url(path)

    def start(self) -> ArtifactServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _handle(self, h: BaseHTTPRequestHandler) -> None:
        path = h.path.split("?", 1)[0]
        with self._lock:
            self.hits[path] += 1
            count = self.hits[path]
            if h.headers.get("Range"):
                self.ranges.append(h.headers["Range"])
        route = self.routes.get(path)
        if route is None:
            h.send_error(404, "Not Found")
            return
        if route.redirect:
            h.send_response(302)
            h.send_header("Location", route.redirect)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        if route.status != 200 and (route.fail_times == 0 or count <= route.fail_times):
            h.send_error(route.status)
            return
        body, start = route.body, 0
        m = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
        same = h.headers.get("If-Range") in (None, route.etag)
        if m and route.ranges and same:
            start = int(m.group(1))
            h.send_response(206)
            h.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            h.send_response(200)
        h.send_header("Content-Length", str(len(body) - start))
        h.send_header("ETag", route.etag)
        h.send_header("Accept-Ranges", "bytes")
        h.end_headers()
        limit = len(body)
        if route.drop_after is not None and count <= route.drop_times:
            limit = min(limit, start + route.drop_after)
        pos = start
        try:
            while pos < limit:
                if route.delay:
                    time.sleep(route.delay)
                end = min(limit, pos + 65536)
                h.wfile.write(body[pos:end])
                h.wfile.flush()
                pos = end
        except (BrokenPipeError, ConnectionResetError):
            pass
        if limit < len(body):
            h.close_connection = True
