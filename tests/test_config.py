"""Modes, keys and configuration: validation, secrecy, and the env/TOML readers (DESIGN.md §2)."""

from __future__ import annotations

import logging
import string
import traceback
from pathlib import Path

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from rational_billing import BillingConfig, Mode, ModeKeys, RateLimits
from rational_billing.errors import BillingError, ConfigError

# -- helpers -----------------------------------------------------------------

TEST_KEY = "sk_test_4eC39HqLyjWDarjtT1zdp7dc"
LIVE_KEY = "sk_live_51HqLyjWDarjtT1zdp7dcXYZ"
TEST_WHSEC = "whsec_testSecretAbcdefghijklmnop"
LIVE_WHSEC = "whsec_liveSecretQrstuvwxyz012345"
DB_PASSWORD = "hunter2-db-Passw0rd"

PREFIXES = {
    Mode.TEST: ("sk_test_", "rk_test_"),
    Mode.LIVE: ("sk_live_", "rk_live_"),
}

# A long alphanumeric body cannot occur by chance in any message the library writes.
secret_bodies = st.text(alphabet=string.ascii_letters + string.digits, min_size=16, max_size=40)
modes = st.sampled_from(Mode)


def _test_keys(**overrides: object) -> ModeKeys:
    kwargs: dict[str, object] = {"secret_key": TEST_KEY, "webhook_secrets": (TEST_WHSEC,)}
    kwargs.update(overrides)
    return ModeKeys(**kwargs)  # type: ignore[arg-type]


def _config_in(mode: Mode, keys: ModeKeys, **kwargs: object) -> BillingConfig:
    return BillingConfig(**{mode.value: keys}, **kwargs)  # type: ignore[arg-type]


def _exception_text(exc: BaseException) -> str:
    """Everything a log or a crash report could show about ``exc``, chain included."""
    return "".join(traceback.format_exception(exc)) + repr(exc.args)


# -- Mode.parse --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("test", Mode.TEST),
        ("live", Mode.LIVE),
        ("TEST", Mode.TEST),
        ("Live", Mode.LIVE),
        ("  test\n", Mode.TEST),
        ("\tLIVE ", Mode.LIVE),
    ],
)
def test_mode_parse_ignores_case_and_surrounding_blanks(text: str, mode: Mode) -> None:
    """Mode.parse accepts 'test'/'live' in any case with blanks around them."""
    assert Mode.parse(text) is mode


@given(
    mode=modes,
    caps=st.lists(st.booleans(), min_size=4, max_size=4),
    left=st.text(alphabet=" \t\r\n", max_size=3),
    right=st.text(alphabet=" \t\r\n", max_size=3),
)
def test_mode_parse_any_casing_property(
    mode: Mode, caps: list[bool], left: str, right: str
) -> None:
    """Every casing of a mode name, padded with blanks, parses to that mode."""
    word = "".join(c.upper() if up else c for c, up in zip(mode.value, caps, strict=True))
    assert Mode.parse(left + word + right) is mode


def test_mode_parse_passes_modes_through() -> None:
    """Mode.parse returns a Mode unchanged."""
    assert Mode.parse(Mode.LIVE) is Mode.LIVE


@pytest.mark.parametrize("value", ["", " ", "prod", "tests", "t", "livemode", "test live", 1, None])
def test_mode_parse_rejects_unknown_modes(value: object) -> None:
    """Anything but test/live is a ConfigError that names the value and the choices."""
    with pytest.raises(ConfigError, match="unknown mode") as info:
        Mode.parse(value)  # type: ignore[arg-type]
    assert "'test' or 'live'" in str(info.value)


@given(st.text())
def test_mode_parse_raises_only_config_error(text: str) -> None:
    """Mode.parse either returns a Mode or raises ConfigError, never anything else."""
    assume(text.strip().lower() not in ("test", "live"))
    with pytest.raises(ConfigError):
        Mode.parse(text)


def test_mode_from_livemode() -> None:
    """The livemode flag of a Stripe object maps to its mode."""
    assert Mode.from_livemode(True) is Mode.LIVE
    assert Mode.from_livemode(False) is Mode.TEST


def test_config_error_is_a_billing_error() -> None:
    """ConfigError sits under the BillingError root."""
    assert issubclass(ConfigError, BillingError)


# -- keys in their slots -----------------------------------------------------


