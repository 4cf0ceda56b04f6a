"""Demo helpers: start a local Stripe-compatible server (localstripe) in its own process.

localstripe is GPL-3.0+ and only a dev and demo dependency (the ``demo`` extra).
This module never imports it: `start_localstripe` runs
``python -m rational_billing.demo.localstripe_server`` with ``subprocess`` and
talks to it over HTTP, and `configure_webhook` uses ``urllib`` so that no HTTP
library is needed.

Example::

    with start_localstripe() as server:
        configure_webhook(server.url, "demo", "http://127.0.0.1:8000/stripe", "whsec_demo")
        config = BillingConfig(test=ModeKeys(secret_key=server.secret_key), api_base=server.url)
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from urllib.parse import quote, urlsplit

from ..errors import ConfigError

__all__ = ["LocalStripe", "configure_webhook", "remove_webhook", "start_localstripe"]

_LAUNCHER = "rational_billing.demo.localstripe_server"
# Must match READY_PREFIX in the launcher, which this module may not import.
_READY = re.compile(r"^localstripe ready on (http://\S+)$", re.MULTILINE)
_POLL_INTERVAL = 0.05
_SECRET_KEY = "sk_test_localstripe"  # noqa: S105  (a placeholder: any sk_ key works)
_LOG_TAIL = 2000


class LocalStripe:
    """A running localstripe process, as returned by `start_localstripe`.

    ``url`` is its base address (``http://127.0.0.1:PORT``), ``secret_key`` a
    key it accepts (any ``sk_…`` works). Stop it with `stop` or by using the
    handle as a context manager.
    """

    #: A secret key that localstripe accepts (it accepts any ``sk_`` key).
    secret_key = _SECRET_KEY

    def __init__(self, process: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
        self._process = process
        self.url = url
        self._log_path = log_path
        parts = urlsplit(url)
        self.host: str = parts.hostname or ""
        self.port: int = parts.port or 0

    def __repr__(self) -> str:
        state = "running" if self.running else f"stopped ({self._process.returncode})"
        return f"<LocalStripe {self.url} pid={self.pid} {state}>"

    @property
    def pid(self) -> int:
        """The server's process id."""
        return self._process.pid

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process.poll() is None

    @property
    def returncode(self) -> int | None:
        """The exit status once stopped (0 for a clean stop), else None."""
        return self._process.poll()

    def log(self) -> str:
        """What the server wrote to stdout and stderr so far."""
        return _read_log(self._log_path)

    def stop(self, timeout: float = 10.0) -> int:
        """Stop the server with SIGTERM (SIGKILL after ``timeout`` s); return its exit status.

        Calling it again is harmless.
        """
        returncode = _terminate(self._process, timeout)
        self._log_path.unlink(missing_ok=True)
        return returncode

    def __enter__(self) -> LocalStripe:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


def start_localstripe(
    host: str = "127.0.0.1", port: int | None = None, *, timeout: float = 20.0
) -> LocalStripe:
    """Start localstripe in its own process, in memory, bound to ``host`` only.

    ``port=None`` (or 0) lets the server pick a free port, so parallel runs
    never collide. Returns once the server answers API requests, polling
    every 50 ms for at most ``timeout`` seconds.

    Raises:
        ConfigError: localstripe is not installed (the ``demo`` extra is missing).
        RuntimeError: the server exited or did not answer within ``timeout``;
            the message includes what it printed. This is a failure of the
            environment, not of the configuration, hence not a `BillingError`.

    Example::

        with start_localstripe() as server:
            print(server.url)
    """
    if not _localstripe_installed():
        raise ConfigError(
            "localstripe is not installed; it is part of the demo extra: "
            "pip install 'rational-billing[demo]'"
        )
    if port is not None and not 0 <= port <= 65535:
        raise ConfigError(f"port must be between 0 and 65535, got {port!r}")
    fd, name = tempfile.mkstemp(prefix="localstripe-", suffix=".log")
    log_path = Path(name)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", _LAUNCHER, "--host", host, "--port", str(port or 0)],
            stdin=subprocess.DEVNULL,
            stdout=fd,
            stderr=subprocess.STDOUT,
            env=_child_env(),
        )
    except BaseException:
        log_path.unlink()
        raise
    finally:
        os.close(fd)
    try:
        url = _wait_until_ready(process, log_path, timeout)
    except BaseException:
        _terminate(process, 10.0)
        log_path.unlink(missing_ok=True)
        raise
    return LocalStripe(process, url, log_path)


