"""Load config.yaml into frozen, validated dataclasses; every error names its place.

Only plain data is checked here (types, ranges, files that exist, cross references). Key
material is parsed by the PGP and JOSE modules when a snapshot is built.
"""

from __future__ import annotations

import enum
import functools
import hashlib
import ipaddress
import math
import os
import re
import socket
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Literal
from urllib.parse import SplitResult, urlsplit

import yaml

from gateway.errors import ConfigError

Scheme = Literal["pgp", "jose"]
Direction = Literal["inbound", "outbound"]

JWS_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512")
JWE_KEY_ALGS = (
    "RSA-OAEP-256",
    "RSA-OAEP",
    "ECDH-ES",
    "ECDH-ES+A128KW",
    "ECDH-ES+A192KW",
    "ECDH-ES+A256KW",
)
JWE_LEGACY_KEY_ALGS = ("RSA1_5",)
JWE_ENCS = ("A256GCM", "A128GCM", "A256CBC-HS512", "A128CBC-HS256", "A192GCM", "A192CBC-HS384")
DEFAULT_JWE_ENCS = ("A256GCM", "A128GCM", "A256CBC-HS512", "A128CBC-HS256")
PGP_DIGESTS = ("SHA256", "SHA384", "SHA512")
PGP_CIPHERS = ("AES128", "AES192", "AES256")
PGP_COMPRESSIONS = ("none", "zip", "zlib")
PGP_ENGINES = ("gnupg", "native")
LOG_LEVELS = ("debug", "info", "warning", "error")
MAX_WARN_EXPIRY_DAYS = 3650  # ten years: a warning window, and within datetime's range
TLS_VERSIONS = ("1.2", "1.3")


class KeyState(enum.Enum):
    """A key's state, protocol.md section 8."""

    ACTIVE = "active"
    READ_ONLY = "read-only"
    DISABLED = "disabled"


@dataclass(frozen=True)
class KeyConfig:
    id: str
    file: Path
    state: KeyState
    place: str
    passphrase_file: Path | None = None
    passphrase_env: str | None = None
    passphrase: str | None = field(default=None, repr=False, compare=False)
    use: Literal["sig", "enc"] | None = None
    not_after: datetime | None = None


@dataclass(frozen=True)
class KeysetConfig:
    name: str
    type: Scheme
    keys: tuple[KeyConfig, ...]
    place: str


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None
    min_version: str = "1.2"


@dataclass(frozen=True)
class UpstreamConfig:
    url: str
    timeout_s: float = 30.0
    ca: Path | None = None
    proxy: str | None = None
    client_cert: Path | None = None
    client_key: Path | None = None


@dataclass(frozen=True)
class PgpOptions:
    armor: bool = False
    base64_padding: bool = False
    compression: Literal["none", "zip", "zlib"] = "none"
    digest: str = "SHA384"
    cipher: str = "AES256"
    engine: Literal["gnupg", "native"] = "gnupg"


@dataclass(frozen=True)
class JoseOptions:
    sign_alg: str = "RS256"
    key_alg: str = "RSA-OAEP-256"
    enc: str = "A256GCM"
    accept_sign_algs: tuple[str, ...] = JWS_ALGS
    accept_key_algs: tuple[str, ...] = JWE_KEY_ALGS
    accept_encs: tuple[str, ...] = DEFAULT_JWE_ENCS
    allow_zip: bool = False


@dataclass(frozen=True)
class RouteConfig:
    name: str
    direction: Direction
    listen: ListenAddress
    upstream: UpstreamConfig
    own_keys: str
    peer_keys: str
    scheme: Scheme
    place: str
    allow_plaintext: bool = False
    tls: ServerTls | None = None
    pgp: PgpOptions = PgpOptions()
    jose: JoseOptions = JoseOptions()


