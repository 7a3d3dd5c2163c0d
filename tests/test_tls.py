"""tls.py: listener and upstream contexts from the configuration."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import trustme
from cryptography.hazmat.primitives import serialization

from gateway.config import ServerTls, UpstreamConfig
from gateway.errors import ConfigError
from gateway.tls import build_client_context, build_server_context, write_sandbox_certificates
from tests.e2e import memory_handshake


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pki")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    paths = {"ca": base / "ca.pem", "cert": base / "cert.pem", "key": base / "key.pem"}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    leaf.private_key_pem.write_to_path(str(paths["key"]))
    leaf.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    (base / "junk.pem").write_text("not a certificate")
    paths["junk"] = base / "junk.pem"
    return paths


def test_server_context_defaults(pki: dict[str, Path]) -> None:
    ctx = build_server_context(ServerTls(cert=pki["cert"], key=pki["key"]), "routes[0].tls")
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode is ssl.CERT_NONE
    tls12 = {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"}
    assert tls12 == {"ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
                     "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
                     "ECDHE-ECDSA-AES128-SHA256", "ECDHE-RSA-AES128-SHA256"}


def test_server_context_tls13_and_client_ca(pki: dict[str, Path]) -> None:
    tls = ServerTls(cert=pki["cert"], key=pki["key"], client_ca=pki["ca"], min_version="1.3")
    ctx = build_server_context(tls, "routes[0].tls")
    assert ctx.minimum_version is ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode is ssl.CERT_REQUIRED


def test_bad_certificate_names_its_place(pki: dict[str, Path]) -> None:
    with pytest.raises(ConfigError) as info:
        build_server_context(ServerTls(cert=pki["junk"], key=pki["key"]), "routes[1].tls")
    assert info.value.place == "routes[1].tls.cert"
    with pytest.raises(ConfigError) as info:
        build_client_context(UpstreamConfig(url="https://g.example", ca=pki["junk"]),
                             "routes[0].upstream")
    assert info.value.place == "routes[0].upstream.ca"


def test_an_encrypted_key_is_refused_without_asking_for_a_passphrase(
    pki: dict[str, Path], tmp_path: Path,
) -> None:
    """OpenSSL left to itself prompts on the terminal for the passphrase: `check` and a reload
    would hang there. The gateway says the key is encrypted instead, naming the place."""
    key = serialization.load_pem_private_key(pki["key"].read_bytes(), password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"a passphrase")))
    with pytest.raises(ConfigError) as info:
        build_server_context(ServerTls(cert=pki["cert"], key=encrypted), "routes[0].tls")
    assert info.value.place == "routes[0].tls.cert" and "is encrypted" in info.value.message
    with pytest.raises(ConfigError) as info:
        build_client_context(UpstreamConfig(url="https://g.example", client_cert=pki["cert"],
                                            client_key=encrypted), "routes[1].upstream")
    assert info.value.place == "routes[1].upstream.client_cert"
    assert "is encrypted" in info.value.message


def test_client_context_pins_the_configured_ca(pki: dict[str, Path]) -> None:
    assert build_client_context(UpstreamConfig(url="http://x"), "u") is None
    system = build_client_context(UpstreamConfig(url="https://g.example"), "u")
    pinned = build_client_context(UpstreamConfig(url="https://g.example", ca=pki["ca"]), "u")
    assert system is not None and pinned is not None
    assert pinned.check_hostname and pinned.verify_mode is ssl.CERT_REQUIRED
    assert len(pinned.get_ca_certs()) == 1
    assert pinned.minimum_version is ssl.TLSVersion.TLSv1_2


def test_sandbox_certificates_verify_for_localhost(tmp_path: Path) -> None:
    ca, cert, key = write_sandbox_certificates(tmp_path)
    server = build_server_context(ServerTls(cert=cert, key=key), "t")
    client = ssl.create_default_context(cafile=str(ca))
    client_obj = memory_handshake(client, server)
    assert client_obj.version() in ("TLSv1.2", "TLSv1.3")
    assert client_obj.getpeercert()["subject"] == ((("commonName", "localhost"),),)
