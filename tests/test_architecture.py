"""The architecture stays visible: import rules between layers, and shared data stays shared."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "rational_billing"
SHARED = ROOT.parent / "shared"


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def _modules() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_only_the_gateway_imports_stripe() -> None:
    """No module but adapters/stripe_gateway.py imports the stripe package."""
    offenders = [
        p.relative_to(PACKAGE).as_posix()
        for p in _modules()
        if any(m == "stripe" or m.startswith("stripe.") for m in _imports(p))
    ]
    assert offenders == ["adapters/stripe_gateway.py"]


def test_domain_imports_no_io() -> None:
    """The domain imports no driver, framework, HTTP client or other layer."""
    banned = ("stripe", "sqlalchemy", "psycopg", "requests", "smtplib", "flask", "django", "socket")
    for path in (PACKAGE / "domain").rglob("*.py"):
        for module in _imports(path):
            assert not module.startswith(banned), f"{path.name} imports {module}"
        text = path.read_text(encoding="utf-8")
        for layer in ("..services", "..adapters", "..storage", "..billing"):
            assert f"from {layer}" not in text, f"{path.name} reaches into {layer}"


def test_services_do_not_import_adapters() -> None:
    """Services talk to ports, never to a concrete adapter."""
    for path in (PACKAGE / "services").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for layer in ("..adapters", "..storage", "..billing"):
            assert f"from {layer}" not in text, f"services/{path.name} imports {layer}"


def test_library_never_imports_localstripe_or_test_tools() -> None:
    """Importing the library pulls in neither localstripe (GPL) nor pytest or hypothesis."""
    code = (
        "import sys, rational_billing, rational_billing.billing, rational_billing.testing;"
        "import rational_billing.storage.sql;"
        "bad = [m for m in ('localstripe', 'pytest', 'hypothesis', 'rational_billing.demo.localstripe_server')"
        " if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_no_shared_fixture_is_copied_into_the_project() -> None:
    """No file in the project has the same bytes as a file in ../shared (§4a.17)."""
    if not SHARED.is_dir():
        pytest.skip("../shared is not present next to this checkout")
    shared = {
        _digest(p)
        for folder in ("stripe-fixtures", "peer-fixtures")
        for p in (SHARED / folder).rglob("*")
        if p.is_file() and p.stat().st_size > 64
    }
    skip_dirs = {".git", ".venv", ".nox", "node_modules", "site", ".mypy_cache", ".ruff_cache"}
    copied = []
    for dirpath, dirnames, filenames in os.walk(ROOT):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        for name in filenames:
            path = Path(dirpath) / name
            if path.stat().st_size > 64 and _digest(path) in shared:
                copied.append(path.relative_to(ROOT).as_posix())
    assert copied == []