# Enough queued work to keep every crypto thread busy (a few per core would do) without letting
# latency and memory grow with the backlog: at RSA-2048 one core seals and opens ~250 JOSE
# round trips/s, so 16 waiting per core add <= ~64 ms; each request in flight with a 64 KiB body
# holds ~0.8 MiB (bench/README.md, memory).
INFLIGHT_PER_CORE = 16


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1048576
    max_inflight: int | None = None
    max_connections: int = 1024
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    send_timeout_s: float = 30.0  # beyond config.md: to send an answer (slow readers)
    idle_timeout_s: float = 60.0
    max_header_bytes: int = 16384
    max_headers: int = 64

    @property
    def inflight(self) -> int:
        """The in-flight cap in force: the configured one, else INFLIGHT_PER_CORE per core."""
        if self.max_inflight is not None:
            return self.max_inflight
        return INFLIGHT_PER_CORE * usable_cores()


@dataclass(frozen=True)
class Config:
    path: Path
    keysets: Mapping[str, KeysetConfig]
    routes: tuple[RouteConfig, ...]
    admin_listen: ListenAddress = ListenAddress("127.0.0.1", 9090)
    log_level: str = "info"
    runtime_dir: Path = field(
        default_factory=lambda: Path(tempfile.gettempdir()) / f"gateway-{os.getuid()}"
    )
    reload_interval_s: float = 5.0
    limits: Limits = Limits()
    workers: int = 1
    pin_workers: bool = False
    batch_scheduling: bool = False
    drain_delay_s: float = 0.0
    shutdown_timeout_s: float = 30.0
    warn_expiry_days: int = 30
    # Set when loaded from a mirror (mirror.py): every file it names is read under this
    # directory, at its absolute path below it; `path` and files() name the originals.
    root: Path | None = None

    def files(self) -> tuple[Path, ...]:
        """Every file this configuration names (for reload's content hashes), config first:
        the operator's files, also when the configuration was loaded from a mirror."""
        paths: list[Path] = [self.path]
        for keyset in self.keysets.values():
            for key in keyset.keys:
                paths.append(key.file)
                if key.passphrase_file:
                    paths.append(key.passphrase_file)
        for route in self.routes:
            if route.tls:
                paths += [route.tls.cert, route.tls.key]
                if route.tls.client_ca:
                    paths.append(route.tls.client_ca)
            up = route.upstream
            paths += [p for p in (up.ca, up.client_cert, up.client_key) if p]
        if self.root is not None:
            paths[1:] = [Path("/") / p.relative_to(self.root) for p in paths[1:]]
        return tuple(dict.fromkeys(paths))


@functools.cache
def usable_cores() -> int:
    """Cores this process may use: its CPU affinity, capped by a cgroup v2 CPU quota (a
    Kubernetes CPU limit) rounded up, at least 1. Read once per process: it is asked on every
    request."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    quota = cpu_quota()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cpu_quota() -> float | None:
    """This cgroup's CPU quota in cores (cgroup v2 `cpu.max`: a Kubernetes CPU limit), or None
    when there is none or it cannot be read (cgroup v1 is not read)."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError, ZeroDivisionError):
        return None


def files_digest(paths: tuple[Path, ...]) -> str:
    """SHA-256 over the contents of `paths` (a missing file counts as its own state)."""
    return combined_digest(file_digests(paths))


def combined_digest(digests: dict[Path, str]) -> str:
    """files_digest of what file_digests returned."""
    digest = hashlib.sha256()
    for path, each in digests.items():
        digest.update(str(path).encode() + b"\0" + each.encode())
    return digest.hexdigest()


def file_digests(paths: tuple[Path, ...]) -> dict[Path, str]:
    """Each file's SHA-256 (or its errno, for one that cannot be read)."""
    digests = {}
    for path in paths:
        try:
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            digests[path] = f"missing:{exc.errno}"
    return digests


