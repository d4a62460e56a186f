"""`vmdriver runner [-c FILE]`: one VM for a pod, in the style of VM-Operator's runner.

Bad input (the config file, its template, the spec the template renders) is one
line on stderr and exit status 2 before anything starts; otherwise the exit status
is QEMU's.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import subprocess
import sys
from pathlib import Path

from vmdriver.errors import VmdriverError
from vmdriver.host.config import DEFAULT_HOST_CONFIG, HostConfig, load_host_config

#: VM-Operator's paths (repeated here so `vmdriver --help` imports no runner code).
DEFAULT_CONFIG = Path("/etc/opt/vmrunner/config.yaml")
TEMPLATE_DIR = Path("/opt/vmrunner/templates")


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``runner`` subcommand's options."""
    p = sub.add_parser("runner", help="run one VM from a VM-Operator style runner config "
                       "(see docs/runner.md)")
    p.add_argument("-c", "--config", type=Path, default=DEFAULT_CONFIG, metavar="FILE",
                   help=f"the runner config (default: {DEFAULT_CONFIG})")
    p.add_argument("--template-dir", type=Path, action="append", default=[], metavar="DIR",
                   help=f"search templates here first (then {TEMPLATE_DIR}, then the package's)")
    p.add_argument("--host-config", type=Path, metavar="FILE",
                   help=f"operator policy (default: {DEFAULT_HOST_CONFIG} if it exists)")
    p.add_argument("--console", type=Path, metavar="FILE",
                   help="append the serial console to FILE instead of stdout")


def _has_spice() -> bool:
    """This QEMU was built with SPICE (Debian's is; some distributions' are not)."""
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None:
        return False
    out = subprocess.run((qemu, "-spice", "help"), capture_output=True, text=True, timeout=10,
                         check=False, stdin=subprocess.DEVNULL)
    return "no spice" not in (out.stderr + out.stdout).lower() and out.returncode == 0


def _host(args: argparse.Namespace) -> HostConfig:
    """The operator's host config, or the defaults (its ``jail`` setting applies either
    way: CD images a config change names reach a jailed QEMU as fds)."""
    path: Path | None = args.host_config
    if path is None and DEFAULT_HOST_CONFIG.exists():
        path = DEFAULT_HOST_CONFIG
    if path:
        return load_host_config(path)
    return HostConfig()


async def _run(args: argparse.Namespace) -> int:
    # The runner's modules load only for this command.
    from vmdriver.runner.config import load_config
    from vmdriver.runner.launch import launch_request, runner_vm_spec
    from vmdriver.runner.loop import Runner
    from vmdriver.runner.paths import prepare_dirs, resolve_paths
    from vmdriver.runner.spec import PACKAGE_TEMPLATES, HostFacts
    from vmdriver.runtime.supervisor import Supervisor

    config = load_config(args.config)
    paths = resolve_paths(config)
    facts = HostFacts(spice=config.vm.display.spice is not None and _has_spice(),
                      template_dirs=(*args.template_dir, TEMPLATE_DIR, PACKAGE_TEMPLATES))
    prepare_dirs(paths)  # the template copy, UUID and EFI vars live in the data dir
    spec = runner_vm_spec(config, paths, facts, args.config.stat().st_mtime)
    kwargs = {"stdout": args.console} if args.console else {}
    request = launch_request(config, paths, spec, **kwargs)
    return await Runner(args.config, config, paths, request, Supervisor(_host(args))).run()


def cmd_runner(args: argparse.Namespace) -> int:
    """Run the VM until it ends; QEMU's exit code, 2 for bad input."""
    # A pod's log is the runner's: say what happens (states, changes) by default.
    logging.getLogger("vmdriver.runner").setLevel(logging.INFO)
    try:
        return asyncio.run(_run(args))
    except VmdriverError as exc:
        sys.stderr.write(f"vmdriver runner: error: {exc}\n")
        return exc.exit_status
    except KeyboardInterrupt:
        return 130
