"""Logging set-up: Postfix-like lines, one per event, to stderr (journald) or syslog.

Syslog uses the mail facility, like Postfix, so existing log routing and
tools (pflogsumm-style parsers, fail2ban filters) find the lines where they
look for mail logs.
"""

from __future__ import annotations

import logging
import logging.handlers
import sys
import time

# Postfix's tag is "program/service[pid]:" (postfix/smtp[123]:); ours names the
# module: odmr-bridge/relay[123]:, so log tools filter on "odmr-bridge".
FORMAT = "%(asctime)s odmr-bridge/%(service)s[%(process)d]: %(message)s"
# syslog adds the time stamp and host itself.
SYSLOG_FORMAT = "odmr-bridge/%(service)s[%(process)d]: %(message)s"


class _Service(logging.Filter):
    """Adds ``service``: the logger name without the package (odmr_bridge.relay -> relay)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.service = record.name.removeprefix("odmr_bridge.")
        return True


def seconds(value: float) -> str:
    """A duration as Postfix logs one: 36, 1.2, 0.03, 0."""
    if value >= 10:
        return f"{value:.0f}"
    if value >= 0.1:
        return f"{value:.1f}"
    if value >= 0.005:
        return f"{value:.2f}"
    return "0"


class Occasional:
    """Lets a repeated warning through once per *interval* seconds (a flood is one line)."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last = -interval
        self.suppressed = 0

    def __call__(self) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            self.suppressed += 1
            return False
        self._last = now
        return True


def _handler(target: str, syslog_socket: str) -> logging.Handler:
    if target == "syslog":
        handler: logging.Handler = logging.handlers.SysLogHandler(
            address=syslog_socket, facility=logging.handlers.SysLogHandler.LOG_MAIL)
        handler.setFormatter(logging.Formatter(SYSLOG_FORMAT))
        return handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%b %d %H:%M:%S"))
    return handler


def setup(level: str = "info", target: str = "stderr", syslog_socket: str = "/dev/log") -> None:
    root = logging.getLogger()
    handler = _handler(target, syslog_socket)
    handler.addFilter(_Service())
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiosmtpd logs every command line (AUTH responses included) at INFO and
    # deprecation chatter at WARNING; our own modules log the events.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # watchdog logs every file event at DEBUG: with our log file in a watched
    # folder, each line would log another.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    for name in ("odmr_bridge",):
        logging.getLogger(name).setLevel(level.upper())
