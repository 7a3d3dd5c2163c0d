"""config.py: YAML to frozen dataclasses, every error naming its place."""

from __future__ import annotations

import dataclasses
import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gateway.config import Config, KeyState, load_config, shown_url
from gateway.errors import ConfigError

BASE = """
keysets:
  partner:
    type: pgp
    keys:
      - {id: partner-2026, file: keys/p.asc}
      - {id: partner-2025, file: keys/p.asc, state: read-only}
  google:
    type: pgp
    keys:
      - {id: google-2026, file: keys/g.asc, state: active}
routes:
  - name: google-to-partner
    direction: inbound
    listen: "127.0.0.1:8443"
    upstream: {url: "http://127.0.0.1:3000"}
    own_keys: partner
    peer_keys: google
"""


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys/p.asc").write_text("x")
    (tmp_path / "keys/g.asc").write_text("x")
    (tmp_path / "pw").write_text("s3cret\n")
    return tmp_path


def write(base: Path, text: str) -> Path:
    path = base / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def load(base: Path, text: str, env: dict[str, str] | None = None) -> Config:
    return load_config(write(base, text), environ=env or {})


def error_of(base: Path, text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load(base, text, env)
    return str(info.value)


def test_minimal_config_gets_the_documented_defaults(base_dir: Path) -> None:
    config = load(base_dir, BASE)
    assert config.admin_listen.host == "127.0.0.1" and config.admin_listen.port == 9090
    assert config.limits.max_body_bytes == 1048576
    assert config.limits.max_connections == 1024
    assert config.reload_interval_s == 5
    assert config.workers == 1
    assert config.pin_workers is False
    assert config.batch_scheduling is False
    assert config.shutdown_timeout_s == 30
    assert config.warn_expiry_days == 30
    route = config.routes[0]
    assert route.scheme == "pgp"
    assert route.pgp.digest == "SHA384" and route.pgp.cipher == "AES256"
    assert route.pgp.armor is False and route.pgp.base64_padding is False
    assert route.upstream.timeout_s == 30
    keys = config.keysets["partner"].keys
    assert keys[0].state is KeyState.ACTIVE and keys[1].state is KeyState.READ_ONLY
    assert keys[0].file == base_dir / "keys/p.asc"


def test_config_objects_are_frozen(base_dir: Path) -> None:
    config = load(base_dir, BASE)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.routes[0].name = "other"  # type: ignore[misc]


def test_missing_file_names_place_and_path(base_dir: Path) -> None:
    text = BASE.replace("file: keys/g.asc", "file: keys/x.asc")
    assert error_of(base_dir, text) == "keysets.google.keys[0].file: no such file 'keys/x.asc'"


def test_unknown_field_is_an_error(base_dir: Path) -> None:
    text = BASE.replace("direction: inbound", "direction: inbound\n    directon: outbound")
    message = error_of(base_dir, text)
    assert message.startswith("routes[0].directon: unknown field")


def test_unknown_top_level_field_is_an_error(base_dir: Path) -> None:
    assert error_of(base_dir, BASE + "reloads: {interval_s: 3}\n").startswith(
        "reloads: unknown field"
    )


def test_env_substitution_and_missing_variable(base_dir: Path) -> None:
    text = BASE.replace('"http://127.0.0.1:3000"', '"http://${UP_HOST}:3000"')
    config = load(base_dir, text, {"UP_HOST": "10.0.0.7"})
    assert config.routes[0].upstream.url == "http://10.0.0.7:3000"
    assert error_of(base_dir, text) == (
        "routes[0].upstream.url: environment variable 'UP_HOST' is not set"
    )


def test_passphrase_file_strips_one_trailing_newline(base_dir: Path) -> None:
    text = BASE.replace("{id: partner-2026, file: keys/p.asc}",
                        "{id: partner-2026, file: keys/p.asc, passphrase_file: pw}")
    key = load(base_dir, text).keysets["partner"].keys[0]
    assert key.passphrase == "s3cret"
    assert "s3cret" not in repr(key)


def test_passphrase_env(base_dir: Path) -> None:
    text = BASE.replace("{id: partner-2026, file: keys/p.asc}",
                        "{id: partner-2026, file: keys/p.asc, passphrase_env: PW}")
    assert load(base_dir, text, {"PW": "abc"}).keysets["partner"].keys[0].passphrase == "abc"
    assert error_of(base_dir, text) == (
        "keysets.partner.keys[0].passphrase_env: environment variable 'PW' is not set"
    )


def test_not_after_date_means_midnight_utc(base_dir: Path) -> None:
    text = BASE.replace("{id: google-2026, file: keys/g.asc, state: active}",
                        "{id: google-2026, file: keys/g.asc, not_after: 2027-01-31}")
    key = load(base_dir, text).keysets["google"].keys[0]
    assert key.not_after == datetime(2027, 1, 31, tzinfo=UTC)


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        ("state: read-only", "state: retired",
         "keysets.partner.keys[1].state: 'retired' is not one of: active, read-only, disabled"),
        ("id: partner-2025,", "id: partner-2026,",
         "keysets.partner.keys[1].id: duplicate key id 'partner-2026' in keyset 'partner'"),
        ("peer_keys: google", "peer_keys: gogle",
         "routes[0].peer_keys: no keyset named 'gogle' (keysets: google, partner)"),
        ('listen: "127.0.0.1:8443"', 'listen: "0.0.0.0:8443"',
         "routes[0].listen: plain HTTP listener on non-loopback address '0.0.0.0:8443': "
         "add 'tls:' or set 'allow_plaintext: true'"),
        ('listen: "127.0.0.1:8443"', 'listen: "127.0.0.1:9090"',
         "routes[0].listen: '127.0.0.1:9090' is already used by admin"),
        ('listen: "127.0.0.1:8443"', 'listen: "localhost"',
         "routes[0].listen: 'localhost' is not host:port (IPv6 as [::1]:port)"),
        ('url: "http://127.0.0.1:3000"', 'url: "ftp://x"',
         "routes[0].upstream.url: 'ftp://x' is not an http:// or https:// URL with a host"),
        ("direction: inbound", "direction: sideways",
         "routes[0].direction: 'sideways' is not one of: inbound, outbound"),
    ],
)
def test_precise_errors(base_dir: Path, old: str, new: str, expected: str) -> None:
    assert old in BASE
    assert error_of(base_dir, BASE.replace(old, new)) == expected


