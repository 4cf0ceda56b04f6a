"""Domain models: JSON round-trips through the package converter, validation and UTC times."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from types import MappingProxyType
from typing import Any

import attrs
import cattrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from rational_billing import Mode
from rational_billing.domain import models
from rational_billing.domain._serde import structure, unstructure, unstructure_for_orjson
from rational_billing.domain.models import (
    Customer,
    CustomerLink,
    Dispute,
    EventOutcome,
    Invitation,
    InvitationState,
    Invoice,
    OutboxEntry,
    OutboxState,
    PendingConnection,
    ProcessedEvent,
    Product,
    Refund,
    Relation,
    StripePrice,
    StripeProduct,
    StripeReference,
    Subscription,
    SubscriptionItem,
    SyncState,
    Tenant,
    TenantStatus,
    utc,
)
from rational_billing.storage import sql as sql_module

# -- strategies ----------------------------------------------------------------

offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
# Bounded away from datetime.min/max so that converting an offset to UTC cannot overflow.
aware_datetimes = st.datetimes(
    min_value=datetime(1970, 1, 2),
    max_value=datetime(2200, 12, 30),
    timezones=st.one_of(st.just(UTC), offsets),
)
naive_datetimes = st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2200, 12, 30))
# Naive values are accepted and taken to be UTC, so both kinds must round-trip.
datetimes = st.one_of(aware_datetimes, naive_datetimes)
optional_datetimes = st.none() | datetimes

text = st.text(max_size=30)
ids = st.text(min_size=1, max_size=30)
optional_ids = st.none() | ids
modes = st.sampled_from(Mode)
amounts = st.integers(min_value=0, max_value=10**12)
currencies = st.sampled_from(["usd", "eur", "jpy", "gbp", "bhd"])
statuses = st.sampled_from(["active", "trialing", "past_due", "canceled", "paid", "open", "lost"])

metadata = st.dictionaries(st.text(max_size=40), st.text(max_size=100), max_size=5)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3)
    ),
    max_leaves=12,
)
params = st.dictionaries(st.text(max_size=20), json_values, max_size=6)

links = st.builds(CustomerLink, mode=modes, stripe_customer_id=ids)
subscription_items = st.builds(
    SubscriptionItem,
    stripe_id=ids,
    price_id=optional_ids,
    stripe_product_id=optional_ids,
    quantity=st.integers(min_value=0, max_value=10**6),
    current_period_end=optional_datetimes,
    currency=st.none() | currencies,
    unit_amount=st.none() | amounts,
    interval=st.none() | st.sampled_from(["day", "week", "month", "year"]),
    interval_count=st.none() | st.integers(min_value=1, max_value=36),
)
stripe_prices = st.builds(
    StripePrice,
    stripe_id=ids,
    kind=st.sampled_from(["price", "plan"]),
    currency=st.none() | currencies,
    unit_amount=st.none() | amounts,
    interval=st.none() | st.sampled_from(["day", "month", "year"]),
    interval_count=st.none() | st.integers(min_value=1, max_value=36),
    nickname=st.none() | text,
    active=st.booleans(),
    deleted=st.booleans(),
    marker=optional_datetimes,
)
stripe_products = st.builds(
    StripeProduct,
    stripe_id=ids,
    name=st.none() | text,
    active=st.booleans(),
    deleted=st.booleans(),
    prices=st.lists(stripe_prices, max_size=3).map(tuple),
    marker=optional_datetimes,
)

MODEL_STRATEGIES: dict[type[Any], st.SearchStrategy[Any]] = {
    Tenant: st.builds(
        Tenant,
        id=ids,
        stripe_account_id=optional_ids,
        modes=st.frozensets(modes),
        status=st.sampled_from(TenantStatus),
        direct=st.booleans(),
        connected_at=optional_datetimes,
        disconnected_at=optional_datetimes,
    ),
    CustomerLink: links,
    Customer: st.builds(
        Customer,
        id=ids,
        tenant=ids,
        email=st.none() | st.emails() | text,
        name=st.none() | text,
        metadata=metadata,
        link=st.none() | links,
        sync_state=st.sampled_from(SyncState),
        created_at=datetimes,
        local_changed_at=optional_datetimes,
        stripe_marker=optional_datetimes,
    ),
    Product: st.builds(
        Product,
        tenant=ids,
        id=ids,
        name=text,
        stripe_test_product_id=optional_ids,
        stripe_live_product_id=optional_ids,
        created_at=datetimes,
        stripe_test=st.none() | stripe_products,
        stripe_live=st.none() | stripe_products,
    ),
    SubscriptionItem: subscription_items,
    StripePrice: stripe_prices,
    StripeProduct: stripe_products,
    StripeReference: st.builds(
        StripeReference,
        tenant=ids,
        mode=modes,
        source_id=ids,
        relation=st.sampled_from(Relation),
        target_id=ids,
    ),
    Subscription: st.builds(
        Subscription,
        tenant=ids,
        mode=modes,
        stripe_id=ids,
        stripe_customer_id=ids,
        status=statuses,
        items=st.lists(subscription_items, max_size=3).map(tuple),
        current_period_end=optional_datetimes,
        cancel_at_period_end=st.booleans(),
        past_due_since=optional_datetimes,
        marker=datetimes,
        latest_invoice_id=optional_ids,
        created=optional_datetimes,
        ended_at=optional_datetimes,
        past_due_changed_at=optional_datetimes,
        not_past_due_at=optional_datetimes,
        past_due_seen_at=optional_datetimes,
    ),
    Invoice: st.builds(
        Invoice,
        tenant=ids,
        mode=modes,
        stripe_id=ids,
        stripe_customer_id=ids,
        status=statuses,
        currency=currencies,
        amount_due=amounts,
        amount_paid=amounts,
        subscription_id=optional_ids,
        charge_id=optional_ids,
        attempt_count=st.integers(min_value=0, max_value=100),
        next_payment_attempt=optional_datetimes,
        first_failed_at=optional_datetimes,
        marker=datetimes,
        payment_intent_id=optional_ids,
        created=optional_datetimes,
        paid_at=optional_datetimes,
    ),
    Dispute: st.builds(
        Dispute,
        tenant=ids,
        mode=modes,
        stripe_id=ids,
        charge_id=ids,
        status=statuses,
        amount=amounts,
        currency=currencies,
        stripe_customer_id=optional_ids,
        invoice_id=optional_ids,
        reason=st.none() | text,
        marker=datetimes,
        payment_intent_id=optional_ids,
        created=optional_datetimes,
    ),
    Refund: st.builds(
        Refund,
        tenant=ids,
        mode=modes,
        stripe_id=ids,
        charge_id=optional_ids,
        amount=amounts,
        currency=currencies,
        status=statuses,
        stripe_customer_id=optional_ids,
        invoice_id=optional_ids,
        marker=datetimes,
        payment_intent_id=optional_ids,
        created=optional_datetimes,
    ),
    ProcessedEvent: st.builds(
        ProcessedEvent,
        event_id=ids,
        type=st.sampled_from(["invoice.paid", "customer.created", "charge.dispute.closed"]),
        mode=modes,
        created=datetimes,
        outcome=st.sampled_from(EventOutcome),
        tenant=optional_ids,
        account=optional_ids,
        api_version=st.none() | st.sampled_from(["2016-07-06", "2025-03-31.basil"]),
        reason=st.none() | text,
        payload=st.none() | st.binary(max_size=200),
        attempts=st.integers(min_value=0, max_value=1000),
        received_at=datetimes,
    ),
    OutboxEntry: st.builds(
        OutboxEntry,
        id=ids,
        tenant=ids,
        mode=modes,
        operation=st.sampled_from(["customer.update", "customer.create", "customer.unlink"]),
        customer_id=ids,
        params=params,
        idempotency_key=st.uuids().map(str),
        created_at=datetimes,
        state=st.sampled_from(OutboxState),
        attempts=st.integers(min_value=0, max_value=1000),
        next_attempt_at=optional_datetimes,
        last_error=st.none() | text,
        stripe_id=optional_ids,
    ),
    # tenants and customers (issue 3)
    PendingConnection: st.builds(
        PendingConnection,
        key=ids,
        tenant=ids,
        mode=modes,
        kind=st.sampled_from(["oauth", "account_link"]),
        created_at=datetimes,
        expires_at=optional_datetimes,
        stripe_account_id=optional_ids,
        redirect_uri=st.none() | text,
        idempotency_key=st.none() | st.uuids().map(str),
    ),
    Invitation: st.builds(
        Invitation,
        tenant=ids,
        mode=modes,
        stripe_customer_id=ids,
        customer_id=ids,
        email=st.none() | st.emails(),
        message_id=text,
        created_at=datetimes,
        state=st.sampled_from(InvitationState),
        attempts=st.integers(min_value=0, max_value=1000),
        next_attempt_at=optional_datetimes,
        last_error=st.none() | text,
        sent_at=optional_datetimes,
    ),
}

MODELS = sorted(MODEL_STRATEGIES, key=lambda cls: cls.__name__)


def _json_round_trip(obj: Any) -> Any:
    """``obj`` unstructured, through strict JSON text, and structured back."""
    text = json.dumps(unstructure(obj), allow_nan=False)
    return structure(json.loads(text), type(obj))


def _is_utc(value: datetime) -> bool:
    return value.tzinfo is UTC


def _all_datetimes(obj: Any) -> list[datetime]:
    found: list[datetime] = []
    for field in attrs.fields(type(obj)):
        value = getattr(obj, field.name)
        if isinstance(value, datetime):
            found.append(value)
        elif attrs.has(type(value)):
            found.extend(_all_datetimes(value))
        elif isinstance(value, tuple):
            for item in value:
                if attrs.has(type(item)):
                    found.extend(_all_datetimes(item))
    return found


# -- round trips ---------------------------------------------------------------


def test_every_model_has_a_strategy() -> None:
    """Every attrs model in domain.models is covered by the round-trip property below."""
    exported = {getattr(models, name) for name in models.__all__}
    attrs_models = {obj for obj in exported if isinstance(obj, type) and attrs.has(obj)}
    assert attrs_models == set(MODEL_STRATEGIES)


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_json_round_trip(cls: type[Any], data: st.DataObject) -> None:
    """Every model survives unstructure -> JSON text -> structure unchanged."""
    obj = data.draw(MODEL_STRATEGIES[cls], label=cls.__name__)
    assert _json_round_trip(obj) == obj


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_unstructured_form_is_plain_json(cls: type[Any], data: st.DataObject) -> None:
    """The unstructured form already is JSON data: dicts, lists, str, numbers, bools, None."""
    obj = data.draw(MODEL_STRATEGIES[cls], label=cls.__name__)
    plain = unstructure(obj)
    assert isinstance(plain, dict)
    assert json.loads(json.dumps(plain, allow_nan=False)) == plain


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_unstructure_is_deterministic(cls: type[Any], data: st.DataObject) -> None:
    """Equal models give identical JSON text, so stored rows compare byte for byte."""
    obj = data.draw(MODEL_STRATEGIES[cls], label=cls.__name__)
    twin = _json_round_trip(obj)
    assert json.dumps(unstructure(twin), sort_keys=True) == json.dumps(
        unstructure(obj), sort_keys=True
    )


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_structured_times_are_utc(cls: type[Any], data: st.DataObject) -> None:
    """Every datetime of a model, before and after a round trip, is aware and in UTC."""
    obj = data.draw(MODEL_STRATEGIES[cls], label=cls.__name__)
    assert all(_is_utc(value) for value in _all_datetimes(obj))
    assert all(_is_utc(value) for value in _all_datetimes(_json_round_trip(obj)))


@pytest.mark.parametrize("cls", MODELS, ids=lambda cls: cls.__name__)
@given(data=st.data())
def test_stored_json_is_the_converters(cls: type[Any], data: st.DataObject) -> None:
    """The storage's JSON columns (datetimes and enums left to orjson) hold the converter's text."""
    obj = data.draw(MODEL_STRATEGIES[cls], label=cls.__name__)
    assert sql_module._dump(obj) == sql_module._json_text(unstructure(obj))
    assert json.loads(sql_module._dump(obj)) == unstructure(obj)
    # The json module's fallback (lone surrogates, integers beyond 64 bits) writes the same.
    fallback = json.dumps(unstructure_for_orjson(obj), default=sql_module._json_default)
    assert json.loads(fallback) == unstructure(obj)


class _FrozenClockDatetime(datetime):
    """A datetime subclass, as freezegun's ``datetime.now()`` returns in a host's tests."""


def test_stored_json_takes_datetime_subclasses() -> None:
    """A datetime subclass (orjson refuses one) is stored as the converter writes it."""
    when = _FrozenClockDatetime(2024, 5, 6, 7, 8, 9, 10, tzinfo=UTC)
    sub = Subscription("t", Mode.TEST, "sub_1", "cus_1", "active", marker=when, created=when)
    assert type(sub.marker) is _FrozenClockDatetime
    assert sql_module._dump(sub) == sql_module._json_text(unstructure(sub))
    assert json.loads(sql_module._dump(sub))["marker"] == "2024-05-06T07:08:09.000010+00:00"
    event = ProcessedEvent("evt_1", "invoice.paid", Mode.TEST, when, EventOutcome.APPLIED)
    assert json.loads(sql_module._event_data(event))["created"] == unstructure(event)["created"]


def test_stored_json_of_untyped_values_is_the_converters() -> None:
    """Datetimes among an outbox entry's params are stored in UTC, as the converter writes them."""
    params = {
        "naive": datetime(2024, 1, 1),
        "offset": datetime(2024, 1, 1, tzinfo=timezone(timedelta(hours=2))),
        "nested": {"at": [datetime(2024, 1, 1, 12, tzinfo=UTC)]},
        "surrogate": "\udce9",  # the json module's fallback path
    }
    entry = OutboxEntry("o", "t", Mode.TEST, "customer.update", "c", params, "k", WHEN)
    stored = json.loads(sql_module._dump(entry))
    assert stored == json.loads(json.dumps(unstructure(entry)))
    assert stored["params"]["naive"] == "2024-01-01T00:00:00+00:00"
    assert stored["params"]["offset"] == "2023-12-31T22:00:00+00:00"
    assert stored["params"]["nested"] == {"at": ["2024-01-01T12:00:00+00:00"]}


