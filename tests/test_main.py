"""__main__.py: the commands' exit codes and messages."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.e2e import JoseGoogle, Pki, config
from tests.jose_fixtures import JoseKeys, NodeJose
from tests.pgp_fixtures import PgpKeys


def gateway(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True,
                          text=True, timeout=timeout, check=False)


@pytest.fixture
def config_file(jose_keys: JoseKeys, node_jose: NodeJose, runtime_dir: Path, pki: Pki,
                tmp_path: Path) -> Path:
    text = config(JoseGoogle(jose_keys, node_jose), runtime_dir, pki,
                  inbound_url="http://127.0.0.1:3000", outbound_url="https://localhost:4000")
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_check_valid_config_prints_routes_and_keys(config_file: Path,
                                                   jose_keys: JoseKeys) -> None:
    result = gateway("check", "--config", str(config_file))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "valid" in out
    assert "route  in: inbound jose" in out and "route  out: outbound jose" in out
    for key_id in ("partner-sig-a", "partner-enc-a", "google-sig-a", "google-enc-a"):
        assert key_id in out
    assert "expires never" in out
    assert jose_keys.jwk("partner-sig-a")["d"] not in out


def test_check_hides_the_credentials_of_an_upstream_url(config_file: Path) -> None:
    text = config_file.read_text().replace('"http://127.0.0.1:3000"',
                                           '"http://svc:${PARTNER_PW}@127.0.0.1:3000"')
    config_file.write_text(text)
    result = subprocess.run([sys.executable, "-m", "gateway", "check", "--config",
                             str(config_file)], capture_output=True, text=True, timeout=120,
                            check=False, env={**os.environ, "PARTNER_PW": "TopSecret123"})
    assert result.returncode == 0, result.stderr
    assert "-> http://***@127.0.0.1:3000" in result.stdout
    assert "TopSecret123" not in result.stdout + result.stderr


def test_check_invalid_config_names_the_place(config_file: Path) -> None:
    text = config_file.read_text().replace("partner-enc-a.jwk", "missing.jwk")
    config_file.write_text(text)
    result = gateway("check", "--config", str(config_file))
    assert result.returncode == 1
    assert result.stderr.startswith("error: keysets.partner.keys[1].file: no such file")


def test_check_semantic_error(config_file: Path, jose_keys: JoseKeys) -> None:
    # A private key among the peer's keys does not belong there.
    text = config_file.read_text().replace(str(jose_keys.public("google-sig-a")),
                                           str(jose_keys.private("google-sig-a")))
    config_file.write_text(text)
    result = gateway("check", "--config", str(config_file))
    assert result.returncode == 1
    assert "keysets.google.keys[0].file" in result.stderr
    assert "private key" in result.stderr


def test_check_applies_keyset_rules_to_a_keyset_no_route_uses_yet(
    config_file: Path, jose_keys: JoseKeys,
) -> None:
    spare = (f"  spare:\n    type: jose\n    keys:\n"
             f"      - {{id: partner-sig-a, file: {jose_keys.private('partner-sig-a')}}}\n"
             f"      - {{id: partner-sig-b, file: {jose_keys.private('partner-sig-b')}}}\n")
    text = config_file.read_text().replace("keysets:\n", "keysets:\n" + spare, 1)
    assert "spare:" in text
    config_file.write_text(text)
    result = gateway("check", "--config", str(config_file))
    assert result.returncode == 1
    assert result.stderr.startswith("error: keysets.spare.keys: jose keyset 'spare' has 2 "
                                    "active 'sig' keys")


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert gateway().returncode == 2
    assert gateway("check").returncode == 2
    assert gateway("launch").returncode == 2


def test_run_with_invalid_config_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("keysets: {}\n")
    result = gateway("run", "--config", str(path))
    assert result.returncode == 1
    assert "error: keysets" in result.stderr


def test_an_unexpected_crash_of_run_is_one_json_line_without_the_message(
        config_file: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    import gateway.app
    from gateway.__main__ import main

    secret = "4111111111111111"

    async def crash(config: object) -> int:
        raise RuntimeError(f"card {secret}")

    monkeypatch.setattr(gateway.app, "serve", crash)
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # main() replaces them
    monkeypatch.setattr(root, "level", root.level)
    assert main(["run", "--config", str(config_file)]) == 1
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    entry = json.loads(lines[0])
    assert entry["event"] == "crashed" and entry["level"] == "critical"
    assert entry["exception"] == "RuntimeError"
    assert entry["where"][-1].endswith("in crash")
    assert secret not in lines[0]


def test_demo_runs_to_completion() -> None:
    result = gateway("demo", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "every exchange succeeded" in result.stdout
    for banner in ("PGP inbound echo", "PGP inbound transfer", "JOSE inbound transfer",
                   "PGP outbound echo", "JOSE outbound echo"):
        assert banner in result.stdout
    assert "4111111111111111" not in result.stdout + result.stderr
    assert "************1111" in result.stdout


def test_check_warns_about_own_pgp_keys_valid_too_long(
    pgp_keys: PgpKeys, runtime_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    home = tmp_path / "g"
    home.mkdir(mode=0o700)
    gpg = ["gpg", "--homedir", str(home), "--batch", "--pinentry-mode", "loopback",
           "--passphrase", ""]
    subprocess.run([*gpg, "--quick-gen-key", "forever <f@example>", "rsa2048", "sign", "never"],
                   check=True, capture_output=True, timeout=120)
    fpr = subprocess.run([*gpg, "--with-colons", "--list-keys"], check=True, text=True,
                         capture_output=True).stdout.split("fpr:::::::::")[1].split(":")[0]
    subprocess.run([*gpg, "--quick-add-key", fpr, "rsa2048", "encr", "never"], check=True,
                   capture_output=True, timeout=120)
    forever = tmp_path / "forever.sec.asc"
    forever.write_bytes(subprocess.run([*gpg, "--armor", "--export-secret-keys", fpr],
                                       check=True, capture_output=True).stdout)
    subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"], check=False)
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(f"""
        runtime_dir: {runtime_dir}
        keysets:
          partner:
            type: pgp
            keys:
              - {{id: partner-a, file: {pgp_keys.sec('partner-a')}}}
              - {{id: forever, file: {forever}, state: read-only}}
          google: {{type: pgp, keys: [{{id: google-a, file: {pgp_keys.pub('google-a')}}}]}}
        routes:
          - {{name: r, direction: inbound, listen: "127.0.0.1:0",
              upstream: {{url: "http://127.0.0.1:1"}}, own_keys: partner, peer_keys: google}}
    """))
    result = gateway("check", "--config", str(path))
    assert result.returncode == 0, result.stderr
    [line] = [line for line in result.stdout.splitlines() if "WARNING" in line]
    assert line.split()[0] == "forever" and "more than two years" in line
    assert pgp_keys.fingerprint("partner-a") in result.stdout
    # Start-up and reloads log it too (config.md: at check, at start-up and on reload).
    from gateway.admin import warn_about_keys
    from gateway.config import load_config
    from gateway.snapshot import build_snapshot, prepare_runtime_dir, remove_runtime_dir

    workdir = prepare_runtime_dir(runtime_dir)
    snapshot = build_snapshot(load_config(path), 1, workdir)
    try:
        caplog.set_level(logging.WARNING, logger="gateway.app")
        warn_about_keys(snapshot)
    finally:
        snapshot.close()
        remove_runtime_dir(workdir)
    assert [(r.getMessage(), r.fields["key_id"]) for r in caplog.records] == [  # type: ignore[attr-defined]
        ("key valid for more than two years", "forever")]


_HEAP_PROBE = textwrap.dedent("""
    import sys
    from gateway.__main__ import _tune_malloc

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * 4096

    # What start-up can do before `run` tunes malloc: free one large mapped block, which makes
    # glibc serve blocks of up to its size from the heap from then on.
    block = b"x" * (8 << 20)
    del block
    if sys.argv[1] == "tuned":
        _tune_malloc()
    before = resident()
    blocks = [b"x" * (256 << 10) for _ in range(200)]  # 50 MiB, as uvloop's TLS read buffers
    last = blocks.pop()  # the newest stays, as a live connection's would
    del blocks
    print((resident() - before) >> 20)
""")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads /proc")
def test_run_returns_freed_large_blocks_to_the_system() -> None:
    """256 KiB blocks freed under `run`'s malloc settings leave no resident memory behind, even
    when a larger block was freed before the settings were made (glibc's default then keeps
    them: the control)."""
    def retained(mode: str) -> int:
        done = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True,
                              text=True, timeout=60, check=True)
        return int(done.stdout)

    assert retained("default") >= 30, "the control: glibc's defaults keep the freed blocks"
    assert retained("tuned") <= 5
