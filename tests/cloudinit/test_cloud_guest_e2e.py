"""One boot of the Debian cloud guest under TCG with a seed from vmdriver.cloudinit.

QEMU is started here directly (the core is being rewritten); the task dirs are
shared through virtiofsd, because Debian's cloud kernel has virtiofs but no 9p.
Everything is checked over SSH with the real client, as the default user.
"""

from __future__ import annotations

import base64
import contextlib
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cloudinit.guest import (
    CLOUD_INIT_FINISHED,
    CloudVM,
    cloud_guest_dir,
    ssh_keypair,
    ssh_run,
    virtiofsd,
    wait_ssh,
)
from vmdriver.cloudinit import (
    GUEST_DIRS,
    SeedRequest,
    ShareFs,
    build_seed,
    default_hostname,
    default_instance_id,
    guest_env,
    hash_password,
    seed_files,
    task_shares,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PASSWORD = "e2e-Pa55 word"
ALLOC_ID = "5f1c0ffe-9a1b-4c2d-8e3f-0123456789ab"
TRICKY = "it's \"$(touch /var/tmp/pwned)\" `id` ; $HOME"
MARKER = "/var/tmp/vmdriver-marker"
BOOT_TIMEOUT_S = 420.0


@dataclass
class Booted:
    vm: CloudVM
    key: Path
    seed: Path
    hostname: str
    password_hash: str
    host_dirs: dict[str, Path]
    boot_s: float
    ssh_s: float

    def run(self, command: str, **kw: object) -> str:
        return ssh_run(self.vm.ssh_port, self.key, command, **kw).stdout  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def booted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Booted]:
    if os.geteuid() != 0:
        pytest.skip("virtiofsd and the cloud guest build need root")
    if shutil.which("qemu-system-x86_64") is None or shutil.which("ssh") is None:
        pytest.skip("qemu-system-x86_64 and an ssh client are needed")
    image = cloud_guest_dir() / "disk.qcow2"
    work = Path(tmp_path_factory.mktemp("cloud-e2e"))
    key, pubkey = ssh_keypair(work)
    host_dirs = {tag: work / tag for tag in GUEST_DIRS}
    for tag, path in host_dirs.items():
        path.mkdir()
        (path / "data.txt").write_text(f"host file in {tag}\n")
    shares = task_shares(ShareFs.VIRTIOFS)
    hostname = default_hostname("cloud-e2e", ALLOC_ID)
    req = SeedRequest(
        instance_id=default_instance_id(ALLOC_ID, "cloud-e2e"),
        hostname=hostname,
        cmds=(f'echo "marker $NOMAD_ALLOC_ID" > {MARKER}', 'printf %s "$TRICKY" > /var/tmp/tricky'),
        password_hash=hash_password(PASSWORD),
        ssh_authorized_keys=(pubkey,),
        env=guest_env({"NOMAD_ALLOC_ID": ALLOC_ID, "NOMAD_TASK_NAME": "cloud-e2e", "TRICKY": TRICKY},
                      shares),
        shares=shares,
    )
    seed = build_seed(req, work / "seed.iso")
    with contextlib.ExitStack() as stack:
        sockets = [(tag, stack.enter_context(virtiofsd(path, work / f"vfs-{tag}.sock")))
                   for tag, path in host_dirs.items()]
        vm = CloudVM(image=image, seed=seed, workdir=work, virtiofs=sockets)
        stack.callback(vm.kill)  # every exit path, before the daemons stop
        t0 = time.monotonic()
        vm.start()
        boot_s = vm.wait_console(CLOUD_INIT_FINISHED, BOOT_TIMEOUT_S)
        ssh_s = wait_ssh(vm.ssh_port, key, timeout=120, alive=vm.alive()) + boot_s
        print(f"\ncloud guest: cloud-init finished {boot_s:.1f}s, ssh login {ssh_s:.1f}s "
              f"after QEMU start ({time.monotonic() - t0:.1f}s)")
        assert req.password_hash is not None
        yield Booted(vm, key, seed, hostname, req.password_hash, host_dirs, boot_s, ssh_s)


def test_cmds_ran_with_the_task_env(booted: Booted) -> None:
    assert booted.run(f"cat {MARKER}") == f"marker {ALLOC_ID}\n"
    assert booted.run("cat /var/tmp/tricky") == TRICKY
    assert booted.run("test -e /var/tmp/pwned && echo PWNED || echo clean") == "clean\n"


def test_hostname_is_set(booted: Booted) -> None:
    assert booted.run("hostname") == booted.hostname + "\n"
    assert booted.hostname.startswith("cloud-e2e-5f1c0ffe")


