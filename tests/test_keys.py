"""keys.py: which keys seal and which open, by state and expiry (protocol.md section 8)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gateway.config import KeysetConfig, KeyState
from gateway.errors import ConfigError
from gateway.keys import (
    Key,
    Keyset,
    check_jose_keyset,
    check_route_keysets,
    days_left,
    expiring,
    key_warnings,
)

NOW = datetime(2026, 11, 28, tzinfo=UTC)
PAST = NOW - timedelta(days=1)
FUTURE = NOW + timedelta(days=300)


def key(key_id: str, state: str = "active", *, private: bool = True, sign: bool = True,
        encrypt: bool = True, expires: datetime | None = None) -> Key:
    return Key(id=key_id, state=KeyState(state), fingerprint=key_id.upper(), private=private,
               can_sign=sign, can_encrypt=encrypt, algorithm="RSA-2048", expires=expires,
               place=f"keysets.k.keys[{key_id}]")


def keyset(*keys: Key, scheme: str = "pgp") -> Keyset:
    return Keyset(name="k", type=scheme, keys=keys, now=lambda: NOW)  # type: ignore[arg-type]


def ids(keys: tuple[Key, ...]) -> list[str]:
    return [k.id for k in keys]


def test_states_for_own_keys() -> None:
    ks = keyset(key("a"), key("b", "read-only"), key("c", "disabled"))
    assert ids(ks.signers()) == ["a"]
    assert ids(ks.decryptors()) == ["a", "b"]
    assert ids(ks.enabled()) == ["a", "b"]


def test_states_for_peer_keys() -> None:
    ks = keyset(key("a", private=False), key("b", "read-only", private=False),
                key("c", "disabled", private=False))
    assert ids(ks.recipients()) == ["a"]
    assert ids(ks.verifiers()) == ["a", "b"]


def test_expired_keys_never_seal_or_verify_but_may_decrypt() -> None:
    ks = keyset(key("old", expires=PAST), key("new", expires=FUTURE))
    assert ids(ks.signers()) == ["new"]
    assert ids(ks.recipients()) == ["new"]
    assert ids(ks.verifiers()) == ["new"]
    assert ids(ks.decryptors()) == ["old", "new"]


def test_capabilities_filter() -> None:
    ks = keyset(key("sig", encrypt=False), key("enc", sign=False))
    assert ids(ks.signers()) == ["sig"]
    assert ids(ks.decryptors()) == ["enc"]
    assert key("sig", encrypt=False).capabilities == ("sign",)


def cfg(name: str) -> KeysetConfig:
    return KeysetConfig(name=name, type="pgp", keys=(), place=f"keysets.{name}")


def test_route_pair_rules() -> None:
    own = keyset(key("o"))
    peer = keyset(key("p", private=False))
    check_route_keysets(own, peer, cfg("own"), cfg("peer"))
    with pytest.raises(ConfigError, match="is a public key"):
        check_route_keysets(keyset(key("o", private=False)), peer, cfg("own"), cfg("peer"))
    with pytest.raises(ConfigError, match="is a private key"):
        check_route_keysets(own, keyset(key("p")), cfg("own"), cfg("peer"))
    with pytest.raises(ConfigError, match="no active, unexpired key that can sign") as info:
        check_route_keysets(keyset(key("o", expires=PAST)), peer, cfg("own"), cfg("peer"))
    assert info.value.place == "keysets.own.keys"
    with pytest.raises(ConfigError, match="can be encrypted to"):
        check_route_keysets(own, keyset(key("p", "read-only", private=False)),
                            cfg("own"), cfg("peer"))


def test_jose_at_most_one_active_key_per_use() -> None:
    own = keyset(key("s1", encrypt=False), key("s2", encrypt=False), key("e", sign=False),
                 scheme="jose")
    with pytest.raises(ConfigError, match="2 active 'sig' keys") as info:
        check_jose_keyset(own, cfg("own"))
    assert info.value.place == "keysets.own.keys"
    rotated = keyset(key("s1", encrypt=False), key("s2", "read-only", encrypt=False),
                     key("e", sign=False), scheme="jose")
    check_jose_keyset(rotated, cfg("own"))


def test_expiry_warnings_fire_at_10_days_not_at_300() -> None:
    soon = key("soon", expires=NOW + timedelta(days=10))
    later = key("later", expires=NOW + timedelta(days=300))
    gone = key("gone", "disabled", expires=NOW + timedelta(days=1))
    found = expiring([keyset(soon, later, gone, key("never"))], timedelta(days=30), NOW)
    assert [k.id for _, k in found] == ["soon"]


def test_days_left_is_one_figure_for_every_output() -> None:
    """`keys list`, `check`, /status and the logs once said 10, 9 and 9.5 days for one key."""
    nine_and_a_half = key("k", expires=NOW + timedelta(days=9, hours=11))  # 9.46 days
    assert days_left(nine_and_a_half, NOW) == 9.5
    assert days_left(key("never"), NOW) is None
    assert days_left(key("gone", expires=PAST), NOW) == -1.0
    assert key_warnings(keyset(nine_and_a_half), nine_and_a_half, timedelta(days=30), NOW) == [
        "expires in 9 days (warn_expiry_days 30)"]
