"""End-to-end support: trustme PKI, config files, and the real gateway started on port 0."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Protocol

import aiohttp
import pytest
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa

from gateway.app import Gateway, build_gateway
from gateway.config import load_config
from gateway.envelope import CONTENT_TYPES
from gateway.metrics import Metrics
from tests.jose_fixtures import JoseKeys, NodeJose, craft_jwe
from tests.peers import StandIn, json_answer
from tests.pgp_fixtures import GpgPeer, PgpKeys

__all__ = [
    "ANSWER", "PLAINTEXT_TYPE", "REQUEST", "Google", "JoseGoogle", "PgpGoogle", "Pki", "config",
    "google_for", "google_service", "memory_handshake", "pki", "post", "running_gateway",
]


@dataclass(frozen=True)
class Pki:
    """Server certificates for localhost, client certificates from a trusted and an
    untrusted CA, all as files."""

    dir: Path
    ca: Path  # signs the server certificates (clients trust it)
    cert: Path
    key: Path
    client_ca: Path  # signs the client certificates the gateway accepts
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate from a CA nobody trusts
    rogue_key: Path
    _server_ca: trustme.CA

    def client_context(self, *, with_cert: bool = False, rogue: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca))
        if with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key)
        if rogue:
            ctx.load_cert_chain(self.rogue_cert, self.rogue_key)
        return ctx

    def server_context(self, *, require_client: bool = False) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        if require_client:
            ctx.load_verify_locations(cafile=str(self.client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

@pytest.fixture(scope="session")
def pki(session_tmp: Path) -> Pki:
    base = session_tmp / "pki"
    base.mkdir()
    server_ca, client_ca, rogue_ca = trustme.CA(), trustme.CA(), trustme.CA()
    server = server_ca.issue_cert("localhost", "127.0.0.1")
    client = client_ca.issue_cert("partner-client.example")
    rogue = rogue_ca.issue_cert("partner-client.example")

    def write(name: str, blob: trustme.Blob) -> Path:
        path = base / name
        blob.write_to_path(str(path))
        return path

    return Pki(
        dir=base,
        ca=write("ca.pem", server_ca.cert_pem),
        cert=write("server.pem", server.cert_chain_pems[0]),
        key=write("server.key", server.private_key_pem),
        client_ca=write("client-ca.pem", client_ca.cert_pem),
        client_cert=write("client.pem", client.cert_chain_pems[0]),
        client_key=write("client.key", client.private_key_pem),
        rogue_cert=write("rogue.pem", rogue.cert_chain_pems[0]),
        rogue_key=write("rogue.key", rogue.private_key_pem),
        _server_ca=server_ca,
    )

@asynccontextmanager
async def running_gateway(directory: Path, config_text: str,
                          metrics: Metrics | None = None) -> AsyncIterator[Gateway]:
    """Write `config_text` to `directory`/config.yaml, build and start the gateway."""
    path = directory / "config.yaml"
    path.write_text(textwrap.dedent(config_text))
    gateway = await build_gateway(load_config(path), metrics or Metrics())
    await gateway.start()
    try:
        yield gateway
    finally:
        await gateway.close()



def memory_handshake(client: ssl.SSLContext, server: ssl.SSLContext,
                     hostname: str = "localhost") -> ssl.SSLObject:
    """Run a TLS handshake between two contexts in memory; returns the client's SSLObject."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_out, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_obj = client.wrap_bio(to_client, client_out, server_hostname=hostname)
    server_obj = server.wrap_bio(to_server, server_out, server_side=True)
    for _ in range(10):
        for obj in (client_obj, server_obj):
            with suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        to_server.write(client_out.read())
        to_client.write(server_out.read())
    return client_obj


REQUEST = json.dumps({
    "requestHeader": {"requestId": "req-0001", "requestTimestamp": {"epochMillis": "1"},
                      "protocolVersion": {"major": 1}, "paymentIntegratorAccountId": "PIAID-1"},
    "clientMessage": "ping",
}).encode()
ANSWER = b'{"responseHeader":{"responseTimestamp":{"epochMillis":"2"}},"serverMessage":"pong"}'
PLAINTEXT_TYPE = "application/json; charset=utf-8"


class Google(Protocol):
    """The stand-in Google's crypto, done by an implementation that is not ours."""

    scheme: str
    route_block: str  # YAML added to each route (e.g. the PGP engine)

    def keysets(self, *, expiring_recipient: datetime | None = None) -> str: ...

    def seal(self, plaintext: bytes, variant: str = "good") -> bytes: ...

    def open(self, body: bytes) -> tuple[bytes, list[str]]: ...


