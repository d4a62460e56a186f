"""The seed: files, schema, volume formats, password handling, names and ids."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pycdlib
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from tests.cloudinit.factory import base_request, have
from vmdriver.cloudinit import (
    SeedFormat,
    SeedRequest,
    build_seed,
    default_hostname,
    default_instance_id,
    guest_env,
    hash_password,
    mapping_seed_files,
    seed_files,
    seed_texts,
    split_keys,
    task_shares,
    verify_password,
)
from vmdriver.cloudinit.request import HOSTNAME_LABEL
from vmdriver.cloudinit.seed import fat_image, iso_image
from vmdriver.cloudinit.userdata import cloud_config, cloud_config_text
from vmdriver.errors import SpecError

PASSWORD = "correct horse battery staple"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHXhbF6S3mH0QhM3nq0vR3q2Wp0Xy1z2a3b4c5d6e7f8 me@laptop"


@pytest.fixture(scope="module")
def password_hash() -> str:
    return hash_password(PASSWORD)


def full_request(password_hash: str, **overrides: object) -> SeedRequest:
    fields: dict[str, object] = {
        "cmds": ("echo ran > /run/marker", "systemctl restart nginx"),
        "password_hash": password_hash,
        "ssh_authorized_keys": (KEY,),
        "env": guest_env({"NOMAD_ALLOC_ID": "0b9e1d2c-aaaa", "GREETING": "hello world"}, task_shares()),
        "shares": task_shares(),
        "timezone": "Europe/Berlin",
    }
    fields.update(overrides)
    return base_request(**fields)


# --- schema -----------------------------------------------------------------------------------

def test_minimal_and_full_user_data_pass_cloud_init_schema(
        schema_check: Callable[[str], None], password_hash: str) -> None:
    schema_check(cloud_config_text(base_request()))
    schema_check(cloud_config_text(full_request(password_hash, ssh_pwauth=True)))


def test_schema_check_rejects_a_broken_config(schema_check: Callable[[str], None]) -> None:
    # The check itself must be able to fail, or the tests above prove nothing.
    with pytest.raises(AssertionError, match="schema rejected"):
        schema_check("#cloud-config\nusers: 5\n")


# --- fields → cloud-config ------------------------------------------------------------------

def test_default_user_gets_hash_keys_and_no_forced_password_change(password_hash: str) -> None:
    cfg = cloud_config(full_request(password_hash))
    assert cfg["password"] == password_hash
    assert cfg["chpasswd"] == {"expire": False}
    assert cfg["ssh_authorized_keys"] == [KEY]
    # No `users` list: a nameless entry is ignored by cloud-init and one without
    # `default` would drop the distro's default user (the virt driver's bug).
    assert "users" not in cfg
    assert "ssh_pwauth" not in cfg, "password SSH login is left as the image ships it"
    assert cloud_config(base_request(ssh_pwauth=False))["ssh_pwauth"] is False


def test_cmds_become_runcmd_in_order_and_mounts_become_bootcmd(password_hash: str) -> None:
    cfg = cloud_config(full_request(password_hash))
    assert len(cfg["runcmd"]) == 2
    assert cfg["runcmd"][0].endswith("echo ran > /run/marker'")
    assert cfg["runcmd"][1].endswith("systemctl restart nginx'")
    assert [line.split()[2] for line in cfg["bootcmd"]] == ["/local", "/alloc", "/secrets"]
    assert all(",ro " in line and "-o ro " in line for line in cfg["bootcmd"])
    assert cfg["timezone"] == "Europe/Berlin"


def test_env_files_are_world_readable_not_writable(password_hash: str) -> None:
    files = {f["path"]: f for f in cloud_config(full_request(password_hash))["write_files"]}
    assert set(files) == {"/etc/nomad/env", "/etc/profile.d/nomad.sh"}
    assert {f["permissions"] for f in files.values()} == {"0644"}
    assert "NOMAD_TASK_DIR=/local\n" in files["/etc/nomad/env"]["content"]
    assert "export NOMAD_ALLOC_ID=0b9e1d2c-aaaa\n" in files["/etc/profile.d/nomad.sh"]["content"]


def test_guest_env_drops_names_a_shell_cannot_assign_and_points_dirs_at_mounts() -> None:
    env = guest_env({"NOMAD_TASK_DIR": "/var/nomad/alloc/x/web/local", "meta.key": "v", "OK_1": "v"},
                    task_shares())
    assert env == {"NOMAD_TASK_DIR": "/local", "OK_1": "v", "NOMAD_ALLOC_DIR": "/alloc",
                   "NOMAD_SECRETS_DIR": "/secrets"}


def test_cloud_inits_mounts_module_would_drop_a_9p_tag(host_python: str) -> None:
    # Why the shares are mounted by bootcmd: cc_mounts maps an fs_spec that is not
    # a block device (nor host:path) to None, "Ignoring nonexistent named mount".
    code = ("import logging; from cloudinit.config import cc_mounts; "
            "print(cc_mounts.sanitize_devname('alloc', lambda n: None, logging.getLogger()))")
    out = subprocess.run((host_python, "-c", code), capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "None"


# --- meta-data, network-config ----------------------------------------------------------------

def test_meta_data_and_network_config_passthrough() -> None:
    net = "network:\n  version: 2\n  ethernets:\n    id0:\n      match: {name: 'en*'}\n      dhcp4: true\n"
    files = seed_files(base_request(network_config=net))
    assert yaml.safe_load(files["meta-data"]) == {"instance-id": "nomad-0b9e-web",
                                                  "local-hostname": "web-0b9e1d2c"}
    assert files["network-config"] == net.encode()
    assert "network-config" not in seed_files(base_request())


@pytest.mark.parametrize("bad", ["version: 3\n", "[1, 2]\n", "a: [\n", "network: {ethernets: {}}\n"])
def test_bad_network_config_is_refused(bad: str) -> None:
    with pytest.raises(SpecError, match="network_config"):
        base_request(network_config=bad)


def test_instance_ids_differ_per_allocation() -> None:
    a = default_instance_id("0b9e1d2c-1111-2222-3333-444455556666", "web")
    b = default_instance_id("7f00aa00-1111-2222-3333-444455556666", "web")
    assert a != b
    assert base_request(instance_id=a).instance_id == a


# --- hostnames --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a", "web", "web-01", "0web", "a" * 63, "x1-y2-z3"])
def test_good_hostnames(name: str) -> None:
    assert base_request(hostname=name).hostname == name


@pytest.mark.parametrize("name", ["", "-web", "web-", "Web", "web_1", "web.example.com", "a" * 64,
                                  "we b", "wéb", "web\n", "$(reboot)", "a;b"])
def test_bad_hostnames_are_one_clear_error(name: str) -> None:
    with pytest.raises(SpecError) as err:
        base_request(hostname=name)
    assert str(err.value).startswith("hostname: not an RFC 1123 label")
    assert "\n" not in str(err.value).replace(repr(name), "")


@given(st.text(max_size=100), st.text(alphabet="0123456789abcdef-", max_size=36))
def test_default_hostname_is_always_a_valid_label(task: str, alloc: str) -> None:
    assert HOSTNAME_LABEL.fullmatch(default_hostname(task, alloc))


def test_default_hostname_examples() -> None:
    assert default_hostname("web", "0b9e1d2c-aaaa") == "web-0b9e1d2c"
    assert default_hostname("My_Task.v2", "0B9E1D2C") == "my-task-v2-0b9e1d2c"
    assert len(default_hostname("x" * 100, "0b9e1d2c")) == 63


# --- password ---------------------------------------------------------------------------------

def test_hash_verifies_with_openssl_and_with_libcrypt(password_hash: str, host_python: str) -> None:
    assert password_hash.startswith("$6$")
    assert verify_password(PASSWORD, password_hash)
    assert not verify_password(PASSWORD + "x", password_hash)
    # An independent implementation: glibc/libxcrypt's crypt(3), as chpasswd -e and login use it.
    code = "import crypt, sys; print(crypt.crypt(sys.argv[1], sys.argv[2]) == sys.argv[2])"
    out = subprocess.run((host_python, "-W", "ignore", "-c", code, PASSWORD, password_hash),
                         capture_output=True, text=True, timeout=30, check=True)
    assert out.stdout.strip() == "True"


def test_each_hash_has_its_own_salt() -> None:
    assert hash_password(PASSWORD) != hash_password(PASSWORD)


@pytest.mark.parametrize("bad", ["", "a\nb", "a\0b"])
def test_unusable_passwords_are_refused_without_echoing_them(bad: str) -> None:
    with pytest.raises(SpecError) as err:
        hash_password(bad)
    assert err.value.value is None


def test_a_plain_password_in_the_hash_field_is_refused_without_echo() -> None:
    with pytest.raises(SpecError) as err:
        base_request(password_hash=PASSWORD)
    assert PASSWORD not in str(err.value)


def test_the_plain_password_is_nowhere(password_hash: str, tmp_path: Path) -> None:
    req = full_request(password_hash)
    assert PASSWORD not in repr(req) and password_hash not in repr(req)
    for fmt in SeedFormat:
        data = build_seed(req, tmp_path / f"seed.{fmt.value}", fmt).read_bytes()
        assert password_hash.encode() in data, "the hash itself must be in the seed"
        assert PASSWORD.encode() not in data
        assert PASSWORD.encode("utf-16-be") not in data  # Joliet names are UCS-2


# --- volumes ----------------------------------------------------------------------------------

def read_iso(path: Path) -> tuple[pycdlib.PyCdlib, dict[str, bytes]]:
    iso = pycdlib.PyCdlib()
    iso.open(str(path))
    files = {}
    for name in ("meta-data", "user-data", "network-config"):
        out = io.BytesIO()
        try:
            iso.get_file_from_iso_fp(out, rr_path="/" + name)
        except pycdlib.pycdlibexception.PyCdlibInvalidInput:
            continue
        files[name] = out.getvalue()
        joliet = io.BytesIO()
        iso.get_file_from_iso_fp(joliet, joliet_path="/" + name)
        assert joliet.getvalue() == files[name]
    return iso, files


def test_iso_seed_reads_back(password_hash: str, tmp_path: Path) -> None:
    req = full_request(password_hash, network_config="version: 1\nconfig: []\n")
    dest = build_seed(req, tmp_path / "seed.iso")
    iso, files = read_iso(dest)
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"cidata"
        assert iso.has_rock_ridge() and iso.has_joliet()
    finally:
        iso.close()
    assert files == seed_files(req)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    if have("blkid"):
        label = subprocess.run(("blkid", "-p", "-o", "value", "-s", "LABEL", str(dest)), capture_output=True,
                               text=True, timeout=30, check=True)
        assert label.stdout.strip() == "cidata"


def test_fat_seed_reads_back_with_mtools_and_has_the_label(password_hash: str, tmp_path: Path) -> None:
    if not (have("mtype") and have("blkid")):
        pytest.skip("mtools and blkid are needed to read a FAT image independently (apt-get install mtools)")
    req = full_request(password_hash)
    dest = build_seed(req, tmp_path / "seed.img", "fat")
    env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
    for name, data in seed_files(req).items():
        out = subprocess.run(("mtype", "-i", str(dest), f"::{name}"), capture_output=True, timeout=30,
                             env=env, check=True)
        assert out.stdout == data
    probe = subprocess.run(("blkid", "-p", "-o", "export", str(dest)), capture_output=True, text=True,
                           timeout=30, check=True)
    assert "LABEL=CIDATA" in probe.stdout.splitlines()
    assert "TYPE=vfat" in probe.stdout.splitlines()
    if have("fsck.fat"):
        subprocess.run(("fsck.fat", "-n", str(dest)), capture_output=True, timeout=30, check=True)


def test_writes_are_atomic_replacements(tmp_path: Path) -> None:
    dest = tmp_path / "seed.iso"
    dest.write_bytes(b"old")
    build_seed(base_request(), dest)
    assert dest.read_bytes() != b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seed.iso"]


def test_unknown_format_is_a_spec_error(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="seed format"):
        build_seed(base_request(), tmp_path / "seed", "qcow2")
    assert list(tmp_path.iterdir()) == []


def test_ssh_keys(password_hash: str) -> None:
    assert split_keys(f"{KEY}\n\n# old key\n{KEY[:-3]}abc\n") == (KEY, KEY[:-3] + "abc")
    for bad in ("not a key", f"{KEY}\nssh-rsa AAAA x", "ssh-ed25519"):
        with pytest.raises(SpecError, match="ssh_authorized_keys"):
            base_request(ssh_authorized_keys=(bad,))
    json.dumps(cloud_config(full_request(password_hash)))  # plain data only


def test_images_take_any_plain_names_and_a_label(tmp_path: Path) -> None:
    # The core's spec.Seed carries arbitrary file names and a label; both builders serve it.
    files = {"meta-data": b"a", "vendor-data": b"b", "networkconfig-1": b"c", "networkconfig-2": b"d",
             "x" * 64: b"e"}
    iso_path = tmp_path / "s.iso"
    iso_path.write_bytes(iso_image(files, label="config-2"))
    iso = pycdlib.PyCdlib()
    iso.open(str(iso_path))
    try:
        assert iso.pvd.volume_identifier.rstrip(b" ") == b"config-2"
        for name, data in files.items():
            out = io.BytesIO()
            iso.get_file_from_iso_fp(out, rr_path="/" + name)
            assert out.getvalue() == data
    finally:
        iso.close()
    if have("mtype") and have("blkid"):
        fat_path = tmp_path / "s.img"
        fat_path.write_bytes(fat_image(files, label="config-2"))
        env = {**os.environ, "MTOOLS_SKIP_CHECK": "1"}
        for name, data in files.items():
            out_fat = subprocess.run(("mtype", "-i", str(fat_path), f"::{name}"), capture_output=True,
                                     timeout=30, env=env, check=True)
            assert out_fat.stdout == data
        probe = subprocess.run(("blkid", "-p", "-o", "value", "-s", "LABEL", str(fat_path)),
                               capture_output=True, text=True, timeout=30, check=True)
        assert probe.stdout.strip() == "CONFIG-2"
    with pytest.raises(SpecError, match="FAT label"):
        fat_image(files, label="much-too-long-label")


def test_seed_texts_are_the_files_as_text(password_hash: str) -> None:
    req = full_request(password_hash, user_data="#!/bin/sh\necho hi\n")
    assert dict(seed_texts(req)) == {k: v.decode() for k, v in seed_files(req).items()}


def test_runner_mappings_become_seed_files(schema_check: Callable[[str], None]) -> None:
    files = mapping_seed_files(instance_id="v7", hostname="vm-1",
                               meta_data={"public-keys": [KEY]},
                               user_data={"runcmd": ["echo 'a: b' # c"], "ssh_pwauth": False},
                               network_config={"version": 2, "ethernets": {}})
    assert yaml.safe_load(files["meta-data"]) == {"public-keys": [KEY], "instance-id": "v7",
                                                  "local-hostname": "vm-1"}
    schema_check(files["user-data"].decode())
    assert yaml.safe_load(files["user-data"])["runcmd"] == ["echo 'a: b' # c"]
    assert yaml.safe_load(files["network-config"]) == {"version": 2, "ethernets": {}}
    assert mapping_seed_files(instance_id="v1", meta_data={"instance-id": "mine"})["meta-data"].startswith(
        b"instance-id: mine")
    assert mapping_seed_files(instance_id="v1")["user-data"] == b"#cloud-config\n"
    with pytest.raises(SpecError, match=r"cloudInit.metaData"):
        mapping_seed_files(instance_id="v1", meta_data={"local-hostname": "Bad_Name"})
