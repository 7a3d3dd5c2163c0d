"""Deployment test support: the Dockerfile read as the builder reads it, the k8s manifests, the
files a pod's volumes hold (laid out the way the kubelet lays them out), and key material made
for the configuration embedded in a ConfigMap."""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import trustme
import yaml

from gateway.jose import generate_jwk
from tests.pgp_fixtures import PgpKeys

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "k8s"
SHAPES = ("sidecar", "edge")
GATEWAY_CONTAINER = "cards-qr-gateway"
# k8s/monitoring/ (alert rules, dashboards) belongs to its own tests.
NOT_OURS = {"monitoring"}

# -- the Dockerfile -------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str
    line: int


def dockerfile(text: str | None = None) -> list[Instruction]:
    """Instructions in order: continuation lines joined, comment lines dropped (also inside a
    continuation, as the builder does)."""
    text = DOCKERFILE.read_text() if text is None else text
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        joined = " ".join(pending)
        pending = []
        keyword, _, args = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip(), start))
    assert not pending, "the Dockerfile ends inside a continuation"
    return instructions


def stages(instructions: list[Instruction]) -> dict[str, list[Instruction]]:
    """Instructions per stage name (`FROM ... AS name`), FROM included."""
    result: dict[str, list[Instruction]] = {}
    current: list[Instruction] | None = None
    for instruction in instructions:
        if instruction.keyword == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(result))
            current = result[name] = []
        if current is not None:
            current.append(instruction)
    return result


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    return list(stages(instructions).values())[-1]


def last(stage: list[Instruction], keyword: str) -> Instruction:
    found = [i for i in stage if i.keyword == keyword]
    assert found, f"no {keyword} in the final stage"
    return found[-1]


def exec_form(args: str) -> list[str]:
    """The JSON (exec) form of ENTRYPOINT/CMD; shell form is an error: with it `sh -c` would be
    PID 1 and swallow SIGTERM."""
    value = json.loads(args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def healthcheck_command(args: str) -> list[str]:
    """The command of `HEALTHCHECK [--options] CMD [...]` (exec form)."""
    words = args.split(" ", 1)
    options = []
    while words[0].startswith("--"):
        options.append(words[0])
        words = words[1].split(" ", 1)
    assert words[0] == "CMD", args
    return exec_form(words[1])


def image_env(stage: list[Instruction]) -> dict[str, str]:
    """ENV of a stage (`ENV k=v ...`, `$NAME` references to earlier values expanded; PATH
    starts from the base image's)."""
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for instruction in stage:
        if instruction.keyword != "ENV":
            continue
        for word in shlex.split(instruction.args):
            name, sep, value = word.partition("=")
            assert sep, f"line {instruction.line}: write ENV as name=value"
            for known, old in env.items():
                value = value.replace(f"${{{known}}}", old).replace(f"${known}", old)
            env[name] = value
    return env


def image_user(stage: list[Instruction]) -> tuple[int, int]:
    user, _, group = last(stage, "USER").args.partition(":")
    assert user.isdigit() and group.isdigit(), "USER must be numeric uid:gid (runAsNonRoot)"
    return int(user), int(group)


# -- the manifests ---------------------------------------------------------------------------


def manifest_files() -> list[Path]:
    """Every YAML file under k8s/ except the folders that are not ours."""
    return sorted(p for p in K8S.rglob("*.yaml")
                  if p.relative_to(K8S).parts[0] not in NOT_OURS)


def documents(path: Path) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in docs), path
    return docs


