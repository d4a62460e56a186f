"""The one QEMU command-line parser: tables of QEMU's readings, and real QEMU as the oracle."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmdriver.qemu import qjson
from vmdriver.qemu.cmdline import (
    Element,
    Kind,
    OptionSyntaxError,
    chardev_spec,
    guestfwd,
    has_option,
    multiboot_modules,
    option_name,
    option_pairs,
    parse_argv,
    split_keyval,
    split_opts,
)
from vmdriver.qemu.options import VALUE_SYNTAX

QEMU = shutil.which("qemu-system-x86_64")
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed")

# Section: the argv walk (vl.c)


@pytest.mark.parametrize("arg,name", [
    ("-drive", "drive"), ("--drive", "drive"), ("---drive", "-drive"), ("-", ""), ("--", ""),
    ("-drive=x", "drive=x"), (" -drive", None), ("drive", None), ("", None), ("-smp ", "smp "),
])
def test_option_name_is_what_vl_c_looks_up(arg: str, name: str | None) -> None:
    assert option_name(arg) == name


def test_parse_argv_walks_like_vl_c() -> None:
    argv = ["-m", "512", "--smp", "-2", "disk.img", "-S", "-append", "-kernel", " -hda"]
    assert parse_argv(argv) == (
        Element(0, Kind.OPTION, "m", "512"), Element(2, Kind.OPTION, "smp", "-2"),
        Element(4, Kind.IMAGE, value="disk.img"), Element(5, Kind.OPTION, "S"),
        Element(6, Kind.OPTION, "append", "-kernel"), Element(8, Kind.IMAGE, value=" -hda"),
    )


@pytest.mark.parametrize("argv,last", [
    (["-S", "-drive=x", "-m", "1"], Element(1, Kind.UNKNOWN, "drive=x")),
    (["-nosuch", "x"], Element(0, Kind.UNKNOWN, "nosuch")),
    (["-S", "-m"], Element(1, Kind.MISSING_VALUE, "m")),
    (["-"], Element(0, Kind.UNKNOWN, "")),
])
def test_parse_argv_stops_where_qemu_stops(argv: list[str], last: Element) -> None:
    assert parse_argv(argv)[-1] == last


def test_arity_falls_back_to_the_callable() -> None:
    def arity(name: str) -> bool | None:
        return {"new-opt": True, "m": False}.get(name)

    assert parse_argv(["-new-opt", "-x"], arity) == (Element(0, Kind.OPTION, "new-opt", "-x"),)
    assert parse_argv(["-new-opt", "-x"])[0].kind is Kind.UNKNOWN
    # The tables come first: the callable is asked only about options they lack.
    assert parse_argv(["-m", "1"], arity) == (Element(0, Kind.OPTION, "m", "1"),)


@pytest.mark.parametrize("argv,name,found", [
    (["-smp", "2"], "-smp", True), (["--smp", "2"], "smp", True),
    (["-append", "-smp"], "-smp", False), (["-smp=2"], "smp", False), ([" -smp", "2"], "smp", False),
    (["-name", "x", "-S"], "S", True), ([], "smp", False),
])
def test_has_option_counts_only_what_qemu_reads_as_that_option(
        argv: list[str], name: str, found: bool) -> None:
    assert has_option(argv, name) is found


# Section: QemuOpts and keyval


@pytest.mark.parametrize("text,implied,pairs", [
    ("a=1,b=2", None, [("a", "1"), ("b", "2")]),
    ("file=x,,y,if=virtio", None, [("file", "x,y"), ("if", "virtio")]),
    ("virtio-net,id=n", "driver", [("driver", "virtio-net"), ("id", "n")]),
    ("user,,x,id=n", "type", [("type", "user,x"), ("id", "n")]),
    ("a=,b,nowait,no", None, [("a", ""), ("b", "on"), ("wait", "off"), ("", "off")]),
    ("a=1,", None, [("a", "1")]), (",a=1", "type", [("type", ""), ("a", "1")]),
    ("a=x=y,,,b=2", None, [("a", "x=y,"), ("b", "2")]), ("", "type", []),
])
def test_split_opts_reads_like_qemu_option_c(text: str, implied: str | None,
                                            pairs: list[tuple[str, str]]) -> None:
    assert split_opts(text, implied) == pairs


@pytest.mark.parametrize("text,implied,pairs", [
    ("q35,accel=tcg", "type", [("type", "q35"), ("accel", "tcg")]),
    ("file.filename=a,,b,driver=qcow2", "driver",
     [("file.filename", "a,b"), ("driver", "qcow2")]),
    ("a.0.b=1", None, [("a.0.b", "1")]), ("help,a=1", "type", [("a", "1")]),
])
def test_split_keyval_reads_like_qemu_keyval_c(text: str, implied: str | None,
                                              pairs: list[tuple[str, str]]) -> None:
    assert split_keyval(text, implied) == pairs


@pytest.mark.parametrize("text,implied,error", [
    ("none,,x", "type", "Invalid parameter ''"), ("a=1,foo", None, "Expected '=' after"),
    ("0a=1", None, "Invalid parameter '0a'"), ("a..b=1", None, "Invalid parameter"),
    ("x", None, "Expected '=' after parameter 'x'"), ("a=1,/p", None, "Invalid parameter '/p'"),
])
def test_split_keyval_refuses_what_keyval_refuses(text: str, implied: str | None,
                                                  error: str) -> None:
    with pytest.raises(OptionSyntaxError, match=error):
        split_keyval(text, implied)


_key = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
_value = st.text(alphabet="ab=,:./ -", max_size=12)


@given(st.lists(st.tuples(_key, _value), min_size=1, max_size=5))
def test_escaped_values_split_back_exactly(pairs: list[tuple[str, str]]) -> None:
    """Both parsers give back every value with commas doubled, and nothing else."""
    text = ",".join(f"{k}={v.replace(',', ',,')}" for k, v in pairs)
    assert split_opts(text) == pairs
    assert split_keyval(text) == pairs
    first = pairs[0][1].replace(",", ",,")
    rest = "".join(f",{k}={v.replace(',', ',,')}" for k, v in pairs[1:])
    if "=" not in first.split(",,")[0] and first + rest:
        assert split_opts(first + rest, "type") == [("type", pairs[0][1]), *pairs[1:]]


# Section: character devices and other sub-syntaxes


@pytest.mark.parametrize("spec,pairs", [
    ("file:/x,y", [("backend", "file"), ("path", "/x,y")]),
    ("pipe:p", [("backend", "pipe"), ("path", "p")]),
    ("unix:/s,,t,server=on", [("backend", "socket"), ("path", "/s,t"), ("server", "on")]),
    ("tcp::4444,server,nowait", [("backend", "socket"), ("host", ""), ("port", "4444"),
                                 ("server", "on"), ("wait", "off")]),
    ("telnet:h:23,logfile=l", [("backend", "socket"), ("host", "h"), ("port", "23"),
                               ("logfile", "l")]),
    ("udp:1.2.3.4:5@:6", [("backend", "udp"), ("host", "1.2.3.4"), ("port", "5")]),
    ("COM1", [("backend", "serial"), ("path", "COM1")]),
    ("/dev/ttyS0", [("backend", "serial"), ("path", "/dev/ttyS0")]),
    ("/dev/parport0", [("backend", "parallel"), ("path", "/dev/parport0")]),
    ("mon:stdio", [("mon", "on"), ("backend", "stdio")]), ("vc:80Cx24C", [("backend", "vc")]),
    ("chardev:c0", [("chardev", "c0")]), ("con:", [("backend", "console")]),
])
def test_chardev_spec_as_qemu_char_c(spec: str, pairs: list[tuple[str, str]]) -> None:
    assert chardev_spec(spec) == pairs


@pytest.mark.parametrize("spec", ["nosuch", "tcp:nohostport", "vc:big", "mon:mon:stdio", ""])
def test_chardev_spec_refuses_what_qemu_refuses(spec: str) -> None:
    with pytest.raises(OptionSyntaxError, match="is not a valid char driver"):
        chardev_spec(spec)


def test_mon_is_refused_where_qemu_refuses_it() -> None:
    with pytest.raises(OptionSyntaxError, match="mon: isn't supported"):
        option_pairs("qtest", "mon:stdio")


@pytest.mark.parametrize("rule,pairs", [
    ("tcp:10.0.2.100:80-cmd:netcat 1 2", [("cmd", "netcat 1 2")]),
    (":10.0.2.1:80-file:/a-b", [("backend", "file"), ("path", "/a-b")]),
    ("tcp::80-chardev:c", [("chardev", "c")]),
])
def test_guestfwd_targets(rule: str, pairs: list[tuple[str, str]]) -> None:
    assert guestfwd(rule) == pairs


@pytest.mark.parametrize("option,value,expected", [
    ("netdev", "user,id=n,guestfwd=tcp::1-file:f,,g",
     [("type", "user"), ("id", "n"), ("guestfwd", "tcp::1-file:f,g"),
      ("guestfwd.backend", "file"), ("guestfwd.path", "f,g")]),
    ("netdev", "stream,id=n,addr.type=fd,addr.str=5",
     [("type", "stream"), ("id", "n"), ("addr.type", "fd"), ("addr.str", "5"), ("addr.fd", "5")]),
    ("netdev", "{'type':'user','id':'n'}", [("type", "user"), ("id", "n")]),
    ("vnc", "unix:a,,b", [("vnc", "unix:a,b"), ("vnc.path", "a,b")]),
    ("display", "vnc=unix:s", [("vnc", "unix:s"), ("vnc.path", "s")]),
    ("display", "gtk,gl=on", [("type", "gtk"), ("gl", "on")]),
    ("acpitable", "x:y", [("data", "x:y"), ("data", "x"), ("data", "y")]),
    ("initrd", "m1 a=1,m2", [("initrd", "m1 a=1,m2"), ("initrd", "m1"), ("initrd", "m2")]),
    ("global", "e1000.romfile=a,b", [("e1000.romfile", "a,b")]),
    ("set", "drive.d0.file.filename=x", [("drive.d0.file.filename", "x")]),
    ("incoming", "exec:id", [("exec", "id")]), ("hda", "a,b", [("file", "a,b")]),
    ("bios", "b.bin", [("firmware", "b.bin")]), ("append", "a=b,c", [("append", "a=b,c")]),
    ("spice", "unix=on,addr=/s", [("unix", "on"), ("addr", "/s"), ("addr.path", "/s")]),
    ("serial", "none", []), ("monitor", "none,x", []),
    ("audio", "pa,model=hda,server=unix:/s", [("driver", "pa"), ("model", "hda"),
                                              ("server", "unix:/s"), ("server.path", "/s")]),
    ("display", "dbus,addr=unix:path=/b,,guid=1;tcp:host=h",
     [("type", "dbus"), ("addr", "unix:path=/b,guid=1;tcp:host=h"), ("addr.path", "/b")]),
    ("device", '{"driver":"loader","file":"f","x":[1,{"y":null}]}',
     [("driver", "loader"), ("file", "f"), ("x.0", 1), ("x.1.y", None)]),
])
def test_option_pairs_spell_out_what_values_hold(option: str, value: str,
                                                 expected: list[tuple[str, object]]) -> None:
    assert option_pairs(option, value) == expected


def test_multiboot_modules_keep_escaped_commas() -> None:
    assert multiboot_modules("a,,b x,c") == ["a,b x", "c"]


_any_option = st.sampled_from(sorted({*VALUE_SYNTAX, "cpu", "append", "unknown-x"}))
_any_text = st.text(alphabet=st.sampled_from([*list("ab01,=:.{}[]'\"\\/ -_@;"), "\x00", "é"]),
                    max_size=40)


@settings(max_examples=400, deadline=None)
@given(_any_option, _any_text)
def test_any_value_gives_pairs_or_qemus_refusal_never_a_crash(option: str, text: str) -> None:
    try:
        pairs = option_pairs(option, text)
    except OptionSyntaxError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert all(isinstance(key, str) for key, _ in pairs)


@given(st.lists(st.sampled_from(["-m", "--smp", "-S", "-", "-x=y", " -a", "disk", "", "-drive"]),
                max_size=8))
def test_walk_covers_every_element_until_qemu_would_stop(argv: list[str]) -> None:
    elements = parse_argv(argv)
    covered = [i for e in elements
               for i in ((e.index, e.value_index) if e.kind is Kind.OPTION and e.value is not None
                         else (e.index,))]
    stopped = bool(elements) and elements[-1].kind in (Kind.UNKNOWN, Kind.MISSING_VALUE)
    assert covered == sorted(covered)
    assert stopped or covered == list(range(len(argv)))


# Section: QEMU's JSON dialect


@pytest.mark.parametrize("text,value", [
    ("{'a': 'b'}", [("a", "b")]), ('{"a": "\\u00e9\\n\'"}', [("a", "é\n'")]),
    ("{'a': 'it\\'s'}", [("a", "it's")]), ("[1, -2.5e3, true, null]", (1, -2500.0, True, None)),
    ('{"a": {"b": [1]}, "a": 2}', [("a", [("b", (1,))]), ("a", 2)]),
])
def test_qjson_reads_qemus_dialect(text: str, value: object) -> None:
    assert qjson.parse(text) == value


@pytest.mark.parametrize("text", ["{'a'}", '{"a": "\\u0000"}', '{"a": 1} x', "{a: 1}", "{'a':",
                                  '{"a": "\\x"}', "[1,]"])
def test_qjson_refuses_what_qemu_refuses(text: str) -> None:
    with pytest.raises(qjson.JSONSyntaxError):
        qjson.parse(text)


# Section: real QEMU as the oracle


def _qemu(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """QEMU with no machine, quit over QMP at once: what it parsed shows in files and errors."""
    assert QEMU is not None
    return subprocess.run(
        (QEMU, "-machine", "none", "-S", "-display", "none", "-nodefaults", "-no-user-config",
         "-qmp", "stdio", *args),
        input='{"execute":"qmp_capabilities"}\n{"execute":"quit"}\n', cwd=cwd,
        capture_output=True, text=True, timeout=30, check=False)


#: (option, value, key, what the parser reads for key, how QEMU shows its own reading).
#: Cross-checked against QEMU 7.2: each row runs the real binary (one ~50 ms run).
ORACLE = [
    ("chardev", "file,id=c,path=a,,b", "path", "a,b", "file"),
    ("serial", "file:s,1", "path", "s,1", "file"),
    ("serial", "tcp:127.0.0.1:0,server=on,wait=off,logfile=lg,,x", "logfile", "lg,x", "file"),
    ("netdev", "user,id=n,guestfwd=tcp:10.0.2.100:1234-file:gf,,x", "guestfwd.path", "gf,x",
     "file"),
    ("object", "memory-backend-file,id=m,size=4096,share=on,mem-path=m,,x", "mem-path", "m,x",
     "file"),
    ("blockdev", "node-name=x,driver=file,filename=f,,g", "filename", "f,g",
     "Could not open 'f,g'"),
    ("drive", "file=d,,e,if=none,format=raw", "file", "d,e", "Could not open 'd,e'"),
    ("acpitable", "data=d,,e", "data", "d,e", "can't open file d,e"),
    ("acpitable", "file=a:b", "file", "a", "can't open file a:"),
    ("acpitable", "zz", "data", "zz", "can't open file zz"),
    ("plugin", "a,,b", "file", "a,b", "Could not load plugin a,b"),
    ("object", "memory-backend-file,,x", "qom-type", "memory-backend-file,x",
     "does not accept value 'memory-backend-file,x'"),
    ("object", "{'qom-type':'secret','id':'s','file':'sf,x'}", "file", "sf,x", "Unable to read sf,x"),
    ("device", "{'driver':'x,y'}", "driver", "x,y", "'x,y' is not a valid device model name"),
    ("chardev", "file,,x,id=c,path=p", "backend", "file,x", "'file,x' is not a valid char driver"),
    ("serial", "COM/../nonexistent", "path", "COM/../nonexistent",
     "Could not open 'COM/../nonexistent'"),
]


@needs_qemu
@pytest.mark.parametrize("option,value,key,reading,shown", ORACLE,
                         ids=[f"-{r[0]} {r[1]}"[:50] for r in ORACLE])
def test_parser_reads_values_as_real_qemu_does(tmp_path: Path, option: str, value: str,
                                               key: str, reading: str, shown: str) -> None:
    assert (key, reading) in option_pairs(option, value)
    out = _qemu(tmp_path, f"-{option}", value)
    if shown == "file":
        assert os.listdir(tmp_path) == [reading], out.stderr
    else:
        assert shown in out.stderr


@pytest.mark.parametrize("option,value,error", [
    ("machine", "none,,x", "Invalid parameter ''"), ("smp", "1,,2", "Invalid parameter ''"),
    ("blockdev", "driver=file,foo", "Expected '=' after parameter 'foo'"),
    ("blockdev", "driver=file,/x", "Invalid parameter '/x'"),
    ("serial", "nosuch:x", "'nosuch:x' is not a valid char driver"),
    ("set", "nodots=x", 'can\'t parse: "nodots=x"'),
    ("display", "vncx", "VNC requires a display argument vnc=<display>"),
    ("qtest", "mon:stdio", "mon: isn't supported in this context"),
])
@needs_qemu
def test_parser_refuses_what_real_qemu_refuses(tmp_path: Path, option: str, value: str,
                                               error: str) -> None:
    with pytest.raises(OptionSyntaxError, match=error.replace("(", r"\(")):
        option_pairs(option, value)
    assert error in _qemu(tmp_path, f"-{option}", value).stderr


@needs_qemu
@pytest.mark.parametrize("arg", ["---S", "-S ", "-drive=x", "-", "--", "-nosuch"])
def test_elements_the_walk_finds_unknown_are_qemus_invalid_options(tmp_path: Path,
                                                                    arg: str) -> None:
    assert parse_argv(["-S", arg])[-1] == Element(1, Kind.UNKNOWN, option_name(arg) or "")
    assert f"{arg}: invalid option" in _qemu(tmp_path, arg).stderr


_name = st.text(alphabet="ab,=:. ", min_size=1, max_size=10).filter(
    lambda s: s not in (".", "..") and not s.startswith(" "))


@needs_qemu
@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(names=st.lists(_name, min_size=4, max_size=4, unique=True))
def test_escaped_file_names_reach_qemu_as_the_parser_reads_them(
        tmp_path_factory: pytest.TempPathFactory, names: list[str]) -> None:
    """One QEMU run per example: QemuOpts (chardev, object) and file: specs create files;
    keyval (-blockdev, opened last) names the file it could not open."""
    cwd = tmp_path_factory.mktemp("oracle")
    args = [
        "-chardev", f"file,id=c0,path={names[0].replace(',', ',,')}",
        "-object", f"memory-backend-file,id=m0,size=4096,share=on,"
                   f"mem-path={names[1].replace(',', ',,')}",
        "-serial", f"file:{names[2]}",
    ]
    blockdev = f"driver=file,node-name=b0,filename={names[3].replace(',', ',,')}"
    read = [dict(option_pairs(args[i].lstrip("-"), args[i + 1])) for i in (0, 2, 4)]
    read.append(dict(option_pairs("blockdev", blockdev)))
    assert [read[0]["path"], read[1]["mem-path"], read[2]["path"], read[3]["filename"]] == names
    out = _qemu(cwd, *args)
    assert sorted(os.listdir(cwd)) == sorted(names[:3]), out.stderr
    # QEMU opens -blockdev before it creates the other files: a run of its own.
    assert f"Could not open '{names[3]}'" in _qemu(cwd, "-blockdev", blockdev).stderr
