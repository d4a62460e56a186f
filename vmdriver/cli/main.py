"""The `vmdriver` command.

Every error vmdriver raises on purpose becomes one line on stderr and the
error's exit status (2 for bad input); a traceback means a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from vmdriver import __version__
from vmdriver.errors import VmdriverError
from vmdriver.host.config import DEFAULT_HOST_CONFIG, HostConfig, load_host_config
from vmdriver.jobfile.hostcheck import check_host

err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def load_host(args: argparse.Namespace) -> HostConfig:
    """The host config from ``--host-config``, the default file, or defaults."""
    path: Path | None = args.host_config
    if path is None and DEFAULT_HOST_CONFIG.exists():
        path = DEFAULT_HOST_CONFIG
    host = load_host_config(path) if path else HostConfig()
    if getattr(args, "state_dir", None):
        host = host.model_copy(update={"state_dir": args.state_dir})
    check_host(host, str(path) if path else "host config")
    return host


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vmdriver", description="Run QEMU virtual machines as tasks.")
    p.add_argument("--version", action="version", version=f"vmdriver {__version__}")
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--host-config", type=Path, metavar="FILE",
                        help=f"operator config (default: {DEFAULT_HOST_CONFIG} if it exists)")
        sp.add_argument("--state-dir", type=Path, metavar="DIR",
                        help="where task dirs and sockets live (overrides the host config)")

    run = sub.add_parser("run", help="run the qemu tasks of a Nomad job file")
    run.add_argument("job", type=Path, metavar="JOB.hcl")
    run.add_argument("--ready", metavar="REGEX",
                     help="print a line and keep running once the console matches REGEX")
    run.add_argument("--quiet", action="store_true", help="do not echo the serial console")
    run.add_argument("--keep-volumes", action="store_true",
                     help="keep the storage pool volumes of virt tasks when the run ends")
    run.add_argument("--metrics", metavar="ADDR",
                     help="serve Prometheus metrics on ADDR (HOST:PORT), see docs/metrics.md")
    common(run)

    argv = sub.add_parser("argv", help="print the QEMU argv of each qemu task of a job file")
    argv.add_argument("job", type=Path, metavar="JOB.hcl")
    argv.add_argument("--json", action="store_true", help="print JSON arrays")
    common(argv)

    fp = sub.add_parser("fingerprint", help="what this host offers: emulators, versions, KVM")
    fp.add_argument("--json", action="store_true")
    fp.add_argument("--refresh", action="store_true", help="probe KVM again")
    common(fp)

    stop = sub.add_parser("stop", help="stop running VMs started by `vmdriver run`")
    stop.add_argument("target", nargs="?", help="alloc id prefix, task name or job name")
    stop.add_argument("--all", action="store_true", help="stop every VM in the state dir")
    stop.add_argument("--timeout", type=float, help="seconds to wait (default: kill_timeout)")
    common(stop)

    from vmdriver.cli.guest import add_parsers

    add_parsers(sub, common)

    ps = sub.add_parser("ps", help="list VMs running from the state dir")
    ps.add_argument("--json", action="store_true")
    common(ps)

    plugin = sub.add_parser("nomad-plugin", help="serve as a Nomad task driver plugin "
                            "(started by Nomad's client; see docs/nomad.md)")
    plugin.add_argument("--name", default="vmdriver",
                        help="driver name jobs use in driver = \"...\" (default: vmdriver)")

    from vmdriver.cli.runner import add_parser as add_runner
    from vmdriver.cli.snapshot import add_parsers as add_snapshot_parsers

    add_snapshot_parsers(sub, common)

    add_runner(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `vmdriver` command."""
    args = _parser().parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="vmdriver: %(levelname)s: %(message)s",
                        stream=sys.stderr)
    if args.command == "nomad-plugin":
        from vmdriver.nomad.server import serve

        return serve(args.name)
    if args.command == "runner":
        from vmdriver.cli.runner import cmd_runner

        return cmd_runner(args)
    from vmdriver.cli import commands, guest, snapshot

    handler = {
        "run": commands.cmd_run, "argv": commands.cmd_argv, "fingerprint": commands.cmd_fingerprint,
        "stop": commands.cmd_stop, "ps": commands.cmd_ps,
        "exec": guest.cmd_exec, "signal": guest.cmd_signal, **snapshot.HANDLERS,
    }[args.command]
    try:
        host = load_host(args)
        result = handler(args, host)
        if asyncio.iscoroutine(result):
            return int(asyncio.run(result))
        assert isinstance(result, int)
        return result
    except VmdriverError as exc:
        err_console.print(f"vmdriver: error: {exc}", markup=False, soft_wrap=True)
        return exc.exit_status
    except KeyboardInterrupt:
        return 130


def print_json(data: object) -> None:
    """JSON to stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    sys.exit(main())
