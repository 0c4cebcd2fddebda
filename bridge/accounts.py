"""ATRN domains and the customers allowed to collect them.

Kept in one JSON file the operator can back up (mode 0600; it holds
password-equivalent CRAM-MD5 state, never a plaintext password):

    {"version": 1,
     "users":   {"cust": {"cram-md5": "{CRAM-MD5}<hex>",
                          "scram-sha-256": "{SCRAM-SHA-256}<i>$<salt>$<stored>$<server>"}},
     "domains": {"atrn.example": {"users": ["cust"],
                                  "max_messages": 1000, "max_bytes": 104857600,
                                  "max_message_size": 10485760,
                                  "recipients": ["a@atrn.example"]}}}

The limits are optional; the admission milter enforces them.

A user may collect several domains; a domain may have several users.
:class:`Accounts` is an immutable snapshot (the daemon swaps one reference
on reload); :class:`AccountsFile` does locked read-modify-write for the CLI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

from odmr_bridge import sasl

_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")
_USER = re.compile(r"^[A-Za-z0-9._@+-]{1,128}$")


class AccountsError(Exception):
    """A bad domain, user or file; the message names it."""


def normalize_domain(raw: str) -> str:
    """Lower-case ASCII (IDNA A-label) form of a domain, or AccountsError."""
    name = raw.strip().rstrip(".")
    try:
        ascii_name = name.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise AccountsError(f"{raw!r}: not a valid domain name") from None
    labels = ascii_name.split(".")
    if len(ascii_name) > 253 or len(labels) < 2 or not all(_LABEL.match(x) for x in labels):
        raise AccountsError(f"{raw!r}: not a valid domain name")
    return ascii_name


def recipient_domain(address: str) -> str | None:
    """The normalised domain of ``local@domain``, or None if it has none."""
    local, at, domain = address.rpartition("@")
    if not at or not local:
        return None
    try:
        return normalize_domain(domain)
    except AccountsError:
        return None


def check_user(user: str) -> str:
    if not _USER.match(user):
        raise AccountsError(f"{user!r}: user names are 1-128 of A-Z a-z 0-9 . _ @ + -")
    return user


@dataclasses.dataclass(frozen=True)
class DomainLimits:
    """Admission limits for one ATRN domain (None: no limit / no recipient list)."""

    max_messages: int | None = None
    max_bytes: int | None = None
    max_message_size: int | None = None
    recipients: frozenset[str] | None = None

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> DomainLimits:
        def number(key: str) -> int | None:
            value = data.get(key)
            if value is None:
                return None
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise AccountsError(f"{key}: expected a whole number >= 0, got {value!r}")
            return value
        recipients = data.get("recipients")
        return cls(number("max_messages"), number("max_bytes"), number("max_message_size"),
                   None if recipients is None else frozenset(r.lower() for r in recipients))

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {k: v for k, v in (
            ("max_messages", self.max_messages), ("max_bytes", self.max_bytes),
            ("max_message_size", self.max_message_size)) if v is not None}
        if self.recipients is not None:
            data["recipients"] = sorted(self.recipients)
        return data


NO_LIMITS = DomainLimits()


@dataclasses.dataclass(frozen=True)
class Accounts:
    users: Mapping[str, Mapping[str, str]]
    domains: Mapping[str, tuple[str, ...]]
    limits: Mapping[str, DomainLimits] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}))

    @classmethod
    def empty(cls) -> Accounts:
        return cls(users=MappingProxyType({}), domains=MappingProxyType({}))

    def limits_for(self, domain: str) -> DomainLimits:
        return self.limits.get(domain, NO_LIMITS)

    @classmethod
    def from_data(cls, data: Mapping[str, Any]) -> Accounts:
        """Parse the file's JSON; anything malformed is an AccountsError."""
        try:
            return cls._from_data(data)
        except (AttributeError, TypeError, ValueError) as exc:
            raise AccountsError(f"malformed accounts data: {type(exc).__name__}: {exc}") \
                from None

    @classmethod
    def _from_data(cls, data: Mapping[str, Any]) -> Accounts:
        if not isinstance(data, Mapping) or data.get("version") != 1:
            raise AccountsError("unsupported accounts file version")
        users = {check_user(u): {str(k): str(v) for k, v in dict(creds).items()}
                 for u, creds in dict(data.get("users", {})).items()}
        entries = dict(data.get("domains", {}))
        domains = {normalize_domain(d): tuple(str(u) for u in v.get("users", []))
                   for d, v in entries.items()}
        limits = {normalize_domain(d): DomainLimits.from_data(v) for d, v in entries.items()}
        return cls(users=MappingProxyType(users), domains=MappingProxyType(domains),
                   limits=MappingProxyType({d: x for d, x in limits.items() if x != NO_LIMITS}))

    @classmethod
    def load(cls, path: str | Path) -> Accounts:
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            return cls.empty()
        try:
            return cls.from_data(json.loads(text))
        except (ValueError, AccountsError) as exc:
            raise AccountsError(f"{path}: {exc}") from None

    def to_data(self) -> dict[str, Any]:
        return {
            "version": 1,
            "users": {u: dict(v) for u, v in sorted(self.users.items())},
            "domains": {d: {"users": list(u), **self.limits_for(d).to_data()}
                        for d, u in sorted(self.domains.items())},
        }

    def is_atrn_domain(self, domain: str) -> bool:
        return domain.lower() in self.domains

    def may_collect(self, user: str, domain: str) -> bool:
        return user in self.domains.get(domain, ())

    def domains_for(self, user: str) -> list[str]:
        return sorted(d for d, users in self.domains.items() if user in users)

    def credential(self, user: str, scheme: str) -> str | None:
        return self.users.get(user, {}).get(scheme)

    def credentials(self, user: str) -> Mapping[str, str] | None:
        return self.users.get(user)