def test_datetimes_are_iso_strings_with_utc_offset() -> None:
    """Datetimes are stored as ISO 8601 text with a +00:00 offset."""
    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    plain = unstructure(CustomerLink(mode=Mode.LIVE, stripe_customer_id="cus_1"))
    assert plain == {"mode": "live", "stripe_customer_id": "cus_1"}
    sub = unstructure(Subscription("t", Mode.TEST, "sub_1", "cus_1", "active", marker=when))
    assert sub["marker"] == "2024-05-06T05:08:09.123456+00:00"
    assert sub["mode"] == "test"


def test_bytes_are_base64_text() -> None:
    """A bytes payload is stored as base64 text and comes back as the same bytes."""
    event = ProcessedEvent(
        event_id="evt_1",
        type="invoice.paid",
        mode=Mode.TEST,
        created=datetime(2024, 1, 1, tzinfo=UTC),
        outcome=EventOutcome.HELD,
        payload=b"\x00\xff{}",
    )
    plain = unstructure(event)
    assert plain["payload"] == "AP97fQ=="
    assert _json_round_trip(event).payload == b"\x00\xff{}"


def test_frozensets_are_sorted_lists() -> None:
    """A Tenant's modes are stored as a sorted list, whatever the set's iteration order."""
    tenant = Tenant(id="t", stripe_account_id="acct_1", modes=frozenset({Mode.TEST, Mode.LIVE}))
    assert unstructure(tenant)["modes"] == ["live", "test"]