def test_minimal_test_config() -> None:
    """A test key alone is a complete configuration with the documented defaults."""
    config = BillingConfig(test=ModeKeys(secret_key=TEST_KEY))
    assert config.modes == frozenset({Mode.TEST})
    assert config.keys_for(Mode.TEST) == ModeKeys(secret_key=TEST_KEY)
    assert config.keys_for(Mode.LIVE) is None
    assert config.webhook_tolerance == 300
    assert config.storage_url.startswith("sqlite:///")
    assert config.api_base is None
    assert config.rate_limits == RateLimits()


def test_both_modes() -> None:
    """Test and live keys can be configured together."""
    config = BillingConfig(
        test=_test_keys(),
        live=ModeKeys(secret_key=LIVE_KEY, webhook_secrets=(LIVE_WHSEC,), connect_client_id="ca_1"),
    )
    assert config.modes == frozenset(Mode)
    live = config.keys_for(Mode.LIVE)
    assert live is not None
    assert live.connect_client_id == "ca_1"


def test_live_key_in_test_slot_names_the_slot_not_the_key() -> None:
    """A live key in the test slot is a ConfigError naming the slot and never the key."""
    with pytest.raises(ConfigError) as info:
        BillingConfig(test=ModeKeys(secret_key=LIVE_KEY))
    message = str(info.value)
    assert "test slot" in message
    assert "live-mode" in message
    assert LIVE_KEY not in _exception_text(info.value)


def test_test_key_in_live_slot_names_the_slot_not_the_key() -> None:
    """A test key in the live slot is a ConfigError naming the slot and never the key."""
    with pytest.raises(ConfigError) as info:
        BillingConfig(live=ModeKeys(secret_key=TEST_KEY))
    message = str(info.value)
    assert "live slot" in message
    assert "test-mode" in message
    assert TEST_KEY not in _exception_text(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "pk_test_4eC39HqLyjWDarjtT1zdp7dc",  # a publishable key
        "whsec_4eC39HqLyjWDarjtT1zdp7dc",
        "SK_TEST_4eC39HqLyjWDarjtT1zdp7dc",  # prefixes are case-sensitive
        "4eC39HqLyjWDarjtT1zdp7dc",
        " sk_test_4eC39HqLyjWDarjtT1zdp7dc",
    ],
)
def test_non_stripe_key_is_rejected(key: str) -> None:
    """A key without a Stripe secret/restricted prefix is a ConfigError that hides the key."""
    with pytest.raises(ConfigError, match="not a Stripe secret or restricted key") as info:
        BillingConfig(test=ModeKeys(secret_key=key))
    assert key.strip() not in _exception_text(info.value)
    assert "sk_test_ or rk_test_" in str(info.value)


@pytest.mark.parametrize("key", ["", None])
def test_missing_secret_key_is_rejected(key: str | None) -> None:
    """An empty secret key is a ConfigError naming the slot."""
    with pytest.raises(ConfigError, match="live slot has no secret key"):
        BillingConfig(live=ModeKeys(secret_key=key))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("mode", "key"),
    [(Mode.TEST, "rk_test_abcdefghijklmnop"), (Mode.LIVE, "rk_live_abcdefghijklmnop")],
)
def test_restricted_keys_are_accepted(mode: Mode, key: str) -> None:
    """Restricted keys (rk_) are as good as secret keys in their own mode."""
    config = _config_in(mode, ModeKeys(secret_key=key))
    assert config.modes == frozenset({mode})


@given(mode=modes, prefix_index=st.sampled_from([0, 1]), body=secret_bodies)
def test_any_key_with_the_right_prefix_is_accepted(
    mode: Mode, prefix_index: int, body: str
) -> None:
    """Any key with its mode's secret or restricted prefix is accepted and masked."""
    key = PREFIXES[mode][prefix_index] + body
    config = _config_in(mode, ModeKeys(secret_key=key))
    assert body not in repr(config)
    assert body not in str(config)


wrong_prefixes = st.one_of(
    st.sampled_from(["sk_", "rk_", "pk_test_", "pk_live_", "sk_tes_", "Sk_test_", "whsec_", "ca_"]),
    st.text(max_size=12),
)


@given(mode=modes, prefix=wrong_prefixes, body=secret_bodies)
def test_any_key_with_a_wrong_prefix_is_rejected_and_never_echoed(
    mode: Mode, prefix: str, body: str
) -> None:
    """Any key lacking its slot's prefix is a ConfigError whose text never contains the key."""
    key = prefix + body
    assume(not key.startswith(PREFIXES[mode]))
    with pytest.raises(ConfigError) as info:
        _config_in(mode, ModeKeys(secret_key=key))
    text = _exception_text(info.value)
    assert body not in text
    assert f"{mode.value} slot" in str(info.value)


