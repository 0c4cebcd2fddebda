"""Intake writes DATA to the spool as it arrives: big mail does not need big memory.

Postfix runs up to 20 LMTP deliveries at once; ten 50 MB messages at the same
time must not grow the daemon by more than 64 MB.
"""

from __future__ import annotations

import threading

from tests.peers import Bridge, peak_rss_growth
from tests.wire import Wire

MESSAGES = 10
LINE = b"y" * 78 + b"\r\n"
LINES = 50 * 1000 * 1000 // len(LINE)  # ~50 MB, under the 50 MiB default limit
CHUNK = LINE * 800  # 64 KB


def send_big_message(port: int, rcpt: str, replies: list[int]) -> None:
    w = Wire(port, timeout=120)
    try:
        w.lmtp_to_data(rcpt)
        w.sock.sendall(b"Subject: big\r\n\r\n")
        for _ in range(LINES // 800):
            w.sock.sendall(CHUNK)
        w.sock.sendall(b".\r\n")
        replies.append(w.reply()[0])
    finally:
        w.close()


def test_ten_concurrent_50_mb_intakes_grow_the_daemon_by_at_most_64_mb(bridge: Bridge) -> None:
    assert bridge.process is not None
    replies: list[int] = []
    senders = [threading.Thread(target=send_big_message,
                                args=(bridge.lmtp_port, f"r{n}@atrn.example", replies))
               for n in range(MESSAGES)]
    with peak_rss_growth(bridge.process.pid) as grown:
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
    assert replies == [250] * MESSAGES
    held = bridge.held()
    assert len(held) == MESSAGES and all(m["message_size"] > 49_000_000 for m in held)
    grown_mb = grown[0] / 1024
    print(f"RSS grew by {grown_mb:.1f} MB for {MESSAGES} concurrent 50 MB intakes")
    assert grown_mb <= 64
