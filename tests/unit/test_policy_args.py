"""args_allowlist and the paths inside allowed options' values."""

from __future__ import annotations

from pathlib import Path

import pytest

from vmdriver.errors import PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.host.features import option_takes_arg
from vmdriver.policy import check_args, check_emulator
from vmdriver.policy.args import flag_name, split_opts, static_arity
from vmdriver.policy.options import NO_ARG, WITH_ARG


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    alloc = tmp_path / "a"
    task = alloc / "t"
    (task / "local").mkdir(parents=True)
    images = tmp_path / "images"
    images.mkdir()
    return task, alloc, images


def run(args: list[str], dirs: tuple[Path, Path, Path], allow: tuple[str, ...] = ()) -> None:
    task, alloc, images = dirs
    host = HostConfig(args_allowlist=allow, image_paths=(str(images),), state_dir=Path("/tmp"))
    check_args(tuple(args), host, where="args", task_dir=task, alloc_dir=alloc)


# Section: flags, however spelled

NOMAD_ALLOW = ("-drive", "-net", "-snapshot", "-singlestep")


@pytest.mark.parametrize("args", [
    ["-drive", "file=local/x.img"], ["-net", "tap,vlan=0,ifname=tap0"], ["-snapshot"],
    ["-singlestep"], ["--singlestep"], [" -singlestep"], ["\t-singlestep"], ["-singlestep "],
    ["--drive=file=local/x.img"], ["-drive", "local/wherever", "-snapshot"],
])
def test_allowed_flag_in_every_spelling(args: list[str], dirs: tuple[Path, Path, Path]) -> None:
    run(args, dirs, NOMAD_ALLOW)


@pytest.mark.parametrize("args", [
    ["-usbdevice", "mouse"], ["-smp", "2"], ["--smp", "2"], [" -smp", "2"], ["-smp=2"],
    ["\n--smp=2 "], ["-snapshot", "-device", "virtio-rng"], ["-"],
])
def test_unlisted_flag_in_every_spelling_is_refused(args: list[str],
                                                    dirs: tuple[Path, Path, Path]) -> None:
    with pytest.raises((PolicyError, SpecError)):
        run(args, dirs, NOMAD_ALLOW)


def test_allowlist_entries_may_omit_dashes(dirs: tuple[Path, Path, Path]) -> None:
    run(["--smp", "2"], dirs, ("smp",))
    with pytest.raises(PolicyError, match="args_allowlist"):
        run(["-m", "2"], dirs, ("smp",))


@pytest.mark.parametrize("text,expected", [
    ("-drive", ("drive", None)), ("--drive", ("drive", None)), (" -drive\t", ("drive", None)),
    ("-drive=a=b", ("drive", "a=b")), ("file=x", None), ("-", ("", None)), ("x-y", None),
])
def test_flag_name(text: str, expected: tuple[str, str | None] | None) -> None:
    assert flag_name(text) == expected


# Section: options that pull in more options are refused unless listed


@pytest.mark.parametrize("args", [
    ["-readconfig", "local/q.cfg"], ["-writeconfig", "local/q.cfg"],
    ["-set", "drive.image0.file=/etc/shadow"], ["-add-fd", "fd=3,set=1"],
    ["-global", "virtio-net-pci.romfile=/etc/shadow"], ["-monitor", "tcp::4444,server"],
    ["-qmp", "unix:local/q.sock,server"], ["-mon", "chardev=c"], ["--readconfig=x"],
    ["-incoming", "exec:sh -c id"], ["-plugin", "local/p.so"], ["-daemonize"],
    ["-sandbox", "off"], ["-serial", "mon:tcp::4444,server"],
])
def test_config_pulling_options_refused_even_without_allowlist(
        args: list[str], dirs: tuple[Path, Path, Path]) -> None:
    with pytest.raises(PolicyError, match="unless args_allowlist"):
        run(args, dirs)


def test_config_pulling_option_allowed_when_listed(dirs: tuple[Path, Path, Path]) -> None:
    run(["-readconfig", "local/q.cfg"], dirs, ("-readconfig",))
    # Listed, but its file must still be somewhere allowed.
    with pytest.raises(PolicyError, match="allowed dirs"):
        run(["-readconfig", "/etc/q.cfg"], dirs, ("-readconfig",))


# Section: paths in values, with or without an allowlist

