"""The embedded demo: throwaway sandbox keys, a stand-in Google and partner service, and the real
gateway in both directions and both schemes, with a readable transcript of every exchange."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from gateway.app import Gateway, build_gateway
from gateway.config import (
    JoseOptions,
    KeyConfig,
    KeysetConfig,
    KeyState,
    PgpOptions,
    load_config,
)
from gateway.envelope import Envelope
from gateway.jose import JoseEnvelope, generate_jwk, load_jose_keyset
from gateway.pgp import PgpEnvelope, load_pgp_keyset
from gateway.snapshot import stop_agents
from gateway.tls import write_sandbox_certificates

PIAID = "PIAID-DEMO-0001"


def run_demo() -> int:
    """Run the whole demo; 0 when every exchange succeeded."""
    root = Path(tempfile.mkdtemp(prefix="gwd-", dir="/tmp"))
    root.chmod(0o700)
    try:
        return asyncio.run(_demo(root))
    finally:
        stop_agents(root)
        shutil.rmtree(root, ignore_errors=True)


async def _demo(root: Path) -> int:
    say("Cards QR gateway demo: throwaway sandbox keys in", root)
    keys = root / "keys"
    keys.mkdir()
    started = time.perf_counter()
    await asyncio.to_thread(_make_pgp_keys, root, keys)
    for name in ("partner-sig", "partner-enc", "google-sig", "google-enc"):
        use = name.rsplit("-", 1)[1]
        private, public = generate_jwk(name, use, bits=2048)
        (keys / f"{name}.private.jwk").write_text(private)
        (keys / f"{name}.public.jwk").write_text(public)
    ca, cert, key = write_sandbox_certificates(root)
    say(f"keys and certificates made in {time.perf_counter() - started:.1f} s "
        "(PGP: gpg, RSA-2048 with encryption subkeys; JOSE: RSA-2048 JWKs)")

    google_side = {
        "pgp": _envelope("pgp", keys, own="google", peer="partner", home=root / "gh"),
        "jose": _envelope("jose", keys, own="google", peer="partner", home=root / "gj"),
    }
    partner = _PartnerService()
    google = _StandInGoogle(google_side)
    partner_url = await partner.start()
    google_url = await google.start(cert, key)
    config_path = root / "config.yaml"
    config_path.write_text(_config(partner_url, google_url, ca, cert, key))
    gateway = await build_gateway(load_config(config_path))
    await gateway.start()
    failures = 0
    try:
        async with aiohttp.ClientSession() as client:
            for scheme in ("pgp", "jose"):
                failures += await _inbound(client, gateway, scheme, google_side[scheme], ca,
                                           partner)
                failures += await _outbound(client, gateway, scheme, google)
    finally:
        await gateway.close()
        await partner.stop()
        await google.stop()
        for envelope in google_side.values():
            envelope.close()
    say("")
    say("demo finished:", "every exchange succeeded" if not failures else f"{failures} failed")
    return 0 if failures == 0 else 1


async def _inbound(client: aiohttp.ClientSession, gateway: Gateway, scheme: str,
                   google: Envelope, ca: Path, partner: _PartnerService) -> int:
    import ssl

    bound = gateway.routes[f"{scheme}-inbound"]
    trust = ssl.create_default_context(cafile=str(ca))
    failures = 0
    for method, message in (("echo", _echo_request()), ("transfer", _transfer_request())):
        banner(f"{scheme.upper()} inbound {method}: Google -> gateway -> partner service")
        plaintext = json.dumps(message).encode()
        sealed = await asyncio.to_thread(google.seal, plaintext)
        say("  Google sends      ", _wire(google.content_type, sealed.body),
            f"signed by {', '.join(sealed.signed_by)}, encrypted to "
            f"{', '.join(sealed.encrypted_to)}")
        url = f"https://localhost:{bound.port}/cards-qr-v1/{method}"
        async with client.post(url, data=sealed.body, ssl=trust,
                               headers={"Content-Type": google.content_type}) as response:
            body = await response.read()
            status, content_type = response.status, response.headers.get("Content-Type", "")
        received = partner.received[-1] if partner.received else b""
        say("  partner receives  ", _mask(received))
        say("  partner answers   ", _mask(partner.answers[-1] if partner.answers else b""))
        say("  Google receives   ", f"HTTP {status}", _wire(content_type, body))
        if status != 200:
            failures += 1
            continue
        opened = await asyncio.to_thread(google.open, body)
        say("  Google opens      ", f"decrypted by {', '.join(opened.decrypted_by)}, "
            f"signature verified: {', '.join(opened.verified_by)}")
        say("                    ", _mask(opened.plaintext))
    return failures


async def _outbound(client: aiohttp.ClientSession, gateway: Gateway, scheme: str,
                    google: _StandInGoogle) -> int:
    bound = gateway.routes[f"{scheme}-outbound"]
    banner(f"{scheme.upper()} outbound echo: partner service -> gateway -> Google")
    message = _echo_request()
    say("  partner sends     ", _mask(json.dumps(message).encode()))
    url = f"http://127.0.0.1:{bound.port}/cards-qr-v1/echo/{PIAID}"
    async with client.post(url, json=message) as response:
        body = await response.read()
        status = response.status
    say("  Google receives   ", google.log[-1] if google.log else "nothing")
    say("  partner receives  ", f"HTTP {status}", _mask(body))
    return 0 if status == 200 and b"serverMessage" in body else 1


class _PartnerService:
    """The partner's unmodified service: plain JSON in, plain JSON out."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.answers: list[bytes] = []
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        app = web.Application()
        app.router.add_post("/cards-qr-v1/{method}", self._handle)
        self._runner, port = await _serve(app, None)
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.received.append(body)
        message = json.loads(body)
        method = request.match_info["method"]
        header = {"responseTimestamp": {"epochMillis": str(int(time.time() * 1000))}}
        answer: dict[str, Any]
        if method == "echo":
            answer = {"responseHeader": header, "clientMessage": message.get("clientMessage"),
                      "serverMessage": "pong from the partner service"}
        else:
            answer = {"responseHeader": header, "result": {"success": {
                "referenceLabel": "REF-123", "transactionTimestamp": header["responseTimestamp"],
                "merchantId": "M-1", "acquirerId": "A-1", "terminalId": "T-1",
                "authorizationCode": "A1B2C3", "hostNsu": "1", "terminalNsu": "2",
                "cardScheme": "VISA"}}}
        payload = json.dumps(answer).encode()
        self.answers.append(payload)
        return web.Response(body=payload, content_type="application/json")


