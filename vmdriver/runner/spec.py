"""Runner config + VM template → :class:`~vmdriver.spec.VMSpec`.

A template (Jinja2, not VM-Operator's FreeMarker) defines a VM type: it renders the
``vm`` section into a YAML document of spec fields, which is validated as a VMSpec,
so a runner VM goes through the same spec, policy and argv as every other face.

Templates are searched in :data:`TEMPLATE_DIR` (``/opt/vmrunner/templates``, a
ConfigMap in a pod) and then in this package (``standard.j2``). As in VM-Operator,
the template is copied to ``<dataDir>/VM.j2`` on first start and the copy is used
on later starts, unless ``updateTemplate`` is set; a copy made from another
template name than the configured one is refreshed too (VM-Operator kept it).
Templates render in Jinja2's sandbox with undefined names as errors.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2
import yaml
from jinja2.sandbox import SandboxedEnvironment
from pydantic import ValidationError

from vmdriver.errors import SpecError
from vmdriver.host.firmware import Firmware, find_firmware, vars_file
from vmdriver.runner.config import RunnerConfig
from vmdriver.runner.paths import RunnerPaths, machine_uuid
from vmdriver.spec import VMSpec

log = logging.getLogger(__name__)

#: Operator-supplied templates (VM-Operator's path), searched before the package.
TEMPLATE_DIR = Path("/opt/vmrunner/templates")
PACKAGE_TEMPLATES = Path(__file__).resolve().parent / "templates"
_COPY = "VM.j2"


@dataclass(frozen=True)
class HostFacts:
    """What the template may depend on besides the config: decided by the caller."""

    #: This QEMU has SPICE compiled in (Debian's does).
    spice: bool = True
    #: Where to look for templates, in order.
    template_dirs: tuple[Path, ...] = (TEMPLATE_DIR, PACKAGE_TEMPLATES)


def find_template(name: str, dirs: tuple[Path, ...]) -> Path:
    """The first ``dirs/name`` that exists; an error naming every place looked at."""
    for directory in dirs:
        if (directory / name).is_file():
            return directory / name
    raise SpecError(f"template {name!r} not found", where="template",
                    allowed=", ".join(str(d) for d in dirs))


def template_copy(config: RunnerConfig, paths: RunnerPaths, dirs: tuple[Path, ...]) -> Path:
    """The data dir's copy of the template: made on first start, kept unless refreshed."""
    copy, source = paths.data_dir / _COPY, paths.data_dir / (_COPY + ".source")
    recorded = source.read_text(encoding="utf-8").strip() if source.exists() else None
    if copy.exists() and not config.update_template and recorded in (None, config.template):
        return copy
    if copy.exists() and recorded not in (None, config.template):
        log.info("template changed from %r to %r: refreshing %s", recorded, config.template, copy)
    found = find_template(config.template, dirs)
    tmp = copy.with_name(_COPY + ".tmp")
    shutil.copyfile(found, tmp)
    tmp.replace(copy)
    source.write_text(config.template + "\n", encoding="utf-8")
    return copy


def _drives(config: RunnerConfig) -> list[dict[str, Any]]:
    """``vm.drives`` with ``resource`` decided: a regular file is a file, else a device."""
    out = []
    for drive in config.vm.drives:
        path = drive.file or drive.device or drive.resource or ""
        is_device = drive.device is not None or (
            drive.resource is not None and not Path(drive.resource).is_file())
        out.append({"type": drive.type, "path": path, "isDevice": is_device,
                    "bootindex": drive.bootindex})
    return out


def _firmware(config: RunnerConfig, paths: RunnerPaths) -> dict[str, Any] | None:
    fw: Firmware | None = find_firmware(config.vm.firmware)
    if fw is None:
        return None
    return {"code": str(fw.code), "varsTemplate": str(fw.vars_template),
            "vars": str(vars_file(paths.data_dir, fw)), "secure": fw.requires_smm}


