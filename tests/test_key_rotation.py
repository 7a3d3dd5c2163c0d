"""docs/key-rotation.md executed step by step against a running gateway, with traffic in both
directions throughout: its shell lines run, its YAML is the configuration, its PromQL is checked."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pytest
import yaml
from aiohttp import web

from gateway.__main__ import main
from gateway.app import Gateway
from tests.e2e import ANSWER, REQUEST, Pki, post, running_gateway
from tests.jose_fixtures import JoseKeys, NodeJose, NodeJoseError, public_jwk
from tests.peers import StandIn, json_answer
from tests.pgp_fixtures import GpgPeer, GpgPeerError, PgpKeys, b64url

pytestmark = pytest.mark.e2e

DOC = Path(__file__).resolve().parent.parent / "docs" / "key-rotation.md"
ACCOUNT = "PIAID-0001"


# -- the runbook as data ----------------------------------------------------------------------


@dataclass
class Block:
    kind: str  # sh, yaml, promql
    text: str


@dataclass
class Step:
    id: str
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Section:
    letter: str
    title: str
    start: list[Block] = field(default_factory=list)  # YAML before the first step
    steps: list[Step] = field(default_factory=list)


def parse_runbook(text: str) -> dict[str, Section]:
    """Sections `## X. title`, steps `### Xn. title`, and the sh/yaml/promql blocks of each."""
    sections: dict[str, Section] = {}
    section: Section | None = None
    step: Step | None = None
    lines = iter(text.splitlines())
    for line in lines:
        if match := re.match(r"^## ([A-Z])\. (.+)$", line):
            section, step = Section(match[1], match[2]), None
            sections[section.letter] = section
        elif line.startswith("## "):
            section, step = None, None
        elif (match := re.match(r"^### ([A-Z]\d+)\. (.+)$", line)) and section is not None:
            assert match[1].startswith(section.letter), line
            step = Step(match[1], match[2])
            section.steps.append(step)
        elif match := re.match(r"^```(\w+)$", line):
            body = []
            for inner in lines:
                if inner == "```":
                    break
                body.append(inner)
            block = Block(match[1], "\n".join(body))
            if block.kind not in ("sh", "yaml", "promql") or section is None:
                continue
            (step.blocks if step is not None else section.start).append(block)
    return sections


def test_the_runbook_has_every_step_for_both_schemes() -> None:
    sections = parse_runbook(DOC.read_text())
    assert list(sections) == ["A", "B", "C", "D"]
    for section in sections.values():
        ids = [s.id for s in section.steps]
        assert ids == [f"{section.letter}{i}" for i in range(1, len(ids) + 1)]
        for step in section.steps:
            for i, block in enumerate(step.blocks):
                if block.kind == "yaml":  # an edit of a fresh copy, checked before it is used
                    assert step.blocks[i - 1].text.endswith("cp config.yaml config.next.yaml")
                    assert "gateway check --config config.next.yaml" in step.blocks[i + 1].text
    text = DOC.read_text()
    for needed in ("gateway_key_uses_total", "disabled", "python -m gateway check",
                   "python -m gateway echo", "Roll back"):
        assert needed in text


# -- Google, played by implementations that are not ours ---------------------------------------


class Google(Protocol):
    def seal(self, plaintext: bytes) -> bytes: ...

    def open(self, body: bytes) -> bytes | None:
        """The plaintext, or None when the signature is by no key Google trusts."""
        ...


class PgpGoogle:
    """gpg holding Google's two secret keys; trusts and encrypts to the keys of ours it holds."""

    def __init__(self, keys: PgpKeys, home: Path) -> None:
        self.keys = keys
        self.peer = GpgPeer(keys, home, names=["google-a", "google-b"])
        # gpg --import rewrites the keybox; a gpg reading it at that moment fails ("keydb_search
        # failed: No such file or directory", seen once in CI). Google's side is a stand-in:
        # its calls take turns.
        self._lock = threading.Lock()
        self.sign_with = [keys.fingerprint("google-a")]
        self.encrypt_to = [self.take_on(keys.pub("partner-a"))]
        self.trusted = set(self.encrypt_to)

    def take_on(self, public_key: Path) -> str:
        """Import one of our public keys; its primary fingerprint."""
        with self._lock:
            shown = self.peer.gpg("--with-colons", "--import-options", "show-only", "--import",
                                  str(public_key)).stdout.decode()
            self.peer.gpg("--import", str(public_key))
        return shown.split("\nfpr:::::::::")[1].split(":")[0]

    def seal(self, plaintext: bytes) -> bytes:
        args = ["--sign", "--encrypt", "--digest-algo", "SHA384", "--cipher-algo", "AES256"]
        args += [a for f in self.sign_with for a in ("--local-user", f)]
        args += [a for f in self.encrypt_to for a in ("--recipient", f)]
        with self._lock:
            return b64url(self.peer.gpg(*args, stdin=plaintext).stdout)

    def open(self, body: bytes) -> bytes | None:
        try:
            with self._lock:
                opened = self.peer.open_details(body)
        except GpgPeerError:
            return None
        return opened.plaintext if set(opened.signers) & self.trusted else None


