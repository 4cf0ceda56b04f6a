"""A tiny HTTP endpoint that hands webhook deliveries to `WebhookRouter.handle` (demo only).

A real app would use ``rational_billing.contrib.flask`` or ``.django``; the
demo needs no framework, so it uses the standard library's server.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..services.webhooks import WebhookResponse

__all__ = ["WebhookReceiver"]


class WebhookReceiver:
    """Serves ``POST /`` on 127.0.0.1 and answers with what ``handle`` returns."""

    def __init__(
        self,
        handle: Callable[[bytes, Mapping[str, str]], WebhookResponse],
        on_response: Callable[[WebhookResponse], None] | None = None,
    ) -> None:
        receiver = self

        class _Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                response = handle(body, dict(self.headers.items()))
                if receiver._on_response is not None:
                    receiver._on_response(response)
                self.send_response(response.status_code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(response.body)

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._on_response = on_response
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """Where to send webhooks."""
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}/"

    def close(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()
