"""Key lifecycle from the command line: make keys, list keysets, seal and open bodies as a route
does, and an `echo` through an outbound route that checks our keys and Google's end to end."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import ssl
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.config import (
    Config,
    KeyConfig,
    KeysetConfig,
    KeyState,
    RouteConfig,
    load_config,
    shown_url,
)
from gateway.envelope import Opened, Sealed
from gateway.errors import ConfigError, EngineError, EnvelopeError, GatewayError
from gateway.jose import generate_jwk, jwe_header, load_jose_keyset
from gateway.keys import Key, Keyset, days_left, key_warnings
from gateway.pgp import (
    KEY_PREFERENCES,
    generate_pgp_key,
    load_pgp_keyset,
    message_recipients,
    pgp_key_ids,
)
from gateway.snapshot import (
    RouteRuntime,
    Snapshot,
    build_snapshot,
    prepare_runtime_dir,
    remove_runtime_dir,
    stop_agents,
)

__all__ = [
    "UsageError",
    "echo",
    "generate_jose",
    "generate_pgp",
    "list_keys",
    "mask_payment_data",
    "open_body",
    "parse_validity",
    "seal_body",
]

KEY_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")  # config.md's key ids (and our file names)
_ACCOUNT = re.compile(r"^[A-Za-z0-9._:~-]{1,100}$")
_DAYS_PER_UNIT = {"d": 1, "w": 7, "m": 30, "y": 365}  # gpg's own reading of Nd, Nw, Nm, Ny
# Payment data in plaintext shown to people (protocol.md section 6).
_CARD_NUMBER = re.compile(r"^\d{13,19}$")
_NOT_PAYMENT_DATA = {"epochMillis"}  # 13-digit timestamps, not card numbers


class UsageError(GatewayError):
    """The command line names something the configuration does not have (exit status 2)."""


class _Failed(GatewayError):
    """The operation failed; the message says why (exit status 1)."""


# ---------------------------------------------------------------------------------------------
# keys generate


def parse_validity(text: str) -> int:
    """`Nd`, `Nw`, `Nm` or `Ny` as a number of days (gpg's units: a month is 30 days, a year
    365). Raises ValueError for anything else."""
    match = re.fullmatch(r"([1-9][0-9]{0,4})([dwmy])", text.strip())
    if not match:
        raise ValueError(f"'{text}' is not a validity such as 365d, 52w, 12m or 1y")
    return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)]


def generate_pgp(name: str, email: str, *, bits: int, valid_days: int,
                 passphrase_file: Path | None, out: Path) -> int:
    """`keys generate pgp`: write NAME.sec.asc and NAME.pub.asc into `out`, check that the
    gateway loads the secret key, print fingerprints, expiry and the YAML to paste. 0 or 1."""
    try:
        _check_name(name, "--name")
        passphrase = None if passphrase_file is None else _read_passphrase(passphrase_file)
        secret_path, public_path = out / f"{name}.sec.asc", out / f"{name}.pub.asc"
        _refuse_existing(secret_path, public_path)
        with _scratch("gwg-") as root:
            key = generate_pgp_key(name, email, bits=bits, valid_days=valid_days,
                                   passphrase=passphrase, workdir=root)
            _write(secret_path, key.secret, private=True)
            _write(public_path, key.public, private=False)
            loaded = _load_one("pgp", KeyConfig(
                id=name, file=secret_path, state=KeyState.READ_ONLY, place="generated",
                passphrase_file=passphrase_file, passphrase=passphrase), root)
    except ConfigError as exc:
        return _fail(f"{_flag(exc.place)}{exc.message}")
    except (EngineError, _Failed) as exc:
        return _fail(str(exc))
    days = (key.expires - key.created).total_seconds() / 86400
    protection = "passphrase-protected" if passphrase is not None else "NOT passphrase-protected"
    print(f"wrote {secret_path}  (secret key, {protection}: keep it private)")
    print(f"wrote {public_path}  (public key: give this file to Google)")
    print(f"user id      {key.user_id}")
    print(f"primary key  RSA-{key.bits}  sign, certify  {key.fingerprint}")
    print(f"subkey       RSA-{key.bits}  encrypt        {key.subkey_fingerprint}")
    print(f"expires      {_iso(key.expires)}  ({days:.0f} days)")
    print(f"preferences  {KEY_PREFERENCES}")
    print(f"gateway      loads it: {loaded.algorithm}, {'+'.join(loaded.capabilities)}")
    print()
    print("Add it under keysets.<own keyset>.keys, read-only until Google encrypts to it "
          "(docs/key-rotation.md):")
    snippet = f"      - id: {name}\n        file: {secret_path}\n"
    if passphrase_file is not None:
        snippet += f"        passphrase_file: {passphrase_file}\n"
    print(snippet + "        state: read-only")
    return 0


def generate_jose(kid: str, use: str, *, alg: str | None, bits: int | None, out: Path) -> int:
    """`keys generate jose`: write KID.private.jwk and KID.public.jwk into `out`, check that the
    gateway loads them, print the thumbprint and the YAML to paste. 0 or 1."""
    try:
        _check_name(kid, "--kid")
        private_path, public_path = out / f"{kid}.private.jwk", out / f"{kid}.public.jwk"
        _refuse_existing(private_path, public_path)
        if bits is not None and alg == "ES256":
            raise _Failed("--bits: ES256 keys are EC P-256; --bits is for RSA keys")
        private, public = generate_jwk(kid, use, alg=alg, bits=bits or 3072)
        _write(private_path, private.encode("utf-8"), private=True)
        _write(public_path, public.encode("utf-8"), private=False)
        loaded = _load_one("jose", KeyConfig(id=kid, file=private_path,
                                             state=KeyState.READ_ONLY, place="generated"), None)
    except ConfigError as exc:
        return _fail(f"{_flag(exc.place)}{exc.message}")
    except (EngineError, _Failed) as exc:
        return _fail(str(exc))
    print(f"wrote {private_path}  (private JWK: keep it private)")
    print(f"wrote {public_path}  (public JWK: give this file to Google)")
    print(f"kid          {kid}")
    print(f"use          {use}  ({'+'.join(loaded.capabilities)})")
    print(f"alg          {json.loads(public)['alg']}")
    print(f"key          {loaded.algorithm}")
    print(f"thumbprint   {loaded.fingerprint}  (RFC 7638)")
    print()
    print("Add it under keysets.<own keyset>.keys, read-only until Google uses it "
          "(docs/key-rotation.md):")
    print(f"      - id: {kid}\n        file: {private_path}\n        state: read-only")
    return 0


def _check_name(name: str, flag: str) -> None:
    if not KEY_ID.match(name):
        raise _Failed(f"{flag}: '{name}' is not a key id (1-128 of A-Z a-z 0-9 . _ : @ + -); "
                      "it names the key in the configuration and its files")


def _read_passphrase(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        raise _Failed(f"--passphrase-file: cannot read '{path}'") from None
    # As in config.md: the trailing newline is not part of the passphrase.
    return text.removesuffix("\n").removesuffix("\r")


def _refuse_existing(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise _Failed(f"{path} exists; not overwritten (move it away or choose another name)")


def _write(path: Path, data: bytes, *, private: bool) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
    except OSError as exc:
        raise _Failed(f"cannot write {path}: {exc.strerror}") from None


def _load_one(scheme: str, key: KeyConfig, workdir: Path | None) -> Key:
    """Load a freshly written key exactly as the gateway will."""
    keyset = KeysetConfig(name="generated", type=scheme, keys=(key,),  # type: ignore[arg-type]
                          place="generated")
    if scheme == "pgp":
        assert workdir is not None
        return load_pgp_keyset(keyset, workdir / "load").keys[0]
    return load_jose_keyset(keyset).keys[0]


def _flag(place: str) -> str:
    return f"--{place}: " if place else ""


# ---------------------------------------------------------------------------------------------
# keys list


@dataclass(frozen=True)
class KeyFacts:
    """One key as `keys list` shows it; `as_json` gives the README's field names."""

    keyset: str
    type: str
    key: Key
    routes: tuple[tuple[str, str, str], ...]  # (route, direction, "own_keys" | "peer_keys")
    ops: tuple[str, ...]
    days_left: float | None  # rounded to a tenth: not what `expired` is decided on
    expired: bool
    warnings: tuple[str, ...]

    def as_json(self) -> dict[str, Any]:
        k = self.key
        return {
            "keyset": self.keyset,
            "type": self.type,
            "id": k.id,
            "state": k.state.value,
            "private": k.private,
            "algorithm": k.algorithm,
            "bits": _bits(k.algorithm),
            "fingerprint": k.fingerprint,
            "capabilities": list(k.capabilities),
            "ops": list(self.ops),
            "expires": _iso(k.expires) if k.expires else None,
            "days_left": self.days_left,
            "expired": self.expired,
            "routes": [{"route": r, "direction": d, "role": role} for r, d, role in self.routes],
            "warnings": list(self.warnings),
        }


