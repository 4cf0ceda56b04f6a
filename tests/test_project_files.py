"""The README's quick start and CI stay in step with each other."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _quick_start_lines() -> list[str]:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    block = section.split("```bash", 1)[1].split("```", 1)[0]
    return [line for line in block.strip().splitlines() if line.strip()]


def test_quick_start_is_two_lines_demo_and_tests() -> None:
    """The quick start has exactly two lines: one runs the demo, one runs the tests."""
    demo, tests = _quick_start_lines()
    assert "rational-billing demo" in demo
    assert "pytest" in tests
    for line in (demo, tests):
        assert line.startswith("python3 -m venv .venv && ")  # works where pip is externally managed


def test_ci_runs_the_readme_test_line() -> None:
    """.ci/run runs the README's test line character for character."""
    script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    match = re.search(r'^README_TEST_LINE="(.*)"$', script, re.MULTILINE)
    assert match is not None
    assert match.group(1) == _quick_start_lines()[1]


def test_changelog_has_an_unreleased_section() -> None:
    """CHANGELOG.md follows Keep a Changelog with an Unreleased section."""
    text = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert "## [Unreleased]" in text
