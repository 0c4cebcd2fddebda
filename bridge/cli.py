"""The operator's commands: ``odmr-bridge serve|reindex|domain|queue``."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime
import getpass
import json
import sys
from collections.abc import Awaitable, Callable
from typing import TextIO

import redis.exceptions

from odmr_bridge import (
    __version__,
    config,
    fetch_cli,
    postfix_setup,
    queue_tools,
    redis_topology,
)
from odmr_bridge.accounts import AccountsError, AccountsFile, DomainLimits, normalize_domain
from odmr_bridge.daemon import Daemon
from odmr_bridge.embedded_redis import EmbeddedRedisError
from odmr_bridge.index import IndexedMessage
from odmr_bridge.logs import finish as finish_logging
from odmr_bridge.logs import setup as setup_logging
from odmr_bridge.queue_setup import StoreClaimed, open_queue
from odmr_bridge.spool import Spool
from odmr_bridge.systemd import ActivationError
from odmr_bridge.transport_map import TransportMap, map_path, reload_postfix

EXIT_USAGE = 2
EXIT_FAILURE = 1


class CliError(Exception):
    """A problem the operator can fix; printed without a traceback."""


def read_password(user: str, stdin: TextIO) -> bytes:
    """From stdin when it is not a terminal (first line), else a prompt. Never argv."""
    if stdin.isatty():
        first = getpass.getpass(f"Password for {user}: ")
        if getpass.getpass(f"Again for {user}: ") != first:
            raise CliError("passwords do not match")
        password = first
    else:
        password = stdin.readline().rstrip("\r\n")
    if not password:
        raise CliError(f"empty password for user {user}")
    return password.encode("utf-8")


# -- domain ------------------------------------------------------------------

def cmd_domain(args: argparse.Namespace, settings: config.Settings) -> int:
    store = AccountsFile(settings.accounts.file)
    if args.action == "list":
        accounts = store.read()
        for domain, users in sorted(accounts.domains.items()):
            print(f"{domain}\t{','.join(users)}")
        return 0
    if args.action == "remove":
        store.remove_domain(args.domain)
        print(f"removed ATRN domain {args.domain}")
        _keep_transport_map_in_step(settings, normalize_domain(args.domain), add=False)
        return 0
    existing = store.read().users
    if args.action == "add":
        passwords = {u: read_password(u, sys.stdin) for u in args.user if u not in existing}
        store.add_domain(args.domain, args.user, passwords)
        print(f"added ATRN domain {args.domain}, collected by {', '.join(args.user)}")
        _keep_transport_map_in_step(settings, normalize_domain(args.domain), add=True)
        return 0
    # set
    changing = list(args.user or []) + list(args.add_user or [])
    need = {u for u in changing if args.password or u not in existing}
    if args.password and not changing:
        raise CliError("--password needs --user or --add-user to name whose password")
    passwords = {u: read_password(u, sys.stdin) for u in sorted(need)}
    store.set_domain(args.domain, users=args.user, add_users=args.add_user or [],
                     remove_users=args.remove_user or [], passwords=passwords,
                     limits=_limits_from(args, store.read().limits_for(
                         normalize_domain(args.domain))))
    users = store.read().domains.get(args.domain.lower(), ())
    print(f"updated ATRN domain {args.domain}, collected by {', '.join(users)}")
    return 0


def _limits_from(args: argparse.Namespace, current: DomainLimits) -> DomainLimits | None:
    """The domain's limits with the options given applied (0: no limit), or None."""
    changes: dict[str, object] = {}
    for name in ("max_messages", "max_bytes", "max_message_size"):
        value = getattr(args, name)
        if value is not None:
            changes[name] = value or None
    if args.recipient:
        changes["recipients"] = frozenset(r.lower() for r in args.recipient)
    if args.no_recipient_list:
        changes["recipients"] = None
    return dataclasses.replace(current, **changes) if changes else None  # type: ignore[arg-type]


def _keep_transport_map_in_step(settings: config.Settings, domain: str, add: bool) -> None:
    """When Postfix is wired up (the transport map exists), route the domain there too."""
    path = map_path(settings)
    if not path.exists():
        return
    table = TransportMap(settings)
    if table.add(domain) if add else table.remove(domain):
        print(f"{'added' if add else 'removed'} {domain} {'to' if add else 'from'} {path}; "
              "postmap done")
        if reload_postfix(settings.postfix.config_dir):
            print(f"reloaded Postfix ({settings.postfix.config_dir})")


def cmd_postfix(args: argparse.Namespace, settings: config.Settings) -> int:
    if args.config_dir:
        settings = dataclasses.replace(settings, postfix=dataclasses.replace(
            settings.postfix, config_dir=args.config_dir))
    plan = postfix_setup.plan_setup if args.action == "setup" else postfix_setup.plan_remove
    postfix_setup.apply(settings, plan(settings, args.milter), args.dry_run, print)
    if args.action == "setup" and not args.dry_run and reload_postfix(
            settings.postfix.config_dir):
        print(f"reloaded Postfix ({settings.postfix.config_dir})")
    return 0


