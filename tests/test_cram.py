"""CRAM-MD5 from stored HMAC-MD5 state must equal HMAC-MD5 from the password."""

from __future__ import annotations

import hashlib
import hmac

from hypothesis import given
from hypothesis import strategies as st

from odmr_bridge import cram


@given(password=st.binary(min_size=1, max_size=150), challenge=st.binary(max_size=300))
def test_stored_state_gives_the_same_digest_as_the_password(password: bytes,
                                                            challenge: bytes) -> None:
    stored = cram.derive(password)
    expected = hmac.new(password, challenge, hashlib.md5).hexdigest()
    assert cram.digest(stored, challenge) == expected
    assert cram.verify(stored, challenge, expected.upper())


def test_stored_form_does_not_contain_the_password() -> None:
    stored = cram.derive(b"secret")
    assert "secret" not in stored and b"secret".hex() not in stored
    assert stored.startswith("{CRAM-MD5}") and len(stored) == len("{CRAM-MD5}") + 64


def test_wrong_response_or_broken_credential_fails() -> None:
    stored = cram.derive(b"secret")
    assert not cram.verify(stored, b"<1@x>", hmac.new(b"other", b"<1@x>", hashlib.md5).hexdigest())
    assert not cram.verify("{PLAIN}secret", b"<1@x>", "00")
    assert not cram.verify(stored, b"<1@x>", "not hex at all")
