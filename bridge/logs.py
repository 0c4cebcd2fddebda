"""Logging set-up: Postfix-like lines, one per event, to stderr (journald) or syslog.

Syslog uses the mail facility, like Postfix, so existing log routing and
tools (pflogsumm-style parsers, fail2ban filters) find the lines where they
look for mail logs.
"""

from __future__ import annotations

import atexit
import logging
import logging.handlers
import queue
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


class _Handoff(logging.handlers.QueueHandler):
    """Hands each record to the writer thread as it is: formatting, the write and
    its system call happen there, off the event loop (Postfix's daemons hand
    their lines to syslogd the same way)."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        return record


class _Writer(logging.handlers.QueueListener):
    """Writes queued lines in batches: when the queue runs dry it waits a few
    milliseconds before blocking, so under load it wakes (and takes the GIL
    from the event loop) once per batch, not once per line."""

    PAUSE = 0.005

    def __init__(self, lines: queue.SimpleQueue[logging.LogRecord],
                 handler: logging.Handler) -> None:
        super().__init__(lines, handler)
        self.lines = lines

    def dequeue(self, block: bool) -> logging.LogRecord:
        try:
            return self.lines.get_nowait()
        except queue.Empty:
            time.sleep(self.PAUSE)
            return self.lines.get(block)


_writer: logging.handlers.QueueListener | None = None


def _collect_only_what_lines_show() -> None:
    """A line shows the time, the module and the process ID: skip what the
    logging HOWTO's "Optimization" section lists as avoidable for such
    lines (the caller's file and line, found by walking the stack for every
    record; the thread and the multiprocessing names)."""
    logging._srcfile = None  # the HOWTO's own knob; tests/test_logs.py notices if it moves
    logging.logThreads = False
    logging.logMultiprocessing = False


def finish() -> None:
    """Write out every line still queued (at exit, before a new set-up, and
    before a command's last word on stderr, which must come after them)."""
    global _writer
    if _writer is not None:
        _writer.stop()
        _writer = None


def setup(level: str = "info", target: str = "stderr", syslog_socket: str = "/dev/log") -> None:
    global _writer
    finish()
    root = logging.getLogger()
    handler = _handler(target, syslog_socket)
    handler.addFilter(_Service())
    lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _writer = _Writer(lines, handler)
    _writer.start()
    root.handlers[:] = [_Handoff(lines)]
    _collect_only_what_lines_show()
    root.setLevel(level.upper())
    # aiosmtpd logs every command line (AUTH responses included) at INFO and
    # deprecation chatter at WARNING; our own modules log the events.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    # watchdog logs every file event at DEBUG: with our log file in a watched
    # folder, each line would log another.
    logging.getLogger("watchdog").setLevel(logging.WARNING)
    for name in ("odmr_bridge",):
        logging.getLogger(name).setLevel(level.upper())


atexit.register(finish)