def test_structured_mappings_are_read_only() -> None:
    """Mappings come back read-only, so a structured frozen model stays frozen."""
    customer = _json_round_trip(Customer(id="c", tenant="t", email=None, metadata={"a": "b"}))
    assert isinstance(customer.metadata, MappingProxyType)
    with pytest.raises(TypeError):
        customer.metadata["a"] = "c"  # type: ignore[index]
    entry = OutboxEntry(
        id="o",
        tenant="t",
        mode=Mode.TEST,
        operation="customer.update",
        customer_id="c",
        params={"metadata": {"a": None}},
        idempotency_key="k",
        created_at=datetime(2024, 1, 1, tzinfo=UTC),
    )
    assert isinstance(_json_round_trip(entry).params, Mapping)
    assert isinstance(_json_round_trip(entry).params, MappingProxyType)


def test_unknown_keys_are_ignored_when_structuring() -> None:
    """Stored data written by a newer version (extra keys) still structures."""
    plain = unstructure(CustomerLink(mode=Mode.TEST, stripe_customer_id="cus_1"))
    plain["added_later"] = {"anything": 1}
    assert structure(plain, CustomerLink) == CustomerLink(Mode.TEST, "cus_1")


# -- bad data ------------------------------------------------------------------


def _messages(exc: cattrs.ClassValidationError) -> list[str]:
    return cattrs.transform_error(exc)


