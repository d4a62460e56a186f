"""The job's user_data merged with the generated part: MIME shape, schema, cloud-init's own merge."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from tests.cloudinit.conftest import HERE
from tests.cloudinit.factory import base_request
from vmdriver.cloudinit import seed_files
from vmdriver.cloudinit.mime import GENERATED_MERGE_TYPE, MERGE_HEADER, merge_user_data
from vmdriver.cloudinit.userdata import cloud_config_text, run_command
from vmdriver.errors import SpecError

GEN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGenGenGenGenGenGenGenGenGenGenGenGenGenGenGen gen@host"
USER_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIUserUserUserUserUserUserUserUserUserUserUserUs user@host"
USER_CONFIG = f"""#cloud-config
timezone: America/New_York
ssh_pwauth: true
ssh_authorized_keys:
  - {USER_KEY}
runcmd:
  - echo from-user > /run/user-marker
packages: [nginx]
"""


def merged_request() -> Any:
    return base_request(cmds=("echo from-task > /run/task-marker",), timezone="Europe/Berlin",
                        ssh_pwauth=False, ssh_authorized_keys=(GEN_KEY,), user_data=USER_CONFIG)


def parse(user_data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(user_data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def leaves(msg: EmailMessage) -> list[EmailMessage]:
    return [p for p in msg.walk() if isinstance(p, EmailMessage) and not p.is_multipart()]


def test_merged_user_data_is_multipart_user_first_generated_last(
        schema_check: Callable[[str], None]) -> None:
    req = merged_request()
    msg = parse(seed_files(req)["user-data"])
    assert msg.get_content_type() == "multipart/mixed"
    parts = leaves(msg)
    assert [p.get_content_type() for p in parts] == ["text/cloud-config", "text/cloud-config"]
    assert parts[0].get_content() == USER_CONFIG
    assert parts[1].get_content() == cloud_config_text(req)
    assert MERGE_HEADER not in parts[0], "the job's part is passed on unchanged"
    assert parts[1][MERGE_HEADER] == GENERATED_MERGE_TYPE
    for part in parts:
        schema_check(part.get_content())


def run_cloud_init_merge(host_python: str, tmp_path: Path, user_data: bytes) -> dict[str, Any]:
    path = tmp_path / "user-data"
    path.write_bytes(user_data)
    out = subprocess.run((host_python, str(HERE / "ci_merge.py"), str(path)), capture_output=True, text=True,
                         timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


def test_cloud_init_merges_both_parts_and_the_users_values_win(host_python: str, tmp_path: Path) -> None:
    result = run_cloud_init_merge(host_python, tmp_path, seed_files(merged_request())["user-data"])
    merged = result["merged"]
    assert merged["timezone"] == "America/New_York", "the user's scalar wins"
    assert merged["ssh_pwauth"] is True
    assert merged["ssh_authorized_keys"] == [GEN_KEY, USER_KEY], "lists are appended, generated first"
    assert merged["runcmd"] == [run_command("echo from-task > /run/task-marker"),
                                "echo from-user > /run/user-marker"]
    assert merged["packages"] == ["nginx"]
    assert {f["path"] for f in merged["write_files"]} == {"/etc/nomad/env", "/etc/profile.d/nomad.sh"}


def test_nested_mappings_merge_key_by_key_and_the_users_value_wins(host_python: str,
                                                                   tmp_path: Path) -> None:
    user = "#cloud-config\nchpasswd: {expire: true}\npassword: $6$salt$" + "a" * 86 + "\n"
    req = base_request(password_hash="$6$other$" + "b" * 86, user_data=user)
    merged = run_cloud_init_merge(host_python, tmp_path, seed_files(req)["user-data"])["merged"]
    assert merged["chpasswd"] == {"expire": True}
    assert merged["password"] == "$6$salt$" + "a" * 86
    assert len(merged["write_files"]) == 2


def test_shell_script_user_data_is_kept_as_its_own_part(host_python: str, tmp_path: Path) -> None:
    script = "#!/bin/sh\necho 'user script' > /run/x\n"
    data = seed_files(base_request(cmds=("true",), user_data=script))["user-data"]
    parts = leaves(parse(data))
    assert [p.get_content_type() for p in parts] == ["text/x-shellscript", "text/cloud-config"]
    assert parts[0].get_content() == script
    result = run_cloud_init_merge(host_python, tmp_path, data)
    assert result["types"] == ["text/x-shellscript", "text/cloud-config"]
    assert result["merged"]["runcmd"] == [run_command("true")]


def test_a_users_mime_message_is_flattened_before_the_generated_part() -> None:
    inner = merge_user_data("#cloud-config\nruncmd: [a]\n", "#!/bin/sh\necho b\n")
    parts = leaves(parse(merge_user_data("#cloud-config\nruncmd: [gen]\n", inner).encode()))
    assert [p.get_content_type() for p in parts] == ["text/x-shellscript", "text/cloud-config",
                                                     "text/cloud-config"]
    assert parts[-1].get_content() == "#cloud-config\nruncmd: [gen]\n"


def test_the_output_is_reproducible() -> None:
    assert seed_files(merged_request()) == seed_files(merged_request())


def test_long_lines_fall_back_to_base64_and_still_round_trip() -> None:
    user = "#cloud-config\nruncmd:\n  - echo " + "x" * 3000 + "\n"
    parts = leaves(parse(seed_files(base_request(user_data=user))["user-data"]))
    assert parts[0]["Content-Transfer-Encoding"] == "base64"
    assert parts[0].get_content() == user


@pytest.mark.parametrize("bad", ["just text", "cloud-config: yes", "", "\n#cloud-config\n"])
def test_user_data_cloud_init_would_ignore_is_refused(bad: str) -> None:
    with pytest.raises(SpecError, match="user_data must start with"):
        seed_files(base_request(user_data=bad))
