"""pytest set-up for the Django example: the project on sys.path and its settings active.

This is what pytest-django would do. Django's settings can be configured once
per process; when another test module did it first (the library's own suite
runs in the same process), the project's settings are applied on top with
``override_settings`` for the duration of each test module instead.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # as manage.py would: `saas_site` is a top-level package


@pytest.fixture(scope="module", autouse=True)
def project_settings() -> Iterator[None]:
    """The example project's settings (saas_site/settings.py), active for the module."""
    import django
    from django.conf import settings
    from django.test import override_settings
    from saas_site import settings as project

    values = {name: getattr(project, name) for name in dir(project) if name.isupper()}
    if not settings.configured:
        settings.configure(**values)
        django.setup()
        yield
        return
    with override_settings(**values):
        yield
