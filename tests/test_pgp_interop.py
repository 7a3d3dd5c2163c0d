"""PGP interoperability both ways with implementations that are not ours, gpg and OpenPGP.js,
for both engines (gnupg and native). tests/test_openpgp_interop.py adds the native engine's
own: more message shapes, Sequoia's sq, and the two engines with each other."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest

from gateway.config import PgpOptions
from tests.pgp_fixtures import AnyPgpEnvelope, GpgPeer, PgpEngine, PgpKeys, unb64url

pytestmark = pytest.mark.interop

PLAINTEXT = '{"requestHeader": {"requestId": "ïd-1"}, "transferRequestId": "t-1"}'.encode()
TOOL = Path(__file__).parent / "interop" / "openpgp_tool.mjs"
SHA384, AES256, MDC = "9", "9", "2"
OURS = [("partner-a", "sec", "active"), ("partner-pw", "sec", "active")]
GOOGLE = [("google-a", "pub", "active"), ("google-b", "pub", "active")]


@pytest.fixture(scope="module")
def partner(pgp_engine: PgpEngine) -> AnyPgpEnvelope:
    """Ours: two signing keys (one passphrase-protected), Google's two keys as peers."""
    return pgp_engine.envelope(OURS, GOOGLE)


# gpg -> us


@pytest.mark.parametrize(("armor", "compress", "padded"), [
    (False, None, False),  # gpg's default: ZLIB
    (False, "none", True),
    (True, None, True),
    (True, "none", False),
    (False, "zip", False),
    (True, "zlib", True),
    (False, "bzip2", True),
])
def test_gpg_seals_we_open(
    partner: AnyPgpEnvelope, gpg_peer: GpgPeer, armor: bool, compress: str | None, padded: bool
) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-a"], ["partner-a"], armor=armor, compress=compress,
                         padded=padded)
    assert unb64url(body).startswith(b"-----BEGIN PGP MESSAGE") == armor
    assert body.endswith(b"=") == (padded and len(unb64url(body)) % 3 != 0)
    opened = partner.open(body)
    assert (opened.plaintext, opened.decrypted_by, opened.verified_by) == (
        PLAINTEXT, ("partner-a",), ("google-a",))


