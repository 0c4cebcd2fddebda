"""SMTP AUTH (RFC 4954) for the ODMR listener: mechanisms, TLS rules, throttling.

Mechanisms: CRAM-MD5 (mandatory in RFC 2645, the only one fetchmail speaks),
SCRAM-SHA-256 (RFC 7677, via scramp), and PLAIN and LOGIN only under TLS
(``538 5.7.11`` otherwise).  ``*`` aborts any of them.  Failures are counted
per client address and per user name in Redis (:mod:`odmr_bridge.throttle`).
No password, digest or SASL blob is ever logged.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import redis.exceptions
import scramp
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Session, auth_mechanism

from odmr_bridge import cram, metrics, replies, sasl
from odmr_bridge.accounts import Accounts
from odmr_bridge.throttle import AuthThrottle

log = logging.getLogger("odmr_bridge.odmr")

CLEAR_TEXT_MECHANISMS = ("PLAIN", "LOGIN")


class SaslMixin(SMTP):
    """The AUTH half of :class:`odmr_bridge.odmr.OdmrServer`."""

    accounts: Callable[[], Accounts]
    throttle: AuthThrottle
    require_tls: bool
    user: str | None

    # Provided by OdmrServer.
    @property
    def secure(self) -> bool:
        raise NotImplementedError

    @property
    def client(self) -> str:
        raise NotImplementedError

    @property
    def client_address(self) -> str:
        raise NotImplementedError

    def _session(self) -> Session:
        raise NotImplementedError

    def mechanisms(self) -> list[str]:
        offered = ["CRAM-MD5", sasl.SCRAM]
        if self.secure:
            offered += CLEAR_TEXT_MECHANISMS
        return offered

    # -- the verb ----------------------------------------------------------------

    async def smtp_AUTH(self, arg: str) -> None:
        session = self._session()
        words = (arg or "").split(" ", 1)
        mechanism = words[0].upper()
        if session.host_name and session.extended_smtp and not session.authenticated and arg:
            if self.require_tls and not self.secure:
                await self.push(replies.TLS_REQUIRED)
                return
            if mechanism in CLEAR_TEXT_MECHANISMS and not self.secure:
                await self.push(replies.AUTH_ENCRYPTION_REQUIRED)
                return
            if mechanism not in self.mechanisms():
                await self.push(replies.AUTH_UNKNOWN_MECHANISM)
                return
            if await self._throttled(None):
                return
            arg = " ".join([mechanism, *words[1:]])
        await super().smtp_AUTH(arg)

    async def _throttled(self, user: str | None) -> bool:
        """True (after the delay and a 454) when this address or user is throttled."""
        try:
            blocked = await self.throttle.blocked(self.client_address, user)
        except redis.exceptions.RedisError as exc:
            # The password is still checked; only the brute-force brake is off.
            log.error("%s: AUTH throttle unavailable: %s", self.client, exc)
            return False
        if blocked:
            log.warning("%s: AUTH throttled%s", self.client,
                        f", sasl_username={user}" if user else "")
            await asyncio.sleep(self.throttle.policy.delay)
            await self.push(replies.AUTH_THROTTLED)
        return blocked

    async def _verdict(self, mechanism: str, user: str, ok: bool) -> AuthResult:
        if ok:
            self.user = user
            log.info("%s: sasl_method=%s, sasl_username=%s", self.client, mechanism, user)
            return AuthResult(success=True, auth_data=user)
        log.warning("%s: SASL %s authentication failed, sasl_username=%s", self.client,
                    mechanism, user[:64])
        metrics.AUTH_FAILURES.labels(mechanism).inc()
        # Counted before the 535 goes out, so the client's next try sees it.
        try:
            await self.throttle.failed(self.client_address, user)
        except redis.exceptions.RedisError as exc:
            log.error("%s: cannot count AUTH failure: %s", self.client, exc)
        return AuthResult(success=False, handled=False, message=replies.AUTH_FAILED)

    async def _initial_or_challenge(self, args: list[str], challenge: bytes) -> bytes | None:
        """The client's first SASL message: the initial response, else a 334 round."""
        if len(args) > 1:
            if args[1] == "=":
                return b""
            try:
                return base64.b64decode(args[1], validate=True)
            except binascii.Error:
                await self.push(replies.AUTH_BAD_BASE64)
                return None
        response = await self.challenge_auth(challenge)
        return None if response is MISSING else bytes(response)

    # -- mechanisms ----------------------------------------------------------------

    @auth_mechanism("CRAM-MD5")
    async def auth_cram_md5(self, _: object, args: list[str]) -> AuthResult:
        if len(args) > 1:  # CRAM-MD5 has no initial response
            return AuthResult(success=False, handled=False, message=replies.AUTH_SYNTAX)
        challenge = f"<{os.getpid()}.{time.time_ns()}@{self.hostname}>".encode()
        response = await self.challenge_auth(challenge)
        if response is MISSING:
            return AuthResult(success=False, handled=True)
        user, _, digest = bytes(response).decode("utf-8", "replace").rpartition(" ")
        if await self._throttled(user):
            return AuthResult(success=False, handled=True)
        stored = self.accounts().credential(user, "cram-md5")
        ok = stored is not None and cram.verify(stored, challenge, digest)
        return await self._verdict("CRAM-MD5", user, ok)

    @auth_mechanism("PLAIN")
    async def auth_plain(self, _: object, args: list[str]) -> AuthResult:
        blob = await self._initial_or_challenge(args, b"")
        if blob is None:
            return AuthResult(success=False, handled=True)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message=replies.AUTH_SYNTAX)
        authzid, login, password = parts
        user = login.decode("utf-8", "replace")
        if await self._throttled(user):
            return AuthResult(success=False, handled=True)
        ok = authzid in (b"", login) and self._password_ok(user, password)
        return await self._verdict("PLAIN", user, ok)

    @auth_mechanism("LOGIN")
    async def auth_login(self, _: object, args: list[str]) -> AuthResult:
        login = await self._initial_or_challenge(args, b"Username:")
        if login is None:
            return AuthResult(success=False, handled=True)
        user = login.decode("utf-8", "replace")
        password = await self.challenge_auth(b"Password:")
        if password is MISSING:
            return AuthResult(success=False, handled=True)
        if await self._throttled(user):
            return AuthResult(success=False, handled=True)
        return await self._verdict("LOGIN", user, self._password_ok(user, bytes(password)))

    def _password_ok(self, user: str, password: bytes) -> bool:
        return sasl.check_password(self.accounts().credentials(user), password)

    @auth_mechanism(sasl.SCRAM)
    async def auth_scram_sha_256(self, _: object, args: list[str]) -> AuthResult:
        first = await self._initial_or_challenge(args, b"")
        if first is None:
            return AuthResult(success=False, handled=True)
        accounts = self.accounts()
        seen: dict[str, str] = {}

        def lookup(username: str) -> tuple[bytes, bytes, bytes, int]:
            seen["user"] = username
            stored = accounts.credential(username, "scram-sha-256")
            if stored is None:
                raise scramp.ScramException("unknown user", scramp.ServerError.UNKNOWN_USER)
            return sasl.scram_auth_info(stored)

        server = sasl.scram_server(lookup)
        try:
            server.set_client_first(first.decode("utf-8"))
        except (scramp.ScramException, UnicodeDecodeError, ValueError):
            return await self._scram_failed(seen)
        user = seen.get("user", "")
        if await self._throttled(user):
            return AuthResult(success=False, handled=True)
        final = await self.challenge_auth(server.get_server_first().encode())
        if final is MISSING:
            return AuthResult(success=False, handled=True)
        try:
            server.set_client_final(bytes(final).decode("utf-8"))
        except (scramp.ScramException, UnicodeDecodeError, ValueError):
            return await self._scram_failed(seen)
        # RFC 4954: the server's final message goes in a 334; the client answers empty.
        ack = await self.challenge_auth(server.get_server_final().encode())
        if ack is MISSING:
            return AuthResult(success=False, handled=True)
        return await self._verdict(sasl.SCRAM, user, True)

    async def _scram_failed(self, seen: Mapping[str, Any]) -> AuthResult:
        return await self._verdict(sasl.SCRAM, str(seen.get("user", "")), False)
