"""`ProductService` (``billing.products``): local products and their Stripe mapping.

A local product maps to a Stripe test product and a Stripe live product,
independently. ``map`` checks that the Stripe product exists on the tenant's
account in that mode (``GET /v1/products/{id}``) and records its prices
(``GET /v1/prices?product=…``, or ``/v1/plans?product=…`` on servers that only
know plans). Changing or removing an existing mapping can change who has
access, so it is guarded by `RemapConfirmationRequired`, whose ``impact``
lists every customer who would gain or lose the product.

``product.*``, ``price.*`` and ``plan.*`` events keep the Stripe-side name and
flags current. A product or price archived or deleted in Stripe is flagged,
never unmapped: subscriptions on it keep granting access, and `flagged` (and
the ``doctor`` command) reports it.
"""

from __future__ import annotations

import builtins
import logging
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from .._config import Mode
from ..domain.models import EventOutcome, Product, StripePrice, StripeProduct
from ..domain.normalize import normalize_price, normalize_product
from ..errors import (
    InvalidArgument,
    RemapConfirmationRequired,
    StripeAPIError,
    StripeObjectError,
    StripeProductNotFound,
)
from ..ports import Clock, Storage, StripeAPI, Transaction
from ._lookup import find_product
from ._validate import check_local_id, check_mode, check_stripe_id
from .subscriptions import SubscriptionTracker, floor_to_second
from .tenants import require_tenant
from .webhooks import EventContext, HandlerResult

__all__ = ["CatalogFlag", "ProductService"]

log = logging.getLogger("rational_billing.products")

_PAGE = 100


@attrs.frozen
class CatalogFlag:
    """A mapped Stripe product or price that was archived or deleted in Stripe."""

    product_id: str
    mode: Mode
    stripe_id: str
    kind: str  # "product", "price" or "plan"
    problem: str  # "deleted" or "archived"

    def __str__(self) -> str:
        return (
            f"product {self.product_id} ({self.mode.value}): {self.kind} {self.stripe_id} "
            f"was {self.problem} in Stripe"
        )