def test_gpg_two_recipients_ours_second(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-b"], ["stranger", "partner-pw"])
    assert len(gpg_peer.open_details(body).recipients) == 2
    opened = partner.open(body)
    assert (opened.decrypted_by, opened.verified_by) == (("partner-pw",), ("google-b",))


def test_gpg_two_signatures_one_unknown(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["stranger", "google-a"], ["partner-a"], armor=True)
    assert partner.open(body).verified_by == ("google-a",)


def test_gpg_both_google_keys_sign(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-a", "google-b"], ["partner-a", "partner-pw"],
                         digest="SHA512", cipher="AES128")
    assert partner.open(body).verified_by == ("google-a", "google-b")


def test_base64_wrapped_in_lines(partner: AnyPgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-a"], ["partner-a"])
    assert partner.open(b"\n" + body + b"\r\n").plaintext == PLAINTEXT


# us -> gpg


@pytest.mark.parametrize("options", [
    PgpOptions(),
    PgpOptions(armor=True, base64_padding=True),
    PgpOptions(compression="zlib"),
    PgpOptions(compression="zip", armor=True),
])
def test_we_seal_gpg_opens(
    pgp_engine: PgpEngine, gpg_peer: GpgPeer, pgp_keys: PgpKeys, options: PgpOptions
) -> None:
    ours = pgp_engine.envelope(OURS, GOOGLE, options)
    body = ours.seal(PLAINTEXT * 40).body
    opened = gpg_peer.open_details(body)
    assert opened.plaintext == PLAINTEXT * 40
    assert sorted(opened.signers) == sorted(
        pgp_keys.fingerprint(n) for n in ("partner-a", "partner-pw"))
    assert opened.hashes == [SHA384, SHA384]
    assert (opened.cipher, opened.mdc) == (AES256, MDC)
    assert len(opened.recipients) == 2
    assert not any(s[0] in ("BADSIG", "ERRSIG", "EXPKEYSIG") for s in opened.status)
    assert gpg_peer.gpg("--decrypt", stdin=unb64url(body)).returncode == 0


# OpenPGP.js -> us, us -> OpenPGP.js


def openpgp_js(*args: str, stdin: bytes) -> bytes:
    done = subprocess.run(["node", str(TOOL), *args], input=stdin, capture_output=True,
                          cwd=TOOL.parent, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.parametrize(("armor", "compress", "padded", "stranger"), [
    (False, "uncompressed", False, False), (True, "zlib", False, False),
    (False, "zip", False, False),
    (False, "uncompressed", False, True), (True, "zlib", True, True), (False, "zip", True, True),
    (True, "uncompressed", False, True),
])
def test_openpgp_js_seals_we_open(
    partner: AnyPgpEnvelope, pgp_keys: PgpKeys, armor: bool, compress: str, padded: bool,
    stranger: bool,
) -> None:
    """Signed by google-b and encrypted to partner-pw; with `stranger`, a stranger signs too
    and is the first recipient."""
    signers = ["google-b", "stranger"] if stranger else ["google-b"]
    recipients = ["stranger", "partner-pw"] if stranger else ["partner-pw", "stranger"]
    args = ["seal", *(a for n in signers for a in ("--sign", str(pgp_keys.sec(n)))),
            *(a for n in recipients for a in ("--to", str(pgp_keys.pub(n)))),
            "--compress", compress]
    body = openpgp_js(*args, *(["--armor"] if armor else []), *(["--padded"] if padded else []),
                      stdin=PLAINTEXT)
    opened = partner.open(body)
    assert (opened.plaintext, opened.decrypted_by, opened.verified_by) == (
        PLAINTEXT, ("partner-pw",), ("google-b",))


@pytest.mark.parametrize("signers", [["partner-pw2"], ["partner-pw", "partner-pw2"]])
def test_openpgp_js_signed_with_protected_keys(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, signers: list[str]
) -> None:
    """Each key opened with its own passphrase (from its file) by OpenPGP.js."""
    google = pgp_engine.envelope([("google-a", "sec", "active")],
                                 [(n, "pub", "active") for n in signers])
    sign = [a for n in signers for a in ("--sign", f"{pgp_keys.sec(n)},"
                                                  f"{pgp_keys.passphrase_file(n)}")]
    body = openpgp_js("seal", *sign, "--to", str(pgp_keys.pub("google-a")), "--padded",
                      stdin=PLAINTEXT)
    assert google.open(body).verified_by == tuple(signers)


@pytest.mark.parametrize("options", [PgpOptions(), PgpOptions(armor=True, compression="zlib"),
                                     PgpOptions(compression="zip", digest="SHA512")])
def test_we_seal_openpgp_js_opens(
    pgp_engine: PgpEngine, pgp_keys: PgpKeys, options: PgpOptions
) -> None:
    ours = pgp_engine.envelope(OURS, GOOGLE, options)
    body = ours.seal(PLAINTEXT).body
    for google in ("google-a", "google-b"):
        report = json.loads(openpgp_js(
            "open", "--key", str(pgp_keys.sec(google)),
            "--verify", str(pgp_keys.pub("partner-a")),
            "--verify", str(pgp_keys.pub("partner-pw")), stdin=body))
        assert base64.b64decode(report["plaintext"]) == PLAINTEXT
        signatures = report["signatures"]
        assert len(signatures) == 2
        assert all(s["valid"] and s["hash"] == options.digest.lower() for s in signatures)
        assert {s["keyID"] for s in signatures} == {
            pgp_keys.fingerprint(n)[-16:] for n in ("partner-a", "partner-pw")}
