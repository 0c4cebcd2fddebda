"""Shared pieces of the benchmarks: log counters, CPU clocks, a fast customer MTA."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import re
import socket
import subprocess
from pathlib import Path

from tests.peers import Postfix, port_open, wait_for


class SentCounter:
    """Deliveries Postfix logged per domain and status, reading only new log lines
    (re-reading the whole log while polling would steal CPU from what we measure)."""

    def __init__(self, postfix: Postfix, status: str = "sent") -> None:
        self.path = postfix.directory / "maillog"
        self.offset = 0
        self.counts: dict[bytes, int] = {}
        self.pattern = re.compile(rb"to=<[^@>]+@([^>]+)>.*status=" + status.encode())

    def __call__(self, domain: str) -> int:
        if self.path.exists():
            with open(self.path, "rb") as log:
                log.seek(self.offset)
                data = log.read()
            complete = data.rfind(b"\n") + 1
            self.offset += complete
            for found in self.pattern.findall(data[:complete]):
                self.counts[found] = self.counts.get(found, 0) + 1
        return self.counts.get(domain.encode(), 0)


def start_smtp_sink(port: int, *, lmtp: bool = False,
                    backlog: int = 1000) -> subprocess.Popen[bytes]:
    """Postfix's smtp-sink on 127.0.0.1:port (it insists on -u when run as root)."""
    as_user = ["-u", "postfix"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(["smtp-sink", *as_user, *(["-L"] if lmtp else []),
                             f"127.0.0.1:{port}", str(backlog)])
    wait_for(lambda: sink.poll() is None and port_open(port), what="smtp-sink")
    return sink


def message_body(subject: str, size: int) -> bytes:
    """A plain message of about *size* bytes, in 78-octet lines."""
    head = f"Subject: {subject}\r\n\r\n".encode()
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


class LineSocket:
    """Blocking line I/O for the bench client's ODMR half."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), 30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buffer = b""

    def line(self) -> bytes:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line

    def reply(self) -> tuple[int, bytes]:
        while True:
            line = self.line()
            if line[3:4] != b"-":
                return int(line[:3]), line[4:]

    def command(self, text: str) -> tuple[int, bytes]:
        self.sock.sendall(text.encode() + b"\r\n")
        return self.reply()


def odmr_login(port: int, user: str, password: str) -> LineSocket:
    """Connect, EHLO and AUTH CRAM-MD5 as a customer; ready for ATRN."""
    conn = LineSocket(port)
    assert conn.reply()[0] == 220
    assert conn.command("EHLO bench")[0] == 250
    code, challenge = conn.command("AUTH CRAM-MD5")
    assert code == 334
    digest = hmac.new(password.encode(), base64.b64decode(challenge), hashlib.md5).hexdigest()
    assert conn.command(base64.b64encode(f"{user} {digest}".encode()).decode())[0] == 235
    return conn


EHLO_REPLY = (b"250-customer.bench\r\n250-PIPELINING\r\n250-8BITMIME\r\n"
              b"250-SIZE 104857600\r\n250 ENHANCEDSTATUSCODES\r\n")


def fast_customer(conn: LineSocket) -> int:
    """Be the customer's MTA after the reversal, as fast as Python allows:
    answer pipelined commands in batches, find each DATA end by search.
    Returns the number of messages accepted; ends at QUIT."""
    sock = conn.sock
    sock.sendall(b"220 customer.bench ESMTP\r\n")
    buffer, messages, in_data = conn.buffer, 0, False
    while True:
        out = []
        while True:
            if in_data:
                end = buffer.find(b"\r\n.\r\n")
                if end < 0:
                    break
                buffer = buffer[end + 5:]
                in_data = False
                messages += 1
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            newline = buffer.find(b"\r\n")
            if newline < 0:
                break
            verb = buffer[:4].upper()
            buffer = buffer[newline + 2:]
            if verb == b"EHLO":
                out.append(EHLO_REPLY)
            elif verb == b"DATA":
                out.append(b"354 go ahead\r\n")
                in_data = True
                buffer = b"\r\n" + buffer  # so an empty body's "." is found too
            elif verb == b"QUIT":
                sock.sendall(b"".join(out) + b"221 2.0.0 Bye\r\n")
                sock.close()
                return messages
            else:
                out.append(b"250 2.0.0 Ok\r\n")
        if out:
            sock.sendall(b"".join(out))
        chunk = sock.recv(1 << 20)
        if not chunk:
            return messages
        buffer += chunk
