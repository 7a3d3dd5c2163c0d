"""Command line: run, check, demo, keys, open, seal, echo. Exit status 0 success, 1 failure,
2 usage error."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import resource
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from gateway import hangup
from gateway.config import LOG_LEVELS, Config, load_config, shown_url
from gateway.errors import ConfigError, EngineError
from gateway.keys import days_left, expiring, valid_too_long
from gateway.keytool import (
    UsageError,
    echo,
    generate_jose,
    generate_pgp,
    list_keys,
    open_body,
    parse_validity,
    seal_body,
)
from gateway.logs import setup_logging
from gateway.snapshot import (
    build_snapshot,
    prepare_runtime_dir,
    remove_runtime_dir,
    stop_agents,
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gateway",
        description="Encryption gateway for Google's Cards QR API (PGP or JWS+JWE).",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="serve until SIGTERM/SIGINT; reload on SIGHUP")
    run.add_argument("--config", required=True, type=Path, help="path to config.yaml")
    run.add_argument("--log-level", choices=LOG_LEVELS, help="overrides log_level")
    check = commands.add_parser("check", help="validate config, keys and certificates")
    check.add_argument("--config", required=True, type=Path, help="path to config.yaml")
    commands.add_parser("demo", help="run a complete local setup end to end and exit")
    _key_commands(commands)
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check(args.config)
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo()
    if args.command in ("keys", "open", "seal", "echo"):
        return _key_command(parser, args)
    hangup.hold()  # first: a SIGHUP while starting must not kill the process
    from gateway.app import load_run_config

    try:
        config = load_run_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    writer = setup_logging(args.log_level or config.log_level, pinned=bool(args.log_level))
    try:
        return _serve(config)  # loaded once (a listener's host is resolved on the way)
    finally:
        writer.stop()  # every line written before `run` returns


def _serve(config: Config) -> int:
    _tune_malloc()
    # A core file of this process would hold card data and private keys: none, for it and for
    # every child (gpg and its agents inherit the limit).
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    from gateway.app import serve

    try:
        return _run_loop(serve(config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1
    except Exception:
        # Logs stay one JSON object per line, and an exception's text may quote payload bytes:
        # the formatter keeps its type and where it went through, never its message.
        logging.getLogger("gateway").critical("crashed", exc_info=True)
        return 1


def _tune_malloc() -> None:
    """glibc only: two malloc arenas, free memory at the top of the heap returned to the system
    past 128 KiB, and every block of 128 KiB or more mapped on its own (so returned when freed).
    With the defaults (8 arenas per core, a trim threshold that grows up to 32 MiB), 256
    connections sending 64 KiB bodies left ~20 MiB more at peak and kept ~60 MiB after the burst
    (bench/README.md, memory). The mapping threshold is set, not left at its default, because
    glibc raises it to the size of any mapped block freed before this call (start-up frees
    some) and then serves later blocks of up to that size, uvloop's 256 KiB TLS read buffer of
    each connection among them, from the heap, whose freed holes stay resident: 158-173 MiB
    instead of 186-213 at that peak. Elsewhere nothing is changed."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_arena_max, 2)
    mallopt(m_trim_threshold, 128 * 1024)
    mallopt(m_mmap_threshold, 128 * 1024)