@dataclass
class Shape:
    """The objects of one deployment shape (a folder of k8s/)."""

    name: str
    objects: list[dict[str, Any]]

    @classmethod
    def load(cls, name: str) -> Shape:
        return cls(name, [d for p in sorted((K8S / name).glob("*.yaml")) for d in documents(p)])

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{self.name}: {len(found)} {kind} named {name}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        """The Deployment whose pods run the gateway container."""
        [found] = [d for d in self.all("Deployment") if any(
            c["name"] == GATEWAY_CONTAINER for c in d["spec"]["template"]["spec"]["containers"])]
        return found

    @property
    def pod(self) -> dict[str, Any]:
        return dict(self.deployment["spec"]["template"]["spec"])

    @property
    def container(self) -> dict[str, Any]:
        [found] = [c for c in self.pod["containers"] if c["name"] == GATEWAY_CONTAINER]
        return dict(found)

    def volume(self, name: str) -> dict[str, Any]:
        [found] = [v for v in self.pod["volumes"] if v["name"] == name]
        return dict(found)

    def mounts(self) -> dict[str, dict[str, Any]]:
        """The gateway container's mount path -> its volume."""
        return {m["mountPath"]: self.volume(m["name"]) for m in self.container["volumeMounts"]}

    def config_text(self, config_path: str) -> str:
        """The config file the container sees at `config_path`: a key of the ConfigMap mounted
        at its directory."""
        path = PurePosixPath(config_path)
        volume = self.mounts()[str(path.parent)]
        assert "configMap" in volume, f"{path.parent} is not a ConfigMap volume"
        configmap = self.one("ConfigMap", volume["configMap"]["name"])
        return str(configmap["data"][path.name])


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# -- a pod's volumes on this machine ---------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Where the container's mount paths lie here: `mount path -> root/<volume name>`."""

    root: Path
    mounts: dict[str, dict[str, Any]]

    def host(self, container_path: str) -> Path:
        """The local path of a path inside the container; AssertionError if no volume holds
        it (it would be on the read-only image filesystem)."""
        path = PurePosixPath(container_path)
        for mount in sorted(self.mounts, key=len, reverse=True):
            if path == PurePosixPath(mount) or PurePosixPath(mount) in path.parents:
                return self.root / self.mounts[mount]["name"] / path.relative_to(mount)
        raise AssertionError(f"{container_path} is on no volume of the gateway container")

    def volume_of(self, container_path: str) -> dict[str, Any]:
        volume_dir = self.host(container_path).relative_to(self.root).parts[0]
        [found] = [v for v in self.mounts.values() if v["name"] == volume_dir]
        return found

    def writable(self) -> list[Path]:
        return [self.root / v["name"] for v in self.mounts.values() if "emptyDir" in v]


def rewrite_paths(node: Any, rewrite: Callable[[str], str]) -> Any:
    """`node` with every absolute path string replaced by rewrite(path)."""
    if isinstance(node, dict):
        return {k: rewrite_paths(v, rewrite) for k, v in node.items()}
    if isinstance(node, list):
        return [rewrite_paths(v, rewrite) for v in node]
    if isinstance(node, str) and node.startswith("/"):
        return rewrite(node)
    return node


def write_projected(directory: Path, files: Mapping[str, bytes], *, mode: int,
                    gid: int | None = None) -> None:
    """Files as the kubelet projects a Secret or ConfigMap: in a timestamped directory, reached
    through `..data` and one symlink per name, all read-only. Called again on the same
    directory, it updates the volume as the kubelet does: a new timestamped directory, the
    `..data` symlink replaced in one rename, links for new names, the old directory removed.
    `gid` (when running as root) plays fsGroup."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    old = sorted(directory.glob("..20*"))
    stamp = directory / f"..2026_01_01_00_00_00.{len(old) + 1:09d}"
    stamp.mkdir()
    for name, data in files.items():
        target = stamp / name
        target.write_bytes(data)
        if gid is not None:
            shutil.chown(target, 0, gid)
        target.chmod(mode)
    stamp.chmod(0o555)
    (directory / "..data_tmp").symlink_to(stamp.name)
    (directory / "..data_tmp").replace(directory / "..data")
    for name in files:
        if not (directory / name).is_symlink():
            (directory / name).symlink_to(f"..data/{name}")
    for previous in old:
        previous.chmod(0o755)
        shutil.rmtree(previous)
    directory.chmod(0o555)


# -- key material for a configuration ---------------------------------------------------------


def gpg(home: Path, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        ["gpg", "--homedir", str(home), "--batch", "--no-tty", "--status-fd", "2",
         "--pinentry-mode", "loopback", *args],
        capture_output=True, timeout=120, check=True)


def make_pgp_key(keys: PgpKeys, name: str, passphrase: str | None, home: Path) -> None:
    """The README's recipe in a throwaway GNUPGHOME: RSA sign key + RSA encryption subkey, one
    year; writes `<name>.sec.asc`, `.pub.asc` and `.pass` (with a trailing newline) into
    keys.dir. The home's agent is stopped afterwards."""
    home.mkdir(mode=0o700)
    (home / "gpg-agent.conf").write_text("s2k-count 65536\n")  # little protection work: fast
    try:
        done = gpg(home, "--passphrase", passphrase or "", "--quick-gen-key",
                   f"{name} <{name}@partner.example>", "rsa2048", "sign", "1y")
        fingerprint = next(line.split()[3] for line in done.stderr.decode().splitlines()
                           if line.startswith("[GNUPG:] KEY_CREATED"))
        gpg(home, "--passphrase", passphrase or "", "--quick-add-key", fingerprint, "rsa2048",
            "encr", "1y")
        keys.pub(name).write_bytes(gpg(home, "--armor", "--export", fingerprint).stdout)
        keys.sec(name).write_bytes(gpg(home, "--passphrase", passphrase or "", "--armor",
                                       "--export-secret-keys", fingerprint).stdout)
    finally:
        subprocess.run(["gpgconf", "--homedir", str(home), "--kill", "gpg-agent"],
                       capture_output=True, timeout=30, check=False)
    keys.fingerprints[name] = fingerprint
    keys.passphrases[name] = passphrase
    if passphrase is not None:
        (keys.dir / f"{name}.pass").write_text(passphrase + "\n")


