"""Default-deny args, network block drivers (SSRF) and the bounds on RAM and vCPUs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vmdriver.errors import InputError, PolicyError
from vmdriver.host.config import HostConfig
from vmdriver.policy import check_args
from vmdriver.policy.bounds import check_resources


def run(args: list[str], tmp_path: Path, allow: tuple[str, ...] = (), **host: object) -> None:
    task = tmp_path / "a" / "t"
    (task / "local").mkdir(parents=True, exist_ok=True)
    cfg = HostConfig(args_allowlist=allow, state_dir=Path("/tmp"), **host)  # type: ignore[arg-type]
    check_args(tuple(args), cfg, where="args", task_dir=task, alloc_dir=task.parent)


@pytest.mark.parametrize("args,named", [
    (["-accel", "kvm"], "option -accel"), (["-S"], "option -S"), (["-vnc", ":0"], "option -vnc"),
    (["-spice", "port=5900"], "option -spice"), (["-audiodev", "none,id=a"], "option -audiodev"),
    (["-gdb", "tcp::1234"], "option -gdb"), (["-s"], "option -s"), (["-net", "user"], "option -net"),
    (["-device", "vfio-pci,host=01:00.0"], "-device driver=vfio-pci"),
    (["-device", "usb-host,hostbus=1"], "-device driver=usb-host"),
    (["-device", "virtio-net-pci,romfile=local/x"], "-device key 'romfile'"),
    (["-device", "loader,file=local/x"], "-device driver=loader"),
    (["-netdev", "tap,id=n"], "-netdev type=tap"),
    (["-netdev", "user,id=n,hostfwd=tcp::22-:22"], "-netdev key 'hostfwd'"),
    (["-netdev", "user,id=n,guestfwd=tcp:10.0.2.1:80-cmd:id"], "-netdev key 'guestfwd'"),
    (["-netdev", "user,id=n,tftp=local"], "-netdev key 'tftp'"),
    (["-nic", "user,hostfwd=tcp::22-:22"], "-nic key 'hostfwd'"),
    (["-drive", "file=local/x,format=luks"], "-drive format=luks"),
    (["-drive", "file=local/x,file.driver=file"], "-drive key 'file.driver'"),
    (["-blockdev", "driver=vvfat,dir=local"], "-blockdev driver=vvfat"),
    (["-blockdev", "driver=qcow2,file.driver=file,file.filename=local/x,data-file=d"],
     "-blockdev key 'data-file'"),
    (["-fw_cfg", "name=etc/ramfb,string=x"], "-fw_cfg names a job may set start with opt/"),
    (["-machine", "pc,accel=kvm"], "-machine key 'accel'"),
    (["-machine", "pc,memory-backend=m"], "-machine key 'memory-backend'"),
    (["-object", "memory-backend-file,id=m,size=1M,mem-path=local"], "-object qom-type="),
    (["-object", "secret,id=s,data=x"], "-object qom-type=secret"),
    (["-chardev", "socket,id=c,host=127.0.0.1,port=22"], "-chardev key 'host'"),
    (["-chardev", "pty,id=c"], "-chardev backend=pty"),
    (["-serial", "tcp::4444,server=on"], "-serial backend=socket"),
    (["-serial", "file:local/log"], "-serial backend=file"),
    (["-display", "gtk"], "-display type=gtk"), (["-vga", "qxl,x"], "-vga vga=qxl,x"),
    (["-boot", "splash=local/s.bmp"], "-boot key 'splash'"),
    (["-overcommit", "mem-lock=off,cpu-pm=on"], "-overcommit key 'mem-lock'"),
    (["-smbios", "file=local/t"], "-smbios key 'file'"), (["local/disk.img"], "bare disk image"),
])
def test_default_set_refuses_with_option_and_key_named(args: list[str], named: str,
                                                       tmp_path: Path) -> None:
    with pytest.raises(PolicyError) as info:
        run(args, tmp_path)
    assert named in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


#: Each would make the host connect somewhere: refused even when the option is listed.
SSRF = [
    ["-drive", "driver=http,url=http://127.0.0.1:1/x"],
    ["-drive", "file.driver=nbd,file.host=127.0.0.1,file.port=10809"],
    ["-drive", "file=local/x,file.driver=https,file.url=https://10.0.0.1/"],
    ["-blockdev", "driver=ssh,host=127.0.0.1,path=/x,node-name=s"],
    ["-blockdev", '{"driver":"qcow2","node-name":"q","file":{"driver":"http","url":"http://x/"}}'],
    ["-blockdev", "{'driver':'raw','file':{'driver':'iscsi','transport':'tcp'}}"],
    ["-drive", "driver=gluster,url=gluster://h/v/i"],
    ["-drive", "file.driver=CURL,file.url=http://h/"],
    ["-drive", "driver=rbd,pool=p,image=i"],
    ["-drive", "file=http://127.0.0.1:1/x"], ["-drive", "file=nbd:127.0.0.1:10809"],
    ["-drive", "file=json:{\"file.driver\":\"http\"}"], ["-hda", "https://127.0.0.1/x"],
    ["-cdrom", "ftp://127.0.0.1/x"], ["-drive", "file=nbd+unix:///x?socket=/run/s"],
    ["-set", "drive.d.driver=http"],
]


@pytest.mark.parametrize("args", SSRF)
def test_network_block_drivers_refused_even_when_listed(args: list[str], tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"block driver|protocol") as info:
        run(args, tmp_path, allow=(args[0], "-set"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("allow", [(), ("-m", "-smp", "-object", "-overcommit")])
@pytest.mark.parametrize("args,match", [
    (["-m", "1T"], "-m size is more memory"), (["-m", "size=512M,maxmem=1T"], "maxmem|key"),
    (["-m", "0x10000000000"], "not a size vmdriver can bound"),
    (["-smp", "100000"], "more vCPUs"), (["-smp", "cpus=1,maxcpus=4096"], "more vCPUs"),
    (["-smp", "sockets=16,cores=16,threads=16"], "more vCPUs"),
    (["-smp", "0x1000"], "not a count vmdriver can bound"),
    (["-object", "memory-backend-ram,id=m,size=1T"], "memory backends is more memory"),
    (["-object", "memory-backend-ram,id=a,size=1G", "-object", "memory-backend-ram,id=b,size=1G"],
     "memory backends is more memory"),
    (["-overcommit", "mem-lock=on"], "mem-lock|key"),
])
def test_bounds_hold_with_or_without_allowlist(args: list[str], match: str,
                                               allow: tuple[str, ...], tmp_path: Path) -> None:
    with pytest.raises(InputError, match=match):
        run(args, tmp_path, allow=allow, max_memory="1536MiB", max_vcpus=8)


def test_bounds_allow_what_fits(tmp_path: Path) -> None:
    run(["-m", "1G", "-smp", "cpus=8", "-object", "memory-backend-ram,id=a,size=1G"], tmp_path,
        max_memory="1536MiB", max_vcpus=8)


def test_resources_are_bounded_too() -> None:
    host = HostConfig(max_memory="1GiB", max_vcpus=2, max_ports=1, state_dir=Path("/tmp"))
    check_resources(1024, 2, 1, host, where="t: ")
    for mem, cores, ports, field in ((1025, 1, 0, "memory"), (512, 3, 0, "cores"),
                                     (512, 1, 2, "ports")):
        with pytest.raises(PolicyError, match=re.escape(field)):
            check_resources(mem, cores, ports, host, where="t: ")
