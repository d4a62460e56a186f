"""Hardening that is not a path or a flag: the sandbox probe, no shell anywhere."""

from __future__ import annotations

import re
from pathlib import Path

from vmdriver.host import features
from vmdriver.qemu.argv import SANDBOX_ARG

QEMU = Path("/usr/bin/qemu-system-x86_64")


def test_sandbox_detected_with_the_exact_flags_we_render() -> None:
    features.clear_cache()
    assert features.supports_sandbox(QEMU, SANDBOX_ARG) is True
    assert features.supports_sandbox(QEMU, "on,nosuchkey=deny") is False


def test_sandbox_probe_is_cached_per_binary(tmp_path: Path) -> None:
    fake = tmp_path / "qemu-system-fake"
    fake.write_text("#!/bin/sh\necho run >> \"$0.log\"\nexit 0\n")
    fake.chmod(0o755)
    features.clear_cache()
    assert features.supports_sandbox(fake, "on") is True
    assert features.supports_sandbox(fake, "on") is True
    assert (tmp_path / "qemu-system-fake.log").read_text() == "run\n"
    fake.write_text("#!/bin/sh\nexit 1\n")  # a replaced binary is asked again
    assert features.supports_sandbox(fake, "on") is False
    assert features.supports_sandbox(tmp_path / "missing", "on") is False


def test_nothing_reaches_a_shell() -> None:
    """No code path hands text to a shell: argv tuples only."""
    root = Path(__file__).resolve().parents[2] / "vmdriver"
    bad = re.compile(r"shell\s*=\s*True|os\.system\(|os\.popen\(|create_subprocess_shell|"
                     r"getoutput\(|getstatusoutput\(")
    hits = [f"{p}:{n}" for p in root.rglob("*.py") if "proto" not in p.parts
            for n, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert not hits, hits
