"""The ``rational-billing`` command: ``demo``, ``doctor`` and ``events replay``.

Configuration comes from ``RB_*`` environment variables or ``--config FILE``
(TOML); see `BillingConfig.from_env` and `BillingConfig.from_toml`.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._config import BillingConfig, Mode, ModeKeys
from .errors import BillingError, InvalidArgument
from .services.webhooks import WebhookResponse

if TYPE_CHECKING:
    from .billing import Billing

__all__ = ["main"]

_DEMO_SECRET = "whsec_rational_billing_demo"  # noqa: S105 - a demo value, not a secret
_DEMO_KEY = "sk_test_rational_billing_demo"  # localstripe accepts any sk_test_ key


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = argparse.ArgumentParser(prog="rational-billing", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="run a short demo against localstripe and SQLite")
    demo.add_argument("--db", help="SQLite file to use (default: a new temporary file)")
    doctor = commands.add_parser("doctor", help="check the configuration and the storage")
    doctor.add_argument("--config", help="TOML configuration file (default: RB_* variables)")
    _add_events_commands(commands)
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            return _demo(args.db)
        if args.command == "events":
            return _events_replay(args)
        return _doctor(args.config)
    except BillingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _step(text: str) -> None:
    print(f"\n==> {text}")


def _demo(db: str | None) -> int:
    from .billing import Billing
    from .demo import configure_webhook, start_localstripe
    from .demo._receiver import WebhookReceiver
    from .storage.sql import SQLStorage

    with tempfile.TemporaryDirectory(prefix="rb-demo-") as folder:
        path = Path(db) if db else Path(folder) / "demo.db"
        _step("starting localstripe (a local Stripe-compatible server, in memory)")
        with start_localstripe() as server:
            print(f"    {server.url}")
            config = BillingConfig(
                test=ModeKeys(secret_key=_DEMO_KEY, webhook_secrets=(_DEMO_SECRET,)),
                api_base=server.url,
                storage_url=f"sqlite:///{path}",
            )
            billing = Billing(config=config, storage=SQLStorage(config.storage_url))
            arrived = threading.Event()
            seen: list[WebhookResponse] = []

            def on_response(response: WebhookResponse) -> None:
                seen.append(response)
                arrived.set()

            receiver = WebhookReceiver(billing.webhooks.handle, on_response)
            try:
                configure_webhook(
                    server.url, "demo", receiver.url, _DEMO_SECRET, events=["customer.updated"]
                )
                return _demo_steps(billing, seen, arrived, path)
            finally:
                receiver.close()
                billing.close()


def _demo_steps(
    billing: Billing, seen: list[WebhookResponse], arrived: threading.Event, path: Path
) -> int:
    _step(f"storage: SQLite file {path}")
    billing.tenants.register_direct("demo-shop", modes=frozenset({Mode.TEST}))
    print("    registered tenant 'demo-shop' on the platform's own account (test mode)")

    _step("creating a customer locally (no Stripe call: free tier)")
    customer = billing.customers.create("demo-shop", email="ada@example.com", name="Ada Lovelace")
    print(f"    {customer.id}  email={customer.email}  link={customer.link}")

    _step("creating the customer in Stripe and linking it")
    customer = billing.customers.create_in_stripe("demo-shop", customer.id, mode=Mode.TEST)
    assert customer.link is not None
    stripe_id = customer.link.stripe_customer_id
    print(
        f"    linked to {stripe_id} ({customer.link.mode.value} mode), sync={customer.sync_state.value}"
    )

    _step("changing the name locally: pushed to Stripe through the outbox")
    customer = billing.customers.update("demo-shop", customer.id, name="Ada King")
    remote = billing.stripe.request(
        "GET", f"/v1/customers/{stripe_id}", mode=Mode.TEST, account=None
    )
    print(
        f"    local name={customer.name!r}, Stripe name={remote['name']!r}, sync={customer.sync_state.value}"
    )

    _step("changing the email in Stripe: a signed customer.updated webhook comes back")
    arrived.clear()
    seen.clear()
    billing.stripe.request(
        "POST",
        f"/v1/customers/{stripe_id}",
        mode=Mode.TEST,
        account=None,
        params={"email": "ada.king@example.com"},
        idempotency_key=f"demo-{time.time_ns()}",
    )
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        current = billing.customers.get("demo-shop", customer.id)
        if current.email == "ada.king@example.com":
            break
        arrived.wait(0.1)
    else:
        print("    no webhook arrived within 15 s", file=sys.stderr)
        return 1
    for response in seen:
        outcome = response.outcome.value if response.outcome else "rejected"
        print(f"    webhook {response.event_id}: HTTP {response.status_code} {outcome}")
    print(f"    local email is now {current.email!r}")
    _step("done: every step above ran for real against localstripe and SQLite")
    return 0


def _doctor(config_path: str | None) -> int:
    config = BillingConfig.from_toml(config_path) if config_path else BillingConfig.from_env()
    problems = 0
    for mode in Mode:
        keys = config.keys_for(mode)
        if keys is None:
            print(f"[--] {mode.value}: not configured")
            continue
        print(f"[ok] {mode.value}: secret key prefix matches the mode")
        if not keys.webhook_secrets:
            print(f"[!!] {mode.value}: no webhook secret; webhooks in this mode will be rejected")
            problems += 1
        else:
            print(f"[ok] {mode.value}: {len(keys.webhook_secrets)} webhook secret(s)")
    from .billing import _default_storage

    try:
        storage = _default_storage(config)
        with storage.transaction() as tx:
            tx.direct_tenant()
        storage.close()
        print("[ok] storage is reachable and its schema is current")
    except BillingError as exc:
        print(f"[!!] storage: {exc}")
        problems += 1
    return 1 if problems else 0


# -- events replay ------------------------------------------------------------------


def _add_events_commands(commands: Any) -> None:
    events = commands.add_parser("events", help="stored webhook events")
    actions = events.add_subparsers(dest="events_command", required=True)
    replay = actions.add_parser(
        "replay",
        help="apply stored events again through the handlers (idempotent)",
        description="Apply stored webhook events again, each in its own transaction. "
        "Filters combine; at least one is required.",
    )
    replay.add_argument(
        "--since", metavar="ISO", help="events received at or after this time (UTC if no offset)"
    )
    replay.add_argument(
        "--type", dest="types", action="append", metavar="TYPE", help="only this type (repeatable)"
    )
    replay.add_argument(
        "--id", dest="ids", action="append", metavar="EVENT_ID", help="this event (repeatable)"
    )
    replay.add_argument("--config", help="TOML configuration file (default: RB_* variables)")


def _parse_since(text: str | None) -> datetime | None:
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgument(f"--since {text!r} is not an ISO 8601 time") from None
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _events_replay(args: argparse.Namespace) -> int:
    from .billing import Billing

    if not (args.since or args.types or args.ids):
        print(
            "error: pass --since, --type or --id (replaying everything is not a default)",
            file=sys.stderr,
        )
        return 2
    since = _parse_since(args.since)
    config = BillingConfig.from_toml(args.config) if args.config else BillingConfig.from_env()
    billing = Billing(config=config)
    try:
        report = billing.webhooks.replay(args.ids, since=since, types=args.types)
    finally:
        billing.close()
    counts = ", ".join(f"{n} {o.value}" for o, n in sorted(report.outcomes.items(), key=str))
    print(f"replayed {report.replayed} event(s)" + (f": {counts}" if counts else ""))
    for event_id in report.failed:
        print(f"[!!] {event_id} failed again; it is recorded as failed and will be retried")
    for event_id in report.missing:
        print(f"[!!] {event_id} is not stored (or has no stored body)")
    return 1 if report.failed or report.missing else 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
