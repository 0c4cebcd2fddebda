"""Stored credentials and the SASL mechanisms that check them.

A password is never stored.  From it we derive, once, at ``domain add/set``:

* ``cram-md5``: the precomputed HMAC-MD5 state (see :mod:`odmr_bridge.cram`);
* ``scram-sha-256``: RFC 5802/7677 salt, iteration count, StoredKey and
  ServerKey (from ``scramp``, a maintained SCRAM library).

PLAIN and LOGIN (offered only under TLS) are checked by deriving the same
CRAM-MD5 state from the offered password and comparing in constant time.
"""

from __future__ import annotations

import base64
import hmac
from collections.abc import Mapping

import scramp

from odmr_bridge import cram

SCRAM = "SCRAM-SHA-256"
SCRAM_PREFIX = "{SCRAM-SHA-256}"
_mechanism = scramp.ScramMechanism(SCRAM)


def derive_credentials(password: bytes) -> dict[str, str]:
    """Every stored form of *password*; the password itself is not among them."""
    salt, stored_key, server_key, iterations = _mechanism.make_auth_info(
        password.decode("utf-8", "surrogateescape"))
    scram = "$".join([str(iterations), *(base64.b64encode(x).decode()
                                         for x in (salt, stored_key, server_key))])
    return {"cram-md5": cram.derive(password), "scram-sha-256": SCRAM_PREFIX + scram}


def scram_auth_info(stored: str) -> tuple[bytes, bytes, bytes, int]:
    """Stored ``{SCRAM-SHA-256}i$salt$stored$server`` -> scramp's auth_info tuple."""
    if not stored.startswith(SCRAM_PREFIX):
        raise ValueError("not a {SCRAM-SHA-256} credential")
    iterations, salt, stored_key, server_key = stored[len(SCRAM_PREFIX):].split("$")
    return (base64.b64decode(salt), base64.b64decode(stored_key),
            base64.b64decode(server_key), int(iterations))


def check_password(credentials: Mapping[str, str] | None, password: bytes) -> bool:
    """For PLAIN/LOGIN: does *password* match the stored CRAM-MD5 state?"""
    stored = (credentials or {}).get("cram-md5")
    if stored is None:
        return False
    return hmac.compare_digest(cram.derive(password), stored)


def scram_server(lookup: object) -> scramp.ScramServer:
    """A SCRAM-SHA-256 server; *lookup(user)* returns auth info or raises ScramException."""
    return _mechanism.make_server(lookup)
