"""SHA-512 crypt hashes for the guest's default user.

The plain password is hashed as soon as a face reads it, so only the hash ever
reaches a :class:`~vmdriver.cloudinit.request.SeedRequest`, the seed, logs or
state. Hashing runs ``openssl passwd -6 -stdin``: OpenSSL is on every Debian
host, is maintained, salts from its CSPRNG, and the password travels over a
pipe, never in an argv that ``ps`` could show. (Python's ``crypt`` module is
deprecated and gone in 3.13; passlib is unmaintained and imports it.)
"""

from __future__ import annotations

import re
import shutil
import subprocess

from vmdriver.errors import HostError, SpecError

#: What cloud-init 22.4's set_passwords treats as a hash (and ``chpasswd -e`` accepts):
#: ``$6$[rounds=N$]salt$86-char digest``.
SHA512_CRYPT = re.compile(r"\$6\$(rounds=[0-9]{4,9}\$)?[./A-Za-z0-9]{1,16}\$[./A-Za-z0-9]{86}")

_TIMEOUT_S = 10.0


def hash_password(plain: str, *, where: str = "default_user_password") -> str:
    """Return the SHA-512 crypt hash (``$6$...``) of ``plain`` with a random salt.

    :raise SpecError: the password is empty or holds a newline or NUL (neither
        survives ``chpasswd`` nor a login prompt).
    :raise HostError: ``openssl`` is missing or failed.
    """
    if not plain:
        raise SpecError("the password is empty", where=where)
    if any(c in plain for c in "\n\r\0"):
        # The value is never echoed back: it is a secret.
        raise SpecError("the password must not contain a newline, carriage return or NUL", where=where)
    return _openssl_passwd(plain, salt=None)


def verify_password(plain: str, hashed: str) -> bool:
    """True if ``hashed`` (a ``$6$`` hash) is the hash of ``plain``."""
    if not SHA512_CRYPT.fullmatch(hashed):
        return False
    parts = hashed.split("$")
    if len(parts) != 4:
        # "$6$rounds=N$salt$digest": openssl passwd has no rounds option.
        raise SpecError("cannot verify a hash with an explicit rounds= parameter", where="password hash")
    salt = parts[2]
    return _openssl_passwd(plain, salt=salt) == hashed


def _openssl_passwd(plain: str, *, salt: str | None) -> str:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise HostError("openssl is needed to hash the default user's password (apt-get install openssl)")
    argv = [openssl, "passwd", "-6", "-stdin"]
    if salt is not None:
        argv[3:3] = ["-salt", salt]
    try:
        proc = subprocess.run(argv, input=plain + "\n", capture_output=True, text=True,
                              timeout=_TIMEOUT_S, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise HostError(f"openssl passwd failed: {exc}") from exc
    hashed = proc.stdout.strip()
    if proc.returncode != 0 or not SHA512_CRYPT.fullmatch(hashed):
        raise HostError(f"openssl passwd failed: {proc.stderr.strip() or 'no hash printed'}")
    return hashed
