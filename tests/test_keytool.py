"""keytool.py through the command line: keys generate and list, open, seal and echo."""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiohttp import web

from gateway.__main__ import main
from gateway.config import JoseOptions, KeyConfig, KeysetConfig, KeyState, PgpOptions
from gateway.jose import JoseEnvelope, load_jose_keyset
from gateway.keys import Keyset
from gateway.keytool import mask_payment_data, show_masked
from gateway.pgp import PgpEnvelope, load_pgp_keyset
from tests.e2e import Pki, rsa_public
from tests.jose_fixtures import JoseKeys, NodeJose, NodeJoseError, craft_jwe
from tests.peers import StandIn
from tests.pgp_fixtures import GpgPeer, PgpKeys, b64url, unb64url

CARD = "4111111111111111"
TRANSFER = json.dumps({
    "requestHeader": {"requestId": "req-77", "requestTimestamp": {"epochMillis": "1795843151000"},
                      "protocolVersion": {"major": 1}, "paymentIntegratorAccountId": "PIAID-1"},
    "cardData": {"cardNumber": CARD, "expirationMonth": 12, "expirationYear": 2030,
                 "cryptogram": "AgAAAAAABk4DWZ4C28yUQAAAAAA=",
                 "cardNetwork": {"cardScheme": "VISA", "eciIndicator": "05"}},
    "qrCode": "00020101021226", "note": "5500 0000 0000 0004",
}).encode()


@dataclass
class Ran:
    code: int
    out: str
    err: str


def gateway(capsys: pytest.CaptureFixture[str], *argv: str, stdin: bytes = b"") -> Ran:
    """Run the command line in this process (stdin as given) and capture what it printed."""
    capsys.readouterr()
    saved = sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    try:
        code = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        code = int(exc.code or 0)
    finally:
        sys.stdin = saved
    captured = capsys.readouterr()
    return Ran(code, captured.out, captured.err)


def gpg(home: Path, *args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    home.mkdir(mode=0o700, exist_ok=True)
    return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--with-colons", *args],
                          input=stdin, capture_output=True, timeout=60, check=True)


# -- keys generate pgp --------------------------------------------------------------------------


@dataclass(frozen=True)
class Generated:
    dir: Path
    passphrase: str
    fingerprint: str
    output: str


@pytest.fixture(scope="module")
def generated_pgp(session_tmp: Path) -> Generated:
    """One passphrase-protected RSA-2048 key made by `keys generate pgp` (for the module)."""
    out = session_tmp / "kt-pgp"
    out.mkdir()
    (out / "p.pass").write_text("grüne Äpfel 7\n", encoding="utf-8")
    with pytest.MonkeyPatch.context() as patch:
        buffer = io.StringIO()
        patch.setattr(sys, "stdout", buffer)
        code = main(["keys", "generate", "pgp", "--name", "partner-2027", "--email",
                     "payments@partner.example", "--bits", "2048", "--expires", "30d",
                     "--passphrase-file", str(out / "p.pass"), "--out", str(out)])
    assert code == 0
    [fingerprint] = re.findall(r"primary key  RSA-2048  sign, certify  ([0-9A-F]{40})",
                               buffer.getvalue())
    return Generated(out, "grüne Äpfel 7", fingerprint, buffer.getvalue())


def test_generated_pgp_key_meets_googles_rules(generated_pgp: Generated, tmp_path: Path) -> None:
    home = tmp_path / "g"
    listing = gpg(home, "--import-options", "show-only", "--import",
                  str(generated_pgp.dir / "partner-2027.pub.asc")).stdout.decode()
    keys = [line.split(":") for line in listing.splitlines() if line[:4] in ("pub:", "sub:")]
    assert [k[0] for k in keys] == ["pub", "sub"]
    primary, subkey = keys
    assert primary[3] == subkey[3] == "1"  # RSA (RFC 4880 9.1)
    assert primary[2] == subkey[2] == "2048"
    assert set(primary[11]) >= {"s", "c"} and "e" not in primary[11]  # own capabilities
    assert subkey[11] == "e"
    for part in (primary, subkey):
        assert int(part[6]) - int(part[5]) == 30 * 86400  # expiry as asked
    assert primary[4] == generated_pgp.fingerprint[-16:]
    gpg(home, "--import", str(generated_pgp.dir / "partner-2027.pub.asc"))
    try:
        prefs = gpg(home, "--edit-key", generated_pgp.fingerprint, "quit").stdout.decode()
    finally:  # --edit-key starts an agent in the home: it would outlive the test
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=30, check=False)
    [uid] = [line for line in prefs.splitlines() if line.startswith("uid:")]
    assert uid.split(":")[12].split(",")[0] == "S9 S8 S7 H9 H8 H10 Z2 Z1 Z0"  # AES256, SHA384
    packets = subprocess.run(["gpg", "--list-packets"], input=(
        generated_pgp.dir / "partner-2027.sec.asc").read_bytes(), capture_output=True,
        timeout=60, check=False).stdout.decode()
    assert packets.count("protected") >= 2  # primary and subkey need the passphrase
    assert (generated_pgp.dir / "partner-2027.sec.asc").stat().st_mode & 0o077 == 0
    out = generated_pgp.output
    assert "partner-2027 <payments@partner.example>" in out
    assert "id: partner-2027" in out and "state: read-only" in out
    assert "passphrase_file:" in out and generated_pgp.passphrase not in out


