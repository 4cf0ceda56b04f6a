"""Modes, keys and configuration: explicit value objects, validated at construction."""

from __future__ import annotations

import enum
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs

from .errors import ConfigError

__all__ = ["Mode", "ModeKeys", "BillingConfig", "RateLimits"]

_SECRET_KEY_PREFIXES = {
    "test": ("sk_test_", "rk_test_"),
    "live": ("sk_live_", "rk_live_"),
}
_MASK = "'***'"
_STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg", "memory")
_ENV_PREFIX = "RB_"
_QUERY_PASSWORD = re.compile(r"(?i)(?P<head>[?&]password=)[^&#]*")


class Mode(enum.Enum):
    """Stripe's two worlds. Every link, record and call carries one."""

    TEST = "test"
    LIVE = "live"

    @classmethod
    def parse(cls, value: str | Mode) -> Mode:
        """Turn ``"test"``/``"live"`` (any case, surrounding blanks ignored) into a `Mode`.

        Raises:
            ConfigError: for anything else.
        """
        if isinstance(value, Mode):
            return value
        if isinstance(value, str):
            try:
                return cls(value.strip().lower())
            except ValueError:
                pass
        raise ConfigError(f"unknown mode {value!r}: expected 'test' or 'live'")

    @classmethod
    def from_livemode(cls, livemode: bool) -> Mode:
        """The mode of a Stripe object or event, from its ``livemode`` flag."""
        return cls.LIVE if livemode else cls.TEST


def _mask(_: object) -> str:
    return _MASK


def _mask_all(values: tuple[str, ...]) -> str:
    return f"<{len(values)} secret(s)>"


