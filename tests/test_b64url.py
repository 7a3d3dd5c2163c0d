"""gateway.b64url: the strict base64url codec every engine uses, against CPython's base64."""

from __future__ import annotations

import base64
import binascii
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import b64url
from gateway.errors import MalformedError

# The rule both PGP engines applied before gateway.b64url, with CPython's codec: the reference.
_REFERENCE_BODY = re.compile(rb"[A-Za-z0-9_-]*={0,2}")


def reference_body(body: bytes) -> bytes | None:
    text = body.strip()
    unpadded = text.rstrip(b"=")
    if (not unpadded or not _REFERENCE_BODY.fullmatch(text) or len(unpadded) % 4 == 1
            or (text != unpadded and len(text) % 4)):
        return None
    try:
        return base64.urlsafe_b64decode(unpadded + b"=" * (-len(unpadded) % 4))
    except (binascii.Error, ValueError):
        return None


def decoded_body(body: bytes) -> bytes | None:
    try:
        return b64url.decode_body(body)
    except MalformedError as exc:
        assert str(exc) == "the body is not base64url"
        return None


@given(st.binary(max_size=300))
def test_encode_is_cpythons_base64url(data: bytes) -> None:
    padded = base64.urlsafe_b64encode(data)
    assert b64url.encode(data, padding=True) == padded
    assert b64url.encode(data) == padded.rstrip(b"=")
    assert b64url.decode(b64url.encode(data)) == data
    assert b64url.is_unpadded(b64url.encode(data))


# Text near base64url: its alphabet, both alphabets' other characters, padding and whitespace.
_NEAR = st.binary(max_size=40).map(
    lambda raw: bytes(b"AZaz09-_+/= \n\t."[b % 15] for b in raw))


@settings(max_examples=400, derandomize=True)
@given(st.one_of(_NEAR, st.binary(max_size=40), st.binary(max_size=40).map(
    lambda d: base64.urlsafe_b64encode(d)[: len(d)])))
def test_a_body_is_accepted_exactly_when_the_reference_accepts_it(body: bytes) -> None:
    assert decoded_body(body) == reference_body(body)


@pytest.mark.parametrize("body", [
    b"YWJj", b"YWI", b"YWI=", b"YQ", b"YQ==", b"  YWJj \r\n", b"\nYWI=\n", b"-_-_", b"_w",
])
def test_bodies_accepted(body: bytes) -> None:
    assert decoded_body(body) == reference_body(body) is not None


@pytest.mark.parametrize("body", [
    b"", b"  ", b"====", b"Y", b"YWJjZ", b"YQ=", b"YQ===", b"YWI==", b"YW=J", b"=YWI",
    b"YW+j", b"YW/j", b"YW j", b"YW\nJj", b"YWJj.YWJj", b"YWJj\x00", "YWJj\u00e9".encode(),
])
def test_bodies_refused(body: bytes) -> None:
    assert reference_body(body) is None
    with pytest.raises(MalformedError, match=r"^the body is not base64url$"):
        b64url.decode_body(body)


@pytest.mark.parametrize("segment", [b"YQ==", b"YW=", b"YW+j", b"YW/j", b"Y", b"YWJjZ", b" YWJj"])
def test_segments_are_unpadded_base64url_only(segment: bytes) -> None:
    assert not b64url.is_unpadded(segment)
    with pytest.raises(MalformedError):
        b64url.decode(segment)


def test_an_empty_segment_is_empty() -> None:
    assert b64url.is_unpadded(b"")
    assert b64url.decode(b"") == b""


def test_large_bodies_round_trip() -> None:
    data = bytes(range(256)) * 1024 + b"\x00"
    for padding in (False, True):
        text = b64url.encode(data, padding=padding)
        assert text == base64.urlsafe_b64encode(data).rstrip(b"" if padding else b"=")
        assert b64url.decode_body(text) == data