WHEN = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
SAMPLES: dict[type[Any], Any] = {
    Tenant: Tenant(id="t", stripe_account_id="acct_1", modes=frozenset(Mode)),
    CustomerLink: CustomerLink(mode=Mode.TEST, stripe_customer_id="cus_1"),
    Customer: Customer(id="c", tenant="t", email=None, created_at=WHEN),
    Product: Product(tenant="t", id="p", name="P", created_at=WHEN),
    SubscriptionItem: SubscriptionItem(stripe_id="si_1", price_id=None, stripe_product_id=None),
    StripePrice: StripePrice(stripe_id="price_1"),
    StripeProduct: StripeProduct(stripe_id="prod_1", prices=(StripePrice("price_1"),)),
    StripeReference: StripeReference("t", Mode.TEST, "ch_1", Relation.PAYS, "in_1"),
    Subscription: Subscription("t", Mode.TEST, "sub_1", "cus_1", "active", marker=WHEN),
    Invoice: Invoice("t", Mode.LIVE, "in_1", "cus_1", "paid", "usd", marker=WHEN),
    Dispute: Dispute("t", Mode.LIVE, "dp_1", "ch_1", "lost", 100, "usd", marker=WHEN),
    Refund: Refund("t", Mode.LIVE, "re_1", None, 100, "usd", "succeeded", marker=WHEN),
    ProcessedEvent: ProcessedEvent("evt_1", "invoice.paid", Mode.TEST, WHEN, EventOutcome.HELD),
    OutboxEntry: OutboxEntry("o", "t", Mode.TEST, "customer.update", "c", {}, "k", WHEN),
    PendingConnection: PendingConnection("oauth:x", "t", Mode.TEST, "oauth", WHEN),
    Invitation: Invitation("t", Mode.LIVE, "cus_1", "c", None, "invitation.x@example", WHEN),
}
MISSING = object()
BAD_DATA: list[tuple[type[Any], dict[str, Any], str]] = [
    (Tenant, {"modes": ["staging"]}, "$.modes[0]"),
    (Tenant, {"status": "gone"}, "$.status"),
    (CustomerLink, {"mode": "sandbox"}, "$.mode"),
    (Customer, {"id": MISSING}, "$.id"),
    (Customer, {"metadata": [1, 2]}, "$.metadata"),
    (Customer, {"created_at": 1700000000}, "$.created_at"),
    (Customer, {"sync_state": "unknown"}, "$.sync_state"),
    (Customer, {"link": {"mode": "test"}}, "$.link.stripe_customer_id"),
    (Product, {"created_at": "yesterday"}, "$.created_at"),
    (SubscriptionItem, {"quantity": "many"}, "$.quantity"),
    (Subscription, {"items": [{}]}, "$.items[0].stripe_id"),
    (Subscription, {"marker": "2024-13-01T00:00:00"}, "$.marker"),
    (Invoice, {"amount_due": "lots"}, "$.amount_due"),
    (Dispute, {"amount": MISSING}, "$.amount"),
    (Refund, {"mode": "both"}, "$.mode"),
    (StripePrice, {"unit_amount": "ten"}, "$.unit_amount"),
    (StripeProduct, {"prices": [{"kind": "price"}]}, "$.prices[0].stripe_id"),
    (StripeReference, {"relation": "owns"}, "$.relation"),
    (ProcessedEvent, {"payload": "abc"}, "$.payload"),
    (ProcessedEvent, {"outcome": "exploded"}, "$.outcome"),
    (OutboxEntry, {"state": "lost"}, "$.state"),
    (OutboxEntry, {"params": "a=b"}, "$.params"),
    (PendingConnection, {"mode": "staging"}, "$.mode"),
    (Invitation, {"state": "bounced"}, "$.state"),
    (Invitation, {"sent_at": "soon"}, "$.sent_at"),
]