class _Loader(yaml.SafeLoader):
    """yaml.safe_load without YAML 1.1's implicit timestamps: an unquoted date stays text and is
    checked, with its place, by _timestamp (PyYAML raised a bare ValueError, with no place,
    for an impossible one such as 2027-02-30)."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_config(path: str | Path, environ: Mapping[str, str] | None = None,
                root: Path | None = None) -> Config:
    """Read and check the YAML file at `path`. Raises ConfigError naming the place. With
    `root`, the config file and every file it names are read at their absolute paths under
    `root` (a mirror, mirror.py), while messages and Config.files() name the originals."""
    path = Path(path).absolute()
    reader = _Reader(path.parent, os.environ if environ is None else environ, root)
    try:
        try:
            text = reader.under_root(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("", f"cannot read config file '{path}': {exc.strerror}") from None
        try:
            data = yaml.load(text, Loader=_Loader)  # noqa: S506 - SafeLoader less timestamps
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError("", f"'{path}' is not valid YAML{where}") from None
        return replace(_parse(reader, data, path), root=root)
    except ConfigError as exc:
        exc.files = tuple(dict.fromkeys((path, *reader.paths)))
        raise


def parse_config(data: Any, path: Path, environ: Mapping[str, str]) -> Config:
    """Check already-parsed YAML data; relative paths resolve against `path`'s directory."""
    return _parse(_Reader(path.parent, environ), data, path)


def _parse(reader: _Reader, data: Any, path: Path) -> Config:
    """parse_config with `reader`, which notes every file named on the way."""
    root = reader.mapping(data, "")
    keysets_node = root.required("keysets")
    keysets = {
        name: _keyset(reader, name, node)
        for name, node in reader.named_mapping(keysets_node, "keysets").items()
    }
    if not keysets:
        raise ConfigError("keysets", "at least one keyset is required")
    admin = reader.mapping(root.optional("admin", {}), "admin")
    admin_listen = reader.listen(admin.optional("listen", "127.0.0.1:9090"), "admin.listen")
    admin.finish()
    reload_node = reader.mapping(root.optional("reload", {}), "reload")
    reload_interval = reader.number(reload_node.optional("interval_s", 5), "reload.interval_s", 0)
    reload_node.finish()
    routes_node = root.required("routes")
    if not isinstance(routes_node, list) or not routes_node:
        raise ConfigError("routes", "a list of at least one route is required")
    routes = tuple(
        _route(reader, index, node, keysets) for index, node in enumerate(routes_node)
    )
    runtime = root.optional("runtime_dir", None)
    config = Config(
        path=path,
        keysets=keysets,
        routes=routes,
        admin_listen=admin_listen,
        log_level=reader.choice(root.optional("log_level", "info"), "log_level", LOG_LEVELS),
        runtime_dir=(
            reader.path(runtime, "runtime_dir", must_exist=False)
            if runtime is not None
            else Path(tempfile.gettempdir()) / f"gateway-{os.getuid()}"
        ),
        reload_interval_s=reload_interval,
        limits=_limits(reader, root.optional("limits", {})),
        workers=_workers(reader, root.optional("workers", 1)),
        pin_workers=reader.boolean(root.optional("pin_workers", False), "pin_workers"),
        batch_scheduling=reader.boolean(root.optional("batch_scheduling", False),
                                        "batch_scheduling"),
        drain_delay_s=reader.number(root.optional("drain_delay_s", 0), "drain_delay_s", 0),
        shutdown_timeout_s=reader.number(
            root.optional("shutdown_timeout_s", 30), "shutdown_timeout_s", 0
        ),
        warn_expiry_days=int(
            reader.number(root.optional("warn_expiry_days", 30), "warn_expiry_days", 0,
                          MAX_WARN_EXPIRY_DAYS)
        ),
    )
    root.finish()
    _check_listeners(config)
    return config


def _keyset(reader: _Reader, name: str, node: Any) -> KeysetConfig:
    place = f"keysets.{name}"
    ks = reader.mapping(node, place)
    kind = reader.choice(ks.required("type"), f"{place}.type", ("pgp", "jose"))
    keys_node = ks.required("keys")
    if not isinstance(keys_node, list) or not keys_node:
        raise ConfigError(f"{place}.keys", "a list of at least one key is required")
    keys = tuple(
        _key(reader, f"{place}.keys[{i}]", item, kind) for i, item in enumerate(keys_node)
    )
    seen: set[str] = set()
    for key in keys:
        if key.id in seen:
            raise ConfigError(f"{key.place}.id", f"duplicate key id '{key.id}' in keyset '{name}'")
        seen.add(key.id)
    ks.finish()
    return KeysetConfig(name=name, type=kind, keys=keys, place=place)  # type: ignore[arg-type]