def _as_tuple(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@attrs.frozen
class ModeKeys:
    """The credentials of one mode: secret key, webhook secrets, Connect client id.

    ``webhook_secrets`` holds several secrets so that they can be rotated: an
    event verified by any of them is accepted. Nothing here is ever shown by
    ``repr`` or ``str``.

    Prefixes are checked by `BillingConfig`, which knows which slot a
    `ModeKeys` sits in.
    """

    secret_key: str = attrs.field(repr=_mask)
    webhook_secrets: tuple[str, ...] = attrs.field(default=(), converter=_as_tuple, repr=_mask_all)
    connect_client_id: str | None = None

    def __str__(self) -> str:
        return repr(self)


@attrs.frozen
class RateLimits:
    """Operations per second allowed per (account, mode), before Stripe would say 429."""

    test: float = 25.0
    live: float = 100.0
    search: float = 20.0

    def __attrs_post_init__(self) -> None:
        for name in ("test", "live", "search"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ConfigError(f"rate limit {name!r} must be positive, got {value!r}")

    def for_mode(self, mode: Mode) -> float:
        """The global limit for one mode."""
        return self.live if mode is Mode.LIVE else self.test


def _check_storage_url(url: str) -> None:
    if url == "memory://":
        return
    scheme = urlsplit(url).scheme
    if scheme not in _STORAGE_SCHEMES or "://" not in url:
        raise ConfigError(
            f"malformed storage URL {redact_url(url)!r}: expected sqlite:///path, "
            "postgresql+psycopg://user@host/db or memory://"
        )
    if scheme == "sqlite" and not url.startswith("sqlite:///"):
        raise ConfigError(
            f"malformed storage URL {redact_url(url)!r}: a SQLite URL is sqlite:///relative.db "
            "or sqlite:////absolute.db"
        )


def redact_url(url: str) -> str:
    """The URL without its password, safe for messages and logs.

    The credentials end at the last ``@`` and the password starts at the first
    ``:`` after the last ``/`` before it, so a password may itself hold ``:``.
    """
    credentials, at, host = url.rpartition("@")
    if not at:
        return _QUERY_PASSWORD.sub(r"\g<head>***", url)
    prefix, slash, userinfo = credentials.rpartition("/")
    user, colon, _ = userinfo.partition(":")
    if colon:
        url = f"{prefix}{slash}{user}:***@{host}"
    return _QUERY_PASSWORD.sub(r"\g<head>***", url)


def _check_api_base(url: str | None) -> None:
    if url is None:
        return
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"malformed api_base {redact_url(url)!r}: expected http(s)://host[:port]")


@attrs.frozen
class BillingConfig:
    """Everything `Billing` needs to know that is not a collaborator.

    Args:
        test: keys for test mode, or None when test mode is not used.
        live: keys for live mode, or None.
        api_base: a Stripe-compatible server to talk to instead of Stripe,
            replacing both the API and the Connect OAuth hosts (tests, demo).
        storage_url: where `SQLStorage` keeps its data; a SQLite file by default.
        webhook_tolerance: seconds a webhook signature stays valid (default 300).
        rate_limits: token-bucket rates per (account, mode).

    Raises:
        ConfigError: a key in the wrong slot (naming the slot, never the key),
            an empty or malformed webhook secret, no mode configured, a bad URL.

    Example::

        BillingConfig(test=ModeKeys(secret_key="sk_test_...", webhook_secrets=("whsec_...",)))
    """

    test: ModeKeys | None = None
    live: ModeKeys | None = None
    api_base: str | None = None
    storage_url: str = attrs.field(
        default="sqlite:///rational_billing.db", repr=lambda url: repr(redact_url(url))
    )
    webhook_tolerance: int = 300
    rate_limits: RateLimits = attrs.Factory(RateLimits)

    def __attrs_post_init__(self) -> None:
        if self.test is None and self.live is None:
            raise ConfigError("configure at least one mode: BillingConfig(test=ModeKeys(...))")
        for mode in Mode:
            keys = self.keys_for(mode)
            if keys is not None:
                _validate_keys(mode, keys)
        _check_api_base(self.api_base)
        _check_storage_url(self.storage_url)
        tolerance = self.webhook_tolerance
        if isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance <= 0:
            raise ConfigError(
                f"webhook_tolerance must be a positive number of seconds, got {self.webhook_tolerance!r}"
            )

    def keys_for(self, mode: Mode) -> ModeKeys | None:
        """The keys configured for ``mode``, or None."""
        return self.live if mode is Mode.LIVE else self.test

    @property
    def modes(self) -> frozenset[Mode]:
        """The modes that have keys."""
        return frozenset(m for m in Mode if self.keys_for(m) is not None)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BillingConfig:
        """Read the configuration from ``RB_*`` environment variables.

        ``RB_TEST_SECRET_KEY``, ``RB_TEST_WEBHOOK_SECRETS`` (comma-separated),
        ``RB_TEST_CONNECT_CLIENT_ID`` and their ``RB_LIVE_*`` twins;
        ``RB_API_BASE``, ``RB_STORAGE_URL``, ``RB_WEBHOOK_TOLERANCE``,
        ``RB_RATE_LIMIT_TEST`` and ``RB_RATE_LIMIT_LIVE``.

        Raises:
            ConfigError: as the constructor does, and for a non-numeric number.
        """
        env = os.environ if environ is None else environ
        raw: dict[str, Any] = {}
        for mode in Mode:
            prefix = f"{_ENV_PREFIX}{mode.name}_"
            key = env.get(prefix + "SECRET_KEY")
            if key is None:
                orphans = [n for n in ("WEBHOOK_SECRETS", "CONNECT_CLIENT_ID") if prefix + n in env]
                if orphans:
                    raise ConfigError(
                        f"environment: {prefix}{orphans[0]} is set but {prefix}SECRET_KEY is not"
                    )
                continue
            secrets = [s.strip() for s in env.get(prefix + "WEBHOOK_SECRETS", "").split(",")]
            raw[mode.value] = {
                "secret_key": key,
                "webhook_secrets": [s for s in secrets if s],
                "connect_client_id": env.get(prefix + "CONNECT_CLIENT_ID") or None,
            }
        for name in ("api_base", "storage_url", "webhook_tolerance"):
            value = env.get(_ENV_PREFIX + name.upper())
            if value is not None:
                raw[name] = value
        limits = {
            m.value: env[f"{_ENV_PREFIX}RATE_LIMIT_{m.name}"]
            for m in Mode
            if f"{_ENV_PREFIX}RATE_LIMIT_{m.name}" in env
        }
        if limits:
            raw["rate_limits"] = limits
        return cls.from_mapping(raw, source="environment")

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> BillingConfig:
        """Read the configuration from a TOML file.

        The file has top-level ``api_base``, ``storage_url``, ``webhook_tolerance``,
        and ``[test]``/``[live]`` tables with ``secret_key``, ``webhook_secrets``
        and ``connect_client_id``; ``[rate_limits]`` is optional. Unknown keys
        are errors, so a typo cannot silently drop a setting.

        Raises:
            ConfigError: the file is missing or not TOML, or its content is invalid.
        """
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ConfigError(
                f"cannot read configuration file {os.fspath(path)!r}: {exc.strerror}"
            ) from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(f"configuration file {os.fspath(path)!r} is not UTF-8 text") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(
                f"configuration file {os.fspath(path)!r} is not valid TOML: {exc}"
            ) from exc
        return cls.from_mapping(data, source=os.fspath(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "mapping") -> BillingConfig:
        """Build from plain data, as read from TOML or the environment.

        Raises:
            ConfigError: an unknown key, a wrong type, or whatever the constructor rejects.
        """
        allowed = {"test", "live", "api_base", "storage_url", "webhook_tolerance", "rate_limits"}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        kwargs: dict[str, Any] = {}
        for mode in Mode:
            section = data.get(mode.value)
            if section is None:
                continue
            if not isinstance(section, Mapping):
                raise ConfigError(f"{source}: [{mode.value}] must be a table")
            extra = sorted(set(section) - {"secret_key", "webhook_secrets", "connect_client_id"})
            if extra:
                raise ConfigError(
                    f"{source}: unknown setting(s) in [{mode.value}]: {', '.join(extra)}"
                )
            if not isinstance(section.get("secret_key"), str):
                raise ConfigError(f"{source}: [{mode.value}] needs a secret_key string")
            secrets = section.get("webhook_secrets", ())
            if not isinstance(secrets, list | tuple) or not all(
                isinstance(s, str) for s in secrets
            ):
                raise ConfigError(
                    f"{source}: [{mode.value}] webhook_secrets must be a list of strings"
                )
            kwargs[mode.value] = ModeKeys(
                secret_key=section["secret_key"],
                webhook_secrets=tuple(secrets),
                connect_client_id=section.get("connect_client_id"),
            )
        for name in ("api_base", "storage_url"):
            if name in data:
                if not isinstance(data[name], str):
                    raise ConfigError(f"{source}: {name} must be a string")
                kwargs[name] = data[name]
        if "webhook_tolerance" in data:
            kwargs["webhook_tolerance"] = _as_int(
                data["webhook_tolerance"], "webhook_tolerance", source
            )
        if "rate_limits" in data:
            limits = data["rate_limits"]
            if not isinstance(limits, Mapping) or set(limits) - {"test", "live", "search"}:
                raise ConfigError(f"{source}: rate_limits takes test, live and search")
            kwargs["rate_limits"] = RateLimits(
                **{k: _as_float(v, f"rate_limits.{k}", source) for k, v in limits.items()}
            )
        return cls(**kwargs)


def _as_int(value: object, name: str, source: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(str(value))
    except ValueError:
        raise ConfigError(f"{source}: {name} must be a whole number, got {value!r}") from None


def _as_float(value: object, name: str, source: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        return float(str(value))
    except ValueError:
        raise ConfigError(f"{source}: {name} must be a number, got {value!r}") from None


def _validate_keys(mode: Mode, keys: ModeKeys) -> None:
    slot = mode.value
    key = keys.secret_key
    if not isinstance(key, str) or not key:
        raise ConfigError(f"the {slot} slot has no secret key")
    expected = _SECRET_KEY_PREFIXES[slot]
    if not key.startswith(expected):
        other = "live" if mode is Mode.TEST else "test"
        if key.startswith(_SECRET_KEY_PREFIXES[other]):
            raise ConfigError(
                f"the {slot} slot holds a {other}-mode secret key; "
                f"expected one starting with {' or '.join(expected)}"
            )
        raise ConfigError(
            f"the {slot} slot's secret key is not a Stripe secret or restricted key; "
            f"expected one starting with {' or '.join(expected)}"
        )
    for index, secret in enumerate(keys.webhook_secrets):
        if not isinstance(secret, str) or not secret.strip():
            raise ConfigError(f"the {slot} slot's webhook secret #{index + 1} is empty")
        if not secret.startswith("whsec_"):
            raise ConfigError(
                f"the {slot} slot's webhook secret #{index + 1} does not start with whsec_"
            )
    client_id = keys.connect_client_id
    if client_id is not None and not (isinstance(client_id, str) and client_id.startswith("ca_")):
        raise ConfigError(f"the {slot} slot's connect_client_id must start with ca_")