def list_keys(config_path: Path, *, as_json: bool) -> int:
    """`keys list`: every keyset and key of a valid configuration with its facts. 0 or 1."""
    try:
        with _loaded(config_path) as snapshot:
            facts = key_facts(snapshot, datetime.now(UTC))
    except (ConfigError, EngineError) as exc:
        return _fail(str(exc))
    if as_json:
        print(json.dumps([f.as_json() for f in facts], indent=2))
        return 0
    warn = _style(sys.stdout)
    for name, keyset in snapshot.keysets.items():
        mine = [f for f in facts if f.keyset == name]
        uses = sorted({f"{r} ({role.removesuffix('_keys')})" for f in mine for r, _, role in
                       f.routes})
        print(f"keyset {name} ({keyset.type}) used by: {', '.join(uses) or 'no route'}")
        for f in mine:
            k = f.key
            expiry = "expires never"
            if k.expires is not None and f.days_left is not None:
                expiry = f"expires {_iso(k.expires)} ({int(f.days_left)} days left)"
            print(f"  {k.id:<22} {k.state.value:<9} {'private' if k.private else 'public':<7} "
                  f"{k.algorithm:<9} {'+'.join(k.capabilities):<12} {k.fingerprint}")
            print(f"  {'':<22} {expiry}; does: {', '.join(f.ops) or 'nothing'}")
            for warning in f.warnings:
                print(f"  {'':<22} {warn('WARNING: ' + warning)}")
    return 0


