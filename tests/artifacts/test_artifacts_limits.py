"""The operator's artifact limits: downloads stop at artifact_max_size, early when announced."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.artifacts.artifact_server import ArtifactServer
from tests.artifacts.helpers import FAST
from vmdriver.artifacts import fetch_artifacts
from vmdriver.artifacts.transfer import Sink, TooLarge
from vmdriver.errors import ArtifactError
from vmdriver.host.config import HostConfig
from vmdriver.spec import ArtifactSpec


def _fetch(url: str, tmp_path: Path, **host: object) -> None:
    cfg = HostConfig(state_dir=tmp_path / "s", **host)  # type: ignore[arg-type]
    fetch_artifacts((ArtifactSpec(source=url),), tmp_path / "task", tmp_path, http=FAST,
                    host=cfg)


def test_announced_size_over_the_limit_is_refused_before_the_body(
        server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/big.img", b"x" * (3 << 20), delay=0.05)
    with pytest.raises(ArtifactError, match="announces") as info:
        _fetch(url, tmp_path, artifact_max_size="1MiB")
    assert info.value.__class__.exit_status == 2
    assert not list((tmp_path / "task").rglob("big.img"))


def test_a_download_at_the_limit_passes(server: ArtifactServer, tmp_path: Path) -> None:
    url = server.add("/big.img", b"y" * (3 << 20))
    _fetch(url, tmp_path, artifact_max_size="3MiB")
    assert (tmp_path / "task" / "local" / "big.img").stat().st_size == 3 << 20


def test_the_sink_stops_where_no_size_was_announced(tmp_path: Path) -> None:
    sink = Sink(tmp_path / "blob", None, limit=100)
    sink.write(b"a" * 100)
    with pytest.raises(TooLarge):
        sink.write(b"b")
    sink.abort()


@pytest.mark.parametrize("name", ["local.img"])
def test_a_local_file_over_the_limit_is_refused(name: str, tmp_path: Path) -> None:
    (tmp_path / name).write_bytes(b"z" * (2 << 20))
    with pytest.raises(ArtifactError, match="too large"):
        _fetch(name, tmp_path, artifact_max_size="1MiB")
