"""metrics.py: the contract of config.md, moved by real traffic in both directions and schemes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics
from tests.e2e import (
    ANSWER,
    REQUEST,
    Google,
    PgpGoogle,
    Pki,
    config,
    google_for,
    post,
    running_gateway,
)
from tests.peers import StandIn, json_answer
from tests.pgp_fixtures import GpgPeer, PgpKeys, b64url, unb64url

pytestmark = pytest.mark.e2e

# name -> (type, labels), exactly as config.md lists them.
CONTRACT = {
    "gateway_requests_total": ("counter", {"route", "direction", "code"}),
    "gateway_request_duration_seconds": ("histogram", {"route", "direction"}),
    "gateway_upstream_duration_seconds": ("histogram", {"route"}),
    "gateway_crypto_duration_seconds": ("histogram", {"route", "op"}),
    "gateway_crypto_failures_total": ("counter", {"route", "op", "reason"}),
    "gateway_key_uses_total": ("counter", {"keyset", "key_id", "op"}),
    "gateway_key_expiry_timestamp_seconds": ("gauge", {"keyset", "key_id"}),
    "gateway_key_info": ("gauge", {"keyset", "key_id", "state", "fingerprint"}),
    "gateway_config_reloads_total": ("counter", {"result"}),
    "gateway_config_generation": ("gauge", set()),
}


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return found


def value(text: str, name: str, **labels: str) -> float:
    return samples(text).get((name, frozenset(labels.items())), 0.0)


def test_every_contract_metric_is_registered_with_its_type_and_labels() -> None:
    metrics = Metrics()
    for collector_name, (kind, labels) in CONTRACT.items():
        family = metrics.registry._names_to_collectors[collector_name]  # type: ignore[attr-defined]
        described = next(iter(family.describe()))
        assert described.type == kind, collector_name
        assert set(getattr(family, "_labelnames", ())) == labels, collector_name


@pytest.fixture(params=["pgp", "jose"])
def google(request: pytest.FixtureRequest) -> Google:
    return google_for(request, request.param)


async def test_traffic_in_both_directions_moves_every_metric(
    google: Google, partner_and_google: tuple[StandIn, StandIn], runtime_dir: Path, pki: Pki,
    tmp_path: Path,
) -> None:
    partner, service = partner_and_google
    # JOSE keys have no expiry of their own: give the peer's encryption key one.
    expires = datetime(2027, 9, 1, tzinfo=UTC) if google.scheme == "jose" else None
    text = config(google, runtime_dir, pki, inbound_url=partner.url, outbound_url=service.url,
                  upstream_extra=f", ca: {pki.ca}", expiring_recipient=expires)
    sealed = await asyncio.to_thread(google.seal, REQUEST)
    async with running_gateway(tmp_path, text) as gateway:
        before = gateway.metrics.render().decode()
        for _ in range(2):
            assert (await post(gateway, "in", sealed, ctx=pki.client_context()))[0] == 200
        assert (await post(gateway, "out", REQUEST))[0] == 200
        assert (await post(gateway, "in", b"garbage", ctx=pki.client_context()))[0] == 400
        after = gateway.metrics.render().decode()
    for name, (_, labels) in CONTRACT.items():
        present = [labels_ for (sample, labels_) in samples(after)
                   if sample.startswith(name)]
        assert present, f"{name} missing"
        for label_set in present:
            assert {k for k, _ in label_set} - {"le"} == labels, name
    assert value(after, "gateway_requests_total", route="in", direction="inbound",
                 code="200") == 2
    assert value(after, "gateway_requests_total", route="out", direction="outbound",
                 code="200") == 1
    assert value(after, "gateway_request_duration_seconds_count", route="in",
                 direction="inbound") == 3
    assert value(after, "gateway_upstream_duration_seconds_count", route="in") == 2
    assert value(after, "gateway_upstream_duration_seconds_count", route="out") == 1
    assert value(after, "gateway_crypto_duration_seconds_count", route="in", op="open") == 3
    assert value(after, "gateway_crypto_duration_seconds_count", route="in", op="seal") == 2
    assert value(after, "gateway_crypto_duration_seconds_count", route="out", op="seal") == 1
    assert value(after, "gateway_crypto_failures_total", route="in", op="open",
                 reason="malformed") == 1
    assert value(after, "gateway_config_generation") == 1
    if expires is not None:
        assert value(after, "gateway_key_expiry_timestamp_seconds", keyset="google",
                     key_id="google-enc-a") == expires.timestamp()
    assert value(before, "gateway_config_reloads_total", result="failure") == 0
    own_sig, own_enc = (("partner-pw", "partner-pw") if google.scheme == "pgp"
                        else ("partner-sig-a", "partner-enc-a"))
    peer_sig, peer_enc = (("google-a", "google-a") if google.scheme == "pgp"
                          else ("google-sig-a", "google-enc-a"))
    # Two inbound requests and one outbound answer were opened; two answers and one request
    # were sealed.
    assert value(after, "gateway_key_uses_total", keyset="partner", key_id=own_enc,
                 op="decrypt") == 3
    assert value(after, "gateway_key_uses_total", keyset="google", key_id=peer_sig,
                 op="verify") == 3
    assert value(after, "gateway_key_uses_total", keyset="partner", key_id=own_sig,
                 op="sign") == 3
    assert value(after, "gateway_key_uses_total", keyset="google", key_id=peer_enc,
                 op="encrypt") == 3
    for key_id in {own_sig, own_enc}:
        infos = [labels for (name, labels) in samples(after)
                 if name == "gateway_key_info" and ("key_id", key_id) in labels]
        assert len(infos) == 1 and ("state", "active") in infos[0]


async def test_two_active_pgp_keys_each_count_their_uses(
    pgp_keys: PgpKeys, gpg_peer: GpgPeer, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    partner = await StandIn(json_answer(ANSWER)).start()
    text = textwrap.dedent(f"""
        admin: {{listen: "127.0.0.1:0"}}
        runtime_dir: {runtime_dir}
        keysets:
          partner:
            type: pgp
            keys:
              - {{id: partner-a, file: {pgp_keys.sec('partner-a')}}}
              - {{id: partner-b, file: {pgp_keys.sec('partner-b')}}}
          google:
            type: pgp
            keys:
              - {{id: google-a, file: {pgp_keys.pub('google-a')}}}
              - {{id: google-b, file: {pgp_keys.pub('google-b')}}}
        routes:
          - {{name: in, direction: inbound, listen: "127.0.0.1:0", own_keys: partner,
              peer_keys: google, tls: {{cert: {pki.cert}, key: {pki.key}}},
              upstream: {{url: "{partner.url}"}}}}
        """)
    sealed = await asyncio.to_thread(gpg_peer.seal, REQUEST, ["google-a", "google-b"],
                                     ["partner-b"])
    try:
        async with running_gateway(tmp_path, text) as gateway:
            status, _, body = await post(gateway, "in", sealed, ctx=pki.client_context())
            metrics = gateway.metrics.render().decode()
    finally:
        await partner.stop()
    assert status == 200
    opened = await asyncio.to_thread(gpg_peer.open_details, body)
    assert sorted(opened.signers) == sorted(
        [pgp_keys.fingerprint("partner-a"), pgp_keys.fingerprint("partner-b")])
    uses = {(labels["key_id"], labels["op"]): v for (name, ls), v in samples(metrics).items()
            if name == "gateway_key_uses_total" for labels in [dict(ls)]}
    assert uses == {
        ("partner-b", "decrypt"): 1, ("google-a", "verify"): 1, ("google-b", "verify"): 1,
        ("partner-a", "sign"): 1, ("partner-b", "sign"): 1,
        ("google-a", "encrypt"): 1, ("google-b", "encrypt"): 1,
    }


async def test_crypto_failures_are_counted_by_reason(
    pgp_keys: PgpKeys, gpg_peer: GpgPeer, runtime_dir: Path, pki: Pki, tmp_path: Path,
) -> None:
    google = PgpGoogle(pgp_keys, gpg_peer)
    partner = await StandIn(json_answer(ANSWER)).start()
    expires = datetime.now(UTC) + timedelta(seconds=4)
    text = config(google, runtime_dir, pki, inbound_url=partner.url, expiring_recipient=expires,
                  limits="limits: {max_body_bytes: 16384}")
    good = await asyncio.to_thread(gpg_peer.seal, REQUEST, ["google-a"], ["partner-pw"])
    raw = bytearray(unb64url(good))
    raw[-10] ^= 1
    bodies = {
        "malformed": b"not a message",
        "unknown_key": await asyncio.to_thread(gpg_peer.seal, REQUEST, ["google-a"],
                                               ["stranger"]),
        "decrypt": b64url(bytes(raw)),
        "signature": await asyncio.to_thread(gpg_peer.seal, REQUEST, ["stranger"],
                                             ["partner-pw"]),
        "algorithm": await asyncio.to_thread(gpg_peer.seal, REQUEST, ["google-a"],
                                             ["partner-pw"], digest="SHA1"),
        "too_large": await asyncio.to_thread(gpg_peer.seal, b"0" * 200_000, ["google-a"],
                                             ["partner-pw"], compress="zlib"),
    }
    try:
        async with running_gateway(tmp_path, text) as gateway:
            statuses = {reason: (await post(gateway, "in", body, ctx=pki.client_context()))[0]
                        for reason, body in bodies.items()}
            await asyncio.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds()) + 0.1)
            statuses["no_key"] = (await post(gateway, "in", good, ctx=pki.client_context()))[0]
            metrics = gateway.metrics.render().decode()
    finally:
        await partner.stop()
    assert statuses == {"malformed": 400, "unknown_key": 400, "decrypt": 400, "signature": 401,
                        "algorithm": 401, "too_large": 413, "no_key": 500}
    for reason in statuses:
        op = "seal" if reason == "no_key" else "open"
        assert value(metrics, "gateway_crypto_failures_total", route="in", op=op,
                     reason=reason) == 1, reason


WORKER_METRICS = textwrap.dedent("""\
    import os, sys
    from pathlib import Path
    from gateway.metrics import Metrics
    metrics = Metrics(role="worker")
    requests = metrics.requests.labels("in", "inbound", "200")
    calls = []
    sys.setprofile(lambda frame, event, arg: calls.append(1)
                   if event == "c_call" and arg is os.getpid else None)
    for _ in range(100):
        requests.inc()
    sys.setprofile(None)
    assert calls == [], f"{len(calls)} getpid calls"
    child = os.fork()
    if child == 0:  # a forked child writes its own file, not its parent's
        requests.inc()
        os._exit(0)
    os.waitpid(child, 0)
    print(os.getpid(), child)
""")


def test_a_worker_writes_its_own_pid_file_without_asking_for_the_pid_each_time(
    tmp_path: Path,
) -> None:
    """prometheus-client's multiprocess mode calls getpid on every inc; a worker's values use
    its pid as known (refreshed in a forked child), and still land in that process's file."""
    done = subprocess.run([sys.executable, "-c", WORKER_METRICS], capture_output=True,
                          text=True, timeout=60, env={**os.environ,
                                                      "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    parent, child = done.stdout.split()
    collected = CollectorRegistry()
    MultiProcessCollector(collected, path=str(tmp_path))
    samples = {(s.labels.get("pid"), s.value) for f in collected.collect() for s in f.samples
               if s.name == "gateway_requests_total"}
    assert sum(value for _, value in samples) == 101
    assert sorted(p.name for p in tmp_path.glob("counter_*.db")) == sorted(
        [f"counter_{parent}.db", f"counter_{child}.db"])