_KEY_ID = re.compile(r"^[A-Za-z0-9._:@+-]{1,128}$")


def _key(reader: _Reader, place: str, node: Any, kind: str) -> KeyConfig:
    k = reader.mapping(node, place)
    key_id = reader.string(k.required("id"), f"{place}.id")
    if not _KEY_ID.match(key_id):
        raise ConfigError(
            f"{place}.id", f"'{key_id}' is not a valid key id (1-128 of A-Z a-z 0-9 . _ : @ + -)"
        )
    file = reader.path(k.required("file"), f"{place}.file")
    state_text = reader.choice(
        k.optional("state", "active"), f"{place}.state", tuple(s.value for s in KeyState)
    )
    passphrase_file_node = k.optional("passphrase_file", None)
    passphrase_env_node = k.optional("passphrase_env", None)
    if passphrase_file_node is not None and passphrase_env_node is not None:
        raise ConfigError(place, "give passphrase_file or passphrase_env, not both")
    passphrase: str | None = None
    passphrase_file: Path | None = None
    passphrase_env: str | None = None
    if passphrase_file_node is not None:
        passphrase_file = reader.path(passphrase_file_node, f"{place}.passphrase_file")
        try:
            passphrase = passphrase_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            raise ConfigError(
                f"{place}.passphrase_file", f"cannot read '{passphrase_file_node}'"
            ) from None
        passphrase = passphrase.removesuffix("\n").removesuffix("\r")
    if passphrase_env_node is not None:
        passphrase_env = reader.string(passphrase_env_node, f"{place}.passphrase_env")
        if passphrase_env not in reader.environ:
            raise ConfigError(
                f"{place}.passphrase_env", f"environment variable '{passphrase_env}' is not set"
            )
        passphrase = reader.environ[passphrase_env]
    use_node = k.optional("use", None)
    use = None if use_node is None else reader.choice(use_node, f"{place}.use", ("sig", "enc"))
    if use is not None and kind != "jose":
        raise ConfigError(f"{place}.use", "only jose keys have a 'use'")
    not_after_node = k.optional("not_after", None)
    not_after = (
        None if not_after_node is None else _timestamp(not_after_node, f"{place}.not_after")
    )
    k.finish()
    return KeyConfig(
        id=key_id,
        file=file,
        state=KeyState(state_text),
        place=place,
        passphrase_file=passphrase_file,
        passphrase_env=passphrase_env,
        passphrase=passphrase,
        use=use,  # type: ignore[arg-type]
        not_after=not_after,
    )


