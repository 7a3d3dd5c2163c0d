"""armor.py: the ASCII armor's CRC-24 (RFC 4880 6.1)."""

from __future__ import annotations

import base64
import subprocess
from pathlib import Path

from gateway.armor import checksum, crc24


def test_crc24_known_values() -> None:
    assert crc24(b"") == 0xB704CE  # the initial value
    assert crc24(b"123456789") == 0x21CF02  # CRC-24/OPENPGP's check value


def test_checksum_is_the_line_gpg_writes(tmp_path: Path) -> None:
    home = tmp_path / "g"
    home.mkdir(mode=0o700)
    armored = subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--armor", "--store"], input=b"x" * 1000,
        capture_output=True, timeout=60, check=True).stdout
    lines = armored.decode().strip().splitlines()
    body = "".join(lines[lines.index("") + 1:-2])
    assert lines[-2].encode() == b"=" + checksum(base64.b64decode(body))
