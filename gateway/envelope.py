"""The Envelope protocol: seal plaintext into what goes on the wire, open it back.

An envelope holds one route's pair of keysets (ours and the peer's) and its scheme options.
It does no I/O of its own besides what its crypto backend needs, and never sees HTTP.
"""

from __future__ import annotations

import queue
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.keys import Keyset

CONTENT_TYPES = {
    "pgp": "application/octet-stream; charset=utf-8",
    "jose": "application/jose; charset=utf-8",
}
PLAINTEXT_CONTENT_TYPE = "application/json; charset=utf-8"


@dataclass(frozen=True)
class Sealed:
    """What seal() made: the wire body and the configured ids of the keys that did the work."""

    body: bytes
    signed_by: tuple[str, ...]
    encrypted_to: tuple[str, ...]

    def key_uses(self) -> tuple[tuple[str, str, str], ...]:
        """(own|peer, key id, op) for each key that did work, for metrics and logs."""
        return tuple(("own", k, "sign") for k in self.signed_by) + tuple(
            ("peer", k, "encrypt") for k in self.encrypted_to)


@dataclass(frozen=True)
class Opened:
    """What open() found: the plaintext and the configured ids of the keys that did the work."""

    plaintext: bytes
    decrypted_by: tuple[str, ...]
    verified_by: tuple[str, ...]

    def key_uses(self) -> tuple[tuple[str, str, str], ...]:
        """(own|peer, key id, op) for each key that did work, for metrics and logs."""
        return tuple(("own", k, "decrypt") for k in self.decrypted_by) + tuple(
            ("peer", k, "verify") for k in self.verified_by)


class Envelope(Protocol):
    """Seal and open for one route. Both methods block (CPU or a gpg subprocess): callers run
    them in an executor. Both are safe to call from several threads at once."""

    scheme: str
    own: Keyset
    peer: Keyset
    # True when the work is done by other processes (gpg and its agent) while the calling
    # thread waits: such calls run in an executor with more threads than cores.
    waits_on_processes: bool

    @property
    def content_type(self) -> str: ...

    def seal(self, plaintext: bytes) -> Sealed:
        """Sign with every active own key, encrypt to the active peer key(s).
        Raises NoKeyError when nothing usable is left, TooLargeError over the size cap."""
        ...

    def open(self, body: bytes) -> Opened:
        """Decode, decrypt with an enabled own key, verify with an enabled peer key.
        Raises an EnvelopeError subclass, and nothing else, on any failure."""
        ...

    def close(self) -> None:
        """Release what the envelope holds (GnuPG homes, agents). Idempotent."""
        ...


class EnvelopePool:
    """Several interchangeable envelopes of one route (one GnuPG home and agent each), lent one
    per call, so that concurrent calls never queue on one agent. Blocks while all are busy."""

    def __init__(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            raise ValueError("an envelope pool needs at least one envelope")
        self._all = tuple(envelopes)
        self._free: queue.SimpleQueue[Envelope] = queue.SimpleQueue()
        for envelope in self._all:
            self._free.put(envelope)
        self.scheme = self._all[0].scheme
        self.waits_on_processes = self._all[0].waits_on_processes
        self.own = self._all[0].own
        self.peer = self._all[0].peer

    def __len__(self) -> int:
        return len(self._all)

    @property
    def content_type(self) -> str:
        return self._all[0].content_type

    def seal(self, plaintext: bytes) -> Sealed:
        envelope = self._free.get()
        try:
            return envelope.seal(plaintext)
        finally:
            self._free.put(envelope)

    def open(self, body: bytes) -> Opened:
        envelope = self._free.get()
        try:
            return envelope.open(body)
        finally:
            self._free.put(envelope)

    def close(self) -> None:
        for envelope in self._all:
            envelope.close()