class ProductService:
    """Creates local products and maps them to Stripe products, test and live.

    Example::

        billing.products.create("acme", product_id="pro", name="Pro plan")
        billing.products.map("acme", "pro", mode=Mode.TEST, stripe_product_id="prod_Nf…")
    """

    def __init__(
        self,
        *,
        storage: Storage,
        stripe: StripeAPI,
        clock: Clock,
        subscriptions: SubscriptionTracker,
    ) -> None:
        self._storage = storage
        self._stripe = stripe
        self._clock = clock
        self._subscriptions = subscriptions

    # -- local ---------------------------------------------------------------------
    def create(self, tenant: str, *, product_id: str, name: str) -> Product:
        """Create a local product, mapped to nothing yet. No Stripe call is made.

        Raises:
            TenantNotFound: the tenant was never registered.
            InvalidArgument: a malformed id or name, or the id is taken.
        """
        check_local_id(product_id, "product id")
        if not isinstance(name, str) or not name.strip() or len(name) > 256:
            raise InvalidArgument("name must be a non-empty string of at most 256 characters")
        product = Product(tenant=tenant, id=product_id, name=name, created_at=self._clock())
        with self._storage.transaction() as tx:
            require_tenant(tx, tenant)
            if tx.get_product(tenant, product_id) is not None:
                raise InvalidArgument(f"tenant {tenant!r} already has a product {product_id!r}")
            tx.put_product(product)
        return product

    def get(self, tenant: str, product_id: str) -> Product:
        """The product, with its mappings and the Stripe side as last seen.

        Raises:
            ProductNotFound: no such product in that tenant.
        """
        with self._storage.transaction() as tx:
            return find_product(tx, tenant, product_id)

    def list(self, tenant: str, *, page_size: int = _PAGE) -> Iterator[Product]:
        """Every product of the tenant, ordered by id, fetched lazily page by page."""
        if page_size < 1:
            raise InvalidArgument("page_size must be at least 1")
        after: str | None = None
        while True:
            with self._storage.transaction() as tx:
                page = list(tx.list_products(tenant, after=after, limit=page_size))
            yield from page
            if len(page) < page_size:
                return
            after = page[-1].id

    def flagged(self, tenant: str) -> builtins.list[CatalogFlag]:
        """Mapped Stripe products and prices that were archived or deleted in Stripe."""
        flags: builtins.list[CatalogFlag] = []
        for product in self.list(tenant):
            for mode in (Mode.TEST, Mode.LIVE):
                stripe = product.stripe_product(mode)
                if stripe is None:
                    continue
                if stripe.deleted or not stripe.active:
                    problem = "deleted" if stripe.deleted else "archived"
                    flags.append(
                        CatalogFlag(product.id, mode, stripe.stripe_id, "product", problem)
                    )
                for price in stripe.prices:
                    if price.deleted or not price.active:
                        problem = "deleted" if price.deleted else "archived"
                        flags.append(
                            CatalogFlag(product.id, mode, price.stripe_id, price.kind, problem)
                        )
        return flags

    # -- mapping -------------------------------------------------------------------
    def map(
        self,
        tenant: str,
        product_id: str,
        *,
        mode: Mode | str,
        stripe_product_id: str,
        confirm_remap: bool = False,
    ) -> Product:
        """Map the product, in ``mode``, to a Stripe product of the tenant's account.

        The Stripe product must exist in that account and mode; its prices are
        recorded with it. Mapping to the product already mapped is a no-op.
        Replacing another mapping needs ``confirm_remap=True``.

        Raises:
            TenantNotFound, TenantNotConnected: the tenant cannot use ``mode``.
            ProductNotFound: no such local product.
            InvalidArgument: a malformed Stripe product id or mode.
            RemapConfirmationRequired: the product is mapped to another Stripe
                product in ``mode``; ``.impact`` lists who gains and loses it.
            StripeProductNotFound: no such product in that account and mode, or deleted.
            StripeAPIError: Stripe could not be asked.
        """
        wanted = check_mode(mode)
        check_stripe_id(stripe_product_id, "", "Stripe product id")
        with self._storage.transaction() as tx:
            tenant_obj = require_tenant(tx, tenant, wanted)
            product = find_product(tx, tenant, product_id)
            if product.stripe_product_id(wanted) == stripe_product_id:
                return product
            self._guard(tx, product, wanted, stripe_product_id, confirm_remap)
        account = tenant_obj.stripe_account_id
        stripe = self._fetch(tenant, account, wanted, stripe_product_id)
        with self._storage.transaction() as tx:
            require_tenant(tx, tenant, wanted)
            product = find_product(tx, tenant, product_id)
            if product.stripe_product_id(wanted) == stripe_product_id:
                return product
            self._guard(tx, product, wanted, stripe_product_id, confirm_remap)
            mapped = _with_mapping(product, wanted, stripe_product_id, stripe)
            tx.put_product(mapped)
        log.info(
            "product %s of tenant %s mapped to %s in %s mode",
            product_id,
            tenant,
            stripe_product_id,
            wanted.value,
        )
        return mapped

    def unmap(
        self, tenant: str, product_id: str, *, mode: Mode | str, confirm_remap: bool = False
    ) -> Product:
        """Remove the product's mapping in ``mode`` (a no-op when there is none).

        Raises:
            TenantNotFound: the tenant was never registered.
            ProductNotFound: no such local product.
            RemapConfirmationRequired: the product is mapped in ``mode``;
                ``.impact`` lists who would lose it.
        """
        wanted = check_mode(mode)
        with self._storage.transaction() as tx:
            product = find_product(tx, tenant, product_id)
            if product.stripe_product_id(wanted) is None:
                return product
            self._guard(tx, product, wanted, None, confirm_remap)
            unmapped = _with_mapping(product, wanted, None, None)
            tx.put_product(unmapped)
        return unmapped

    def _guard(
        self,
        tx: Transaction,
        product: Product,
        mode: Mode,
        target: str | None,
        confirm_remap: bool,
    ) -> None:
        current = product.stripe_product_id(mode)
        if current is None or confirm_remap:
            return
        impact = self._subscriptions.remap_impact(tx, product.tenant, product, mode, target)
        gained, lost = impact["gained"], impact["lost"]
        action = f"remap it to {target}" if target is not None else "unmap it"
        raise RemapConfirmationRequired(
            f"product {product.id!r} of tenant {product.tenant!r} is mapped to {current} in "
            f"{mode.value} mode; to {action}, pass confirm_remap=True "
            f"({_count(gained)} customer(s) would gain it, {_count(lost)} would lose it)",
            impact=impact,
        )

    def _fetch(
        self, tenant: str, account: str | None, mode: Mode, stripe_product_id: str
    ) -> StripeProduct:
        fetched = floor_to_second(self._clock())
        try:
            obj = self._stripe.request(
                "GET", f"/v1/products/{stripe_product_id}", mode=mode, account=account
            )
        except StripeAPIError as exc:
            if exc.status == 404:
                raise StripeProductNotFound(
                    f"no Stripe product {stripe_product_id} in {mode.value} mode on the account "
                    f"of tenant {tenant!r}",
                    status=404,
                    code=exc.code,
                    request_id=exc.request_id,
                    tenant=tenant,
                    mode=mode,
                ) from exc
            raise
        if obj.get("deleted") is True:
            raise StripeProductNotFound(
                f"Stripe product {stripe_product_id} was deleted ({mode.value} mode, "
                f"tenant {tenant!r})",
                tenant=tenant,
                mode=mode,
            )
        try:
            product = normalize_product(obj, marker=fetched)
        except StripeObjectError as exc:
            raise StripeAPIError(
                f"GET /v1/products/{stripe_product_id} answered with no product: {exc}",
                tenant=tenant,
                mode=mode,
            ) from exc
        prices = self._fetch_prices(account, mode, stripe_product_id, fetched)
        return attrs.evolve(product, prices=prices)

    def _fetch_prices(
        self, account: str | None, mode: Mode, stripe_product_id: str, fetched: Any
    ) -> tuple[StripePrice, ...]:
        params = {"product": stripe_product_id}
        try:
            raw = list(
                self._stripe.list_all("/v1/prices", mode=mode, account=account, params=params)
            )
        except StripeAPIError as exc:
            if exc.status != 404:
                raise
            # Servers that predate prices (localstripe) only have plans.
            raw = list(
                self._stripe.list_all("/v1/plans", mode=mode, account=account, params=params)
            )
        prices: dict[str, StripePrice] = {}
        for obj in raw:
            try:
                product, price = normalize_price(obj, marker=fetched)
            except StripeObjectError:
                log.warning("a price of %s has no id; skipped", stripe_product_id)
                continue
            if product in (None, stripe_product_id):
                prices[price.stripe_id] = price
        return tuple(prices[k] for k in sorted(prices))

    # -- webhook handlers ------------------------------------------------------------
    def on_product_event(self, ctx: EventContext) -> HandlerResult | None:
        """``product.created``/``updated``/``deleted``: the Stripe name and flags of mapped products."""
        try:
            incoming = normalize_product(ctx.object, marker=ctx.created)
        except StripeObjectError as exc:
            log.warning("event %s (%s) ignored: %s", ctx.event.get("id"), ctx.type, exc)
            return HandlerResult(EventOutcome.IGNORED, str(exc))
        deleted = incoming.deleted or ctx.type == "product.deleted"
        products = ctx.tx.products_by_stripe_product(ctx.tenant.id, ctx.mode, incoming.stripe_id)
        if not products:
            return HandlerResult(
                EventOutcome.IGNORED, f"{incoming.stripe_id} is mapped to no local product"
            )
        applied = 0
        for product in products:
            current = product.stripe_product(ctx.mode) or StripeProduct(incoming.stripe_id)
            if current.marker is not None and ctx.created < current.marker:
                continue
            updated = attrs.evolve(
                current,
                name=incoming.name or current.name,
                active=incoming.active,
                # Deletion is final in Stripe: a late, older event never undoes it.
                deleted=current.deleted or deleted,
                marker=ctx.created,
            )
            ctx.tx.put_product(_with_catalog(product, ctx.mode, updated))
            applied += 1
        if not applied:
            return HandlerResult(
                EventOutcome.STALE, f"a newer state of {incoming.stripe_id} is stored"
            )
        if deleted or not incoming.active:
            state = "deleted" if deleted else "archived"
            ids = ", ".join(p.id for p in products)
            log.warning(
                "Stripe product %s was %s; local product(s) %s keep their mapping and access",
                incoming.stripe_id,
                state,
                ids,
            )
            return HandlerResult(EventOutcome.APPLIED, f"{incoming.stripe_id} flagged {state}")
        return None

    def on_price_event(self, ctx: EventContext) -> HandlerResult | None:
        """``price.*`` and ``plan.*``: the prices (and their flags) of mapped products."""
        try:
            stripe_product, incoming = normalize_price(ctx.object, marker=ctx.created)
        except StripeObjectError as exc:
            log.warning("event %s (%s) ignored: %s", ctx.event.get("id"), ctx.type, exc)
            return HandlerResult(EventOutcome.IGNORED, str(exc))
        if ctx.type.endswith(".deleted"):
            incoming = attrs.evolve(incoming, deleted=True)
        if stripe_product is None:
            return HandlerResult(EventOutcome.IGNORED, f"{incoming.stripe_id} names no product")
        products = ctx.tx.products_by_stripe_product(ctx.tenant.id, ctx.mode, stripe_product)
        if not products:
            return HandlerResult(
                EventOutcome.IGNORED, f"{stripe_product} is mapped to no local product"
            )
        applied = 0
        for product in products:
            current = product.stripe_product(ctx.mode) or StripeProduct(stripe_product)
            prices = {p.stripe_id: p for p in current.prices}
            existing = prices.get(incoming.stripe_id)
            if (
                existing is not None
                and existing.marker is not None
                and ctx.created < existing.marker
            ):
                continue
            prices[incoming.stripe_id] = attrs.evolve(
                incoming, deleted=incoming.deleted or (existing is not None and existing.deleted)
            )
            updated = attrs.evolve(current, prices=tuple(prices[k] for k in sorted(prices)))
            ctx.tx.put_product(_with_catalog(product, ctx.mode, updated))
            applied += 1
        if not applied:
            return HandlerResult(
                EventOutcome.STALE, f"a newer state of {incoming.stripe_id} is stored"
            )
        if incoming.deleted or not incoming.active:
            state = "deleted" if incoming.deleted else "archived"
            log.warning(
                "Stripe %s %s of %s was %s; subscriptions on it keep their access",
                incoming.kind,
                incoming.stripe_id,
                stripe_product,
                state,
            )
            return HandlerResult(EventOutcome.APPLIED, f"{incoming.stripe_id} flagged {state}")
        return None


def _count(customers: object) -> int:
    return len(customers) if isinstance(customers, tuple) else 0


def _with_mapping(
    product: Product, mode: Mode, stripe_product_id: str | None, stripe: StripeProduct | None
) -> Product:
    if mode is Mode.LIVE:
        return attrs.evolve(product, stripe_live_product_id=stripe_product_id, stripe_live=stripe)
    return attrs.evolve(product, stripe_test_product_id=stripe_product_id, stripe_test=stripe)


def _with_catalog(product: Product, mode: Mode, stripe: StripeProduct) -> Product:
    changes: Mapping[str, Any] = (
        {"stripe_live": stripe} if mode is Mode.LIVE else {"stripe_test": stripe}
    )
    return attrs.evolve(product, **changes)