def configure_webhook(
    localstripe_url: str,
    name: str,
    target_url: str,
    secret: str,
    *,
    events: Sequence[str] | None = None,
    timeout: float = 5.0,
) -> None:
    """Make localstripe deliver its events to ``target_url``, signed with ``secret``.

    Registering the same ``name`` again replaces that endpoint. ``events``
    limits delivery to those event types (default: all).

    Raises:
        ConfigError: a malformed argument.
        RuntimeError: localstripe refused the configuration.
        OSError: localstripe could not be reached.
    """
    if not name or "/" in name:
        raise ConfigError(f"webhook name must be non-empty and contain no '/', got {name!r}")
    if urlsplit(target_url).scheme not in ("http", "https"):
        raise ConfigError(f"webhook target must be an http(s) URL, got {target_url!r}")
    if not secret:
        raise ConfigError("webhook secret must not be empty")
    body: dict[str, object] = {"url": target_url, "secret": secret}
    if events is not None:
        if isinstance(events, str):
            raise ConfigError("events must be a sequence of event types, not one string")
        body["events"] = list(events)
    _config_request(localstripe_url, "POST", name, body, timeout)


def remove_webhook(localstripe_url: str, name: str, *, timeout: float = 5.0) -> None:
    """Stop delivering to the webhook endpoint registered as ``name`` (absent: no-op).

    Only the launcher in this package offers this; a stock ``localstripe``
    answers 405.

    Raises:
        RuntimeError: localstripe refused.
        OSError: localstripe could not be reached.
    """
    _config_request(localstripe_url, "DELETE", name, None, timeout)


def _config_request(
    base: str, method: str, name: str, body: dict[str, object] | None, timeout: float
) -> None:
    _check_base(base)
    url = f"{base.rstrip('/')}/_config/webhooks/{quote(name, safe='')}"
    data = None if body is None else json.dumps(body).encode()
    # The scheme is checked by _check_base: http or https only.
    request = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with _opener().open(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read().decode(errors="replace")[:500]
        raise RuntimeError(
            f"localstripe refused {method} /_config/webhooks/{name}: {exc.code} {detail}"
        ) from exc


def _localstripe_installed() -> bool:
    """True when localstripe can be imported (without importing it: it is GPL-3.0+)."""
    return importlib.util.find_spec("localstripe") is not None


def _check_base(base: str) -> None:
    parts = urlsplit(base)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"localstripe URL must be http(s)://host:port, got {base!r}")


def _child_env() -> dict[str, str]:
    """The environment, with this package's source root first on PYTHONPATH.

    The child must import the same ``rational_billing`` as this process, even
    when it is not installed (running from a checkout).
    """
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    existing = env.get("PYTHONPATH")
    env["PYTHONPATH"] = root if not existing else os.pathsep.join((root, existing))
    return env


def _wait_until_ready(process: subprocess.Popen[bytes], log_path: Path, timeout: float) -> str:
    """Poll the log for the ready line, then the API until it answers; return the URL."""
    deadline = time.monotonic() + timeout
    url: str | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(
                f"localstripe exited with status {process.returncode} before it was ready:\n"
                f"{_read_log(log_path)[-_LOG_TAIL:]}"
            )
        if url is None:
            match = _READY.search(_read_log(log_path))
            url = match.group(1) if match else None
        if url is not None and _answers(url):
            return url
        time.sleep(_POLL_INTERVAL)
    raise RuntimeError(
        f"localstripe did not answer within {timeout:g} s; it printed:\n"
        f"{_read_log(log_path)[-_LOG_TAIL:]}"
    )


def _terminate(process: subprocess.Popen[bytes], timeout: float) -> int:
    """SIGTERM, then SIGKILL after ``timeout`` s; always reaps the process."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


def _opener() -> urllib.request.OpenerDirector:
    """An opener that ignores proxy settings: localstripe runs next to its user."""
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _read_log(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def _answers(url: str) -> bool:
    """True when localstripe serves an authenticated, side-effect-free API request."""
    # ``url`` comes from the launcher's ready line, which only matches http://.
    request = urllib.request.Request(  # noqa: S310
        f"{url}/v1/customers?limit=1", headers={"Authorization": f"Bearer {_SECRET_KEY}"}
    )
    try:
        with _opener().open(request, timeout=1.0) as response:
            payload = json.loads(response.read())
    except (OSError, ValueError):
        return False
    return isinstance(payload, dict) and payload.get("object") == "list"
