"""CRAM-MD5 (RFC 2195) without keeping the password.

HMAC-MD5(key, text) = MD5(key^opad || MD5(key^ipad || text)).  The two
64-byte prefixes are fixed per password, so we store only the MD5 chaining
state after each of them (the "precomputed HMAC-MD5 context" Dovecot stores
for its CRAM-MD5 scheme) and finish both hashes at verification time.  The
stored value verifies CRAM-MD5 but does not reveal the password.

hashlib cannot start MD5 from a given state, hence the small compression
function below (RFC 1321); tests check it against :mod:`hmac` on random
keys and challenges.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct

_S = [7, 12, 17, 22] * 4 + [5, 9, 14, 20] * 4 + [4, 11, 16, 23] * 4 + [6, 10, 15, 21] * 4
_K = [int(abs(math.sin(i + 1)) * 2**32) & 0xFFFFFFFF for i in range(64)]
_IV = (0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476)
_MASK = 0xFFFFFFFF
PREFIX = "{CRAM-MD5}"


def _rotl(x: int, n: int) -> int:
    return ((x << n) | (x >> (32 - n))) & _MASK


def _compress(state: tuple[int, int, int, int], block: bytes) -> tuple[int, int, int, int]:
    m = struct.unpack("<16I", block)
    a, b, c, d = state
    for i in range(64):
        if i < 16:
            f, g = (b & c) | (~b & d), i
        elif i < 32:
            f, g = (d & b) | (~d & c), (5 * i + 1) % 16
        elif i < 48:
            f, g = b ^ c ^ d, (3 * i + 5) % 16
        else:
            f, g = c ^ (b | (~d & _MASK)), (7 * i) % 16
        f = (f + a + _K[i] + m[g]) & _MASK
        a, d, c = d, c, b
        b = (b + _rotl(f, _S[i])) & _MASK
    return ((state[0] + a) & _MASK, (state[1] + b) & _MASK,
            (state[2] + c) & _MASK, (state[3] + d) & _MASK)


def _finish(state: tuple[int, int, int, int], data: bytes, prefix_len: int) -> bytes:
    """MD5 digest of (prefix || data), given the state after the prefix blocks."""
    total_bits = (prefix_len + len(data)) * 8
    padded = data + b"\x80" + b"\x00" * ((55 - len(data)) % 64) + struct.pack("<Q", total_bits)
    for offset in range(0, len(padded), 64):
        state = _compress(state, padded[offset:offset + 64])
    return struct.pack("<4I", *state)


def _pad_key(password: bytes) -> bytes:
    if len(password) > 64:
        password = hashlib.md5(password).digest()
    return password.ljust(64, b"\x00")


def derive(password: bytes) -> str:
    """The stored form: ``{CRAM-MD5}`` + hex of the inner and outer MD5 states."""
    key = _pad_key(password)
    inner = _compress(_IV, bytes(b ^ 0x36 for b in key))
    outer = _compress(_IV, bytes(b ^ 0x5C for b in key))
    return PREFIX + struct.pack("<8I", *inner, *outer).hex()


def _states(stored: str) -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    if not stored.startswith(PREFIX):
        raise ValueError("not a {CRAM-MD5} credential")
    words = struct.unpack("<8I", bytes.fromhex(stored[len(PREFIX):]))
    return (words[0], words[1], words[2], words[3]), (words[4], words[5], words[6], words[7])


def digest(stored: str, challenge: bytes) -> str:
    """HMAC-MD5(password, challenge) as lowercase hex, from the stored state."""
    inner, outer = _states(stored)
    inner_digest = _finish(inner, challenge, 64)
    return _finish(outer, inner_digest, 64).hex()


def verify(stored: str, challenge: bytes, response_hex: str) -> bool:
    try:
        expected = digest(stored, challenge)
    except ValueError:
        return False
    # As bytes: compare_digest refuses str with non-ASCII characters.
    return hmac.compare_digest(expected.encode(), response_hex.lower().encode("utf-8", "replace"))
