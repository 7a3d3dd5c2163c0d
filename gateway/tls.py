"""Server and client SSL contexts from the configuration (protocol.md section 7)."""

from __future__ import annotations

import ssl
from pathlib import Path

from gateway.config import ServerTls, UpstreamConfig
from gateway.errors import ConfigError

# Google's list for TLS 1.2 (protocol.md section 7); TLS 1.3 suites are OpenSSL's defaults.
TLS12_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
        "ECDHE-ECDSA-AES128-SHA256",
        "ECDHE-RSA-AES128-SHA256",
    )
)
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


def build_server_context(tls: ServerTls, place: str) -> ssl.SSLContext:
    """A listener's context: our certificate, TLS >= min_version, Google's cipher list, and
    client certificates required and verified when `client_ca` is set. Raises ConfigError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[tls.min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.options |= ssl.OP_NO_RENEGOTIATION
    _load_chain(ctx, tls.cert, tls.key, f"{place}.cert")
    if tls.client_ca is not None:
        _load_ca(ctx, tls.client_ca, f"{place}.client_ca")
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def build_client_context(upstream: UpstreamConfig, place: str) -> ssl.SSLContext | None:
    """An upstream's context (None for http://): the system store, or only `ca` when set;
    hostname checking always on; our client certificate when configured."""
    if not upstream.url.startswith("https://"):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=None)
    if upstream.ca is not None:
        # Pinning: trust only the configured bundle, not the system store as well.
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        _load_ca(ctx, upstream.ca, f"{place}.ca")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    if upstream.client_cert is not None and upstream.client_key is not None:
        _load_chain(ctx, upstream.client_cert, upstream.client_key, f"{place}.client_cert")
    return ctx


class _EncryptedKey(Exception):
    """The private key asks for a passphrase."""


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL asks on the terminal: `check` or a reload would hang on a
    # prompt (or, without a terminal, fail with a misleading "Invalid argument").
    raise _EncryptedKey


def _load_chain(ctx: ssl.SSLContext, cert: Path, key: Path, place: str) -> None:
    try:
        ctx.load_cert_chain(cert, key, password=_no_passphrase)
    except _EncryptedKey:
        raise ConfigError(place, f"key '{key.name}' is encrypted: the gateway takes an "
                                 "unencrypted PEM key (keep it in a Secret)") from None
    except ssl.SSLError as exc:
        raise ConfigError(
            place, f"certificate '{cert.name}' and key '{key.name}' do not load: {exc.reason}"
        ) from None
    except OSError as exc:
        raise ConfigError(place, f"cannot read '{cert.name}' or '{key.name}': {exc.strerror}") \
            from None


def _load_ca(ctx: ssl.SSLContext, ca: Path, place: str) -> None:
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, OSError, ValueError):
        raise ConfigError(place, f"'{ca.name}' is not a PEM CA bundle") from None


def write_sandbox_certificates(directory: Path, hostname: str = "localhost") -> tuple[Path, ...]:
    """Make a throwaway CA and a server certificate for `hostname` and 127.0.0.1 (demo and
    sandbox use only). Returns the paths (ca.crt, server.crt, server.key)."""
    import ipaddress
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.now(UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway sandbox CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                       critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=2))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = (directory / "ca.crt", directory / "server.crt", directory / "server.key")
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return paths
