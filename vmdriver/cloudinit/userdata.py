"""The cloud-config vmdriver generates from a :class:`SeedRequest`.

Everything is built as Python data and written with PyYAML's ``safe_dump``;
anything that a shell will read (the env file, the profile script, runcmd and
bootcmd lines) is quoted with :func:`shlex.quote`, so values stay data.
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from typing import Any, Final

import yaml

from vmdriver.cloudinit.request import SeedRequest, Share, ShareFs

#: Task env as POSIX sh assignments (``KEY='value'``), for ``set -a; . FILE``.
ENV_FILE: Final = "/etc/nomad/env"
#: Sourced by login shells (Debian's /etc/profile reads /etc/profile.d/*.sh).
PROFILE_SCRIPT: Final = "/etc/profile.d/nomad.sh"
#: How each of the task's ``cmds`` gets the task env before it runs.
ENV_PRELUDE: Final = f"set -a; . {ENV_FILE}; set +a; "
#: Mount options per file system; read-only is added per share.
_MOUNT_OPTS: Final = {
    ShareFs.NINEP: "trans=virtio,version=9p2000.L,msize=262144",
    ShareFs.VIRTIOFS: "",
}
YAML_HEADER: Final = "#cloud-config\n"


# libyaml's emitter is ~20x faster than PyYAML's pure-Python one (the bulk of a
# seed's build time); the representers, and so the output's safety, are the same.
_SafeDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_SafeDumper):  # type: ignore[valid-type,misc]
    """Safe dumper that writes multi-line strings as literal blocks (readable files)."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    # PyYAML falls back to a quoted style by itself where a block cannot hold the value.
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(doc: object) -> str:
    """YAML text for a plain-data document: safe, block style, keys in the order given."""
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True,
                     width=4096)


def meta_data(req: SeedRequest) -> str:
    """NoCloud ``meta-data``: the instance identity and the host name."""
    return dump_yaml({"instance-id": req.instance_id, "local-hostname": req.hostname})


def env_file(env: Mapping[str, str]) -> str:
    """``KEY='value'`` lines, sorted: sourceable by sh with ``set -a``."""
    return "".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(env.items()))


def profile_script(env: Mapping[str, str]) -> str:
    """``export KEY='value'`` lines, so login shells see the task env."""
    lines = ["# Nomad task environment, written by vmdriver through cloud-init.\n"]
    lines += [f"export {name}={shlex.quote(value)}\n" for name, value in sorted(env.items())]
    return "".join(lines)


def mount_command(share: Share) -> str:
    """A bootcmd line: create the mount point and mount the tag unless mounted already.

    The file system the core attached is tried first, then the other one: guest
    kernels differ (Debian's cloud kernel has virtiofs but no 9p; others lack
    virtiofs), and a wrong guess fails at once. A tag that cannot be mounted is
    reported on the console but does not stop the boot.
    """
    path = shlex.quote(share.path)
    order = (share.fs, *(f for f in ShareFs if f is not share.fs))
    mounts = [shlex.join(_mount_argv(share, fs)) for fs in order]
    attempts = " 2>/dev/null || ".join(mounts)
    failed = shlex.quote(f"vmdriver: cannot mount tag {share.tag} at {share.path} ({'/'.join(order)})")
    return f"mkdir -p {path} && {{ mountpoint -q {path} || {attempts} || echo {failed} >&2; }}"


def _mount_argv(share: Share, fs: ShareFs) -> list[str]:
    opts = ",".join(o for o in (_MOUNT_OPTS[fs], "ro" if share.read_only else "") if o)
    return ["mount", "-t", fs.value, *(["-o", opts] if opts else []), share.tag, share.path]


def run_command(cmd: str) -> str:
    """A runcmd line that runs ``cmd`` as given, in its own ``sh``, with the task env."""
    return shlex.join(["sh", "-c", ENV_PRELUDE + cmd])


def cloud_config(req: SeedRequest) -> dict[str, Any]:
    """The generated cloud-config as data (validated by cloud-init's schema in the tests)."""
    cfg: dict[str, Any] = {}
    env = dict(req.env)
    cfg["write_files"] = [
        {"path": ENV_FILE, "content": env_file(env), "owner": "root:root", "permissions": "0644"},
        {"path": PROFILE_SCRIPT, "content": profile_script(env), "owner": "root:root", "permissions": "0644"},
    ]
    if req.shares:
        # bootcmd runs on every boot, before write_files and long before runcmd.
        # cloud-init's `mounts` module cannot do this: it drops any fs_spec that is
        # not a block device or host:path ("Ignoring nonexistent named mount").
        cfg["bootcmd"] = [mount_command(s) for s in req.shares]
    if req.password_hash is not None:
        # Top-level `password` goes to the distro's default user; cloud-init applies a
        # value that looks like a crypt hash with `chpasswd -e`. expire: false, or the
        # first login would demand a new password.
        cfg["password"] = req.password_hash
        cfg["chpasswd"] = {"expire": False}
    if req.ssh_pwauth is not None:
        cfg["ssh_pwauth"] = req.ssh_pwauth
    if req.ssh_authorized_keys:
        # Top-level keys belong to the default user (a `users` entry without a name
        # would be ignored, and one without `default` would drop the default user).
        cfg["ssh_authorized_keys"] = list(req.ssh_authorized_keys)
    if req.timezone is not None:
        cfg["timezone"] = req.timezone
    if req.cmds:
        cfg["runcmd"] = [run_command(c) for c in req.cmds]
    return cfg


def cloud_config_text(req: SeedRequest) -> str:
    """``#cloud-config`` plus the YAML of :func:`cloud_config`."""
    return YAML_HEADER + dump_yaml(cloud_config(req))
