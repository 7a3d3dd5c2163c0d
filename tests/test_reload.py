"""reload.py: hot reload of keys, certificates and configuration with zero failed requests."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

import gateway.logs as logs_module
import gateway.reload as reload_module
from gateway.app import Gateway
from gateway.config import combined_digest, file_digests, load_config
from gateway.errors import ConfigError
from gateway.metrics import Metrics
from gateway.reload import listener_changes
from tests.e2e import (
    ANSWER,
    REQUEST,
    JoseGoogle,
    Pki,
    config,
    post,
    running_gateway,
)
from tests.jose_fixtures import JoseKeys, NodeJose
from tests.peers import StandIn, json_answer
from tests.pgp_fixtures import GpgPeer, PgpKeys, gpg_processes_under

pytestmark = pytest.mark.e2e


def jose_keysets(keys: JoseKeys, own: list[tuple[str, str]],
                 peer: list[tuple[str, str]]) -> str:
    def lines(entries: list[tuple[str, str]], half: Callable[[str], Path]) -> str:
        return "".join(f"\n              - {{id: {name}, file: {half(name)}, state: {state}}}"
                       for name, state in entries)

    return f"""
        keysets:
          partner:
            type: jose
            keys:{lines(own, keys.private)}
          google:
            type: jose
            keys:{lines(peer, keys.public)}
        """


def pgp_keysets(keys: PgpKeys, own: list[tuple[str, str]], peer: list[tuple[str, str]]) -> str:
    own_lines = "".join(f"\n              - {{id: {n}, file: {keys.sec(n)}, state: {s}}}"
                        for n, s in own)
    peer_lines = "".join(f"\n              - {{id: {n}, file: {keys.pub(n)}, state: {s}}}"
                         for n, s in peer)
    return f"""
        keysets:
          partner:
            type: pgp
            keys:{own_lines}
          google:
            type: pgp
            keys:{peer_lines}
        """


def routes_yaml(pki: Pki, partner_url: str, cert: Path | None = None,
                key: Path | None = None) -> str:
    return f"""
        routes:
          - name: in
            direction: inbound
            listen: "127.0.0.1:0"
            tls: {{cert: {cert or pki.cert}, key: {key or pki.key}}}
            upstream: {{url: "{partner_url}", timeout_s: 10}}
            own_keys: partner
            peer_keys: google
        """


def header(runtime_dir: Path, interval: float = 0) -> str:
    return f"""
        admin: {{listen: "127.0.0.1:0"}}
        reload: {{interval_s: {interval}}}
        runtime_dir: {runtime_dir}
        """


def write(path: Path, *parts: str) -> None:
    # Write aside and rename, as deploy tools and Kubernetes do.
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(textwrap.dedent(p) for p in parts))
    tmp.replace(path)


@pytest.fixture
async def partner() -> AsyncIterator[StandIn]:
    service = await StandIn(json_answer(ANSWER)).start()
    yield service
    await service.stop()


# -- rotation under continuous load ---------------------------------------------------------


async def load_while(gateway: Gateway, pki: Pki, seal: Callable[[], bytes],
                     stop: asyncio.Event, concurrency: int = 4) -> list[tuple[int, bytes]]:
    """Keep `concurrency` requests in flight until `stop`; every answer is returned."""
    answers: list[tuple[int, bytes]] = []
    bodies = [await asyncio.to_thread(seal) for _ in range(concurrency)]

    async def client(body: bytes) -> None:
        while not stop.is_set():
            status, _, answer = await post(gateway, "in", body, ctx=pki.client_context())
            answers.append((status, answer))

    await asyncio.gather(*(client(b) for b in bodies))
    return answers


async def test_jose_rotation_under_load_fails_no_request(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path,
    pki: Pki, tmp_path: Path,
) -> None:
    google = JoseGoogle(jose_keys, node_jose)
    path = tmp_path / "config.yaml"
    before = jose_keysets(
        jose_keys,
        [("partner-sig-a", "active"), ("partner-enc-a", "active"),
         ("partner-sig-b", "read-only")],
        [("google-sig-a", "active"), ("google-enc-a", "active")])
    after = jose_keysets(
        jose_keys,
        [("partner-sig-a", "read-only"), ("partner-enc-a", "active"),
         ("partner-sig-b", "active")],
        [("google-sig-a", "active"), ("google-enc-a", "active"),
         ("google-sig-b", "read-only")])
    text = header(runtime_dir) + before + routes_yaml(pki, partner.url)
    async with running_gateway(tmp_path, text) as gateway:
        stop = asyncio.Event()
        load = asyncio.create_task(load_while(gateway, pki, lambda: google.seal(REQUEST), stop))
        await asyncio.sleep(1)
        write(path, header(runtime_dir), after, routes_yaml(pki, partner.url))
        assert await gateway.reload()
        await asyncio.sleep(1)
        stop.set()
        answers = await load
        assert gateway.current.snapshot.generation == 2
    assert len(answers) > 8
    assert {status for status, _ in answers} == {200}
    kids = []
    for _, body in answers[-4:] + answers[:1]:
        _, jws_header, _ = await asyncio.to_thread(
            node_jose.open, body, jose_keys.private("google-enc-a"),
            [jose_keys.public("partner-sig-a"), jose_keys.public("partner-sig-b")])
        kids.append(jws_header["kid"])
    assert kids == ["partner-sig-b"] * 4 + ["partner-sig-a"]


async def test_pgp_rotation_under_load_fails_no_request(
    pgp_keys: PgpKeys, gpg_peer: GpgPeer, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    path = tmp_path / "config.yaml"
    before = pgp_keysets(pgp_keys, [("partner-a", "active"), ("partner-b", "read-only")],
                         [("google-a", "active")])
    after = pgp_keysets(pgp_keys, [("partner-a", "read-only"), ("partner-b", "active")],
                        [("google-a", "active"), ("google-b", "read-only")])
    text = header(runtime_dir) + before + routes_yaml(pki, partner.url)

    def seal() -> bytes:
        # Google encrypts to both of our keys while the rotation is under way.
        return gpg_peer.seal(REQUEST, sign_with=["google-a"],
                             encrypt_to=["partner-a", "partner-b"])

    async with running_gateway(tmp_path, text) as gateway:
        stop = asyncio.Event()
        load = asyncio.create_task(load_while(gateway, pki, seal, stop, concurrency=3))
        await asyncio.sleep(1.5)
        write(path, header(runtime_dir), after, routes_yaml(pki, partner.url))
        assert await gateway.reload()
        await asyncio.sleep(1.5)
        stop.set()
        answers = await load
    assert len(answers) > 6
    assert {status for status, _ in answers} == {200}
    first = (await asyncio.to_thread(gpg_peer.open, answers[0][1]))[1]
    last = (await asyncio.to_thread(gpg_peer.open, answers[-1][1]))[1]
    assert first == [pgp_keys.fingerprint("partner-a")]
    assert last == [pgp_keys.fingerprint("partner-b")]


# -- triggers ---------------------------------------------------------------------------------


async def test_kubernetes_secret_symlink_swap_is_picked_up_by_polling(
    pgp_keys: PgpKeys, gpg_peer: GpgPeer, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    # The layout kubelet gives a mounted Secret: files are symlinks through `..data`, and an
    # update swaps `..data` atomically to a new timestamped directory.
    secret = tmp_path / "secret"
    (secret / "..2026_11_28_a").mkdir(parents=True)
    (secret / "..2026_11_28_a" / "partner.sec.asc").write_bytes(
        pgp_keys.sec("partner-a").read_bytes())
    (secret / "..data").symlink_to("..2026_11_28_a")
    (secret / "partner.sec.asc").symlink_to("..data/partner.sec.asc")
    keysets = f"""
        keysets:
          partner:
            type: pgp
            keys: [{{id: partner, file: {secret / 'partner.sec.asc'}}}]
          google:
            type: pgp
            keys: [{{id: google-a, file: {pgp_keys.pub('google-a')}}}]
        """
    text = header(runtime_dir, interval=0.2) + keysets + routes_yaml(pki, partner.url)
    async with running_gateway(tmp_path, text) as gateway:
        gateway.watch()
        (secret / "..2026_11_28_b").mkdir()
        (secret / "..2026_11_28_b" / "partner.sec.asc").write_bytes(
            pgp_keys.sec("partner-b").read_bytes())
        (secret / "..data_tmp").symlink_to("..2026_11_28_b")
        (secret / "..data_tmp").replace(secret / "..data")
        deadline = time.monotonic() + 10
        while gateway.current.snapshot.generation == 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert gateway.current.snapshot.generation == 2
        sealed = await asyncio.to_thread(gpg_peer.seal, REQUEST, ["google-a"], ["partner-b"])
        status, _, body = await post(gateway, "in", sealed, ctx=pki.client_context())
        assert gateway.current.snapshot.generation == 2  # nothing changed: no further reload
    assert status == 200
    assert (await asyncio.to_thread(gpg_peer.open, body))[1] == [
        pgp_keys.fingerprint("partner-b")]


async def test_sighup_with_polling_disabled(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = JoseGoogle(jose_keys, node_jose)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    async with running_gateway(tmp_path, text) as gateway:
        gateway.watch()
        (tmp_path / "config.yaml").write_text(
            textwrap.dedent(text) + "warn_expiry_days: 7\n")
        await asyncio.sleep(0.5)
        assert gateway.current.snapshot.generation == 1  # interval_s 0: no polling
        os.kill(os.getpid(), signal.SIGHUP)
        deadline = time.monotonic() + 10
        while gateway.current.snapshot.generation == 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert gateway.current.snapshot.config.warn_expiry_days == 7
        assert gateway.reloader.last is not None
        assert gateway.reloader.last.trigger == "sighup"


async def test_a_config_rewritten_while_it_is_read_is_tried_again(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    """A poll read a config written in place while it was half written (and failed); the
    writer finished before the files were hashed: the finished file was taken as seen and
    never loaded (a review helper saw 2-6 of 60 in-place rewrites left unapplied)."""
    google = JoseGoogle(jose_keys, node_jose)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    path = tmp_path / "config.yaml"
    finished = textwrap.dedent(text) + "warn_expiry_days: 7\n"
    async with running_gateway(tmp_path, text) as gateway:
        path.write_text(finished[: len(finished) // 2])  # the writer, half way
        real = gateway.reloader.load

        def load(config_path: Path) -> Any:
            try:
                return real(config_path)
            finally:
                path.write_text(finished)  # ... finishes while the attempt runs

        gateway.reloader.load = load
        assert await gateway.reloader.poll() is False
        gateway.reloader.load = real
        assert await gateway.reloader.poll() is True
        assert gateway.current.snapshot.config.warn_expiry_days == 7
        assert await gateway.reloader.poll() is None  # and now it is seen


async def test_a_poll_that_reloads_hashes_the_watched_files_twice_not_four_times(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Once to see the change, once after the load to know what was read; the first serves as
    the before-image too (every key and certificate was read four times per reload)."""
    google = JoseGoogle(jose_keys, node_jose)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    async with running_gateway(tmp_path, text) as gateway:
        hashed: list[tuple[Path, ...]] = []

        def counting(paths: tuple[Path, ...]) -> dict[Path, str]:
            hashed.append(paths)
            return file_digests(paths)

        monkeypatch.setattr(reload_module, "file_digests", counting)
        monkeypatch.setattr(reload_module, "files_digest",
                            lambda paths: combined_digest(counting(paths)))
        (tmp_path / "config.yaml").write_text(textwrap.dedent(text) + "warn_expiry_days: 7\n")
        assert await gateway.reloader.poll() is True
    assert len(hashed) == 2 and all(len(paths) > 1 for paths in hashed)


