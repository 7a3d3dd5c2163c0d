"""End-to-end support: trustme PKI, config files, and the real gateway started on port 0."""

from __future__ import annotations

import ssl
import textwrap
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from gateway.app import Gateway, build_gateway
from gateway.config import load_config
from gateway.metrics import Metrics

__all__ = ["Pki", "memory_handshake", "pki", "running_gateway"]

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

ConfigBuilder = Callable[..., str]


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