ESCAPING_VALUES = [
    ["-drive", "file=/etc/shadow,if=virtio"],
    ["-drive", "if=virtio,file=/etc/shadow"],
    ["-drive", "file=file:/etc/shadow"],
    ["-drive", "file=json:{\"file\":{\"filename\":\"/etc/shadow\"}}"],
    ["-drive", "file=nbd:unix:/run/x.sock"],
    ["-drive", "file.filename=/etc/shadow,file.driver=file"],
    ["-drive", "file=local/ok.qcow2,backing.file.filename=/etc/shadow"],
    ["-blockdev", "driver=file,node-name=f,filename=/etc/shadow"],
    ["-blockdev", '{"driver":"file","node-name":"f","filename":"/etc/shadow"}'],
    ["-blockdev", "{'driver':'file','filename':'/etc/shadow'}"],
    ["-blockdev", "driver=vvfat,dir=/etc"],
    ["-kernel", "/boot/vmlinuz-other"], ["-initrd", "../../x"], ["-bios", "/etc/shadow"],
    ["-L", "/etc"], ["-hda", "/etc/shadow"], ["-cdrom", "/etc/shadow"],
    ["-pidfile", "/etc/passwd"], ["-D", "/etc/passwd"],
    ["-chardev", "file,id=c,path=/etc/passwd"], ["-chardev", "socket,id=c,path=/run/x.sock"],
    ["-chardev", "stdio,id=c,logfile=/etc/passwd"],
    ["-chardev", "socket,id=c,fd=3"],
    ["-serial", "file:/etc/passwd"], ["-serial", "/dev/ttyS0"], ["-parallel", "pipe:/tmp/p"],
    ["-fw_cfg", "name=opt/x,file=/etc/shadow"],
    ["-device", "loader,file=/etc/shadow"], ["-device", "virtio-net-pci,romfile=/etc/shadow"],
    ["-device", '{"driver":"loader","file":"/etc/shadow"}'],
    ["-device", "usb-mtp,rootdir=/"],
    ["-object", "memory-backend-file,id=m,size=1G,mem-path=/etc"],
    ["-object", "secret,id=s,file=/etc/shadow"],
    ["-object", "rng-random,id=r,filename=/etc/shadow"],
    ["-netdev", "user,id=n,tftp=/etc"], ["-netdev", "user,id=n,smb=/"],
    ["-netdev", "tap,id=n,script=local/up.sh"], ["-netdev", "tap,id=n,downscript=/bin/x"],
    ["-netdev", "bridge,id=n,helper=/bin/sh"], ["-netdev", "tap,id=n,fd=3"],
    ["-virtfs", "local,path=/,mount_tag=h,security_model=passthrough"],
    ["-fsdev", "local,id=f,path=/etc,security_model=none"],
    ["-smbios", "file=/etc/shadow"], ["-acpitable", "data=local/a.bin:/etc/shadow"],
    ["-machine", "pc,dumpdtb=/etc/x"], ["-machine", "pc,kernel=/boot/x"],
    ["-trace", "events=/etc/shadow"], ["-vnc", "unix:/run/vnc.sock"],
    ["-audiodev", "wav,id=a,path=/etc/x.wav"], ["-tpmdev", "passthrough,id=t,path=/dev/tpm0"],
    ["-icount", "shift=1,rr=record,rrfile=/etc/x"], ["-boot", "splash=/etc/shadow"],
    ["-drive", "file=/etc/sha,,dow"],
    ["/etc/shadow"], [" -snapshot"], ["-snapshot", "/etc/shadow"],
    ["-nosuchoption", "/etc/shadow"],
    ["-append", "x", "/etc/shadow"],
    ["-drive", "file=/proc/self/root/etc/shadow"], ["-drive", "file=/dev/fdset/1"],
    ["-drive", "file=local/../../../etc/shadow"],
]


@pytest.mark.parametrize("args", ESCAPING_VALUES, ids=lambda a: " ".join(a)[:60])
def test_paths_in_values_obey_image_paths_without_allowlist(
        args: list[str], dirs: tuple[Path, Path, Path]) -> None:
    if args == [" -snapshot"]:
        # QEMU reads " -snapshot" as a disk image named " -snapshot" in the task dir: fine.
        run(args, dirs)
        return
    with pytest.raises((PolicyError, SpecError)):
        run(args, dirs)


