"""Finding a tenant's records, or raising the error that names what is missing.

An unknown tenant is reported as such (`TenantNotFound`) before the customer or
product that was asked for, so a caller learns the first thing that is wrong.
"""

from __future__ import annotations

from .._config import Mode
from ..domain.models import Customer, Product, Tenant
from ..errors import CustomerNotFound, ProductNotFound, TenantNotFound
from ..ports import Transaction

__all__ = ["find_customer", "find_product", "known_tenant"]


def known_tenant(tx: Transaction, tenant_id: str, mode: Mode | None = None) -> Tenant:
    """The registered tenant, connected or not.

    Raises:
        TenantNotFound: it was never registered.
    """
    tenant = tx.get_tenant(tenant_id)
    if tenant is None:
        raise TenantNotFound(f"unknown tenant {tenant_id!r}", tenant=tenant_id, mode=mode)
    return tenant


def find_customer(
    tx: Transaction, tenant: str, customer_id: str, *, lock: bool = False
) -> Customer:
    """The customer (row-locked until the transaction ends with ``lock``).

    Raises:
        TenantNotFound: the tenant was never registered.
        CustomerNotFound: the tenant has no such customer.
    """
    customer = (
        tx.lock_customer(tenant, customer_id) if lock else tx.get_customer(tenant, customer_id)
    )
    if customer is None:
        known_tenant(tx, tenant)
        raise CustomerNotFound(tenant, customer_id)
    return customer


def find_product(tx: Transaction, tenant: str, product_id: str) -> Product:
    """The product.

    Raises:
        TenantNotFound: the tenant was never registered.
        ProductNotFound: the tenant has no such product.
    """
    product = tx.get_product(tenant, product_id)
    if product is None:
        known_tenant(tx, tenant)
        raise ProductNotFound(tenant, product_id)
    return product
