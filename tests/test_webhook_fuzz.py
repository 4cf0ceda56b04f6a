"""Fuzzing webhook verification: mutated, validly signed deliveries are rejected and change nothing.

Each example starts from a delivery that the router would accept, a signed
``customer.updated`` for a linked customer, and mutates one thing: the
``Stripe-Signature`` header, the body bytes, the signing timestamp or the
secret. Each example goes through ``handle`` or through the inbox's ``receive``
(then ``process_pending``). Every rejection must answer 400 and leave the whole storage (every
table and index of `InMemoryStorage`), the mailer and the Stripe port exactly
as they were. Mutations that keep the signature valid (reordered entries, an
extra ``v1``, ``v0`` entries, a rotated secret) must still be accepted, and so
must the unchanged delivery, so the fuzzer cannot pass by rejecting everything.

The example counts below are fixed (not the profile's), so that even the CI
profile runs about 1,800 cases in total (11 header mutations x 50, 4 body
mutations x 80, 2 x 100 timestamps, 250 wrong secrets, 150 wrong-mode secrets,
100 unchanged and 250 harmless mutations), in about ten seconds.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rational_billing import Billing, BillingConfig, CustomerLink, EventOutcome, Mode, ModeKeys
from rational_billing.testing import (
    InMemoryStorage,
    RecordingMailer,
    build_customer,
    make_event,
    sign_payload,
)

TEST_SECRET = "whsec_fuzz_test_current"
ROTATED_SECRET = "whsec_fuzz_test_previous"
LIVE_SECRET = "whsec_fuzz_live"
SECRETS = {Mode.TEST: (TEST_SECRET, ROTATED_SECRET), Mode.LIVE: (LIVE_SECRET,)}
NOW = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
TS = int(NOW.timestamp())
TOLERANCE = 300
STRIPE_IDS = {Mode.TEST: "cus_FUZZTEST", Mode.LIVE: "cus_FUZZLIVE"}
#: An event already applied before each example: a rejected redelivery must not touch it.
PRIOR_ID = "evt_PRIORAPPLIED01"
HEX = "0123456789abcdef"

Entries = list[tuple[str, str]]


class _RecordingStripe:
    """A Stripe port that records calls; nothing in these tests should reach Stripe."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def request(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        self.calls.append(args)
        raise AssertionError("no Stripe call expected")

    def list_all(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(args)
        raise AssertionError("no Stripe call expected")


@attrs.define
class _World:
    billing: Billing
    storage: InMemoryStorage
    mailer: RecordingMailer
    stripe: _RecordingStripe
    customer_ids: dict[Mode, str]


def _world() -> _World:
    """A direct tenant with a customer linked in each mode, one applied and one held event."""
    storage, mailer, stripe = InMemoryStorage(), RecordingMailer(), _RecordingStripe()
    config = BillingConfig(
        test=ModeKeys(secret_key="sk_test_fuzz", webhook_secrets=SECRETS[Mode.TEST]),
        live=ModeKeys(secret_key="sk_live_fuzz", webhook_secrets=SECRETS[Mode.LIVE]),
        webhook_tolerance=TOLERANCE,
    )
    billing = Billing(
        config=config, storage=storage, mailer=mailer, clock=lambda: NOW, stripe=stripe
    )
    billing.tenants.register_direct("acme")
    ids = {}
    for mode, stripe_id in STRIPE_IDS.items():
        customer = billing.customers.create("acme", email="old@example.com", name="Old")
        with storage.transaction() as tx:
            tx.put_customer(attrs.evolve(customer, link=CustomerLink(mode, stripe_id)))
        ids[mode] = customer.id
    prior = make_event(
        "customer.updated",
        build_customer(id=STRIPE_IDS[Mode.TEST], email="old@example.com", name="Old"),
        created=TS - 60,
        event_id=PRIOR_ID,
    )
    held = make_event("customer.updated", build_customer(), created=TS, account="acct_1NOTYET")
    for event, outcome in ((prior, EventOutcome.APPLIED), (held, EventOutcome.HELD)):
        payload = json.dumps(event).encode()
        response = billing.webhooks.handle(
            payload, sign_payload(payload, TEST_SECRET, timestamp=TS)
        )
        assert response.outcome is outcome
    return _World(billing, storage, mailer, stripe, ids)


def _copy(value: Any) -> Any:
    # Stored records are frozen attrs values; only the containers need copying.
    if isinstance(value, dict):
        return {key: _copy(item) for key, item in value.items()}
    if isinstance(value, list | set):
        return type(value)(_copy(item) for item in value)
    return value


def _snapshot(world: _World) -> dict[str, Any]:
    """Every dict, list and set the storage holds (tables and indexes), plus what was sent."""
    state = {
        name: _copy(value)
        for name, value in vars(world.storage).items()
        if isinstance(value, dict | list | set)
    }
    state["mailer"] = (world.mailer.attempts, len(world.mailer))
    state["stripe"] = list(world.stripe.calls)
    return state


def _v1(payload: bytes, secret: str, timestamp: int = TS) -> str:
    """The hex v1 signature that sign_payload puts in the header."""
    return sign_payload(payload, secret, timestamp=timestamp)["Stripe-Signature"].split("v1=")[1]


@attrs.frozen
class Delivery:
    """A validly signed delivery, before mutation."""

    event: dict[str, Any]
    payload: bytes
    secret: str
    mode: Mode
    #: The ingestion path: ``handle`` (apply now) or ``receive`` (inbox mode).
    entry: str = "handle"

    @property
    def signature(self) -> str:
        return _v1(self.payload, self.secret)

    def entries(self) -> Entries:
        return [("t", str(TS)), ("v1", self.signature)]


def _header(entries: Entries, sep: str = ",") -> dict[str, str]:
    return {"Stripe-Signature": sep.join(f"{k}={v}" for k, v in entries)}


_names = st.text(
    alphabet=st.characters(exclude_categories=("Cs",)), max_size=24
)  # no lone surrogates: Stripe sends UTF-8
_hex64 = st.text(alphabet=HEX, min_size=64, max_size=64)


@st.composite
def deliveries(
    draw: st.DrawFn, *, fresh_id: bool = False, modes: tuple[Mode, ...] = tuple(Mode)
) -> Delivery:
    """A signed customer.updated for the customer linked in a random mode."""
    mode = draw(st.sampled_from(modes))
    email = draw(st.from_regex(r"new[a-z0-9]{0,10}@example\.(com|org)", fullmatch=True))
    ids = st.from_regex(r"evt_[A-Za-z0-9]{14,24}", fullmatch=True).filter(lambda i: i != PRIOR_ID)
    event_id = draw(ids if fresh_id else st.one_of(st.just(PRIOR_ID), ids))
    event = make_event(
        "customer.updated",
        build_customer(id=STRIPE_IDS[mode], email=email, name=draw(_names)),
        created=TS,
        event_id=event_id,
        livemode=mode is Mode.LIVE,
    )
    indent = draw(st.sampled_from([None, 0, 2, "\t"]))
    payload = json.dumps(event, ensure_ascii=draw(st.booleans()), indent=indent).encode()
    secret = draw(
        st.sampled_from(SECRETS[mode] if mode is Mode.LIVE else (*SECRETS[Mode.TEST], LIVE_SECRET))
    )
    return Delivery(event, payload, secret, mode, draw(st.sampled_from(["handle", "receive"])))


@st.composite
def harmless_decorations(draw: st.DrawFn, entries: Entries, genuine: str) -> Entries:
    """Entries that never verify added to the header, in any order.

    ``genuine`` (the real signature) may appear in a ``v0`` entry, which is never checked.
    """
    extra: Entries = draw(
        st.lists(
            st.one_of(
                st.tuples(st.just("v1"), _hex64),
                st.tuples(st.just("v0"), st.one_of(_hex64, st.just(genuine))),
                st.tuples(st.sampled_from(["v2", "scheme"]), st.text(alphabet=HEX, max_size=70)),
            ),
            max_size=4,
        )
    )
    return draw(st.permutations([*entries, *extra]))


def _ingest(world: _World, entry: str, payload: bytes, headers: dict[str, str]) -> Any:
    router = world.billing.webhooks
    return (router.handle if entry == "handle" else router.receive)(payload, headers)


def _assert_rejected(
    world: _World, delivery: Delivery, payload: bytes, headers: dict[str, str]
) -> None:
    before = _snapshot(world)
    response = _ingest(world, delivery.entry, payload, headers)
    assert response.status_code == 400, (response, headers)
    assert response.outcome is None
    assert _snapshot(world) == before


def _assert_applied(
    world: _World, delivery: Delivery, payload: bytes, headers: dict[str, str]
) -> None:
    response = _ingest(world, delivery.entry, payload, headers)
    if delivery.entry == "receive":
        assert (response.status_code, response.outcome) == (200, EventOutcome.PENDING), response
        assert world.billing.webhooks.process_pending() == 1
        with world.storage.transaction() as tx:
            stored = tx.get_event(delivery.event["id"])
        assert stored is not None and stored.outcome is EventOutcome.APPLIED, stored
    else:
        assert (response.status_code, response.outcome) == (200, EventOutcome.APPLIED), response
    customer = world.billing.customers.get("acme", world.customer_ids[delivery.mode])
    assert customer.email == delivery.event["data"]["object"]["email"]
    other = Mode.LIVE if delivery.mode is Mode.TEST else Mode.TEST
    assert world.billing.customers.get("acme", world.customer_ids[other]).email == "old@example.com"
    assert world.stripe.calls == []


# -- header mutations -----------------------------------------------------------------


def _corrupt_hex(draw: st.DrawFn, sig: str) -> str:
    how = draw(st.sampled_from(["flip", "truncate", "extend", "non_hex", "swap"]))
    i = draw(st.integers(0, len(sig) - 1))
    if how == "flip":
        return sig[:i] + draw(st.sampled_from([c for c in HEX if c != sig[i]])) + sig[i + 1 :]
    if how == "truncate":
        return sig[:i]
    if how == "extend":
        return sig[:i] + draw(st.sampled_from(HEX)) + sig[i:]
    if how == "non_hex":
        return sig[:i] + draw(st.sampled_from("gxyzG-+ /=.")) + sig[i + 1 :]
    j = draw(st.integers(0, len(sig) - 1))
    assume(sig[i] != sig[j])
    chars = list(sig)
    chars[i], chars[j] = chars[j], chars[i]
    return "".join(chars)


HEADER_MUTATIONS = [
    "drop_t",
    "duplicate_t",
    "drop_v1",
    "corrupt_t",
    "corrupt_v1",
    "whitespace_inside",
    "separator",
    "garbage",
    "empty",
    "missing",
    "v1_as_v0",
]


def _mutate_header(draw: st.DrawFn, delivery: Delivery, kind: str) -> dict[str, str] | None:
    """A header that no longer carries a valid signature (None: no header at all)."""
    t, v1 = delivery.entries()
    entries: Entries
    if kind == "drop_t":
        entries = [v1]
    elif kind == "duplicate_t":
        entries = [t, v1, ("t", draw(st.one_of(st.just(t[1]), st.builds(str, st.integers(0)))))]
    elif kind == "drop_v1":
        entries = [t]
    elif kind == "corrupt_t":
        bad = draw(
            st.one_of(
                st.integers(0, 2 * TS).filter(lambda v: v != TS).map(str),
                st.text(max_size=12).filter(lambda s: not (s.isascii() and s.isdigit())),
                st.just(f"{TS}.0"),
                st.just(f"-{TS}"),
                st.just(f"+{TS}"),
            )
        )
        entries = [("t", bad), v1]
    elif kind == "corrupt_v1":
        entries = [t, ("v1", _corrupt_hex(draw, v1[1]))]
    elif kind == "whitespace_inside":
        target = draw(st.sampled_from([0, 1]))
        key, value = (t, v1)[target]
        i = draw(st.integers(1, len(value) - 1))
        value = value[:i] + draw(st.sampled_from([" ", "\t", "\u00a0", "\n"])) + value[i:]
        entries = [t, v1]
        entries[target] = (key, value)
    elif kind == "separator":
        sep = draw(st.sampled_from([";", " ", "&", "\n", ", ", ",,"]))
        if sep in (", ", ",,"):
            # Tolerated separators: break the signature another way instead.
            return _header([t, ("v1", _corrupt_hex(draw, v1[1]))], sep)
        return _header([t, v1], sep)
    elif kind == "garbage":
        return {"Stripe-Signature": draw(st.text(max_size=200))}
    elif kind == "empty":
        return {"Stripe-Signature": ""}
    elif kind == "missing":
        return None
    else:  # the genuine signature moved to a v0 entry, which is never checked
        entries = [t, ("v0", v1[1])]
    return _header(draw(harmless_decorations(entries, v1[1])))


@pytest.mark.parametrize("kind", HEADER_MUTATIONS)
@settings(max_examples=50)
@given(delivery=deliveries(), data=st.data())
def test_mutated_signature_header_is_rejected_and_changes_nothing(
    kind: str, delivery: Delivery, data: st.DataObject
) -> None:
    """A dropped, duplicated, corrupted or garbled Stripe-Signature gets 400 and changes no state."""
    world = _world()
    headers = _mutate_header(data.draw, delivery, kind)
    _assert_rejected(
        world, delivery, delivery.payload, headers or {"Content-Type": "application/json"}
    )


# -- body mutations ---------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["flip", "insert", "delete", "reencode"])
@settings(max_examples=80)
@given(delivery=deliveries(), data=st.data())
def test_body_altered_by_one_byte_is_rejected_and_changes_nothing(
    kind: str, delivery: Delivery, data: st.DataObject
) -> None:
    """Flipping, inserting or deleting one byte, or re-encoding the JSON, gets 400 and changes nothing."""
    world = _world()
    body = bytearray(delivery.payload)
    if kind == "reencode":
        reencoded = json.dumps(json.loads(body), separators=(",", ":"), sort_keys=True)
        altered = reencoded.encode()
    else:
        i = data.draw(st.integers(0, len(body) - (0 if kind == "insert" else 1)))
        if kind == "flip":
            body[i] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "insert":
            body.insert(i, data.draw(st.integers(0, 255)))
        else:
            del body[i]
        altered = bytes(body)
    assume(altered != delivery.payload)
    headers = _header(data.draw(harmless_decorations(delivery.entries(), delivery.signature)))
    _assert_rejected(world, delivery, altered, headers)


# -- timestamp mutations ----------------------------------------------------------------


@pytest.mark.parametrize("later", [False, True], ids=["stale", "future"])
@settings(max_examples=100)
@given(delivery=deliveries(), shift=st.integers(TOLERANCE + 1, 10**9))
def test_signature_outside_the_tolerance_is_rejected_and_changes_nothing(
    later: bool, delivery: Delivery, shift: int
) -> None:
    """A correct signature made more than the tolerance before or after now gets 400."""
    world = _world()
    stamp = TS + shift if later else max(TS - shift, 0)
    headers = sign_payload(delivery.payload, delivery.secret, timestamp=stamp)
    _assert_rejected(world, delivery, delivery.payload, headers)


# -- secret mutations ---------------------------------------------------------------------


@st.composite
def wrong_secrets(draw: st.DrawFn) -> str:
    configured = {s for secrets in SECRETS.values() for s in secrets}
    real = draw(st.sampled_from(sorted(configured)))
    secret = draw(
        st.one_of(
            st.builds(lambda s: "whsec_" + s, st.text(alphabet=string.ascii_letters, max_size=32)),
            st.just(real[:-1]),
            st.just(real + "x"),
            st.just(real.upper()),
            st.just(real.removeprefix("whsec_")),
            st.just(" " + real),
            st.just("sk_test_fuzz"),
            st.just("sk_live_fuzz"),
        )
    )
    assume(secret not in configured)
    return secret


@settings(max_examples=250)
@given(delivery=deliveries(), secret=wrong_secrets(), data=st.data())
def test_wrong_secret_is_rejected_and_changes_nothing(
    delivery: Delivery, secret: str, data: st.DataObject
) -> None:
    """A signature made with a secret that is not configured gets 400 and changes nothing."""
    world = _world()
    forged = attrs.evolve(delivery, secret=secret)
    headers = _header(data.draw(harmless_decorations(forged.entries(), forged.signature)))
    _assert_rejected(world, delivery, delivery.payload, headers)


@settings(max_examples=150)
@given(delivery=deliveries(modes=(Mode.LIVE,)), data=st.data())
def test_live_event_signed_only_by_test_secrets_is_rejected(
    delivery: Delivery, data: st.DataObject
) -> None:
    """A livemode=true event whose only valid signatures come from test secrets gets 400 (§4a.2)."""
    world = _world()
    signed_by = data.draw(
        st.lists(st.sampled_from(SECRETS[Mode.TEST]), min_size=1, max_size=2, unique=True)
    )
    entries: Entries = [("t", str(TS))]
    entries += [("v1", attrs.evolve(delivery, secret=s).signature) for s in signed_by]
    decorated = data.draw(harmless_decorations(entries, delivery.signature))
    _assert_rejected(world, delivery, delivery.payload, _header(decorated))


# -- what must still be accepted ------------------------------------------------------------


@settings(max_examples=100)
@given(delivery=deliveries(fresh_id=True))
def test_unchanged_signed_delivery_is_accepted(delivery: Delivery) -> None:
    """The unmutated delivery is applied, so the fuzzer cannot pass by rejecting everything."""
    world = _world()
    _assert_applied(
        world,
        delivery,
        delivery.payload,
        sign_payload(delivery.payload, delivery.secret, timestamp=TS),
    )


_NAME_CASES: list[Callable[[str], str]] = [str, str.lower, str.upper, str.swapcase]


@settings(max_examples=250)
@given(
    delivery=deliveries(fresh_id=True),
    data=st.data(),
    shift=st.integers(-TOLERANCE, TOLERANCE),
    name_case=st.sampled_from(_NAME_CASES),
)
def test_mutations_that_keep_a_valid_signature_are_accepted(
    delivery: Delivery, data: st.DataObject, shift: int, name_case: Callable[[str], str]
) -> None:
    """Reordered entries, extra v1/v0 entries, a second valid v1, any header-name case and a stamp within tolerance are accepted."""
    world = _world()
    stamp = TS + shift
    entries: Entries = [("t", str(stamp)), ("v1", _v1(delivery.payload, delivery.secret, stamp))]
    if data.draw(st.booleans()):  # a second valid signature, as during a secret rotation
        other = data.draw(st.sampled_from([*SECRETS[Mode.TEST], LIVE_SECRET]))
        entries.append(("v1", _v1(delivery.payload, other, stamp)))
    decorated = data.draw(harmless_decorations(entries, entries[1][1]))
    headers = {name_case("Stripe-Signature"): _header(decorated)["Stripe-Signature"]}
    _assert_applied(world, delivery, delivery.payload, headers)
