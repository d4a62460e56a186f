"""Downloads over HTTP from a real server on 127.0.0.1: redirects, resume, retries, errors."""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.artifacts.artifact_server import ArtifactServer
from tests.artifacts.helpers import FAST, fetch, files, leftovers, sha256
from vmdriver.artifacts import ArtifactCache, HttpSettings, ProgressEvent
from vmdriver.errors import ArtifactError

BODY = os.urandom(300_000) + bytes(2 << 20) + os.urandom(1000)  # data, a hole, data


def test_download_verified_into_local(server: ArtifactServer, tmp_path: Path,
                                      small_qcow2: Path) -> None:
    data = small_qcow2.read_bytes()
    url = server.add("/img/small.qcow2", data)
    events: list[ProgressEvent] = []
    placed = fetch(f"{url}?checksum={sha256(data)}", tmp_path / "task", events=events)
    assert placed == [(tmp_path / "task" / "local" / "small.qcow2").resolve()]
    assert placed[0].read_bytes() == data
    done = [e for e in events if e.phase == "download" and e.finished]
    assert done and done[-1].done == len(data) and done[-1].total == len(data)
    assert leftovers(tmp_path / "task") == []


def test_zero_runs_are_written_as_holes(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.raw", BODY)
    [out] = fetch(url, tmp_path, mode="file", destination="local/disk.raw")
    assert out.read_bytes() == BODY
    assert os.stat(out).st_blocks * 512 < len(BODY) - (1 << 20)


def test_redirect_followed(server: ArtifactServer, tmp_path: Path) -> None:
    server.add("/real/disk.img", BODY)
    url = server.add("/disk.img", redirect="/real/disk.img")
    [out] = fetch(url, tmp_path, options={"checksum": sha256(BODY)})
    assert out.name == "disk.img" and out.read_bytes() == BODY
    assert server.hits["/disk.img"] == 1 and server.hits["/real/disk.img"] == 1


def test_resume_with_range_after_connection_drop(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", BODY, drop_after=123_456)
    [out] = fetch(url + f"?checksum={sha256(BODY)}", tmp_path)
    assert out.read_bytes() == BODY
    assert server.hits["/disk.img"] == 2
    assert server.ranges == ["bytes=123456-"]


def test_server_without_ranges_restarts_from_zero(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", BODY, drop_after=100_000, ranges=False)
    [out] = fetch(url, tmp_path, options={"checksum": sha256(BODY)})
    assert out.read_bytes() == BODY  # the 200 body replaced the partial one, not appended


def test_transient_500_is_retried(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", BODY, status=503, fail_times=2)
    [out] = fetch(url, tmp_path)
    assert out.read_bytes() == BODY and server.hits["/disk.img"] == 3


def _fails(source: str, task: Path, cache: ArtifactCache | None = None,
           http: HttpSettings = FAST, **kw: Any) -> str:
    with pytest.raises(ArtifactError) as info:
        fetch(source, task, cache=cache, http=http, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith("artifact ")
    assert leftovers(task) == [] and files(task) == []
    if cache is not None:
        assert leftovers(cache.root) == []
    return msg


def test_404_is_one_clear_line_and_not_retried(server: ArtifactServer, tmp_path: Path) -> None:
    msg = _fails(server.url("/missing.img"), tmp_path)
    assert "/missing.img" in msg and "HTTP 404 Not Found" in msg
    assert server.hits["/missing.img"] == 1


def test_persistent_500_gives_up(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", BODY, status=500)
    msg = _fails(url, tmp_path)
    assert "HTTP 500" in msg and "gave up after 3 tries" in msg
    assert server.hits["/disk.img"] == 3


def test_checksum_mismatch_leaves_nothing(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", BODY)
    cache = ArtifactCache(tmp_path / "cache")
    wrong = "sha256:" + "0" * 64
    msg = _fails(f"{url}?checksum={wrong}", tmp_path / "task", cache=cache)
    assert f"checksum mismatch: expected {wrong}, got {sha256(BODY)}" in msg
    msg = _fails(url, tmp_path / "task2", options={"checksum": "md5:" + "1" * 32})
    assert "checksum mismatch" in msg


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    msg = _fails(f"http://127.0.0.1:{port}/disk.img", tmp_path)
    assert f"connection refused by 127.0.0.1:{port}" in msg and "gave up after 3 tries" in msg


def test_dns_failure_is_not_retried(tmp_path: Path) -> None:
    msg = _fails("http://nonexistent.invalid/disk.img", tmp_path)
    assert "cannot resolve host 'nonexistent.invalid'" in msg and "tries" not in msg


def test_slow_server_times_out(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", BODY, delay=1.0)
    http = HttpSettings(read_timeout=0.2, attempts=2, backoff=0.01)
    msg = _fails(url, tmp_path, http=http)
    assert "timed out waiting for data from 127.0.0.1" in msg


def test_truncated_body_every_time(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/disk.img", BODY, drop_after=50_000, drop_times=99, ranges=False)
    msg = _fails(url, tmp_path)
    assert f"connection closed after 50000 of {len(BODY)} bytes" in msg


def test_headers_are_sent_and_passwords_never_shown(server: ArtifactServer,
                                                    tmp_path: Path) -> None:
    seen: list[str] = []
    orig = server._handle

    def spy(h: object) -> None:
        seen.append(getattr(h, "headers").get("X-Token", ""))  # noqa: B009
        orig(h)  # type: ignore[arg-type]

    server._handle = spy  # type: ignore[method-assign]
    port = server.httpd.server_address[1]
    msg = _fails(f"http://user:s3cret@127.0.0.1:{port}/nope.img", tmp_path,
                 headers={"X-Token": "abc"})
    assert seen == ["abc"] and "s3cret" not in msg and "***@127.0.0.1" in msg
