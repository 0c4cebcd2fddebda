"""A raw-socket SMTP/ODMR speaker for conformance tests: send lines, read replies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import socket
import ssl
import time

_OUR_TRACE = re.compile(
    rb"Received: from [^\r\n]*\r\n\tby [^\r\n]*\(odmr-bridge\)[^\r\n]*(?:\r\n\t[^\r\n]*)*\r\n")


def without_our_trace(content: bytes) -> bytes:
    """*content* as the sender wrote it: the bridge's own Received: line taken off the top."""
    match = _OUR_TRACE.match(content)
    assert match is not None, content[:200]
    return content[match.end():]


def client_tls() -> ssl.SSLContext:
    """The customer's side: our test certificates are self-signed."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Wire:
    def __init__(self, port: int, timeout: float = 10.0, *, tls: bool = False,
                 source: str = "127.0.0.1") -> None:
        self.sock: socket.socket = socket.create_connection(("127.0.0.1", port), timeout,
                                                            source_address=(source, 0))
        if tls:
            self.sock = client_tls().wrap_socket(self.sock)
        self.file = self.sock.makefile("rb")

    def starttls(self) -> None:
        assert self.command("STARTTLS")[0] == 220
        self.file.close()
        self.sock = client_tls().wrap_socket(self.sock)
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

    def lmtp_to_data(self, rcpt: str, sender: str = "s@x.test") -> None:
        """An LMTP transaction up to the 354: then send the content raw."""
        assert self.reply()[0] == 220
        assert self.command("LHLO sender.test")[0] == 250
        assert self.command(f"MAIL FROM:<{sender}>")[0] == 250
        assert self.command(f"RCPT TO:<{rcpt}>")[0] == 250
        assert self.command("DATA")[0] == 354

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
              mail_options: str = "", rcpt_options: str = "") -> list[tuple[int, str]]:
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
            code, lines = w.command(
                f"RCPT TO:<{rcpt}>{' ' + rcpt_options if rcpt_options else ''}")
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


class CustomerMta:
    """The customer's side after the reversal, scripted per recipient."""

    def __init__(self, wire: Wire, rcpt_replies: dict[str, str] | None = None,
                 ehlo: list[str] | None = None, refuse_ehlo: bool = False,
                 bare_lf_ends_lines: bool = False, traced: bool = True,
                 mail_limit: int | None = None, pause_before_data_reply: float = 0.0,
                 data_replies: dict[int, str] | None = None,
                 closes_after_421: bool = True) -> None:
        self.w = wire
        # Waits this long before answering each end of data, then notes in
        # `ahead` what the provider had sent beyond it meanwhile (pipelining).
        self.pause_before_data_reply = pause_before_data_reply
        self.ahead: list[bytes] = []
        # The answer to the n-th end of data (from 1), if not 250; a 421 is
        # followed by closing the connection, as a server that says it does.
        self.data_replies = data_replies or {}
        # False: stays to see what the provider does after a 421 (it must close).
        self.closes_after_421 = closes_after_421
        # Like Exim's smtp_accept_max_per_connection: MAIL past this many
        # messages gets 421 (and whatever follows is recorded).
        self.mail_limit = mail_limit
        # Mail that came in through the intake carries our Received: line.
        self.traced = traced
        # Like Postfix, Exim and Sendmail before their SMTP smuggling fixes:
        # "<LF>.<LF>" or "<LF>.<CRLF>" also ends DATA.
        self.data_ends = (b".\r\n", b".\n") if bare_lf_ends_lines else (b".\r\n",)
        self.rcpt_replies = rcpt_replies or {}
        self.ehlo = ehlo if ehlo is not None else ["customer.test", "8BITMIME", "SIZE 100000"]
        self.refuse_ehlo = refuse_ehlo
        # As the sender wrote them (each must carry the bridge's Received: line,
        # which is taken off here); raw_messages keep it.
        self.messages: list[tuple[str, list[str], bytes]] = []
        self.raw_messages: list[bytes] = []
        self.commands: list[str] = []

    def reply(self, line: str) -> None:
        self.w.send(line)

    def _arrived_after(self, pause: float) -> bytes:
        """What the provider has sent that is not read yet, after *pause* seconds."""
        time.sleep(pause)
        timeout = self.w.sock.gettimeout()
        self.w.sock.setblocking(False)  # peek at what is there without waiting
        try:
            return self.w.file.peek(1)
        finally:
            self.w.sock.settimeout(timeout)

    def run(self) -> list[tuple[str, list[str], bytes]]:
        self.reply("220 customer.test ESMTP")
        return self.run_after_greeting()

    def run_after_greeting(self) -> list[tuple[str, list[str], bytes]]:
        sender, rcpts = "", list[str]()
        while True:
            raw = self.w.read_line()
            if not raw:
                raise ConnectionError("the provider closed the connection")
            line = raw.decode().rstrip("\r\n")
            self.commands.append(line)
            verb = line.split(" ", 1)[0].upper()
            if verb == "EHLO" and self.refuse_ehlo:
                self.reply("502 5.5.2 EHLO not implemented")
            elif verb == "HELO":
                self.reply("250 customer.test")
            elif verb == "EHLO":
                for ext in self.ehlo[:-1]:
                    self.reply(f"250-{ext}")
                self.reply(f"250 {self.ehlo[-1]}")
            elif verb == "MAIL" and self.mail_limit is not None \
                    and len(self.messages) >= self.mail_limit:
                self.reply("421 4.7.0 customer.test too many messages in this connection")
            elif verb == "MAIL":
                sender, rcpts = line[10:].split(">")[0].lstrip("<"), []
                self.reply("250 2.1.0 Ok")
            elif verb == "RCPT":
                addr = line[8:].split(">")[0].lstrip("<")
                answer = self.rcpt_replies.get(addr, "250 2.1.5 Ok")
                if answer.startswith("2"):
                    rcpts.append(addr)
                self.reply(answer)
            elif verb == "DATA":
                if not rcpts:
                    self.reply("554 5.5.1 no valid recipients")
                    continue
                self.reply("354 go ahead")
                data = b""
                while (chunk := self.w.read_line()) not in self.data_ends:
                    if not chunk:
                        raise ConnectionError("the provider closed the connection in DATA")
                    data += chunk[1:] if chunk.startswith(b".") else chunk
                if self.pause_before_data_reply:
                    self.ahead.append(self._arrived_after(self.pause_before_data_reply))
                answer = self.data_replies.get(len(self.raw_messages) + 1,
                                               "250 2.0.0 Ok: delivered")
                self.raw_messages.append(data)
                if answer.startswith("2"):
                    self.messages.append(
                        (sender, rcpts, without_our_trace(data) if self.traced else data))
                self.reply(answer)
                if answer.startswith("421") and self.closes_after_421:
                    self.w.close()
                    return self.messages
            elif verb == "RSET":
                self.reply("250 2.0.0 Ok")
            elif verb == "QUIT":
                self.reply("221 2.0.0 Bye")
                return self.messages
            else:
                self.reply("502 5.5.2 what")
