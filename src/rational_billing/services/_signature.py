"""Stripe webhook signatures: parse ``Stripe-Signature``, check HMAC-SHA256 in constant time.

Implemented directly (hmac + hashlib) rather than through ``stripe.Webhook``,
which builds SDK objects and costs about 40 times as much per event (§4a.12).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from .._config import Mode
from ..errors import WebhookSignatureError

__all__ = ["SigningSecret", "compute_signature", "verify_signature"]

#: A webhook secret as bytes, with the mode of the slot it was configured in.
SigningSecret = tuple[bytes, Mode]

_MAX_HEADER = 4096
_SHA256_HEX_LEN = 64


def compute_signature(payload: bytes, secret: str | bytes, timestamp: int) -> str:
    """The hex ``v1`` signature Stripe sends for ``payload`` at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(key, signed, hashlib.sha256).hexdigest()


def _parse_header(header: str) -> tuple[int, list[bytes]]:
    if len(header) > _MAX_HEADER:
        raise WebhookSignatureError("Stripe-Signature header is too long")
    timestamp: int | None = None
    signatures: list[bytes] = []
    for part in header.split(","):
        name, sep, value = part.strip().partition("=")
        if not sep:
            raise WebhookSignatureError("Stripe-Signature header is garbled")
        if name == "t":
            if timestamp is not None or not value.isascii() or not value.isdigit():
                raise WebhookSignatureError("Stripe-Signature header has a bad timestamp")
            timestamp = int(value)
        elif name == "v1":
            if len(value) != _SHA256_HEX_LEN or not value.isascii():
                raise WebhookSignatureError("Stripe-Signature header has a malformed v1 entry")
            signatures.append(value.lower().encode("ascii"))
        # Other schemes (v0, future ones) are ignored, as Stripe advises.
    if timestamp is None:
        raise WebhookSignatureError("Stripe-Signature header has no timestamp")
    if not signatures:
        raise WebhookSignatureError("Stripe-Signature header has no v1 signature")
    return timestamp, signatures


def verify_signature(
    payload: bytes,
    header: str | None,
    secrets: Sequence[SigningSecret],
    *,
    now: float,
    tolerance: int,
) -> frozenset[Mode]:
    """Check ``header`` against ``payload``; return the modes of the secrets that verify it.

    Every ``v1`` entry is compared with every secret in constant time, so a
    rotated secret and several signatures in one header both work.

    Raises:
        WebhookSignatureError: the header is missing or garbled, the timestamp
            is outside ``tolerance`` seconds of ``now`` (either way), or no
            configured secret produced any of the signatures.
    """
    if not header:
        raise WebhookSignatureError("missing Stripe-Signature header")
    timestamp, signatures = _parse_header(header)
    if abs(now - timestamp) > tolerance:
        raise WebhookSignatureError(
            f"Stripe-Signature timestamp is outside the {tolerance}s tolerance"
        )
    signed = str(timestamp).encode() + b"." + payload
    modes: set[Mode] = set()
    for key, mode in secrets:
        expected = hmac.new(key, signed, hashlib.sha256).hexdigest().encode("ascii")
        for candidate in signatures:
            if hmac.compare_digest(expected, candidate):
                modes.add(mode)
    if not modes:
        raise WebhookSignatureError("no configured webhook secret matches the signature")
    return frozenset(modes)
