"""A small Stripe-shaped HTTP server that honours idempotency keys, for fault tests.

localstripe has no idempotency (DESIGN.md §4a.15), so lost responses, timeouts
and crashes are tested against this instead. It serves the customer endpoints
the library uses, per connected account (``Stripe-Account``):

- ``POST /v1/customers``, ``GET /v1/customers?email=``, ``GET|POST|DELETE
  /v1/customers/{id}``;
- ``Idempotency-Key`` like Stripe's: the same key with the same parameters
  replays the saved answer (``Idempotent-Replayed: true``); with other
  parameters it is a 400 ``idempotency_error``. 5xx answers of a request
  that started executing are saved and replayed too;
- faults, queued with `FakeStripe.fail_next`: ``drop`` (do the work, then
  close the connection without answering), ``timeout`` (do the work, then
  answer too late), ``error`` (answer a status without doing the work, and
  save it under the key like Stripe does).

`FakeStripe.forget_keys` simulates Stripe forgetting keys after 24 hours.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import attrs

__all__ = ["Fault", "FakeStripe", "Recorded"]


@attrs.frozen
class Fault:
    """One injected failure, matched on method and path prefix."""

    kind: str  # "drop" | "timeout" | "error"
    method: str = "POST"
    path: str = "/v1/customers"
    status: int = 500
    delay: float = 2.0
    save: bool = True  # "error": saved under the idempotency key, so retries replay it
    commit: bool = False  # "error": the work was done before the error


@attrs.frozen
class Recorded:
    """One request the server received."""

    method: str
    path: str
    query: Mapping[str, str]
    form: Mapping[str, str]
    headers: Mapping[str, str]
    replayed: bool


def _nest(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Stripe's form encoding back to nested dicts (``metadata[k]=v``)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if "[" in key and key.endswith("]"):
            head, rest = key.split("[", 1)
            out.setdefault(head, {})[rest[:-1]] = value
        else:
            out[key] = value
    return out


class FakeStripe:
    """The server; use it as a context manager. ``url`` is its base address."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._customers: dict[tuple[str, str], dict[str, Any]] = {}
        self._saved: dict[tuple[str, str], tuple[str, int, bytes]] = {}
        self._faults: list[Fault] = []
        self.requests: list[Recorded] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()
        host, port = self._server.server_address[:2]
        self.url = f"http://{host!s}:{port}"

    def __enter__(self) -> FakeStripe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._thread.join()
        self._server.server_close()

    # -- test controls ---------------------------------------------------------------
    def fail_next(self, kind: str, *, times: int = 1, **options: Any) -> None:
        """Queue ``times`` faults of ``kind`` for the next matching requests."""
        with self._lock:
            self._faults.extend(Fault(kind, **options) for _ in range(times))

    def forget_keys(self) -> None:
        """Forget every saved idempotent answer, as Stripe may after 24 hours."""
        with self._lock:
            self._saved.clear()

    def customers(self, account: str = "") -> list[dict[str, Any]]:
        """The live (not deleted) customers of ``account`` ('' is the platform)."""
        with self._lock:
            return [
                dict(c)
                for (acct, _), c in self._customers.items()
                if acct == account and not c.get("deleted")
            ]

    def add_customer(self, account: str = "", **fields: Any) -> dict[str, Any]:
        """Create a customer directly (as the dashboard would)."""
        with self._lock:
            return dict(self._create(account, fields))

    def calls(self, method: str | None = None, path: str | None = None) -> list[Recorded]:
        """The recorded requests, optionally filtered."""
        with self._lock:
            return [
                r
                for r in self.requests
                if (method is None or r.method == method) and (path is None or r.path == path)
            ]

    # -- the API -------------------------------------------------------------------------
    def _create(self, account: str, fields: Mapping[str, Any]) -> dict[str, Any]:
        customer = {
            "id": f"cus_{uuid.uuid4().hex[:14]}",
            "object": "customer",
            "created": int(time.time()),
            "email": fields.get("email") or None,
            "name": fields.get("name") or None,
            "metadata": {k: v for k, v in dict(fields.get("metadata") or {}).items() if v},
            "livemode": False,
        }
        self._customers[(account, customer["id"])] = customer
        return customer

    def _dispatch(
        self, method: str, path: str, account: str, query: Mapping[str, str], form: dict[str, Any]
    ) -> tuple[int, dict[str, Any]]:
        parts = path.strip("/").split("/")
        if parts[:2] != ["v1", "customers"] or len(parts) > 3:
            return 404, _error("resource_missing", f"Unrecognized request URL ({path})")
        if len(parts) == 2:
            if method == "POST":
                return 200, self._create(account, form)
            found = [
                c
                for (acct, _), c in self._customers.items()
                if acct == account
                and not c.get("deleted")
                and ("email" not in query or c["email"] == query["email"])
            ]
            found.sort(key=lambda c: (c["created"], c["id"]), reverse=True)
            limit = int(query.get("limit", "10"))
            return 200, {
                "object": "list",
                "data": found[:limit],
                "has_more": len(found) > limit,
                "url": "/v1/customers",
            }
        customer = self._customers.get((account, parts[2]))
        if customer is None:
            return 404, _error("resource_missing", f"No such customer: '{parts[2]}'")
        if customer.get("deleted"):
            if method == "GET":
                return 200, {"id": customer["id"], "object": "customer", "deleted": True}
            return 404, _error("resource_missing", f"No such customer: '{parts[2]}'")
        if method == "DELETE":
            customer["deleted"] = True
            return 200, {"id": customer["id"], "object": "customer", "deleted": True}
        if method == "POST":
            for key in ("email", "name"):
                if key in form:
                    customer[key] = form[key] or None
            for key, value in dict(form.get("metadata") or {}).items():
                if value:
                    customer["metadata"][key] = value
                else:
                    customer["metadata"].pop(key, None)
        return 200, customer

    def _serve(self, request: BaseHTTPRequestHandler, method: str) -> None:
        split = urlsplit(request.path)
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length).decode() if length else ""
        form_pairs = parse_qsl(body, keep_blank_values=True)
        query = dict(parse_qsl(split.query, keep_blank_values=True))
        headers = {k: v for k, v in request.headers.items()}
        account = request.headers.get("Stripe-Account") or ""
        key = request.headers.get("Idempotency-Key")
        fingerprint = json.dumps([method, split.path, sorted(form_pairs)])
        with self._lock:
            fault = self._take_fault(method, split.path)
            saved = None if key is None else self._saved.get((account, key))
            replayed = saved is not None
            self.requests.append(
                Recorded(method, split.path, query, dict(form_pairs), headers, replayed)
            )
            if saved is not None:
                if saved[0] != fingerprint:
                    status, payload = (
                        400,
                        _error(
                            "idempotency_error",
                            "Keys for idempotent requests can only be used with the same parameters",
                        ),
                    )
                    raw = json.dumps(payload).encode()
                else:
                    status, raw = saved[1], saved[2]
            elif fault is not None and fault.kind == "error":
                if fault.commit:
                    self._dispatch(method, split.path, account, query, _nest(form_pairs))
                status = fault.status
                raw = json.dumps(_error("api_error", "Something went wrong")).encode()
                if key is not None and fault.save:
                    self._saved[(account, key)] = (fingerprint, status, raw)
            else:
                status, payload = self._dispatch(
                    method, split.path, account, query, _nest(form_pairs)
                )
                raw = json.dumps(payload).encode()
                if key is not None and method in ("POST", "DELETE"):
                    self._saved[(account, key)] = (fingerprint, status, raw)
        if fault is not None and fault.kind == "drop" and not replayed:
            request.close_connection = True
            return  # the work is done; the answer never leaves
        if fault is not None and fault.kind == "timeout" and not replayed:
            time.sleep(fault.delay)
        try:
            request.send_response(status)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(raw)))
            request.send_header("Request-Id", f"req_{uuid.uuid4().hex[:14]}")
            if replayed:
                request.send_header("Idempotent-Replayed", "true")
            request.end_headers()
            request.wfile.write(raw)
        except OSError:
            pass  # the client gave up (a timeout): like Stripe, the work stays done

    def _take_fault(self, method: str, path: str) -> Fault | None:
        for i, fault in enumerate(self._faults):
            if fault.method == method and path.startswith(fault.path):
                return self._faults.pop(i)
        return None

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class _Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                fake._serve(self, "GET")

            def do_POST(self) -> None:
                fake._serve(self, "POST")

            def do_DELETE(self) -> None:
                fake._serve(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return _Handler


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"type": "invalid_request_error", "code": code, "message": message}}