def key_facts(snapshot: Snapshot, now: datetime) -> list[KeyFacts]:
    """The facts of every key of `snapshot`, in configuration order."""
    config = snapshot.config
    facts = []
    soon = timedelta(days=config.warn_expiry_days)
    for name, keyset in snapshot.keysets.items():
        routes = tuple((r.name, r.direction, role) for r in config.routes
                       for role in ("own_keys", "peer_keys") if getattr(r, role) == name)
        roles = {role for _, _, role in routes}
        for key in keyset.keys:
            ops = _ops(keyset, key, roles)
            warnings = key_warnings(keyset, key, soon, now)
            if not routes:
                warnings.append("its keyset is used by no route")
            facts.append(KeyFacts(name, keyset.type, key, routes, ops, days_left(key, now),
                                  key.expired(now),
                                  tuple(warnings)))
    return facts


def _ops(keyset: Keyset, key: Key, roles: set[str]) -> tuple[str, ...]:
    """What the gateway does with `key` now, per protocol.md section 8."""
    ops: list[str] = []
    if "own_keys" in roles:
        ops += ["sign"] if key in keyset.signers() else []
        ops += ["decrypt"] if key in keyset.decryptors() else []
    if "peer_keys" in roles:
        ops += ["encrypt"] if key in keyset.recipients() else []
        ops += ["verify"] if key in keyset.verifiers() else []
    return tuple(ops)


def _bits(algorithm: str) -> int | None:
    digits = algorithm.rsplit("-", 1)[-1].lstrip("P")
    return int(digits) if digits.isdigit() else None


# ---------------------------------------------------------------------------------------------
# open and seal


