"""Mailers: the `Mailer` port on the console, in memory (tests) and over SMTP.

- `ConsoleMailer` prints each email (the default when no mailer is given).
- `RecordingMailer` keeps ``(email, mode)`` pairs for assertions, and can fail
  on purpose to exercise retries.
- `SMTPMailer` sends through an SMTP server with the standard library's
  ``smtplib``, in plain text, with STARTTLS or over implicit TLS.

Every mailer is told the `Mode`, so a host can send test-mode mail elsewhere.
A mailer that raises has not sent the email: the caller keeps it and retries
(``sync.push_pending()``), and the stable ``Message-ID`` lets a receiver drop a
copy that was sent before a crash.
"""

from __future__ import annotations

import smtplib
import ssl
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from email.utils import format_datetime, parseaddr
from typing import Literal, NamedTuple, TextIO, get_args

from .._config import Mode
from ..errors import ConfigError, MailRejected
from ..ports import Email

__all__ = [
    "MODE_HEADER",
    "ConsoleMailer",
    "RecordingMailer",
    "SMTPMailer",
    "SentEmail",
    "SimulatedMailFailure",
]

#: The header that tells which mode an email was sent in: ``test`` or ``live``.
MODE_HEADER = "X-Rational-Billing-Mode"

Security = Literal["none", "starttls", "ssl"]
_SECURITY_VALUES: tuple[str, ...] = get_args(Security)


def _message_id(value: str) -> str:
    """The Message-ID header value: the stable id, wrapped in ``<>`` when it is not."""
    value = value.strip()
    if value.startswith("<") and value.endswith(">"):
        return value
    return f"<{value}>"


