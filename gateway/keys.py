"""Keys, their states and expiry, and keysets: which keys seal and which open.

Write with the active keys, read with any enabled key (Tink's rule). Expired keys never seal and
never verify; an expired own key may still decrypt (protocol.md section 8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gateway.config import KeysetConfig, KeyState, Scheme
from gateway.errors import ConfigError

__all__ = ["Key", "KeyState", "Keyset", "check_route_keysets", "expiring", "utcnow"]


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Key:
    """One parsed key. `material` is the scheme module's own object and is never shown."""

    id: str
    state: KeyState
    fingerprint: str  # PGP: primary fingerprint, 40 upper-case hex; JOSE: RFC 7638 thumbprint
    private: bool
    can_sign: bool
    can_encrypt: bool
    algorithm: str  # e.g. "RSA-3072", "EC-P256"
    expires: datetime | None
    place: str
    material: Any = field(default=None, repr=False, compare=False)

    @property
    def enabled(self) -> bool:
        return self.state is not KeyState.DISABLED

    @property
    def active(self) -> bool:
        return self.state is KeyState.ACTIVE

    def expired(self, now: datetime) -> bool:
        return self.expires is not None and self.expires <= now

    @property
    def capabilities(self) -> tuple[str, ...]:
        return tuple(c for c, ok in (("sign", self.can_sign), ("encrypt", self.can_encrypt)) if ok)


@dataclass(frozen=True)
class Keyset:
    """A named list of keys of one scheme. Order is the configuration's order."""

    name: str
    type: Scheme
    keys: tuple[Key, ...]
    now: Callable[[], datetime] = field(default=utcnow, repr=False, compare=False)

    def enabled(self) -> tuple[Key, ...]:
        return tuple(k for k in self.keys if k.enabled)

    def by_id(self, key_id: str) -> Key | None:
        return next((k for k in self.keys if k.id == key_id), None)

    # Own (private) keys.
    def signers(self) -> tuple[Key, ...]:
        """Own keys that sign: active, not expired, able to sign."""
        now = self.now()
        return tuple(k for k in self.keys if k.active and k.can_sign and not k.expired(now))

    def decryptors(self) -> tuple[Key, ...]:
        """Own keys accepted to decrypt: enabled and able to decrypt (expired ones too)."""
        return tuple(k for k in self.keys if k.enabled and k.can_encrypt and k.private)

    # Peer (public) keys.
    def recipients(self) -> tuple[Key, ...]:
        """Peer keys we encrypt to: active, not expired, able to encrypt."""
        now = self.now()
        return tuple(k for k in self.keys if k.active and k.can_encrypt and not k.expired(now))

    def verifiers(self) -> tuple[Key, ...]:
        """Peer keys accepted to verify: enabled, not expired, able to sign."""
        now = self.now()
        return tuple(k for k in self.keys if k.enabled and k.can_sign and not k.expired(now))


def key_expiry(parts: Iterable[datetime | None], not_after: datetime | None) -> datetime | None:
    """When a key stops counting: the soonest of the expiries of the parts it uses (primary,
    signing and encryption parts) and the configured `not_after` (a naive one is UTC)."""
    if not_after is not None and not_after.tzinfo is None:
        not_after = not_after.replace(tzinfo=UTC)
    return min((e for e in [*parts, not_after] if e is not None), default=None)


def expiring(keysets: Iterable[Keyset], within: timedelta,
             now: datetime | None = None) -> list[tuple[Keyset, Key]]:
    """Enabled keys that expire within `within` from `now` (already expired ones included)."""
    limit = (now or utcnow()) + within
    return [(keyset, key) for keyset in keysets for key in keyset.keys
            if key.enabled and key.expires is not None and key.expires <= limit]


# Google: PGP keys valid one year, two at most (a leap day included).
MAX_PGP_VALIDITY = timedelta(days=731)


def valid_too_long(keyset: Keyset, key: Key, now: datetime | None = None) -> bool:
    """One of our PGP keys that expires more than two years from `now`, or never."""
    return keyset.type == "pgp" and key.private and (
        key.expires is None or key.expires > (now or utcnow()) + MAX_PGP_VALIDITY)


def days_left(key: Key, now: datetime) -> float | None:
    """Days until `key` expires, to a tenth (negative once expired); None: never. Texts for
    people print the whole days of it (int: 9.46 is "9 days"), logs and JSON the figure."""
    return None if key.expires is None else round((key.expires - now).total_seconds() / 86400, 1)


def key_warnings(keyset: Keyset, key: Key, warn_within: timedelta,
                 now: datetime | None = None) -> list[str]:
    """What an operator must hear about `key` (keys list, /status): expired, an enabled key
    expiring within `warn_within` (warn_expiry_days), one of ours valid too long."""
    now = now or utcnow()
    warnings = []
    if key.expires is not None and key.expired(now):
        warnings.append(f"expired on {key.expires.strftime('%Y-%m-%dT%H:%M:%SZ')}")
    elif key.expires is not None and key.enabled and key.expires - now <= warn_within:
        warnings.append(f"expires in {int(days_left(key, now) or 0)} days "
                        f"(warn_expiry_days {warn_within.days})")
    if valid_too_long(keyset, key, now):
        warnings.append("valid for more than two years (Google: one year, two at most)")
    return warnings


def check_route_keysets(
    own: Keyset, peer: Keyset, own_config: KeysetConfig, peer_config: KeysetConfig
) -> None:
    """Load-time rules of config.md for a route's pair of keysets. Raises ConfigError."""
    for key in own.keys:
        if not key.private:
            raise ConfigError(
                f"{key.place}.file",
                f"keyset '{own.name}' is used as own_keys but key '{key.id}' is a public key",
            )
    for key in peer.keys:
        if key.private:
            raise ConfigError(
                f"{key.place}.file",
                f"keyset '{peer.name}' is used as peer_keys but key '{key.id}' is a private key; "
                "give only the peer's public key",
            )
    if not own.signers():
        raise ConfigError(
            f"{own_config.place}.keys",
            f"keyset '{own.name}' has no active, unexpired key that can sign",
        )
    if not own.decryptors():
        raise ConfigError(
            f"{own_config.place}.keys",
            f"keyset '{own.name}' has no enabled key that can decrypt",
        )
    if not peer.recipients():
        raise ConfigError(
            f"{peer_config.place}.keys",
            f"keyset '{peer.name}' has no active, unexpired key that can be encrypted to",
        )
    if not peer.verifiers():
        raise ConfigError(
            f"{peer_config.place}.keys",
            f"keyset '{peer.name}' has no enabled, unexpired key that can verify signatures",
        )


def check_jose_keyset(keyset: Keyset, config: KeysetConfig) -> None:
    """config.md: a jose keyset has at most one active key per use, whether a route uses it
    or not (yet). Raises ConfigError."""
    for use, attribute in (("sig", "can_sign"), ("enc", "can_encrypt")):
        active = [k.id for k in keyset.keys if k.active and getattr(k, attribute)]
        if len(active) > 1:
            raise ConfigError(
                f"{config.place}.keys",
                f"jose keyset '{keyset.name}' has {len(active)} active '{use}' keys "
                f"({', '.join(active)}); at most one per use may be active",
            )
