"""Merge the job's own user-data with the generated cloud-config.

The result is a ``multipart/mixed`` message, cloud-init's way of carrying
several user-data parts. cloud-init merges the cloud-config parts in order,
each into what came before, by the rules in the part's ``merge_how`` key or
its ``Merge-Type`` header (default ``dict(replace)+list()+str()``).

None of those rules lets a *later* part win on scalars while appending lists:
``dict(replace)`` replaces whole lists too (a job's ``runcmd`` would wipe the
task's ``cmds`` and its ``write_files`` the Nomad env), and ``dict(no_replace)``
keeps the earlier scalar. So the job's part(s) come first, unchanged, and the
generated part comes last with

    dict(no_replace,recurse_array,recurse_dict)+list(prepend)+str()

which means: where both set the same scalar (``timezone``, ``ssh_pwauth``,
``password``, ``chpasswd.expire``...) the job's value wins; lists
(``runcmd``, ``write_files``, ``ssh_authorized_keys``, ``bootcmd``) are
joined, generated entries first; nested mappings merge key by key.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
from email.message import EmailMessage
from typing import Final

from vmdriver.errors import SpecError

#: Merge rules of the generated part, merged after the job's (see the module docstring).
GENERATED_MERGE_TYPE: Final = "dict(no_replace,recurse_array,recurse_dict)+list(prepend)+str()"
MERGE_HEADER: Final = "Merge-Type"

# cloud-init's "starts with" table (cloudinit/handlers/__init__.py); longest first.
_STARTS_WITH: Final = (
    ("#cloud-config-archive", "cloud-config-archive"),
    ("#cloud-config-jsonp", "cloud-config-jsonp"),
    ("#cloud-config", "cloud-config"),
    ("#cloud-boothook", "cloud-boothook"),
    ("#include-once", "x-include-once-url"),
    ("#include", "x-include-url"),
    ("#part-handler", "part-handler"),
    ("#upstart-job", "upstart-job"),
    ("## template: jinja", "jinja2"),
    ("#!", "x-shellscript"),
)
_MIME_STARTS: Final = ("content-type:", "mime-version:")


def user_data_subtype(text: str) -> str:
    """The ``text/*`` subtype cloud-init would give this user-data.

    :raise SpecError: cloud-init would silently ignore it.
    """
    for prefix, subtype in _STARTS_WITH:
        if text.startswith(prefix):
            return subtype
    raise SpecError("user_data must start with #cloud-config, #!, #include, #cloud-boothook, "
                    "## template: jinja or be a MIME multipart message", where="user_data",
                    value=text[:30])


def _text_part(text: str, subtype: str, filename: str) -> EmailMessage:
    part = EmailMessage()
    # 8bit keeps the text readable in the seed; base64 only where lines are too long for MIME.
    cte = "8bit" if max((len(line) for line in text.splitlines()), default=0) < 990 else "base64"
    part.set_content(text, subtype=subtype, charset="utf-8", cte=cte, disposition="attachment",
                     filename=filename)
    return part


def _user_parts(text: str) -> list[EmailMessage]:
    """The job's part(s): one text part, or each leaf of its own MIME message."""
    if not text.lower().startswith(_MIME_STARTS):
        return [_text_part(text, user_data_subtype(text), "user-data")]
    msg = email.message_from_string(text, policy=email.policy.default)
    leaves = [p for p in msg.walk() if isinstance(p, EmailMessage) and not p.is_multipart()]
    if not leaves:
        raise SpecError("user_data is a MIME message without parts", where="user_data")
    return leaves


def merge_user_data(generated: str, user: str) -> str:
    """``multipart/mixed``: the job's part(s), then the generated cloud-config."""
    ours = _text_part(generated, "cloud-config", "vmdriver.cfg")
    ours[MERGE_HEADER] = GENERATED_MERGE_TYPE
    parts = [*_user_parts(user), ours]
    outer = EmailMessage()
    outer["MIME-Version"] = "1.0"
    outer.make_mixed()
    for part in parts:
        outer.attach(part)
    # A boundary derived from the content keeps the seed reproducible.
    digest = hashlib.sha256((generated + "\0" + user).encode()).hexdigest()[:32]
    boundary = f"==vmdriver-{digest}=="
    if boundary in generated or boundary in user:
        raise SpecError("user_data contains vmdriver's MIME boundary", where="user_data")
    outer.set_boundary(boundary)
    return outer.as_string(policy=email.policy.default.clone(linesep="\n"))
