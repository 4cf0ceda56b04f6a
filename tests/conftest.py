"""Shared test configuration: Hypothesis profiles and the service fixtures."""

from __future__ import annotations

import os
import tempfile

from hypothesis import HealthCheck, settings

pytest_plugins = [
    "tests.fixtures.postgres",
    "tests.fixtures.localstripe",
    "tests.fixtures.webhook_sink",
    "tests.fixtures.e2e",
]

# stripe-python writes a telemetry id under $XDG_CONFIG_HOME/stripe on its first
# request; keep that out of the user's home (docs/decisions.md).
os.environ.setdefault("XDG_CONFIG_HOME", tempfile.mkdtemp(prefix="rb-tests-xdg-"))

settings.register_profile(
    "ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=40, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))