async def test_a_failed_expiry_reload_is_tried_again_a_minute_later(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    """The reload made when a key's expiry passes was tried once: if it failed, the expired
    key stayed in use until some other reload."""
    google = JoseGoogle(jose_keys, node_jose)
    async with running_gateway(tmp_path, config(google, runtime_dir, pki,
                                                 inbound_url=partner.url)) as gateway:
        reloader = gateway.reloader
        real = reloader.load

        def unreadable(path: Path) -> Any:
            raise ConfigError("keysets.google.keys[0].file", "cannot read (test)")

        reloader.load = unreadable
        reloader._expiry = datetime.now(UTC) - timedelta(seconds=1)
        assert await reloader.poll() is False
        assert reloader._expiry is not None
        assert timedelta(seconds=50) < reloader._expiry - datetime.now(UTC) <= timedelta(minutes=1)
        reloader.load = real
        reloader._expiry = datetime.now(UTC) - timedelta(seconds=1)  # the minute has passed
        assert await reloader.poll() is True
        assert reloader.last is not None and reloader.last.trigger == "expiry"


async def test_polling_counts_the_same_broken_content_once(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = JoseGoogle(jose_keys, node_jose)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    async with running_gateway(tmp_path, text) as gateway:
        (tmp_path / "config.yaml").write_text("keysets: [broken\n")
        assert await gateway.reloader.poll() is False
        assert await gateway.reloader.poll() is None
        assert await gateway.reloader.poll() is None
        (tmp_path / "config.yaml").write_text(textwrap.dedent(text))
        assert await gateway.reloader.poll() is True
        metrics = gateway.metrics.render().decode()
    assert 'gateway_config_reloads_total{result="failure"} 1.0' in metrics
    assert 'gateway_config_reloads_total{result="success"} 1.0' in metrics
    assert "gateway_config_generation 2.0" in metrics


@pytest.mark.parametrize("first", ["missing", "broken"])
async def test_polling_watches_the_files_a_failed_configuration_names(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path, first: str,
) -> None:
    """A new configuration that names a key file not there yet, or there but broken, fails
    once; it is not retried (nor counted) at every poll; once the file is right, the next poll
    applies it, once."""
    google = JoseGoogle(jose_keys, node_jose)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    good = jose_keys.public("google-sig-a")
    moved = tmp_path / "rotated" / "google-sig.json"
    moved.parent.mkdir()
    if first == "broken":
        moved.write_text('{"kty": "RSA", "n": "broken"}')
    async with running_gateway(tmp_path, text) as gateway:
        (tmp_path / "config.yaml").write_text(textwrap.dedent(text).replace(str(good),
                                                                           str(moved)))
        assert await gateway.reloader.poll() is False
        assert await gateway.reloader.poll() is None
        assert await gateway.reloader.poll() is None
        moved.write_bytes(Path(good).read_bytes())
        assert await gateway.reloader.poll() is True
        assert await gateway.reloader.poll() is None
        metrics = gateway.metrics.render().decode()
    assert 'gateway_config_reloads_total{result="failure"} 1.0' in metrics
    assert 'gateway_config_reloads_total{result="success"} 1.0' in metrics
    assert "gateway_config_generation 2.0" in metrics


async def test_a_reload_applies_log_level_unless_the_command_line_pinned_it(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = logging.getLogger()
    monkeypatch.setattr(root, "level", root.level)  # put back after the test
    google = JoseGoogle(jose_keys, node_jose)
    text = textwrap.dedent(config(google, runtime_dir, pki, inbound_url=partner.url,
                                  top={"log_level": "info"}))
    async with running_gateway(tmp_path, text) as gateway:
        (tmp_path / "config.yaml").write_text(text.replace("log_level: info", "log_level: error"))
        assert await gateway.reload()
        assert root.level == logging.ERROR
        monkeypatch.setattr(logs_module, "_pinned", "error")  # as `run --log-level error`
        (tmp_path / "config.yaml").write_text(text)
        assert await gateway.reload()
        assert root.level == logging.ERROR


async def test_keys_are_loaded_again_when_a_part_expires(
    pgp_keys: PgpKeys, session_tmp: Path, runtime_dir: Path, tmp_path: Path,
) -> None:
    """A peer PGP key whose newest encryption subkey runs out while an older one (and the
    signing primary) stays valid: its expiry was fixed at load from the newest, so the whole
    key dropped out of use (401 and 500 no_key) until a reload. Polling now loads the keys
    again once an expiry passes; the key then goes on with the older subkey, as gpg does."""
    from gateway.errors import NoKeyError

    home = Path(tempfile.mkdtemp(prefix="x", dir=session_tmp))
    home.chmod(0o700)

    def gpg(*args: str) -> bytes:
        return subprocess.run(["gpg", "--homedir", str(home), "--batch", "--pinentry-mode",
                               "loopback", "--passphrase", "", *args], capture_output=True,
                              timeout=120, check=True).stdout

    try:
        gpg("--quick-gen-key", "google <google@example.test>", "rsa2048", "sign", "1y")
        fpr = next(line.split(b":")[9].decode() for line in
                   gpg("--list-keys", "--with-colons").splitlines() if line.startswith(b"fpr"))
        gpg("--quick-add-key", fpr, "rsa2048", "encr", "1y")
        time.sleep(1.1)  # a newer subkey, by its creation second
        gpg("--quick-add-key", fpr, "rsa2048", "encr", "seconds=6")
        (tmp_path / "google.asc").write_bytes(gpg("--armor", "--export", fpr))
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=30, check=False)
    text = f"""
        admin: {{listen: "127.0.0.1:0"}}
        reload: {{interval_s: 0}}
        runtime_dir: {runtime_dir}
        keysets:
          partner: {{type: pgp, keys: [{{id: p, file: {pgp_keys.sec('partner-a')}}}]}}
          google: {{type: pgp, keys: [{{id: g, file: {tmp_path / 'google.asc'}}}]}}
        routes:
          - {{name: r, direction: inbound, listen: "127.0.0.1:0", own_keys: partner,
             peer_keys: google, upstream: {{url: "http://127.0.0.1:1"}},
             pgp: {{engine: native}}}}
    """
    async with running_gateway(tmp_path, text) as gateway:
        def key() -> Any:
            return gateway.current.snapshot.keysets["google"].keys[0]

        def seal() -> object:
            return gateway.current.snapshot.routes["r"].envelope.seal(b'{"a": 1}')

        expires = key().expires
        assert expires is not None and expires - datetime.now(UTC) < timedelta(seconds=8)
        seal()
        assert await gateway.reloader.poll() is None
        await asyncio.sleep((expires - datetime.now(UTC)).total_seconds() + 0.2)
        with pytest.raises(NoKeyError):
            seal()
        assert await gateway.reloader.poll() is True
        assert gateway.reloader.last is not None and gateway.reloader.last.trigger == "expiry"
        assert key().expires - datetime.now(UTC) > timedelta(days=300)
        seal()
        assert await gateway.reloader.poll() is None
        # Not the operator's attempt: not in gateway_config_reloads_total (config.md).
        metrics = gateway.metrics.render().decode()
        assert 'gateway_config_reloads_total{result="success"} 0.0' in metrics


async def test_a_worker_counts_the_reloads_it_could_not_apply(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    # With workers > 1 the supervisor validates a reload before signalling the workers; a
    # worker that still fails to apply it (say its GnuPG homes cannot be made) keeps serving
    # its previous configuration, and operators see it in gateway_worker_reloads_total.
    google = JoseGoogle(jose_keys, node_jose)
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    async with running_gateway(tmp_path, text, Metrics(role="worker")) as gateway:
        (tmp_path / "config.yaml").write_text("keysets: [broken\n")
        assert await gateway.reload("sighup") is False
        (tmp_path / "config.yaml").write_text(textwrap.dedent(text))
        assert await gateway.reload("sighup") is True
        metrics = gateway.metrics.render().decode()
    assert 'gateway_worker_reloads_total{result="failure"} 1.0' in metrics
    assert 'gateway_worker_reloads_total{result="success"} 1.0' in metrics
    assert "gateway_config_reloads_total" not in metrics  # the supervisor's, not a worker's
    single = Metrics().render().decode()
    assert "gateway_worker_reloads_total" not in single


# -- certificates -----------------------------------------------------------------------------


def issue(pki: Pki, directory: Path, name: str) -> tuple[Path, Path, int]:
    leaf = pki._server_ca.issue_cert("localhost", "127.0.0.1", common_name=name)
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    leaf.private_key_pem.write_to_path(str(key))
    from cryptography import x509

    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    return cert, key, serial


async def test_certificate_rotation_keeps_open_connections(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = JoseGoogle(jose_keys, node_jose)
    tls = tmp_path / "tls"
    tls.mkdir()
    old_cert, old_key, old_serial = issue(pki, tmp_path, "old")
    (tls / "server.pem").write_bytes(old_cert.read_bytes())
    (tls / "server.key").write_bytes(old_key.read_bytes())
    new_cert, new_key, new_serial = issue(pki, tmp_path, "new")
    keysets = google.keysets()
    text = header(runtime_dir) + keysets + routes_yaml(pki, partner.url, tls / "server.pem",
                                                       tls / "server.key")
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    connections: list[int] = []
    trace = aiohttp.TraceConfig()

    async def created(*_: object) -> None:
        connections.append(1)

    trace.on_connection_create_end.append(created)
    async with running_gateway(tmp_path, text) as gateway:
        url = f"https://localhost:{gateway.routes['in'].port}/cards-qr-v1/echo"
        client = pki.client_context()  # one context: aiohttp pools connections per context
        async with aiohttp.ClientSession(trace_configs=[trace]) as kept:
            async with kept.post(url, data=sealed, ssl=client) as response:
                assert response.status == 200
            assert await served_serial(gateway, pki, "localhost") == old_serial
            async with kept.post(url, data=sealed, ssl=client) as response:
                assert response.status == 200
            assert len(connections) == 1, "keep-alive before reload"
            (tls / "server.pem").write_bytes(new_cert.read_bytes())
            (tls / "server.key").write_bytes(new_key.read_bytes())
            assert await gateway.reload()
            async with kept.post(url, data=sealed, ssl=client) as response:
                assert response.status == 200  # the open keep-alive connection still works
            assert len(connections) == 1
            # New handshakes get the new certificate, with SNI and without.
            assert await served_serial(gateway, pki, "localhost") == new_serial
            assert await served_serial(gateway, pki, None) == new_serial


async def test_a_listener_keeps_its_client_certificate_choice_until_a_restart(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    """Removing client_ca (or adding it) needs a restart: until then the listener keeps
    deciding as it started, on its last context that matches, and never refuses everyone."""
    google = JoseGoogle(jose_keys, node_jose)
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    new_cert, new_key, new_serial = issue(pki, tmp_path, "new")
    required = routes_yaml(pki, partner.url).replace(
        f"key: {pki.key}}}", f"key: {pki.key}, client_ca: {pki.client_ca}}}")
    assert required != routes_yaml(pki, partner.url)
    text = header(runtime_dir) + google.keysets() + required

    async def status(gateway: Gateway, ctx: ssl.SSLContext) -> int | str:
        try:
            return (await post(gateway, "in", sealed, ctx=ctx))[0]
        except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError):
            return "refused"

    async with running_gateway(tmp_path, text) as gateway:
        with_cert, without = pki.client_context(with_cert=True), pki.client_context()
        assert (await status(gateway, with_cert), await status(gateway, without)) == \
            (200, "refused")
        old_serial = await served_serial(gateway, pki, "localhost")
        # client_ca removed, a new certificate: neither applies until a restart.
        write(tmp_path / "config.yaml", header(runtime_dir), google.keysets(),
              routes_yaml(pki, partner.url, new_cert, new_key))
        assert await gateway.reload()
        assert gateway.reloader.last is not None
        assert gateway.reloader.last.warnings == (
            "routes[0].tls.client_ca: client certificates required or not",)
        assert (await status(gateway, with_cert), await status(gateway, without)) == \
            (200, "refused")
        assert await served_serial(gateway, pki, "localhost") == old_serial
        # Back as it started: the newest certificate applies again.
        write(tmp_path / "config.yaml", header(runtime_dir), google.keysets(),
              required.replace(str(pki.cert), str(new_cert)).replace(str(pki.key),
                                                                     str(new_key)))
        assert await gateway.reload()
        assert await served_serial(gateway, pki, "localhost") == new_serial
        assert (await status(gateway, with_cert), await status(gateway, without)) == \
            (200, "refused")


async def served_serial(gateway: Gateway | int, pki: Pki, server_name: str | None) -> int:
    port = gateway if isinstance(gateway, int) else gateway.routes["in"].port
    context = pki.client_context()
    if server_name is None:
        context.check_hostname = False  # an IP address: the client sends no SNI
    _, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=context, server_hostname=server_name or "")
    serial = int(writer.get_extra_info("ssl_object").getpeercert()["serialNumber"], 16)
    writer.close()
    await writer.wait_closed()
    return serial


# -- no leaks over many reloads ---------------------------------------------------------------


async def test_fifty_reloads_leave_only_the_current_gnupg_homes_and_agents(
    pgp_keys: PgpKeys, gpg_peer: GpgPeer, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    keysets = pgp_keysets(pgp_keys, [("partner-a", "active")], [("google-a", "active")])
    text = header(runtime_dir) + keysets + routes_yaml(pki, partner.url)
    sealed = await asyncio.to_thread(gpg_peer.seal, REQUEST, ["google-a"], ["partner-a"])
    async with running_gateway(tmp_path, text) as gateway:
        for _ in range(50):
            assert await gateway.reload()
        assert (await post(gateway, "in", sealed, ctx=pki.client_context()))[0] == 200
        await asyncio.sleep(0.2)  # let retired homes close
        [workdir] = list(runtime_dir.iterdir())
        homes = [f"g51r0s{slot}" for slot in range(gateway.gpg_slots)]
        assert sorted(p.name for p in workdir.iterdir()) == [*homes, "lock"]
        agents = [c for c in gpg_processes_under(runtime_dir, wait_s=2) if "gpg-agent" in c]
        assert len(agents) == gateway.gpg_slots
        assert all(any(f"/{home}" in agent for home in homes) for agent in agents)
    assert gpg_processes_under(runtime_dir) == []
    assert list(runtime_dir.iterdir()) == []


# -- black box: the real process ------------------------------------------------------------


async def admin_text(port: int, path: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{port}{path}"
    ) as response:
        return await response.text()


async def next_event(stderr: asyncio.StreamReader, prefix: str) -> dict[str, Any]:
    """The next JSON log entry whose event starts with `prefix` (request lines are skipped)."""
    while True:
        line = await asyncio.wait_for(stderr.readline(), 30)
        assert line, "the gateway exited"
        try:
            entry: dict[str, Any] = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line[:300]!r}") from None
        if entry["event"].startswith(prefix):
            return entry


async def test_real_process_keeps_serving_through_a_broken_reload(
    jose_keys: JoseKeys, node_jose: NodeJose, partner: StandIn, runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    google = JoseGoogle(jose_keys, node_jose)
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("partner-sig-a", "partner-enc-a"):
        (keys / f"{name}.jwk").write_bytes(jose_keys.private(name).read_bytes())
    text = config(google, runtime_dir, pki, inbound_url=partner.url)
    for name in ("partner-sig-a", "partner-enc-a"):
        text = text.replace(str(jose_keys.private(name)), str(keys / f"{name}.jwk"))
    # The listener's certificate too, to rotate it in the real process (which runs uvloop).
    cert, key, _ = issue(pki, tmp_path, "first")
    text = text.replace(f"cert: {pki.cert}, key: {pki.key}", f"cert: {cert}, key: {key}")
    path = tmp_path / "config.yaml"
    path.write_text(textwrap.dedent(text))
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "run", "--config", str(path),
        stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert process.stderr is not None
    try:
        entry = await next_event(process.stderr, "listening")
        port = int(entry["routes"]["in"].rsplit(":", 1)[1])
        admin = int(entry["admin"].rsplit(":", 1)[1])

        async def request() -> int:
            async with aiohttp.ClientSession() as session, session.post(
                f"https://localhost:{port}/cards-qr-v1/echo", data=sealed,
                ssl=pki.client_context()) as response:
                return response.status

        (keys / "partner-enc-a.jwk").write_text('{"kty": "RSA", "n": "broken"}')
        process.send_signal(signal.SIGHUP)
        failed = await next_event(process.stderr, "reload failed")
        assert failed["event"].startswith("reload failed")
        assert "keysets.partner.keys[1].file" in failed["error"]
        assert await request() == 200  # the old configuration still serves
        metrics = await admin_text(admin, "/metrics")
        assert 'gateway_config_reloads_total{result="failure"} 1.0' in metrics
        status = json.loads(await admin_text(admin, "/status"))
        assert status["generation"] == 1 and status["last_reload"]["result"] == "failure"

        (keys / "partner-enc-a.jwk").write_bytes(jose_keys.private("partner-enc-a").read_bytes())
        process.send_signal(signal.SIGHUP)
        applied = await next_event(process.stderr, "reloaded")
        assert applied["event"] == "reloaded" and applied["generation"] == 2
        assert await request() == 200
        metrics = await admin_text(admin, "/metrics")
        assert 'gateway_config_reloads_total{result="success"} 1.0' in metrics

        new_cert, new_key, new_serial = issue(pki, tmp_path, "second")
        cert.write_bytes(new_cert.read_bytes())
        key.write_bytes(new_key.read_bytes())
        process.send_signal(signal.SIGHUP)
        assert (await next_event(process.stderr, "reloaded"))["generation"] == 3
        assert await served_serial(port, pki, "localhost") == new_serial
        assert await served_serial(port, pki, None) == new_serial
        assert await request() == 200
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- listener changes -----------------------------------------------------------------------


def test_listener_changes_are_named(jose_keys: JoseKeys, node_jose: NodeJose, pki: Pki,
                                    runtime_dir: Path, tmp_path: Path) -> None:
    google = JoseGoogle(jose_keys, node_jose)
    old_text = config(google, runtime_dir, pki, inbound_url="http://127.0.0.1:1",
                      outbound_url="http://127.0.0.1:2")
    (tmp_path / "a.yaml").write_text(textwrap.dedent(old_text))
    new_text = old_text.replace('listen: "127.0.0.1:0"\n            tls',
                                'listen: "127.0.0.1:8443"\n            tls', 1)
    new_text = new_text.replace("name: out", "name: out2")
    new_text = new_text.replace('admin: {listen: "127.0.0.1:0"}',
                                'admin: {listen: "127.0.0.1:9999"}')
    new_text = new_text.replace(f"runtime_dir: {runtime_dir}", f"runtime_dir: {runtime_dir}2"
                                "\n        workers: 2\n        pin_workers: true"
                                "\n        batch_scheduling: true")
    (tmp_path / "b.yaml").write_text(textwrap.dedent(new_text))
    changes = listener_changes(load_config(tmp_path / "a.yaml"),
                               load_config(tmp_path / "b.yaml"))
    assert changes == [
        "admin.listen 127.0.0.1:0 -> 127.0.0.1:9999",
        "workers 1 -> 2",
        "pin_workers false -> true",
        "batch_scheduling false -> true",
        f"runtime_dir {runtime_dir} -> {runtime_dir}2: the GnuPG homes stay where they are "
        "until a restart",
        "route 'out2' added: not served until a restart",
        "route 'out' removed: its listener answers 503 until a restart",
        "routes[0].listen 127.0.0.1:0 -> 127.0.0.1:8443",
    ]
    # The limits aiohttp and the loop take when a listener starts.
    limits = "limits: {max_headers: 10, header_timeout_s: 2, idle_timeout_s: 9}"
    (tmp_path / "c.yaml").write_text(textwrap.dedent(old_text.replace(
        "reload: {interval_s: 0}", "reload: {interval_s: 0}\n        " + limits)))
    assert listener_changes(load_config(tmp_path / "a.yaml"),
                            load_config(tmp_path / "c.yaml")) == [
        "limits.idle_timeout_s applies to listeners: restart to change it",
        "limits.max_headers applies to listeners: restart to change it",
        "limits.header_timeout_s applies to request heads now and to TLS handshakes after a "
        "restart",
    ]

