"""The operator's host config file: forms accepted, and errors that name the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdriver.cli.main import main
from vmdriver.errors import HostConfigError
from vmdriver.host.config import (
    DEFAULT_HOST_CONFIG,
    HostConfig,
    host_config_from_mapping,
    load_host_config,
)

BODY = '''
image_paths         = ["/srv/images"]
args_allowlist      = ["-device", "--smp", "fw_cfg"]
emulators_allowlist = ["x86_64", "qemu-system-aarch64"]
state_dir           = "/var/lib/vmd"
sandbox             = false
'''


@pytest.mark.parametrize("wrap", ["{}", "config {{\n{}\n}}",
                                  'plugin "qemu" {{\n  config {{\n{}\n  }}\n}}'])
def test_forms_of_the_file(tmp_path: Path, wrap: str) -> None:
    path = tmp_path / "host.hcl"
    path.write_text(wrap.format(BODY))
    host = load_host_config(path)
    assert host.image_paths == ("/srv/images",)
    assert host.args_allowlist == ("-device", "--smp", "fw_cfg")
    assert host.emulators_allowlist == ("x86_64", "qemu-system-aarch64")
    assert host.state_dir == Path("/var/lib/vmd")
    assert host.sandbox is False


def test_defaults() -> None:
    host = HostConfig()
    assert host.image_paths == host.args_allowlist == host.emulators_allowlist == ()
    assert host.sandbox is True
    assert host.state_dir.is_absolute()
    assert Path("/etc/vmdriver/host.hcl") == DEFAULT_HOST_CONFIG


@pytest.mark.parametrize("data,field,words", [
    ({"image_path": ["/x"]}, "image_path", "unknown field"),
    ({"image_paths": "/srv"}, "image_paths", "list"),
    ({"image_paths": ["relative/dir"]}, "image_paths", "absolute"),
    ({"image_paths": [5]}, "image_paths", "not a string"),
    ({"image_paths": [""]}, "image_paths", "absolute"),
    ({"args_allowlist": ["-drive file=/x"]}, "args_allowlist", "not a QEMU flag"),
    ({"args_allowlist": ["-drive=x"]}, "args_allowlist", "not a QEMU flag"),
    ({"args_allowlist": "-drive"}, "args_allowlist", "list"),
    ({"emulators_allowlist": ["/usr/bin/qemu-system-x86_64"]}, "emulators_allowlist", "emulator"),
    ({"emulators_allowlist": [["x86_64"]]}, "emulators_allowlist", "not a string"),
    ({"state_dir": "relative"}, "state_dir", "absolute"),
    ({"state_dir": "/" + "x" * 100}, "state_dir", "too long"),
    ({"state_dir": 3}, "state_dir", "absolute"),
    ({"sandbox": "yes"}, "sandbox", "bool"),
])
def test_errors_name_the_field(data: dict[str, object], field: str, words: str) -> None:
    with pytest.raises(HostConfigError) as info:
        host_config_from_mapping(data, "host.hcl")
    text = str(info.value)
    assert text.startswith(f"host.hcl: {field}")
    assert words in text
    assert "\n" not in text


@pytest.mark.parametrize("text", ["image_paths = [", "config {\n}\nconfig {\n}", "plugin {}",
                                  'plugin "a" {}\nplugin "b" {}', "x = 1"])
def test_broken_files_exit_2_with_one_line(tmp_path: Path, text: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    host = tmp_path / "host.hcl"
    host.write_text(text)
    job = tmp_path / "job.hcl"
    job.write_text("job \"j\" {}\n")
    assert main(["argv", str(job), "--host-config", str(host)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vmdriver: error: host config ") and "\n" not in err


def test_missing_host_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["argv", str(tmp_path / "j.hcl"), "--host-config", str(tmp_path / "no.hcl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_artifact_cache_max_is_a_size() -> None:
    from vmdriver.errors import HostConfigError
    from vmdriver.host.config import host_config_from_mapping

    cfg = host_config_from_mapping({"artifact_cache_max": "512MiB"}, "host.hcl")
    assert cfg.artifact_cache_max_bytes == 512 * 2**20
    assert host_config_from_mapping({}, "host.hcl").artifact_cache_max_bytes == 20 * 2**30
    with pytest.raises(HostConfigError, match="artifact_cache_max"):
        host_config_from_mapping({"artifact_cache_max": "lots"}, "host.hcl")
