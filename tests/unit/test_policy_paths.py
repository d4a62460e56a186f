"""The escape table: real files and symlinks in temp dirs, each escape refused, each legit path kept."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from vmdriver.errors import InputError, PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.policy import (
    PathPolicy,
    check_image_path,
    inspect_image,
    open_image,
    resolve_allowed,
)
from vmdriver.policy.images import checked_image


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """An alloc dir with a task dir, an allowed image dir, and the places escapes aim at."""
    alloc = tmp_path / "alloc-1"
    task = alloc / "web"
    (task / "local").mkdir(parents=True)
    (alloc / "alloc" / "data").mkdir(parents=True)
    allowed = tmp_path / "opt" / "qemu"
    allowed.mkdir(parents=True)
    other = tmp_path / "opt" / "qemu-other"
    other.mkdir(parents=True)
    secret = tmp_path / "secret.img"
    for f in (task / "local" / "disk.img", allowed / "base.img", other / "x.img", secret,
              task / "..x", alloc / "alloc" / "data" / "shared.img", task / "local" / "..img"):
        f.write_bytes(b"\0" * 4096)
    (allowed / "sub").mkdir()
    (allowed / "sub" / "deep.img").write_bytes(b"\0" * 4096)
    return {"alloc": alloc, "task": task, "allowed": allowed, "other": other, "secret": secret,
            "tmp": tmp_path}


def host_for(tree: dict[str, Path]) -> HostConfig:
    return HostConfig(image_paths=(str(tree["allowed"]),), state_dir=tree["tmp"])


def check(tree: dict[str, Path], image: str) -> Path:
    return check_image_path(image, tree["task"], tree["alloc"], host_for(tree), where="image_path")


def link(at: Path, target: str | Path) -> str:
    at.symlink_to(target)
    return str(at)


def fifo(at: Path, name: str) -> str:
    os.mkfifo(at)
    return name


OUTSIDE = "image path leads outside the allowed dirs"
CLIMB = "relative image path climbs out of the task dir"
MAGIC = "path leads into /proc, /sys or /dev/fd"
NOT_FILE = "image path is not a regular file"
Builder = Callable[[dict[str, Path]], str]

# Each builder makes whatever the attempt needs on disk and returns the image_path to
# try; the message is what the one-line refusal must say.
ESCAPES: dict[str, tuple[Builder, str]] = {
    "absolute outside": (lambda t: str(t["secret"]), OUTSIDE),
    "etc shadow": (lambda t: "/etc/shadow", OUTSIDE),
    "relative climb": (lambda t: "../../secret.img", CLIMB),
    "relative climb via local": (lambda t: "local/../../../secret.img", CLIMB),
    "relative climb into alloc": (lambda t: "../alloc/data/shared.img", CLIMB),
    "prefix match sibling dir": (lambda t: str(t["other"] / "x.img"), OUTSIDE),
    "dotdot out of allowed dir": (lambda t: str(t["allowed"]) + "/../qemu-other/x.img", OUTSIDE),
    "symlink in task dir to outside": (
        lambda t: link(t["task"] / "local" / "l.img", t["secret"]), f"{OUTSIDE} \\(to .*secret"),
    "relative symlink in task dir": (
        lambda t: link(t["task"] / "local" / "r.img", "../../../secret.img"),
        f"{OUTSIDE} \\(to .*secret"),
    "symlink in allowed dir to outside": (
        lambda t: link(t["allowed"] / "evil.img", t["secret"]), f"{OUTSIDE} \\(to .*secret"),
    "symlinked dir in allowed dir": (lambda t: link(t["allowed"] / "d", t["other"]) + "/x.img",
                                     f"{OUTSIDE} \\(to .*qemu-other/x.img"),
    "symlink chain leaving": (lambda t: link(
        t["task"] / "local" / "a.img", link(t["task"] / "local" / "b.img", t["secret"])),
        f"{OUTSIDE} \\(to .*secret"),
    "proc self root": (lambda t: "/proc/self/root" + str(t["allowed"] / "base.img"), MAGIC),
    "proc self cwd": (lambda t: "/proc/self/cwd/local/disk.img", MAGIC),
    "symlink to proc": (lambda t: link(t["task"] / "local" / "p.img",
                                       "/proc/self/root" + str(t["secret"])), MAGIC),
    "dev fd": (lambda t: "/dev/fd/0", MAGIC),
    "directory": (lambda t: "local", "image path is a directory, not a file"),
    "allowed dir itself": (lambda t: str(t["allowed"]), "image path is a directory, not a file"),
    "device file": (lambda t: "/dev/null", OUTSIDE),
    "symlink to device": (lambda t: link(t["task"] / "local" / "n.img", "/dev/zero"),
                          f"{OUTSIDE} \\(to /dev/zero"),
    "fifo": (lambda t: fifo(t["task"] / "local" / "f.img", "local/f.img"), NOT_FILE),
    "missing": (lambda t: "local/nope.img", "image file does not exist"),
    "symlink loop": (lambda t: (link(t["task"] / "local" / "x1", "x2"),
                                link(t["task"] / "local" / "x2", "x1"))[0],
                     "too many levels of symbolic links"),
    "nul byte": (lambda t: "local/disk.img\0.x", "image path must be a non-empty path without NUL bytes"),
    "empty": (lambda t: "", "image path must be a non-empty path without NUL bytes"),
}

LEGIT: dict[str, tuple[Callable[[dict[str, Path]], str], Callable[[dict[str, Path]], Path]]] = {
    "relative in local": (lambda t: "local/disk.img", lambda t: t["task"] / "local/disk.img"),
    "dot-dot-x file name": (lambda t: "..x", lambda t: t["task"] / "..x"),
    "dot-dot-img in local": (lambda t: "local/..img", lambda t: t["task"] / "local/..img"),
    "climb and come back": (lambda t: "local/../local/disk.img",
                            lambda t: t["task"] / "local/disk.img"),
    "absolute in task dir": (lambda t: str(t["task"] / "local/disk.img"),
                             lambda t: t["task"] / "local/disk.img"),
    "absolute in alloc dir": (lambda t: str(t["alloc"] / "alloc/data/shared.img"),
                              lambda t: t["alloc"] / "alloc/data/shared.img"),
    "in image_paths": (lambda t: str(t["allowed"] / "base.img"),
                       lambda t: t["allowed"] / "base.img"),
    "nested in image_paths": (lambda t: str(t["allowed"] / "sub/deep.img"),
                              lambda t: t["allowed"] / "sub/deep.img"),
    "double slash": (lambda t: str(t["allowed"]) + "//base.img",
                     lambda t: t["allowed"] / "base.img"),
    "symlink in task dir to image_paths": (
        lambda t: link(t["task"] / "local" / "ok.img", t["allowed"] / "base.img"),
        lambda t: t["allowed"] / "base.img"),
    "symlink inside task dir": (lambda t: link(t["task"] / "local" / "s.img", "disk.img"),
                                lambda t: t["task"] / "local/disk.img"),
}


def open_fds_to(path: Path) -> list[str]:
    """This process's fds open on ``path`` (an escape that was refused leaves none)."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                found.append(fd)
    return found


