"""The package's cattrs converter: models to and from JSON-ready data.

It is private on purpose: the global cattrs converter belongs to the host app.
Structuring errors name the class and the field that failed. A twin of it,
`unstructure_for_orjson`, leaves datetimes and enums for orjson to write, for
the storage's JSON columns: the same text, with less Python per field.
"""

from __future__ import annotations

import base64
import enum
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from types import MappingProxyType, NoneType, UnionType
from typing import Any, Final, TypeVar, Union, get_origin

import cattrs
from cattrs.fns import identity

from .models import freeze, utc

__all__ = [
    "MAPPINGS",
    "converter",
    "iso",
    "structure",
    "unstructure",
    "unstructure_for_orjson",
]

#: For ``isinstance`` checks of parsed JSON: ``dict`` first, so that the common
#: case is settled without the `Mapping` ABC's check, a Python-level call on 3.11.
MAPPINGS: Final = (dict, Mapping)

T = TypeVar("T")


def _optional_of(type_: Any) -> Any:
    """``X`` for ``X | None`` (or ``Optional[X]``) with ``X`` a concrete type, else None.

    ``Any | None`` and ``T | None`` (a type variable) are left to cattrs.
    """
    args: tuple[Any, ...] = getattr(type_, "__args__", ())
    if len(args) != 2 or NoneType not in args or get_origin(type_) not in (Union, UnionType):
        return None
    other = args[0] if args[1] is NoneType else args[1]
    return None if other is Any or isinstance(other, TypeVar) else other


def iso(value: datetime) -> str:
    """A datetime as stored: ISO 8601 text in UTC (a naive one is taken to be UTC)."""
    # Model fields are UTC already (their converters see to it).
    return (value if value.tzinfo is UTC else utc(value)).isoformat()


def _structure_mapping(value: Any, type_: Any) -> Mapping[str, Any]:
    if not isinstance(value, MAPPINGS):
        raise TypeError(f"expected a mapping, got {type(value).__name__}")
    args = getattr(type_, "__args__", ())
    for key, item in value.items():
        if not isinstance(key, str):
            raise TypeError(f"mapping key {key!r} is not a string")
        if args and args[-1] is str and not isinstance(item, str):
            raise TypeError(f"value for {key!r} is not a string")
    return freeze(value)


def _new_converter(*, for_orjson: bool) -> cattrs.Converter:
    """The converter; ``for_orjson`` leaves datetimes and enums for orjson to write.

    orjson writes a UTC datetime exactly as ``isoformat()`` does and an enum
    as its value, in native code: the same JSON text, without a Python call
    per field.
    """
    conv = cattrs.Converter(forbid_extra_keys=False, detailed_validation=True)
    if for_orjson:
        # (A datetime subclass, such as freezegun's, orjson hands to the
        # storage's ``default``, which writes it as `iso` does.)
        conv.register_unstructure_hook(datetime, identity)
        conv.register_unstructure_hook_func(
            lambda t: isinstance(t, type) and issubclass(t, enum.Enum), identity
        )
        # A mapping's values have no declared type (a datetime among an
        # outbox entry's params, say): the plain converter writes them.
        conv.register_unstructure_hook_func(
            lambda t: getattr(t, "__origin__", None) is Mapping, unstructure
        )
    else:
        conv.register_unstructure_hook(datetime, iso)
    conv.register_structure_hook(datetime, lambda v, _: utc(datetime.fromisoformat(v)))
    conv.register_unstructure_hook(bytes, lambda b: base64.b64encode(b).decode("ascii"))
    conv.register_structure_hook(bytes, lambda v, _: base64.b64decode(v))
    conv.register_unstructure_hook(
        MappingProxyType, lambda m: {k: unstructure(v) for k, v in m.items()}
    )
    conv.register_structure_hook_func(
        lambda t: getattr(t, "__origin__", None) is Mapping, _structure_mapping
    )
    conv.register_unstructure_hook_func(
        lambda t: t is frozenset or getattr(t, "__origin__", None) is frozenset,
        # Sorted by their plain form (an enum's value), in either converter.
        lambda s: sorted(unstructure(x) for x in s),
    )

    # Every field of the models that may be None goes through one of these,
    # for each webhook that reads or writes a record.
    def unstructure_optional(type_: Any) -> Callable[[Any], Any]:
        # An optional string, number or flag passes through as it is, which
        # lets cattrs inline it in the functions it generates for the models.
        inner = conv.get_unstructure_hook(_optional_of(type_))
        if inner is identity:
            return identity
        return lambda value: None if value is None else inner(value)

    def structure_optional(type_: Any) -> Callable[[Any, Any], Any]:
        # The inner hook is found once, not for each value as cattrs' own does.
        other = _optional_of(type_)
        inner = conv.get_structure_hook(other)
        return lambda value, _: None if value is None else inner(value, other)

    conv.register_unstructure_hook_factory(
        lambda t: _optional_of(t) is not None, unstructure_optional
    )
    conv.register_structure_hook_factory(lambda t: _optional_of(t) is not None, structure_optional)
    return conv


def unstructure(obj: Any) -> Any:
    """Plain, JSON-ready data for a model (or anything the converter knows)."""
    return converter.unstructure(obj)


def unstructure_for_orjson(obj: Any) -> Any:
    """As `unstructure`, but datetimes and enums are left as they are for ``orjson.dumps``.

    ``orjson.dumps`` of it, with `iso` as ``default`` for datetime
    subclasses, is the same text as of `unstructure`'s (a test checks it for
    every model); the storage writes its JSON columns so.
    """
    return _orjson_converter.unstructure(obj)


def structure(data: Any, cls: type[T]) -> T:
    """Build ``cls`` from plain data.

    Raises:
        cattrs.errors.ClassValidationError: naming the class and failing fields.
    """
    return converter.structure(data, cls)


converter = _new_converter(for_orjson=False)
_orjson_converter = _new_converter(for_orjson=True)
