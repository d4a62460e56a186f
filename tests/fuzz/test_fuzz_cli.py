"""Hostile and broken input through the real CLI entry point, in-process.

Hypothesis generates job files and qemu task configs that each carry at least
one defect: broken HCL, non-UTF-8 bytes, wrong types, unknown keys, values out
of bounds, policy escapes (paths, flags, emulators). Every one must end as
vmdriver's own error: exit status 2, one short ``vmdriver: error:`` line on
stderr, no traceback, and no QEMU process started. 300 + 250 + 60 + 120 examples,
the last with NUL bytes, control and non-ASCII characters where text becomes a URL,
a header, an env value, a port label or a name.
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import string
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import qemu_processes
from vmdriver.cli.main import main

FIELDS = ("image_path", "emulator", "machine_type", "accelerator", "drive_interface",
          "graceful_shutdown", "guest_agent", "port_map", "ports", "args", "image_source",
          "checksum", "host_port", "guest_port")
def fuzz_settings(examples: int) -> settings:
    """Fixed seed (a CI run is reproducible), no deadline (QEMU helpers run per example)."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, Path]]:
    """A state dir, an allowed image dir and a strict host config, shared by all examples."""
    root = Path(tempfile.mkdtemp(prefix="vmdfz-", dir="/tmp"))
    images = root / "images"
    images.mkdir()
    (images / "ok.img").write_bytes(b"\0" * 65536)
    host = root / "host.hcl"
    host.write_text(f'image_paths = ["{images}"]\nemulators_allowlist = ["x86_64"]\n'
                    f'state_dir = "{root / "state"}"\n')
    try:
        yield {"root": root, "images": images, "host": host}
    finally:
        shutil.rmtree(root, ignore_errors=True)


# Section: rendering HCL


