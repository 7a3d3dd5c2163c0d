"""Native PGP engine interoperability beyond what tests/test_pgp_interop.py asks of both engines:
more shapes from gpg and OpenPGP.js, Sequoia's sq (when installed) and the gnupg engine."""

from __future__ import annotations

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
from tests.test_openpgp import node
from tests.test_pgp_interop import GOOGLE, OURS, PLAINTEXT

pytestmark = pytest.mark.interop

MakeNative = Callable[..., NativePgpEnvelope]


@pytest.fixture(scope="module")
def partner(native_envelope: MakeNative) -> NativePgpEnvelope:
    """Ours: two signing keys (one passphrase-protected), Google's two keys as peers."""
    return native_envelope(OURS, GOOGLE)


def _opened(envelope: NativePgpEnvelope, body: bytes) -> tuple[bytes, tuple[str, ...],
                                                                tuple[str, ...]]:
    opened = envelope.open(body)
    return opened.plaintext, opened.decrypted_by, opened.verified_by


# gpg -> us


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


# OpenPGP.js -> us


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


# sq (Sequoia) -> us, us -> sq


@pytest.fixture(scope="module")
def sq() -> str:
    found = shutil.which("sq")
    if found is None:
        pytest.skip("sq (Debian package sq) is not installed")
    return found


@pytest.mark.parametrize("compression", ["pad", "none", "zip", "zlib", "bzip2"])
def test_sq_seals_we_open(
    native_envelope: MakeNative, pgp_keys: PgpKeys, sq: str, compression: str
) -> None:
    partner = native_envelope([("partner-a", "sec", "active")], GOOGLE)
    done = subprocess.run(
        [sq, "encrypt", "--recipient-cert", str(pgp_keys.pub("stranger")), "--recipient-cert",
         str(pgp_keys.pub("partner-a")), "--signer-key", str(pgp_keys.sec("google-b")),
         "--compression", compression, *(["--binary"] if compression == "zip" else [])],
        input=PLAINTEXT, capture_output=True, timeout=60, check=True)
    assert _opened(partner, b64url(done.stdout)) == (PLAINTEXT, ("partner-a",), ("google-b",))


def test_we_seal_sq_opens(
    native_envelope: MakeNative, pgp_keys: PgpKeys, sq: str, tmp_path: Path
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
    native_envelope: MakeNative, native_keyset: Callable[..., Keyset],
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
