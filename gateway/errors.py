"""The gateway's error tree; third-party errors are translated into it in one place each.

    GatewayError
    ├── ConfigError                 a configuration or key file is invalid (names its place)
    ├── EnvelopeError               sealing or opening failed; `reason` is a metric label
    │   ├── MalformedError          malformed: not base64url, not a PGP/JWE message, garbage
    │   ├── UnknownKeyError         unknown_key: addressed to no enabled own key
    │   ├── DecryptError            decrypt: decryption or integrity check failed
    │   ├── SignatureError          signature: no good signature by an enabled peer key
    │   ├── AlgorithmError          algorithm: an algorithm outside the accept-lists
    │   ├── NoKeyError              no_key: nothing usable to seal with
    │   └── TooLargeError           too_large: over the body or decompression limit
    └── UpstreamError               the upstream could not be reached or answered badly
        ├── UpstreamUnreachable     upstream_unreachable
        ├── UpstreamTimeout         upstream_timeout
        └── UpstreamTooLarge        too_large (the upstream's answer was over the limit)

Messages never contain key material, passphrases or plaintext. `layer` tells which protective
layer failed ("encryption" -> HTTP 400, "signature" -> HTTP 401 on the inbound side).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

Layer = Literal["encryption", "signature", "none"]


class GatewayError(Exception):
    """Base of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """Invalid configuration: `place` is the dotted path of the offending field."""

    def __init__(self, place: str, message: str) -> None:
        self.place = place
        self.message = message
        # Set by load_config: the config file and every file it had named before the error (a
        # reload watches them, so that a file named before it exists is picked up once it does).
        self.files: tuple[Path, ...] = ()
        super().__init__(f"{place}: {message}" if place else message)


class EnvelopeError(GatewayError):
    """Sealing or opening failed. `reason` is one of the metric label values of config.md."""

    reason: ClassVar[str] = "malformed"
    layer: Layer = "encryption"

    def __init__(self, message: str, *, layer: Layer | None = None) -> None:
        super().__init__(message)
        if layer is not None:
            self.layer = layer


class MalformedError(EnvelopeError):
    reason = "malformed"


class UnknownKeyError(EnvelopeError):
    reason = "unknown_key"


class DecryptError(EnvelopeError):
    reason = "decrypt"


class SignatureError(EnvelopeError):
    reason = "signature"
    layer: Layer = "signature"


class AlgorithmError(EnvelopeError):
    """An algorithm outside the accept-lists; `layer` says whether it was the cipher or the hash."""

    reason = "algorithm"


class NoKeyError(EnvelopeError):
    reason = "no_key"
    layer: Layer = "none"


class TooLargeError(EnvelopeError):
    reason = "too_large"
    layer: Layer = "none"


ENVELOPE_REASONS = (
    "malformed",
    "unknown_key",
    "decrypt",
    "signature",
    "algorithm",
    "no_key",
    "too_large",
)


class UpstreamError(GatewayError):
    reason: ClassVar[str] = "upstream_unreachable"


class UpstreamUnreachable(UpstreamError):
    reason = "upstream_unreachable"


class UpstreamTimeout(UpstreamError):
    reason = "upstream_timeout"


class UpstreamTooLarge(UpstreamError):
    reason = "too_large"


class EngineError(GatewayError):
    """The crypto engine itself failed (gpg timed out, crashed or misbehaved): not the message's
    fault and not an answer to give the network in detail."""

    reason: ClassVar[str] = "engine"
