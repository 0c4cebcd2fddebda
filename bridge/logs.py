"""Logging set-up: Postfix-like lines, one per event, to stderr (journald)."""

from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s odmr-bridge/%(name)s[%(process)d]: %(message)s"


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%b %d %H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line (AUTH responses included) at INFO and
    # deprecation chatter at WARNING; our own modules log the events.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    for name in ("bridge",):
        logging.getLogger(name).setLevel(level.upper())
