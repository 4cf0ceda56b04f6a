"""The project's one `Billing`, built from ``RB_*`` environment variables on first use.

``RB_STORAGE_URL`` picks the storage: a SQLite file by default, or
``postgresql+psycopg://...`` when several web workers and hosts share it.
"""

from __future__ import annotations

import functools

from rational_billing import Billing, BillingConfig


@functools.cache
def get_billing() -> Billing:
    """The shared Billing (built once per process)."""
    return Billing(config=BillingConfig.from_env())