@pytest.mark.parametrize("name", ESCAPES)
def test_escape_attempt_is_refused(tree: dict[str, Path], name: str) -> None:
    make, match = ESCAPES[name]
    image = make(tree)
    with pytest.raises(InputError, match=f"^image_path: (image )?{match}") as info:
        check(tree, image)
    assert "\n" not in str(info.value)
    assert not open_fds_to(tree["secret"])


@pytest.mark.parametrize("name", LEGIT)
def test_legitimate_path_is_accepted(tree: dict[str, Path], name: str) -> None:
    make, expected = LEGIT[name]
    assert check(tree, make(tree)) == expected(tree).resolve()


def test_operator_symlinked_image_dir_still_matches(tree: dict[str, Path]) -> None:
    alias = tree["tmp"] / "images-alias"
    alias.symlink_to(tree["allowed"])
    host = HostConfig(image_paths=(str(alias),), state_dir=tree["tmp"])
    got = check_image_path(str(alias / "base.img"), tree["task"], tree["alloc"], host)
    assert got == tree["allowed"] / "base.img"


def test_outside_paths_are_policy_errors_and_name_what_is_allowed(tree: dict[str, Path]) -> None:
    with pytest.raises(PolicyError) as info:
        check(tree, str(tree["other"] / "x.img"))
    assert str(tree["allowed"]) in str(info.value)
    with pytest.raises(SpecError, match="directory"):
        check(tree, "local")


