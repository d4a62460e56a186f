"""Hostile args and config fields under the default host config (no allowlist): no effect on the host.

Each attack names a host file, a local server or a port. The assertion is the
effect: the file is untouched, the server saw no request, the port is not open,
and no QEMU was started; the refusal is one line, exit 2.
"""

from __future__ import annotations

import json
import socket

import pytest

from tests.security.conftest import Canary, Cli, Listener, listening_ports, qemu_job, refused_cleanly


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _args(*args: str) -> str:
    return f"args = {json.dumps(list(args))}"


#: (name, args with {canary}; reads or writes the canary if QEMU ran them).
FILE_ATTACKS = [
    ("drive reads a host file", ["-drive", "file={canary},format=raw,if=virtio"]),
    ("drive, file: prefix", ["-drive", "file=file:{canary},format=raw"]),
    ("blockdev JSON", ['{{"driver":"file","node-name":"f","filename":"{canary}"}}']),
    ("serial truncates a host file", ["-serial", "file:{canary}"]),
    ("pidfile overwrites a host file", ["-pidfile", "{canary}"]),
    ("chardev logfile", ["-chardev", "stdio,id=c,logfile={canary}"]),
    ("fw_cfg file into the guest", ["-fw_cfg", "name=opt/x,file={canary}"]),
    ("kernel from a host path", ["-kernel", "{canary}"]),
    ("initrd module list", ["-initrd", "local/a,{canary}"]),
    ("guestfwd to a file", ["-netdev", "user,id=n,guestfwd=tcp:10.0.2.9:80-file:{canary}"]),
    ("object secret", ["-object", "secret,id=s,file={canary}"]),
    ("device loader", ["-device", "loader,file={canary}"]),
    ("acpitable list", ["-acpitable", "file=local/a:{canary}"]),
    ("bare disk image", ["{canary}"]),
    ("-D log file", ["-D", "{canary}"]),
    # Character-device and list syntax read as QEMU reads it.
    ("vnc unix socket", ["-vnc", "unix:{canary}"]),
    ("display vnc=unix:", ["-display", "vnc=unix:{canary}"]),
    ("chardev file path", ["-chardev", "file,id=c,path={canary}"]),
    ("serial unix socket", ["-serial", "unix:{canary},server=on,wait=off"]),
    ("parallel pipe", ["-parallel", "pipe:{canary}"]),
    ("drive value with ,, escape", ["-drive", "if=virtio,format=raw,file={canary},,x"]),
    ("acpitable data list", ["-acpitable", "data={canary}:{canary}"]),
]


@pytest.mark.parametrize("listed", [False, True], ids=["default set", "option allowlisted"])
@pytest.mark.parametrize("name,args", FILE_ATTACKS, ids=[a[0] for a in FILE_ATTACKS])
def test_args_never_reach_a_host_file(name: str, args: list[str], listed: bool, cli: Cli,
                                      canary: Canary) -> None:
    if args[0].startswith("{{"):
        args = ["-blockdev", args[0]]
    filled = [a.format(canary=canary.path) for a in args]
    # With the option allowlisted, only the path policy stands between the job and the file.
    allow = f"args_allowlist = {json.dumps([a for a in args if a.startswith('-')] or ['-snapshot'])}"
    status, err = cli.run(qemu_job(_args(*filled)), host=allow if listed else "")
    refused_cleanly(status, err)
    assert canary.untouched()
    assert cli.qemus() == []


#: Each would make the host (QEMU) connect to the local server: server-side request forgery.
SSRF = [
    ["-drive", "driver=http,url=http://127.0.0.1:{port}/a,if=virtio"],
    ["-drive", "file.driver=http,file.url=http://127.0.0.1:{port}/b,format=raw"],
    ["-blockdev", '{{"driver":"raw","node-name":"r","file":{{"driver":"http",'
                  '"url":"http://127.0.0.1:{port}/c"}}}}'],
    ["-drive", "file=http://127.0.0.1:{port}/d,format=raw"],
    ["-hda", "http://127.0.0.1:{port}/e"], ["-cdrom", "http://127.0.0.1:{port}/f"],
    ["-drive", "file=json:{{\"file.driver\":\"http\",\"file.url\":\"http://127.0.0.1:{port}/g\"}}"],
]


