"""The ``fetch`` subcommand's options and entry point (the parser lives in cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from odmr_bridge import fetch, fetch_config

EPILOG = "exit codes: " + "; ".join(f"{code} {text}" for code, text in fetch.EXIT_CODES.items())


def _interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected seconds > 0, got {text!r}")
    return value


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "fetch", epilog=EPILOG, allow_abbrev=False,
        help="collect mail as an ODMR customer (ATRN) into the local MTA; "
             "settings from -c FILE (TOML) and these options")
    p.add_argument("--provider", metavar="HOST[:PORT]", help="the provider (port 366 if none)")
    p.add_argument("--tls", choices=fetch_config.TLS_MODES,
                   help="starttls (default), tls on connect, or none")
    p.add_argument("--ca-file", help="CA certificates to verify the provider with")
    p.add_argument("--server-name", help="name the provider's certificate must carry "
                                         "(default: its host)")
    p.add_argument("--user", help="the customer user name")
    p.add_argument("--password-file", metavar="FILE",
                   help="file whose first line is the password; - for stdin")
    p.add_argument("--domain", action="append", dest="domains", metavar="DOMAIN",
                   help="a domain to collect (repeatable; none: all of the user's)")
    p.add_argument("--local", metavar="HOST:PORT|PATH", help="the local MTA (default "
                                                              "127.0.0.1:25)")
    p.add_argument("--local-protocol", choices=fetch_config.LOCAL_PROTOCOLS,
                   help="how to talk to the local MTA (default smtp)")
    p.add_argument("--hostname", help="our name in EHLO and in the 220 to the provider")
    p.add_argument("--timeout", type=_interval, metavar="SECONDS",
                   help="per reply (default 300)")
    p.add_argument("--daemon", type=_interval, metavar="INTERVAL",
                   help="keep running: collect every INTERVAL seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="odmr-bridge fetch: %(message)s", stream=sys.stderr)
    overrides = {
        "host": args.provider, "tls": args.tls, "ca_file": args.ca_file,
        "server_name": args.server_name, "user": args.user,
        "password_file": args.password_file, "domains": args.domains,
        "local_address": args.local, "local_protocol": args.local_protocol,
        "local_hostname": args.hostname, "timeout": args.timeout,
    }
    try:
        settings = fetch_config.load(args.config, overrides)
    except fetch_config.FetchConfigError as exc:
        print(f"odmr-bridge fetch: configuration: {exc}", file=sys.stderr)
        return fetch.EXIT_USAGE
    return asyncio.run(fetch.run(settings, args.daemon))