def pgp_keys_for(configs: list[dict[str, Any]], directory: Path) -> PgpKeys:
    """A key pair for every PGP key id the configurations name; a passphrase for those
    configured with one."""
    directory.mkdir(mode=0o700)
    keys = PgpKeys(dir=directory)
    wanted: dict[str, bool] = {}
    for config in configs:
        for keyset in config["keysets"].values():
            if keyset["type"] == "pgp":
                for key in keyset["keys"]:
                    protected = "passphrase_file" in key or "passphrase_env" in key
                    wanted[key["id"]] = wanted.get(key["id"], False) or protected
    for index, (name, protected) in enumerate(sorted(wanted.items())):
        make_pgp_key(keys, name, secrets.token_urlsafe(18) if protected else None,
                     directory / f"h{index}")
    return keys


@dataclass
class Material:
    """The files a configuration names (container path -> content) and the environment its
    passphrase_env entries need."""

    files: dict[str, bytes]
    env: dict[str, str]
    ca: trustme.CA


def material_for(config: dict[str, Any], pgp: PgpKeys, ca: trustme.CA) -> Material:
    """Make every file `config` names: PGP keys from `pgp` (own keysets get the secret key,
    peer keysets the public one), fresh JWKs for JOSE keys, certificates from `ca`."""
    own = {r["own_keys"] for r in config["routes"]}
    files: dict[str, bytes] = {}
    env: dict[str, str] = {}
    for keyset_name, keyset in config["keysets"].items():
        private = keyset_name in own
        for key in keyset["keys"]:
            if keyset["type"] == "pgp":
                files[key["file"]] = (pgp.sec if private else pgp.pub)(key["id"]).read_bytes()
                passphrase = pgp.passphrase(key["id"])
                if "passphrase_file" in key:
                    files[key["passphrase_file"]] = f"{passphrase}\n".encode()
                if "passphrase_env" in key:
                    env[key["passphrase_env"]] = str(passphrase)
            else:
                assert keyset["type"] == "jose", keyset_name
                private_jwk, public_jwk = generate_jwk(key["id"], key["use"])
                files[key["file"]] = (private_jwk if private else public_jwk).encode()
    for route in config["routes"]:
        tls = route.get("tls") or {}
        if "cert" in tls:
            server = ca.issue_cert("localhost", "127.0.0.1")
            files[tls["cert"]] = b"".join(p.bytes() for p in server.cert_chain_pems)
            files[tls["key"]] = server.private_key_pem.bytes()
        if tls.get("client_ca"):
            files[tls["client_ca"]] = ca.cert_pem.bytes()
        upstream = route["upstream"]
        if upstream.get("ca"):
            files[upstream["ca"]] = ca.cert_pem.bytes()
        if upstream.get("client_cert"):
            client = ca.issue_cert("partner-client.example")
            files[upstream["client_cert"]] = client.cert_chain_pems[0].bytes()
            files[upstream["client_key"]] = client.private_key_pem.bytes()
    return Material(files, env, ca)


def secret_files(layout: Layout, material: Material) -> dict[str, dict[str, bytes]]:
    """Secret volume name -> the files (by key) it must hold for `material`."""
    by_volume: dict[str, dict[str, bytes]] = {}
    for path, data in material.files.items():
        volume = layout.volume_of(path)
        assert "secret" in volume, f"{path}: key material must come from a Secret, " \
                                   f"not from volume {volume['name']!r}"
        relative = layout.host(path).relative_to(layout.root / volume["name"])
        assert len(relative.parts) == 1, f"{path}: a Secret's files lie flat in its volume"
        by_volume.setdefault(volume["name"], {})[relative.name] = data
    return by_volume
