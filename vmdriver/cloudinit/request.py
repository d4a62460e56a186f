"""What a face asks of a NoCloud seed: one frozen, validated request.

A :class:`SeedRequest` holds values, never paths to read and never a plain
password, so it can be logged, compared and kept in state. Every check raises
:class:`~vmdriver.errors.SpecError` naming the field, so bad task input becomes
one clear line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Final

import yaml

from vmdriver.cloudinit.password import SHA512_CRYPT
from vmdriver.errors import SpecError

#: RFC 1123 host name label, lower case (what hostnamectl, Kubernetes and DNS agree on).
HOSTNAME_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
#: A variable name a POSIX shell can assign.
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: instance-id: printable, no whitespace; cloud-init keeps it as a directory name.
INSTANCE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
_SSH_KEY = re.compile(
    r"(ssh-(rsa|dss|ed25519)|ecdsa-sha2-nistp(256|384|521)|sk-[a-z0-9@.-]+) [A-Za-z0-9+/=]+( .*)?")
_GUEST_PATH = re.compile(r"/[A-Za-z0-9._/-]*")
_TZ = re.compile(r"[A-Za-z0-9_+-]+(/[A-Za-z0-9_+-]+)*")


class ShareFs(StrEnum):
    """How a host directory reaches the guest."""

    NINEP = "9p"
    VIRTIOFS = "virtiofs"


@dataclass(frozen=True, slots=True)
class Share:
    """A host directory the core attaches under ``tag``; the guest mounts it at ``path``."""

    tag: str
    path: str
    fs: ShareFs = ShareFs.NINEP
    read_only: bool = True

    def __post_init__(self) -> None:
        # QEMU's virtio-9p mount_tag and virtiofs tags: short, no separators.
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,31}", self.tag):
            raise SpecError("a share tag is 1-31 letters, digits, '_' or '-'", where="share tag",
                            value=self.tag)
        if not _GUEST_PATH.fullmatch(self.path) or "/../" in f"{self.path}/" or self.path == "/":
            raise SpecError("a share's guest path is an absolute path below /", where=f"share {self.tag}",
                            value=self.path)


#: Mount tags the core gives the virtio-9p/virtiofs devices of a task's dirs.
TAG_LOCAL: Final = "local"
TAG_ALLOC: Final = "alloc"
TAG_SECRETS: Final = "secrets"
#: Where the guest mounts them; also what NOMAD_TASK_DIR etc. say inside the guest.
GUEST_DIRS: Final[Mapping[str, str]] = MappingProxyType(
    {TAG_LOCAL: "/local", TAG_ALLOC: "/alloc", TAG_SECRETS: "/secrets"})
#: Nomad's env vars that name those dirs, by tag.
_DIR_ENV: Final = {TAG_LOCAL: "NOMAD_TASK_DIR", TAG_ALLOC: "NOMAD_ALLOC_DIR",
                   TAG_SECRETS: "NOMAD_SECRETS_DIR"}


def task_shares(fs: ShareFs = ShareFs.NINEP) -> tuple[Share, ...]:
    """The three task dirs, read-only (a guest must not fill the host's disk)."""
    return tuple(Share(tag, path, fs) for tag, path in GUEST_DIRS.items())


def guest_env(env: Mapping[str, str], shares: tuple[Share, ...] = ()) -> dict[str, str]:
    """The task env as the guest should see it.

    Keys a shell cannot assign are dropped (Nomad passes them to processes, but
    no profile script can). The task dir variables point at the guest mounts.
    """
    out = {k: v for k, v in env.items() if ENV_NAME.fullmatch(k)}
    for share in shares:
        name = _DIR_ENV.get(share.tag)
        if name:
            out[name] = share.path
    return out


def default_hostname(task_name: str, alloc_id: str) -> str:
    """``<task>-<first 8 of alloc id>``, squeezed into an RFC 1123 label."""
    stem = re.sub(r"[^a-z0-9-]+", "-", task_name.lower()).strip("-") or "task"
    suffix = re.sub(r"[^a-z0-9]", "", alloc_id.lower())[:8] or "0"
    stem = stem[: 63 - len(suffix) - 1].rstrip("-") or "task"
    return f"{stem}-{suffix}"


def default_instance_id(alloc_id: str, task_name: str) -> str:
    """One instance-id per allocation and task: a new allocation is a new instance."""
    task = re.sub(r"[^A-Za-z0-9._-]+", "-", task_name).strip("-") or "task"
    return f"nomad-{alloc_id}-{task}"[:128]


def _no_nul(value: str, where: str) -> None:
    if "\0" in value:
        raise SpecError("NUL characters cannot reach the guest", where=where, value=value)


def _check_hostname(hostname: str) -> None:
    if not HOSTNAME_LABEL.fullmatch(hostname):
        raise SpecError("not an RFC 1123 label: 1-63 of a-z, 0-9 and '-', not starting or ending with '-'",
                        where="hostname", value=hostname)


def _check_network_config(text: str) -> None:
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise SpecError(f"network-config is not YAML: {exc}", where="network_config") from exc
    if isinstance(doc, dict) and isinstance(doc.get("network"), dict):
        doc = doc["network"]
    if not isinstance(doc, dict) or doc.get("version") not in (1, 2):
        raise SpecError("network-config must be a mapping with version: 1 or 2", where="network_config")


@dataclass(frozen=True, slots=True, kw_only=True)
class SeedRequest:
    """Everything a NoCloud seed says. Build one per VM start; it validates itself.

    :param instance_id: unique per VM instance (see :func:`default_instance_id`).
    :param hostname: an RFC 1123 label (see :func:`default_hostname`).
    :param cmds: shell commands run once, in order, at the end of first boot.
    :param password_hash: SHA-512 crypt hash for the distribution's default user.
    :param ssh_pwauth: set sshd's PasswordAuthentication; None leaves the image's choice.
    :param ssh_authorized_keys: keys for the default user.
    :param env: variables for login shells and ``cmds`` (see :func:`guest_env`).
    :param shares: host dirs to mount in the guest, in order.
    :param timezone: an IANA zone name such as ``Europe/Berlin``.
    :param user_data: the job's own user-data; merged after (and over) the generated part.
    :param network_config: a NoCloud network-config (v1 or v2 YAML), passed through.
    """

    instance_id: str
    hostname: str
    cmds: tuple[str, ...] = ()
    password_hash: str | None = field(default=None, repr=False)
    ssh_pwauth: bool | None = None
    ssh_authorized_keys: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), hash=False)
    shares: tuple[Share, ...] = ()
    timezone: str | None = None
    user_data: str | None = None
    network_config: str | None = None

    def __post_init__(self) -> None:
        if not INSTANCE_ID.fullmatch(self.instance_id):
            raise SpecError("instance-id: 1-128 of letters, digits, '.', '_', ':', '-'",
                            where="instance_id", value=self.instance_id)
        _check_hostname(self.hostname)
        object.__setattr__(self, "cmds", tuple(self.cmds))
        for i, cmd in enumerate(self.cmds):
            _no_nul(cmd, f"cmds[{i}]")
            if not cmd.strip():
                raise SpecError("empty command", where=f"cmds[{i}]")
        if self.password_hash is not None and not SHA512_CRYPT.fullmatch(self.password_hash):
            # Never echo the value: it may be a plain password put in the wrong field.
            raise SpecError("not a SHA-512 crypt hash ($6$...); hash it with hash_password()",
                            where="password_hash")
        self._check_keys()
        env = dict(self.env)
        for name, value in env.items():
            if not ENV_NAME.fullmatch(name):
                raise SpecError("not a shell variable name", where="env", value=name)
            _no_nul(value, f"env.{name}")
        object.__setattr__(self, "env", MappingProxyType(env))
        object.__setattr__(self, "shares", tuple(self.shares))
        if len({s.tag for s in self.shares}) != len(self.shares):
            raise SpecError("share tags must be unique", where="shares")
        if self.timezone is not None and not _TZ.fullmatch(self.timezone):
            raise SpecError("not a time zone name", where="timezone", value=self.timezone,
                            allowed="IANA names such as UTC or Europe/Berlin")
        if self.user_data is not None:
            _no_nul(self.user_data, "user_data")
        if self.network_config is not None:
            _no_nul(self.network_config, "network_config")
            _check_network_config(self.network_config)

    def _check_keys(self) -> None:
        object.__setattr__(self, "ssh_authorized_keys", tuple(self.ssh_authorized_keys))
        for i, key in enumerate(self.ssh_authorized_keys):
            if "\n" in key or "\r" in key or not _SSH_KEY.fullmatch(key.strip()):
                raise SpecError("not one OpenSSH public key line", where=f"ssh_authorized_keys[{i}]",
                                value=key[:40], allowed="ssh-ed25519 AAAA... [comment]")


def split_keys(text: str) -> tuple[str, ...]:
    """One key per non-empty, non-comment line (a task field may hold several)."""
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
