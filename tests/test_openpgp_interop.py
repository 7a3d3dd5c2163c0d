"""Native PGP engine interoperability both ways: the gpg command line, OpenPGP.js, Sequoia's sq
(when installed) and the gnupg engine."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from gateway.config import PgpOptions
from gateway.keys import Keyset
from gateway.openpgp import NativePgpEnvelope
from gateway.pgp import PgpEnvelope
from tests.pgp_fixtures import GpgPeer, PgpKeys, b64url, unb64url
from tests.test_openpgp import native_envelope, native_keyset, node  # noqa: F401

pytestmark = pytest.mark.interop

PLAINTEXT = '{"requestHeader": {"requestId": "ïd-1"}, "transferRequestId": "t-1"}'.encode()
TOOL = Path(__file__).parent / "interop" / "openpgp_tool.mjs"
MakeNative = Callable[..., NativePgpEnvelope]
SHA384, AES256, MDC = "9", "9", "2"
OURS = [("partner-a", "sec", "active"), ("partner-pw", "sec", "active")]
GOOGLE = [("google-a", "pub", "active"), ("google-b", "pub", "active")]


@pytest.fixture(scope="module")
def partner(native_envelope: MakeNative) -> NativePgpEnvelope:  # noqa: F811
    """Ours: two signing keys (one passphrase-protected), Google's two keys as peers."""
    return native_envelope(OURS, GOOGLE)


def _opened(envelope: NativePgpEnvelope, body: bytes) -> tuple[bytes, tuple[str, ...],
                                                                tuple[str, ...]]:
    opened = envelope.open(body)
    return opened.plaintext, opened.decrypted_by, opened.verified_by


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
    partner: NativePgpEnvelope, gpg_peer: GpgPeer, armor: bool, compress: str | None,
    padded: bool,
) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-a"], ["partner-a"], armor=armor, compress=compress,
                         padded=padded)
    assert unb64url(body).startswith(b"-----BEGIN PGP MESSAGE") == armor
    assert _opened(partner, body) == (PLAINTEXT, ("partner-a",), ("google-a",))


def test_gpg_two_recipients_ours_second(partner: NativePgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-b"], ["stranger", "partner-pw"])
    assert len(gpg_peer.open_details(body).recipients) == 2
    assert _opened(partner, body)[1:] == (("partner-pw",), ("google-b",))


def test_gpg_two_signatures_one_unknown(partner: NativePgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["stranger", "google-a"], ["partner-a"], armor=True)
    assert partner.open(body).verified_by == ("google-a",)


def test_gpg_both_google_keys_sign(partner: NativePgpEnvelope, gpg_peer: GpgPeer) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-a", "google-b"], ["partner-a", "partner-pw"],
                         digest="SHA512", cipher="AES128")
    assert partner.open(body).verified_by == ("google-a", "google-b")


@pytest.mark.parametrize("cipher", ["AES128", "AES192", "AES256"])
@pytest.mark.parametrize("digest", ["SHA256", "SHA384", "SHA512"])
def test_gpg_every_accepted_cipher_and_hash(
    partner: NativePgpEnvelope, gpg_peer: GpgPeer, cipher: str, digest: str
) -> None:
    body = gpg_peer.seal(PLAINTEXT, ["google-b"], ["partner-pw"], cipher=cipher, digest=digest)
    assert partner.open(body).plaintext == PLAINTEXT


def test_gpg_hidden_recipient_text_mode_and_armor_headers(
    partner: NativePgpEnvelope, gpg_peer: GpgPeer
) -> None:
    text = b'{"lines": 2}\r\n{"crlf": true}\n'
    body = gpg_peer.seal(text, ["google-a"], ["partner-a"], armor=True, extra_args=[
        "--throw-keyids", "--textmode", "--comment", "made: by gpg"])
    assert b"Comment: made: by gpg" in unb64url(body)
    opened = partner.open(body)
    assert opened.decrypted_by == ("partner-a",) and opened.verified_by == ("google-a",)
    assert opened.plaintext == gpg_peer.open(body)[0] == text.replace(b"\r", b"")


def test_base64_wrapped_in_lines(partner: NativePgpEnvelope, gpg_peer: GpgPeer) -> None:
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
    native_envelope: MakeNative, gpg_peer: GpgPeer, pgp_keys: PgpKeys,  # noqa: F811
    options: PgpOptions,
) -> None:
    ours = native_envelope(OURS, GOOGLE, options)
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


@pytest.mark.parametrize(("armor", "compress", "padded"), [
    (False, "uncompressed", False), (True, "zlib", True), (False, "zip", True),
    (True, "uncompressed", False),
])
def test_openpgp_js_seals_we_open(
    partner: NativePgpEnvelope, pgp_keys: PgpKeys, armor: bool, compress: str, padded: bool
) -> None:
    args = ["seal", "--sign", str(pgp_keys.sec("google-b")), "--sign",
            str(pgp_keys.sec("stranger")), "--to", str(pgp_keys.pub("stranger")), "--to",
            str(pgp_keys.pub("partner-pw")), "--compress", compress]
    body = openpgp_js(*args, *(["--armor"] if armor else []), *(["--padded"] if padded else []),
                      stdin=PLAINTEXT)
    assert _opened(partner, body) == (PLAINTEXT, ("partner-pw",), ("google-b",))