class _StandInGoogle:
    """Google's side for outbound calls: opens the partner's request, answers sealed."""

    def __init__(self, envelopes: dict[str, Envelope]) -> None:
        self.envelopes = envelopes
        self.log: list[str] = []
        self._runner: web.AppRunner | None = None

    async def start(self, cert: Path, key: Path) -> str:
        import ssl

        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        app = web.Application()
        app.router.add_post("/{scheme}/gsp/cards-qr-v1/echo/{piaid}", self._echo)
        self._runner, port = await _serve(app, context)
        return f"https://localhost:{port}"

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()

    async def _echo(self, request: web.Request) -> web.Response:
        envelope = self.envelopes[request.match_info["scheme"]]
        body = await request.read()
        opened = await asyncio.to_thread(envelope.open, body)
        message = json.loads(opened.plaintext)
        answer = {"responseHeader": {"responseTimestamp": {
            "epochMillis": str(int(time.time() * 1000))}},
                  "clientMessage": message.get("clientMessage"),
                  "serverMessage": "pong from the stand-in Google"}
        sealed = await asyncio.to_thread(envelope.seal, json.dumps(answer).encode())
        self.log.append(
            f"{_wire(request.headers.get('Content-Type', ''), body)} decrypted by "
            f"{', '.join(opened.decrypted_by)}, signed by {', '.join(opened.verified_by)}; "
            f"answers {len(sealed.body)} bytes signed by {', '.join(sealed.signed_by)}")
        return web.Response(body=sealed.body, headers={"Content-Type": envelope.content_type})


async def _serve(app: web.Application, context: Any) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    return runner, server.sockets[0].getsockname()[1]


def _make_pgp_keys(root: Path, keys: Path) -> None:
    """gpg makes each party's key: RSA-2048 primary (sign) + encryption subkey, one year."""
    for party, email in (("partner", "payments@partner.example"),
                         ("google", "sandbox@google.example")):
        home = root / f"k{party[0]}"
        home.mkdir(mode=0o700)
        gpg = ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--pinentry-mode",
               "loopback", "--passphrase", ""]
        uid = f"{party} sandbox <{email}>"
        subprocess.run([*gpg, "--quick-gen-key", uid, "rsa2048", "sign", "1y"],
                       check=True, capture_output=True, timeout=120)
        listing = subprocess.run([*gpg, "--with-colons", "--list-keys", uid], check=True,
                                 capture_output=True, text=True, timeout=30).stdout
        fpr = next(line.split(":")[9] for line in listing.splitlines()
                   if line.startswith("fpr:"))
        subprocess.run([*gpg, "--quick-add-key", fpr, "rsa2048", "encr", "1y"],
                       check=True, capture_output=True, timeout=120)
        for flag, suffix in (("--export-secret-keys", "sec"), ("--export", "pub")):
            out = subprocess.run([*gpg, "--armor", flag, fpr], check=True, capture_output=True,
                                 timeout=30).stdout
            (keys / f"{party}.{suffix}.asc").write_bytes(out)
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       check=False, capture_output=True, timeout=10)