def _timestamp(node: Any, place: str) -> datetime:
    if isinstance(node, datetime):
        value = node
    elif isinstance(node, date):
        value = datetime(node.year, node.month, node.day)
    elif isinstance(node, str):
        try:
            value = datetime.fromisoformat(node.replace("Z", "+00:00"))
        except ValueError:
            raise ConfigError(place, f"'{node}' is not an ISO-8601 date or date-time") from None
    else:
        raise ConfigError(place, "expected an ISO-8601 date or date-time")
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _route(
    reader: _Reader, index: int, node: Any, keysets: Mapping[str, KeysetConfig]
) -> RouteConfig:
    place = f"routes[{index}]"
    r = reader.mapping(node, place)
    name = reader.string(r.required("name"), f"{place}.name")
    if not re.match(r"^[A-Za-z0-9._-]{1,64}$", name):
        raise ConfigError(f"{place}.name", f"'{name}' must be 1-64 of A-Z a-z 0-9 . _ -")
    direction = reader.choice(
        r.required("direction"), f"{place}.direction", ("inbound", "outbound")
    )
    listen = reader.listen(r.required("listen"), f"{place}.listen")
    allow_plaintext = reader.boolean(
        r.optional("allow_plaintext", False), f"{place}.allow_plaintext"
    )
    tls_node = r.optional("tls", None)
    tls = None if tls_node is None else _server_tls(reader, f"{place}.tls", tls_node)
    if tls is None and not listen.is_loopback and not allow_plaintext:
        raise ConfigError(
            f"{place}.listen",
            f"plain HTTP listener on non-loopback address '{listen}': add 'tls:' or set "
            "'allow_plaintext: true'",
        )
    upstream = _upstream(reader, f"{place}.upstream", r.required("upstream"))
    own = reader.string(r.required("own_keys"), f"{place}.own_keys")
    peer = reader.string(r.required("peer_keys"), f"{place}.peer_keys")
    for field_name, ref in (("own_keys", own), ("peer_keys", peer)):
        if ref not in keysets:
            raise ConfigError(
                f"{place}.{field_name}",
                f"no keyset named '{ref}' (keysets: {', '.join(sorted(keysets))})",
            )
    if own == peer:
        raise ConfigError(f"{place}.peer_keys", "own_keys and peer_keys must be different keysets")
    scheme = keysets[own].type
    if keysets[peer].type != scheme:
        raise ConfigError(
            f"{place}.peer_keys",
            f"keyset '{peer}' is {keysets[peer].type} but own_keys '{own}' is {scheme}; "
            "both must have the same type",
        )
    pgp_node = r.optional("pgp", None)
    jose_node = r.optional("jose", None)
    if scheme == "pgp" and jose_node is not None:
        raise ConfigError(f"{place}.jose", "this route's keysets are pgp: use a 'pgp:' block")
    if scheme == "jose" and pgp_node is not None:
        raise ConfigError(f"{place}.pgp", "this route's keysets are jose: use a 'jose:' block")
    pgp = _pgp(reader, f"{place}.pgp", pgp_node) if pgp_node is not None else PgpOptions()
    jose = _jose(reader, f"{place}.jose", jose_node) if jose_node is not None else JoseOptions()
    r.finish()
    return RouteConfig(
        name=name,
        direction=direction,  # type: ignore[arg-type]
        listen=listen,
        upstream=upstream,
        own_keys=own,
        peer_keys=peer,
        scheme=scheme,
        place=place,
        allow_plaintext=allow_plaintext,
        tls=tls,
        pgp=pgp,
        jose=jose,
    )


def _server_tls(reader: _Reader, place: str, node: Any) -> ServerTls:
    t = reader.mapping(node, place)
    ca = t.optional("client_ca", None)
    tls = ServerTls(
        cert=reader.path(t.required("cert"), f"{place}.cert"),
        key=reader.path(t.required("key"), f"{place}.key"),
        client_ca=None if ca is None else reader.path(ca, f"{place}.client_ca"),
        min_version=reader.choice(
            str(t.optional("min_version", "1.2")), f"{place}.min_version", TLS_VERSIONS
        ),
    )
    t.finish()
    return tls


def shown_url(url: str) -> str:
    """`url` as an error or `check` may show it: everything between the scheme and the last
    '@' (a user:password@ part, which may come from ${ENV}, a Secret, and may hold '/' or
    '@' itself) replaced by ***@. Masking a path's '@' too is the safe side."""
    return re.sub(r"^([A-Za-z][A-Za-z0-9+.-]*://)?.*@", r"\1***@", url, flags=re.DOTALL)


def _split_url(url: str, place: str) -> SplitResult:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - parsed on access: a bad port raises here
    except ValueError:
        raise ConfigError(place, f"'{shown_url(url)}' is not a URL") from None
    return parts