def test_preview_checks_where_a_missing_image_leads(tree: dict[str, Path]) -> None:
    host = host_for(tree)
    ok = check_image_path("local/later.img", tree["task"], tree["alloc"], host, must_exist=False)
    assert ok == tree["task"] / "local" / "later.img"
    with pytest.raises(PolicyError, match=f"{OUTSIDE} .*'/nowhere/later.img'"):
        check_image_path("/nowhere/later.img", tree["task"], tree["alloc"], host,
                         must_exist=False)


# Section: the open file is the checked file


def test_open_image_gives_same_inode_read_only_and_read_write(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    path = tree["task"] / "local" / "disk.img"
    image = open_image(path, policy, writable=True, where="image_path", value="x")
    try:
        assert image.rw_fd is not None
        st = os.stat(path)
        for fd in image.fds:
            assert (os.fstat(fd).st_ino, os.fstat(fd).st_dev) == (st.st_ino, st.st_dev)
            assert not os.get_inheritable(fd)
        os.write(image.rw_fd, b"x")
        with pytest.raises(OSError):
            os.write(image.ro_fd, b"x")
    finally:
        image.close()
    assert image.fds == (-1,)


def test_symlink_swapped_in_after_check_is_not_followed(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    path = tree["task"] / "local" / "disk.img"
    checked = check(tree, "local/disk.img")
    path.unlink()
    path.symlink_to(tree["secret"])  # the race: swapped between check and open
    with pytest.raises(SpecError, match="image cannot be opened: Too many levels of symbolic"):
        open_image(checked, policy, writable=False, where="image_path", value="local/disk.img")
    assert not open_fds_to(tree["secret"])


def test_directory_swapped_above_the_image_is_caught(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    checked = check(tree, "local/disk.img")
    local = tree["task"] / "local"
    local.rename(tree["task"] / "old")
    outside = tree["tmp"] / "outside"
    outside.mkdir()
    (outside / "disk.img").write_bytes(b"\0" * 512)
    local.symlink_to(outside)
    with pytest.raises(PolicyError, match="image changed while it was being opened"):
        open_image(checked, policy, writable=False, where="image_path", value="local/disk.img")
    assert not open_fds_to(outside / "disk.img")  # the fd was closed again


# Section: files an image references


def qcow2(path: Path, *options: str) -> Path:
    subprocess.run(("qemu-img", "create", "-q", "-f", "qcow2", *options, str(path), "1M"),
                   check=True)
    return path


def test_backing_file_outside_allowed_dirs_is_refused(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    qcow2(tree["task"] / "local" / "evil.qcow2", "-b", str(tree["secret"]), "-F", "raw")
    with pytest.raises(PolicyError, match="backing file"):
        checked_image("local/evil.qcow2", policy, fmt=None, writable=True, where="image_path")


def test_backing_via_protocol_is_refused(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    qcow2(tree["task"] / "local" / "n.qcow2", "-u", "-b", "nbd://127.0.0.1:1/x", "-F", "raw")
    with pytest.raises(PolicyError, match="protocol"):
        checked_image("local/n.qcow2", policy, fmt=None, writable=True, where="image_path")


def test_backing_chain_inside_allowed_dirs_is_accepted(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    base = qcow2(tree["allowed"] / "base.qcow2")
    mid = qcow2(tree["allowed"] / "mid.qcow2", "-b", str(base), "-F", "qcow2")
    qcow2(tree["task"] / "local" / "top.qcow2", "-b", str(mid), "-F", "qcow2")
    image, fmt = checked_image("local/top.qcow2", policy, fmt=None, writable=True,
                               where="image_path")
    image.close()
    assert fmt == "qcow2"


def test_second_level_backing_escape_is_refused(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    mid = qcow2(tree["allowed"] / "mid.qcow2", "-u", "-b", str(tree["secret"]), "-F", "raw")
    qcow2(tree["task"] / "local" / "top.qcow2", "-b", str(mid), "-F", "qcow2")
    with pytest.raises(PolicyError, match="backing file"):
        checked_image("local/top.qcow2", policy, fmt=None, writable=True, where="image_path")


def test_external_data_file_is_refused(tree: dict[str, Path]) -> None:
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    qcow2(tree["task"] / "local" / "d.qcow2", "-o", f"data_file={tree['task']}/local/d.raw")
    with pytest.raises(PolicyError, match="data file"):
        checked_image("local/d.qcow2", policy, fmt=None, writable=True, where="image_path")


def test_raw_image_that_looks_like_qcow2_is_read_as_declared(tree: dict[str, Path]) -> None:
    """With the format given, a qcow2 header pointing at a secret is just data."""
    policy = PathPolicy.for_task(tree["task"], tree["alloc"], host_for(tree))
    evil = qcow2(tree["task"] / "local" / "looks.raw", "-b", str(tree["secret"]), "-F", "raw")
    assert inspect_image(str(evil), policy, fmt="raw", where="w", value="v") == "raw"
    with pytest.raises(PolicyError, match=f"backing file leads outside the allowed dirs .*"
                       f"{tree['secret']}"):
        inspect_image(str(evil), policy, fmt=None, where="w", value="v", base_dir=evil.parent)


# Section: allocation isolation and shared images


def test_sibling_task_dir_is_not_reachable_through_the_alloc_dir(tmp_path: Path) -> None:
    alloc = tmp_path / "alloc1"
    mine, sibling = alloc / "web", alloc / "db"
    for d in (mine / "local", sibling / "secrets", alloc / "alloc" / "data"):
        d.mkdir(parents=True)
    (sibling / "secrets" / "token").write_text("s3cret")
    host = HostConfig(state_dir=Path("/tmp"))
    policy = PathPolicy.for_task(mine, alloc, host)
    for path in (str(sibling / "secrets" / "token"), "../db/secrets/token", str(alloc)):
        with pytest.raises(PolicyError):
            resolve_allowed(path, policy, where="w")
    # A symlink the task plants in its own dir does not lead there either.
    (mine / "local" / "s").symlink_to(sibling / "secrets" / "token")
    with pytest.raises(PolicyError, match="outside the allowed dirs"):
        resolve_allowed("local/s", policy, where="w")
    assert resolve_allowed(str(alloc / "alloc" / "data"), policy, where="w") == \
        (alloc / "alloc" / "data").resolve()


def test_shared_images_are_never_opened_for_writing(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "base.img").write_bytes(b"\0" * 512)
    task = tmp_path / "a" / "t"
    task.mkdir(parents=True)
    host = HostConfig(image_paths=(str(images),), state_dir=Path("/tmp"))
    strict = PathPolicy.for_task(task, task.parent, host, shared_read_only=True)
    with pytest.raises(PolicyError, match="never opened for writing"):
        open_image(images / "base.img", strict, writable=True, where="w", value="base.img")
    open_image(images / "base.img", strict, writable=False, where="w", value="b").close()
    # A VM's own volume dir stays writable.
    own = PathPolicy.for_task(task, task.parent, HostConfig(state_dir=Path("/tmp")),
                              volume_dirs=(images,), shared_read_only=True)
    open_image(images / "base.img", own, writable=True, where="w", value="b").close()
