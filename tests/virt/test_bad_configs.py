"""Bad virt jobs and host configs: one clear line, exit 2, no volume left, no QEMU.

`vmdriver run` runs in-process here (main()), each case against a fresh pool,
with the test guest's image as the source so the cases that get past
validation would really create volumes.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import qemu_processes, short_tmp
from tests.virt.helpers import bases, host_file, job_file, volumes
from vmdriver.cli.main import main

ROOT = 'disk {\n source {\n image = "GUEST/disk.qcow2"\n }\n}'
SSH_PORT = 'network {\n port "ssh" {\n to = 22\n }\n}'

#: (id, config body, host config extra, substring of the one error line)
CASES = [
    ("unknown key", ROOT + "\nfoo = 1", "", "config.foo: unknown config key"),
    ("no disk", 'hostname = "a"', "", "config.disk: a virt task needs at least one disk"),
    ("bad machine", ROOT + '\nos {\n machine = "isapc"\n}', "",
     "config.os.machine: value not allowed (got 'isapc'; allowed: pc, q35"),
    ("two primaries", ROOT.replace("disk {", "disk {\n primary = true") * 2, "",
     "more than one primary disk"),
    ("bad size", 'disk {\n size = "2x"\n}', "", "config.disk[0].size"),
    ("shrinks the image", ROOT.replace("disk {", 'disk {\n size = "1MiB"'), "",
     "smaller than the source"),
    ("hostname", ROOT + '\nhostname = "Bad_Name"', "", "config.hostname: not an RFC 1123 label"),
    ("ssh key", ROOT + '\ndefault_user_authorized_ssh_key = "not a key"', "",
     "config.default_user_authorized_ssh_key: not one OpenSSH public key line"),
    ("empty command", ROOT + '\ncmds = ["echo", " "]', "", "config.cmds[1]: empty command"),
    ("bridge and macvtap",
     ROOT + '\nnetwork_interface {\n bridge {\n name = "br0"\n }\n macvtap {\n device = "eth0"\n }\n}',
     "", "exactly one of bridge or macvtap"),
    ("unknown port label",
     ROOT + '\nnetwork_interface {\n bridge {\n name = "br0"\n ports = ["web"]\n }\n}', "",
     "bridge.ports: port label is not declared in the job's network block (got 'web'; "
     "allowed: ssh)"),
    ("macvtap mode", ROOT + '\nnetwork_interface {\n macvtap {\n device = "eth0"\n'
     ' mode = "loud"\n }\n}', "", "config.network_interface[0].macvtap.mode"),
    ("image outside allowed dirs", 'disk {\n source {\n image = "/etc/hostname"\n }\n}', "",
     "disk[0].source.image: image path leads outside the allowed dirs"),
    ("user_data missing", ROOT + '\nuser_data = "local/user-data"', "",
     "config.user_data: user_data file does not exist"),
    ("user_data outside the task dir", ROOT + '\nuser_data = "/etc/hostname"', "",
     "config.user_data: user_data file leads outside the allowed dirs"),
    ("user_data is a directory", ROOT + '\nuser_data = "local"', "",
     "config.user_data: user_data is not a regular file"),
    ("unknown pool", ROOT.replace("disk {", 'disk {\n pool = "fast"'), "",
     "disk[0].pool: unknown storage pool (got 'fast'; allowed: local)"),
    ("libvirt provider", ROOT, 'provider "libvirt" {\n uri = "qemu:///system"\n}',
     "the libvirt provider is not available in this backend; vmdriver runs QEMU itself"),
    ("emulator missing after volumes", ROOT + '\nos {\n arch = "sparc64"\n machine = "virt"\n}',
     "", "sparc64"),
    ("password with newline", ROOT + '\ndefault_user_password = "a\\nb"', "",
     "config.default_user_password: the password must be non-empty, without newline or NUL"),
]


@pytest.fixture
def place() -> Iterator[Path]:
    with short_tmp("vtb-") as path:
        yield path


@pytest.mark.parametrize(("config", "host_extra", "message"),
                         [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config_is_one_line_and_exit_2(place: Path, guest_dir: Path,
                                           capsys: pytest.CaptureFixture[str], config: str,
                                           host_extra: str, message: str) -> None:
    pool = place / "pool"
    host = host_file(place, pool, (guest_dir,), host_extra)
    job = job_file(place, config.replace("GUEST", str(guest_dir)), network=SSH_PORT)
    code = main(["run", str(job), "--host-config", str(host), "--state-dir", str(place / "s"),
                 "--quiet"])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("vmdriver: error: "), err
    assert message in lines[0], lines[0]
    assert "Traceback" not in err
    assert volumes(pool) == [] and bases(pool) == []
    assert not qemu_processes(str(place))