def _upstream(reader: _Reader, place: str, node: Any) -> UpstreamConfig:
    u = reader.mapping(node, place)
    url = reader.string(u.required("url"), f"{place}.url")
    parts = _split_url(url, f"{place}.url")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{place}.url",
                          f"'{shown_url(url)}' is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment:
        raise ConfigError(f"{place}.url", f"'{shown_url(url)}' must not have a query or fragment")
    proxy = u.optional("proxy", None)
    if proxy is not None:
        proxy = reader.string(proxy, f"{place}.proxy")
        pparts = _split_url(proxy, f"{place}.proxy")
        if pparts.scheme != "http" or not pparts.hostname:
            raise ConfigError(f"{place}.proxy",
                              f"'{shown_url(proxy)}' is not an http:// proxy URL")
    ca = u.optional("ca", None)
    cert = u.optional("client_cert", None)
    key = u.optional("client_key", None)
    if (cert is None) != (key is None):
        raise ConfigError(place, "client_cert and client_key go together")
    if parts.scheme == "http" and (ca is not None or cert is not None):
        raise ConfigError(place, "ca, client_cert and client_key need an https:// url")
    upstream = UpstreamConfig(
        url=url.rstrip("/"),
        timeout_s=reader.number(u.optional("timeout_s", 30), f"{place}.timeout_s", 0.001),
        ca=None if ca is None else reader.path(ca, f"{place}.ca"),
        proxy=proxy,
        client_cert=None if cert is None else reader.path(cert, f"{place}.client_cert"),
        client_key=None if key is None else reader.path(key, f"{place}.client_key"),
    )
    u.finish()
    return upstream


def _pgp(reader: _Reader, place: str, node: Any) -> PgpOptions:
    p = reader.mapping(node, place)
    options = PgpOptions(
        armor=reader.boolean(p.optional("armor", False), f"{place}.armor"),
        base64_padding=reader.boolean(
            p.optional("base64_padding", False), f"{place}.base64_padding"
        ),
        compression=reader.choice(  # type: ignore[arg-type]
            p.optional("compression", "none"), f"{place}.compression", PGP_COMPRESSIONS
        ),
        digest=reader.choice(p.optional("digest", "SHA384"), f"{place}.digest", PGP_DIGESTS),
        cipher=reader.choice(p.optional("cipher", "AES256"), f"{place}.cipher", PGP_CIPHERS),
        engine=reader.choice(  # type: ignore[arg-type]
            p.optional("engine", "gnupg"), f"{place}.engine", PGP_ENGINES
        ),
    )
    p.finish()
    return options


def _jose(reader: _Reader, place: str, node: Any) -> JoseOptions:
    j = reader.mapping(node, place)
    accept_key_choices = JWE_KEY_ALGS + JWE_LEGACY_KEY_ALGS
    options = JoseOptions(
        sign_alg=reader.choice(j.optional("sign_alg", "RS256"), f"{place}.sign_alg", JWS_ALGS),
        key_alg=reader.choice(
            j.optional("key_alg", "RSA-OAEP-256"), f"{place}.key_alg", JWE_KEY_ALGS
        ),
        enc=reader.choice(j.optional("enc", "A256GCM"), f"{place}.enc", JWE_ENCS),
        accept_sign_algs=reader.choices(
            j.optional("accept_sign_algs", list(JWS_ALGS)), f"{place}.accept_sign_algs", JWS_ALGS
        ),
        accept_key_algs=reader.choices(
            j.optional("accept_key_algs", list(JWE_KEY_ALGS)),
            f"{place}.accept_key_algs",
            accept_key_choices,
        ),
        accept_encs=reader.choices(
            j.optional("accept_encs", list(DEFAULT_JWE_ENCS)), f"{place}.accept_encs", JWE_ENCS
        ),
        allow_zip=reader.boolean(j.optional("allow_zip", False), f"{place}.allow_zip"),
    )
    j.finish()
    return options


