"""Real peers for tests and benchmarks: redis-server, the bridge, Postfix, fetchmail, a sink.

Each is a real process or server on loopback, started in a temp directory
and stopped afterwards; nothing here is a mock.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import redis
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from odmr_bridge.spool import Envelope as HeldEnvelope
from odmr_bridge.spool import Recipient, Spool, new_qid

ROOT = Path(__file__).resolve().parent.parent


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_handed_out: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range.

    A port from bind(0) is an ephemeral one: between our check and the
    server's bind, any outgoing connection may take it as its local port.
    Ports below the range are never handed out that way.  A port is handed
    out once per test process: two servers started together never get the same.
    """
    low = _ephemeral_range()[0]
    for _ in range(200):
        port = random.randrange(max(1024, low - 12000), low)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _handed_out.add(port)
            return port
    raise RuntimeError("no free port below the ephemeral range")


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what or predicate}")


def port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
        return True
    return False


def port_listening(port: int) -> bool:
    """Something listens on *port*: asked of the kernel, not by connecting (a
    connection to port 366 would be an ODMR session, logged and counted)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[1].endswith(f":{port:04X}") and fields[3] == "0A":  # LISTEN
                    return True
    return False


class RedisServer:
    """A private redis-server on a unix socket."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def client(self) -> redis.Redis:
        return redis.Redis(unix_socket_path=str(self.socket))

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", str(self.socket),
             "--save", "", "--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
        )
        wait_for(self._ping, what="redis-server")

    def _ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None

    def restart_empty(self) -> None:
        self.stop()
        self.start()


def _redis_process(directory: Path, port: int, *options: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "redis.log", "ab") as log:
        return subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(directory),
             # A replica's first sync starts at once (Redis 7 waits 5 s for more).
             "--repl-diskless-sync-delay", "0", *options],
            stdout=log, stderr=subprocess.STDOUT)