def test_generated_pgp_key_works_with_the_gateway_and_gpg(
    generated_pgp: Generated, pgp_keys: PgpKeys, pgp_keyset: Callable[..., Keyset],
    tmp_path: Path,
) -> None:
    secret = generated_pgp.dir / "partner-2027.sec.asc"
    own = load_pgp_keyset(KeysetConfig(name="own", type="pgp", place="keysets.own", keys=(
        KeyConfig(id="partner-2027", file=secret, state=KeyState.ACTIVE,
                  place="keysets.own.keys[0]", passphrase=generated_pgp.passphrase),)),
        tmp_path / "l")
    peer = pgp_keyset("peer", [("google-a", "pub", "active")])
    envelope = PgpEnvelope(own, peer, PgpOptions(), tmp_path / "e", max_plaintext_bytes=1 << 16)
    google = GpgPeer(pgp_keys, tmp_path / "google", names=["google-a"])
    try:
        google.gpg("--import", str(generated_pgp.dir / "partner-2027.pub.asc"))
        sealed = envelope.seal(b'{"ping":1}')
        opened = google.open_details(sealed.body)
        assert opened.plaintext == b'{"ping":1}'
        assert opened.signers == [generated_pgp.fingerprint] and opened.hashes == ["9"]
        body = b64url(google.gpg("--sign", "--encrypt", "--local-user",
                                 pgp_keys.fingerprint("google-a"), "--recipient",
                                 generated_pgp.fingerprint, stdin=b'{"pong":2}').stdout)
        back = envelope.open(body)
        assert back.plaintext == b'{"pong":2}' and back.decrypted_by == ("partner-2027",)
    finally:
        envelope.close()
        google.close()


@pytest.mark.parametrize(("args", "code", "message"), [
    (["--bits", "1024"], 1, "--bits: 1024 bits: Google requires RSA keys of at least 2048"),
    (["--bits", "8192"], 1, "--bits: 8192 bits: gpg makes RSA keys of at most 4096"),
    (["--expires", "3y"], 1, "--expires: 1095 days is more than two years"),
    (["--expires", "25m"], 1, "--expires: 750 days is more than two years"),
    (["--expires", "1 year"], 2, "is not a validity such as 365d"),
    (["--expires", "0d"], 2, "is not a validity"),
    (["--name", "two words"], 1, "--name: 'two words' is not a key id"),
    (["--email", "nobody"], 1, "--email: 'nobody' is not an email address"),
])
def test_pgp_keys_outside_the_rules_are_refused(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, args: list[str], code: int, message: str,
) -> None:
    defaults = {"--name": "k", "--email": "k@partner.example", "--bits": "2048",
                "--expires": "1y"}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        defaults[flag] = value
    argv = [a for pair in defaults.items() for a in pair]
    ran = gateway(capsys, "keys", "generate", "pgp", *argv, "--out", str(tmp_path / "o"))
    assert ran.code == code
    assert message in ran.err
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_existing_key_files_are_not_overwritten(capsys: pytest.CaptureFixture[str],
                                                tmp_path: Path) -> None:
    (tmp_path / "k.sec.asc").write_text("keep me")
    ran = gateway(capsys, "keys", "generate", "pgp", "--name", "k", "--email", "k@p.example",
                  "--out", str(tmp_path))
    assert ran.code == 1 and "exists; not overwritten" in ran.err
    assert (tmp_path / "k.sec.asc").read_text() == "keep me"
    ran = gateway(capsys, "keys", "generate", "jose", "--kid", "k", "--use", "sig", "--alg",
                  "ES256", "--bits", "2048", "--out", str(tmp_path))
    assert ran.code == 1 and "--bits: ES256 keys are EC P-256" in ran.err
    ran = gateway(capsys, "keys", "generate", "jose", "--kid", "k", "--use", "enc", "--alg",
                  "PS256", "--out", str(tmp_path))
    assert ran.code == 1 and "--alg: PS256 is a sig algorithm" in ran.err


