"""Emulator discovery across PATH, and the fingerprint's Nomad attributes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmdriver.errors import AcceleratorUnavailable, EmulatorNotFound
from vmdriver.host.emulators import find_emulator, find_emulators, normalize_emulator
from vmdriver.host.fingerprint import fingerprint
from vmdriver.host.kvm import KvmVerdict
from vmdriver.runtime import prepare as prepare_mod
from vmdriver.spec import Accelerator


def fake_qemu(directory: Path, arch: str, version: str) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"qemu-system-{arch}"
    path.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n")
    path.chmod(0o755)
    return path


def test_every_path_directory_is_searched(tmp_path: Path) -> None:
    # Nomad's driver stops at the first directory with any match; we do not.
    a = fake_qemu(tmp_path / "a", "aarch64", "9.1.0")
    b = fake_qemu(tmp_path / "b", "x86_64", "8.2.2")
    fake_qemu(tmp_path / "b", "aarch64", "1.0.0")  # shadowed by a/, as a shell would
    found = find_emulators(f"{tmp_path / 'a'}:{tmp_path / 'b'}")
    assert found == {"aarch64": a, "x86_64": b}


def test_emulator_names_normalize() -> None:
    assert normalize_emulator("qemu-system-x86_64") == "x86_64"
    assert normalize_emulator(" x86_64 ") == "x86_64"


def test_missing_emulator_is_a_host_error(tmp_path: Path) -> None:
    with pytest.raises(EmulatorNotFound, match="qemu-system-riscv64"):
        find_emulator("riscv64", str(tmp_path))


def test_fingerprint_attributes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_qemu(tmp_path / "bin", "aarch64", "9.1.0")
    fake_qemu(tmp_path / "bin", "x86_64", "9.1.0")
    monkeypatch.setattr("vmdriver.host.fingerprint.cached_probe",
                        lambda qemu, cache: KvmVerdict(False, "test"))
    fp = fingerprint(tmp_path / "state", path=str(tmp_path / "bin"))
    assert fp.healthy and fp.description == "Healthy"
    base = {k: v for k, v in fp.attributes.items() if not k.startswith("driver.qemu.jail.")}
    assert base == {"driver.qemu": True, "driver.qemu.version": "9.1.0",
                    "driver.qemu.emulators": "aarch64,x86_64", "driver.qemu.kvm": False}
    # What the host can confine QEMU with is always said, never left out.
    assert isinstance(fp.attributes["driver.qemu.jail.available"], bool)
    assert fp.attributes["driver.qemu.jail.mode"] in ("userns", "setuid", "none")
    # The same facts unprefixed, for the plugin installed under another driver's name.
    assert fp.facts["kvm"] is False and fp.facts["jail.mode"] == fp.attributes["driver.qemu.jail.mode"]
    assert {f"driver.qemu.{k}" for k in fp.facts} == set(fp.attributes) - {
        "driver.qemu", "driver.qemu.version", "driver.qemu.emulators"}
    limited = fingerprint(tmp_path / "state", allowlist=("qemu-system-x86_64",),
                          path=str(tmp_path / "bin"))
    assert limited.attributes["driver.qemu.emulators"] == "x86_64"


def test_no_emulator_is_undetected(tmp_path: Path) -> None:
    fp = fingerprint(tmp_path / "state", path=str(tmp_path))
    assert not fp.healthy and fp.attributes == {} and fp.facts == {}


def test_kvm_requested_where_unusable_fails_before_launch(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(prepare_mod, "cached_probe",
                        lambda qemu, cache: KvmVerdict(False, "kernel hung"))
    with pytest.raises(AcceleratorUnavailable, match="kernel hung"):
        prepare_mod.resolve_accelerator(Accelerator.KVM, Path("/bin/true"), tmp_path)
    assert prepare_mod.resolve_accelerator(Accelerator.AUTO, Path("/bin/true"), tmp_path)[0] == "tcg"
    monkeypatch.setattr(prepare_mod, "cached_probe",
                        lambda qemu, cache: KvmVerdict(True, "booted"))
    assert prepare_mod.resolve_accelerator(Accelerator.AUTO, Path("/bin/true"), tmp_path)[0] == "kvm"
    assert os.path.exists("/bin/true")