def test_mode_keys_alone_do_not_check_prefixes() -> None:
    """ModeKeys does not know its slot, so BillingConfig is what checks prefixes."""
    keys = ModeKeys(secret_key="whatever")
    assert keys.secret_key == "whatever"


def test_single_webhook_secret_string_becomes_a_tuple() -> None:
    """A lone webhook secret string is taken as a one-element tuple, not split into chars."""
    assert ModeKeys(secret_key=TEST_KEY, webhook_secrets=TEST_WHSEC).webhook_secrets == (
        TEST_WHSEC,
    )
    keys = ModeKeys(secret_key=TEST_KEY, webhook_secrets=[TEST_WHSEC, LIVE_WHSEC])
    assert keys.webhook_secrets == (TEST_WHSEC, LIVE_WHSEC)


@pytest.mark.parametrize("secret", ["", "   "])
def test_empty_webhook_secret_is_rejected(secret: str) -> None:
    """An empty or blank webhook secret is a ConfigError naming its slot and position."""
    with pytest.raises(ConfigError, match=r"test slot's webhook secret #2 is empty"):
        BillingConfig(test=_test_keys(webhook_secrets=(TEST_WHSEC, secret)))


@given(mode=modes, body=secret_bodies)
def test_webhook_secret_without_whsec_prefix_is_rejected_and_never_echoed(
    mode: Mode, body: str
) -> None:
    """A webhook secret not starting with whsec_ is a ConfigError that hides the secret."""
    keys = ModeKeys(secret_key=PREFIXES[mode][0] + "abc", webhook_secrets=("sk_" + body,))
    with pytest.raises(ConfigError, match="does not start with whsec_") as info:
        _config_in(mode, keys)
    assert body not in _exception_text(info.value)
    assert f"{mode.value} slot" in str(info.value)


@pytest.mark.parametrize("client_id", ["", "acct_123", "CA_123", "client_123"])
def test_connect_client_id_without_ca_prefix_is_rejected(client_id: str) -> None:
    """A Connect client id must start with ca_."""
    with pytest.raises(ConfigError, match="connect_client_id must start with ca_"):
        BillingConfig(test=_test_keys(connect_client_id=client_id))


def test_no_modes_is_rejected() -> None:
    """A configuration without any mode is a ConfigError that says how to fix it."""
    with pytest.raises(ConfigError, match="at least one mode"):
        BillingConfig()


# -- URLs and numbers ----------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "memory://",
        "sqlite:///rational_billing.db",
        "sqlite:////var/lib/billing.db",
        "postgresql://billing@localhost/billing",
        f"postgresql+psycopg://billing:{DB_PASSWORD}@127.0.0.1:5432/billing",
    ],
)
def test_storage_urls_accepted(url: str) -> None:
    """SQLite, PostgreSQL (psycopg) and memory:// storage URLs are accepted."""
    assert BillingConfig(test=_test_keys(), storage_url=url).storage_url == url


@pytest.mark.parametrize(
    "url",
    [
        "",
        "billing.db",
        "mysql://u@h/db",
        "sqlite://relative.db",
        "memory:",
        f"postgres://billing:{DB_PASSWORD}@localhost/billing",
        f"mysql://billing:{DB_PASSWORD}@localhost/billing",
        f"sqlite://billing:{DB_PASSWORD}@host/x.db",
    ],
)
def test_malformed_storage_url_is_rejected_with_password_redacted(url: str) -> None:
    """A malformed storage URL is a ConfigError whose message redacts any password."""
    with pytest.raises(ConfigError, match="malformed storage URL") as info:
        BillingConfig(test=_test_keys(), storage_url=url)
    assert DB_PASSWORD not in _exception_text(info.value)
    if DB_PASSWORD in url:
        assert "billing:***@" in str(info.value)


def test_malformed_storage_url_without_slashes_hides_password() -> None:
    """A storage URL typo such as 'postgresql:/user:pw@host' does not leak its password."""
    with pytest.raises(ConfigError) as info:
        BillingConfig(test=_test_keys(), storage_url=f"postgresql:/billing:{DB_PASSWORD}@db/x")
    assert DB_PASSWORD not in _exception_text(info.value)


@pytest.mark.parametrize(
    "url", ["", "localhost:12111", "ftp://example.com", "http://", "http:/localhost", "https:"]
)
def test_malformed_api_base_is_rejected(url: str) -> None:
    """api_base must be an http(s) URL with a host."""
    with pytest.raises(ConfigError, match="malformed api_base"):
        BillingConfig(test=_test_keys(), api_base=url)