# -- keys generate jose -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def generated_jose(session_tmp: Path) -> Path:
    """RS256, PS256, ES256 signing keys and an RSA-OAEP-256 encryption key, RSA at 2048 bits."""
    out = session_tmp / "kt-jose"
    for kid, use, alg in (("ours-rs", "sig", "RS256"), ("ours-ps", "sig", "PS256"),
                          ("ours-es", "sig", "ES256"), ("ours-enc", "enc", "RSA-OAEP-256")):
        bits = [] if alg == "ES256" else ["--bits", "2048"]
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "stdout", io.StringIO())
            assert main(["keys", "generate", "jose", "--kid", kid, "--use", use, "--alg", alg,
                         *bits, "--out", str(out)]) == 0
    return out


def test_generated_jwks_have_kid_use_alg_and_no_private_part_in_public(
    generated_jose: Path,
) -> None:
    for kid, use, alg, kty in (("ours-rs", "sig", "RS256", "RSA"), ("ours-es", "sig", "ES256",
                               "EC"), ("ours-enc", "enc", "RSA-OAEP-256", "RSA")):
        private = json.loads((generated_jose / f"{kid}.private.jwk").read_text())
        public = json.loads((generated_jose / f"{kid}.public.jwk").read_text())
        assert (private["kid"], private["use"], private["alg"], private["kty"]) == (
            kid, use, alg, kty)
        assert "d" in private and "d" not in public and public["kid"] == kid
        assert (generated_jose / f"{kid}.private.jwk").stat().st_mode & 0o077 == 0
    assert json.loads((generated_jose / "ours-es.public.jwk").read_text())["crv"] == "P-256"


@pytest.mark.parametrize("alg", ["RS256", "PS256", "ES256"])
def test_generated_jwks_interoperate_with_panva_jose(
    generated_jose: Path, jose_keys: JoseKeys, node_jose: NodeJose, alg: str,
) -> None:
    signer = {"RS256": "ours-rs", "PS256": "ours-ps", "ES256": "ours-es"}[alg]
    own = load_jose_keyset(KeysetConfig(name="own", type="jose", place="keysets.own", keys=(
        KeyConfig(id=signer, file=generated_jose / f"{signer}.private.jwk",
                  state=KeyState.ACTIVE, place="keysets.own.keys[0]"),
        KeyConfig(id="ours-enc", file=generated_jose / "ours-enc.private.jwk",
                  state=KeyState.ACTIVE, place="keysets.own.keys[1]"))))
    peer = load_jose_keyset(jose_keys.keyset_config("peer", [
        ("google-sig-a", "public", "active"), ("google-enc-a", "public", "active")]))
    ours = JoseEnvelope(own, peer, JoseOptions(sign_alg=alg), max_plaintext_bytes=1 << 16)
    sealed = ours.seal(b'{"ping":1}')
    plaintext, jws_header, _ = node_jose.open(
        sealed.body, jose_keys.private("google-enc-a"), [generated_jose / f"{signer}.public.jwk"])
    assert plaintext == b'{"ping":1}'
    assert (jws_header["alg"], jws_header["kid"]) == (alg, signer)
    # Google's side seals with panva's jose to our generated encryption key.
    body = node_jose.seal(b'{"pong":2}', jose_keys.private("google-sig-a"), "RS256",
                          generated_jose / "ours-enc.public.jwk")
    opened = ours.open(body)
    assert opened.plaintext == b'{"pong":2}' and opened.decrypted_by == ("ours-enc",)


# -- keys list --------------------------------------------------------------------------------


def pgp_config(pgp_keys: PgpKeys, runtime_dir: Path, own: str, peer: str, *,
               upstream: str = "http://127.0.0.1:9", extra: str = "") -> str:
    return textwrap.dedent(f"""
        runtime_dir: {runtime_dir}
        warn_expiry_days: 30{extra}
        keysets:
          partner:
            type: pgp
            keys:{own}
          google:
            type: pgp
            keys:{peer}
        routes:
          - {{name: in, direction: inbound, listen: "127.0.0.1:0",
              upstream: {{url: "http://127.0.0.1:9"}}, own_keys: partner, peer_keys: google}}
          - {{name: out, direction: outbound, listen: "127.0.0.1:0",
              upstream: {{url: "{upstream}", timeout_s: 10}},
              own_keys: partner, peer_keys: google}}
        """)


def entry(keys: PgpKeys, name: str, kind: str, state: str, extra: str = "") -> str:
    file = keys.sec(name) if kind == "sec" else keys.pub(name)
    pw = keys.passphrase_file(name) if kind == "sec" else None
    more = f", passphrase_file: {pw}" if pw else ""
    return f"\n              - {{id: {name}, file: {file}, state: {state}{more}{extra}}}"


