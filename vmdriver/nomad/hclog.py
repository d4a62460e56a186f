"""Log lines on stderr the way go-plugin's host reads them (hclog JSON).

Nomad re-logs each JSON line of a plugin's stderr at its ``@level`` under the
plugin's name, so warnings from the plugin show up as warnings in the agent log.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

_LEVELS = {
    logging.DEBUG: "debug",
    logging.INFO: "info",
    logging.WARNING: "warn",
    logging.ERROR: "error",
    logging.CRITICAL: "error",
}


class HclogFormatter(logging.Formatter):
    """One JSON object per record: ``@level``, ``@message``, ``@timestamp``, ``@module``."""

    def format(self, record: logging.LogRecord) -> str:
        """The JSON line for ``record``."""
        ts = datetime.fromtimestamp(record.created, UTC)
        level = _LEVELS.get(record.levelno, "trace" if record.levelno < logging.DEBUG else "info")
        message = record.getMessage()
        if record.exc_info:
            message += "\n" + self.formatException(record.exc_info)
        data = {
            "@level": level,
            "@message": message,
            # hclog's layout: microseconds and an explicit offset, else Nomad treats
            # the line as plain text.
            "@timestamp": ts.strftime("%Y-%m-%dT%H:%M:%S.%f") + "Z",
            "@module": record.name,
        }
        return json.dumps(data)


def setup(level: int = logging.INFO) -> None:
    """Send every log record to stderr as hclog JSON; stdout stays for the handshake only."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(HclogFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