@pytest.mark.parametrize(
    ("new", "expected"),
    [
        # NaN passed every `< minimum` check: `check` said valid, then `run` crashed at SIGTERM
        # (shutdown_timeout_s) or failed every connection (header_timeout_s).
        ("shutdown_timeout_s: .nan", "shutdown_timeout_s: expected a number >= 0, found nan"),
        ("limits: {header_timeout_s: .inf}",
         "limits.header_timeout_s: expected a number >= 0.001, found inf"),
        ("drain_delay_s: -.inf", "drain_delay_s: expected a number >= 0, found -inf"),
        # Past datetime's range: an OverflowError traceback in `check` and `run`.
        ("warn_expiry_days: 10000000000",
         "warn_expiry_days: expected a number from 0 to 3650, found 10000000000"),
    ],
)
def test_numbers_must_be_finite_and_in_range(base_dir: Path, new: str, expected: str) -> None:
    assert error_of(base_dir, BASE.replace("routes:\n", f"{new}\nroutes:\n", 1)) == expected


@pytest.mark.parametrize(("field", "value", "expected"), [
    ("proxy", "https://user:${PW}@proxy.example:3128",
     "routes[0].upstream.proxy: 'https://***@proxy.example:3128' is not an http:// proxy URL"),
    ("url", "ftp://user:${PW}@partner.example",
     "routes[0].upstream.url: 'ftp://***@partner.example' is not an http:// or https:// URL "
     "with a host"),
    ("url", "http://user:${PW}@[::1", "routes[0].upstream.url: 'http://***@[::1' is not a URL"),
    ("proxy", "http://user:${PW}@proxy.example:99999",
     "routes[0].upstream.proxy: 'http://***@proxy.example:99999' is not a URL"),
    # A base64-style secret holds '/' (and may hold '@'): it once came out as it was.
    ("proxy", "http://user:Top/${PW}@proxy.example:3128",
     "routes[0].upstream.proxy: 'http://***@proxy.example:3128' is not a URL"),
])
def test_url_errors_hide_credentials(base_dir: Path, field: str, value: str,
                                     expected: str) -> None:
    """A user:password in an upstream or proxy URL (from ${ENV}: a Secret) never reaches an
    error (check's output, a failed reload's log line); an unparsable URL is an error with its
    place, not a ValueError traceback."""
    old = 'upstream: {url: "http://127.0.0.1:3000"}'
    new = (f'upstream: {{url: "{value}"}}' if field == "url" else
           f'upstream: {{url: "http://127.0.0.1:3000", proxy: "{value}"}}')
    message = error_of(base_dir, BASE.replace(old, new), env={"PW": "TopSecret123"})
    assert message == expected and "TopSecret123" not in message