def test_keys_list_prints_every_fact(capsys: pytest.CaptureFixture[str], pgp_keys: PgpKeys,
                                     runtime_dir: Path, tmp_path: Path) -> None:
    soon = (datetime.now(UTC) + timedelta(days=10, hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    hour = (datetime.now(UTC) + timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    own = (entry(pgp_keys, "partner-a", "sec", "active")
           + entry(pgp_keys, "partner-3k", "sec", "read-only", f", not_after: '{soon}'")
           + entry(pgp_keys, "partner-pw", "sec", "disabled", f", not_after: '{hour}'"))
    peer = (entry(pgp_keys, "google-a", "pub", "active")
            + entry(pgp_keys, "google-expired", "pub", "read-only"))
    path = tmp_path / "config.yaml"
    path.write_text(pgp_config(pgp_keys, runtime_dir, own, peer))
    ran = gateway(capsys, "keys", "list", "--config", str(path))
    assert ran.code == 0, ran.err
    lines = ran.out.splitlines()
    assert "keyset partner (pgp) used by: in (own), out (own)" in lines
    assert "keyset google (pgp) used by: in (peer), out (peer)" in lines

    def block(key_id: str) -> str:
        start = next(i for i, line in enumerate(lines) if line.split()[:1] == [key_id])
        end = next((i for i in range(start + 1, len(lines))
                    if not lines[i].startswith("   ")), len(lines))
        return "\n".join(lines[start:end])

    a = block("partner-a")
    assert "active" in a and "private" in a and "RSA-2048" in a and "sign+encrypt" in a
    assert pgp_keys.fingerprint("partner-a") in a and "does: sign, decrypt" in a
    assert "days left" in a and "WARNING" not in a
    k3 = block("partner-3k")
    assert "read-only" in k3 and "RSA-3072" in k3 and "does: decrypt" in k3
    assert "WARNING: expires in 10 days" in k3 and soon in k3
    pw = block("partner-pw")
    assert "disabled" in pw and "does: nothing" in pw and "WARNING" not in pw
    g = block("google-a")
    assert "public" in g and "does: encrypt, verify" in g
    expired = block("google-expired")
    assert "WARNING: expired on" in expired and "does: nothing" in expired

    ran = gateway(capsys, "keys", "list", "--config", str(path), "--json")
    assert ran.code == 0
    facts = {f["id"]: f for f in json.loads(ran.out)}
    assert list(facts) == ["partner-a", "partner-3k", "partner-pw", "google-a", "google-expired"]
    a_json = facts["partner-a"]
    assert set(a_json) == {"keyset", "type", "id", "state", "private", "algorithm", "bits",
                           "fingerprint", "capabilities", "ops", "expires", "days_left",
                           "expired", "routes", "warnings"}
    assert (a_json["keyset"], a_json["type"], a_json["state"], a_json["private"],
            a_json["algorithm"], a_json["bits"]) == ("partner", "pgp", "active", True,
                                                     "RSA-2048", 2048)
    assert a_json["fingerprint"] == pgp_keys.fingerprint("partner-a")
    assert a_json["capabilities"] == ["sign", "encrypt"] and a_json["ops"] == ["sign", "decrypt"]
    assert a_json["routes"] == [{"route": "in", "direction": "inbound", "role": "own_keys"},
                                {"route": "out", "direction": "outbound", "role": "own_keys"}]
    assert 340 < a_json["days_left"] < 366 and a_json["expired"] is False
    assert facts["partner-3k"]["expires"] == soon and facts["partner-3k"]["bits"] == 3072
    assert 9.9 < facts["partner-3k"]["days_left"] < 10.2
    assert facts["partner-3k"]["warnings"] == ["expires in 10 days (warn_expiry_days 30)"]
    assert facts["partner-pw"]["state"] == "disabled" and facts["partner-pw"]["ops"] == []
    # An hour left rounds to 0.0 days: not expired for all that (it said so, while signing).
    assert (facts["partner-pw"]["days_left"], facts["partner-pw"]["expired"]) == (0.0, False)
    assert facts["google-a"]["ops"] == ["encrypt", "verify"]
    assert facts["google-expired"]["expired"] is True
    assert facts["google-expired"]["days_left"] < 0


def test_keys_list_of_an_invalid_config_fails(capsys: pytest.CaptureFixture[str],
                                              tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("keysets: {}\n")
    ran = gateway(capsys, "keys", "list", "--config", str(path))
    assert ran.code == 1 and ran.err.startswith("error: keysets")


# -- open and seal ----------------------------------------------------------------------------


@pytest.fixture
def pgp_route(pgp_keys: PgpKeys, runtime_dir: Path, tmp_path: Path) -> Path:
    own = (entry(pgp_keys, "partner-a", "sec", "active")
           + entry(pgp_keys, "partner-b", "sec", "disabled"))
    peer = entry(pgp_keys, "google-a", "pub", "active") + entry(pgp_keys, "google-b", "pub",
                                                                "disabled")
    path = tmp_path / "config.yaml"
    path.write_text(pgp_config(pgp_keys, runtime_dir, own, peer))
    return path


def test_open_prints_keys_and_masks_payment_data(
    capsys: pytest.CaptureFixture[str], pgp_route: Path, gpg_peer: GpgPeer,
) -> None:
    body = gpg_peer.seal(TRANSFER, sign_with=["google-a"], encrypt_to=["partner-a"])
    ran = gateway(capsys, "open", "--config", str(pgp_route), "--route", "in", stdin=body)
    assert ran.code == 0, ran.err
    assert "decrypted by: partner-a (keyset partner)" in ran.err
    assert "verified:     google-a (keyset google)" in ran.err
    shown = json.loads(ran.out)
    assert shown["cardData"]["cardNumber"] == "************1111"
    assert shown["cardData"]["cryptogram"] == "****"
    assert shown["note"] == "************0004"
    assert shown["requestHeader"]["requestTimestamp"]["epochMillis"] == "1795843151000"
    assert shown["cardData"]["expirationYear"] == 2030
    assert CARD not in ran.out + ran.err and "AgAAAAAABk4" not in ran.out + ran.err
    ran = gateway(capsys, "open", "--config", str(pgp_route), "--route", "in",
                  "--show-payment-data", stdin=body)
    assert ran.code == 0 and ran.out.encode() == TRANSFER


def test_open_explains_pgp_failures(
    capsys: pytest.CaptureFixture[str], pgp_route: Path, gpg_peer: GpgPeer, pgp_keys: PgpKeys,
) -> None:
    def why(body: bytes) -> str:
        ran = gateway(capsys, "open", "--config", str(pgp_route), "--route", "in", stdin=body)
        assert ran.code == 1 and not ran.out
        assert CARD not in ran.err
        return ran.err

    stranger = why(gpg_peer.seal(TRANSFER, ["google-a"], ["stranger"]))
    assert "cannot open the request body: unknown_key" in stranger
    assert re.search(r"encrypted to key id [0-9A-F]{16}: no key of keyset 'partner'", stranger)
    disabled = why(gpg_peer.seal(TRANSFER, ["google-a"], ["partner-b"]))
    assert "unknown_key" in disabled
    assert re.search(r"encrypted to key id [0-9A-F]{16}: key 'partner-b' of keyset 'partner' "
                     r"\(disabled\)", disabled)
    unknown = why(gpg_peer.seal(TRANSFER, ["stranger"], ["partner-a"]))
    signer = pgp_keys.fingerprint("stranger")[-16:]
    assert "cannot open the request body: signature: no good signature" in unknown
    assert f"signed by key id {signer}: no key of keyset 'google'" in unknown
    assert "layer: signature" in unknown
    old = why(gpg_peer.seal(TRANSFER, ["google-b"], ["partner-a"]))
    signer = pgp_keys.fingerprint("google-b")[-16:]
    assert f"signed by key id {signer}: key 'google-b' of keyset 'google' (disabled)" in old
    raw = bytearray(unb64url(gpg_peer.seal(TRANSFER, ["google-a"], ["partner-a"],
                                           compress="none")))
    raw[-40] ^= 0x01
    tampered = why(b64url(bytes(raw)))
    assert "cannot open the request body: decrypt:" in tampered and "altered" in tampered
    cast5 = why(gpg_peer.seal(TRANSFER, ["google-a"], ["partner-a"], cipher="CAST5"))
    assert "algorithm: cipher algorithm CAST5 (3) is refused" in cast5
    sha1 = why(gpg_peer.seal(TRANSFER, ["google-a"], ["partner-a"], digest="SHA1"))
    assert "algorithm: the peer's signature uses the refused hash algorithm SHA1" in sha1
    assert "layer: signature" in sha1
    assert "malformed" in why(b"not-a-pgp-message")


def test_open_explains_jose_failures(
    capsys: pytest.CaptureFixture[str], jose_keys: JoseKeys, node_jose: NodeJose,
    runtime_dir: Path, tmp_path: Path,
) -> None:
    k = jose_keys
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        runtime_dir: {runtime_dir}
        keysets:
          partner:
            type: jose
            keys:
              - {{id: partner-sig-a, file: {k.private('partner-sig-a')}}}
              - {{id: partner-enc-a, file: {k.private('partner-enc-a')}}}
              - {{id: partner-enc-b, file: {k.private('partner-enc-b')}, state: disabled}}
          google:
            type: jose
            keys:
              - {{id: google-sig-a, file: {k.public('google-sig-a')}}}
              - {{id: google-enc-a, file: {k.public('google-enc-a')}}}
              - {{id: google-sig-b, file: {k.public('google-sig-b')}, state: disabled}}
        routes:
          - {{name: in, direction: inbound, listen: "127.0.0.1:0",
              upstream: {{url: "http://127.0.0.1:9"}}, own_keys: partner, peer_keys: google}}
        """))

    def opened(body: bytes) -> Ran:
        return gateway(capsys, "open", "--config", str(path), "--route", "in", stdin=body)

    def seal(signer: str, recipient: str, **kw: str) -> bytes:
        return node_jose.seal(TRANSFER, k.private(signer), "RS256", k.public(recipient), **kw)

    good = opened(seal("google-sig-a", "partner-enc-a"))
    assert good.code == 0 and "************1111" in good.out and CARD not in good.out
    assert "verified:     google-sig-a" in good.err
    stranger = opened(seal("google-sig-a", "stranger-enc")).err
    assert "unknown_key: JWE kid 'stranger-enc' names no enabled own key" in stranger
    assert ("JWE alg RSA-OAEP-256, enc A256GCM, kid stranger-enc: no key of keyset 'partner' "
            "has this kid") in stranger
    disabled = opened(seal("google-sig-a", "partner-enc-b")).err
    assert "kid partner-enc-b: key 'partner-enc-b' of keyset 'partner' (disabled)" in disabled
    unknown = opened(seal("stranger-sig", "partner-enc-a")).err
    assert "signature: JWS kid 'stranger-sig' names no enabled, unexpired peer key" in unknown
    assert "JWS kid stranger-sig: no key of keyset 'google' has this kid" in unknown
    old = opened(seal("google-sig-b", "partner-enc-a")).err
    assert "JWS kid google-sig-b: key 'google-sig-b' of keyset 'google' (disabled)" in old
    parts = seal("google-sig-a", "partner-enc-a").split(b".")
    parts[3] = parts[3][:10] + (b"A" if parts[3][10:11] != b"A" else b"B") + parts[3][11:]
    tampered = opened(b".".join(parts))
    assert tampered.code == 1
    assert "decrypt: the content key unwrapped by own key 'partner-enc-a'" in tampered.err
    assert "altered" in tampered.err
    refused = opened(seal("google-sig-a", "partner-enc-a", enc="A192GCM"))
    assert refused.code == 1 and "algorithm: JWE enc 'A192GCM' is not accepted" in refused.err
    hostile = craft_jwe({"alg": "RSA-OAEP-256", "enc": "A256GCM", "kid": "\x1b[2J" + "k" * 99},
                        b"{}", rsa_public(k, "partner-enc-a"))
    shown = opened(hostile.encode())
    assert shown.code == 1 and "unknown_key" in shown.err
    assert "\x1b" not in shown.err and "k" * 60 not in shown.err  # quoted and cut short


def test_open_and_seal_follow_the_route_direction(
    capsys: pytest.CaptureFixture[str], pgp_route: Path, gpg_peer: GpgPeer, pgp_keys: PgpKeys,
) -> None:
    ran = gateway(capsys, "open", "--config", str(pgp_route), "--route", "out", stdin=b"x")
    assert ran.code == 2 and "route 'out' is outbound" in ran.err and "open --response" in ran.err
    ran = gateway(capsys, "seal", "--config", str(pgp_route), "--route", "in", stdin=b"{}")
    assert ran.code == 2 and "seal --response" in ran.err
    ran = gateway(capsys, "open", "--config", str(pgp_route), "--route", "nope", stdin=b"x")
    assert ran.code == 2 and "no route named 'nope' (routes: in, out)" in ran.err
    sealed = gateway(capsys, "seal", "--config", str(pgp_route), "--route", "out",
                     stdin=b'{"ping":1}')
    assert sealed.code == 0, sealed.err
    assert "signed by:    partner-a (keyset partner)" in sealed.err
    assert "encrypted to: google-a (keyset google)" in sealed.err
    opened = gpg_peer.open_details(sealed.out.strip().encode())
    assert opened.plaintext == b'{"ping":1}'
    assert opened.signers == [pgp_keys.fingerprint("partner-a")]
    # The inbound route seals responses: what it makes opens at Google.
    response = gateway(capsys, "seal", "--config", str(pgp_route), "--route", "in", "--response",
                       stdin=b'{"pong":2}')
    assert gpg_peer.open_details(response.out.strip().encode()).plaintext == b'{"pong":2}'


def test_masking_walks_every_value() -> None:
    value = {"a": [{"cardNumber": 4111111111111111}, "6011 0000 0000 0004"],
             "cryptogram": None, "b": {"cryptogram": "x"}, "short": "123456789012",
             "epochMillis": "1795843151000", "flag": True}
    assert mask_payment_data(value) == {
        "a": [{"cardNumber": "************1111"}, "************0004"], "cryptogram": None,
        "b": {"cryptogram": "****"}, "short": "123456789012", "epochMillis": "1795843151000",
        "flag": True}


@pytest.mark.parametrize("depth", [500, 995, 5000])
def test_a_deeply_nested_plaintext_is_not_shown_rather_than_crashing(depth: int) -> None:
    plaintext = b'{"a":' * depth + b'"4111111111111111"' + b"}" * depth
    shown = show_masked(plaintext)
    assert "4111111111111111" not in shown
    assert "1111" in shown or "not shown" in shown


# -- echo -------------------------------------------------------------------------------------


@dataclass
class StandInGoogle:
    """Google's echo endpoint: opens our request with an implementation that is not ours,
    answers 401 unless the signature is by a key it trusts, else seals an echo answer."""

    trusted: set[str]  # our primary fingerprints
    server: StandIn | None = None


@pytest.fixture
async def pgp_google(pgp_keys: PgpKeys, gpg_peer: GpgPeer, pki: Pki,
                     ) -> AsyncIterator[StandInGoogle]:
    google = StandInGoogle({pgp_keys.fingerprint("partner-a")})

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        opened = await asyncio.to_thread(gpg_peer.open_details, body)
        if not set(opened.signers) & google.trusted:
            return web.Response(status=401)
        message = json.loads(opened.plaintext)
        answer = json.dumps({"responseHeader": {"responseTimestamp": {"epochMillis": "1"}},
                             "clientMessage": message["clientMessage"],
                             "serverMessage": "pong"}).encode()
        sealed = await asyncio.to_thread(gpg_peer.seal, answer, ["google-a"], ["partner-a"])
        return web.Response(body=sealed,
                            headers={"Content-Type": "application/octet-stream; charset=utf-8"})

    google.server = await StandIn(handler, ssl_context=pki.server_context()).start()
    yield google
    await google.server.stop()


def echo_config(pgp_keys: PgpKeys, runtime_dir: Path, pki: Pki, url: str, own: str) -> str:
    peer = entry(pgp_keys, "google-a", "pub", "active")
    return pgp_config(pgp_keys, runtime_dir, own, peer,
                      upstream=url).replace("timeout_s: 10}", f"timeout_s: 10, ca: {pki.ca}}}")


async def test_echo_reports_key_ids_both_ways(
    capsys: pytest.CaptureFixture[str], pgp_google: StandInGoogle, pgp_keys: PgpKeys,
    runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    assert pgp_google.server is not None
    path = tmp_path / "config.yaml"
    # Credentials in the URL (from a Secret, say) are never printed.
    url = pgp_google.server.url.replace("://", "://user:TopSecret9@") + "/gsp"
    path.write_text(echo_config(pgp_keys, runtime_dir, pki, url,
                                entry(pgp_keys, "partner-a", "sec", "active")))
    ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path), "--route",
                                  "out", "--account", "PIAID-1")
    assert ran.code == 0, ran.out + ran.err
    assert "TopSecret9" not in ran.out + ran.err and "***@" in ran.out
    [call] = pgp_google.server.calls
    assert call.path == "/gsp/cards-qr-v1/echo/PIAID-1"
    assert call.headers["Content-Type"] == "application/octet-stream; charset=utf-8"
    assert "signed by partner-a (keyset partner), encrypted to google-a (keyset google)" in ran.out
    assert "answer   HTTP 200" in ran.out
    assert "decrypted by partner-a (keyset partner), verified google-a (keyset google)" in ran.out
    assert '"serverMessage": "pong"' in ran.out and "echo ok" in ran.out


async def test_echo_fails_precisely_when_google_does_not_trust_our_new_key(
    capsys: pytest.CaptureFixture[str], pgp_google: StandInGoogle, pgp_keys: PgpKeys,
    runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    assert pgp_google.server is not None
    path = tmp_path / "config.yaml"
    own = entry(pgp_keys, "partner-a", "sec", "read-only") + entry(pgp_keys, "partner-b", "sec",
                                                                   "active")
    path.write_text(echo_config(pgp_keys, runtime_dir, pki, pgp_google.server.url, own))
    ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path), "--route",
                                  "out", "--account", "PIAID-1")
    assert ran.code == 1
    assert "answer   HTTP 401" in ran.out
    assert ("Google answered HTTP 401 (INVALID_PAYLOAD_SIGNATURE): it does not accept our "
            "signature by partner-b (keyset partner)") in ran.err
    pgp_google.trusted.add(pgp_keys.fingerprint("partner-b"))  # Google takes on our new key
    ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path), "--route",
                                  "out", "--account", "PIAID-1")
    assert ran.code == 0 and "echo ok" in ran.out


async def test_echo_fails_precisely_on_tls_and_route_mistakes(
    capsys: pytest.CaptureFixture[str], pgp_google: StandInGoogle, pgp_keys: PgpKeys,
    runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    assert pgp_google.server is not None
    path = tmp_path / "config.yaml"
    text = echo_config(pgp_keys, runtime_dir, pki, pgp_google.server.url,
                       entry(pgp_keys, "partner-a", "sec", "active"))
    path.write_text(text.replace(f", ca: {pki.ca}", f", ca: {pki.client_ca}"))
    ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path), "--route",
                                  "out", "--account", "PIAID-1")
    assert ran.code == 1 and "TLS: the upstream's certificate is not trusted" in ran.err
    assert pgp_google.server.calls == []
    ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path), "--route",
                                  "in", "--account", "PIAID-1")
    assert ran.code == 2 and "route 'in' is inbound" in ran.err


async def test_echo_errors_never_show_url_credentials(
    capsys: pytest.CaptureFixture[str], pgp_keys: PgpKeys, runtime_dir: Path, tmp_path: Path,
) -> None:
    """An upstream that hangs up at once: the error names the URL, masked like the first line."""
    async def hang_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(hang_up, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        path = tmp_path / "config.yaml"
        peer = entry(pgp_keys, "google-a", "pub", "active")
        path.write_text(pgp_config(pgp_keys, runtime_dir,
                                   entry(pgp_keys, "partner-a", "sec", "active"), peer,
                                   upstream=f"http://user:TopSecret9@127.0.0.1:{port}/gsp"))
        ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path), "--route",
                                      "out", "--account", "PIAID-1")
    finally:
        server.close()
        await server.wait_closed()
    assert ran.code == 1 and "the exchange with http://***@127.0.0.1" in ran.err, ran.err
    assert "TopSecret9" not in ran.out + ran.err


async def test_jose_echo_against_panva_jose(
    capsys: pytest.CaptureFixture[str], jose_keys: JoseKeys, node_jose: NodeJose,
    runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    k = jose_keys
    trusted = [k.public("partner-sig-a")]

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        try:
            plaintext, _, _ = await asyncio.to_thread(node_jose.open, body,
                                                      k.private("google-enc-a"), trusted)
        except NodeJoseError:
            return web.Response(status=401)
        answer = json.dumps({"clientMessage": json.loads(plaintext)["clientMessage"]}).encode()
        sealed = await asyncio.to_thread(node_jose.seal, answer, k.private("google-sig-a"),
                                         "RS256", k.public("partner-enc-a"))
        return web.Response(body=sealed, headers={"Content-Type": "application/jose"})

    google = await StandIn(handler, ssl_context=pki.server_context()).start()
    try:
        path = tmp_path / "config.yaml"
        path.write_text(textwrap.dedent(f"""
            runtime_dir: {runtime_dir}
            keysets:
              partner:
                type: jose
                keys:
                  - {{id: partner-sig-a, file: {k.private('partner-sig-a')}, state: read-only}}
                  - {{id: partner-sig-b, file: {k.private('partner-sig-b')}}}
                  - {{id: partner-enc-a, file: {k.private('partner-enc-a')}}}
              google:
                type: jose
                keys:
                  - {{id: google-sig-a, file: {k.public('google-sig-a')}}}
                  - {{id: google-enc-a, file: {k.public('google-enc-a')}}}
            routes:
              - {{name: out, direction: outbound, listen: "127.0.0.1:0",
                  upstream: {{url: "{google.url}", ca: {pki.ca}}},
                  own_keys: partner, peer_keys: google}}
            """))
        ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path),
                                      "--route", "out", "--account", "PIAID-2")
        assert ran.code == 1 and "signature by partner-sig-b" in ran.err
        assert google.calls[-1].headers["Content-Type"] == "application/jose; charset=utf-8"
        trusted.append(k.public("partner-sig-b"))
        ran = await asyncio.to_thread(gateway, capsys, "echo", "--config", str(path),
                                      "--route", "out", "--account", "PIAID-2")
        assert ran.code == 0, ran.err
        assert ("signed by partner-sig-b (keyset partner), encrypted to google-enc-a "
                "(keyset google)") in ran.out
        assert ("decrypted by partner-enc-a (keyset partner), verified google-sig-a "
                "(keyset google)") in ran.out
    finally:
        await google.stop()