def test_samples_are_valid() -> None:
    """The samples that bad data is derived from round-trip cleanly themselves."""
    assert set(SAMPLES) == set(MODEL_STRATEGIES)
    for sample in SAMPLES.values():
        assert _json_round_trip(sample) == sample


@pytest.mark.parametrize(
    ("cls", "patch", "path"),
    BAD_DATA,
    ids=[f"{cls.__name__}-{path}" for cls, _, path in BAD_DATA],
)
def test_bad_data_names_class_and_field(cls: type[Any], patch: dict[str, Any], path: str) -> None:
    """Structuring bad data raises ClassValidationError naming the class and the field."""
    data = {**unstructure(SAMPLES[cls]), **patch}
    data = {key: value for key, value in data.items() if value is not MISSING}
    with pytest.raises(cattrs.ClassValidationError) as info:
        structure(data, cls)
    assert cls.__name__ in str(info.value)
    messages = _messages(info.value)
    assert any(message.endswith(f"@ {path}") for message in messages), messages


def test_bad_data_reports_every_failing_field() -> None:
    """All failing fields are reported at once, not just the first."""
    with pytest.raises(cattrs.ClassValidationError) as info:
        structure({"email": None}, Customer)
    assert _messages(info.value) == [
        "required field missing @ $.id",
        "required field missing @ $.tenant",
    ]


