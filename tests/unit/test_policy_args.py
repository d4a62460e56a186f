"""args_allowlist and the paths inside allowed options' values."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdriver.errors import InputError, PolicyError, SpecError
from vmdriver.host.config import HostConfig
from vmdriver.host.features import option_takes_arg
from vmdriver.policy import check_args, check_emulator
from vmdriver.policy.args import static_arity
from vmdriver.qemu.options import NO_ARG, WITH_ARG


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


def refused(args: list[str], dirs: tuple[Path, Path, Path], match: str, *,
            allow: tuple[str, ...] = (), cls: type[Exception] = PolicyError) -> str:
    """Assert ``args`` are refused before launch with ``match``; return the one-line message."""
    with pytest.raises(cls, match=match) as info:
        run(args, dirs, allow)
    assert "\n" not in str(info.value)
    return str(info.value)


# Section: flags, spelled as QEMU reads them

NOMAD_ALLOW = ("-drive", "-net", "-snapshot", "-singlestep")


@pytest.mark.parametrize("args", [
    ["-drive", "file=local/x.img"], ["-net", "tap,vlan=0,ifname=tap0"], ["-snapshot"],
    ["-singlestep"], ["--singlestep"], ["-drive", "local/wherever", "-snapshot"],
])
def test_allowed_flag_in_both_of_qemus_spellings(args: list[str],
                                                 dirs: tuple[Path, Path, Path]) -> None:
    run(args, dirs, NOMAD_ALLOW)


@pytest.mark.parametrize("args", [
    ["-usbdevice", "mouse"], ["-smp", "2"], ["--smp", "2"], ["-snapshot", "-device", "virtio-rng"],
])
def test_unlisted_flag_is_refused(args: list[str], dirs: tuple[Path, Path, Path]) -> None:
    message = refused(args, dirs, "flag is not in args_allowlist", allow=NOMAD_ALLOW)
    unlisted = next(a for a in args if a.startswith("-") and a.lstrip("-") != "snapshot")
    assert repr(unlisted) in message


@pytest.mark.parametrize("args,match", [
    # QEMU: "invalid option" (it stops before doing anything); refused with its reason.
    (["-smp=2"], "not an option QEMU knows \\(an option and its value are two elements"),
    (["--drive=file=local/x.img"], "not an option QEMU knows"),
    (["-singlestep "], "not an option QEMU knows"), (["---singlestep"], "not an option"),
    (["-"], "not an option QEMU knows"), (["--"], "not an option QEMU knows"),
    (["-nosuchoption", "/etc/shadow"], "not an option QEMU knows"),
    (["-smp"], "-smp needs a value"),
    # QEMU: a disk image named " -singlestep" (vl.c looks only at the first character).
    ([" -singlestep"], "disk image file name, not as an option"),
    (["\t-singlestep"], "disk image file name"), (["\n--smp=2 "], "disk image file name"),
])
def test_spellings_qemu_does_not_read_as_options_are_refused(
        args: list[str], match: str, dirs: tuple[Path, Path, Path]) -> None:
    message = refused(args, dirs, match, allow=NOMAD_ALLOW, cls=SpecError)
    assert message.startswith("args[0]: ")


def test_allowlist_entries_may_omit_dashes(dirs: tuple[Path, Path, Path]) -> None:
    run(["--smp", "2"], dirs, ("smp",))
    refused(["-m", "2"], dirs, "args_allowlist", allow=("smp",))


# Section: options that pull in more options are refused unless listed


@pytest.mark.parametrize("args", [
    ["-readconfig", "local/q.cfg"], ["-set", "drive.image0.file=/etc/shadow"],
    ["-add-fd", "fd=3,set=1"], ["-global", "virtio-net-pci.romfile=/etc/shadow"],
    ["-monitor", "tcp::4444,server"], ["-qmp", "unix:local/q.sock,server"], ["-mon", "chardev=c"],
    ["--readconfig", "x"], ["-incoming", "exec:sh -c id"], ["-plugin", "local/p.so"],
    ["-daemonize"], ["-sandbox", "off"], ["-qtest", "stdio"],
])
def test_config_pulling_options_refused_even_without_allowlist(
        args: list[str], dirs: tuple[Path, Path, Path]) -> None:
    name = args[0].lstrip("-")
    refused(args, dirs, f"option -{name} is refused unless args_allowlist lists it")


@pytest.mark.parametrize("args", [
    ["-serial", "mon:tcp::4444,server"], ["-parallel", "mon:stdio"],
    ["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:80-mon:stdio"],
])
def test_monitor_on_a_character_device_needs_monitor_listed(
        args: list[str], dirs: tuple[Path, Path, Path]) -> None:
    refused(args, dirs, "a monitor on a character device \\('mon:'\\) is refused",
            allow=(args[0],))
    run(args, dirs, (args[0], "-monitor"))


def test_config_pulling_option_allowed_when_listed(dirs: tuple[Path, Path, Path]) -> None:
    run(["-readconfig", "local/q.cfg"], dirs, ("-readconfig",))
    # Listed, but its file must still be somewhere allowed.
    refused(["-readconfig", "/etc/q.cfg"], dirs, "-readconfig path leads outside the allowed dirs",
            allow=("-readconfig",))


# Section: paths in values, with or without an allowlist

OUTSIDE = "path leads outside the allowed dirs"
PROC = "path leads into /proc, /sys or /dev/fd"
CLIMB = "path climbs out of the task dir"
PROGRAM = "is refused: it makes QEMU run a program"
FD = "is refused: the only file descriptors QEMU inherits are vmdriver's"

#: (args, what the refusal must say, the host path it must name).
ESCAPING_VALUES: list[tuple[list[str], str, str]] = [
    (["-drive", "file=/etc/shadow,if=virtio"], f"-drive {OUTSIDE}", "/etc/shadow"),
    (["-drive", "if=virtio,file=/etc/shadow"], f"-drive {OUTSIDE}", "/etc/shadow"),
    (["-drive", "file=file:/etc/shadow"], f"-drive {OUTSIDE}", "/etc/shadow"),
    (["-drive", "file=json:{\"file\":{\"filename\":\"/etc/shadow\"}}"],
     "protocol 'json:' is not allowed", "json:"),
    (["-drive", "file=nbd:unix:/run/x.sock"], "protocol 'nbd:' is not allowed", "nbd:unix"),
    (["-drive", "file.filename=/etc/shadow,file.driver=file"], f"-drive {OUTSIDE}", "/etc/shadow"),
    (["-drive", "file=local/ok.qcow2,backing.file.filename=/etc/shadow"], f"-drive {OUTSIDE}",
     "/etc/shadow"),
    (["-blockdev", "driver=file,node-name=f,filename=/etc/shadow"], f"-blockdev {OUTSIDE}",
     "/etc/shadow"),
    (["-blockdev", '{"driver":"file","node-name":"f","filename":"/etc/shadow"}'],
     f"-blockdev {OUTSIDE}", "/etc/shadow"),
    # QEMU's JSON takes single quotes too.
    (["-blockdev", "{'driver':'file','filename':'/etc/shadow'}"], f"-blockdev {OUTSIDE}",
     "/etc/shadow"),
    (["-blockdev", "driver=vvfat,dir=/etc"], "block driver 'vvfat' is refused", "/etc"),
    (["-kernel", "/boot/vmlinuz-other"], f"-kernel {OUTSIDE}", "/boot/vmlinuz-other"),
    (["-initrd", "../../x"], f"-initrd {CLIMB}", "../../x"),
    # A multiboot kernel reads -initrd as a module list; each module is a file.
    (["-initrd", "local/a,/etc/shadow"], f"-initrd {OUTSIDE}", "/etc/shadow"),
    (["-initrd", "local/a arg=1,/etc/shadow arg=2"], f"-initrd {OUTSIDE}", "/etc/shadow"),
    (["-bios", "/etc/shadow"], f"-bios {OUTSIDE}", "/etc/shadow"),
    (["-L", "/etc"], f"-L {OUTSIDE}", "/etc"), (["-k", "/etc/shadow"], f"-k {OUTSIDE}", "/etc"),
    (["-hda", "/etc/shadow"], f"-hda {OUTSIDE}", "/etc/shadow"),
    (["-cdrom", "/etc/shadow"], f"-cdrom {OUTSIDE}", "/etc/shadow"),
    (["-pidfile", "/etc/passwd"], f"-pidfile {OUTSIDE}", "/etc/passwd"),
    (["-D", "/etc/passwd"], f"-D {OUTSIDE}", "/etc/passwd"),
    (["-option-rom", "/etc/shadow"], f"-option-rom {OUTSIDE}", "/etc/shadow"),
    (["-option-rom", "local/r,,/../../../../etc/x,bootindex=1"], f"-option-rom {CLIMB}",
     "local/r,/../../../../etc/x"),
    (["-chardev", "file,id=c,path=/etc/passwd"], f"-chardev {OUTSIDE}", "/etc/passwd"),
    (["-chardev", "socket,id=c,path=/run/x.sock"], f"-chardev {OUTSIDE}", "/run/x.sock"),
    (["-chardev", "socket,id=c,path=local/s,,/../../../../etc/x"], f"-chardev {CLIMB}",
     "local/s,/../../../../etc/x"),
    (["-chardev", "stdio,id=c,logfile=/etc/passwd"], f"-chardev {OUTSIDE}", "/etc/passwd"),
    (["-chardev", "socket,id=c,fd=3"], f"fd= {FD}", "fd=3"),
    (["-serial", "file:/etc/passwd"], f"-serial {OUTSIDE}", "/etc/passwd"),
    # file: takes the whole rest as the path, commas included (QEMU opens "local/x,/../..").
    (["-serial", "file:local/x,/../../../etc/passwd"], f"-serial {CLIMB}",
     "local/x,/../../../etc/passwd"),
    (["-serial", "/dev/ttyS0"], f"-serial {OUTSIDE}", "/dev/ttyS0"),
    # COMx is a serial device QEMU opens by name, relative to its working dir.
    (["-serial", "COM/../../../etc/passwd"], f"-serial {CLIMB}", "COM/../../../etc/passwd"),
    (["-serial", "tcp::4000,server=on,wait=off,logfile=/etc/x"], f"-serial {OUTSIDE}", "/etc/x"),
    (["-serial", "unix:/run/a,,b,server=on"], f"-serial {OUTSIDE}", "/run/a,b"),
    (["-parallel", "pipe:/tmp/p"], f"-parallel {OUTSIDE}", "/tmp/p"),
    (["-fw_cfg", "name=opt/x,file=/etc/shadow"], f"-fw_cfg {OUTSIDE}", "/etc/shadow"),
    (["-device", "loader,file=/etc/shadow"], f"-device {OUTSIDE}", "/etc/shadow"),
    (["-device", "virtio-net-pci,romfile=/etc/shadow"], f"-device {OUTSIDE}", "/etc/shadow"),
    (["-device", '{"driver":"loader","file":"/etc/shadow"}'], f"-device {OUTSIDE}",
     "/etc/shadow"),
    (["-device", "usb-mtp,rootdir=/"], f"-device {OUTSIDE}", "/"),
    (["-object", "memory-backend-file,id=m,size=1G,mem-path=/etc"], f"-object {OUTSIDE}", "/etc"),
    (["-object", "secret,id=s,file=/etc/shadow"], f"-object {OUTSIDE}", "/etc/shadow"),
    (["-object", "{'qom-type':'secret','id':'s','file':'/etc/shadow'}"],
     f"-object {OUTSIDE}", "/etc/shadow"),
    (["-object", "rng-random,id=r,filename=/etc/shadow"], f"-object {OUTSIDE}", "/etc/shadow"),
    (["-netdev", "user,id=n,tftp=/etc"], f"-netdev {OUTSIDE}", "/etc"),
    (["-netdev", "user,id=n,smb=/"], "smb= is refused: it makes QEMU run smbd", "/"),
    (["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1234-file:/etc/passwd"],
     f"-netdev {OUTSIDE}", "/etc/passwd"),
    (["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1234-file:/etc/pass,,wd"],
     f"-netdev {OUTSIDE}", "/etc/pass,wd"),
    (["-nic", "user,guestfwd=:10.0.2.100:1234-unix:/run/x.sock"], f"-nic {OUTSIDE}",
     "/run/x.sock"),
    (["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1234-cmd:id"], f"guestfwd.cmd= {PROGRAM}",
     "cmd:id"),
    (["-netdev", "tap,id=n,script=local/up.sh"], f"script= {PROGRAM}", "local/up.sh"),
    (["-netdev", "tap,id=n,downscript=/bin/x"], f"downscript= {PROGRAM}", "/bin/x"),
    (["-netdev", "bridge,id=n,helper=/bin/sh"], f"helper= {PROGRAM}", "/bin/sh"),
    (["-netdev", "tap,id=n,fd=3"], f"fd= {FD}", "fd=3"),
    (["-netdev", "{'type':'tap','id':'n','fd':3}"], f"fd= {FD}", "'fd':3"),
    (["-netdev", "stream,id=n,addr.type=unix,addr.path=/run/x.sock"], f"-netdev {OUTSIDE}",
     "/run/x.sock"),
    (["-netdev", "dgram,id=n,remote.type=fd,remote.str=4"], f"remote.fd= {FD}", "remote.str=4"),
    (["-virtfs", "local,path=/,mount_tag=h,security_model=passthrough"], f"-virtfs {OUTSIDE}",
     "/"),
    (["-fsdev", "local,id=f,path=/etc,security_model=none"], f"-fsdev {OUTSIDE}", "/etc"),
    (["-fsdev", "proxy,id=f,sock_fd=3"], f"sock_fd= {FD}", "sock_fd=3"),
    (["-smbios", "file=/etc/shadow"], f"-smbios {OUTSIDE}", "/etc/shadow"),
    (["-acpitable", "data=local/a.bin:/etc/shadow"], f"-acpitable {OUTSIDE}", "/etc/shadow"),
    (["-acpitable", "file=local/a.bin:/etc/shadow"], f"-acpitable {OUTSIDE}", "/etc/shadow"),
    # -acpitable's implied key is data=: a bare first element is a file.
    (["-acpitable", "/etc/shadow"], f"-acpitable {OUTSIDE}", "/etc/shadow"),
    (["-machine", "pc,dumpdtb=/etc/x"], f"-machine {OUTSIDE}", "/etc/x"),
    (["-machine", "pc,kernel=/boot/x"], f"-machine {OUTSIDE}", "/boot/x"),
    (["-trace", "events=/etc/shadow"], f"-trace {OUTSIDE}", "/etc/shadow"),
    (["-vnc", "unix:/run/vnc.sock"], f"-vnc {OUTSIDE}", "/run/vnc.sock"),
    (["-vnc", "unix:local/v,,/../../../../run/v.sock"], f"-vnc {CLIMB}",
     "local/v,/../../../../run/v.sock"),
    (["-display", "vnc=unix:/run/vnc.sock"], f"-display {OUTSIDE}", "/run/vnc.sock"),
    (["-spice", "unix=on,addr=/run/spice.sock,disable-ticketing=on"], f"-spice {OUTSIDE}",
     "/run/spice.sock"),
    (["-spice", "addr=/run/spice.sock,unix=yes"], f"-spice {OUTSIDE}", "/run/spice.sock"),
    (["-audiodev", "wav,id=a,path=/etc/x.wav"], f"-audiodev {OUTSIDE}", "/etc/x.wav"),
    (["-audiodev", "pa,id=a,server=unix:/run/pulse/native"], f"-audiodev {OUTSIDE}",
     "/run/pulse/native"),
    (["-audiodev", "pa,id=a,server=/run/pulse/native"], f"-audiodev {OUTSIDE}",
     "/run/pulse/native"),
    (["-audiodev", "oss,id=a,out.dev=/dev/dsp"], f"-audiodev {OUTSIDE}", "/dev/dsp"),
    (["-display", "dbus,addr=unix:path=/run/bus,,guid=1"], f"-display {OUTSIDE}", "/run/bus"),
    (["-tpmdev", "passthrough,id=t,path=/dev/tpm0"], f"-tpmdev {OUTSIDE}", "/dev/tpm0"),
    (["-icount", "shift=1,rr=record,rrfile=/etc/x"], f"-icount {OUTSIDE}", "/etc/x"),
    (["-boot", "splash=/etc/shadow"], f"-boot {OUTSIDE}", "/etc/shadow"),
    (["-drive", "file=/etc/sha,,dow"], f"-drive {OUTSIDE}", "/etc/sha,dow"),
    (["/etc/shadow"], f"-hda {OUTSIDE}", "/etc/shadow"),
    (["-snapshot", "/etc/shadow"], f"-hda {OUTSIDE}", "/etc/shadow"),
    (["-append", "x", "/etc/shadow"], f"-hda {OUTSIDE}", "/etc/shadow"),
    (["-drive", "file=/proc/self/root/etc/shadow"], f"-drive {PROC}", "/proc/self/root"),
    (["-drive", "file=/dev/fdset/1"], f"-drive {PROC}", "/dev/fdset/1"),
    (["-drive", "file=local/../../../etc/shadow"], f"-drive {CLIMB}", "local/../../../etc/shadow"),
]


@pytest.mark.parametrize("args,match,path", ESCAPING_VALUES,
                         ids=lambda a: " ".join(a)[:60] if isinstance(a, list) else "")
def test_paths_in_allowed_options_obey_the_path_policy(
        args: list[str], match: str, path: str, dirs: tuple[Path, Path, Path]) -> None:
    """With an allowlist naming the option, its paths still obey the path policy."""
    allow = ("-snapshot", *(a for a in args if a.startswith("-")))
    message = refused(args, dirs, re.escape(match), allow=allow)
    assert path in message, message
    assert f"args[{len(args) - 1}]" in message  # names the element holding the path


@pytest.mark.parametrize("args,match,path", ESCAPING_VALUES,
                         ids=lambda a: " ".join(a)[:60] if isinstance(a, list) else "")
def test_escaping_values_refused_without_allowlist(
        args: list[str], match: str, path: str, dirs: tuple[Path, Path, Path]) -> None:
    """The default set refuses each of them too: by option, by key, or by the path policy."""
    with pytest.raises(InputError) as info:
        run(args, dirs)
    assert "\n" not in str(info.value) and str(info.value).startswith("args[")


@pytest.mark.parametrize("args,match", [
    (["-global", "virtio-net-pci.romfile=/etc/shadow"], f"-global {OUTSIDE}"),
    (["-global", "driver=loader,property=file,value=/etc/shadow"], f"-global {OUTSIDE}"),
    (["-set", "drive.x.file=nbd:unix:/run/x"], "protocol 'nbd:' is not allowed"),
    (["-plugin", "local/p,,/../../../../etc/x.so"], f"-plugin {CLIMB}"),
    (["-incoming", "exec:sh -c id"], f"exec= {PROGRAM}"),
    (["-incoming", "unix:/run/x.sock"], f"-incoming {OUTSIDE}"),
    (["-qmp", "unix:/run/q.sock,server=on"], f"-qmp {OUTSIDE}"),
])
def test_listed_options_still_obey_the_path_policy(args: list[str], match: str,
                                                   dirs: tuple[Path, Path, Path]) -> None:
    refused(args, dirs, re.escape(match), allow=(args[0],))


@pytest.mark.parametrize("args,match", [
    (["-machine", "pc,,x"], "QEMU cannot parse this -machine value: Invalid parameter ''"),
    (["-blockdev", "driver=file,/etc/shadow"], "Invalid parameter '/etc/shadow'"),
    (["-blockdev", "driver=file,foo"], "Expected '=' after parameter 'foo'"),
    (["-device", "{'driver':"], "QEMU cannot parse this -device value: not valid JSON"),
    (["-serial", "nosuch:/etc/shadow"], "'nosuch:/etc/shadow' is not a valid char driver"),
    (["-set", "nodots=x"], "can't parse"),
    (["-display", "vncx"], "VNC requires a display argument"),
])
def test_values_qemu_cannot_parse_are_refused_with_its_reason(
        args: list[str], match: str, dirs: tuple[Path, Path, Path]) -> None:
    refused(args, dirs, re.escape(match), allow=(args[0],), cls=SpecError)


#: What Nomad qemu jobs use: passes with no allowlist at all (the default set).
DEFAULT_SET_OK = [
    ["-drive", "file=local/data.img,if=virtio,format=raw"],
    ["-drive", "file=/IMAGES/base.img,if=virtio,readonly=on"],
    ["-drive", "file=file:local/data.img"], ["-drive", "file=local/we,,ird.img"],
    ["-blockdev", '{"driver":"file","node-name":"f","filename":"local/d.img"}'],
    ["-blockdev", "driver=qcow2,node-name=q,file.driver=file,file.filename=local/d.qcow2"],
    ["-kernel", "local/vmlinuz", "-initrd", "local/initrd", "-append", "console=ttyS0 root=/x"],
    ["-initrd", "local/mod1 arg=x,local/mod2"],
    ["-device", "virtio-rng-pci"], ["-smp", "2"], ["-smp", "cpus=2,sockets=1,cores=2"],
    ["-m", "512"], ["-m", "1G"],
    ["-object", "rng-random,id=r,filename=/dev/urandom"],
    ["-object", "memory-backend-ram,id=m0,size=256M"],
    ["-fw_cfg", "name=opt/vmdriver/mode,string=ignore-acpi"],
    ["-fw_cfg", "name=opt/vmdriver/blob,file=local/blob"],
    ["-chardev", "file,id=c,path=local/serial.log"], ["-chardev", "file,id=c,path=local/a,,b.log"],
    ["-chardev", "socket,id=c,path=local/agent.sock,server=on,wait=off"],
    ["-serial", "stdio"], ["-serial", "none"], ["-serial", "null"], ["-serial", "chardev:c0"],
    ["-vga", "none"], ["-vga", "std"], ["-display", "none"], ["-nographic"],
    ["-netdev", "user,id=n,restrict=on,hostname=vm"], ["-nic", "user,model=virtio-net-pci"],
    ["-device", "virtio-net-pci,netdev=n,mac=52:54:00:12:34:56"],
    ["-device", '{"driver":"virtio-blk-pci","drive":"d0","bootindex":1}'],
    ["-nodefaults", "-no-reboot"], ["-name", "/look/like/a/path"],
    ["-boot", "order=c,menu=off"], ["-rtc", "base=utc,clock=host"],
    ["-machine", "q35,smm=off"], ["-cpu", "max,+sse4.2,-x2apic"], ["-usbdevice", "tablet"],
    ["-overcommit", "cpu-pm=off"], ["-smbios", "type=1,serial=ds=nocloud"],
    ["-device", "virtio-net,netdev=n"], ["-smbios", "type=11,value=io.systemd.credential:x=y"],
]

#: Legitimate, but only with an allowlist naming the option (paths still checked).
ALLOWLIST_OK = [
    ["-k", "en-us"], ["-bios", "bios-256k.bin"], ["-serial", "file:local/serial.log"],
    ["-serial", "file:local/a,b.log"], ["-serial", "tcp::4555,server,nowait"],
    ["-netdev", "user,id=n,hostfwd=tcp::2222-:22"], ["-netdev", "tap,id=n,script=no"],
    ["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:80-chardev:c0"],
    ["-netdev", "user,id=n,guestfwd=tcp:10.0.2.100:80-file:local/fwd.log"],
    ["-snapshot", "local/disk2.img"], ["-pidfile", "/IMAGES/../a/t/q.pid"],
    ["-acpitable", "local/a.bin"], ["-machine", "q35,accel=tcg"],
]


@pytest.mark.parametrize("args", DEFAULT_SET_OK)
def test_default_set_passes_without_allowlist(args: list[str],
                                              dirs: tuple[Path, Path, Path]) -> None:
    images = str(dirs[2])
    run([a.replace("/IMAGES", images) for a in args], dirs)


@pytest.mark.parametrize("args", ALLOWLIST_OK + DEFAULT_SET_OK)
def test_legitimate_values_pass_with_allowlist(args: list[str],
                                               dirs: tuple[Path, Path, Path]) -> None:
    images = str(dirs[2])
    allow = tuple(a for a in args if a.startswith("-"))
    run([a.replace("/IMAGES", images) for a in args], dirs, allow)


@pytest.mark.parametrize("args", ALLOWLIST_OK)
def test_outside_the_default_set_needs_allowlist(args: list[str],
                                                 dirs: tuple[Path, Path, Path]) -> None:
    images = str(dirs[2])
    message = refused([a.replace("/IMAGES", images) for a in args], dirs,
                      "not in the safe set|bare disk image")
    assert message.startswith("args[")


def test_allowed_drive_still_cannot_reach_shadow(dirs: tuple[Path, Path, Path]) -> None:
    run(["-drive", "file=local/x.img"], dirs, ("-drive",))
    message = refused(["-drive", "file=/etc/shadow"], dirs, f"-drive {OUTSIDE}",
                      allow=("-drive",))
    assert "args[1]" in message and "/etc/shadow" in message


def test_option_only_the_binary_knows_is_checked_both_ways(
        dirs: tuple[Path, Path, Path]) -> None:
    """An option missing from the tables: its value is checked as a path and as key=value."""
    def arity(name: str) -> bool | None:
        return True if name == "new-option" else None

    task, alloc, images = dirs
    host = HostConfig(image_paths=(str(images),), state_dir=Path("/tmp"))
    host = HostConfig(image_paths=(str(images),), state_dir=Path("/tmp"),
                      args_allowlist=("-new-option",))
    check_args(("-new-option", "local/x"), host, task_dir=task, alloc_dir=alloc, arity=arity)
    for value in ("/etc/shadow", "a=1,file=/etc/shadow"):
        with pytest.raises(PolicyError, match="-new-option path leads outside"):
            check_args(("-new-option", value), host, task_dir=task, alloc_dir=alloc,
                       arity=arity)


_pieces = st.sampled_from(["-drive", "-serial", "-netdev", "-chardev", "-object", "-device",
                           "-blockdev", "-vnc", "-initrd", "-global", "--smp", " -S", "-x=y",
                           "file=", "file:", "unix:", "user,guestfwd=tcp::1-", "{'file':",
                           "/etc/shadow", "local/a", ",,", ",", "=", "..", "\x00", "COM", "mon:",
                           "path=", "fd=3", "{", "}", "'"])


@settings(max_examples=300, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.lists(_pieces, max_size=4).map("".join), max_size=4))
def test_any_args_pass_or_give_one_clear_line(args: list[str],
                                              dirs: tuple[Path, Path, Path]) -> None:
    """Hostile args never crash the check: they pass, or are refused in one line."""
    try:
        run(args, dirs, ("-global", "-monitor"))
    except InputError as exc:
        assert "\n" not in str(exc) and str(exc).startswith("args")


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
    not_a_name = r"^emulator: emulator must be (an architecture name, not a path|a name) "
    with pytest.raises(SpecError, match=not_a_name):
        check_emulator(emulator, HostConfig(state_dir=Path("/tmp")))  # type: ignore[arg-type]