class JoseGoogle:
    """panva's jose with Google's private JWKs; trusts the public JWKs of ours it was given."""

    def __init__(self, node: NodeJose, secrets: Path, ours: Path) -> None:
        self.node = node
        self.secrets = secrets
        self.sign_with = secrets / "google-sig-2026.jwk"
        self.encrypt_to = ours / "partner-enc-2026.public.jwk"
        self.trusted = [ours / "partner-sig-2026.public.jwk"]

    def seal(self, plaintext: bytes) -> bytes:
        return self.node.seal(plaintext, self.sign_with, "RS256", self.encrypt_to)

    def open(self, body: bytes) -> bytes | None:
        header = json.loads(b64decode(body.split(b".")[0]))
        try:
            plaintext, _, _ = self.node.open(body, self.secrets / f"{header['kid']}.jwk",
                                             list(self.trusted))
        except NodeJoseError:
            return None
        return plaintext


def b64decode(segment: bytes) -> bytes:
    import base64

    return base64.urlsafe_b64decode(segment + b"=" * (-len(segment) % 4))


def write_jwk(path: Path, jwk: dict[str, Any], kid: str) -> None:
    path.write_text(json.dumps({**jwk, "kid": kid}))
    path.chmod(0o600)


@pytest.fixture
async def google_server(pki: Pki) -> AsyncIterator[tuple[StandIn, list[Google]]]:
    """Google's HTTPS endpoint for outbound calls (echo included): 401 unless our signature is
    by a key it trusts, else a sealed echo answer. The Google it plays is set by the test."""
    side: list[Google] = []

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        plaintext = await asyncio.to_thread(side[0].open, body)
        if plaintext is None:
            return web.Response(status=401)
        message = json.loads(plaintext)
        answer = json.dumps({"responseHeader": {"responseTimestamp": {"epochMillis": "1"}},
                             "clientMessage": message["clientMessage"],
                             "serverMessage": "pong from Google"}).encode()
        return web.Response(body=await asyncio.to_thread(side[0].seal, answer))

    server = await StandIn(handler, ssl_context=pki.server_context()).start()
    yield server, side
    await server.stop()


@pytest.fixture
async def partner() -> AsyncIterator[StandIn]:
    service = await StandIn(json_answer(ANSWER)).start()
    yield service
    await service.stop()


# -- traffic ----------------------------------------------------------------------------------