def open_body(config_path: Path, route_name: str, body: bytes, *, response: bool,
              show_payment_data: bool) -> int:
    """`open`: what `route_name` makes of a captured request (or response) body. Prints the
    keys that decrypted and verified on stderr and the plaintext on stdout (payment data
    masked unless `show_payment_data`), or the precise reason it cannot be opened. 0 or 1.
    Raises UsageError when the route does not open that kind of body."""
    try:
        with _loaded(config_path) as snapshot:
            route = _route(snapshot, route_name, "open", response)
            what = "response" if response else "request"
            opened = _open(snapshot, route, body, what)
    except (ConfigError, EngineError, _Failed) as exc:
        return _fail(str(exc))
    print(f"opened the {what} body with route '{route_name}' ({route.config.scheme})",
          file=sys.stderr)
    print(f"decrypted by: {_ids(opened.decrypted_by, route.config.own_keys)}", file=sys.stderr)
    print(f"verified:     {_ids(opened.verified_by, route.config.peer_keys)}", file=sys.stderr)
    if show_payment_data:
        sys.stdout.flush()
        sys.stdout.buffer.write(opened.plaintext)
        sys.stdout.buffer.flush()
    else:
        print(show_masked(opened.plaintext))
    return 0


def seal_body(config_path: Path, route_name: str, plaintext: bytes, *, response: bool) -> int:
    """`seal`: what `route_name` sends for a plaintext request (or response) body: the wire
    body on stdout, the keys that signed and encrypted on stderr. 0 or 1.
    Raises UsageError when the route does not seal that kind of body."""
    try:
        with _loaded(config_path) as snapshot:
            route = _route(snapshot, route_name, "seal", response)
            _check_size(snapshot.config, plaintext)
            try:
                sealed = route.envelope.seal(plaintext)
            except EnvelopeError as exc:
                raise _Failed(f"cannot seal: {exc.reason}: {exc}") from None
    except (ConfigError, EngineError, _Failed) as exc:
        return _fail(str(exc))
    what = "response" if response else "request"
    print(f"sealed the {what} body with route '{route_name}' ({route.config.scheme}), "
          f"Content-Type: {route.envelope.content_type}", file=sys.stderr)
    print(f"signed by:    {_ids(sealed.signed_by, route.config.own_keys)}", file=sys.stderr)
    print(f"encrypted to: {_ids(sealed.encrypted_to, route.config.peer_keys)}", file=sys.stderr)
    sys.stdout.flush()
    sys.stdout.buffer.write(sealed.body + b"\n")
    sys.stdout.buffer.flush()
    return 0


def _route(snapshot: Snapshot, name: str, op: str, response: bool) -> RouteRuntime:
    """The route, if it does `op` ("open" or "seal") to that kind of body. Raises UsageError."""
    route = snapshot.routes.get(name)
    if route is None:
        raise UsageError(f"--route: no route named '{name}' (routes: "
                         f"{', '.join(snapshot.routes)})")
    inbound = route.config.direction == "inbound"
    opens_requests = inbound
    if op == "open" and response == opens_requests:
        raise UsageError(_direction_hint(route.config, op))
    if op == "seal" and response != opens_requests:
        raise UsageError(_direction_hint(route.config, op))
    return route


def _direction_hint(route: RouteConfig, op: str) -> str:
    if route.direction == "inbound":
        does = "opens requests and seals responses"
        fix = "open (a request)" if op == "open" else "seal --response"
    else:
        does = "seals requests and opens responses"
        fix = "open --response" if op == "open" else "seal (a request)"
    return f"route '{route.name}' is {route.direction}: it {does}; use `{fix}`"


def _open(snapshot: Snapshot, route: RouteRuntime, body: bytes, what: str) -> Opened:
    """Open `body` with the route's envelope, or raise _Failed with the precise reason and
    what the message shows of the keys it names."""
    _check_size(snapshot.config, body)
    if not body.strip():
        raise _Failed(f"cannot open the {what} body: malformed: the body is empty")
    try:
        return route.envelope.open(body)
    except EnvelopeError as exc:
        lines = [f"cannot open the {what} body: {exc.reason}: {exc}",
                 f"  layer: {exc.layer}"]
        lines += [f"  {line}" for line in explain(snapshot, route, body, str(exc))]
        raise _Failed("\n".join(lines)) from None


