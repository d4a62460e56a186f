"""Reading artifact blocks: options, modes, destinations, legacy keys, progress, cancel."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.artifacts.artifact_server import ArtifactServer
from tests.artifacts.helpers import fetch, files, leftovers, sha256
from vmdriver.artifacts import fetch_artifacts_async
from vmdriver.artifacts.checksum import ChecksumSyntaxError, parse_checksum
from vmdriver.artifacts.progress import PlainProgress, ProgressEvent
from vmdriver.artifacts.source import parse_source
from vmdriver.errors import ArtifactError
from vmdriver.jobfile.qemu import legacy_artifacts, parse_config
from vmdriver.spec import ArtifactSpec


@pytest.mark.parametrize("text,algo", [
    ("md5:" + "a" * 32, "md5"), ("SHA1:" + "B" * 40, "sha1"), ("a" * 64, "sha256"),
    ("sha512:" + "c" * 128, "sha512"),
])
def test_checksum_forms(text: str, algo: str) -> None:
    assert parse_checksum(text).algorithm == algo


@pytest.mark.parametrize("text,why", [
    ("sha256:abc", "has 3 hex digits, not 64"), ("crc32:" + "a" * 8, "unknown checksum type"),
    ("sha1:" + "z" * 40, "not hexadecimal"), ("abc", "cannot tell"),
    ("file:http://x/SHA256SUMS", "not supported"),
])
def test_bad_checksums(text: str, why: str) -> None:
    with pytest.raises(ChecksumSyntaxError, match=why):
        parse_checksum(text)


def _src(tmp_path: Path, **kw: object) -> object:
    return parse_source(ArtifactSpec(**kw), tmp_path, tmp_path)


def test_url_options_are_stripped_and_kept_apart(tmp_path: Path) -> None:
    src = parse_source(ArtifactSpec(
        source="https://u:pw@example.test/a/disk.qcow2.xz?token=1&checksum=sha256:" + "a" * 64
               + "&archive=xz"), tmp_path, tmp_path)
    assert src.location == "https://u:pw@example.test/a/disk.qcow2.xz?token=1"
    assert src.display == "https://***@example.test/a/disk.qcow2.xz?token=1"
    assert src.checksum is not None and src.checksum.algorithm == "sha256"
    assert src.archive is not None and src.archive.name == "xz"
    assert src.file_name == "disk.qcow2" and src.target == (tmp_path / "local").resolve()


@pytest.mark.parametrize("kw,why", [
    ({"source": "s3://bucket/x.img"}, "scheme 's3' is not supported"),
    ({"source": "git::https://h/x"}, "getter 'git' is not supported"),
    ({"source": "http://h/x.img", "options": (("sshkey", "k"),)}, "unknown option 'sshkey'"),
    ({"source": "http://h/x.img?checksum=md5:" + "a" * 32,
      "options": (("checksum", "md5:" + "b" * 32),)}, "different values"),
    ({"source": "http://h/x.img", "mode": "dir"}, 'mode "dir" needs an archive'),
    ({"source": "http://h/x.tar", "mode": "file"}, 'mode "file" cannot unpack'),
    ({"source": "http://h/", "mode": "any"}, "names no file"),
    ({"source": "http://h/x?archive=rar"}, "unknown archive type 'rar'"),
])
def test_bad_blocks_fail_before_any_download(tmp_path: Path, kw: dict[str, object],
                                             why: str) -> None:
    with pytest.raises(ArtifactError, match=why):
        _src(tmp_path, **kw)


def test_relative_and_file_sources(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "disk.img").write_bytes(b"disk")
    task = tmp_path / "task"
    [a] = fetch("images/disk.img", task, job_dir=tmp_path)
    [b] = fetch(f"file://{tmp_path}/images/disk.img", task, job_dir=tmp_path,
                destination="local/b.img", mode="file")
    assert a.read_bytes() == b.read_bytes() == b"disk" and b.name == "b.img"
    with pytest.raises(ArtifactError, match="no such file"):
        fetch("images/missing.img", task, job_dir=tmp_path)
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        fetch("images/disk.img", task / "x", job_dir=tmp_path,
              options={"checksum": sha256(b"other")})
    assert leftovers(task) == []


def test_legacy_image_source_maps_onto_an_artifact(server: ArtifactServer,
                                                   tmp_path: Path) -> None:
    import hashlib

    url = server.add("/linux.img", b"legacy image")
    cfg = parse_config({"image_source": url, "checksum": hashlib.md5(b"legacy image").hexdigest()},
                       "task 'web'")
    [spec] = legacy_artifacts(cfg)
    from vmdriver.artifacts import fetch_artifacts

    [out] = fetch_artifacts((spec,), tmp_path, tmp_path)
    assert out == (tmp_path / "local" / "linux.img").resolve()
    bad = parse_config({"image_source": url, "checksum": "0" * 32}, "task 'web'")
    with pytest.raises(ArtifactError, match="checksum mismatch: expected md5:0000"):
        fetch_artifacts(legacy_artifacts(bad), tmp_path / "t2", tmp_path)


def test_plain_progress_lines_are_throttled() -> None:
    out: list[str] = []
    show = PlainProgress(out.append, interval=60)
    for done in range(0, 101, 10):
        show(ProgressEvent("x", "download", done << 20, 100 << 20, finished=done == 100))
    assert out[0] == "artifact x: download 100.0 MiB started"
    assert out[-1].startswith("artifact x: download done 100.0 MiB/100.0 MiB (100%) in ")
    assert len(out) == 2


def test_cancelling_the_async_fetch_stops_the_worker(server: ArtifactServer,
                                                     tmp_path: Path) -> None:
    url = server.add("/slow.img", b"x" * (4 << 20), delay=0.05)
    spec = ArtifactSpec(source=url)

    async def main() -> float:
        task = asyncio.create_task(fetch_artifacts_async((spec,), tmp_path, tmp_path))
        await asyncio.sleep(0.3)
        task.cancel()
        t0 = time.monotonic()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic() - t0

    waited = asyncio.run(main())
    assert waited < 2  # the worker noticed within a chunk or so, and cleaned up first
    assert files(tmp_path) == [] and leftovers(tmp_path) == []


def test_terminal_gets_a_rich_bar_with_rate() -> None:
    import io

    from rich.console import Console

    from vmdriver.artifacts import progress_display

    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=120)
    with progress_display(console) as show:
        for done in range(0, 65, 16):
            show(ProgressEvent("http://h/disk.img", "download", done << 20, 64 << 20,
                               finished=done == 64))
            time.sleep(0.01)
    text = buf.getvalue()
    assert "download disk.img" in text and "64.0/64.0 MiB" in text and "/s" in text
