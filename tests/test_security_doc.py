"""docs/security.md names the test that proves each mitigation: every name must exist."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# `test_x.py::test_y`, `::test_y` (same file as the name before it) or `test_x.py` alone.
REFERENCE = re.compile(r"`(test_[a-z0-9_]+\.py)?(?:::(test_[a-z0-9_]+))?`")


def names_of_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {node.name for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.name.startswith("test_")}


def test_every_test_the_threat_model_names_exists() -> None:
    text = (ROOT / "docs" / "security.md").read_text()
    current: str | None = None
    named: list[tuple[str, str | None]] = []
    for match in REFERENCE.finditer(text):
        file, test = match.groups()
        if file is None and test is None:
            continue
        current = file or current
        assert current is not None, f"::{test} follows no test file"
        named.append((current, test))
    assert len(named) > 60
    missing = []
    for file, test in named:
        path = ROOT / "tests" / file
        if not path.exists():
            missing.append(file)
        elif test is not None and test not in names_of_tests(path):
            missing.append(f"{file}::{test}")
    assert missing == []
    for script in re.findall(r"`(bench/[a-z_]+\.py)`", text):
        assert (ROOT / script).exists(), script