@pytest.mark.parametrize("args", SSRF, ids=[str(i) for i in range(len(SSRF))])
@pytest.mark.parametrize("allow", ["", 'args_allowlist = ["-drive", "-blockdev", "-hda", "-cdrom"]'])
def test_no_request_reaches_a_local_server(args: list[str], allow: str, cli: Cli,
                                           listener: Listener) -> None:
    filled = [a.format(port=listener.port) for a in args]
    status, err = cli.run(qemu_job(_args(*filled)), host=allow)
    refused_cleanly(status, err)
    assert listener.hits == []
    assert cli.qemus() == []


PORT_ATTACKS = [
    ["-gdb", "tcp:127.0.0.1:{port}"], ["-s"], ["-vnc", "127.0.0.1:{vnc}"],
    ["-netdev", "user,id=n,hostfwd=tcp:127.0.0.1:{port}-:22"],
    ["-nic", "user,hostfwd=tcp:127.0.0.1:{port}-:22"],
    ["-serial", "tcp:127.0.0.1:{port},server=on,wait=off"],
    ["-chardev", "socket,id=c,host=127.0.0.1,port={port},server=on,wait=off"],
    ["-monitor", "tcp:127.0.0.1:{port},server=on,wait=off"],
]


@pytest.mark.parametrize("args", PORT_ATTACKS, ids=[a[0] for a in PORT_ATTACKS])
def test_no_port_is_opened(args: list[str], cli: Cli) -> None:
    port = _free_port()
    filled = [a.format(port=port, vnc=port - 5900 if port > 5900 else 1) for a in args]
    status, err = cli.run(qemu_job(_args(*filled)))
    refused_cleanly(status, err)
    assert port not in listening_ports()
    assert cli.qemus() == []


#: Config fields rendered into option values: a ',' or '=' would add options past the policy.
SMUGGLING = [
    'machine_type = "pc,dumpdtb={canary}"', 'machine_type = "pc,,dumpdtb={canary}"',
    'machine_type = "pc=x"', 'emulator = "x86_64,-readconfig,{canary}"',
    'emulator = "../../{canary}"', 'drive_interface = "virtio,file={canary}"',
]


@pytest.mark.parametrize("field", SMUGGLING)
def test_config_fields_cannot_smuggle_options(field: str, cli: Cli, canary: Canary) -> None:
    status, err = cli.run(qemu_job(field.format(canary=canary.path)))
    refused_cleanly(status, err)
    assert canary.untouched()
    assert cli.qemus() == []


#: Another task of the same allocation: its secrets/ is not this task's to name.
SIBLING = [
    ["-drive", "file={sib}/secrets/token,format=raw"], ["-fw_cfg", "name=opt/s,file={sib}/secrets/token"],
    ["-kernel", "../db/secrets/token"], ["-drive", "file=../db/secrets/token,format=raw"],
    ["-chardev", "socket,id=c,path={sib}/secrets/sock,server=on,wait=off"],
]


@pytest.mark.parametrize("args", SIBLING, ids=[a[0] + str(i) for i, a in enumerate(SIBLING)])
def test_sibling_task_secrets_out_of_reach(args: list[str], cli: Cli) -> None:
    # The sibling's dir, spelt as the ${NOMAD_ALLOC_DIR}/.. a job can write.
    filled = [a.format(sib="${NOMAD_ALLOC_DIR}/../db") for a in args]
    job = qemu_job(_args(*filled)).replace('group "g" {', 'group "g" {\n task "db" {\n'
                                           ' driver = "raw_exec"\n }')
    status, err = cli.run(job)
    refused_cleanly(status, err, "outside the allowed dirs", "climbs out of the task dir")
    assert cli.qemus() == []


#: An image file name becomes the VM's display name (``-name``): it must stay one value.
@pytest.mark.parametrize("image", ["local/debug-threads=on", "local/process=x,,guest=y",
                                   "local/a=b"])
def test_image_file_name_cannot_add_keys_to_name(image: str, cli: Cli) -> None:
    from vmdriver.qemu.cmdline import option_pairs, parse_argv

    status, out = cli.run(qemu_job().replace("local/disk.img", image), command="argv-json")
    assert status == 0, out
    argv = json.loads(out)["t"]
    names = [e.value for e in parse_argv(argv[1:]) if e.name == "name"]
    assert names and all(k == "guest" for v in names if v for k, _ in option_pairs("name", v))