@pytest.mark.parametrize("url", ["http://127.0.0.1:12111", "https://api.stripe.com"])
def test_api_base_accepted(url: str) -> None:
    """A Stripe-compatible server URL is accepted as api_base."""
    assert BillingConfig(test=_test_keys(), api_base=url).api_base == url


@pytest.mark.parametrize("tolerance", [0, -1, -300, 1.5, "300"])
def test_non_positive_or_non_integer_tolerance_is_rejected(tolerance: object) -> None:
    """webhook_tolerance must be a positive whole number of seconds."""
    with pytest.raises(ConfigError, match="webhook_tolerance"):
        BillingConfig(test=_test_keys(), webhook_tolerance=tolerance)  # type: ignore[arg-type]


@pytest.mark.parametrize("name", ["test", "live", "search"])
@pytest.mark.parametrize("value", [0, 0.0, -1, -0.5, float("nan")])
def test_rate_limits_must_be_positive(name: str, value: float) -> None:
    """Every rate limit must be a positive number; the message names the limit."""
    with pytest.raises(ConfigError, match=f"rate limit '{name}' must be positive"):
        RateLimits(**{name: value})


def test_rate_limit_defaults_and_per_mode_lookup() -> None:
    """Defaults follow Stripe's limits and for_mode picks the mode's global limit."""
    limits = RateLimits()
    assert (limits.test, limits.live, limits.search) == (25.0, 100.0, 20.0)
    assert limits.for_mode(Mode.TEST) == 25.0
    assert limits.for_mode(Mode.LIVE) == 100.0


@given(
    test=st.floats(min_value=1e-6, max_value=1e6),
    live=st.floats(min_value=1e-6, max_value=1e6),
    search=st.floats(min_value=1e-6, max_value=1e6),
)
def test_positive_rate_limits_are_accepted(test: float, live: float, search: float) -> None:
    """Any positive rates are accepted as given."""
    limits = RateLimits(test=test, live=live, search=search)
    assert (limits.test, limits.live, limits.search) == (test, live, search)


# -- secrets never shown -------------------------------------------------------


def _full_config(storage_url: str = "memory://") -> BillingConfig:
    return BillingConfig(
        test=ModeKeys(
            secret_key=TEST_KEY, webhook_secrets=(TEST_WHSEC, LIVE_WHSEC), connect_client_id="ca_t"
        ),
        live=ModeKeys(secret_key=LIVE_KEY, webhook_secrets=(LIVE_WHSEC,)),
        storage_url=storage_url,
    )


SECRETS = (TEST_KEY, LIVE_KEY, TEST_WHSEC, LIVE_WHSEC)


def test_mode_keys_repr_and_str_hide_secrets() -> None:
    """repr() and str() of ModeKeys never show the secret key or webhook secrets."""
    keys = ModeKeys(secret_key=TEST_KEY, webhook_secrets=(TEST_WHSEC, LIVE_WHSEC))
    for text in (repr(keys), str(keys), f"{keys}", f"{keys!r}"):
        assert all(secret not in text for secret in SECRETS)
        assert "***" in text
        assert "2 secret(s)" in text


def test_billing_config_repr_and_str_hide_secrets() -> None:
    """repr() and str() of BillingConfig never show any secret."""
    config = _full_config()
    for text in (repr(config), str(config), f"{config}", repr([config])):
        assert all(secret not in text for secret in SECRETS)
    assert "ca_t" in repr(config)  # a client id is not a secret and helps debugging


def test_billing_config_repr_hides_storage_password() -> None:
    """repr() of BillingConfig redacts the database password in storage_url."""
    config = _full_config(f"postgresql+psycopg://billing:{DB_PASSWORD}@db/billing")
    assert DB_PASSWORD not in repr(config)
    assert "billing:***@db" in repr(config)


# RFC 3986 lets a URL password hold unreserved characters, sub-delims and %XX escapes.
url_passwords = st.text(
    alphabet=string.ascii_letters + string.digits + "-._~!$&'()*+,;=%", min_size=1, max_size=20
).map(lambda tail: "S3cr3t" + tail)


@given(password=url_passwords, scheme=st.sampled_from(["postgresql+psycopg", "postgresql"]))
def test_storage_password_never_in_repr_property(password: str, scheme: str) -> None:
    """For any URL-legal password, repr() and str() of the config never show it."""
    config = BillingConfig(
        test=_test_keys(), storage_url=f"{scheme}://billing:{password}@db.internal:5432/billing"
    )
    assert password not in repr(config)
    assert password not in str(config)
    assert config.storage_url.endswith("@db.internal:5432/billing")