def test_structuring_non_mapping_names_the_class() -> None:
    """Structuring something that is not an object at all is a ClassValidationError."""
    with pytest.raises(cattrs.ClassValidationError, match="CustomerLink"):
        structure(["not", "a", "dict"], CustomerLink)


def test_metadata_values_must_be_strings() -> None:
    """Customer.metadata is Mapping[str, str], so a number value is a structuring error."""
    data = {"id": "c", "tenant": "t", "email": None, "metadata": {"plan": 3}}
    with pytest.raises(cattrs.ClassValidationError):
        structure(data, Customer)


# -- UTC normalisation -----------------------------------------------------------


def test_naive_datetimes_are_taken_as_utc() -> None:
    """A naive datetime passed to a model is read as UTC, keeping its wall-clock time."""
    naive = datetime(2024, 3, 4, 5, 6, 7)
    customer = Customer(id="c", tenant="t", email=None, created_at=naive, stripe_marker=naive)
    assert customer.created_at == datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert customer.created_at.tzinfo is UTC
    assert customer.stripe_marker is not None
    assert customer.stripe_marker.tzinfo is UTC


def test_other_offsets_are_converted_to_utc() -> None:
    """An aware datetime in another zone becomes the same instant in UTC."""
    paris = datetime(2024, 3, 4, 12, 0, tzinfo=timezone(timedelta(hours=1)))
    sub = Subscription("t", Mode.LIVE, "sub", "cus", "active", marker=paris)
    assert sub.marker == datetime(2024, 3, 4, 11, 0, tzinfo=UTC)
    assert sub.marker.tzinfo is UTC


def test_naive_iso_text_structures_as_utc() -> None:
    """Stored ISO text without an offset is read as UTC; text with one is converted."""
    base = {"tenant": "t", "id": "p", "name": "P"}
    naive = structure({**base, "created_at": "2024-03-04T05:06:07"}, Product)
    assert naive.created_at == datetime(2024, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert naive.created_at.tzinfo is UTC
    offset = structure({**base, "created_at": "2024-03-04T05:06:07-05:00"}, Product)
    assert offset.created_at == datetime(2024, 3, 4, 10, 6, 7, tzinfo=UTC)
    assert offset.created_at.tzinfo is UTC


@given(naive_datetimes)
def test_utc_helper_on_naive_values(value: datetime) -> None:
    """utc() attaches UTC to a naive value without moving its wall-clock time."""
    result = utc(value)
    assert result.tzinfo is UTC
    assert result.replace(tzinfo=None) == value


@given(aware_datetimes)
def test_utc_helper_on_aware_values(value: datetime) -> None:
    """utc() keeps an aware value's instant and expresses it in UTC."""
    result = utc(value)
    assert result.tzinfo is UTC
    assert result == value


def test_default_times_are_now_in_utc() -> None:
    """Defaulted timestamps are the current time, aware and in UTC."""
    before = datetime.now(UTC)
    product = Product(tenant="t", id="p", name="P")
    after = datetime.now(UTC)
    assert product.created_at.tzinfo is UTC
    assert before <= product.created_at <= after