def explain(snapshot: Snapshot, route: RouteRuntime, body: bytes, message: str) -> list[str]:
    """What the message and the error name of keys, said in the configuration's terms: each
    recipient key id / kid and signer named, and which configured key (and state) it is."""
    own = snapshot.keysets[route.config.own_keys]
    peer = snapshot.keysets[route.config.peer_keys]
    lines: list[str] = []
    if route.config.scheme == "pgp":
        try:
            recipients = message_recipients(body)
        except EnvelopeError:
            recipients = ()
        for key_id in recipients:
            lines.append(f"encrypted to key id {key_id}: {_pgp_owner(key_id, own, peer)}")
        for key_id in dict.fromkeys(re.findall(r"\bkey id ([0-9A-F]{16})\b", message)):
            lines.append(f"signed by key id {key_id}: {_pgp_owner(key_id, peer, own)}")
        return lines
    header = jwe_header(body)
    if header is not None:
        kid = header.get("kid")
        lines.append(f"JWE alg {_shown(header.get('alg'))}, enc {_shown(header.get('enc'))}, "
                     f"kid {_shown(kid) if kid is not None else '(none)'}"
                     + (f": {_jose_owner(kid, own)}" if isinstance(kid, str) else ""))
    for kid in dict.fromkeys(re.findall(r"JWS kid '([^']*)'|peer key '([^']*)'", message)):
        named = kid[0] or kid[1]
        lines.append(f"JWS kid {named}: {_jose_owner(named, peer)}")
    return lines


def _shown(value: object) -> str:
    """A header value from the message, safe to print: as is when it looks like a name or an
    algorithm, else quoted and cut short (it may carry control characters)."""
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z0-9._:@+-]{1,64}", value):
        return value
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _pgp_owner(key_id: str, expected: Keyset, other: Keyset) -> str:
    for keyset in (expected, other):
        for key in keyset.keys:
            if key_id in pgp_key_ids(key):
                return f"key '{key.id}' of keyset '{keyset.name}'{_state(key)}"
    return f"no key of keyset '{expected.name}' (nor '{other.name}')"


def _jose_owner(kid: str, keyset: Keyset) -> str:
    key = keyset.by_id(kid)
    if key is None:
        return f"no key of keyset '{keyset.name}' has this kid"
    return f"key '{key.id}' of keyset '{keyset.name}'{_state(key)}"


def _state(key: Key) -> str:
    notes = [key.state.value]
    if key.expires is not None and key.expires <= datetime.now(UTC):
        notes.append(f"expired {_iso(key.expires)}")
    return f" ({', '.join(notes)})"


def _check_size(config: Config, body: bytes) -> None:
    cap = config.limits.max_body_bytes
    if len(body) > cap:
        raise _Failed(f"too_large: the body of {len(body)} bytes is over limits.max_body_bytes "
                      f"({cap})")


def _ids(ids: tuple[str, ...], keyset: str) -> str:
    return f"{', '.join(ids) or 'none'} (keyset {keyset})"


# ---------------------------------------------------------------------------------------------
# Payment data