@given(password=url_passwords, url=st.sampled_from(["mysql://u:{}@h/db", "postgresql:/u:{}@h/db"]))
def test_malformed_storage_url_never_echoes_password_property(password: str, url: str) -> None:
    """For any URL-legal password, the error for a malformed storage URL never shows it."""
    with pytest.raises(ConfigError, match="malformed storage URL") as info:
        BillingConfig(test=_test_keys(), storage_url=url.format(password))
    assert password not in _exception_text(info.value)


def test_storage_password_with_colon_is_redacted() -> None:
    """A password may legally contain ':' (RFC 3986), and none of it is shown."""
    config = _full_config("postgresql+psycopg://billing:S3cr3t:part2@db/billing")
    assert "S3cr3t" not in repr(config)
    assert "part2" not in repr(config)


@given(mode=modes, key_body=secret_bodies, whsec_bodies=st.lists(secret_bodies, max_size=3))
def test_secrets_never_in_repr_property(mode: Mode, key_body: str, whsec_bodies: list[str]) -> None:
    """For any valid keys, neither repr() nor str() of the config shows a secret."""
    keys = ModeKeys(
        secret_key=PREFIXES[mode][0] + key_body,
        webhook_secrets=tuple("whsec_" + b for b in whsec_bodies),
    )
    config = _config_in(mode, keys)
    for text in (repr(keys), str(keys), repr(config), str(config)):
        assert key_body not in text
        assert all(b not in text for b in whsec_bodies)


def test_secrets_never_in_logs(caplog: pytest.LogCaptureFixture) -> None:
    """Logging a config (with %s, %r or an f-string) never writes a secret."""
    config = _full_config()
    logger = logging.getLogger("rational_billing.tests.config")
    with caplog.at_level(logging.DEBUG, logger=logger.name):
        logger.info("config: %s", config)
        logger.info("config: %r", config)
        logger.warning("keys: %s and %r", config.test, config.live)
        logger.debug(f"config {config}")
    assert len(caplog.records) == 4
    assert all(secret not in caplog.text for secret in SECRETS)
    assert "***" in caplog.text


def test_rejected_key_never_in_logged_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """Logging a ConfigError with its traceback never writes the rejected key."""
    logger = logging.getLogger("rational_billing.tests.config")
    with caplog.at_level(logging.ERROR, logger=logger.name):
        try:
            BillingConfig.from_env({"RB_TEST_SECRET_KEY": LIVE_KEY})
        except ConfigError:
            logger.exception("bad configuration")
    assert "test slot" in caplog.text
    assert "Traceback" in caplog.text
    assert LIVE_KEY not in caplog.text


# -- from_env ----------------------------------------------------------------------


FULL_ENV = {
    "RB_TEST_SECRET_KEY": TEST_KEY,
    "RB_TEST_WEBHOOK_SECRETS": TEST_WHSEC,
    "RB_TEST_CONNECT_CLIENT_ID": "ca_test",
    "RB_LIVE_SECRET_KEY": LIVE_KEY,
    "RB_LIVE_WEBHOOK_SECRETS": LIVE_WHSEC,
    "RB_LIVE_CONNECT_CLIENT_ID": "ca_live",
    "RB_API_BASE": "http://127.0.0.1:12111",
    "RB_STORAGE_URL": "memory://",
    "RB_WEBHOOK_TOLERANCE": "120",
    "RB_RATE_LIMIT_TEST": "5",
    "RB_RATE_LIMIT_LIVE": "50.5",
}


def test_from_env_full() -> None:
    """Every documented RB_* variable is read into the config."""
    config = BillingConfig.from_env(FULL_ENV)
    assert config == BillingConfig(
        test=ModeKeys(
            secret_key=TEST_KEY, webhook_secrets=(TEST_WHSEC,), connect_client_id="ca_test"
        ),
        live=ModeKeys(
            secret_key=LIVE_KEY, webhook_secrets=(LIVE_WHSEC,), connect_client_id="ca_live"
        ),
        api_base="http://127.0.0.1:12111",
        storage_url="memory://",
        webhook_tolerance=120,
        rate_limits=RateLimits(test=5.0, live=50.5),
    )


def test_from_env_partial_uses_defaults() -> None:
    """Only a test key set: live is absent and everything else takes its default."""
    config = BillingConfig.from_env({"RB_TEST_SECRET_KEY": TEST_KEY})
    assert config == BillingConfig(test=ModeKeys(secret_key=TEST_KEY))
    assert config.live is None