def thread_policies(pid: int) -> set[int]:
    """The scheduling policies of the threads of process `pid` (batch_scheduling)."""
    policies = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with suppress(ProcessLookupError):  # a thread that ended meanwhile
            policies.add(os.sched_getscheduler(int(task.name)))
    return policies


def rsa_public(keys: JoseKeys, name: str) -> rsa.RSAPublicKey:
    key = keys.key(name)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key.public_key()


class JoseGoogle:
    """panva's jose as Google: signs with google-sig-a, encrypts to partner-enc-a."""

    scheme = "jose"
    route_block = ""

    def __init__(self, keys: JoseKeys, node: NodeJose) -> None:
        self.keys = keys
        self.node = node

    def keysets(self, *, expiring_recipient: datetime | None = None) -> str:
        k = self.keys
        google_enc = f"{{id: google-enc-a, file: {k.public('google-enc-a')}}}"
        google_sig = f"{{id: google-sig-a, file: {k.public('google-sig-a')}}}"
        if expiring_recipient is not None:
            google_enc = (f"{{id: google-enc-a, file: {k.public('google-enc-a')}, "
                          f"not_after: '{expiring_recipient.isoformat()}'}}")
        return f"""
        keysets:
          partner:
            type: jose
            keys:
              - {{id: partner-sig-a, file: {k.private('partner-sig-a')}}}
              - {{id: partner-enc-a, file: {k.private('partner-enc-a')}}}
          google:
            type: jose
            keys:
              - {google_sig}
              - {google_enc}
        """

    def seal(self, plaintext: bytes, variant: str = "good") -> bytes:
        k = self.keys
        if variant == "unsigned":
            return craft_jwe({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "partner-enc-a"},
                             plaintext, rsa_public(k, "partner-enc-a")).encode()
        signer = "stranger-sig" if variant == "stranger_signer" else "google-sig-a"
        recipient = "stranger-enc" if variant == "wrong_recipient" else "partner-enc-a"
        return self.node.seal(plaintext, k.private(signer), "RS256", k.public(recipient))

    def open(self, body: bytes) -> tuple[bytes, list[str]]:
        k = self.keys
        plaintext, jws_header, _ = self.node.open(body, k.private("google-enc-a"),
                                                  [k.public("partner-sig-a")])
        return plaintext, [str(jws_header["kid"])]


class PgpGoogle:
    """The gpg command line as Google: signs with google-a, encrypts to partner-pw (a
    passphrase-protected key of ours)."""

    scheme = "pgp"

    def __init__(self, keys: PgpKeys, peer: GpgPeer, engine: str = "gnupg") -> None:
        self.keys = keys
        self.peer = peer
        self.route_block = f"\n            pgp: {{engine: {engine}}}"

    def keysets(self, *, expiring_recipient: datetime | None = None) -> str:
        k = self.keys
        google = f"{{id: google-a, file: {k.pub('google-a')}}}"
        if expiring_recipient is not None:
            # google-a only verifies; the one recipient, google-b, expires while running.
            google = (f"{{id: google-a, file: {k.pub('google-a')}, state: read-only}}\n"
                      f"              - {{id: google-b, file: {k.pub('google-b')}, "
                      f"not_after: '{expiring_recipient.isoformat()}'}}")
        return f"""
        keysets:
          partner:
            type: pgp
            keys:
              - {{id: partner-pw, file: {k.sec('partner-pw')},
                  passphrase_file: {k.passphrase_file('partner-pw')}}}
          google:
            type: pgp
            keys:
              - {google}
        """

    def seal(self, plaintext: bytes, variant: str = "good") -> bytes:
        signer = "stranger" if variant == "stranger_signer" else "google-a"
        recipient = "stranger" if variant == "wrong_recipient" else "partner-pw"
        signers = () if variant == "unsigned" else (signer,)
        return self.peer.seal(plaintext, sign_with=signers, encrypt_to=(recipient,))

    def open(self, body: bytes) -> tuple[bytes, list[str]]:
        plaintext, fingerprints = self.peer.open(body)
        return plaintext, [self.keys.name_of(f) for f in fingerprints]


