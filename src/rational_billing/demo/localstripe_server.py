"""Run localstripe in memory, bound to one address.

Usage: ``python -m rational_billing.demo.localstripe_server --host 127.0.0.1 --port 0``.

localstripe is GPL-3.0+, so this script is the only file of the package that
imports it, and it is only ever run as its own process (DESIGN.md §4a.15).
Nothing else in ``rational_billing`` imports this module; start it from Python
with `rational_billing.demo.start_localstripe`, which uses ``subprocess``.

What this launcher changes, compared with the ``localstripe`` command:

- The store stays in memory. localstripe pickles its whole store to the fixed
  path ``/tmp/localstripe.pickle`` after every write (slow as the store grows,
  and shared by every instance on the machine) and loads it back at start-up.
  Both are switched off here, before the server starts.
- It binds only ``--host`` (default ``127.0.0.1``), not every interface.
- ``--port 0`` picks a free port. Once it listens, one line goes to stdout:
  ``localstripe ready on http://127.0.0.1:PORT``.
- SIGTERM and SIGINT stop it cleanly (exit status 0).
- ``DELETE /_config/webhooks/{name}`` removes a webhook endpoint (localstripe
  can only add or replace one), and adding or removing an endpoint while a
  delivery is under way no longer breaks that delivery.

Quirks of localstripe 1.15 found by reading its source and using it:

- Any key that starts with ``sk_`` (Bearer or Basic auth) is accepted; there
  is one shared store, no Connect (``Stripe-Account`` is ignored), no live
  mode (``livemode`` is always false), no idempotency (``Idempotency-Key`` is
  ignored: a replayed POST creates a second object) and ``Stripe-Version`` is
  ignored.
- Old API shapes: events carry ``api_version`` ``2017-08-15``; there is no
  ``/v1/prices`` (404) and ``items[0][price]`` is a 400: subscriptions take
  ``items[0][plan]`` (or legacy ``plan``) and show ``plan``, ``quantity`` and
  ``current_period_start``/``_end`` on the subscription itself; a customer
  has ``account_balance``, not ``balance``; an invoice has ``subscription``
  at the top level (and also ``parent.subscription_details``) and its
  ``charge`` embedded as an object.
- A subscription has exactly one item (more is answered with 500).
- Lists are oldest first (Stripe lists newest first), with ``has_more`` and
  ``starting_after`` and no upper bound on ``limit``; an unknown filter is a
  400. ``GET /v1/customers`` filters by ``email`` only (no ``created``); no
  Search API.
- A deleted customer is a 404 on retrieve (Stripe answers 200 with
  ``deleted: true``). Updating metadata merges keys, and an empty value is
  stored as ``""`` instead of deleting the key.
- Events: ``customer.created``/``updated``/``deleted``, ``product.created``,
  ``plan.created``, ``customer.subscription.created``/``deleted`` (never
  ``updated``), ``invoice.created``/``payment_succeeded``,
  ``payment_intent.succeeded``, ``payout.*``. ``GET /v1/events`` lists them
  (filters: ``type``, ``created``). The event's object is the state at the
  time of the change.
- Webhooks are configured with ``POST /_config/webhooks/{name}`` (JSON or form:
  ``url``, ``secret``, optional ``events`` list), kept in memory, sent about 1 s
  after the change, never retried, to every endpoint whose filter matches.
  The body is indented JSON; ``Stripe-Signature`` is ``t=<created>,v1=<hex>``,
  an HMAC-SHA256 of ``f"{t}.{body}"`` with the endpoint's secret.
- ``DELETE /_config/data`` empties the store (webhook endpoints stay).
- Cards: a ``PaymentMethod`` with ``card[number]`` 4242424242424242 (or the id
  ``pm_card_visa``) pays; 4000000000000002 is declined on attach (402);
  4000000000000341 (``pm_card_chargeCustomerFail``) attaches but every charge
  fails. A new subscription paid with it stays ``incomplete`` with an ``open``
  invoice, and no ``invoice.payment_failed`` event is sent. An ``active``
  subscription becomes ``past_due`` when a new invoice fails, which happens
  only when it moves to a plan with another interval (no event either).
  ``/v1/tokens`` with ``card[...]`` and ``/v1/customers/{id}/sources`` work too.
- No billing portal, Checkout, Connect accounts, ``/v1/webhook_endpoints``,
  disputes, ``invoice_payment`` objects or ``charge.*`` events (refunds exist
  as objects but send no event).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any

try:
    from aiohttp import web
    from localstripe import server, webhooks
    from localstripe.resources import Store
except ImportError as exc:  # the demo extra is missing
    raise SystemExit(
        f"localstripe is not installed ({exc}): pip install 'rational-billing[demo]'"
    ) from exc

__all__ = ["READY_PREFIX", "main"]

#: The start of the line printed to stdout once the server accepts connections.
READY_PREFIX = "localstripe ready on "


def _keep_store_in_memory() -> None:
    """Stop localstripe from writing and reading ``/tmp/localstripe.pickle``.

    The store calls ``dump_to_disk`` on every item it sets or deletes, and a
    middleware calls it after every POST/PUT/DELETE; replacing the class's
    methods covers both paths.
    """

    def _no_dump(self: Any) -> None:
        return None

    def _no_load(self: Any) -> None:
        return None

    Store.dump_to_disk = _no_dump
    Store.try_load_from_disk = _no_load


def _make_webhook_config_safe() -> None:
    """Replace the endpoint table instead of mutating it, and add ``DELETE``.

    localstripe loops over its endpoint dict while it awaits each delivery, so
    adding an endpoint during a delivery raises "dictionary changed size during
    iteration" and drops the rest of that event's deliveries. Rebinding the
    module's dict leaves the loop iterating the old one.
    ``DELETE /_config/webhooks/{name}`` lets a test remove its own endpoint.
    """

    def register_webhook(name: str, url: str, secret: str, events: list[str] | None) -> None:
        webhooks._webhooks = {**webhooks._webhooks, name: webhooks.Webhook(url, secret, events)}

    async def remove_webhook(request: web.Request) -> web.Response:
        name = request.match_info["id"]
        webhooks._webhooks = {k: v for k, v in webhooks._webhooks.items() if k != name}
        return web.Response()

    # server.py imported the function by name, so replace it there too.
    webhooks.register_webhook = register_webhook
    server.register_webhook = register_webhook
    server.app.router.add_delete("/_config/webhooks/{id}", remove_webhook)


async def _serve(host: str, port: int, *, access_log: bool) -> None:
    _make_webhook_config_safe()
    runner = web.AppRunner(
        server.app,
        access_log=logging.getLogger("aiohttp.access") if access_log else None,
        shutdown_timeout=2.0,
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        site = web.TCPSite(runner, host, port, reuse_address=True)
        await site.start()
        bound_host, bound_port = runner.addresses[0][:2]
        shown = f"[{bound_host}]" if ":" in bound_host else bound_host
        print(f"{READY_PREFIX}http://{shown}:{bound_port}", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments, start localstripe and serve until SIGTERM or SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m rational_billing.demo.localstripe_server",
        description="Run localstripe in memory on one address (dev and demo only).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8420, help="port to bind; 0 picks a free one")
    parser.add_argument(
        "--verbose", action="store_true", help="log requests and webhook deliveries"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")

    _keep_store_in_memory()
    if args.verbose:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    try:
        asyncio.run(_serve(args.host, args.port, access_log=args.verbose))
    except OSError as exc:
        print(f"localstripe could not listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
