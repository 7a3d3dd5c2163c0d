"""PGP interoperability both ways with implementations that are not ours: gpg and OpenPGP.js."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from gateway.config import PgpOptions
from gateway.keys import Keyset
from gateway.pgp import PgpEnvelope
from tests.pgp_fixtures import GpgPeer, PgpKeys, unb64url

pytestmark = pytest.mark.interop

PLAINTEXT = '{"requestHeader": {"requestId": "ïd-1"}, "transferRequestId": "t-1"}'.encode()
TOOL = Path(__file__).parent / "interop" / "openpgp_tool.mjs"
MakeEnvelope = Callable[..., PgpEnvelope]
SHA384, AES256, MDC = "9", "9", "2"


@pytest.fixture(scope="module")
def partner(pgp_envelope: MakeEnvelope) -> PgpEnvelope:
    """Ours: two signing keys (one passphrase-protected), Google's two keys as peers."""
    return pgp_envelope(
        [("partner-a", "sec", "active"), ("partner-pw", "sec", "active")],
        [("google-a", "pub", "active"), ("google-b", "pub", "active")],
    )


# gpg -> us


@pytest.mark.parametrize(("armor", "compress", "padded"), [
    (False, None, False),  # gpg's default: ZLIB
    (False, "none", True),
    (True, None, True),
    (True, "none", False),
    (False, "zip", False),
    (False, "bzip2", True),
])
def test_gpg_seals_we_open(
    partner: PgpEnvelope, gpg_peer: GpgPeer, armor: bool, compress: str | None, padded: bool
) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-a"], ["partner-a"], armor=armor, compress=compress,
                         padded=padded)
    assert unb64url(body).startswith(b"-----BEGIN PGP MESSAGE") == armor
    assert body.endswith(b"=") == (padded and len(unb64url(body)) % 3 != 0)
    opened = partner.open(body)
    assert (opened.plaintext, opened.decrypted_by, opened.verified_by) == (
        PLAINTEXT, ("partner-a",), ("google-a",))


def test_gpg_two_recipients_ours_second(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-b"], ["stranger", "partner-pw"])
    assert len(gpg_peer.open_details(body).recipients) == 2
    opened = partner.open(body)
    assert (opened.decrypted_by, opened.verified_by) == (("partner-pw",), ("google-b",))


def test_gpg_two_signatures_one_unknown(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["stranger", "google-a"], ["partner-a"], armor=True)
    assert partner.open(body).verified_by == ("google-a",)


def test_gpg_both_google_keys_sign(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-a", "google-b"], ["partner-a", "partner-pw"],
                         digest="SHA512", cipher="AES128")
    assert partner.open(body).verified_by == ("google-a", "google-b")


def test_base64_wrapped_in_lines(partner: PgpEnvelope, gpg_peer: GpgPeer) -> None:
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
    partner: PgpEnvelope, pgp_envelope: MakeEnvelope, gpg_peer: GpgPeer, pgp_keys: PgpKeys,
    options: PgpOptions,
) -> None:
    ours = pgp_envelope(_entries(partner.own), _entries(partner.peer), options)
    opened = gpg_peer.open_details(ours.seal(PLAINTEXT).body)
    assert opened.plaintext == PLAINTEXT
    assert sorted(opened.signers) == sorted(
        pgp_keys.fingerprint(n) for n in ("partner-a", "partner-pw"))
    assert opened.hashes == [SHA384, SHA384]
    assert (opened.cipher, opened.mdc) == (AES256, MDC)
    assert len(opened.recipients) == 2
    assert not any(s[0] in ("BADSIG", "ERRSIG", "EXPKEYSIG") for s in opened.status)


def _entries(keyset: Keyset) -> list[tuple[str, str, str]]:
    return [(k.id, "sec" if k.private else "pub", k.state.value) for k in keyset.keys]


# OpenPGP.js -> us, us -> OpenPGP.js


def openpgp_js(*args: str, stdin: bytes) -> bytes:
    done = subprocess.run(["node", str(TOOL), *args], input=stdin, capture_output=True,
                          cwd=TOOL.parent, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


@pytest.mark.parametrize(("armor", "compress"), [
    (False, "uncompressed"), (True, "zlib"), (False, "zip"),
])
def test_openpgp_js_seals_we_open(
    partner: PgpEnvelope, pgp_keys: PgpKeys, armor: bool, compress: str
) -> None:
    args = ["seal", "--sign", str(pgp_keys.sec("google-b")), "--to",
            str(pgp_keys.pub("partner-pw")), "--to", str(pgp_keys.pub("stranger")),
            "--compress", compress]
    body = openpgp_js(*args, *(["--armor"] if armor else []), stdin=PLAINTEXT)
    opened = partner.open(body)
    assert (opened.plaintext, opened.decrypted_by, opened.verified_by) == (
        PLAINTEXT, ("partner-pw",), ("google-b",))


def test_openpgp_js_signed_with_a_protected_key(
    pgp_envelope: MakeEnvelope, pgp_keys: PgpKeys
) -> None:
    google = pgp_envelope([("google-a", "sec", "active")], [("partner-pw2", "pub", "active")])
    signer = f"{pgp_keys.sec('partner-pw2')},{pgp_keys.passphrase_file('partner-pw2')}"
    body = openpgp_js("seal", "--sign", signer, "--to", str(pgp_keys.pub("google-a")),
                      "--padded", stdin=PLAINTEXT)
    assert google.open(body).verified_by == ("partner-pw2",)


@pytest.mark.parametrize("options", [PgpOptions(), PgpOptions(armor=True, compression="zlib")])
def test_we_seal_openpgp_js_opens(
    partner: PgpEnvelope, pgp_envelope: MakeEnvelope, pgp_keys: PgpKeys, options: PgpOptions
) -> None:
    ours = pgp_envelope(_entries(partner.own), _entries(partner.peer), options)
    body = ours.seal(PLAINTEXT).body
    for google in ("google-a", "google-b"):
        report = json.loads(openpgp_js(
            "open", "--key", str(pgp_keys.sec(google)),
            "--verify", str(pgp_keys.pub("partner-a")),
            "--verify", str(pgp_keys.pub("partner-pw")), stdin=body))
        assert base64.b64decode(report["plaintext"]) == PLAINTEXT
        signatures = report["signatures"]
        assert len(signatures) == 2
        assert all(s["valid"] and s["hash"] == "sha384" for s in signatures)
        assert {s["keyID"] for s in signatures} == {
            pgp_keys.fingerprint(n)[-16:] for n in ("partner-a", "partner-pw")}
