"""Every Redis key name the bridge uses, built in one place.

The hash tag ``{domain}`` keeps all keys of one domain in one cluster slot,
so each per-domain state change can be one MULTI/EXEC or Lua script.  No
command spans slots (Redis Cluster): the one global key, ``bridge:domains``,
gets its own SADD before a message is indexed, never inside a script, and
other keys in different slots are read one command each.

    bridge:domains                 SET   domains that have (or had) held mail
    bridge:files-store             STRING the host and spool of the files store using
                                         this Redis (a second spool is refused)
    bridge:{d}:deferred            ZSET  qid -> arrival (unix seconds): delivered on ATRN
    bridge:{d}:hold                ZSET  qid -> arrival: on hold by the operator
    bridge:{d}:msg:<qid>           HASH  sender, size, arrival, rcpts (JSON)
                                         [, queue=hold] [, warned=1]
    bridge:{d}:stats               HASH  messages, bytes (held now, both sets)
    bridge:{d}:lease               STRING token of the ATRN session collecting d
                                         (<node>#<random> for the daemon's)
    bridge:authfail:addr:<ip>      STRING failed AUTHs from a client address (expires)
    bridge:authfail:user:<user>    STRING failed AUTHs for a user name (expires)
    bridge:anvil:{<ip>}:conns      ZSET  open port-366 connections from <ip>, all
                                         instances: node:n -> deadline (ms)
    bridge:anvil:{<ip>}:rate       STRING connections from <ip> this minute (expires)
"""

from __future__ import annotations

PREFIX = "bridge"
DOMAINS = f"{PREFIX}:domains"
# The one files store (host and spool) whose index this Redis holds.
FILES_STORE = f"{PREFIX}:files-store"


def _tag(domain: str) -> str:
    return f"{PREFIX}:{{{domain}}}"


def deferred(domain: str) -> str:
    return f"{_tag(domain)}:deferred"


def hold(domain: str) -> str:
    return f"{_tag(domain)}:hold"


def message(domain: str, qid: str) -> str:
    return f"{_tag(domain)}:msg:{qid}"


def stats(domain: str) -> str:
    return f"{_tag(domain)}:stats"


def lease(domain: str) -> str:
    return f"{_tag(domain)}:lease"


def auth_failures_by_address(address: str) -> str:
    return f"{PREFIX}:authfail:addr:{address}"


def auth_failures_by_user(user: str) -> str:
    return f"{PREFIX}:authfail:user:{user}"


def anvil_connections(address: str) -> str:
    return f"{PREFIX}:anvil:{{{address}}}:conns"


def anvil_rate(address: str) -> str:
    return f"{PREFIX}:anvil:{{{address}}}:rate"


# -- the redis store (redis_store.py): message content beside its index entry --
#
#   bridge:{d}:q:<queue>:<qid>     STRING a held message: "<stored> <pieces> <envelope
#                                         length>\n", the envelope JSON, the first
#                                         bytes of content; <queue> is deferred,
#                                         hold or bounce (a move is a RENAME)
#   bridge:{d}:body:<qid>          LIST   the rest of the content, in pieces cut to the
#                                         allocator's size classes (redis_store._cut)
#   bridge:{d}:incoming:<qid>      LIST   pieces being written (expires; renamed to
#                                         body:<qid> by the script that stores the message)
#   bridge:{d}:corrupt:<qid>       STRING a message that failed validation, set aside


def stored(domain: str, queue: str, qid: str) -> str:
    return f"{_tag(domain)}:q:{queue}:{qid}"


def stored_pattern(queue: str = "*", qid: str = "*") -> str:
    """A SCAN MATCH pattern for stored messages of every domain."""
    return f"{PREFIX}:{{*}}:q:{queue}:{qid}"


def pieces(domain: str, qid: str) -> str:
    return f"{_tag(domain)}:body:{qid}"


def incoming(domain: str, qid: str) -> str:
    return f"{_tag(domain)}:incoming:{qid}"


def corrupt(domain: str, qid: str) -> str:
    return f"{_tag(domain)}:corrupt:{qid}"