def test_from_env_live_only() -> None:
    """A live-only environment gives a live-only config."""
    config = BillingConfig.from_env({"RB_LIVE_SECRET_KEY": LIVE_KEY})
    assert config.modes == frozenset({Mode.LIVE})


def test_from_env_comma_separated_secrets() -> None:
    """Webhook secrets are comma-separated; blanks and empty items are dropped."""
    env = {
        "RB_TEST_SECRET_KEY": TEST_KEY,
        "RB_TEST_WEBHOOK_SECRETS": f" {TEST_WHSEC} ,{LIVE_WHSEC},, ",
    }
    keys = BillingConfig.from_env(env).keys_for(Mode.TEST)
    assert keys is not None
    assert keys.webhook_secrets == (TEST_WHSEC, LIVE_WHSEC)


def test_from_env_empty_client_id_means_none() -> None:
    """An empty RB_*_CONNECT_CLIENT_ID is the same as an absent one."""
    env = {"RB_TEST_SECRET_KEY": TEST_KEY, "RB_TEST_CONNECT_CLIENT_ID": ""}
    keys = BillingConfig.from_env(env).keys_for(Mode.TEST)
    assert keys is not None
    assert keys.connect_client_id is None


def test_from_env_without_any_mode_section() -> None:
    """An environment without RB_TEST_SECRET_KEY or RB_LIVE_SECRET_KEY is a ConfigError."""
    with pytest.raises(ConfigError, match="at least one mode"):
        BillingConfig.from_env({"RB_STORAGE_URL": "memory://", "UNRELATED": "x"})


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RB_WEBHOOK_TOLERANCE", "five minutes"),
        ("RB_WEBHOOK_TOLERANCE", "1.5"),
        ("RB_WEBHOOK_TOLERANCE", ""),
        ("RB_RATE_LIMIT_TEST", "fast"),
        ("RB_RATE_LIMIT_LIVE", ""),
    ],
)
def test_from_env_bad_numbers(name: str, value: str) -> None:
    """A non-numeric number is a ConfigError naming the setting and the source."""
    env = {"RB_TEST_SECRET_KEY": TEST_KEY, name: value}
    with pytest.raises(ConfigError, match="environment") as info:
        BillingConfig.from_env(env)
    setting = name.removeprefix("RB_").lower()
    assert setting.replace("rate_limit_", "rate_limits.") in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"), [("RB_RATE_LIMIT_TEST", "0"), ("RB_WEBHOOK_TOLERANCE", "-1")]
)
def test_from_env_non_positive_numbers(name: str, value: str) -> None:
    """Zero or negative numbers from the environment are ConfigErrors."""
    with pytest.raises(ConfigError):
        BillingConfig.from_env({"RB_TEST_SECRET_KEY": TEST_KEY, name: value})


def test_from_env_wrong_key_never_echoed() -> None:
    """A live key in RB_TEST_SECRET_KEY is a ConfigError naming the slot, not the key."""
    with pytest.raises(ConfigError, match="test slot") as info:
        BillingConfig.from_env({"RB_TEST_SECRET_KEY": LIVE_KEY})
    assert LIVE_KEY not in _exception_text(info.value)


def test_from_env_bad_storage_url_redacts_password() -> None:
    """A malformed RB_STORAGE_URL is a ConfigError that hides its password."""
    env = {"RB_TEST_SECRET_KEY": TEST_KEY, "RB_STORAGE_URL": f"mysql://u:{DB_PASSWORD}@h/db"}
    with pytest.raises(ConfigError, match="malformed storage URL") as info:
        BillingConfig.from_env(env)
    assert DB_PASSWORD not in _exception_text(info.value)


def test_from_env_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an argument, from_env reads os.environ."""
    monkeypatch.setenv("RB_TEST_SECRET_KEY", TEST_KEY)
    monkeypatch.setenv("RB_STORAGE_URL", "memory://")
    for name in FULL_ENV:
        if name not in ("RB_TEST_SECRET_KEY", "RB_STORAGE_URL"):
            monkeypatch.delenv(name, raising=False)
    config = BillingConfig.from_env()
    assert config == BillingConfig(test=ModeKeys(secret_key=TEST_KEY), storage_url="memory://")


# -- from_toml -------------------------------------------------------------------

FULL_TOML = f"""\
api_base = "http://127.0.0.1:12111"
storage_url = "sqlite:///billing.db"
webhook_tolerance = 600

[test]
secret_key = "{TEST_KEY}"
webhook_secrets = ["{TEST_WHSEC}", "{LIVE_WHSEC}"]
connect_client_id = "ca_test"

