"""Loader variables never reach QEMU: a preloaded library that would write a marker does not run.

The library is built here with ``cc``. A control run with the variable given
straight to the binary shows the library does run when it is passed; the env
the runtime builds for QEMU (every face goes through it) does not carry it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vmdriver.runtime.supervisor import Supervisor

QEMU = "/usr/bin/qemu-system-x86_64"
SOURCE = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void mark(void) {
    const char *p = "%s";
    FILE *f = fopen(p, "w");
    if (f) { fputs("ran\n", f); fclose(f); }
}
unsigned int la_version(unsigned int v) { return v; }
"""


@pytest.fixture(scope="module")
def evil_lib(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("cc") is None:
        pytest.skip("no C compiler (cc) to build the preload library")
    d = tmp_path_factory.mktemp("preload")
    marker = d / "marker"
    (d / "evil.c").write_text(SOURCE % marker)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(d / "evil.so"), str(d / "evil.c")],
                   check=True)
    return d / "evil.so", marker


def _run_qemu(env: dict[str, str]) -> None:
    subprocess.run([QEMU, "-version"], env=env, capture_output=True, check=False, timeout=30)


def test_control_the_library_runs_when_passed(evil_lib: tuple[Path, Path]) -> None:
    lib, marker = evil_lib
    marker.unlink(missing_ok=True)
    _run_qemu({"PATH": "/usr/bin:/bin", "LD_PRELOAD": str(lib)})
    assert marker.exists()  # the attack works when the variable gets through


@pytest.mark.parametrize("job_env", [
    {"LD_PRELOAD": "{lib}"}, {"LD_AUDIT": "{lib}"}, {"LD_PRELOAD": "{lib}", "NOMAD_X": "1"},
    {"ld_preload": "{lib}", "LD_PRELOAD ": "{lib}"}, {"LD_LIBRARY_PATH": "{dir}", "LD_PRELOAD": "evil.so"},
])
def test_task_env_loader_variables_do_not_run(job_env: dict[str, str],
                                              evil_lib: tuple[Path, Path]) -> None:
    lib, marker = evil_lib
    marker.unlink(missing_ok=True)
    env = Supervisor._env({k: v.format(lib=lib, dir=lib.parent) for k, v in job_env.items()})
    assert not any(k.startswith("LD_") for k in env)
    _run_qemu(env)
    assert not marker.exists()


def test_vmdrivers_own_loader_variables_do_not_reach_qemu(evil_lib: tuple[Path, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    lib, marker = evil_lib
    marker.unlink(missing_ok=True)
    monkeypatch.setenv("LD_PRELOAD", str(lib))
    env = Supervisor._env({})
    monkeypatch.delenv("LD_PRELOAD")
    _run_qemu(env)
    assert not marker.exists() and "LD_PRELOAD" not in env and os.environ.get("LD_PRELOAD") is None