class AccountsFile:
    """Locked, durable read-modify-write of the accounts file (CLI side)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def read(self) -> Accounts:
        return Accounts.load(self.path)

    def _write(self, accounts: Accounts) -> None:
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(accounts.to_data(), out, indent=2)
            out.write("\n")
            out.flush()
            os.fsync(out.fileno())
        os.rename(temp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def add_domain(self, domain: str, users: list[str], passwords: Mapping[str, bytes]) -> None:
        """Create an ATRN domain; new users need a password in *passwords*."""
        domain = normalize_domain(domain)
        with self._locked():
            current = self.read()
            if domain in current.domains:
                raise AccountsError(
                    f"domain {domain} exists already; use 'odmr-bridge domain set' to modify it"
                )
            self._write(self._apply(current, domain, list(users), passwords))

    def set_domain(
        self,
        domain: str,
        *,
        users: list[str] | None = None,
        add_users: Sequence[str] = (),
        remove_users: Sequence[str] = (),
        passwords: Mapping[str, bytes] | None = None,
        limits: DomainLimits | None = None,
    ) -> None:
        """Modify an existing ATRN domain's users, their passwords, its limits."""
        domain = normalize_domain(domain)
        with self._locked():
            current = self.read()
            if domain not in current.domains:
                raise AccountsError(
                    f"domain {domain} does not exist; use 'odmr-bridge domain add' to create it"
                )
            wanted = list(current.domains[domain]) if users is None else list(users)
            wanted += [u for u in add_users if u not in wanted]
            wanted = [u for u in wanted if u not in remove_users]
            self._write(self._apply(current, domain, wanted, passwords or {}, limits))

    def remove_domain(self, domain: str) -> None:
        domain = normalize_domain(domain)
        with self._locked():
            current = self.read()
            if domain not in current.domains:
                raise AccountsError(f"domain {domain} does not exist")
            domains = dict(current.domains)
            del domains[domain]
            limits = {d: x for d, x in current.limits.items() if d != domain}
            still_used = {u for us in domains.values() for u in us}
            users = {u: v for u, v in current.users.items() if u in still_used}
            self._write(Accounts(MappingProxyType(users), MappingProxyType(domains),
                                 MappingProxyType(limits)))

    @staticmethod
    def _apply(current: Accounts, domain: str, users: list[str],
               passwords: Mapping[str, bytes], limits: DomainLimits | None = None) -> Accounts:
        if not users:
            raise AccountsError(f"domain {domain}: at least one user must be able to collect it")
        new_users = {u: dict(v) for u, v in current.users.items()}
        for user in users:
            check_user(user)
            if user in passwords:
                if not passwords[user]:
                    raise AccountsError(f"user {user}: empty password")
                new_users[user] = sasl.derive_credentials(passwords[user])
            elif user not in new_users:
                raise AccountsError(f"user {user} is new and needs a password")
        domains = dict(current.domains)
        domains[domain] = tuple(users)
        all_limits = dict(current.limits)
        if limits is not None:
            all_limits[domain] = limits
        still_used = {u for us in domains.values() for u in us}
        new_users = {u: v for u, v in new_users.items() if u in still_used}
        return Accounts(MappingProxyType(new_users), MappingProxyType(domains),
                        MappingProxyType({d: x for d, x in all_limits.items() if x != NO_LIMITS}))
