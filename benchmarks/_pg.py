"""A throwaway PostgreSQL cluster for the benchmarks, started as the test fixture starts it.

The logic lives in ``tests/fixtures/postgres.py`` (``initdb`` and ``pg_ctl`` on a
free loopback port, as an unprivileged user when run as root); this module
only imports it, so both always agree.
"""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@contextmanager
def cluster() -> Iterator[str | None]:
    """The superuser URL of a fresh cluster, or None (with the reason printed) without one."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from tests.fixtures.postgres import _Cluster, _Unavailable

    try:
        running = _Cluster.start()
    except (_Unavailable, OSError, subprocess.SubprocessError) as exc:
        print(f"note: PostgreSQL parts skipped: {exc}")
        yield None
        return
    try:
        yield running.url
    finally:
        running.stop()


def libpq(url: str) -> str:
    """``url`` as psycopg itself takes it."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def new_database(url: str) -> str:
    """Create an empty database on the cluster; its SQLAlchemy URL."""
    import psycopg

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(libpq(url), autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    return url.rsplit("/", 1)[0] + "/" + name
