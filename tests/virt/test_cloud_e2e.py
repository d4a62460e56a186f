"""Issue 12's end-to-end test through the virt face: the Debian cloud guest as a virt job.

One `vmdriver run` of a job written for nomad-driver-virt (cmds, hostname,
password, SSH key, user_data, the job's ssh port forwarded by user-mode
networking). Everything is checked over SSH with the real client as the
image's default user, and on the host (seed, record, pool).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cloudinit.guest import cloud_guest_dir, free_port, ssh_keypair, ssh_run, wait_ssh
from tests.virt.helpers import Run, host_file, running, volumes
from vmdriver.cloudinit import verify_password
from vmdriver.runtime.record import records_under

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

PASSWORD = "e2e-Pa55 word"
MARKER = "/var/tmp/vmdriver-marker"
TRICKY = "it's \"$(touch /var/tmp/pwned)\" `id` ; $HOME"
TRICKY_HCL = TRICKY.replace('"', '\\"')
USER_DATA = "#cloud-config\nwrite_files:\n  - path: /var/tmp/from-user-data\n    content: merged\n"


@dataclass
class Booted:
    run: Run
    state: Path
    pool: Path
    key: Path
    port: int
    alloc_id: str
    ssh_s: float

    def sh(self, command: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return ssh_run(self.port, self.key, command, **kw)  # type: ignore[arg-type]

    def out(self, command: str) -> str:
        return self.sh(command).stdout


def job_text(image: Path, pubkey: str, port: int, user_data: Path) -> str:
    return f"""
job "cloud" {{
  group "g" {{
    network {{
      port "ssh" {{
        static = {port}
        to     = 22
      }}
    }}
    task "cloud-vm" {{
      driver = "virt"
      artifact {{
        source      = "{user_data}"
        destination = "local/user-data"
        mode        = "file"
      }}
      env {{
        TRICKY = "{TRICKY_HCL}"
      }}
      config {{
        hostname                        = "virt-e2e"
        cmds                            = ["echo \\"marker $NOMAD_ALLOC_ID\\" > {MARKER}",
                                           "printf %s \\"$TRICKY\\" > /var/tmp/tricky"]
        default_user_password           = "{PASSWORD}"
        default_user_authorized_ssh_key = "{pubkey}"
        user_data                       = "local/user-data"
        disk {{
          chained = true
          size    = "2GiB"
          source {{
            image = "{image}"
          }}
        }}
      }}
      resources {{
        memory = 1024
      }}
      kill_timeout = "60s"
    }}
  }}
}}
"""


@pytest.fixture(scope="module")
def booted() -> Iterator[Booted]:
    if os.geteuid() != 0:
        pytest.skip("virtiofsd and the cloud guest build need root")
    if shutil.which("ssh") is None:
        pytest.skip("an ssh client is needed")
    image = cloud_guest_dir() / "disk.qcow2"
    state = Path(tempfile.mkdtemp(prefix="vtc-", dir="/tmp"))
    try:
        key, pubkey = ssh_keypair(state)
        (state / "user-data").write_text(USER_DATA)
        pool = state / "pool"
        host = host_file(state, pool, (image.parent,))
        port = free_port()
        job = state / "cloud.nomad.hcl"
        job.write_text(job_text(image, pubkey, port, state / "user-data"))
        with running(job, host, state / "s") as run:
            t0 = time.monotonic()
            run.wait_for("running", 120)
            alive = iter(lambda: run.proc.poll() is None, None)
            wait_ssh(port, key, timeout=420, alive=alive)
            ssh_s = time.monotonic() - t0
            (rec,) = records_under(state / "s")
            print(f"\ncloud guest as a virt job: ssh login {ssh_s:.1f}s after `vmdriver run`")
            yield Booted(run, state, pool, key, port, rec.id.split("/")[0], ssh_s)
    finally:
        shutil.rmtree(state, ignore_errors=True)


def test_cmds_ran_with_the_task_env(booted: Booted) -> None:
    # runcmd is the last stage: wait for cloud-init to finish before reading its marker.
    booted.sh("cloud-init status --wait", timeout=300, check=False)
    assert booted.out(f"cat {MARKER}") == f"marker {booted.alloc_id}\n"
    assert booted.out("cat /var/tmp/tricky") == TRICKY
    assert booted.out("test -e /var/tmp/pwned && echo PWNED || echo clean") == "clean\n"


def test_hostname_and_user_data_merge(booted: Booted) -> None:
    assert booted.out("hostname") == "virt-e2e\n"
    assert booted.out("cat /var/tmp/from-user-data") == "merged"


def test_key_login_is_the_default_user(booted: Booted) -> None:
    assert booted.out("id -un; sudo -n id -un") == "debian\nroot\n"


def test_password_hash_in_shadow_and_plain_text_nowhere_on_the_host(booted: Booted) -> None:
    entry = booted.out("sudo -n getent shadow debian").strip().split(":")
    assert entry[1].startswith("$6$") and verify_password(PASSWORD, entry[1])
    (seed,) = list((booted.state / "s" / "run").rglob("cidata.*"))
    data = seed.read_bytes()
    assert entry[1].encode() in data  # the search works: the hash is on the seed
    assert PASSWORD.encode() not in data
    for path in (booted.state / "s").rglob("*"):
        if path.is_file() and not path.is_socket() and path.suffix != ".qcow2":
            assert PASSWORD.encode() not in path.read_bytes(), path


def test_login_shell_has_nomad_alloc_id(booted: Booted) -> None:
    out = booted.out("""bash -lc 'printf "%s|%s" "$NOMAD_ALLOC_ID" "$NOMAD_ALLOC_DIR"'""")
    assert out == f"{booted.alloc_id}|/alloc"


def test_task_dirs_mounted_read_only(booted: Booted) -> None:
    for guest_path in ("/alloc", "/local", "/secrets"):
        fstype, options = booted.out(f"findmnt -n -o FSTYPE,OPTIONS {guest_path}").split()
        assert fstype in ("virtiofs", "9p")
        assert "ro" in options.split(",")
    # The task's local/ is what is mounted (0700 root on the host, so root reads it).
    assert "user-data" in booted.out("sudo -n ls /local")
    write = booted.sh("sudo -n touch /alloc/from-guest", check=False)
    assert write.returncode != 0
    assert "Read-only file system" in write.stderr


def test_stop_powers_off_and_removes_the_volumes(booted: Booted) -> None:
    assert len(volumes(booted.pool)) == 1
    t0 = time.monotonic()
    assert booted.run.stop() == 0, "".join(booted.run.stderr)
    print(f"\ncloud guest stopped in {time.monotonic() - t0:.1f}s")
    assert volumes(booted.pool) == []