@dataclass
class Traffic:
    """Requests in both directions, back to back, until stopped. Each is checked end to end:
    inbound, Google opens and verifies our answer; outbound, our caller gets Google's echo."""

    gateway: Gateway
    pki: Pki
    google: Google
    failures: list[str] = field(default_factory=list)
    done: dict[str, int] = field(default_factory=lambda: {"in": 0, "out": 0})
    current: dict[str, float] = field(default_factory=dict)  # loop -> start of its request
    stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def inbound(self, name: str) -> None:
        while not self.stop.is_set():
            self.current[name] = time.monotonic()
            body = await asyncio.to_thread(self.google.seal, REQUEST)
            status, _, answer = await post(self.gateway, "in", body,
                                           ctx=self.pki.client_context())
            opened = await asyncio.to_thread(self.google.open, answer) if status == 200 else None
            if opened != ANSWER:
                self.failures.append(f"inbound: HTTP {status}, Google opened {opened!r}")
            self.done["in"] += 1

    async def outbound(self, name: str) -> None:
        while not self.stop.is_set():
            self.current[name] = time.monotonic()
            status, _, answer = await post(self.gateway, "out", REQUEST,
                                           path=f"/cards-qr-v1/echo/{ACCOUNT}")
            if status != 200 or json.loads(answer).get("clientMessage") != "ping":
                self.failures.append(f"outbound: HTTP {status} {answer[:200]!r}")
            self.done["out"] += 1

    def run(self) -> Awaitable[list[None]]:
        return asyncio.gather(self.inbound("in"), self.outbound("out"))

    async def newer_than(self, moment: float) -> None:
        """Until every loop's request in progress started after `moment` (the older ones,
        which may use the previous configuration, have finished)."""
        while min(self.current.values(), default=0.0) <= moment:
            await asyncio.sleep(0.02)


# -- executing the runbook --------------------------------------------------------------------


@dataclass
class Runner:
    gateway: Gateway
    directory: Path
    traffic: Traffic
    executed: list[str] = field(default_factory=list)
    inflight_at_reload: list[int] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    last_reload: float = 0.0

    async def section(self, section: Section,
                      actions: dict[str, Callable[[], Awaitable[None]]]) -> None:
        for step in section.steps:
            if step.id in actions:
                await actions.pop(step.id)()
            elif not step.blocks:
                raise AssertionError(f"{step.id} has nothing the test can do")
            for block in step.blocks:
                await getattr(self, f"_{block.kind}")(block.text)
            self.executed.append(step.id)

    async def _sh(self, text: str) -> None:
        for line in text.splitlines():
            if line.startswith("python -m gateway "):
                await self._gateway_command(shlex.split(line)[3:])
            elif line.startswith("kill -HUP "):
                await self._reload()
            else:
                subprocess.run(["bash", "-c", line], cwd=self.directory, check=True, timeout=30)

    async def _gateway_command(self, argv: list[str]) -> None:
        def run() -> tuple[int, str]:
            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
            return code, out.getvalue() + err.getvalue()

        code, output = await asyncio.to_thread(run)
        self.outputs.append(output)
        assert code == 0, f"{' '.join(argv)}: {output}"

    async def _reload(self) -> None:
        """What SIGHUP does, while requests are in flight."""
        while self.gateway.inflight.count == 0:
            await asyncio.sleep(0.005)
        self.inflight_at_reload.append(self.gateway.inflight.count)
        generation = self.gateway.current.snapshot.generation
        assert await self.gateway.reload(), self.gateway.reloader.last
        assert self.gateway.current.snapshot.generation == generation + 1
        self.last_reload = time.monotonic()

    async def _yaml(self, text: str) -> None:
        path = self.directory / "config.next.yaml"
        data = yaml.safe_load(path.read_text())
        data["keysets"].update(yaml.safe_load(text)["keysets"])
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    async def _promql(self, text: str) -> None:
        for line in text.splitlines():
            match = re.fullmatch(r"increase\((\w+)\{(.*)\}\[\w+\]\) (>|==) 0", line)
            assert match, line
            name, labels = match[1], dict(re.findall(r'(\w+)="([^"]*)"', match[2]))
            before = self._value(name, labels)
            if match[3] == ">":
                deadline = time.monotonic() + 20
                while self._value(name, labels) <= before:
                    assert time.monotonic() < deadline, f"{line}: no increase"
                    await asyncio.sleep(0.05)
            else:
                await self.traffic.newer_than(self.last_reload)
                before = self._value(name, labels)
                counts = dict(self.traffic.done)
                while any(self.traffic.done[d] < counts[d] + 3 for d in counts):
                    await asyncio.sleep(0.05)
                assert self._value(name, labels) == before, f"{line}: it increased"

    def _value(self, name: str, labels: dict[str, str]) -> float:
        for line in self.gateway.metrics.render().decode().splitlines():
            if line.startswith(name + "{"):
                series, value = line.rsplit(" ", 1)
                if dict(re.findall(r'(\w+)="([^"]*)"', series)) == labels:
                    return float(value)
        return 0.0


