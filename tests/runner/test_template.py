"""The standard template: config → spec → argv, compared with golden files, checked by
the args policy, and accepted by the real QEMU."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vmdriver.errors import SpecError
from vmdriver.host.config import HostConfig
from vmdriver.policy.args import check_args
from vmdriver.qemu.argv import DriveSource, NicFds, RenderContext, render_argv
from vmdriver.runner.config import load_config, parse_config
from vmdriver.runner.paths import RunnerPaths, prepare_dirs
from vmdriver.runner.spec import PACKAGE_TEMPLATES, HostFacts, runner_spec, template_copy
from vmdriver.spec import FileMedium, TapNic, VMSpec

GOLDEN = Path(__file__).resolve().parent / "golden"
CASES = sorted(p.name.removesuffix(".config.yaml") for p in GOLDEN.glob("*.config.yaml"))
FACTS = HostFacts(spice=True, template_dirs=(PACKAGE_TEMPLATES,))
#: Stands for the test's temporary data dir in golden files.
DATA = "/var/local/vm-data"


def make_paths(tmp: Path) -> RunnerPaths:
    paths = RunnerPaths(data_dir=tmp / "data", runtime_dir=tmp / "run")
    prepare_dirs(paths)
    return paths


def context(spec: VMSpec, runtime: Path) -> RenderContext:
    """A fixed host: drives by path, taps as fds 40+ (what the runtime would hand over)."""
    drives = {d.id: DriveSource(d.medium.path, d.medium.format or "raw")
              for d in spec.drives if isinstance(d.medium, FileMedium)}
    taps = {n.id: NicFds(40 + i) for i, n in enumerate(spec.nics) if isinstance(n, TapNic)}
    return RenderContext(binary=Path("/usr/bin/qemu-system-x86_64"), accelerator="tcg",
                         runtime_dir=runtime, qmp_socket=runtime / "monitor.sock",
                         qga_socket=runtime / "org.qemu.guest_agent.0", drives=drives,
                         nic_fds=taps, qmp_fd=3, sandbox=True, spice=True)


def check_golden(got: str, golden: Path, request: pytest.FixtureRequest) -> None:
    if request.config.getoption("--regen-golden"):
        golden.write_text(got)
    assert golden.exists(), f"{golden.name} is missing; create it with --regen-golden and review it"
    assert got == golden.read_text(), f"{golden.name} changed; rerun with --regen-golden and review"


@pytest.mark.parametrize("case", CASES)
def test_standard_template_golden(case: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not Path("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd").exists():
        pytest.skip("Debian's ovmf is not installed: the golden files name its files")
    config = load_config(GOLDEN / f"{case}.config.yaml")
    paths = make_paths(tmp_path)
    spec = runner_spec(config, paths, FACTS)
    # Everything a template puts in args passes the same policy as a job's args.
    check_args(spec.args, HostConfig(state_dir=tmp_path))
    text = spec.model_dump_json(indent=1, exclude_unset=True).replace(str(paths.data_dir), DATA)
    check_golden(text + "\n", GOLDEN / f"{case}.spec.json", request)
    argv = render_argv(spec, context(spec, Path("/run/vmrunner")))
    check_golden("\n".join(argv).replace(str(paths.data_dir), DATA) + "\n", GOLDEN / f"{case}.argv",
                 request)


def test_golden_spec_facts() -> None:
    """What the golden files must hold, so a regeneration cannot silently lose it."""
    desktop = VMSpec.model_validate_json((GOLDEN / "desktop.spec.json").read_text())
    assert desktop.firmware.kind == "uefi-secure" and desktop.machine_type == "q35"
    assert desktop.firmware.vars == f"{DATA}/fw-vars.fd" and desktop.tpm is not None
    assert [d.id for d in desktop.drives] == ["cd0", "cd1", "disk0"]
    assert (desktop.resources.memory_mib, desktop.resources.max_memory_mib) == (6144, 8192)
    assert (desktop.resources.cores, desktop.cpu.max_vcpus) == (1, 4)
    assert desktop.balloon and desktop.guest_agent and desktop.display.kind == "spice"
    assert desktop.shutdown.via_agent and desktop.shutdown.timeout_s == 300
    assert desktop.shutdown.powerdown_confirm_s == 5  # VM-Operator's POWERDOWN wait
    argv = (GOLDEN / "desktop.argv").read_text().splitlines()
    for device in ("usb-tablet,bus=usb.0", "virtio-rng-pci,rng=rng0", "virtio-balloon-pci,id=balloon0"):
        assert device in argv
    server = VMSpec.model_validate_json((GOLDEN / "server.spec.json").read_text())
    assert server.firmware.kind == "bios" and server.accelerator == "tcg"
    assert server.cpu.sockets == 2 and server.drives[0].medium is None  # the empty CD tray


def test_no_spice_in_qemu_means_no_spice(tmp_path: Path) -> None:
    config = load_config(GOLDEN / "desktop.config.yaml")
    facts = HostFacts(spice=False, template_dirs=(PACKAGE_TEMPLATES,))
    spec = runner_spec(config, make_paths(tmp_path), facts)
    assert spec.display.kind == "serial" and not any("spicevmc" in a for a in spec.args)


def test_template_copied_once_and_refreshed_on_request(tmp_path: Path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    (own / "mine.j2").write_text("name: one\n")
    paths = make_paths(tmp_path)
    dirs = (own, PACKAGE_TEMPLATES)
    mine = parse_config({"/Runner": {"template": "mine.j2", "vm": {"name": "t"}}}, "c")
    copy = template_copy(mine, paths, dirs)
    assert copy == paths.data_dir / "VM.j2" and copy.read_text() == "name: one\n"
    (own / "mine.j2").write_text("name: two\n")
    assert template_copy(mine, paths, dirs).read_text() == "name: one\n"  # the copy is kept
    update = parse_config({"/Runner": {"template": "mine.j2", "updateTemplate": True,
                                       "vm": {"name": "t"}}}, "c")
    assert template_copy(update, paths, dirs).read_text() == "name: two\n"
    # Another template name than the copy came from: refreshed, not silently kept.
    standard = parse_config({"/Runner": {"vm": {"name": "t"}}}, "c")
    standard_text = (PACKAGE_TEMPLATES / "standard.j2").read_text()
    assert template_copy(standard, paths, dirs).read_text() == standard_text
    with pytest.raises(SpecError, match=r"template 'nope\.j2' not found"):
        template_copy(parse_config({"/Runner": {"template": "nope.j2", "vm": {"name": "u"}}}, "c"),
                      make_paths(tmp_path / "other"), dirs)


def test_operator_template_extends_the_standard_one(tmp_path: Path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    (own / "desktop.j2").write_text('{% extends "standard.j2" %}\n')
    config = parse_config({"/Runner": {"template": "desktop.j2",
                                       "vm": {"name": "t", "firmware": "bios"}}}, "c")
    spec = runner_spec(config, make_paths(tmp_path), HostFacts(template_dirs=(own, PACKAGE_TEMPLATES)))
    assert spec.name == "t" and spec.balloon


@pytest.mark.parametrize(("template", "expected"), [
    ("{{ nope }}", "template failed: 'nope' is undefined"),
    ("{% if %}", "template syntax: Expected an expression"),
    ("name: [x", "the template's output is not YAML"),
    ("name: t\nmachine_type: 'bad type'", "template bad.j2: machine_type: String should match pattern"),
    ("name: t\nvcpus: 2", "template bad.j2: vcpus: Extra inputs are not permitted"),
    ("{{ ''.__class__.__mro__ }}", "template failed: access to attribute '__class__'"),
])
def test_template_errors_are_one_line(template: str, expected: str, tmp_path: Path) -> None:
    own = tmp_path / "templates"
    own.mkdir()
    (own / "bad.j2").write_text(template)
    config = parse_config({"/Runner": {"template": "bad.j2",
                                       "vm": {"name": "t", "firmware": "bios"}}}, "c")
    with pytest.raises(SpecError) as info:
        runner_spec(config, make_paths(tmp_path), HostFacts(template_dirs=(own,)))
    assert expected in str(info.value) and "\n" not in str(info.value)


def test_topology_must_match_maximum_cpus(tmp_path: Path) -> None:
    vm = {"name": "t", "firmware": "bios", "maximumCpus": 4, "sockets": 1, "diesPerSocket": 1,
          "coresPerDie": 2, "threadsPerCore": 1}
    config = parse_config({"/Runner": {"vm": vm}}, "c")
    with pytest.raises(SpecError, match=r"is 2, not maximumCpus \(4\)"):
        runner_spec(config, make_paths(tmp_path), FACTS)


def qmp(path: Path, command: str) -> dict[str, object]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(str(path))
        f = s.makefile("rw")
        json.loads(f.readline())
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}) + "\n")
            f.flush()
            while "event" in (reply := json.loads(f.readline())):
                pass
        result: dict[str, object] = reply
        return result


@pytest.mark.e2e
def test_qemu_accepts_the_standard_argv(state_dir: Path) -> None:
    """The desktop case (secure boot, TPM, SPICE, USB, RNG...) starts in a real QEMU, paused."""
    if shutil.which("qemu-system-x86_64") is None or shutil.which("swtpm") is None:
        pytest.skip("qemu-system-x86_64 and swtpm are needed")
    config = load_config(GOLDEN / "desktop.config.yaml")
    config = config.model_copy(update={"vm": config.vm.model_copy(update={
        "network": (config.vm.network[0].model_copy(update={"type": "user", "bridge": None}),),
        "drives": (), "accelerator": "tcg"})})
    paths = make_paths(state_dir)
    spec = runner_spec(config, paths, FACTS)
    from vmdriver.qemu.sidecars import swtpm as swtpm_helper

    helper = swtpm_helper("2.0", paths.runtime_dir, paths.data_dir)
    for d in helper.state_dirs:
        d.mkdir(parents=True, exist_ok=True)
    swtpm = subprocess.Popen(helper.argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + helper.start_timeout_s  # a first start runs swtpm_setup
    while helper.ready_socket and not helper.ready_socket.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    ctx = context(spec, paths.runtime_dir)
    ctx = RenderContext(**{**ctx.__dict__, "qmp_fd": None, "sandbox": False})
    argv = render_argv(spec, ctx)
    qemu = subprocess.Popen((*argv, "-display", "none"), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not ctx.qmp_socket.exists() and qemu.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert qemu.poll() is None, qemu.stderr.read().decode() if qemu.stderr else ""
        assert qmp(ctx.qmp_socket, "query-status")["return"] == {
            "status": "prelaunch", "singlestep": False, "running": False}
    finally:
        for p in (qemu, swtpm):
            if p.poll() is None:
                p.kill()
            p.wait()
        if qemu.stderr:
            qemu.stderr.close()
