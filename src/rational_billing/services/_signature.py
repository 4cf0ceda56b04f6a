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

__all__ = ["SignatureVerifier", "SigningSecret", "compute_signature", "verify_signature"]

#: A webhook secret as bytes, with the mode of the slot it was configured in.
SigningSecret = tuple[bytes, Mode]

_MAX_HEADER = 4096
_SHA256_HEX_LEN = 64
_sha256 = hashlib.sha256


def compute_signature(payload: bytes, secret: str | bytes, timestamp: int) -> str:
    """The hex ``v1`` signature Stripe sends for ``payload`` at ``timestamp``."""
    key = secret.encode() if isinstance(secret, str) else secret
    signed = str(timestamp).encode() + b"." + payload
    return hmac.new(key, signed, _sha256).hexdigest()


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


def _signed_content(
    payload: bytes, header: str | None, *, now: float, tolerance: int
) -> tuple[bytes, list[bytes]]:
    """What the HMAC covers (``t.payload``) and the header's ``v1`` signatures."""
    if not header:
        raise WebhookSignatureError("missing Stripe-Signature header")
    timestamp, signatures = _parse_header(header)
    if abs(now - timestamp) > tolerance:
        raise WebhookSignatureError(
            f"Stripe-Signature timestamp is outside the {tolerance}s tolerance"
        )
    return str(timestamp).encode() + b"." + payload, signatures


def _matches(key: bytes, signed: bytes, signatures: list[bytes]) -> bool:
    # The one-shot form: no HMAC object (hmac.new) for each delivery.
    expected = hmac.digest(key, signed, _sha256).hex().encode("ascii")
    # No early exit: every candidate is compared, each in constant time.
    found = False
    for candidate in signatures:
        found |= hmac.compare_digest(expected, candidate)
    return found


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
    signed, signatures = _signed_content(payload, header, now=now, tolerance=tolerance)
    modes = frozenset(mode for key, mode in secrets if _matches(key, signed, signatures))
    if not modes:
        raise WebhookSignatureError("no configured webhook secret matches the signature")
    return modes


class SignatureVerifier:
    """Checks signatures against the configured secrets, stopping at the first that matches.

    The router needs to know whether *a* secret verifies the body and, only
    for a ``livemode=true`` event, whether a *live* one does (§4a.2). Trying
    secrets in order and stopping at the first match costs one HMAC for most
    deliveries instead of one per configured secret.
    """

    __slots__ = ("_live", "_secrets")

    def __init__(self, secrets: Sequence[SigningSecret]) -> None:
        self._secrets = tuple(secrets)
        self._live = tuple(key for key, mode in secrets if mode is Mode.LIVE)

    def verify(self, payload: bytes, header: str | None, *, now: float, tolerance: int) -> Mode:
        """The mode of the first configured secret that verifies ``payload``.

        Raises:
            WebhookSignatureError: as `verify_signature`.
        """
        signed, signatures = _signed_content(payload, header, now=now, tolerance=tolerance)
        for key, mode in self._secrets:
            if _matches(key, signed, signatures):
                return mode
        raise WebhookSignatureError("no configured webhook secret matches the signature")

    def verified_by_live(
        self, payload: bytes, header: str | None, *, now: float, tolerance: int
    ) -> bool:
        """True when a live-mode secret verifies ``payload`` (for live events)."""
        signed, signatures = _signed_content(payload, header, now=now, tolerance=tolerance)
        return any(_matches(key, signed, signatures) for key in self._live)
