"""The package's one cattrs converter: models to and from JSON-ready data.

It is private on purpose: the global cattrs converter belongs to the host app.
Structuring errors name the class and the field that failed.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType
from typing import Any, TypeVar

import cattrs

from .models import freeze, utc

__all__ = ["converter", "structure", "unstructure"]

T = TypeVar("T")

converter = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)

converter.register_unstructure_hook(datetime, lambda d: utc(d).isoformat())
converter.register_structure_hook(datetime, lambda v, _: utc(datetime.fromisoformat(v)))
converter.register_unstructure_hook(bytes, lambda b: base64.b64encode(b).decode("ascii"))
converter.register_structure_hook(bytes, lambda v, _: base64.b64decode(v))
converter.register_unstructure_hook(
    MappingProxyType, lambda m: {k: converter.unstructure(v) for k, v in m.items()}
)


def _structure_mapping(value: Any, type_: Any) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise TypeError(f"expected a mapping, got {type(value).__name__}")
    args = getattr(type_, "__args__", ())
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"mapping key {key!r} is not a string")
        if args and args[-1] is str and not isinstance(item, str):
            raise TypeError(f"value for {key!r} is not a string")
    return freeze(value)


converter.register_structure_hook_func(
    lambda t: getattr(t, "__origin__", None) is Mapping, _structure_mapping
)
converter.register_unstructure_hook_func(
    lambda t: t is frozenset or getattr(t, "__origin__", None) is frozenset,
    lambda s: sorted(converter.unstructure(x) for x in s),
)


def unstructure(obj: Any) -> Any:
    """Plain, JSON-ready data for a model (or anything the converter knows)."""
    return converter.unstructure(obj)


def structure(data: Any, cls: type[T]) -> T:
    """Build ``cls`` from plain data.

    Raises:
        cattrs.errors.ClassValidationError: naming the class and failing fields.
    """
    return converter.structure(data, cls)
