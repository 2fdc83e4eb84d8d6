"""The core is sans-I/O: it imports nothing that does I/O, reads a clock, or starts a thread or process
(STYLE.md; the opening essay of core/node.py). Time and randomness are its inputs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

CORE = Path(__file__).resolve().parents[2] / "src" / "pyquorum" / "core"
# What the core may import. Anything else (time, os, socket, asyncio, signal, subprocess, threading,
# select, logging, pathlib, ...) would let a decision depend on the outside world.
ALLOWED = {"__future__", "enum", "random", "dataclasses", "collections.abc", "ipaddress", "typing", "math"}


def forbidden_imports(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module is not None:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            continue  # a relative import stays inside the core
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "__import__":
            names = ["__import__"]
        found += [n for n in names if n not in ALLOWED and not n.startswith("pyquorum.core")]
    return found


def test_the_checker_catches_io_imports() -> None:
    assert forbidden_imports("import time\nfrom os import path\nimport enum\n") == ["time", "os"]
    assert forbidden_imports("from pyquorum.runtime import daemon\n") == ["pyquorum.runtime"]
    assert forbidden_imports("x = __import__('socket')\n") == ["__import__"]


@pytest.mark.parametrize("module", sorted(CORE.glob("*.py")), ids=lambda p: p.name)
def test_core_module_imports_nothing_that_does_io(module: Path) -> None:
    assert forbidden_imports(module.read_text(encoding="utf-8")) == []


def test_the_core_uses_only_its_own_random_generator() -> None:
    """The node's seeded ``random.Random`` (an input), never the module's shared one."""
    for module in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(module.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "random"
            ):
                assert node.attr == "Random", f"{module.name}: random.{node.attr}"
