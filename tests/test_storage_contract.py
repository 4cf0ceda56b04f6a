"""The storage contract kit, run against every `Storage` the package ships."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rational_billing.adapters.memory import InMemoryStorage
from rational_billing.ports import Storage
from rational_billing.storage.sql import SQLStorage
from rational_billing.testing.contract import StorageContract


class TestInMemoryStorage(StorageContract):
    """The contract on `InMemoryStorage`."""

    concurrent = True

    @pytest.fixture
    def storage(self) -> Iterator[Storage]:
        """A fresh in-memory storage."""
        storage = InMemoryStorage()
        yield storage
        storage.close()


class TestSQLiteStorage(StorageContract):
    """The contract on `SQLStorage` over a SQLite file."""

    concurrent = True

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[Storage]:
        """A fresh SQLite file in the test's temp folder."""
        storage = SQLStorage(f"sqlite:///{tmp_path / 'billing.db'}")
        yield storage
        storage.close()


@pytest.mark.postgres
class TestPostgresStorage(StorageContract):
    """The contract on `SQLStorage` over a fresh PostgreSQL database."""

    concurrent = True

    @pytest.fixture
    def storage(self, pg_storage_url: str) -> Iterator[Storage]:
        """A fresh PostgreSQL database of the throwaway cluster."""
        storage = SQLStorage(pg_storage_url)
        yield storage
        storage.close()