def _check_topology(config: RunnerConfig) -> None:
    vm = config.vm
    parts = (vm.sockets, vm.dies_per_socket, vm.cores_per_die, vm.threads_per_core)
    if all(parts):
        total = parts[0] * parts[1] * parts[2] * parts[3]
        if total != vm.maximum_cpus:
            raise SpecError(f"sockets * diesPerSocket * coresPerDie * threadsPerCore is {total}, "
                            f"not maximumCpus ({vm.maximum_cpus})", where="vm")


def template_context(config: RunnerConfig, paths: RunnerPaths, facts: HostFacts,
                     cloud_init_image: Path | None = None) -> dict[str, Any]:
    """What a template sees. Persists the UUID and the EFI vars copy on first start."""
    vm = config.vm
    _check_topology(config)
    if vm.display.spice is not None and not facts.spice:
        log.warning("vm.display.spice is set, but this QEMU has no SPICE: the VM gets no display")
    elif vm.display.spice is not None:
        log.warning("vm.display.spice: the SPICE display works, its agent channel (clipboard) "
                    "and usbRedirects do not yet")
    if vm.network and any(n.net for n in vm.network):
        raise SpecError("user network 'net' is not supported yet (vmdriver's user NIC has no "
                        "guest network setting)", where="vm.network")
    return {
        "vm": vm.model_dump(by_alias=True, mode="json"),
        "uuid": machine_uuid(vm, paths),
        "accelerator": "tcg" if vm.accelerator == "none" else vm.accelerator,
        "firmware": _firmware(config, paths),
        "drives": _drives(config),
        "cloudInit": str(cloud_init_image) if cloud_init_image else None,
        "spice": vm.display.spice is not None and facts.spice,
        "dataDir": str(paths.data_dir),
        "runtimeDir": str(paths.runtime_dir),
    }


def render_template(template: Path, context: dict[str, Any], dirs: tuple[Path, ...]) -> str:
    """Render ``template`` (which may ``{% extends %}`` one in ``dirs``)."""
    loader = jinja2.ChoiceLoader([
        jinja2.FileSystemLoader(str(template.parent)),
        jinja2.FileSystemLoader([str(d) for d in dirs if d.is_dir()]),
    ])
    env = SandboxedEnvironment(loader=loader, undefined=jinja2.StrictUndefined,
                               keep_trailing_newline=True, autoescape=False)
    env.policies["json.dumps_kwargs"] = {"sort_keys": False}
    try:
        return env.get_template(template.name).render(context)
    except jinja2.TemplateSyntaxError as exc:
        raise SpecError(f"template syntax: {exc.message}", where=f"{exc.filename}:{exc.lineno}") from None
    except jinja2.TemplateError as exc:
        raise SpecError(f"template failed: {exc}", where=str(template)) from None


def spec_from_document(text: str, where: str) -> VMSpec:
    """A template's output as a VMSpec; errors name the spec field."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" (output line {mark.line + 1})" if mark is not None else ""
        raise SpecError(f"the template's output is not YAML{line}: "
                        f"{getattr(exc, 'problem', None) or exc}", where=where) from None
    try:
        return VMSpec.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "spec"
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise SpecError(msg, where=f"{where}: {field}",
                        value=json.dumps(err.get("input"))[:80] if "input" in err else None) from None


def runner_spec(config: RunnerConfig, paths: RunnerPaths, facts: HostFacts | None = None,
                cloud_init_image: Path | None = None) -> VMSpec:
    """The VM a runner config describes, through its (copied) template."""
    facts = facts or HostFacts()
    template = template_copy(config, paths, facts.template_dirs)
    context = template_context(config, paths, facts, cloud_init_image)
    text = render_template(template, context, facts.template_dirs)
    spec = spec_from_document(text, f"template {config.template}")
    if config.vm.snapshot:
        spec = spec.model_copy(update={"snapshot": config.vm.snapshot})
    return spec
