"""Developer sessions: ``nox -s tests``, ``lint``, ``typing``, ``docs``, ``demo``, ``bench``.

Each session makes its own virtual environment with the stdlib ``venv``
backend, because uv is not installed everywhere.
"""

from __future__ import annotations

from pathlib import Path

import nox

ROOT = Path(__file__).parent

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False
nox.options.sessions = ["tests", "lint", "typing", "docs"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite; extra arguments go to pytest (``nox -s tests -- -k webhooks``)."""
    session.install("-e", ".[dev]")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Check lint rules and formatting with ruff, without changing files."""
    session.install("ruff>=0.6")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typing(session: nox.Session) -> None:
    """Type-check the package with mypy --strict."""
    session.install("-e", ".[dev]")
    session.run("mypy", "--strict", "src/")


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation; warnings are errors and nothing is fetched from the network."""
    session.install("-e", ".[dev]")
    # The environment variable only silences Material's end-of-life banner.
    session.run("mkdocs", "build", "--strict", *session.posargs, env={"NO_MKDOCS_2_WARNING": "1"})


@nox.session
def demo(session: nox.Session) -> None:
    """Run the demo against a local Stripe-compatible server."""
    session.install("-e", ".[demo]")
    session.run("rational-billing", "demo", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Run every script in benchmarks/ (not ``_helpers.py``); extra arguments go to each one."""
    scripts = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if not p.name.startswith("_"))
    if not scripts:
        session.skip("no benchmarks/*.py scripts yet")
    session.install("-e", ".[dev]")
    for script in scripts:
        session.log(f"benchmark: {script.name}")
        session.run("python", str(script.relative_to(ROOT)), *session.posargs)