def mask_payment_data(value: Any, key: str | None = None) -> Any:
    """A copy of a JSON value with card numbers (last four digits kept), cryptograms and any
    other 13-19 digit string masked."""
    if isinstance(value, dict):
        return {k: mask_payment_data(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_payment_data(v, key) for v in value]
    if key == "cryptogram" and value is not None:
        return "****"
    if key == "cardNumber" and value is not None:
        return _mask_digits(str(value))
    if key in _NOT_PAYMENT_DATA:
        return value
    if isinstance(value, str) and _CARD_NUMBER.match(value.replace(" ", "").replace("-", "")):
        return _mask_digits(value)
    if isinstance(value, int) and not isinstance(value, bool) and _CARD_NUMBER.match(str(value)):
        return _mask_digits(str(value))
    return value


def _mask_digits(text: str) -> str:
    digits = re.sub(r"\D", "", text)
    return "*" * max(len(digits) - 4, 0) + digits[-4:]


def show_masked(plaintext: bytes) -> str:
    """The plaintext JSON with payment data masked; a non-JSON plaintext is not shown."""
    try:
        # RecursionError: nested deeper than json (or the masking and dumping) can follow.
        return json.dumps(mask_payment_data(json.loads(plaintext)), indent=2,
                          ensure_ascii=False)
    except (ValueError, RecursionError):
        return (f"(the plaintext of {len(plaintext)} bytes is not JSON that can be shown: not "
                "shown without --show-payment-data)")


# ---------------------------------------------------------------------------------------------
# echo


def echo(config_path: Path, route_name: str, account: str) -> int:
    """`echo`: seal an echo request with the outbound route's keys, send it over the route's
    upstream (its TLS, CA, client certificate and proxy) to `/cards-qr-v1/echo/<account>`,
    open and check the answer; print the status and the key ids each way. 0 when Google's
    answer opened, verified and echoed our clientMessage; 1 with the precise reason otherwise.
    Raises UsageError for an unknown or inbound route or a malformed account id."""
    if not _ACCOUNT.match(account):
        raise UsageError(f"--account: '{account}' is not an account id (1-100 of A-Z a-z 0-9 "
                         ". _ : ~ -)")
    try:
        with _loaded(config_path) as snapshot:
            return _echo(snapshot, route_name, account)
    except (ConfigError, EngineError, _Failed) as exc:
        return _fail(str(exc))


def _echo(snapshot: Snapshot, route_name: str, account: str) -> int:
    route = snapshot.routes.get(route_name)
    if route is None:
        raise UsageError(f"--route: no route named '{route_name}' (routes: "
                         f"{', '.join(snapshot.routes)})")
    if route.config.direction != "outbound":
        raise UsageError(f"route '{route_name}' is inbound: echo goes to Google through an "
                         "outbound route")
    config = route.config
    request_id = f"echo-{os.urandom(8).hex()}"
    client_message = f"gateway echo {request_id}"
    request = json.dumps({
        "requestHeader": {
            "requestId": request_id,
            "requestTimestamp": {"epochMillis": str(int(time.time() * 1000))},
            "protocolVersion": {"major": 1},
            "paymentIntegratorAccountId": account,
        },
        "clientMessage": client_message,
    }).encode("utf-8")
    url = f"{config.upstream.url}/cards-qr-v1/echo/{quote(account, safe='')}"
    print(f"echo {account} through route '{route_name}' ({config.scheme}) to {shown_url(url)}")
    try:
        sealed = route.envelope.seal(request)
    except EnvelopeError as exc:
        raise _Failed(f"cannot seal the echo request: {exc.reason}: {exc}") from None
    print(f"request  requestId {request_id}: signed by {_ids(sealed.signed_by, config.own_keys)}"
          f", encrypted to {_ids(sealed.encrypted_to, config.peer_keys)}")
    status, content_type, answer = asyncio.run(_post(route, url, sealed.body,
                                                     snapshot.config.limits.max_body_bytes))
    print(f"answer   HTTP {status}, {len(answer)} bytes"
          + (f", Content-Type: {content_type}" if content_type else ""))
    if status != 200:
        reason = _status_reason(status, sealed, config)
        if answer:
            try:
                print(show_masked(_open(snapshot, route, answer, "answer").plaintext))
            except _Failed as exc:
                reason += f"\n  and its body does not open either: {exc}"
        raise _Failed(reason)
    if not answer:
        raise _Failed("Google answered HTTP 200 with an empty body")
    opened = _open(snapshot, route, answer, "answer")
    print(f"answer   decrypted by {_ids(opened.decrypted_by, config.own_keys)}, verified "
          f"{_ids(opened.verified_by, config.peer_keys)}")
    print(show_masked(opened.plaintext))
    try:
        message = json.loads(opened.plaintext)
    except (ValueError, RecursionError):
        raise _Failed("Google's answer opened but is not JSON") from None
    if not isinstance(message, dict) or message.get("clientMessage") != client_message:
        raise _Failed("Google's answer opened but does not echo our clientMessage")
    print(f"echo ok: our keys ({', '.join(sealed.signed_by)} signed; "
          f"{', '.join(opened.decrypted_by)} decrypted) and Google's "
          f"({', '.join(sealed.encrypted_to)} encrypted to; {', '.join(opened.verified_by)} "
          "verified) work")
    return 0


def _status_reason(status: int, sealed: Sealed, config: RouteConfig) -> str:
    """What a non-200 answer to our echo means, per Google's error codes (protocol.md 6)."""
    if status == 401:
        return (f"Google answered HTTP 401 (INVALID_PAYLOAD_SIGNATURE): it does not accept our "
                f"signature by {', '.join(sealed.signed_by)} (keyset {config.own_keys}); has "
                "Google been given that key's public half yet?")
    if status == 400:
        return (f"Google answered HTTP 400 (INVALID_PAYLOAD_ENCRYPTION, or a malformed "
                f"request): it could not decrypt what we encrypted to "
                f"{', '.join(sealed.encrypted_to)} (keyset {config.peer_keys}); is that "
                "Google's current key?")
    if status == 404:
        return "Google answered HTTP 404 (INVALID_IDENTIFIER): is the account id right?"
    return f"Google answered HTTP {status}"


async def _post(route: RouteRuntime, url: str, body: bytes, cap: int) -> tuple[int, str, bytes]:
    """One POST over the route's upstream settings, as the proxy sends it. Raises _Failed."""
    upstream = route.config.upstream
    try:
        async with aiohttp.ClientSession(
            trust_env=False, auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=upstream.timeout_s),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        ) as session, session.post(
            URL(url, encoded=True), data=body,
            headers={"Content-Type": route.envelope.content_type},
            ssl=route.client_ssl if route.client_ssl is not None else True,
            proxy=upstream.proxy, allow_redirects=False,
        ) as response:
            answer = await response.content.read(cap + 1)
            if len(answer) > cap:
                raise _Failed(f"Google's answer is over limits.max_body_bytes ({cap})")
            return response.status, response.headers.get("Content-Type", ""), answer
    except TimeoutError:
        raise _Failed(f"no answer from {shown_url(url)} within {upstream.timeout_s:g} s "
                      f"({route.config.place}.upstream.timeout_s)") from None
    except aiohttp.ClientConnectorCertificateError as exc:
        raise _Failed(f"TLS: the upstream's certificate is not trusted "
                      f"({_ssl_reason(exc.certificate_error)}); see "
                      f"{route.config.place}.upstream.ca") from None
    except aiohttp.ClientSSLError as exc:
        raise _Failed(f"TLS handshake with the upstream failed ({type(exc).__name__})") \
            from None
    except aiohttp.ClientConnectorError as exc:
        raise _Failed(f"cannot connect to {exc.host}:{exc.port} ({exc.strerror or exc})") \
            from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _Failed(f"the exchange with {shown_url(url)} failed ({type(exc).__name__})") from None


