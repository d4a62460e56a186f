"""Merge a user-data blob the way cloud-init 22.4 does; print the result as JSON.

Runs under the host's /usr/bin/python3 (Debian's cloud-init package), not the
venv: cloud-init is the reference implementation, not a dependency of vmdriver.
Usage: python3 ci_merge.py USER-DATA-FILE
"""

import json
import sys
import tempfile

from cloudinit import handlers, helpers, user_data  # type: ignore[import-not-found]
from cloudinit.handlers.cloud_config import CloudConfigPartHandler  # type: ignore[import-not-found]


def main() -> None:
    with open(sys.argv[1], "rb") as f:
        raw = f.read()
    with tempfile.TemporaryDirectory() as tmp:
        paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
        msg = user_data.UserDataProcessor(paths).process(raw)
        handler = CloudConfigPartHandler(paths)
        handler.handle_part(None, handlers.CONTENT_START, None, None, None, None)
        types = []
        for part in msg.walk():
            if part.is_multipart():
                continue
            ctype = part.get_content_type()
            types.append(ctype)
            if ctype == "text/cloud-config":
                payload = part.get_payload(decode=True).decode()
                handler.handle_part(None, ctype, part.get_filename() or "", payload, None, dict(part))
        json.dump({"types": types, "merged": handler.cloud_buf}, sys.stdout)


if __name__ == "__main__":
    main()