def config(google: Google, runtime_dir: Path, pki: Pki, *, inbound_url: str = "",
           outbound_url: str = "", limits: str = "", tls_extra: str = "",
           upstream_extra: str = "", timeout_s: float = 10,
           expiring_recipient: datetime | None = None,
           top: dict[str, object] | None = None) -> str:
    """A config.yaml text; `limits` is a `limits: {...}` line, `top` more top-level fields."""
    routes = []
    extra = "".join(f"\n        {name}: {value}" for name, value in (top or {}).items())
    if inbound_url:
        routes.append(f"""
          - name: in
            direction: inbound
            listen: "127.0.0.1:0"
            tls: {{cert: {pki.cert}, key: {pki.key}{tls_extra}}}
            upstream: {{url: "{inbound_url}", timeout_s: {timeout_s}}}
            own_keys: partner
            peer_keys: google{google.route_block}""")
    if outbound_url:
        routes.append(f"""
          - name: out
            direction: outbound
            listen: "127.0.0.1:0"
            upstream: {{url: "{outbound_url}", timeout_s: {timeout_s}{upstream_extra}}}
            own_keys: partner
            peer_keys: google{google.route_block}""")
    return f"""
        admin: {{listen: "127.0.0.1:0"}}
        reload: {{interval_s: 0}}
        runtime_dir: {runtime_dir}
        {limits}{extra}
        {google.keysets(expiring_recipient=expiring_recipient)}
        routes:{"".join(routes)}
    """


async def post(gateway: Gateway, route: str, body: bytes, *, ctx: ssl.SSLContext | None = None,
               path: str = "/cards-qr-v1/echo", method: str = "POST",
               headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    bound = gateway.routes[route]
    scheme = "https" if ctx is not None else "http"
    host = "localhost" if ctx is not None else "127.0.0.1"
    async with aiohttp.ClientSession() as session, session.request(
        method, f"{scheme}://{host}:{bound.port}{path}", data=body, ssl=ctx or False,
        headers=headers or {},
    ) as response:
        return response.status, dict(response.headers), await response.read()


async def raw_exchange(port: int, pki: Pki, head: bytes, body: bytes = b"",
                       pause: float = 0.0, until_closed: float | None = None) -> bytes:
    """Send `head` and `body` over TLS as they are, wait `pause` s, and return the first bytes
    of the answer; with `until_closed`, every byte up to the gateway's close, which must come
    within that many seconds (a connection kept open raises TimeoutError)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=pki.client_context(),
                                                   server_hostname="localhost")
    try:
        writer.write(head + body)
        await writer.drain()
        await asyncio.sleep(pause)
        if until_closed is None:
            return await asyncio.wait_for(reader.read(65536), 10)
        return await asyncio.wait_for(reader.read(), until_closed)
    finally:
        writer.close()
        with suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


async def post_until_closed(gateway: Gateway, route: str, body: bytes, pki: Pki,
                            timeout: float) -> tuple[list[bytes], bytes]:
    """POST `body` on a kept-alive connection and read until the gateway closes it: (the
    answer's status line and header lines, its body)."""
    head = (b"POST /cards-qr-v1/echo HTTP/1.1\r\nHost: localhost\r\n"
            b"Connection: keep-alive\r\nContent-Length: %d\r\n\r\n" % len(body))
    answer = await raw_exchange(gateway.routes[route].port, pki, head, body,
                                until_closed=timeout)
    head_text, _, rest = answer.partition(b"\r\n\r\n")
    return head_text.split(b"\r\n"), rest


def google_for(request: pytest.FixtureRequest, kind: str) -> Google:
    """The stand-in Google for "pgp" (gpg CLI, gnupg engine route), "pgp-native" (gpg CLI,
    native engine route) or "jose" (panva jose), from the session fixtures."""
    if kind.startswith("pgp"):
        engine = "native" if kind == "pgp-native" else "gnupg"
        return PgpGoogle(request.getfixturevalue("pgp_keys"),
                         request.getfixturevalue("gpg_peer"), engine)
    return JoseGoogle(request.getfixturevalue("jose_keys"), request.getfixturevalue("node_jose"))


def google_service(google: Google, answer: bytes = ANSWER,
                   expect: bytes | None = None) -> StandIn:
    """A stand-in Google server (not started) that opens the partner's request (checking it is
    `expect` when given) and answers `answer`, sealed."""

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        plaintext, _ = await asyncio.to_thread(google.open, body)
        if expect is not None:
            assert plaintext == expect
        sealed = await asyncio.to_thread(google.seal, answer)
        return web.Response(body=sealed, headers={"Content-Type": CONTENT_TYPES[google.scheme]})

    return StandIn(handler)


@pytest.fixture
async def partner_and_google(google: Google, pki: Pki) -> AsyncIterator[tuple[StandIn, StandIn]]:
    """For a module with a `google` fixture: a partner service answering ANSWER (plain HTTP)
    and a Google service (TLS) that opens the partner's request and answers ANSWER, sealed."""
    partner = await StandIn(json_answer(ANSWER)).start()
    service = google_service(google, ANSWER)
    service.ssl_context = pki.server_context()
    await service.start()
    yield partner, service
    await partner.stop()
    await service.stop()
