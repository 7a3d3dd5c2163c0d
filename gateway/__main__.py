"""Command line: run, check, demo. Exit status 0 success, 1 failure, 2 usage error."""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

from gateway.config import LOG_LEVELS, load_config
from gateway.errors import ConfigError
from gateway.keys import expiring
from gateway.logs import setup_logging
from gateway.snapshot import build_snapshot, prepare_runtime_dir, stop_agents

TWO_YEARS = timedelta(days=731)


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
    args = parser.parse_args(argv)

    if args.command == "check":
        return _check(args.config)
    if args.command == "demo":
        from gateway.demo import run_demo

        return run_demo()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    setup_logging(args.log_level or config.log_level)
    from gateway.app import serve

    try:
        return asyncio.run(serve(args.config))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: cannot listen: {exc.strerror}", file=sys.stderr)
        return 1


def _check(path: Path) -> int:
    try:
        config = load_config(path)
        root = Path(tempfile.mkdtemp(prefix="gwc-", dir="/tmp"))
        try:
            workdir = prepare_runtime_dir(root)
            snapshot = build_snapshot(config, 1, workdir)
            snapshot.close()
        finally:
            stop_agents(root)
            shutil.rmtree(root, ignore_errors=True)
    except ConfigError as exc:
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
              f"({tls}) -> {route.upstream.url}  own_keys={route.own_keys} "
              f"peer_keys={route.peer_keys}")
    warnings = 0
    for name, keyset in snapshot.keysets.items():
        print(f"keyset {name} ({keyset.type})")
        for key in keyset.keys:
            expiry = key.expires.strftime("%Y-%m-%dT%H:%M:%SZ") if key.expires else "never"
            note = ""
            if key.expires and key.expires <= now:
                note = "  EXPIRED"
            elif key.expires and id(key) in soon:
                days = (key.expires - now).days
                note = f"  WARNING: expires in {days} days"
                warnings += 1
            elif keyset.type == "pgp" and key.private and (
                key.expires is None or key.expires > now + TWO_YEARS
            ):
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
