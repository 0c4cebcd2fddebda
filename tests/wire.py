"""A raw-socket SMTP/ODMR speaker for conformance tests: send lines, read replies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket


class Wire:
    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def send(self, line: str | bytes) -> None:
        data = line.encode() if isinstance(line, str) else line
        self.sock.sendall(data + b"\r\n")

    def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        while True:
            raw = self.file.readline()
            if not raw:
                raise ConnectionError("closed")
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    def command(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send(line)
        return self.reply()

    def read_line(self) -> bytes:
        return self.file.readline()

    def cram_md5(self, user: str, password: str) -> tuple[int, list[str]]:
        code, lines = self.command("AUTH CRAM-MD5")
        assert code == 334, (code, lines)
        challenge = base64.b64decode(lines[0])
        digest = hmac.new(password.encode(), challenge, hashlib.md5).hexdigest()
        return self.command(base64.b64encode(f"{user} {digest}".encode()).decode())

    def login(self, user: str, password: str) -> None:
        assert self.reply()[0] == 220
        assert self.command("EHLO customer")[0] == 250
        assert self.cram_md5(user, password)[0] == 235


def lmtp_send(port: int, sender: str, rcpts: list[str], body: bytes,
              mail_options: str = "") -> list[tuple[int, str]]:
    """One LMTP transaction; returns the RCPT replies of refused recipients and,
    for the accepted ones, the per-recipient replies after DATA (RFC 2033).

    (smtplib.LMTP reads one reply after DATA, like aiosmtpd's server sends.)
    """
    w = Wire(port)
    try:
        assert w.reply()[0] == 220
        assert w.command("LHLO sender.test")[0] == 250
        code, lines = w.command(f"MAIL FROM:<{sender}>{' ' + mail_options if mail_options else ''}")
        assert code == 250, lines
        results: list[tuple[int, str]] = []
        accepted = 0
        for rcpt in rcpts:
            code, lines = w.command(f"RCPT TO:<{rcpt}>")
            if code == 250:
                accepted += 1
            else:
                results.append((code, lines[0]))
        if accepted:
            assert w.command("DATA")[0] == 354
            stuffed = b"".join((b"." + line if line.startswith(b".") else line)
                               for line in body.splitlines(keepends=True))
            w.sock.sendall(stuffed + b".\r\n")
            for _ in range(accepted):
                code, lines = w.reply()
                results.append((code, lines[0]))
        w.command("QUIT")
        return results
    finally:
        w.close()
