"""The pod: kustomize renders valid Kubernetes objects that fit the runner config they carry,
and the image built from Debian packages runs vmdriver, QEMU, swtpm and finds OVMF."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmdriver.runner.config import DEFAULT_CONFIG, RunnerConfig, parse_config
from vmdriver.units import parse_size

REPO = Path(__file__).resolve().parents[2]
KUSTOMIZATIONS = ("deploy/k8s/base", "deploy/k8s/overlays/bridge")
#: The schema version of the kubectl installed here (v1.32); the manifests use only GA APIs.
K8S_VERSION = "1.32.0"
MIB = 1 << 20


def render(path: str) -> list[dict[str, Any]]:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (with its built-in kustomize) is not installed")
    out = subprocess.run(("kubectl", "kustomize", str(REPO / path)), check=True,
                         capture_output=True, text=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def by_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_manifests_are_valid_kubernetes(path: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    docs = render(path)
    assert {d["kind"] for d in docs} == {"ConfigMap", "PersistentVolumeClaim", "Deployment"}
    for doc in docs:
        # strict: an unknown or misplaced field is an error, not silently dropped.
        kv.validate(doc, K8S_VERSION, strict=True)


def runner_setup(path: str) -> tuple[RunnerConfig, dict[str, Any], dict[str, Any]]:
    docs = render(path)
    [deployment] = by_kind(docs, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    config_map = next(d for d in by_kind(docs, "ConfigMap") if d["metadata"]["name"].endswith("-config"))
    config = parse_config(yaml.safe_load(config_map["data"]["config.yaml"]), f"{path} config.yaml")
    return config, pod, container


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_pod_fits_its_runner_config(path: str) -> None:
    config, pod, container = runner_setup(path)
    vm = config.vm
    # The kubelet's SIGKILL comes after the runner's own bounded graceful shutdown.
    assert pod["terminationGracePeriodSeconds"] == vm.powerdown_timeout + 5
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "configMap" in volumes[mounts[str(DEFAULT_CONFIG.parent)]]
    assert "configMap" in volumes[mounts["/opt/vmrunner/templates"]]
    assert "persistentVolumeClaim" in volumes[mounts[str(config.data_dir)]]
    assert "emptyDir" in volumes[mounts[str(config.runtime_dir)]]
    probe = " ".join(container["readinessProbe"]["exec"]["command"])
    assert f"{config.runtime_dir}/status.json" in probe
    devices = {d["devicePath"] for d in container.get("volumeDevices", ())}
    for drive in vm.drives:
        if drive.resource and drive.resource.startswith("/dev/"):
            assert drive.resource in devices
    # Memory: the guest's RAM plus QEMU's headroom (192 MiB + RAM/8 + 4 MiB per vCPU).
    ram = vm.maximum_ram or 1 << 30
    need = ram + 192 * MIB + ram // 8 + 4 * MIB * vm.maximum_cpus
    limits, requests = container["resources"]["limits"], container["resources"]["requests"]
    assert parse_size(limits["memory"]) >= need and requests["memory"] == limits["memory"]
    for device in ("squat.ai/kvm", "squat.ai/tun"):
        assert limits[device] == "1"
    if any(n.type == "tap" for n in vm.network):
        assert pod.get("hostNetwork") is True
        assert "NET_ADMIN" in container["securityContext"]["capabilities"].get("add", [])


# Section: the image


def podman_run(image: str, *argv: str, entrypoint: str = "") -> subprocess.CompletedProcess[str]:
    # runc with explicit limits: podman's default rlimits (nproc, nofile) are above what
    # this host lets a container set.
    cmd = ["podman", "run", "--rm", "--runtime", "runc", "--network", "none",
           "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return subprocess.run((*cmd, image, *argv), capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def image() -> str:
    for tool in ("buildah", "podman", "debootstrap", "runc"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed: the image cannot be built or run here")
    # Cached by content: a second run with the same tree takes about a second.
    built = subprocess.run(("bash", str(REPO / "deploy/build-image.sh")), capture_output=True,
                           text=True, timeout=1800, check=False)
    assert built.returncode == 0, built.stderr[-2000:]
    ref = built.stdout.strip().splitlines()[-1]
    probe = podman_run(ref, "true", entrypoint="/bin/sh")
    if probe.returncode != 0 and "OCI" in probe.stderr:
        pytest.skip(f"podman cannot start containers here: {probe.stderr.strip().splitlines()[-1]}")
    return ref


def missing_module(stderr: str) -> str:
    """A readable reason when the image lacks a Python module vmdriver imports."""
    for line in stderr.splitlines():
        if line.startswith("ModuleNotFoundError"):
            return (f"{line}: the image installs what pyproject.toml's dependencies list, "
                    "so that list misses it")
    return stderr[-2000:]


@pytest.mark.e2e
def test_image_runs_vmdriver_and_has_the_vm_tools(image: str) -> None:
    version = podman_run(image, "--version", entrypoint="vmdriver")
    assert version.returncode == 0, missing_module(version.stderr)
    assert version.stdout.startswith("vmdriver ")
    tools = podman_run(image, "-c", "qemu-system-x86_64 --version && swtpm --version && "
                       "command -v swtpm_setup mformat qemu-img && cat /etc/qemu/bridge.conf",
                       entrypoint="/bin/sh")
    assert tools.returncode == 0, tools.stderr
    assert "QEMU emulator version" in tools.stdout and "TPM emulator" in tools.stdout
    assert "allow all" in tools.stdout
    firmware = podman_run(image, "-c", "from vmdriver.host.firmware import find_firmware as f; "
                          "print(*(f(k).code for k in ('uefi', 'uefi-4m', 'secure', 'secure-4m')))",
                          entrypoint="/opt/vmdriver/bin/python")
    assert firmware.returncode == 0, firmware.stderr
    assert firmware.stdout.split() == ["/usr/share/OVMF/OVMF_CODE.fd", "/usr/share/OVMF/OVMF_CODE_4M.fd",
                                       "/usr/share/OVMF/OVMF_CODE.secboot.fd",
                                       "/usr/share/OVMF/OVMF_CODE_4M.secboot.fd"]


@pytest.mark.e2e
def test_image_entrypoint_is_the_runner(image: str) -> None:
    inspect = subprocess.run(("podman", "image", "inspect", "--format", "{{json .Config.Entrypoint}}",
                              image), capture_output=True, text=True, check=True)
    assert inspect.stdout.strip() == '["vmdriver","runner"]'
    helped = podman_run(image, "--help")
    assert helped.returncode == 0 and "-c" in helped.stdout, missing_module(helped.stderr)
    assert "/etc/opt/vmrunner/config.yaml" in helped.stdout


def test_readiness_probe_reads_the_status_file(tmp_path: Path) -> None:
    """The probe command of the manifest, run against status files the runner writes."""
    import sys

    from vmdriver.runner.status import RunState, Status, write_status

    config, _, container = runner_setup(KUSTOMIZATIONS[0])
    argv = container["readinessProbe"]["exec"]["command"]
    assert argv[0] == "/opt/vmdriver/bin/python"  # the image's venv
    local = [sys.executable, *(a.replace(str(config.runtime_dir), str(tmp_path)) for a in argv[1:])]
    status = tmp_path / "status.json"
    assert subprocess.run(local, capture_output=True, check=False).returncode != 0  # no file yet
    for state, ready in ((RunState.BOOTING, False), (RunState.BOOTED, True), (RunState.TERMINATING, False)):
        write_status(status, Status(state=state))
        assert (subprocess.run(local, capture_output=True, check=False).returncode == 0) is ready, state


@pytest.mark.e2e
def test_image_has_the_standard_template(image: str) -> None:
    """The wheel carries the runner's templates (package data), so `template: standard.j2` works."""
    found = podman_run(image, "-c", "from vmdriver.runner.spec import PACKAGE_TEMPLATES as t; "
                       "print((t / 'standard.j2').is_file())", entrypoint="/opt/vmdriver/bin/python")
    assert found.returncode == 0, missing_module(found.stderr)
    assert found.stdout.strip() == "True", (
        "standard.j2 is not in the installed package: pyproject.toml's "
        "[tool.setuptools.package-data] must list runner/templates/*.j2")
