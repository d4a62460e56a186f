"""Hostile artifact blocks: no host file read into the task dir, none written outside it."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

from tests.security.conftest import Canary, Listener
from vmdriver.artifacts import fetch_artifacts
from vmdriver.errors import ArtifactError
from vmdriver.host.config import HostConfig
from vmdriver.spec import ArtifactSpec


def _fetch(sources: list[str], task: Path, job_dir: Path, host: HostConfig | None = None,
           **fields: str) -> None:
    specs = tuple(ArtifactSpec(source=s, **fields) for s in sources)
    fetch_artifacts(specs, task, job_dir, host=host)


def _task_files(task: Path) -> bytes:
    return b"".join(p.read_bytes() for p in task.rglob("*") if p.is_file() and not p.is_symlink())


READS = ["{canary}", "file://{canary}", "../host/secret.txt", "../../{rel}",
         "/proc/self/root{canary}", "file:///proc/self/cwd/../host/secret.txt", "link-out",
         "file://localhost{canary}"]


@pytest.mark.parametrize("source", READS)
def test_file_sources_never_read_host_files(source: str, tmp_path: Path, canary: Canary) -> None:
    job_dir, task = tmp_path / "jobs", tmp_path / "task"
    job_dir.mkdir()
    (job_dir / "link-out").symlink_to(canary.path)
    src = source.format(canary=canary.path, rel=str(canary.path).lstrip("/"))
    with pytest.raises(ArtifactError) as info:
        _fetch([src], task, job_dir)
    assert "\n" not in str(info.value)
    assert canary.content not in _task_files(task)


def test_file_sources_in_the_job_dir_and_image_paths_still_work(tmp_path: Path) -> None:
    job_dir, images, task = tmp_path / "jobs", tmp_path / "images", tmp_path / "task"
    for d in (job_dir, images):
        d.mkdir()
    (job_dir / "a.img").write_bytes(b"a")
    (images / "b.img").write_bytes(b"b")
    _fetch(["a.img", str(images / "b.img")], task, job_dir,
           HostConfig(image_paths=(str(images),), state_dir=tmp_path / "s"))
    assert (task / "local" / "a.img").read_bytes() == b"a"
    assert (task / "local" / "b.img").read_bytes() == b"b"


def _tar(entries: list[tuple[str, str | bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, what in entries:
            info = tarfile.TarInfo(name)
            if isinstance(what, str):
                info.type, info.linkname = tarfile.SYMTYPE, what
                tar.addfile(info)
            else:
                info.size = len(what)
                tar.addfile(info, io.BytesIO(what))
    return buf.getvalue()


#: An earlier artifact plants links that only point outward once chained; later ones write.
CHAINS = [
    [[("x", "up/sub/../.."), ("up", "."), ("x/pwn", b"w")]],
    [[("d", "e/.."), ("e", ".")], [("d/../../host/secret.txt", b"w")]],
    [[("a", "b/c/../.."), ("b", "."), ("b/c", "..")], [("a/host/secret.txt", b"w")]],
    [[("esc", "inner/.."), ("inner", "..")]],
]


@pytest.mark.parametrize("layers", CHAINS, ids=[str(i) for i in range(len(CHAINS))])
@pytest.mark.parametrize("dest", ["local/", "local/esc/", "local/x/"])
def test_planted_links_never_redirect_a_later_write(layers: list[list[tuple[str, str | bytes]]],
                                                    dest: str, tmp_path: Path,
                                                    canary: Canary) -> None:
    job_dir, task = tmp_path / "jobs", tmp_path / "task"
    job_dir.mkdir()
    for i, layer in enumerate(layers):
        (job_dir / f"l{i}.tar").write_bytes(_tar(layer))
    task.mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    for i in range(len(layers)):
        try:
            _fetch([f"l{i}.tar"], task, job_dir, destination=dest if i else "local/")
        except ArtifactError as exc:
            assert "\n" not in str(exc)
    assert canary.untouched()
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert not (tmp_path / "pwn").exists()


def test_archive_bombs_are_cut_off(tmp_path: Path) -> None:
    job_dir, task = tmp_path / "jobs", tmp_path / "task"
    job_dir.mkdir()
    host = HostConfig(artifact_max_entries=50, artifact_max_ratio=10,
                      artifact_max_unpacked="8MiB", state_dir=tmp_path / "s")
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(200):
            zf.writestr(f"f{i}", b"")
    (job_dir / "many.zip").write_bytes(many.getvalue())
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", bytes(64 << 20))
    (job_dir / "bomb.zip").write_bytes(bomb.getvalue())
    (job_dir / "big.tar").write_bytes(_tar([("big", os.urandom(9 << 20))]))
    for name, why in (("many.zip", "entries"), ("bomb.zip", "artifact_max"),
                      ("big.tar", "artifact_max")):
        with pytest.raises(ArtifactError, match=why):
            _fetch([name], task, job_dir, host)
        assert sum(p.stat().st_size for p in task.rglob("*") if p.is_file()) < (9 << 20)


def test_getters_the_operator_did_not_allow_make_no_request(tmp_path: Path,
                                                           listener: Listener) -> None:
    host = HostConfig(artifact_getters=("https",), state_dir=tmp_path / "s")
    for source in (f"http://127.0.0.1:{listener.port}/x", f"ftp://127.0.0.1:{listener.port}/x",
                   f"git::http://127.0.0.1:{listener.port}/x"):
        with pytest.raises(ArtifactError):
            _fetch([source], tmp_path / "task", tmp_path, host)
    assert listener.hits == []


@pytest.mark.parametrize("source,headers", [
    ("http://127.0.0.1:{port}/a\x00b", {}), ("http://127.0.0.1:{port}/é", {}),
    ("http://127.0.0.1:{port}/x", {"X-A": "v\r\nHost: evil"}), ("http://127.0.0.1:{port}/x",
                                                              {"Ä": "v"}),
    ("http://127.0.0.1:{port}/x", {"X": "\x00"}),
])
def test_bad_urls_and_headers_give_one_line_and_no_request(source: str, headers: dict[str, str],
                                                           tmp_path: Path,
                                                           listener: Listener) -> None:
    spec = ArtifactSpec(source=source.format(port=listener.port),
                        headers=tuple(headers.items()))
    with pytest.raises(ArtifactError) as info:
        fetch_artifacts((spec,), tmp_path / "task", tmp_path)
    assert "\n" not in str(info.value)
    assert listener.hits == []


@pytest.mark.parametrize("swap", ["file", "dir"])
def test_a_source_swapped_after_its_check_is_not_read(swap: str, tmp_path: Path,
                                                      canary: Canary) -> None:
    """The job's own dir changes while an earlier artifact is copied: the later one is refused."""
    job_dir, task = tmp_path / "jobs", tmp_path / "task"
    (job_dir / "host").mkdir(parents=True)
    (job_dir / "a.img").write_bytes(b"a" * (3 << 20))
    (job_dir / "host" / "secret.txt").write_bytes(b"harmless")
    swapped: list[bool] = []

    def on_progress(_: object) -> None:
        if swapped:
            return
        swapped.append(True)
        if swap == "file":
            (job_dir / "host" / "secret.txt").unlink()
            (job_dir / "host" / "secret.txt").symlink_to(canary.path)
        else:
            (job_dir / "host" / "secret.txt").unlink()
            (job_dir / "host").rmdir()
            (job_dir / "host").symlink_to(canary.path.parent)

    # A checksum: the first artifact is copied in chunks, with progress between them.
    digest = hashlib.sha256(b"a" * (3 << 20)).hexdigest()
    specs = (ArtifactSpec(source="a.img", options=(("checksum", f"sha256:{digest}"),)),
             ArtifactSpec(source="host/secret.txt"))
    with pytest.raises(ArtifactError, match=r"changed after its check|symbolic link|cannot open"):
        fetch_artifacts(specs, task, job_dir, progress=on_progress)
    assert swapped and canary.content not in _task_files(task)
