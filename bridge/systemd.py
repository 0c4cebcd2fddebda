"""systemd socket activation (``LISTEN_FDS``): port 366 without running as root.

A listen setting ``systemd:NAME`` takes the socket systemd passed with
``FileDescriptorName=NAME`` (see deploy/odmr-bridge.socket).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

SD_LISTEN_FDS_START = 3


class ActivationError(Exception):
    pass


def inherited_sockets(environ: Mapping[str, str] | None = None) -> dict[str, socket.socket]:
    """Sockets systemd handed to this process, by FileDescriptorName."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()):
        return {}
    count = int(env.get("LISTEN_FDS", "0"))
    names = env.get("LISTEN_FDNAMES", "").split(":") if env.get("LISTEN_FDNAMES") else []
    found: dict[str, socket.socket] = {}
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        name = names[i] if i < len(names) else f"fd{i}"
        found[name] = socket.socket(fileno=fd)
    return found


_cache: dict[str, socket.socket] | None = None


def take(name: str) -> socket.socket:
    """The inherited socket *name*, or ActivationError naming what is there."""
    global _cache
    if _cache is None:
        _cache = inherited_sockets()
    try:
        return _cache.pop(name)
    except KeyError:
        have = ", ".join(sorted(_cache)) or "none"
        raise ActivationError(f"no socket named {name!r} from systemd (have: {have})") from None