[live]
secret_key = "{LIVE_KEY}"
webhook_secrets = ["{LIVE_WHSEC}"]

[rate_limits]
test = 10
live = 80.5
search = 5
"""


def _write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "billing.toml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_from_toml_full(tmp_path: Path) -> None:
    """A complete TOML file is read into the matching config."""
    config = BillingConfig.from_toml(_write(tmp_path, FULL_TOML))
    assert config == BillingConfig(
        test=ModeKeys(
            secret_key=TEST_KEY,
            webhook_secrets=(TEST_WHSEC, LIVE_WHSEC),
            connect_client_id="ca_test",
        ),
        live=ModeKeys(secret_key=LIVE_KEY, webhook_secrets=(LIVE_WHSEC,)),
        api_base="http://127.0.0.1:12111",
        storage_url="sqlite:///billing.db",
        webhook_tolerance=600,
        rate_limits=RateLimits(test=10.0, live=80.5, search=5.0),
    )


def test_from_toml_accepts_str_path(tmp_path: Path) -> None:
    """from_toml takes a plain string path as well as a Path."""
    path = _write(tmp_path, f'[test]\nsecret_key = "{TEST_KEY}"\n')
    assert BillingConfig.from_toml(str(path)).modes == frozenset({Mode.TEST})


def test_from_toml_partial_rate_limits(tmp_path: Path) -> None:
    """Rate limits not given in the file keep their defaults."""
    path = _write(tmp_path, f'[test]\nsecret_key = "{TEST_KEY}"\n[rate_limits]\nlive = 50\n')
    assert BillingConfig.from_toml(path).rate_limits == RateLimits(live=50.0)


@pytest.mark.parametrize(
    ("text", "unknown"),
    [
        (f'storage = "memory://"\n[test]\nsecret_key = "{TEST_KEY}"\n', "storage"),
        (
            f'[test]\nsecret_key = "{TEST_KEY}"\nwebhook_secret = ["{TEST_WHSEC}"]\n',
            "webhook_secret",
        ),
        (f'[test]\nsecret_key = "{TEST_KEY}"\n[staging]\nsecret_key = "x"\n', "staging"),
    ],
)
def test_from_toml_rejects_unknown_keys(tmp_path: Path, text: str, unknown: str) -> None:
    """An unknown (for example misspelt) setting is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="unknown setting") as info:
        BillingConfig.from_toml(_write(tmp_path, text))
    assert unknown in str(info.value)


def test_from_toml_rejects_unknown_rate_limit(tmp_path: Path) -> None:
    """rate_limits only takes test, live and search."""
    path = _write(tmp_path, f'[test]\nsecret_key = "{TEST_KEY}"\n[rate_limits]\nsandbox = 3\n')
    with pytest.raises(ConfigError, match="rate_limits takes test, live and search"):
        BillingConfig.from_toml(path)