def test_default_user_logs_in_with_the_key_and_has_sudo(booted: Booted, tmp_path: Path) -> None:
    assert booted.run("id -un; sudo -n id -un") == "debian\nroot\n"
    other, _ = ssh_keypair(tmp_path)
    refused = ssh_run(booted.vm.ssh_port, other, "true", check=False)
    assert refused.returncode == 255 and "Permission denied" in refused.stderr, "only the given key logs in"
    assert "debian" in booted.run("getent group sudo")


def test_password_hash_is_in_shadow_and_not_expired(booted: Booted) -> None:
    entry = booted.run("sudo -n getent shadow debian").strip().split(":")
    assert entry[1] == booted.password_hash
    assert entry[2] not in ("", "0"), "chpasswd expire: false must not force a change at first login"


def test_plain_password_is_nowhere_in_the_guest_or_the_seed(booted: Booted) -> None:
    assert PASSWORD.encode() not in booted.seed.read_bytes()
    # The pattern comes over stdin: in argv, sudo would log it to the journal itself.
    search = "sudo -n grep -rlF -f - /var/lib/cloud /var/log /etc /root"
    found = ssh_run(booted.vm.ssh_port, booted.key, search, stdin=PASSWORD + "\n", check=False)
    assert found.returncode == 1, f"found in: {found.stdout} {found.stderr}"
    # The search works: the hash is found where cloud-init keeps the user-data.
    hashed = ssh_run(booted.vm.ssh_port, booted.key, "sudo -n grep -rlF -f - /var/lib/cloud/instance",
                     stdin=booted.password_hash + "\n", check=False)
    assert "user-data.txt" in hashed.stdout


def test_login_shell_has_the_nomad_env(booted: Booted) -> None:
    out = booted.run("""bash -lc 'printf "%s|%s|%s" "$NOMAD_ALLOC_ID" "$NOMAD_ALLOC_DIR" "$TRICKY"'""")
    assert out == f"{ALLOC_ID}|/alloc|{TRICKY}"
    assert booted.run("stat -c %a /etc/nomad/env /etc/profile.d/nomad.sh") == "644\n644\n"


def test_task_dirs_are_mounted_read_only(booted: Booted) -> None:
    for tag, guest_path in GUEST_DIRS.items():
        fstype, options = booted.run(f"findmnt -n -o FSTYPE,OPTIONS {guest_path}").split()
        assert fstype == "virtiofs"
        assert "ro" in options.split(",")
        assert booted.run(f"cat {guest_path}/data.txt") == f"host file in {tag}\n"
    write = ssh_run(booted.vm.ssh_port, booted.key, "sudo -n touch /alloc/from-guest", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr
    assert not (booted.host_dirs["alloc"] / "from-guest").exists()


def test_cloud_init_finished_without_errors(booted: Booted) -> None:
    assert "status: done" in booted.run("cloud-init status --long")
    pattern = "' - [A-Za-z0-9_.]+\\[(WARNING|ERROR)\\]'"
    problems = booted.run(f"sudo -n grep -E {pattern} /var/log/cloud-init.log; true")
    assert problems == ""


def test_the_guests_cloud_init_finds_and_reads_a_fat_seed(booted: Booted, tmp_path: Path) -> None:
    # No second boot: the FAT seed goes onto a loop device in the running guest,
    # where cloud-init's own NoCloud device search (blkid LABEL=...) must find it.
    req = SeedRequest(instance_id="fat-check", hostname="fat-check")
    fat = build_seed(req, tmp_path / "seed.img", "fat")
    upload = ssh_run(booted.vm.ssh_port, booted.key, "base64 -d > /tmp/seed.img",
                     stdin=base64.b64encode(fat.read_bytes()).decode())
    assert upload.returncode == 0
    find = ("import sys; from cloudinit import util; "
            "print(' '.join(util.find_devs_with('LABEL=CIDATA') + util.find_devs_with('LABEL=cidata')))")
    script = (f"dev=$(sudo -n losetup -f --show -r /tmp/seed.img) && "
              f"sudo -n python3 -c \"{find}\" && echo $dev && "
              f"sudo -n mount -o ro $dev /mnt && cat /mnt/meta-data; "
              f"sudo -n umount /mnt; sudo -n losetup -d $dev")
    out = booted.run(script).splitlines()
    found, dev = out[0].split(), out[1]
    assert dev in found, out
    assert "\n".join(out[2:]) + "\n" == seed_files(req)["meta-data"].decode()