@pytest.mark.parametrize("args", [
    ["-drive", "file=local/data.img,if=virtio,format=raw"],
    ["-drive", "file=/IMAGES/base.img,if=virtio,readonly=on"],
    ["-drive", "file=file:local/data.img"],
    ["-blockdev", '{"driver":"file","node-name":"f","filename":"local/d.img"}'],
    ["-kernel", "local/vmlinuz", "-initrd", "local/initrd", "-append", "console=ttyS0 root=/x"],
    ["-bios", "bios-256k.bin"], ["-device", "virtio-rng-pci"], ["-smp", "2"], ["-m", "512"],
    ["-object", "rng-random,id=r,filename=/dev/urandom"],
    ["-fw_cfg", "name=opt/vmdriver/mode,string=ignore-acpi"],
    ["-chardev", "file,id=c,path=local/serial.log"], ["-serial", "file:local/serial.log"],
    ["-serial", "stdio"], ["-serial", "tcp::4555,server,nowait"], ["-vga", "none"],
    ["-netdev", "user,id=n,hostfwd=tcp::2222-:22"], ["-netdev", "tap,id=n,script=no"],
    ["-nodefaults", "-no-reboot"], ["-name", "/look/like/a/path"],
    ["-drive", "file=local/we,,ird.img"], ["local/disk2.img"],
    ["-pidfile", "/IMAGES/../a/t/q.pid"],
])
def test_legitimate_values_pass(args: list[str], dirs: tuple[Path, Path, Path]) -> None:
    images = str(dirs[2])
    run([a.replace("/IMAGES", images) for a in args], dirs)


def test_allowed_drive_still_cannot_reach_shadow(dirs: tuple[Path, Path, Path]) -> None:
    run(["-drive", "file=local/x.img"], dirs, ("-drive",))
    with pytest.raises(PolicyError) as info:
        run(["-drive", "file=/etc/shadow"], dirs, ("-drive",))
    assert "args[1]" in str(info.value) and "/etc/shadow" in str(info.value)


@pytest.mark.parametrize("text,pairs", [
    ("a=1,b=2", [("a", "1"), ("b", "2")]),
    ("file=x,,y,if=virtio", [("file", "x,y"), ("if", "virtio")]),
    ("virtio-net,id=n", [("virtio-net", None), ("id", "n")]),
    ("a=,b", [("a", ""), ("b", None)]),
])
def test_split_opts_reads_like_qemu(text: str, pairs: list[tuple[str, str | None]]) -> None:
    assert list(split_opts(text)) == pairs


def test_option_tables_match_this_qemu() -> None:
    """Guards the static tables: QEMU itself says which options take a value."""
    binary = Path("/usr/bin/qemu-system-x86_64")
    for name in sorted(NO_ARG):
        assert option_takes_arg(binary, name) is False, name
    for name in ("drive", "device", "kernel", "serial", "readconfig", "set", "smp", "fw_cfg"):
        assert option_takes_arg(binary, name) is True, name
        assert static_arity(name) is True
    assert option_takes_arg(binary, "no-such-option") is None
    assert "writeconfig" in WITH_ARG


# Section: emulators


@pytest.mark.parametrize("allow", [("x86_64",), ("qemu-system-x86_64",), (" x86_64 ",), ()])
@pytest.mark.parametrize("emulator", ["x86_64", "qemu-system-x86_64", "", None])
def test_emulator_documented_forms(allow: tuple[str, ...], emulator: str | None) -> None:
    host = HostConfig(emulators_allowlist=allow, state_dir=Path("/tmp"))
    assert check_emulator(emulator, host) == "x86_64"


@pytest.mark.parametrize("emulator", ["aarch64", "qemu-system-aarch64"])
def test_emulator_not_listed(emulator: str) -> None:
    host = HostConfig(emulators_allowlist=("x86_64",), state_dir=Path("/tmp"))
    with pytest.raises(PolicyError, match="emulators_allowlist"):
        check_emulator(emulator, host)


def test_default_emulator_is_checked_too() -> None:
    host = HostConfig(emulators_allowlist=("aarch64",), state_dir=Path("/tmp"))
    with pytest.raises(PolicyError, match="the default"):
        check_emulator(None, host)


@pytest.mark.parametrize("emulator", [
    "/usr/bin/qemu-system-x86_64", "../x86_64", "x86_64 -readconfig x", "qemu-system-",
    "x86_64;id", "X86_64/../../sh", 5,
])
def test_emulator_is_a_name_never_a_path(emulator: object) -> None:
    with pytest.raises(SpecError):
        check_emulator(emulator, HostConfig(state_dir=Path("/tmp")))  # type: ignore[arg-type]
