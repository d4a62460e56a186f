"""OVMF discovery from Debian's files, the clear error when absent, the VM's own vars copy."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vmdriver.errors import HostError
from vmdriver.host.firmware import CANDIDATES, Firmware, find_firmware, vars_file

OVMF = Path("/usr/share/OVMF")


def test_bios_has_no_files() -> None:
    assert find_firmware("bios") is None


@pytest.mark.parametrize(("kind", "code", "vars_", "smm"), [
    ("uefi", "OVMF_CODE.fd", "OVMF_VARS.fd", False),
    ("uefi-4m", "OVMF_CODE_4M.fd", "OVMF_VARS_4M.fd", False),
    ("secure", "OVMF_CODE.secboot.fd", "OVMF_VARS.ms.fd", True),
    ("secure-4m", "OVMF_CODE_4M.secboot.fd", "OVMF_VARS_4M.ms.fd", True),
])
def test_debian_ovmf(kind: str, code: str, vars_: str, smm: bool) -> None:
    if not (OVMF / code).exists():
        pytest.skip(f"{OVMF / code} is not installed (Debian package ovmf)")
    fw = find_firmware(kind)
    assert fw is not None
    assert (fw.code, fw.vars_template, fw.requires_smm, fw.secure_boot) == (
        OVMF / code, OVMF / vars_, smm, smm)
    # Code and vars of one build: QEMU refuses pflash sizes that don't match the code.
    assert ("4M" in fw.code.name) == ("4M" in fw.vars_template.name)


def fake_root(tmp_path: Path, files: dict[str, int]) -> Path:
    for name, size in files.items():
        path = tmp_path / name.lstrip("/")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
    return tmp_path


def test_missing_firmware_names_the_candidates(tmp_path: Path) -> None:
    with pytest.raises(HostError) as info:
        find_firmware("secure-4m", root=tmp_path)
    text = str(info.value)
    assert "\n" not in text and "install Debian's ovmf package" in text
    for code, vars_ in CANDIDATES["secure-4m"]:
        assert code in text and vars_ in text
    with pytest.raises(HostError, match="unknown firmware 'efi'"):
        find_firmware("efi")


def test_uefi_falls_back_to_4m_and_never_mixes_sizes(tmp_path: Path) -> None:
    # A 2 MiB vars template alone must not pair with the 4 MiB code.
    root = fake_root(tmp_path, {"/usr/share/OVMF/OVMF_VARS.fd": 4,
                                "/usr/share/OVMF/OVMF_CODE_4M.fd": 8,
                                "/usr/share/OVMF/OVMF_VARS_4M.fd": 8})
    fw = find_firmware("uefi", root=root, descriptor_dirs=())
    assert fw is not None and fw.code.name == "OVMF_CODE_4M.fd"
    assert fw.vars_template.name == "OVMF_VARS_4M.fd"


def test_descriptor_says_smm(tmp_path: Path) -> None:
    root = fake_root(tmp_path, {"/usr/share/OVMF/OVMF_CODE_4M.fd": 8,
                                "/usr/share/OVMF/OVMF_VARS_4M.fd": 8})
    desc = tmp_path / "firmware"
    desc.mkdir()
    code = root / "usr/share/OVMF/OVMF_CODE_4M.fd"
    (desc / "50-x.json").write_text(json.dumps({
        "mapping": {"executable": {"filename": str(code)}}, "features": ["requires-smm"]}))
    (desc / "60-broken.json").write_text("{")
    fw = find_firmware("uefi-4m", root=root, descriptor_dirs=(desc,))
    assert fw is not None and fw.requires_smm and not fw.secure_boot


def test_vars_copied_once_and_kept(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = fake_root(tmp_path / "root", {"/t/VARS.fd": 16, "/t/VARS4.fd": 32, "/t/CODE.fd": 1})
    fw = Firmware("uefi", root / "t/CODE.fd", root / "t/VARS.fd", False, False)
    data = tmp_path / "data"
    data.mkdir()
    target = vars_file(data, fw)
    assert target == data / "fw-vars.fd" and target.read_bytes() == b"\0" * 16
    assert target.stat().st_mode & 0o777 == 0o600
    target.write_bytes(b"\1" * 16)  # the guest wrote EFI variables
    assert vars_file(data, fw).read_bytes() == b"\1" * 16
    # Switched to a firmware whose vars have another size: the old store cannot work.
    fw4 = Firmware("uefi-4m", root / "t/CODE.fd", root / "t/VARS4.fd", False, False)
    with caplog.at_level(logging.WARNING):
        assert vars_file(data, fw4).read_bytes() == b"\0" * 32
    assert (data / "fw-vars.fd.old").read_bytes() == b"\1" * 16
    assert "EFI variables are reset" in caplog.text
