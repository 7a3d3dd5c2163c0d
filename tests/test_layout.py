"""The house rules: dependencies point one way, each third-party library imported in one place."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"

# module -> the gateway modules it may import (app -> proxy -> snapshot -> pgp/jose/tls ->
# envelope/keys -> config -> errors).
ALLOWED = {
    "errors": set(),
    "b64url": {"errors"},
    "config": {"errors"},
    "keys": {"config", "errors"},
    "envelope": {"keys"},
    "armor": set(),
    "pgp": {"armor", "b64url", "config", "envelope", "errors", "keys"},
    "openpgp": {"armor", "b64url", "config", "envelope", "errors", "keys"},
    "jose": {"b64url", "config", "envelope", "errors", "keys"},
    "tls": {"config", "errors"},
    "scheduling": {"config", "errors"},
    "affinity": {"config", "errors", "scheduling"},
    "metrics": set(),
    "logs": set(),
    "snapshot": {"affinity", "config", "envelope", "errors", "jose", "keys", "openpgp", "pgp",
                 "scheduling", "tls"},
    "proxy": {"config", "envelope", "errors", "metrics", "snapshot"},
    "reload": {"config", "errors", "keys", "logs", "metrics", "snapshot"},
    "admin": {"keys", "metrics", "reload", "snapshot"},
    "mirror": {"config"},
    "hangup": set(),
    "supervisor": {"admin", "affinity", "config", "hangup", "logs", "metrics", "mirror", "reload",
                   "scheduling", "snapshot"},
    "upstream": set(),
    "app": {"admin", "affinity", "config", "hangup", "keys", "logs", "metrics", "mirror", "proxy",
            "reload", "scheduling", "snapshot", "supervisor", "upstream"},
    "demo": {"app", "config", "envelope", "errors", "jose", "keys", "logs", "metrics", "pgp",
             "snapshot", "tls"},
    "keytool": {"config", "envelope", "errors", "jose", "keys", "pgp", "snapshot"},
    "__main__": {"app", "config", "demo", "errors", "hangup", "keys", "keytool", "logs",
                 "snapshot"},
    "__init__": set(),
}
THIRD_PARTY_HOME = {
    "gnupg": {"pgp"},
    "jwcrypto": {"jose"},
    "pybase64": {"b64url"},
    "yaml": {"config"},
    "prometheus_client": {"metrics"},
    "aiohttp": {"proxy", "app", "demo", "keytool", "admin", "supervisor", "upstream"},
    "uvloop": {"__main__"},
}


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_every_module_is_in_the_map() -> None:
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(ALLOWED)


def test_dependencies_point_one_way() -> None:
    for path in PACKAGE.glob("*.py"):
        internal = {n.split(".")[1] for n in imports_of(path)
                    if n.startswith("gateway.") and n.count(".") >= 1}
        extra = internal - ALLOWED[path.stem]
        assert not extra, f"{path.stem} imports {extra}"


def test_third_party_libraries_have_one_home() -> None:
    for path in PACKAGE.glob("*.py"):
        for name in imports_of(path):
            top = name.split(".")[0]
            if top in THIRD_PARTY_HOME:
                assert path.stem in THIRD_PARTY_HOME[top], f"{path.stem} imports {top}"