def first_config(directory: Path, runtime_dir: Path, pki: Pki, partner_url: str,
                 google_url: str, start: Section) -> str:
    config = {
        "admin": {"listen": "127.0.0.1:0"},
        "reload": {"interval_s": 0},
        "runtime_dir": str(runtime_dir),
        **yaml.safe_load(start.start[0].text),
        "routes": [
            {"name": "in", "direction": "inbound", "listen": "127.0.0.1:0",
             "tls": {"cert": str(pki.cert), "key": str(pki.key)},
             "upstream": {"url": partner_url, "timeout_s": 10},
             "own_keys": "partner", "peer_keys": "google"},
            {"name": "out", "direction": "outbound", "listen": "127.0.0.1:0",
             "upstream": {"url": google_url, "ca": str(pki.ca), "timeout_s": 10},
             "own_keys": "partner", "peer_keys": "google"},
        ],
    }
    return yaml.safe_dump(config, sort_keys=False)


async def run_runbook(runner: Runner, sections: list[Section],
                      actions: dict[str, Callable[[], Awaitable[None]]]) -> None:
    load = asyncio.ensure_future(runner.traffic.run())
    try:
        for section in sections:
            await runner.section(section, actions)
        assert not actions, f"actions for steps the runbook does not have: {sorted(actions)}"
        await asyncio.sleep(0.5)
    finally:
        runner.traffic.stop.set()
        await load


def check_outcome(runner: Runner, sections: list[Section], reloads: int) -> None:
    assert runner.executed == [s.id for section in sections for s in section.steps]
    assert runner.traffic.failures == []
    assert len(runner.inflight_at_reload) == reloads
    assert min(runner.inflight_at_reload) > 0
    assert runner.traffic.done["in"] > 20 and runner.traffic.done["out"] > 20