def hcl(value: Any) -> str:
    """``value`` as an HCL expression (strings escaped, interpolation disarmed)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value).replace("${", "$${").replace("%{", "%%{")
    if isinstance(value, list):
        return "[" + ", ".join(hcl(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(str(k))} = {hcl(v)}" for k, v in value.items()) + " }"
    raise TypeError(value)


def job_text(config: dict[str, Any], *, resources: str = "", task_extra: str = "",
             group_extra: str = "") -> str:
    body = "\n".join(f"        {k} = {hcl(v)}" for k, v in config.items())
    return f"""job "fz" {{
  group "g" {{
    {group_extra}
    task "t" {{
      driver = "qemu"
      config {{
{body}
      }}
      resources {{
        {resources}
      }}
      {task_extra}
    }}
  }}
}}
"""


# Section: strategies, each guaranteed to yield a defect

scalars = st.one_of(st.integers(-2**70, 2**70), st.booleans(),
                    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(string.ascii_letters, min_size=1,
                                                         max_size=8), inner, max_size=3)),
    max_leaves=6)
not_str = values.filter(lambda v: not isinstance(v, str))
not_bool = values.filter(lambda v: not isinstance(v, bool))
ident = st.text(string.ascii_lowercase + "_", min_size=1, max_size=12)

BAD_ARGS = [
    ["-drive", "file={p}"], ["-kernel", "{p}"], ["-chardev", "file,id=c,path={p}"],
    ["-blockdev", "driver=file,node-name=n,filename={p}"], ["-fw_cfg", "name=opt/x,file={p}"],
    ["-device", "loader,file={p}"], ["-serial", "file:{p}"], ["-netdev", "user,id=n,tftp={p}"],
    ["-virtfs", "local,path={p},mount_tag=x,security_model=none"], ["{p}"],
    ["-object", '{{"qom-type":"secret","id":"s","file":"{p}"}}'], ["-pidfile", "{p}"],
]
REFUSED = ["-readconfig", "-writeconfig", "-set", "-add-fd", "-global", "-monitor", "-qmp",
           "-mon", "-incoming", "-plugin", "-daemonize", "-sandbox", "--readconfig", " -set"]
outside = st.sampled_from(["/etc/shadow", "/proc/self/root/etc/shadow", "/dev/fd/3",
                           "../../../../etc/passwd", "/root/x", "/tmp/../etc/hosts",
                           "/sys/kernel/x", "/var/lib/elsewhere/disk.img"])


@st.composite
def config_defect(draw: st.DrawFn, env: dict[str, Path]) -> tuple[dict[str, Any], str, str]:
    """A qemu task config, resources and task lines with at least one defect."""
    config: dict[str, Any] = {"image_path": "local/disk.img"}
    resources, extra = "", ""
    kind = draw(st.integers(0, 14))
    if kind <= 5:
        _field_or_path_defect(draw, kind, config)
    elif kind in (9, 10, 11):
        resources, extra = _task_defect(draw, kind)
    else:
        _value_defect(draw, kind, config)
    if draw(st.booleans()):
        config.setdefault("guest_agent", draw(st.booleans()))
    del env
    return config, resources, extra


def _field_or_path_defect(draw: st.DrawFn, kind: int, config: dict[str, Any]) -> None:
    """Kinds 0-5: a mistyped or unknown field, no image, a path or flag policy refuses."""
    if kind == 0:
        field = draw(st.sampled_from([f for f in FIELDS if f not in ("port_map", "ports", "args")]))
        config[field] = draw(not_bool if field in ("graceful_shutdown", "guest_agent")
                             else not_str.filter(lambda v: not isinstance(v, int))
                             if field in ("host_port", "guest_port") else not_str)
    elif kind == 1:
        config[draw(ident.filter(lambda k: k not in FIELDS))] = draw(values)
    elif kind == 2:
        del config["image_path"]
    elif kind == 3:
        config["image_path"] = draw(outside)
    elif kind == 4:
        tmpl = draw(st.sampled_from(BAD_ARGS))
        path = draw(outside)
        pre = draw(st.lists(st.sampled_from([("-smp", "2"), ("-vga", "none"), ("-nodefaults",)]),
                            max_size=3))
        config["args"] = [*(a for p in pre for a in p), *(a.format(p=path) for a in tmpl)]
    else:
        config["args"] = [draw(st.sampled_from(REFUSED)), draw(st.text(max_size=10))]


def _value_defect(draw: st.DrawFn, kind: int, config: dict[str, Any]) -> None:
    """Kinds 6-8 and 12-14: a config value outside what the field takes."""
    if kind == 6:
        emu = draw(st.text(max_size=20).filter(
            lambda e: e.strip().removeprefix("qemu-system-") not in ("x86_64", "")))
        config["emulator"] = emu
    elif kind == 7:
        config["accelerator"] = draw(st.text(max_size=10).filter(
            lambda a: a not in ("kvm", "tcg", "auto")))
    elif kind == 8:
        config["args"] = draw(st.one_of(not_str.filter(lambda v: not isinstance(v, list)),
                                        st.lists(not_str, min_size=1, max_size=3)))
    elif kind == 12:
        config["port_map"] = draw(st.dictionaries(ident, values, min_size=1, max_size=3))
    elif kind == 13:
        config["drive_interface"] = draw(st.text(max_size=12).filter(
            lambda d: d not in ("ide", "scsi", "sd", "mtd", "floppy", "pflash", "virtio", "none")))
    else:
        config["machine_type"] = draw(st.text(min_size=1, max_size=20).filter(
            lambda m: not all(c.isascii() and (c.isalnum() or c in "_.,=-") for c in m)))


def _task_defect(draw: st.DrawFn, kind: int) -> tuple[str, str]:
    """Kinds 9-11: (resources lines, task lines) with a value out of bounds."""
    if kind == 9:
        return f"memory = {hcl(draw(st.one_of(st.integers(-10**6, 127), st.integers(2**40, 2**62), st.text(max_size=8), st.booleans())))}", ""  # noqa: E501
    if kind == 10:
        return f"cores = {hcl(draw(st.one_of(st.integers(-100, 0), st.integers(1025, 2**40), st.text(max_size=5))))}", ""  # noqa: E501
    extra = f"kill_timeout = {hcl(draw(st.text(max_size=12).filter(lambda t: not t.strip().isdigit())))}"
    return "", extra + "\nkill_signal = \"SIGNOPE\""


@st.composite
def job_defect(draw: st.DrawFn) -> bytes:
    """A whole job file that is broken as a file or as a job."""
    good = job_text({"image_path": "local/disk.img"})
    kind = draw(st.integers(0, 9))
    if kind == 0:  # truncated
        return good[: draw(st.integers(0, len(good) - 3))].encode()
    if kind == 1:  # unbalanced block with junk inside
        junk = draw(st.text(max_size=40).filter(lambda t: "}" not in t))
        return (good + 'job "x" {\n' + junk).encode()
    if kind == 2:
        return draw(st.binary(min_size=1, max_size=60)).replace(b"job", b"jxb") + b"\xff\xfe"
    if kind == 3:  # arbitrary text: never a single complete qemu job
        return draw(st.text(max_size=80)).replace("job", "jxb").encode()
    if kind == 4:
        return (good + good).encode()  # two job blocks
    if kind == 5:
        count = draw(st.one_of(st.integers(-50, -1), st.integers(65, 10**9), st.text(max_size=4)))
        return good.replace('group "g" {', f'group "g" {{\n count = {hcl(count)}', 1).encode()
    if kind == 6:
        # Text with a digit may spell a valid port ("1"): only digit-free text is a defect.
        port = draw(st.one_of(st.integers(-5, 0), st.integers(65536, 10**7),
                              st.text(max_size=6).filter(lambda t: not any(c.isdigit() for c in t))))
        net = f'network {{\n port "http" {{\n static = {hcl(port)}\n }}\n }}'
        return job_text({"image_path": "local/disk.img"}, group_extra=net).encode()
    if kind == 7:
        junk = draw(st.text(string.ascii_lowercase, min_size=1, max_size=6))
        art = f'artifact {{\n source = "x"\n {junk}x = "y"\n mode = "{junk}"\n }}'
        return job_text({"image_path": "local/disk.img"}, task_extra=art).encode()
    if kind == 8:
        server = draw(st.text(string.ascii_letters + string.digits + ".:", min_size=1,
                              max_size=15).filter(lambda s: not _is_ip(s)))
        net = f'network {{\n dns {{\n servers = [{hcl(server)}]\n }}\n }}'
        return job_text({"image_path": "local/disk.img"}, group_extra=net).encode()
    driver = draw(st.text(string.ascii_lowercase, max_size=8).filter(lambda d: d != "qemu"))
    return good.replace('driver = "qemu"', f"driver = {hcl(driver)}").encode()


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


# Section: running the CLI


def run_cli(env: dict[str, Path], content: bytes, command: str = "argv") -> None:
    """Write ``content`` as a job file, run the CLI in-process, check the error contract."""
    job = env["root"] / "job.hcl"
    job.write_bytes(content)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main([command, str(job), "--host-config", str(env["host"])])
        except SystemExit as exc:  # argparse only; would be a bug here
            status = int(exc.code or 0) + 1000
    text = err.getvalue()
    lines = [line for line in text.splitlines() if line.strip()]
    assert status == 2, f"exit {status} for {content[:300]!r}; stderr: {text[:500]}"
    assert "Traceback" not in text
    assert len(lines) == 1 and lines[0].startswith("vmdriver: error: "), text[:500]
    assert len(lines[0]) < 1200
    # Only QEMUs of this state dir: other test runs may share the machine.
    assert not qemu_processes(str(env["root"])), "a QEMU process was started"


@fuzz_settings(300)
@given(content=job_defect())
def test_malformed_job_files(env: dict[str, Path], content: bytes) -> None:
    run_cli(env, content)


@fuzz_settings(250)
@given(data=st.data())
def test_malformed_task_configs(env: dict[str, Path], data: st.DataObject) -> None:
    config, resources, extra = data.draw(config_defect(env))
    run_cli(env, job_text(config, resources=resources, task_extra=extra).encode())


@fuzz_settings(60)
@given(data=st.data())
def test_run_refuses_before_any_launch(env: dict[str, Path], data: st.DataObject) -> None:
    """`vmdriver run` too: the image is absent, so even a missed defect cannot boot."""
    config, resources, extra = data.draw(config_defect(env))
    run_cli(env, job_text(config, resources=resources, task_extra=extra).encode(), "run")
    leftovers = list((env["root"] / "state").glob("allocs/*/*/local"))
    assert not leftovers, f"task dirs left behind: {leftovers}"


# Section: hostile text in URLs, headers, env values, labels and names

#: Characters that may not appear where each kind of text goes (one is always drawn in).
_POISON = st.sampled_from(["\x00", "\n", "\r", "\x1b", "\x7f", "é", "\u2028", "\ufeff", "/",
                           "\\", "😀"])


@st.composite
def poisoned(draw: st.DrawFn, poison: st.SearchStrategy[str] = _POISON) -> str:
    """Text holding at least one character its place refuses."""
    head = draw(st.text(string.ascii_letters, max_size=6))
    return head + draw(poison) + draw(st.text(max_size=6))


@st.composite
def hostile_job(draw: st.DrawFn) -> str:
    """A job whose URL, header, env value, port label or name holds a character it refuses."""
    kind = draw(st.integers(0, 5))
    good = {"image_path": "local/disk.img"}
    if kind == 0:
        bad = draw(poisoned(st.sampled_from(["\x00", "\n", "\x1b", "é", "😀"])))
        art = f"artifact {{\n source = {_raw('http://127.0.0.1:1/' + bad)}\n }}"
        return job_text(good, task_extra=art)
    if kind == 1:
        name, value = (draw(poisoned()), "v") if draw(st.booleans()) else \
            ("X-A", draw(poisoned(st.sampled_from(["\x00", "\r", "\n", "é", "\x7f"]))))
        art = (f"artifact {{\n source = \"http://127.0.0.1:1/x\"\n headers {{\n"
               f" {_raw(name)} = {_raw(value)}\n }}\n }}")
        return job_text(good, task_extra=art)
    if kind == 2:
        value = draw(st.text(max_size=5)) + "\x00" + draw(st.text(max_size=5))
        return job_text(good, task_extra=f"env {{\n A = {_raw(value)}\n }}")
    if kind == 3:
        net = f"network {{\n port {_raw(draw(poisoned()))} {{}}\n }}"
        return job_text(good, group_extra=net)
    name = draw(poisoned(st.sampled_from(["\x00", "\n", "/", "\x1b", "\x7f", "\\"])))
    text = job_text(good)
    return text.replace('task "t"', f"task {_raw(name)}") if kind == 4 else \
        text.replace('group "g"', f"group {_raw(name)}")


def _raw(text: str) -> str:
    """An HCL string literal holding ``text`` itself (non-ASCII as is, controls escaped)."""
    return json.dumps(text, ensure_ascii=False).replace("${", "$${").replace("%{", "%%{")


@fuzz_settings(120)
@given(data=st.data())
def test_hostile_text_gives_one_line(env: dict[str, Path], data: st.DataObject) -> None:
    """NUL, control and non-ASCII characters where they cannot go: `vmdriver run` says so."""
    text = data.draw(hostile_job())
    run_cli(env, text.encode("utf-8", "surrogatepass"), "run")