@pytest.mark.parametrize(("url", "shown"), [
    ("https://u:p@host:1/x", "https://***@host:1/x"),
    ("http://u:Top/Secret@proxy:3128", "http://***@proxy:3128"),
    ("https://u:a@b/Secret@host/x", "https://***@host/x"),
    ("https://host/path", "https://host/path"),
])
def test_shown_urls_never_hold_credentials(url: str, shown: str) -> None:
    assert shown_url(url) == shown


SECOND_ROUTE = """
  - name: second
    direction: outbound
    listen: "{listen}"
    allow_plaintext: true
    upstream: {{url: "https://g.example"}}
    own_keys: partner
    peer_keys: google
"""


@pytest.mark.parametrize(("first", "second", "expected"), [
    ("127.0.0.1:8443", "localhost:8443",
     "routes[1].listen: 'localhost:8443' is already used by route 'google-to-partner'"),
    ("127.0.0.1:8443", "0.0.0.0:8443",
     "routes[1].listen: '0.0.0.0:8443' is already used by route 'google-to-partner'"),
    ("127.0.0.1:8443", "[::]:8443",
     "routes[1].listen: '[::]:8443' is already used by route 'google-to-partner'"),
    ("localhost:9090", "127.0.0.2:8443", "routes[0].listen: 'localhost:9090' is already used by "
                                         "admin"),
    ("127.0.0.1:8443", "999.1.1.1:8444",
     "routes[1].listen: '999.1.1.1' does not resolve to an address"),
])
def test_listen_addresses_clash_by_what_they_bind(base_dir: Path, first: str, second: str,
                                                  expected: str) -> None:
    """check compared listen addresses as written: these passed it, then run failed with
    'address already in use' or 'Name or service not known', naming no place."""
    text = BASE.replace('listen: "127.0.0.1:8443"', f'listen: "{first}"') + \
        SECOND_ROUTE.format(listen=second)
    assert error_of(base_dir, text) == expected


def test_listeners_on_other_addresses_or_ports_pass(base_dir: Path) -> None:
    text = BASE + SECOND_ROUTE.format(listen="127.0.0.2:8443")
    assert [r.listen.port for r in load(base_dir, text).routes] == [8443, 8443]
    text = BASE + SECOND_ROUTE.format(listen="0.0.0.0:8444")
    assert len(load(base_dir, text).routes) == 2


def test_an_impossible_unquoted_date_names_its_place(base_dir: Path) -> None:
    """YAML reads an unquoted date itself, and PyYAML raised a bare ValueError (a traceback,
    no place) for one that does not exist."""
    text = BASE.replace("{id: google-2026, file: keys/g.asc, state: active}",
                        "{id: google-2026, file: keys/g.asc, not_after: 2027-02-30}")
    assert error_of(base_dir, text) == (
        "keysets.google.keys[0].not_after: '2027-02-30' is not an ISO-8601 date or date-time")


def test_plain_listener_off_loopback_allowed_when_asked(base_dir: Path) -> None:
    text = BASE.replace('listen: "127.0.0.1:8443"',
                        'listen: "0.0.0.0:8443"\n    allow_plaintext: true')
    assert load(base_dir, text).routes[0].listen.is_loopback is False


def test_ipv6_listen(base_dir: Path) -> None:
    text = BASE.replace('listen: "127.0.0.1:8443"', 'listen: "[::1]:8443"')
    listen = load(base_dir, text).routes[0].listen
    assert listen.host == "::1" and listen.port == 8443 and listen.is_loopback


