"""Storage adapters that need an optional extra.

``rational_billing.storage.sql.SQLStorage`` (SQLite file or PostgreSQL) needs
the ``sql`` extra: ``pip install 'rational-billing[sql]'``. This package imports
nothing itself, so importing it never requires SQLAlchemy.
"""

from __future__ import annotations

__all__: list[str] = []
