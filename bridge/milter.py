"""``odmr-bridge milter``: admission control at the host MTA's SMTP edge (pymilter).

For recipients in ATRN domains the milter refuses, while the sender is still
connected (so no backscatter later):

* at RCPT, ``452 4.2.2`` when the domain's held messages or bytes (the Redis
  index) are at its quota;
* at RCPT, ``550 5.1.1`` for an address not on the domain's recipient list,
  when it has one;
* at end of message, ``552 5.3.4`` when the message is over the size limit
  of one of its ATRN domains.

Recipients outside the ATRN domains pass untouched.  If Redis cannot be
asked, the answer is a tempfail (``milter.on_redis_error = "tempfail"``) or
an acceptance (``"accept"``).  pymilter runs one thread per connection, so
this is its own process with a synchronous Redis client; configuration is a
snapshot per connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import Milter
import redis

from odmr_bridge import keys
from odmr_bridge.accounts import Accounts, DomainLimits, recipient_domain
from odmr_bridge.config import Settings
from odmr_bridge.redis_topology import SyncClient, sync_client
from odmr_bridge.transport_map import watched_atrn_domains
from odmr_bridge.watch import Reloading

log = logging.getLogger("odmr_bridge.milter")


class Policy:
    """What the milter knows: ATRN domains, their limits, and the Redis index."""

    def __init__(self, accounts: Callable[[], Accounts],
                 transport_domains: Callable[[], frozenset[str]],
                 client: SyncClient, on_redis_error: str) -> None:
        self.accounts = accounts
        self.transport_domains = transport_domains
        self.redis = client
        self.tempfail_on_error = on_redis_error == "tempfail"

    def atrn_limits(self, domain: str) -> DomainLimits | None:
        """The domain's limits when it is an ATRN domain, else None."""
        accounts = self.accounts()
        if domain in self.transport_domains() or accounts.is_atrn_domain(domain):
            return accounts.limits_for(domain)
        return None

    def held(self, domain: str) -> tuple[int, int]:
        stats: dict[bytes, bytes] = self.redis.hgetall(keys.stats(domain))  # type: ignore[assignment]
        return int(stats.get(b"messages", 0)), int(stats.get(b"bytes", 0))


class AdmissionMilter(Milter.Base):  # type: ignore[misc]
    policy: Policy  # set by serve()

    def __init__(self) -> None:
        self.id = Milter.uniqueID()
        self.size_limits: dict[str, int] = {}
        self.size = 0

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envfrom(self, mailfrom: str, *params: str) -> Any:
        self.size_limits = {}
        self.size = 0
        return Milter.CONTINUE

    def envrcpt(self, to: str, *params: str) -> Any:
        domain = recipient_domain(to.strip("<>"))
        limits = None if domain is None else self.policy.atrn_limits(domain)
        if domain is None or limits is None:
            return Milter.CONTINUE
        address = to.strip("<>").lower()
        if limits.recipients is not None and address not in limits.recipients:
            self.setreply("550", "5.1.1", f"<{address}>: Recipient address rejected: "
                                          "no such user in this ATRN domain")
            log.info("milter: reject RCPT to=<%s>: not on the recipient list", address)
            return Milter.REJECT
        if limits.max_messages is not None or limits.max_bytes is not None:
            try:
                messages, size = self.policy.held(domain)
            except redis.RedisError as exc:
                log.error("milter: cannot read the hold queue of %s: %s", domain, exc)
                if self.policy.tempfail_on_error:
                    self.setreply("451", "4.3.0", "Hold queue unavailable, try again later")
                    return Milter.TEMPFAIL
                return Milter.CONTINUE
            if (limits.max_messages is not None and messages >= limits.max_messages) or \
                    (limits.max_bytes is not None and size >= limits.max_bytes):
                self.setreply("452", "4.2.2", f"<{address}>: Mailbox full: the hold queue "
                                              f"of {domain} is over its quota")
                log.info("milter: tempfail RCPT to=<%s>: %s over quota (%d messages, "
                         "%d bytes)", address, domain, messages, size)
                return Milter.TEMPFAIL
        if limits.max_message_size is not None:
            self.size_limits[domain] = limits.max_message_size
        return Milter.CONTINUE

    def header(self, name: str, value: str) -> Any:
        self.size += len(name) + len(value) + 4
        return Milter.CONTINUE

    def body(self, chunk: bytes) -> Any:
        self.size += len(chunk)
        return Milter.CONTINUE

    def eom(self) -> Any:
        over = [d for d, limit in self.size_limits.items() if self.size > limit]
        if over:
            self.setreply("552", "5.3.4", f"Message size exceeds the limit of {over[0]}")
            log.info("milter: reject message of %d bytes: over the limit of %s",
                     self.size, ",".join(over))
            return Milter.REJECT
        return Milter.CONTINUE


def serve(settings: Settings) -> int:
    """Run the milter until SIGTERM (pymilter's runmilter)."""
    accounts = Reloading(settings.accounts.file, Accounts.load)
    accounts.start()
    transport_domains = watched_atrn_domains(settings)
    client = sync_client(settings)
    AdmissionMilter.policy = Policy(accounts, transport_domains, client,
                                    settings.milter.on_redis_error)
    Milter.factory = AdmissionMilter
    Milter.set_flags(0)
    log.info("milter listening on %s", settings.milter.listen)
    try:
        Milter.runmilter("odmr-bridge", settings.milter.listen, 240)
    finally:
        accounts.stop()
        transport_domains.stop()
    return 0
