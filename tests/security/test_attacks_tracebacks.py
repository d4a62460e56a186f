"""Input that used to end in a traceback: one line and exit 2, nothing started, nothing made."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.security.conftest import Cli, Listener, qemu_job, refused_cleanly

TEXT_ATTACKS = [
    'artifact {{\n source = "http://127.0.0.1:{port}/a\\u0000b"\n }}',
    'artifact {{\n source = "http://127.0.0.1:{port}/é"\n }}',
    'artifact {{\n source = "http://127.0.0.1:{port}/x"\n headers {{\n X-A = "v\\r\\nHost: e"\n }}\n }}',
    'artifact {{\n source = "http://127.0.0.1:{port}/x"\n headers {{\n X-A = "é"\n }}\n }}',
    'artifact {{\n source = "http://127.0.0.1:{port}/x"\n headers {{\n X = "\\u0000"\n }}\n }}',
    'env {{\n A = "x\\u0000"\n }}\nartifact {{\n source = "http://127.0.0.1:{port}/x"\n }}',
    'resources {{\n network {{\n port "lä" {{}}\n }}\n }}',
    'resources {{\n network {{\n port "a\\u0000" {{}}\n }}\n }}',
]


@pytest.mark.parametrize("extra", TEXT_ATTACKS, ids=[str(i) for i in range(len(TEXT_ATTACKS))])
def test_bad_text_is_one_line_and_no_request(extra: str, cli: Cli, listener: Listener) -> None:
    status, err = cli.run(qemu_job(extra=extra.format(port=listener.port)))
    refused_cleanly(status, err, "header", "source holds", "env value", "port label")
    assert listener.hits == []
    assert cli.qemus() == []


def test_state_dir_under_a_file(cli: Cli) -> None:
    (cli.root / "afile").write_text("x")
    host = f'state_dir = "{cli.root / "afile" / "state"}"\n'
    job = cli.root / "job.hcl"
    job.write_text(qemu_job())
    (cli.root / "h.hcl").write_text(host)
    status, err = _main(["run", str(job), "--host-config", str(cli.root / "h.hcl")])
    refused_cleanly(status, err, "state dir cannot be used")
    assert (cli.root / "afile").read_text() == "x"


@contextlib.contextmanager
def _tmpfs(path: Path, opts: str) -> Iterator[None]:
    path.mkdir(parents=True, exist_ok=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(path)],
                      capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def _main(argv: list[str]) -> tuple[int, str]:
    import io

    from vmdriver.cli.main import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        status = main(argv)
    return status, err.getvalue()


def test_read_only_state_dir(cli: Cli) -> None:
    state = cli.root / "ro"
    with _tmpfs(state, "ro,size=1m"):
        job = cli.root / "job.hcl"
        job.write_text(qemu_job())
        (cli.root / "h.hcl").write_text(f'state_dir = "{state / "s"}"\n')
        status, err = _main(["run", str(job), "--host-config", str(cli.root / "h.hcl")])
    refused_cleanly(status, err, "state dir cannot be used")


def _image_job(cli: Cli) -> Path:
    (cli.root / "disk.img").write_bytes(bytes(1 << 20))
    job = cli.root / "job.hcl"
    job.write_text(qemu_job(extra='artifact {\n source = "disk.img"\n }'))
    return job


def test_unwritable_runtime_dir(cli: Cli) -> None:
    job = _image_job(cli)
    (cli.root / "h.hcl").write_text(f'state_dir = "{cli.root / "s"}"\n')
    with _tmpfs(cli.root / "s" / "run", "ro,size=1m"):
        status, err = _main(["run", str(job), "--host-config", str(cli.root / "h.hcl"),
                             "--quiet"])
    assert cli.qemus() == []
    lines = [line for line in err.splitlines() if "vmdriver: error" in line]
    assert status in (1, 2) and "Traceback" not in err and len(lines) == 1, err[-600:]


def test_failed_record_write(cli: Cli) -> None:
    job = _image_job(cli)
    (cli.root / "h.hcl").write_text(f'state_dir = "{cli.root / "s"}"\n')
    # Room for the runtime dir and its vm/ subdir, none for the record file.
    with _tmpfs(cli.root / "s" / "run", "size=1m,nr_inodes=4"):
        status, err = _main(["run", str(job), "--host-config", str(cli.root / "h.hcl"),
                             "--quiet"])
    lines = [line for line in err.splitlines() if "vmdriver: error" in line]
    assert status in (1, 2) and "Traceback" not in err and len(lines) == 1, err[-600:]
    assert cli.qemus() == []