def _envelope(scheme: str, keys: Path, *, own: str, peer: str, home: Path) -> Envelope:
    """The stand-in Google's own envelope: its private keys, the partner's public ones."""
    limit = 1024 * 1024
    if scheme == "pgp":
        own_set = load_pgp_keyset(_keyset(own, "pgp", [(own, keys / f"{own}.sec.asc", None)]),
                                  home.with_suffix(".scan"))
        peer_set = load_pgp_keyset(_keyset(peer, "pgp", [(peer, keys / f"{peer}.pub.asc", None)]),
                                   home.with_suffix(".scan"))
        return PgpEnvelope(own_set, peer_set, PgpOptions(), home, max_plaintext_bytes=limit)
    own_set = load_jose_keyset(_keyset(own, "jose", [
        (f"{own}-sig", keys / f"{own}-sig.private.jwk", "sig"),
        (f"{own}-enc", keys / f"{own}-enc.private.jwk", "enc")]))
    peer_set = load_jose_keyset(_keyset(peer, "jose", [
        (f"{peer}-sig", keys / f"{peer}-sig.public.jwk", "sig"),
        (f"{peer}-enc", keys / f"{peer}-enc.public.jwk", "enc")]))
    return JoseEnvelope(own_set, peer_set, JoseOptions(), max_plaintext_bytes=limit)


def _keyset(name: str, scheme: str, keys: list[tuple[str, Path, str | None]]) -> KeysetConfig:
    return KeysetConfig(name=name, type=scheme, place=f"demo.{name}", keys=tuple(  # type: ignore[arg-type]
        KeyConfig(id=key_id, file=path, state=KeyState.ACTIVE, place=f"demo.{name}.keys[{i}]",
                  use=use)  # type: ignore[arg-type]
        for i, (key_id, path, use) in enumerate(keys)))


def _config(partner_url: str, google_url: str, ca: Path, cert: Path, key: Path) -> str:
    routes = []
    for scheme in ("pgp", "jose"):
        routes.append(textwrap.dedent(f"""\
          - name: {scheme}-inbound
            direction: inbound
            listen: "127.0.0.1:0"
            tls: {{cert: {cert}, key: {key}}}
            upstream: {{url: "{partner_url}", timeout_s: 10}}
            own_keys: partner-{scheme}
            peer_keys: google-{scheme}
          - name: {scheme}-outbound
            direction: outbound
            listen: "127.0.0.1:0"
            upstream: {{url: "{google_url}/{scheme}/gsp", ca: {ca}, timeout_s: 10}}
            own_keys: partner-{scheme}
            peer_keys: google-{scheme}
        """))
    return textwrap.dedent(f"""\
        admin: {{listen: "127.0.0.1:0"}}
        reload: {{interval_s: 0}}
        runtime_dir: {ca.parent / "rt"}
        keysets:
          partner-pgp:
            type: pgp
            keys: [{{id: partner-2026, file: keys/partner.sec.asc}}]
          google-pgp:
            type: pgp
            keys: [{{id: google-2026, file: keys/google.pub.asc}}]
          partner-jose:
            type: jose
            keys:
              - {{id: partner-sig, file: keys/partner-sig.private.jwk}}
              - {{id: partner-enc, file: keys/partner-enc.private.jwk}}
          google-jose:
            type: jose
            keys:
              - {{id: google-sig, file: keys/google-sig.public.jwk}}
              - {{id: google-enc, file: keys/google-enc.public.jwk}}
        routes:
        """) + textwrap.indent("".join(routes), "")


def _echo_request() -> dict[str, Any]:
    return {"requestHeader": _header(), "clientMessage": "ping from the demo"}


def _transfer_request() -> dict[str, Any]:
    return {
        "requestHeader": _header(),
        "cardData": {"cardNumber": "4111111111111111", "expirationMonth": 12,
                     "expirationYear": 2030, "cryptogram": "AgAAAAAABk4DWZ4C28yUQAAAAAA=",
                     "cardNetwork": {"cardScheme": "VISA", "eciIndicator": "05"}},
        "qrCode": "00020101021226...6304ABCD",
    }


def _header() -> dict[str, Any]:
    return {"requestId": f"demo-{os.urandom(6).hex()}",
            "requestTimestamp": {"epochMillis": str(int(time.time() * 1000))},
            "protocolVersion": {"major": 1}, "paymentIntegratorAccountId": PIAID}


def _mask(plaintext: bytes) -> str:
    """The JSON with card number and cryptogram masked (this is a transcript for people)."""
    try:
        message = json.loads(plaintext)
    except ValueError:
        return f"<{len(plaintext)} bytes, not JSON>"
    card = message.get("cardData") if isinstance(message, dict) else None
    if isinstance(card, dict):
        number = str(card.get("cardNumber", ""))
        card["cardNumber"] = "*" * max(len(number) - 4, 0) + number[-4:]
        card["cryptogram"] = "***"
    return json.dumps(message)


def _wire(content_type: str, body: bytes) -> str:
    return f"[{content_type}, {len(body)} bytes: {body[:32].decode('ascii', 'replace')}...]"


def say(*parts: object) -> None:
    print(*parts, flush=True)


def banner(text: str) -> None:
    say("")
    say(f"== {text}")
