"""Argument checks shared by the services: bad input fails before anything is written."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .._config import Mode
from ..errors import ConfigError, InvalidArgument

__all__ = ["check_local_id", "check_stripe_id", "check_email", "check_metadata", "check_mode"]

_LOCAL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,254}$")
_STRIPE_ID = re.compile(r"^[A-Za-z0-9_]{1,255}$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+$")
_METADATA_MAX_KEYS = 50
_METADATA_KEY_MAX = 40
_METADATA_VALUE_MAX = 500


def check_local_id(value: object, what: str) -> str:
    """A tenant, customer or product id: 1-255 visible characters, no blanks."""
    if not isinstance(value, str) or not _LOCAL_ID.match(value):
        raise InvalidArgument(
            f"malformed {what} {value!r}: use 1-255 letters, digits or _.:@- (starting alphanumeric)"
        )
    return value


def check_stripe_id(value: object, prefix: str, what: str) -> str:
    """A Stripe id with the expected prefix, such as ``cus_`` or ``acct_``."""
    if not isinstance(value, str) or not value.startswith(prefix) or not _STRIPE_ID.match(value):
        raise InvalidArgument(f"malformed {what} {value!r}: expected an id starting with {prefix}")
    return value


def check_email(value: object) -> str | None:
    """None, or something shaped like an email address."""
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 512 or not _EMAIL.match(value):
        raise InvalidArgument(f"malformed email {value!r}")
    return value


def check_metadata(value: object, *, allow_none_values: bool = False) -> dict[str, Any]:
    """Metadata as Stripe accepts it: up to 50 string keys of 40 chars, values of 500."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidArgument("metadata must be a mapping of strings to strings")
    if len(value) > _METADATA_MAX_KEYS:
        raise InvalidArgument(f"metadata has more than {_METADATA_MAX_KEYS} keys")
    checked: dict[str, Any] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key or len(key) > _METADATA_KEY_MAX or "[" in key:
            raise InvalidArgument(f"malformed metadata key {key!r}")
        if item is None and allow_none_values:
            checked[key] = None
            continue
        if not isinstance(item, str) or len(item) > _METADATA_VALUE_MAX:
            raise InvalidArgument(
                f"metadata value for {key!r} must be a string of at most 500 characters"
            )
        checked[key] = item
    return checked


def check_mode(value: object) -> Mode:
    """A `Mode`, or a string naming one."""
    try:
        return Mode.parse(value)  # type: ignore[arg-type]
    except ConfigError as exc:
        raise InvalidArgument(str(exc)) from None
