"""base64url (RFC 4648 section 5): the text every sealed body and every JOSE segment travels as.

One strict codec for the three engines, on pybase64 (imported here alone), whose SIMD code
decodes a 64 KiB message's ~88 KiB of text ~25x faster than CPython's binascii with the
alphabet translation around it (bench/README.md): at 64 KiB that was most of what a round
trip cost beyond its RSA. Strict: only the URL-safe alphabet ('+' and '/' of the standard one,
whitespace inside and misplaced '=' are refused), and only lengths that some bytes encode to.
"""

from __future__ import annotations

import binascii

import pybase64

from gateway.errors import MalformedError

__all__ = ["decode", "decode_body", "encode", "is_unpadded"]

_ALPHABET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_NOT_BASE64URL = "the body is not base64url"


def is_unpadded(text: bytes) -> bool:
    """Unpadded base64url: only alphabet characters, and a length some bytes encode to. Checks
    without decoding (a JOSE segment is classified and measured before any is decoded)."""
    return not text.translate(None, _ALPHABET) and len(text) % 4 != 1


def decode(text: bytes) -> bytes:
    """Unpadded base64url to bytes. Raises MalformedError."""
    # pybase64 takes both alphabets' last two characters once altchars is given, and '=' where
    # padding could stand: refused here, in three memchr scans.
    if len(text) % 4 == 1 or b"+" in text or b"/" in text or b"=" in text:
        raise MalformedError(_NOT_BASE64URL)
    try:
        return pybase64.b64decode(text + b"=" * (-len(text) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise MalformedError(_NOT_BASE64URL) from None


def decode_body(body: bytes) -> bytes:
    """A sealed PGP body: base64url, '=' padding optional but complete when present, whitespace
    around it ignored. Raises MalformedError."""
    text = bytes(body).strip()
    unpadded = text.rstrip(b"=")
    if not unpadded or len(text) - len(unpadded) > 2 or (text != unpadded and len(text) % 4):
        raise MalformedError(_NOT_BASE64URL)
    return decode(unpadded)


def encode(data: bytes, padding: bool = False) -> bytes:
    """base64url of `data`, with '=' padding only when asked for."""
    text: bytes = pybase64.urlsafe_b64encode(data)
    return text if padding else text.rstrip(b"=")
