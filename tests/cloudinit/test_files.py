"""user_data / network-config files come from the task dir only."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdriver.cloudinit import read_task_file
from vmdriver.errors import SpecError


@pytest.fixture
def task_dir(tmp_path: Path) -> Path:
    root = tmp_path / "task"
    (root / "local").mkdir(parents=True)
    (root / "local" / "user-data").write_text("#cloud-config\nruncmd: [x]\n")
    (tmp_path / "outside").write_text("host secret")
    return root


def test_reads_a_file_in_the_task_dir(task_dir: Path) -> None:
    assert read_task_file(task_dir, "local/user-data") == "#cloud-config\nruncmd: [x]\n"
    (task_dir / "local" / "link").symlink_to("user-data")
    assert read_task_file(task_dir, "local/link").startswith("#cloud-config")


@pytest.mark.parametrize("path", ["../outside", "local/../../outside", "/etc/passwd", "", "a\0b"])
def test_paths_that_leave_the_task_dir_are_refused(task_dir: Path, path: str) -> None:
    with pytest.raises(SpecError, match="user_data"):
        read_task_file(task_dir, path)


def test_symlinks_out_of_the_task_dir_are_refused(task_dir: Path) -> None:
    (task_dir / "local" / "escape").symlink_to(task_dir.parent / "outside")
    (task_dir / "dirlink").symlink_to(task_dir.parent)
    for path in ("local/escape", "dirlink/outside"):
        with pytest.raises(SpecError, match="leaves the task dir"):
            read_task_file(task_dir, path)


def test_only_small_regular_utf8_files(task_dir: Path) -> None:
    (task_dir / "big").write_bytes(b"#" * 2048)
    (task_dir / "bin").write_bytes(b"\x1f\x8b\x08\x00\xff")
    os.mkfifo(task_dir / "fifo")
    cases = {"big": "larger than 1 KiB", "bin": "not UTF-8", "fifo": "not a regular file",
             "local": "not a regular file", "missing": "cannot open"}
    for path, message in cases.items():
        with pytest.raises(SpecError, match=message):
            read_task_file(task_dir, path, limit=1024)