def _ssl_reason(error: Exception) -> str:
    if isinstance(error, ssl.SSLCertVerificationError):
        return str(error.verify_message)
    return type(error).__name__


# ---------------------------------------------------------------------------------------------
# Shared


@contextlib.contextmanager
def _scratch(prefix: str) -> Iterator[Path]:
    """A short private directory under /tmp; its gpg-agents stopped and it removed after."""
    root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield root
    finally:
        stop_agents(root)
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def _loaded(config_path: Path) -> Iterator[Snapshot]:
    """The configuration at `config_path` built exactly as the gateway builds it (one crypto
    slot), in a private directory below its runtime_dir (in a container, the one writable
    place), removed afterwards. Raises ConfigError."""
    config = load_config(config_path)
    workdir = prepare_runtime_dir(config.runtime_dir)
    try:
        snapshot = build_snapshot(config, 1, workdir)
        try:
            yield snapshot
        finally:
            snapshot.close()
    finally:
        stop_agents(workdir)
        remove_runtime_dir(workdir)


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 1


def _style(stream: TextIO) -> Any:
    """Highlight warnings on a terminal; plain text otherwise."""
    if stream.isatty() and not os.environ.get("NO_COLOR"):
        return lambda text: f"\033[33m{text}\033[0m"
    return lambda text: text