def _run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run `main` on uvloop when it is installed (faster HTTP and TLS), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def _key_commands(commands: Any) -> None:
    """keys generate pgp|jose, keys list, open, seal, echo (gateway/keytool.py)."""
    keys = commands.add_parser("keys", help="generate keys, list a configuration's keys")
    keys_commands = keys.add_subparsers(dest="keys_command", required=True)
    generate = keys_commands.add_parser("generate", help="make a key pair to Google's rules")
    schemes = generate.add_subparsers(dest="scheme", required=True)
    pgp = schemes.add_parser("pgp", help="RSA primary (sign, certify) + RSA encryption subkey")
    pgp.add_argument("--name", required=True, help="key id and file name; the user id's name")
    pgp.add_argument("--email", required=True, help="the user id's email address")
    pgp.add_argument("--bits", type=int, default=3072, help="RSA size (2048-4096; 3072)")
    pgp.add_argument("--expires", type=_validity, default="1y",
                     help="validity: Nd, Nw, Nm or Ny (1y; at most two years)")
    pgp.add_argument("--passphrase-file", type=Path, help="protect the secret key with this")
    pgp.add_argument("--out", required=True, type=Path, help="directory for the key files")
    jose = schemes.add_parser("jose", help="a JWK for signing or for encryption")
    jose.add_argument("--kid", required=True, help="key id (kid) and file name")
    jose.add_argument("--use", required=True, choices=("sig", "enc"))
    jose.add_argument("--alg", choices=("RS256", "PS256", "ES256", "RSA-OAEP-256"),
                      help="RS256 (sig) or RSA-OAEP-256 (enc) unless given")
    jose.add_argument("--bits", type=int, help="RSA size (2048-4096; 3072)")
    jose.add_argument("--out", required=True, type=Path, help="directory for the key files")
    listing = keys_commands.add_parser("list", help="every keyset and key with its facts")
    listing.add_argument("--config", required=True, type=Path, help="path to config.yaml")
    listing.add_argument("--json", action="store_true", help="one JSON object per key")
    for name, does in (("open", "open a captured body (stdin) as the route would"),
                       ("seal", "seal a plaintext body (stdin) as the route would")):
        command = commands.add_parser(name, help=does)
        command.add_argument("--config", required=True, type=Path, help="path to config.yaml")
        command.add_argument("--route", required=True, help="route name")
        command.add_argument("--response", action="store_true",
                             help="the body is a response (default: a request)")
        if name == "open":
            command.add_argument("--show-payment-data", action="store_true",
                                 help="print card numbers and cryptograms unmasked")
    echo = commands.add_parser("echo", help="send an echo to Google through an outbound route")
    echo.add_argument("--config", required=True, type=Path, help="path to config.yaml")
    echo.add_argument("--route", required=True, help="an outbound route's name")
    echo.add_argument("--account", required=True, help="the payment integrator account id")


def _validity(text: str) -> int:
    try:
        return parse_validity(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _key_command(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        if args.command == "keys" and args.keys_command == "list":
            return list_keys(args.config, as_json=args.json)
        if args.command == "keys" and args.scheme == "pgp":
            return generate_pgp(args.name, args.email, bits=args.bits, valid_days=args.expires,
                                passphrase_file=args.passphrase_file, out=args.out)
        if args.command == "keys":
            return generate_jose(args.kid, args.use, alg=args.alg, bits=args.bits, out=args.out)
        if args.command == "echo":
            return echo(args.config, args.route, args.account)
        body = sys.stdin.buffer.read()
        if args.command == "open":
            return open_body(args.config, args.route, body, response=args.response,
                             show_payment_data=args.show_payment_data)
        return seal_body(args.config, args.route, body, response=args.response)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _check(path: Path) -> int:
    try:
        config = load_config(path)
        # The configured runtime_dir: in a container it is the one writable place.
        workdir = prepare_runtime_dir(config.runtime_dir)
        try:
            snapshot = build_snapshot(config, 1, workdir)
            snapshot.close()
        finally:
            stop_agents(workdir)
            remove_runtime_dir(workdir)
    except (ConfigError, EngineError) as exc:  # our texts: a place, never key material
        print(f"error: {exc}", file=sys.stderr)
        return 1
    now = datetime.now(UTC)
    soon = {id(key) for _, key in expiring(snapshot.keysets.values(),
                                           timedelta(days=config.warn_expiry_days), now)}
    print(f"config {config.path}: valid")
    print(f"admin  {config.admin_listen}")
    for route in config.routes:
        tls = "tls" if route.tls else "plain"
        if route.tls and route.tls.client_ca:
            tls = "mutual tls"
        print(f"route  {route.name}: {route.direction} {route.scheme} listen {route.listen} "
              f"({tls}) -> {shown_url(route.upstream.url)}  own_keys={route.own_keys} "
              f"peer_keys={route.peer_keys}")
    warnings = 0
    for name, keyset in snapshot.keysets.items():
        print(f"keyset {name} ({keyset.type})")
        for key in keyset.keys:
            expiry = key.expires.strftime("%Y-%m-%dT%H:%M:%SZ") if key.expires else "never"
            note = ""
            if key.expired(now):
                note = "  EXPIRED"
            elif key.expires and id(key) in soon:
                note = f"  WARNING: expires in {int(days_left(key, now) or 0)} days"
                warnings += 1
            elif valid_too_long(keyset, key, now):
                note = "  WARNING: valid for more than two years (Google: one year, two at most)"
                warnings += 1
            kind = "private" if key.private else "public"
            print(f"  {key.id:<24} {key.state.value:<10} {kind:<7} {key.algorithm:<9} "
                  f"{'+'.join(key.capabilities):<12} {key.fingerprint}  expires {expiry}{note}")
    if warnings:
        print(f"{warnings} warning(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
