"""A private redis-server for a first run (no ``redis.url`` configured).

It listens only on a unix socket under the spool directory and keeps
nothing on disk: the spool is the record and ``serve`` rebuilds the index
from it at every start.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis


class EmbeddedRedisError(Exception):
    pass


def socket_path(spool_dir: str | Path) -> Path:
    return Path(spool_dir) / "redis" / "redis.sock"


def url_for(spool_dir: str | Path) -> str:
    return f"unix://{socket_path(spool_dir)}"


class EmbeddedRedis:
    def __init__(self, spool_dir: str | Path, binary: str = "redis-server") -> None:
        self.socket = socket_path(spool_dir)
        self.binary = binary
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self, wait: float = 10.0) -> None:
        exe = shutil.which(self.binary)
        if exe is None:
            raise EmbeddedRedisError(
                f"redis.url is not set and {self.binary!r} is not installed "
                "(apt-get install redis-server, or set ODMR_BRIDGE_REDIS_URL)"
            )
        self.socket.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.socket.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", str(self.socket), "--unixsocketperm", "700",
             "--save", "", "--appendonly", "no", "--dir", str(self.socket.parent),
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedRedisError(f"redis-server exited with {self.process.returncode}")
            try:
                redis.Redis(unix_socket_path=str(self.socket)).ping()
                return
            except redis.ConnectionError:
                time.sleep(0.02)
        self.stop()
        raise EmbeddedRedisError("redis-server did not start in time")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