def test_from_toml_missing_file(tmp_path: Path) -> None:
    """A missing file is a ConfigError naming the path."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="cannot read configuration file") as info:
        BillingConfig.from_toml(path)
    assert str(path) in str(info.value)
    assert isinstance(info.value.__cause__, OSError)


def test_from_toml_directory(tmp_path: Path) -> None:
    """A directory instead of a file is a ConfigError."""
    with pytest.raises(ConfigError, match="cannot read configuration file"):
        BillingConfig.from_toml(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        "[test\nsecret_key = 1\n",
        'secret_key = "unterminated\n',
        f'[test]\nsecret_key = "{TEST_KEY}"\nsecret_key = "{TEST_KEY}"\n',
    ],
)
def test_from_toml_bad_toml(tmp_path: Path, text: str) -> None:
    """A file that is not TOML is a ConfigError that does not echo its content."""
    with pytest.raises(ConfigError, match="is not valid TOML") as info:
        BillingConfig.from_toml(_write(tmp_path, text))
    assert TEST_KEY not in _exception_text(info.value)


def test_from_toml_not_utf8(tmp_path: Path) -> None:
    """A file that is not UTF-8 is a ConfigError, not a UnicodeDecodeError."""
    with pytest.raises(ConfigError):
        BillingConfig.from_toml(_write(tmp_path, b'[test]\nsecret_key = "sk_test_\xff"\n'))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('test = "sk_test_abc"\n', r"\[test\] must be a table"),
        ("[live]\nsecret_key = 123\n", r"\[live\] needs a secret_key string"),
        ('[test]\nwebhook_secrets = ["whsec_a"]\n', r"\[test\] needs a secret_key string"),
        (
            f'[test]\nsecret_key = "{TEST_KEY}"\nwebhook_secrets = "{TEST_WHSEC}"\n',
            "list of strings",
        ),
        (f'[test]\nsecret_key = "{TEST_KEY}"\nwebhook_secrets = [1, 2]\n', "list of strings"),
        (f'[test]\nsecret_key = "{TEST_KEY}"\nconnect_client_id = 7\n', "start with ca_"),
        (f'api_base = 8080\n[test]\nsecret_key = "{TEST_KEY}"\n', "api_base must be a string"),
        (
            f'storage_url = false\n[test]\nsecret_key = "{TEST_KEY}"\n',
            "storage_url must be a string",
        ),
        (f'webhook_tolerance = "soon"\n[test]\nsecret_key = "{TEST_KEY}"\n', "whole number"),
        (f'webhook_tolerance = 1.5\n[test]\nsecret_key = "{TEST_KEY}"\n', "whole number"),
        (f'webhook_tolerance = true\n[test]\nsecret_key = "{TEST_KEY}"\n', "whole number"),
        (f'webhook_tolerance = 0\n[test]\nsecret_key = "{TEST_KEY}"\n', "positive"),
        (f'rate_limits = 5\n[test]\nsecret_key = "{TEST_KEY}"\n', "rate_limits takes"),
        (f'[test]\nsecret_key = "{TEST_KEY}"\n[rate_limits]\ntest = "x"\n', "must be a number"),
        (f'[test]\nsecret_key = "{TEST_KEY}"\n[rate_limits]\ntest = true\n', "must be a number"),
        (f'[test]\nsecret_key = "{TEST_KEY}"\n[rate_limits]\nlive = -1\n', "must be positive"),
        ('storage_url = "memory://"\n', "at least one mode"),
        (f'[live]\nsecret_key = "{TEST_KEY}"\n', "live slot holds a test-mode"),
    ],
)
def test_from_toml_wrong_types_and_values(tmp_path: Path, text: str, match: str) -> None:
    """A setting of the wrong type or value is a ConfigError saying which one."""
    with pytest.raises(ConfigError, match=match) as info:
        BillingConfig.from_toml(_write(tmp_path, text))
    assert TEST_KEY not in _exception_text(info.value)


def test_from_toml_webhook_secrets_number(tmp_path: Path) -> None:
    """webhook_secrets = 5 is a ConfigError, not a TypeError."""
    text = f'[test]\nsecret_key = "{TEST_KEY}"\nwebhook_secrets = 5\n'
    with pytest.raises(ConfigError, match="list of strings"):
        BillingConfig.from_toml(_write(tmp_path, text))


def test_from_toml_error_names_the_file(tmp_path: Path) -> None:
    """Errors about the file's content start with the file's path."""
    path = _write(tmp_path, 'typo = 1\n[test]\nsecret_key = "sk_test_x"\n')
    with pytest.raises(ConfigError) as info:
        BillingConfig.from_toml(path)
    assert str(info.value).startswith(str(path))


def test_from_mapping_matches_from_toml(tmp_path: Path) -> None:
    """from_mapping on the parsed TOML gives the same config as from_toml."""
    import tomllib

    assert BillingConfig.from_mapping(tomllib.loads(FULL_TOML)) == BillingConfig.from_toml(
        _write(tmp_path, FULL_TOML)
    )


def test_tolerance_and_rate_limits_reject_wrong_types() -> None:
    """A bool tolerance and a string rate limit are ConfigErrors, not silent or TypeErrors."""
    with pytest.raises(ConfigError, match="webhook_tolerance"):
        BillingConfig(test=_test_keys(), webhook_tolerance=True)
    with pytest.raises(ConfigError, match="rate limit"):
        RateLimits(test="5")  # type: ignore[arg-type]


def test_from_env_rejects_secrets_without_a_key() -> None:
    """RB_LIVE_WEBHOOK_SECRETS without RB_LIVE_SECRET_KEY is an error, not silently dropped."""
    env = {"RB_TEST_SECRET_KEY": TEST_KEY, "RB_LIVE_WEBHOOK_SECRETS": "whsec_live"}
    with pytest.raises(ConfigError, match="RB_LIVE_SECRET_KEY"):
        BillingConfig.from_env(env)


def test_api_base_credentials_are_not_echoed() -> None:
    """A malformed api_base carrying user:password@ does not echo the password."""
    with pytest.raises(ConfigError) as info:
        BillingConfig(test=_test_keys(), api_base=f"ftp://u:{DB_PASSWORD}@host")
    assert DB_PASSWORD not in str(info.value)