def _answers(port: int) -> bool:
    try:
        return bool(redis.Redis(port=port, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _replicas_online(port: int) -> int:
    """How many replicas of the server on *port* have finished their first sync."""
    info = redis.Redis(port=port, socket_timeout=1).info("replication")
    return sum(1 for key, value in info.items()
               if key.startswith("slave") and isinstance(value, dict)
               and value.get("state") == "online")


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    if process is not None and process.poll() is None:
        process.kill()
    if process is not None:
        process.wait(10)


class RedisCluster:
    """A Redis Cluster on loopback: 3 masters and 3 replicas (``redis-cli --cluster
    create``), with a short node timeout so a failover takes a few seconds."""

    NODE_TIMEOUT_MS = 1000

    def __init__(self, directory: Path, nodes: int = 6) -> None:
        self.directory = directory
        self.ports = [free_port() for _ in range(nodes)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def nodes(self) -> str:
        """The seed list, as redis.cluster_nodes wants it."""
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self) -> None:
        for port in self.ports:
            self.processes[port] = _redis_process(
                self.directory / str(port), port, "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--cluster-port", str(free_port()),
                "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS))
        for port in self.ports:
            wait_for(lambda port=port: _answers(port), what=f"redis-server :{port}")
        subprocess.run(["redis-cli", "--cluster", "create",
                        *(f"127.0.0.1:{p}" for p in self.ports),
                        "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, timeout=60)
        wait_for(self._ok, timeout=30, what="cluster_state:ok on every node")
        wait_for(self._replicated, timeout=30, what="each master's replica in sync")

    def _alive_ports(self) -> list[int]:
        return [p for p, proc in self.processes.items() if proc.poll() is None]

    def _ok(self) -> bool:
        for port in self._alive_ports():
            try:
                info = redis.Redis(port=port, socket_timeout=1).cluster("info")
            except redis.RedisError:
                return False
            if info.get("cluster_state") != "ok":
                return False
        return True

    def _replicated(self) -> bool:
        try:
            return all(_replicas_online(port) >= 1 for port in self._alive_ports()
                       if redis.Redis(port=port).info("replication")["role"] == "master")
        except redis.RedisError:
            return False

    def master_port_for(self, key: str) -> int:
        """The port of the master serving *key*'s slot, as the live nodes see it."""
        asker = redis.Redis(port=self._alive_ports()[0], socket_timeout=1)
        slot = int(asker.cluster("keyslot", key))
        for shard in asker.cluster("slots"):
            start, end, master = shard[0], shard[1], shard[2]
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(f"no node serves slot {slot}")

    def kill_master_for(self, key: str) -> int:
        """kill -9 the master serving *key*; returns once its replica took over
        (and every live node says cluster_state:ok). Returns the dead port."""
        port = self.master_port_for(key)
        _kill(self.processes[port])

        def promoted() -> bool:
            try:
                return self.master_port_for(key) != port and self._ok()
            except (redis.RedisError, LookupError):
                return False

        wait_for(promoted, timeout=30, interval=0.1, what=f"failover of {key!r}'s slot")
        return port

    def client(self) -> redis.RedisCluster:
        return redis.RedisCluster(host="127.0.0.1", port=self._alive_ports()[0])

    def flush(self) -> None:
        for port in self._alive_ports():
            with contextlib.suppress(redis.ReadOnlyError, redis.ResponseError):
                redis.Redis(port=port).flushall()

    def stop(self) -> None:
        for process in self.processes.values():
            _kill(process)
        self.processes.clear()


class RedisSentinelSet:
    """One master, one replica and three sentinels on loopback; a master that
    stops answering is declared down after a second and its replica promoted."""

    MASTER_NAME = "bridge"

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.master_port, self.replica_port = free_port(), free_port()
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def sentinels(self) -> str:
        """As redis.sentinels wants it."""
        return ",".join(f"127.0.0.1:{p}" for p in self.sentinel_ports)

    def start(self) -> None:
        self.processes[self.master_port] = _redis_process(
            self.directory / "master", self.master_port)
        self.processes[self.replica_port] = _redis_process(
            self.directory / "replica", self.replica_port,
            "--replicaof", "127.0.0.1", str(self.master_port))
        for port in self.sentinel_ports:
            directory = self.directory / f"sentinel-{port}"
            directory.mkdir(parents=True, exist_ok=True)
            conf = directory / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {directory}\n"
                f"sentinel monitor {self.MASTER_NAME} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {self.MASTER_NAME} 1000\n"
                f"sentinel failover-timeout {self.MASTER_NAME} 5000\n")
            with open(directory / "sentinel.log", "ab") as log:
                self.processes[port] = subprocess.Popen(
                    ["redis-server", str(conf), "--sentinel"], stdout=log,
                    stderr=subprocess.STDOUT)
        wait_for(self._ready, timeout=30, interval=0.1,
                 what="sentinels that know the replica and each other")

    def _sentinel(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, socket_timeout=1, decode_responses=True)

    def _ready(self) -> bool:
        try:
            if _replicas_online(self.master_port) < 1:
                return False
            for port in self.sentinel_ports:
                s = self._sentinel(port)
                replicas: list[Any] = s.sentinel_slaves(self.MASTER_NAME)
                others: list[Any] = s.sentinel_sentinels(self.MASTER_NAME)  # type: ignore[assignment]
                if not replicas or len(others) < 2:
                    return False
        except redis.RedisError:
            return False
        return True

    def master(self, sentinel: int = 0) -> int:
        """The master's port, as a sentinel (the first) says."""
        address: tuple[str, int] = self._sentinel(  # type: ignore[assignment]
            self.sentinel_ports[sentinel]).sentinel_get_master_addr_by_name(self.MASTER_NAME)
        return int(address[1])

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.master())

    def kill_master(self) -> int:
        """kill -9 the master; returns once the sentinels promoted the replica
        (it says role:master, and every sentinel names it, not flagged down).
        Returns the new master's port."""
        old = self.master()
        _kill(self.processes[old])

        def promoted() -> bool:
            try:
                new = {self.master(i) for i in range(len(self.sentinel_ports))}
                if new == {old} or len(new) != 1:
                    return False
                port = new.pop()
                views: list[Any] = [self._sentinel(p).sentinel_master(self.MASTER_NAME)
                                    for p in self.sentinel_ports]
                flags = [str(view["flags"]) for view in views]
                return not any("down" in f for f in flags) and redis.Redis(
                    port=port, socket_timeout=1).info("replication")["role"] == "master"
            except redis.RedisError:
                return False

        wait_for(promoted, timeout=30, interval=0.1, what="the sentinels' failover")
        return self.master()

    def stop(self) -> None:
        for process in self.processes.values():
            _kill(process)
        self.processes.clear()


class Bridge:
    """``odmr-bridge serve`` as a subprocess with its own spool and ports."""

    def __init__(self, directory: Path, redis_url: str, hostname: str = "provider.test",
                 extra_env: dict[str, str] | None = None) -> None:
        self.directory = directory
        self.lmtp_port = free_port()
        self.odmr_port = free_port()
        self.metrics_port = free_port()
        self.accounts = directory / "customers.json"
        self.spool = directory / "spool"
        self.log = directory / "bridge.log"
        self.env = {
            **os.environ,
            "ODMR_BRIDGE_REDIS_URL": redis_url,
            "ODMR_BRIDGE_SPOOL_DIR": str(self.spool),
            "ODMR_BRIDGE_ACCOUNTS_FILE": str(self.accounts),
            "ODMR_BRIDGE_LMTP_LISTEN": f"127.0.0.1:{self.lmtp_port}",
            "ODMR_BRIDGE_ODMR_LISTEN": f"127.0.0.1:{self.odmr_port}",
            "ODMR_BRIDGE_ODMR_HOSTNAME": hostname,
            # Never the machine's /etc/postfix: tests that want Postfix say which.
            "ODMR_BRIDGE_POSTFIX_CONFIG_DIR": str(directory / "no-postfix"),
            "ODMR_BRIDGE_METRICS_LISTEN": f"127.0.0.1:{self.metrics_port}",
            # Notices go nowhere (connection refused: they wait in bounce/)
            # unless a test points this at a real MTA.
            "ODMR_BRIDGE_BOUNCE_RELAY": f"127.0.0.1:{free_port()}",
            **(extra_env or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def cli(self, *args: str, stdin: str = "",
            check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([sys.executable, "-m", "odmr_bridge", *args], input=stdin,
                                env=self.env, capture_output=True, text=True, cwd=ROOT,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"odmr-bridge {' '.join(args)} failed: {result.stderr}")
        return result

    def add_domain(self, domain: str, user: str, password: str) -> None:
        self.cli("domain", "add", domain, "--user", user, stdin=password + "\n")

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self._log_handle = open(self.log, "ab")  # noqa: SIM115
        self.process = subprocess.Popen([sys.executable, "-m", "odmr_bridge", "serve"],
                                        env=self.env, stdout=self._log_handle,
                                        stderr=subprocess.STDOUT, cwd=ROOT)
        wait_for(lambda: self._check_alive() and port_open(self.lmtp_port)
                 and port_listening(self.odmr_port), what="the bridge to listen")

    def _check_alive(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise RuntimeError(f"bridge exited {self.process.returncode}: {self.log.read_text()}")
        return True

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        self.process.send_signal(sig)
        code = self.process.wait(40)
        self.process = None
        self._log_handle.close()
        return code

    def held(self, domain: str | None = None,
             notices: bool = False) -> list[dict]:  # type: ignore[type-arg]
        """`queue list --json`: the messages held for customers (and, if asked,
        the notices to senders waiting in bounce/)."""
        import json
        args = ["queue", "list", "--json"] + ([domain] if domain else [])
        listed = json.loads(self.cli(*args).stdout)
        return [m for m in listed if notices or m["queue_name"] != "bounce"]

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def logged(self, text: str, timeout: float = 5.0) -> bool:
        """*text* is in the log within *timeout* seconds (a writer thread puts
        lines there a few milliseconds after their event)."""
        deadline = time.monotonic() + timeout
        while text not in self.log_text():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True


def self_signed_certificate(directory: Path, name: str = "provider.test") -> tuple[Path, Path]:
    """A fresh key and self-signed certificate (openssl), for the TLS tests."""
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", f"/CN={name}", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    return cert, key


class SinkHandler:
    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.lock = threading.Lock()

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.messages.append((envelope.mail_from or "", list(envelope.rcpt_tos),
                                  envelope.original_content or b""))
        return "250 2.0.0 Ok: stored"


@contextlib.contextmanager
def smtp_sink(handler: object | None = None) -> Iterator[tuple[int, SinkHandler]]:
    """The customer's own MTA: a real SMTP server (aiosmtpd) that keeps what it gets."""
    sink = handler if handler is not None else SinkHandler()
    port = free_port()
    controller = Controller(sink, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True)
    controller.start()
    try:
        yield port, sink  # type: ignore[misc]
    finally:
        controller.stop()


def fetchmail(directory: Path, odmr_port: int, user: str, password: str,
              domains: list[str] | None, smtp_port: int, *, ssl: bool = False,
              timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run fetchmail once in ODMR mode, relaying into smtp_port; returns the result."""
    rc = directory / f"fetchmailrc-{user}-{time.monotonic_ns()}"
    lines = [
        "set no syslog",
        f"poll 127.0.0.1 service {odmr_port} protocol ODMR",
        f'    user "{user}" password "{password}"',
    ]
    if domains:
        lines.append(f"    fetchdomains {','.join(domains)}")
    lines.append(f"    smtphost 127.0.0.1/{smtp_port}")
    if ssl:
        lines.append("    ssl no sslcertck")
    rc.write_text("\n".join(lines) + "\n")
    rc.chmod(0o600)
    env = {**os.environ, "HOME": str(directory), "FETCHMAILHOME": str(directory)}
    return subprocess.run(["fetchmail", "-f", str(rc), "-v", "--nodetach", "--nosyslog",
                           "--pidfile", str(directory / "fetchmail.pid")],
                          capture_output=True, text=True, timeout=timeout, env=env)


class Postfix:
    """A throwaway Postfix instance (the recipe in odmr-facts.md)."""

    def __init__(self, relay_domains: list[str], transport: dict[str, str]) -> None:
        # Postfix's daemons run as user postfix and must reach data_directory,
        # which pytest's 0700 temp dirs do not allow: use a world-traversable one.
        self.directory = Path(tempfile.mkdtemp(prefix="odmr-postfix-"))
        self.directory.chmod(0o755)
        self.etc = self.directory / "etc"
        self.smtp_port = free_port()
        self.relay_domains = relay_domains
        self.transport = transport

    def postconf(self, *args: str) -> None:
        subprocess.run(["postconf", "-c", str(self.etc), *args], check=True,
                       capture_output=True)

    def start(self, run: bool = True) -> None:
        """Write the configuration and, unless run=False, start the instance."""
        d = self.directory
        if self.etc.exists():
            shutil.rmtree(self.etc)
        shutil.copytree("/etc/postfix", self.etc)
        (self.etc / "main.cf").write_text("compatibility_level = 3.6\n")
        for sub in ("spool", "data"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        shutil.chown(d / "data", "postfix")
        self.postconf(
            "-e", f"queue_directory={d}/spool", f"data_directory={d}/data",
            "myhostname=mx.test", "inet_interfaces=127.0.0.1", "inet_protocols=ipv4",
            "mydestination=", "mynetworks=127.0.0.0/8",
            f"maillog_file_prefixes=/var,/dev/stdout,{d}", f"maillog_file={d}/maillog",
            "alias_maps=", "alias_database=", "local_recipient_maps=",
            "smtpd_relay_restrictions=permit_mynetworks,reject",
            "default_destination_concurrency_limit=20",
        )
        self.postconf("-M#", "smtp/inet")
        self.postconf("-Me", f"127.0.0.1:{self.smtp_port}/inet=127.0.0.1:{self.smtp_port} "
                             "inet n - n - - smtpd")
        self.postconf("-F", "*/*/chroot = n")
        if self.relay_domains or self.transport:
            # Wired by hand; tests of `odmr-bridge postfix setup` start bare.
            (self.etc / "transport").write_text(
                "".join(f"{k} {v}\n" for k, v in self.transport.items()))
            self.postconf("-e", f"relay_domains={','.join(self.relay_domains)}",
                          f"transport_maps=hash:{self.etc}/transport")
            self.postconf("-Me", "odmr/unix=odmr unix - - n - - lmtp")
            subprocess.run(["postmap", "-c", str(self.etc), str(self.etc / "transport")],
                           check=True)
        if run:
            self.run()

    def run(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "start"], check=True,
                       capture_output=True)
        wait_for(lambda: port_open(self.smtp_port), what="postfix smtpd")

    def stop(self) -> None:
        subprocess.run(["postfix", "-c", str(self.etc), "stop"], capture_output=True)
        # master exits asynchronously; wait so the next instance can bind.
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: subprocess.run(["postfix", "-c", str(self.etc), "status"],
                                            capture_output=True).returncode != 0,
                     timeout=10, interval=0.1, what="postfix to stop")
        shutil.rmtree(self.directory, ignore_errors=True)

    def queue_size(self) -> int:
        out = subprocess.run(["postqueue", "-c", str(self.etc), "-j"], capture_output=True,
                             text=True).stdout
        return len([line for line in out.splitlines() if line.strip()])

    def flush(self) -> None:
        subprocess.run(["postqueue", "-c", str(self.etc), "-f"], capture_output=True)

    def maillog(self) -> str:
        path = self.directory / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@contextlib.contextmanager
def peak_rss_growth(pid: int) -> Iterator[list[int]]:
    """Samples *pid*'s RSS while the block runs; yields [KiB grown at the peak]."""
    baseline = rss_kib(pid)
    grown = [0]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            grown[0] = max(grown[0], rss_kib(pid) - baseline)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        yield grown
    finally:
        done.set()
        sampler.join()


def hold_on_spool(directory: Path, body: bytes, rcpt: str = "a@atrn.example") -> None:
    """A message put straight on a bridge's spool (not through intake, as an
    older version or a restore would leave it); the bridge's start-up finds it."""
    spool = Spool(directory / "spool")
    spool.ensure()
    spool.commit([(HeldEnvelope(qid=new_qid(), domain=rcpt.split("@")[1], sender="s@x.test",
                                arrival=time.time(), size=len(body),
                                recipients=[Recipient(rcpt)]), body)])