async def test_pgp_runbook_rotates_our_key_and_googles_without_a_failed_request(
    pgp_keys: PgpKeys, google_server: tuple[StandIn, list[Google]], partner: StandIn,
    runtime_dir: Path, pki: Pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    sections = parse_runbook(DOC.read_text())
    a, b = sections["A"], sections["B"]
    keys = tmp_path / "keys"
    keys.mkdir(mode=0o700)
    shutil.copy(pgp_keys.sec("partner-a"), keys / "partner-2026.sec.asc")
    shutil.copy(pgp_keys.pub("google-a"), keys / "google-2026.pub.asc")
    monkeypatch.chdir(tmp_path)
    server, side = google_server
    google = PgpGoogle(pgp_keys, tmp_path / "google")
    side.append(google)

    async def google_takes_on_our_new_key() -> None:  # A3
        new = await asyncio.to_thread(google.take_on, keys / "partner-2027.pub.asc")
        google.trusted.add(new)
        google.encrypt_to = [new]

    async def google_publishes_its_new_key() -> None:  # B1
        shutil.copy(pgp_keys.pub("google-b"), keys / "google-2027.pub.asc")

    async def google_signs_with_its_new_key() -> None:  # B3
        google.sign_with = [pgp_keys.fingerprint("google-b")]

    text = first_config(tmp_path, runtime_dir, pki, partner.url, server.url, a)
    try:
        async with running_gateway(tmp_path, text) as gateway:
            runner = Runner(gateway, tmp_path, Traffic(gateway, pki, google))
            await run_runbook(runner, [a, b], {
                "A3": google_takes_on_our_new_key, "B1": google_publishes_its_new_key,
                "B3": google_signs_with_its_new_key})
            final = gateway.current.snapshot.keysets
            assert [k.id for k in final["partner"].keys] == ["partner-2027"]
            assert [k.id for k in final["google"].keys] == ["google-2027"]
            assert final["partner"].keys[0].algorithm == "RSA-3072"
    finally:
        google.peer.close()
    check_outcome(runner, [a, b], reloads=8)
    assert sum("echo ok" in output for output in runner.outputs) == 2
    assert not (keys / "partner-2026.sec.asc").exists()
    assert not (keys / "google-2026.pub.asc").exists()


async def test_jose_runbook_rotates_our_keys_and_googles_without_a_failed_request(
    jose_keys: JoseKeys, node_jose: NodeJose, google_server: tuple[StandIn, list[Google]],
    partner: StandIn, runtime_dir: Path, pki: Pki, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sections = parse_runbook(DOC.read_text())
    c, d = sections["C"], sections["D"]
    keys, secrets = tmp_path / "keys", tmp_path / "google"
    keys.mkdir(mode=0o700)
    secrets.mkdir(mode=0o700)
    for name, kid in (("partner-sig-a", "partner-sig-2026"), ("partner-enc-a",
                                                              "partner-enc-2026")):
        write_jwk(keys / f"{kid}.private.jwk", jose_keys.jwk(name), kid)
        write_jwk(keys / f"{kid}.public.jwk", jose_keys.public_jwk(name), kid)
    for name, kid in (("google-sig-a", "google-sig-2026"), ("google-enc-a", "google-enc-2026")):
        write_jwk(secrets / f"{kid}.jwk", jose_keys.jwk(name), kid)
        write_jwk(keys / f"{kid}.public.jwk", jose_keys.public_jwk(name), kid)
    monkeypatch.chdir(tmp_path)
    server, side = google_server
    google = JoseGoogle(node_jose, secrets, keys)
    side.append(google)

    async def google_takes_on_our_new_keys() -> None:  # C3
        google.trusted.append(keys / "partner-sig-2027.public.jwk")
        google.encrypt_to = keys / "partner-enc-2027.public.jwk"

    async def google_publishes_its_new_keys() -> None:  # D1
        for name, kid in (("google-sig-b", "google-sig-2027"),
                          ("google-enc-b", "google-enc-2027")):
            write_jwk(secrets / f"{kid}.jwk", jose_keys.jwk(name), kid)
            write_jwk(keys / f"{kid}.public.jwk", public_jwk(jose_keys.jwk(name)), kid)

    async def google_signs_with_its_new_key() -> None:  # D3
        google.sign_with = secrets / "google-sig-2027.jwk"

    text = first_config(tmp_path, runtime_dir, pki, partner.url, server.url, c)
    async with running_gateway(tmp_path, text) as gateway:
        runner = Runner(gateway, tmp_path, Traffic(gateway, pki, google))
        await run_runbook(runner, [c, d], {
            "C3": google_takes_on_our_new_keys, "D1": google_publishes_its_new_keys,
            "D3": google_signs_with_its_new_key})
        final = gateway.current.snapshot.keysets
        assert [k.id for k in final["partner"].keys] == ["partner-sig-2027", "partner-enc-2027"]
        assert [k.id for k in final["google"].keys] == ["google-sig-2027", "google-enc-2027"]
    check_outcome(runner, [c, d], reloads=8)
    assert sum("echo ok" in output for output in runner.outputs) == 2
    assert not (keys / "partner-sig-2026.private.jwk").exists()