def _limits(reader: _Reader, node: Any) -> Limits:
    place = "limits"
    m = reader.mapping(node, place)
    inflight = m.optional("max_inflight", None)
    limits = Limits(
        max_body_bytes=reader.integer(
            m.optional("max_body_bytes", 1048576), f"{place}.max_body_bytes", 1
        ),
        max_inflight=None if inflight is None else reader.integer(
            inflight, f"{place}.max_inflight", 1
        ),
        max_connections=reader.integer(
            m.optional("max_connections", 1024), f"{place}.max_connections", 1
        ),
        header_timeout_s=reader.number(
            m.optional("header_timeout_s", 10), f"{place}.header_timeout_s", 0.001
        ),
        body_timeout_s=reader.number(
            m.optional("body_timeout_s", 30), f"{place}.body_timeout_s", 0.001
        ),
        send_timeout_s=reader.number(
            m.optional("send_timeout_s", 30), f"{place}.send_timeout_s", 0.001
        ),
        idle_timeout_s=reader.number(
            m.optional("idle_timeout_s", 60), f"{place}.idle_timeout_s", 0.001
        ),
        max_header_bytes=reader.integer(
            m.optional("max_header_bytes", 16384), f"{place}.max_header_bytes", 256
        ),
        max_headers=reader.integer(m.optional("max_headers", 64), f"{place}.max_headers", 1),
    )
    m.finish()
    return limits


def _workers(reader: _Reader, node: Any) -> int:
    if node == "auto":
        return usable_cores()
    return reader.integer(node, "workers", 1)


def _check_listeners(config: Config) -> None:
    """Route names are unique, and no two listeners bind the same port on a shared address:
    compared by what they bind, not as written ('localhost' and '127.0.0.1', or a wildcard and
    anything, on one port clash when `run` binds them)."""
    admin = config.admin_listen
    seen = [(admin.port, _bound_addresses(admin, "admin.listen"), "admin")]
    names: set[str] = set()
    for route in config.routes:
        if route.name in names:
            raise ConfigError(f"{route.place}.name", f"duplicate route name '{route.name}'")
        names.add(route.name)
        place = f"{route.place}.listen"
        addresses = _bound_addresses(route.listen, place)
        for port, others, who in seen:
            if route.listen.port == port != 0 and (
                    addresses is None or others is None or addresses & others):
                raise ConfigError(place, f"'{route.listen}' is already used by {who}")
        seen.append((route.listen.port, addresses, f"route '{route.name}'"))