class ConsoleMailer:
    """Prints each email, readably, to ``stream`` (standard output by default).

    Nothing is sent anywhere; this is the mailer for development and the demo.
    Writing to the stream is the only thing that can fail (``OSError``).

    Example::

        ConsoleMailer().send(email, mode=Mode.TEST)
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        target = "stdout" if self._stream is None else getattr(self._stream, "name", "stream")
        return f"<ConsoleMailer to {target}>"

    def send(self, email: Email, *, mode: Mode) -> None:
        """Print ``email`` with its mode and Message-ID."""
        html = "" if email.html is None else f"\n[HTML alternative: {len(email.html)} characters]"
        text = (
            f"----- email ({mode.value} mode) -----\n"
            f"Message-ID: {_message_id(email.message_id)}\n"
            f"From: {email.sender or '(the default sender)'}\n"
            f"To: {email.to}\n"
            f"Subject: {email.subject}\n"
            f"{MODE_HEADER}: {mode.value}\n"
            f"\n{email.text.rstrip()}\n"
            f"{html}"
            f"----- end of email -----\n"
        )
        # Resolved at each call, so that redirected or captured stdout is honoured.
        stream = self._stream if self._stream is not None else sys.stdout
        with self._lock:
            stream.write(text)
            stream.flush()


class SentEmail(NamedTuple):
    """One email a `RecordingMailer` accepted, with the mode it was sent in."""

    email: Email
    mode: Mode


class SimulatedMailFailure(ConnectionError):
    """Raised by `RecordingMailer` while it is told to fail (``fail_times``).

    A `ConnectionError`, hence an `OSError`, like a real SMTP server being down.
    """


class RecordingMailer:
    """Records what it is asked to send, for tests; thread-safe.

    ``sent`` lists `SentEmail` ``(email, mode)`` pairs in order. With
    ``fail_times=n`` the next ``n`` sends raise `SimulatedMailFailure` and
    record nothing, so retry paths can be tested; the attribute can be set
    again at any time. ``attempts`` counts every call, failed or not.

    Example::

        mailer = RecordingMailer(fail_times=1)
        billing = Billing(config=config, storage=InMemoryStorage(), mailer=mailer)
        ...
        assert [e.subject for e in mailer.to("ada@example.com")] == ["You are invited"]
    """

    def __init__(self, *, fail_times: int = 0) -> None:
        if not isinstance(fail_times, int) or isinstance(fail_times, bool) or fail_times < 0:
            raise ConfigError(f"fail_times must be a whole number >= 0, got {fail_times!r}")
        self._lock = threading.Lock()
        self._sent: list[SentEmail] = []
        self.fail_times = fail_times
        self.attempts = 0

    def __repr__(self) -> str:
        return f"<RecordingMailer sent={len(self)} fail_times={self.fail_times}>"

    def __len__(self) -> int:
        with self._lock:
            return len(self._sent)

    def __iter__(self) -> Iterator[SentEmail]:
        return iter(self.sent)

    @property
    def sent(self) -> list[SentEmail]:
        """A snapshot of the ``(email, mode)`` pairs sent so far, oldest first."""
        with self._lock:
            return list(self._sent)

    def send(self, email: Email, *, mode: Mode) -> None:
        """Record ``email`` and ``mode``, or raise while ``fail_times`` is positive.

        Raises:
            SimulatedMailFailure: this send was told to fail; nothing was recorded.
        """
        with self._lock:
            self.attempts += 1
            if self.fail_times > 0:
                self.fail_times -= 1
                raise SimulatedMailFailure(
                    f"RecordingMailer told to fail: {email.message_id!r} to {email.to!r} "
                    f"not sent ({self.fail_times} more failure(s) to come)"
                )
            self._sent.append(SentEmail(email, mode))

    def to(self, address: str) -> list[Email]:
        """The emails sent to ``address`` (compared case-insensitively), oldest first."""
        wanted = address.strip().casefold()
        return [s.email for s in self.sent if s.email.to.strip().casefold() == wanted]

    def clear(self) -> None:
        """Forget what was sent (``fail_times`` and ``attempts`` are kept)."""
        with self._lock:
            self._sent.clear()


class SMTPMailer:
    """Sends email through an SMTP server with ``smtplib``; one connection per email.

    Args:
        host: the SMTP server.
        port: its port (25 by default; usually 587 for ``"starttls"`` and 465
            for ``"ssl"``).
        username: log in with this user (``password`` required with it).
        password: never shown by ``repr``.
        security: ``"none"`` (plain SMTP), ``"starttls"`` (upgrade the
            connection; fails if the server does not offer it) or ``"ssl"``
            (implicit TLS from the first byte).
        timeout: seconds for connecting and for each reply.
        sender: the ``From`` address, unless an `Email` has its own ``sender``.
        ssl_context: for ``"starttls"``/``"ssl"``; by default
            ``ssl.create_default_context()``, which verifies the certificate.

    Each message gets ``From``, ``To``, ``Subject``, ``Date``, the email's
    stable ``Message-ID`` (wrapped in ``<>`` if needed) and
    ``X-Rational-Billing-Mode: test|live``; the text is the first part and
    the HTML, when given, its alternative.

    Raises:
        ConfigError: from the constructor, for a bad host, port, security,
            timeout, sender or half-given credentials.

    ``send`` raises the ``smtplib``/``ssl``/socket errors as they are, without
    wrapping them: every one of them is an ``OSError`` (``smtplib.SMTPException``
    and ``ssl.SSLError`` included), which the caller takes as "not sent, retry
    later".

    Example::

        SMTPMailer("smtp.example.com", 587, security="starttls",
                   username="billing", password="...", sender="Billing <billing@example.com>")
    """

    def __init__(
        self,
        host: str,
        port: int = 25,
        *,
        username: str | None = None,
        password: str | None = None,
        security: Security = "none",
        timeout: float = 10.0,
        sender: str,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if not isinstance(host, str) or not host.strip():
            raise ConfigError(f"SMTP host must be a non-empty string, got {host!r}")
        if not isinstance(port, int) or isinstance(port, bool) or not 0 < port <= 65535:
            raise ConfigError(f"SMTP port must be between 1 and 65535, got {port!r}")
        if security not in _SECURITY_VALUES:
            raise ConfigError(
                f"SMTP security must be one of {', '.join(map(repr, _SECURITY_VALUES))}, "
                f"got {security!r}"
            )
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise ConfigError(f"SMTP timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(sender, str) or "@" not in parseaddr(sender)[1]:
            raise ConfigError(f"SMTP sender must be an email address, got {sender!r}")
        if (username is None) != (password is None):
            raise ConfigError("SMTP username and password must be given together")
        if ssl_context is not None and security == "none":
            raise ConfigError("ssl_context is only used with security='starttls' or 'ssl'")
        self.host = host
        self.port = port
        self.username = username
        self._password = password
        self.security: Security = security
        self.timeout = float(timeout)
        self.sender = sender
        self._ssl_context = ssl_context

    def __repr__(self) -> str:
        user = "" if self.username is None else f" username={self.username!r}"
        return (
            f"<SMTPMailer {self.host}:{self.port} security={self.security!r}{user} "
            f"sender={self.sender!r}>"
        )

    def build_message(self, email: Email, *, mode: Mode) -> EmailMessage:
        """The MIME message `send` would send for ``email`` in ``mode``.

        Raises:
            ValueError: a header value holds a line break (header injection).
        """
        message = EmailMessage()
        message["From"] = email.sender or self.sender
        message["To"] = email.to
        message["Subject"] = email.subject
        message["Date"] = format_datetime(datetime.now(UTC), usegmt=True)
        message["Message-ID"] = _message_id(email.message_id)
        message[MODE_HEADER] = mode.value
        message.set_content(email.text)
        if email.html is not None:
            message.add_alternative(email.html, subtype="html")
        return message

    def send(self, email: Email, *, mode: Mode) -> None:
        """Send ``email`` over one SMTP connection.

        Raises:
            MailRejected: the server refused the recipient, sender or message
                with a permanent (5xx) reply: sending again cannot help.
            OSError: the server could not be reached, TLS failed, the login or
                the message was refused (``smtplib.SMTPException`` and
                ``ssl.SSLError`` are ``OSError`` subclasses); the email was
                not sent.
            ValueError: a header value holds a line break.
        """
        message = self.build_message(email, mode=mode)
        smtp = self._connect()
        try:
            if self.security == "starttls":
                smtp.starttls(context=self._context())
            if self.username is not None and self._password is not None:
                smtp.login(self.username, self._password)
            try:
                smtp.send_message(message)
            except smtplib.SMTPRecipientsRefused as exc:
                if all(_permanent(code) for code, _ in exc.recipients.values()):
                    raise MailRejected(f"the server refused {email.to!r} for good") from exc
                raise
            except (smtplib.SMTPSenderRefused, smtplib.SMTPDataError) as exc:
                if _permanent(exc.smtp_code):
                    raise MailRejected(
                        f"the server refused the message for good ({exc.smtp_code})"
                    ) from exc
                raise
        finally:
            _hang_up(smtp)

    def _connect(self) -> smtplib.SMTP:
        if self.security == "ssl":
            return smtplib.SMTP_SSL(
                self.host, self.port, timeout=self.timeout, context=self._context()
            )
        return smtplib.SMTP(self.host, self.port, timeout=self.timeout)

    def _context(self) -> ssl.SSLContext:
        if self._ssl_context is None:
            # Built on first use, not at construction: it reads the CA store.
            self._ssl_context = ssl.create_default_context()
        return self._ssl_context


def _permanent(code: int) -> bool:
    """SMTP 5xx replies are permanent; 4xx ones are worth another try."""
    return 500 <= code < 600


def _hang_up(smtp: smtplib.SMTP) -> None:
    """Say QUIT and close; a failing QUIT only closes.

    The reply to DATA decides whether the email was sent. A QUIT that fails
    afterwards must not turn a sent email into an error (and a resend).
    """
    try:
        smtp.quit()
    except OSError:
        smtp.close()
