"""Merge the job's own user-data with the generated cloud-config.

The result is a ``multipart/mixed`` message, cloud-init's way of carrying
several user-data parts. The generated part comes first and the job's part(s)
last. cloud-init merges cloud-config parts in order, each into what came
before, with the merge rules named by the part's ``Merge-Type`` header (or its
own ``merge_how`` key, which wins over the header). vmdriver gives each
cloud-config part of the job, unless it says otherwise,

    dict(recurse_array,recurse_dict,replace)+list(append)+str()

so both apply: lists such as ``runcmd``, ``write_files`` or
``ssh_authorized_keys`` are appended (generated entries first) and, where both
set the same scalar key, the job's value wins.
"""

from __future__ import annotations

import email
import email.policy
import hashlib
from email.message import EmailMessage
from typing import Final

from vmdriver.errors import SpecError

#: Merge rules for the job's cloud-config parts (see the module docstring).
USER_MERGE_TYPE: Final = "dict(recurse_array,recurse_dict,replace)+list(append)+str()"
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
    """``multipart/mixed``: the generated cloud-config, then the job's part(s)."""
    parts: list[EmailMessage] = [_text_part(generated, "cloud-config", "vmdriver.cfg")]
    for part in _user_parts(user):
        if part.get_content_type() == "text/cloud-config" and MERGE_HEADER not in part:
            part[MERGE_HEADER] = USER_MERGE_TYPE
        parts.append(part)
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