# -- queue -------------------------------------------------------------------

def _format_postqueue(messages: list[IndexedMessage]) -> str:
    """``postqueue -p`` style listing."""
    out = ["-Queue ID-          --Size-- ----Arrival Time---- -Sender/Recipient-------"]
    total = 0
    for m in messages:
        when = datetime.datetime.fromtimestamp(m.arrival).strftime("%a %b %d %H:%M:%S")
        qid = m.qid + ("!" if m.queue == "hold" else "")  # postqueue's mark for on hold
        out.append(f"{qid:<19} {m.size:>8} {when:>20} {m.sender or 'MAILER-DAEMON'}")
        for address, state in m.recipients:
            mark = "" if state == "pending" else f"  ({state})"
            out.append(f"{'':>50}{address}{mark}")
        out.append("")
        total += m.size
    if not messages:
        return "Mail queue is empty"
    kb = (total + 1023) // 1024
    out.append(f"-- {kb} Kbytes in {len(messages)} Request{'s' if len(messages) != 1 else ''}.")
    return "\n".join(out)


async def _queue_list(settings: config.Settings, domain: str | None, as_json: bool) -> int:
    client = await redis_topology.connect(settings)
    try:
        queue = await open_queue(settings, client, Spool(settings.spool.dir))
        messages = await queue.messages(domain.lower() if domain else None)
        # Notices to senders waiting for the host MTA, like Postfix's MAILER-DAEMON entries.
        messages += [n for n in await queue.notices()
                     if domain is None or n.domain == domain.lower()]
    finally:
        await client.aclose()
    messages.sort(key=lambda m: m.arrival)
    if as_json:
        print(json.dumps([
            {"queue_name": m.queue,
             "queue_id": m.qid, "domain": m.domain, "arrival_time": m.arrival,
             "message_size": m.size, "sender": m.sender,
             "recipients": [{"address": a, "state": s} for a, s in m.recipients]}
            for m in messages
        ], indent=1))
    else:
        print(_format_postqueue(messages))
    return 0


async def _queue_tool(settings: config.Settings, args: argparse.Namespace) -> int:
    client = await redis_topology.connect(settings)
    queue = await open_queue(settings, client, Spool(settings.spool.dir))
    try:
        if args.action == "show":
            sys.stdout.buffer.write(await queue_tools.show(queue, args.qid))
        elif args.action in ("delete", "hold", "release", "requeue"):
            qids = list(args.qid)
            if args.domain:
                domain = normalize_domain(args.domain)
                if args.action != "release":
                    qids += await queue.held(domain)
                if args.action != "hold":
                    qids += await queue.on_hold(domain)
            if not qids:
                raise CliError(f"nothing to {args.action}: name queue IDs or --domain")
            if args.action == "requeue":
                for old, new in (await queue_tools.requeue(queue, qids)).items():
                    print(f"{old}: requeued as {new}")
            else:
                verb = {"delete": queue_tools.delete, "hold": queue_tools.hold,
                        "release": queue_tools.release}[args.action]
                done = {"delete": "removed", "hold": "placed on hold",
                        "release": "released from hold"}[args.action]
                for qid in await verb(queue, qids):
                    print(f"{qid}: {done}")
        elif args.action == "summary":
            print(queue_tools.summary(await queue.messages()))
    finally:
        await client.aclose()
    return 0


# How long `reindex` waits for a domain's lease (a queue pass, another reindex).
REINDEX_WAIT = 10.0


async def _reindex(settings: config.Settings) -> int:
    client = await redis_topology.connect(settings)
    try:
        queue = await open_queue(settings, client, Spool(settings.spool.dir))
        report = await queue.reindex(wait=REINDEX_WAIT)
    finally:
        await client.aclose()
    print(f"reindexed {report.messages} message(s) in {report.domains} domain(s); "
          f"{report.added} added, {report.removed} stale entries removed; "
          f"{report.corrupt} corrupt file(s) moved to corrupt/")
    if report.busy:
        print(f"not reindexed, being collected: {', '.join(report.busy)}; run again later",
              file=sys.stderr)
        return EXIT_FAILURE
    return 0


# -- wiring ------------------------------------------------------------------