def test_openpgp_js_two_protected_keys_with_different_passphrases(
    native_envelope: MakeNative, pgp_keys: PgpKeys  # noqa: F811
) -> None:
    google = native_envelope([("google-a", "sec", "active")],
                             [("partner-pw", "pub", "active"), ("partner-pw2", "pub", "active")])
    signers = [f"{pgp_keys.sec(n)},{pgp_keys.passphrase_file(n)}"
               for n in ("partner-pw", "partner-pw2")]
    body = openpgp_js("seal", "--sign", signers[0], "--sign", signers[1], "--to",
                      str(pgp_keys.pub("google-a")), "--padded", stdin=PLAINTEXT)
    assert google.open(body).verified_by == ("partner-pw", "partner-pw2")


def test_openpgp_js_text_message(partner: NativePgpEnvelope, pgp_keys: PgpKeys,
                                 gpg_peer: GpgPeer) -> None:
    """OpenPGP.js's text messages: a UTF-8 literal with CR LF line ends, a text signature."""
    body = node("""
        import { readFileSync } from 'node:fs';
        import * as openpgp from 'openpgp';
        const [signer, recipient] = process.argv.slice(1);
        const sealed = await openpgp.encrypt({
          message: await openpgp.createMessage({ text: readFileSync(0, 'utf8') }),
          signingKeys: await openpgp.readPrivateKey({ armoredKey: readFileSync(signer, 'utf8') }),
          encryptionKeys: await openpgp.readKey({ armoredKey: readFileSync(recipient, 'utf8') }),
        });
        process.stdout.write(Buffer.from(sealed, 'utf8').toString('base64url'));
    """, str(pgp_keys.sec("google-a")), str(pgp_keys.pub("partner-a")),
                stdin=b'{"a": 1}\n{"b": "\xc3\xa9"}\n')
    opened = partner.open(body)
    assert opened.verified_by == ("google-a",)
    assert opened.plaintext == gpg_peer.open(body)[0] == b'{"a": 1}\n{"b": "\xc3\xa9"}\n'


@pytest.mark.parametrize("options", [PgpOptions(), PgpOptions(armor=True, compression="zlib"),
                                     PgpOptions(compression="zip", digest="SHA512")])
def test_we_seal_openpgp_js_opens(
    native_envelope: MakeNative, pgp_keys: PgpKeys, options: PgpOptions  # noqa: F811
) -> None:
    ours = native_envelope(OURS, GOOGLE, options)
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


# sq (Sequoia) -> us, us -> sq


@pytest.fixture(scope="module")
def sq() -> str:
    found = shutil.which("sq")
    if found is None:
        pytest.skip("sq (Debian package sq) is not installed")
    return found


@pytest.mark.parametrize("compression", ["pad", "none", "zip", "zlib", "bzip2"])
def test_sq_seals_we_open(
    native_envelope: MakeNative, pgp_keys: PgpKeys, sq: str, compression: str  # noqa: F811
) -> None:
    partner = native_envelope([("partner-a", "sec", "active")], GOOGLE)
    done = subprocess.run(
        [sq, "encrypt", "--recipient-cert", str(pgp_keys.pub("stranger")), "--recipient-cert",
         str(pgp_keys.pub("partner-a")), "--signer-key", str(pgp_keys.sec("google-b")),
         "--compression", compression, *(["--binary"] if compression == "zip" else [])],
        input=PLAINTEXT, capture_output=True, timeout=60, check=True)
    assert _opened(partner, b64url(done.stdout)) == (PLAINTEXT, ("partner-a",), ("google-b",))


def test_we_seal_sq_opens(
    native_envelope: MakeNative, pgp_keys: PgpKeys, sq: str, tmp_path: Path  # noqa: F811
) -> None:
    ours = native_envelope([("partner-a", "sec", "active")], GOOGLE, PgpOptions(armor=True))
    message = tmp_path / "message.asc"
    message.write_bytes(unb64url(ours.seal(PLAINTEXT).body))
    done = subprocess.run(
        [sq, "decrypt", "--recipient-key", str(pgp_keys.sec("google-b")), "--signer-cert",
         str(pgp_keys.pub("partner-a")), str(message)],
        capture_output=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == PLAINTEXT
    assert b"Good signature" in done.stderr


# The gnupg engine <-> the native engine


@pytest.fixture(scope="module")
def gnupg_pair(pgp_envelope: Callable[..., PgpEnvelope]) -> Iterator[
        tuple[PgpEnvelope, PgpEnvelope]]:
    yield (pgp_envelope(OURS, GOOGLE, PgpOptions(compression="zlib")),
           pgp_envelope([("google-a", "sec", "active")],
                        [("partner-a", "pub", "active"), ("partner-pw", "pub", "active")]))


@pytest.mark.parametrize("options", [PgpOptions(), PgpOptions(armor=True, compression="zip")])
def test_the_two_engines_open_each_others_messages(
    native_envelope: MakeNative, native_keyset: Callable[..., Keyset],  # noqa: F811
    gnupg_pair: tuple[PgpEnvelope, PgpEnvelope], options: PgpOptions,
) -> None:
    gnupg_partner, gnupg_google = gnupg_pair
    native_partner = native_envelope(OURS, GOOGLE, options)
    native_google = native_envelope(
        [("google-a", "sec", "active")],
        [("partner-a", "pub", "active"), ("partner-pw", "pub", "active")])
    for sealer, opener in ((native_partner, gnupg_google), (gnupg_partner, native_google)):
        sealed = sealer.seal(PLAINTEXT)
        opened = opener.open(sealed.body)
        assert opened.plaintext == PLAINTEXT
        assert opened.decrypted_by == ("google-a",)
        assert opened.verified_by == sealed.signed_by == ("partner-a", "partner-pw")