def test_mixed_keyset_types_are_refused(base_dir: Path) -> None:
    text = BASE.replace("  google:\n    type: pgp", "  google:\n    type: jose")
    assert error_of(base_dir, text) == (
        "routes[0].peer_keys: keyset 'google' is jose but own_keys 'partner' is pgp; "
        "both must have the same type"
    )


def test_scheme_block_must_match(base_dir: Path) -> None:
    text = BASE + "    jose: {sign_alg: PS256}\n"
    assert error_of(base_dir, text) == (
        "routes[0].jose: this route's keysets are pgp: use a 'pgp:' block"
    )


def test_pgp_options_are_checked(base_dir: Path) -> None:
    assert error_of(base_dir, BASE + "    pgp: {digest: SHA1}\n") == (
        "routes[0].pgp.digest: 'SHA1' is not one of: SHA256, SHA384, SHA512"
    )
    assert error_of(base_dir, BASE + "    pgp: {cipher: CAST5}\n") == (
        "routes[0].pgp.cipher: 'CAST5' is not one of: AES128, AES192, AES256"
    )


def jose_base() -> str:
    return BASE.replace("type: pgp", "type: jose")


def test_jose_never_accepts_none_hmac_or_dir(base_dir: Path) -> None:
    for field, value in (("accept_sign_algs", "[none]"), ("accept_sign_algs", "[HS256]"),
                         ("accept_key_algs", "[dir]")):
        message = error_of(base_dir, jose_base() + f"    jose: {{{field}: {value}}}\n")
        assert message.startswith(f"routes[0].jose.{field}[0]: ")
    assert error_of(base_dir, jose_base() + "    jose: {key_alg: RSA1_5}\n").startswith(
        "routes[0].jose.key_alg: 'RSA1_5' is not one of"
    )


def test_jose_rsa1_5_only_when_listed(base_dir: Path) -> None:
    route = load(base_dir, jose_base()).routes[0]
    assert "RSA1_5" not in route.jose.accept_key_algs
    text = jose_base() + "    jose: {accept_key_algs: [RSA-OAEP-256, RSA1_5]}\n"
    assert load(base_dir, text).routes[0].jose.accept_key_algs == ("RSA-OAEP-256", "RSA1_5")


def test_upstream_client_cert_needs_key(base_dir: Path) -> None:
    text = BASE.replace('upstream: {url: "http://127.0.0.1:3000"}',
                        'upstream: {url: "https://g.example", client_cert: pw}')
    assert error_of(base_dir, text) == (
        "routes[0].upstream: client_cert and client_key go together"
    )


def test_workers_auto_and_limits(base_dir: Path) -> None:
    text = BASE + "workers: auto\nlimits: {max_body_bytes: 2048, max_inflight: 3}\n"
    config = load(base_dir, text)
    assert config.workers >= 1
    assert config.limits.max_body_bytes == 2048 and config.limits.inflight == 3
    assert error_of(base_dir, BASE + "limits: {max_body_bytes: 0}\n") == (
        "limits.max_body_bytes: expected a whole number >= 1, found 0"
    )


def test_pin_workers_is_a_boolean(base_dir: Path) -> None:
    assert load(base_dir, BASE + "workers: 2\npin_workers: true\n").pin_workers is True
    # YAML reads `on`/`yes` as true too; a string is refused, not read as true.
    assert error_of(base_dir, BASE + "pin_workers: auto\n") == (
        "pin_workers: expected true or false, found 'auto'"
    )


def test_batch_scheduling_is_a_boolean(base_dir: Path) -> None:
    assert load(base_dir, BASE + "batch_scheduling: true\n").batch_scheduling is True
    assert error_of(base_dir, BASE + "batch_scheduling: batch\n") == (
        "batch_scheduling: expected true or false, found 'batch'"
    )


def test_invalid_yaml_names_the_line(base_dir: Path) -> None:
    assert "is not valid YAML at line 3" in error_of(base_dir, "keysets:\n  - [unclosed\n")


def test_files_lists_every_named_file_once(base_dir: Path) -> None:
    config = load(base_dir, BASE)
    assert config.files() == (
        base_dir / "config.yaml", base_dir / "keys/p.asc", base_dir / "keys/g.asc",
    )