def run_milter(settings: config.Settings) -> int:
    try:
        from odmr_bridge.milter import serve
    except ImportError as exc:
        raise CliError(f"the milter needs pymilter: pip install 'odmr-bridge[milter]' ({exc})") \
            from None
    return serve(settings)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="odmr-bridge", description=__doc__)
    parser.add_argument("-c", "--config", help="TOML configuration file")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    sub.add_parser("serve", help="run the LMTP intake and the ODMR listener")
    sub.add_parser("reindex", help="mend the Redis index from the spool (safe while serving)")
    sub.add_parser("milter", help="run the admission milter (needs pymilter)")

    domain = sub.add_parser("domain", help="ATRN domains and who may collect them")
    dsub = domain.add_subparsers(dest="action", required=True)
    add = dsub.add_parser("add", help="create an ATRN domain (password on stdin or prompt)")
    add.add_argument("domain")
    add.add_argument("--user", action="append", required=True,
                     help="customer allowed to collect the domain (repeatable)")
    change = dsub.add_parser("set", help="modify an existing ATRN domain")
    change.add_argument("domain")
    change.add_argument("--user", action="append",
                        help="replace the domain's users with these (repeatable)")
    change.add_argument("--add-user", action="append", help="also allow this user")
    change.add_argument("--remove-user", action="append", help="no longer allow this user")
    change.add_argument("--password", action="store_true",
                        help="set a new password for the users named by --user/--add-user")
    for option, text in (("--max-messages", "held messages before the milter says 452"),
                         ("--max-bytes", "held bytes before the milter says 452"),
                         ("--max-message-size", "bytes per message before the milter says 552")):
        change.add_argument(option, type=_count, metavar="N", help=f"{text} (0: no limit)")
    change.add_argument("--recipient", action="append",
                        help="the domain's only valid recipients (repeatable); others get 550")
    change.add_argument("--no-recipient-list", action="store_true",
                        help="accept any recipient of the domain again")
    remove = dsub.add_parser("remove", help="delete an ATRN domain")
    remove.add_argument("domain")
    dsub.add_parser("list", help="list ATRN domains and their users")

    postfix = sub.add_parser("postfix", help="wire the bridge into Postfix (postconf)")
    psub = postfix.add_subparsers(dest="action", required=True)
    for action, text in (("setup", "add the lmtp clone, transport map, relay_domains, milter"),
                         ("remove", "undo what setup added")):
        step = psub.add_parser(action, help=text)
        step.add_argument("--config-dir", help="Postfix config directory (postconf -c)")
        step.add_argument("--dry-run", action="store_true", help="print, change nothing")
        step.add_argument("--milter", help="admission milter address for smtpd_milters, "
                                           "e.g. inet:127.0.0.1:8891")

    queue = sub.add_parser("queue", help="inspect the hold queue")
    qsub = queue.add_subparsers(dest="action", required=True)
    qlist = qsub.add_parser("list", help="list held mail, like postqueue -p")
    qlist.add_argument("domain", nargs="?")
    qlist.add_argument("--json", action="store_true", help="one JSON array")
    qshow = qsub.add_parser("show", help="one message: envelope, recipients, content (postcat)")
    qshow.add_argument("qid")
    for action, text in (
            ("delete", "remove held messages (postsuper -d)"),
            ("hold", "keep messages from delivery and expiry until released (postsuper -h)"),
            ("release", "make messages on hold deliverable again (postsuper -H)"),
            ("requeue", "new queue ID and arrival time: expiry restarts (postsuper -r)")):
        step = qsub.add_parser(action, help=text)
        step.add_argument("qid", nargs="*")
        step.add_argument("--domain", help="every message held for this domain")
    qsub.add_parser("summary", help="held messages by domain and age in minutes (qshape)")
    fetch_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "fetch":  # the customer side: its own settings (-c: its TOML)
        return fetch_cli.main(args)
    try:
        settings = config.load(args.config)
    except config.ConfigError as exc:
        print(f"odmr-bridge: configuration: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Like openlog(3), a syslog socket that is not there yet is retried at each line.
    setup_logging(settings.log.level, settings.log.target, settings.log.syslog_socket)
    runners: dict[str, Callable[[], Awaitable[int] | int]] = {
        "serve": lambda: Daemon(settings).run(),
        "reindex": lambda: _reindex(settings),
        "domain": lambda: cmd_domain(args, settings),
        "postfix": lambda: cmd_postfix(args, settings),
        "milter": lambda: run_milter(settings),
        "queue": lambda: (_queue_list(settings, args.domain, args.json)
                          if args.action == "list" else _queue_tool(settings, args)),
    }
    try:
        result = runners[args.command]()
        if not isinstance(result, int):
            result = asyncio.run(result)  # type: ignore[arg-type]
        return result
    except (CliError, AccountsError, EmbeddedRedisError, ActivationError,
            queue_tools.QueueToolError, StoreClaimed) as exc:
        return _fail(str(exc))
    except redis_topology.RedisUnreachable as exc:
        private = args.command != "serve" and not (
            settings.redis.url or settings.redis.cluster_nodes or settings.redis.sentinels)
        return _fail(f"{exc}{'; is the bridge running?' if private else ''}")
    except (ConnectionError, redis.exceptions.ConnectionError) as exc:
        return _fail(f"cannot reach Redis ({exc}); is the bridge running?")


def _fail(text: str) -> int:
    """The command's last word on stderr, after every log line already said."""
    finish_logging()
    print(f"odmr-bridge: {text}", file=sys.stderr)
    return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