def _bound_addresses(listen: ListenAddress, place: str) -> frozenset[str] | None:
    """The addresses binding `listen` takes, None for a wildcard (all of them). A host name is
    resolved as `run` will resolve it. Raises ConfigError when it does not resolve."""
    try:
        found = {ipaddress.ip_address(listen.host)}
    except ValueError:
        try:
            infos = socket.getaddrinfo(listen.host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise ConfigError(place, f"'{listen.host}' does not resolve to an address") \
                from None
        found = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    if any(address.is_unspecified for address in found):
        return None
    return frozenset(str(address) for address in found)


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class _Reader:
    """Typed access to YAML nodes; substitutes ${ENV} and resolves relative paths."""

    def __init__(self, base: Path, environ: Mapping[str, str], root: Path | None = None) -> None:
        self.base = base
        self.environ = environ
        self.root = root
        self.paths: list[Path] = []  # every file named so far, there or not (the originals)

    def under_root(self, path: Path) -> Path:
        """Where an (absolute) file named by the configuration is read."""
        return path if self.root is None else self.root / path.relative_to(path.anchor)

    def mapping(self, node: Any, place: str) -> _Mapping:
        if not isinstance(node, dict):
            raise ConfigError(place or "(top level)", "expected a mapping")
        return _Mapping(node, place)

    def named_mapping(self, node: Any, place: str) -> dict[str, Any]:
        if not isinstance(node, dict):
            raise ConfigError(place, "expected a mapping of names")
        for name in node:
            if not isinstance(name, str) or not re.match(r"^[A-Za-z0-9._-]{1,64}$", name):
                raise ConfigError(f"{place}.{name}", "names are 1-64 of A-Z a-z 0-9 . _ -")
        return node

    def string(self, node: Any, place: str) -> str:
        if not isinstance(node, str) or not node:
            raise ConfigError(place, f"expected a non-empty string, found {_show(node)}")

        def substitute(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in self.environ:
                raise ConfigError(place, f"environment variable '{name}' is not set")
            return self.environ[name]

        return _ENV.sub(substitute, node)

    def choice(self, node: Any, place: str, allowed: tuple[str, ...]) -> str:
        value = self.string(node, place)
        if value not in allowed:
            raise ConfigError(place, f"'{value}' is not one of: {', '.join(allowed)}")
        return value

    def choices(self, node: Any, place: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        if not isinstance(node, list) or not node:
            raise ConfigError(place, "expected a non-empty list")
        return tuple(self.choice(item, f"{place}[{i}]", allowed) for i, item in enumerate(node))

    def boolean(self, node: Any, place: str) -> bool:
        if not isinstance(node, bool):
            raise ConfigError(place, f"expected true or false, found {_show(node)}")
        return node

    def number(self, node: Any, place: str, minimum: float,
               maximum: float = math.inf) -> float:
        if isinstance(node, str):
            node = self._numeric(node, place)
        # NaN compares false with everything: it passed `< minimum` and broke timers in `run`.
        if isinstance(node, bool) or not isinstance(node, int | float) \
                or not math.isfinite(node) or not minimum <= node <= maximum:
            bound = f">= {minimum}" if maximum == math.inf else f"from {minimum} to {maximum}"
            raise ConfigError(place, f"expected a number {bound}, found {_show(node)}")
        return float(node)

    def integer(self, node: Any, place: str, minimum: int) -> int:
        if isinstance(node, str):
            node = self._numeric(node, place)
        if isinstance(node, bool) or not isinstance(node, int) or node < minimum:
            raise ConfigError(place, f"expected a whole number >= {minimum}, found {_show(node)}")
        return node

    def _numeric(self, node: str, place: str) -> Any:
        text = self.string(node, place)
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text

    def path(self, node: Any, place: str, must_exist: bool = True) -> Path:
        text = self.string(node, place)
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = self.base / path
        if not must_exist:
            return path  # a place to create (runtime_dir): never under a mirror's root
        self.paths.append(path)
        path = self.under_root(path)
        if not path.is_file():
            raise ConfigError(place, f"no such file '{text}'")
        return path

    def listen(self, node: Any, place: str) -> ListenAddress:
        text = self.string(node, place)
        match = re.match(r"^(?:\[([0-9A-Fa-f:.]+)\]|([^:\[\]]+)):(\d{1,5})$", text)
        if not match:
            raise ConfigError(place, f"'{text}' is not host:port (IPv6 as [::1]:port)")
        host = match.group(1) or match.group(2)
        port = int(match.group(3))
        if port > 65535:
            raise ConfigError(place, f"port {port} is out of range")
        if match.group(1):
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise ConfigError(place, f"'{host}' is not an IPv6 address") from None
        return ListenAddress(host, port)


class _Mapping:
    """One YAML mapping: remembers which fields were read so unknown ones are errors."""

    _MISSING = object()

    def __init__(self, data: dict[Any, Any], place: str) -> None:
        self._data = data
        self._place = place
        self._read: set[str] = set()

    def _at(self, name: str) -> str:
        return f"{self._place}.{name}" if self._place else name

    def required(self, name: str) -> Any:
        self._read.add(name)
        if name not in self._data or self._data[name] is None:
            raise ConfigError(self._at(name), "is required")
        return self._data[name]

    def optional(self, name: str, default: Any) -> Any:
        self._read.add(name)
        value = self._data.get(name, default)
        return default if value is None else value

    def finish(self) -> None:
        for name in self._data:
            if name not in self._read:
                allowed = ", ".join(sorted(self._read))
                raise ConfigError(self._at(str(name)), f"unknown field (allowed here: {allowed})")


def _show(node: Any) -> str:
    if node is None:
        return "nothing"
    if isinstance(node, str):
        return f"'{node}'"
    return type(node).__name__ if isinstance(node, dict | list) else repr(node)


def iter_keys(config: Config) -> Iterator[tuple[KeysetConfig, KeyConfig]]:
    """Every (keyset, key) pair of the configuration, in file order."""
    for keyset in config.keysets.values():
        for key in keyset.keys:
            yield keyset, key

