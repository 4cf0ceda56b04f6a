"""The mailers: SMTPMailer against a real aiosmtpd server, ConsoleMailer, RecordingMailer."""

from __future__ import annotations

import datetime as dt
import email
import email.policy
import io
import shutil
import smtplib
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import attrs
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from rational_billing import Email, Mode
from rational_billing.adapters.mail import (
    MODE_HEADER,
    ConsoleMailer,
    RecordingMailer,
    SentEmail,
    SimulatedMailFailure,
    SMTPMailer,
)
from rational_billing.errors import ConfigError, MailRejected

SENDER = "Billing <billing@platform.test>"
USER, PASSWORD = "mailer", "s3cret-pa55"


def make_email(**overrides: Any) -> Email:
    """An invitation-like email; fields can be overridden."""
    fields: dict[str, Any] = {
        "to": "ada@example.test",
        "subject": "You are invited",
        "text": "Hello Ada,\nyour account is ready.\n",
        "message_id": "invite.acme.cus_123@rational-billing",
    }
    fields.update(overrides)
    return Email(**fields)


# -- a real SMTP server ------------------------------------------------------------------------


@attrs.define
class Received:
    """One message as the SMTP server got it."""

    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    authenticated: bool
    tls: bool

    def message(self) -> EmailMessage:
        """The parsed message."""
        parsed = email.message_from_bytes(self.content, policy=email.policy.default)
        assert isinstance(parsed, EmailMessage)
        return parsed


class Collector:
    """An aiosmtpd handler that keeps every envelope it accepts."""

    def __init__(self) -> None:
        self.received: list[Received] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        """Keep the envelope and accept it."""
        self.received.append(
            Received(
                mail_from=envelope.mail_from,
                rcpt_tos=list(envelope.rcpt_tos),
                content=envelope.original_content or envelope.content,
                authenticated=bool(session.authenticated),
                tls=server.transport.get_extra_info("ssl_object") is not None,
            )
        )
        return "250 OK"


def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> Any:
    """Accept USER/PASSWORD only."""
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        USER.encode(),
        PASSWORD.encode(),
    )
    # handled=False: aiosmtpd answers 535 itself when the login is refused.
    return AuthResult(success=ok, handled=False)


def free_port() -> int:
    """A port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def smtp_server(**kwargs: Any) -> Iterator[tuple[Controller, Collector]]:
    """Run aiosmtpd on 127.0.0.1 on a free port; stop it afterwards."""
    collector = Collector()
    controller = Controller(
        collector,
        hostname="127.0.0.1",
        port=free_port(),
        server_hostname="localhost",
        ready_timeout=10.0,
        **kwargs,
    )
    controller.start()
    try:
        yield controller, collector
    finally:
        controller.stop()


@attrs.frozen
class Certificate:
    """A self-signed certificate for 127.0.0.1 and localhost."""

    cert: Path
    key: Path

    def server_context(self) -> ssl.SSLContext:
        """A server-side context presenting the certificate."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client_context(self) -> ssl.SSLContext:
        """A verifying client context that trusts only this certificate."""
        return ssl.create_default_context(cafile=str(self.cert))


def _certificate_with_cryptography(directory: Path) -> Certificate | None:
    try:
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID
    except ImportError:
        return None
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths = Certificate(directory / "cert.pem", directory / "key.pem")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return paths


def _certificate_with_openssl(directory: Path) -> Certificate | None:
    openssl = shutil.which("openssl")
    if openssl is None:
        return None
    paths = Certificate(directory / "cert.pem", directory / "key.pem")
    result = subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
            str(paths.key),
            "-out",
            str(paths.cert),
        ],
        capture_output=True,
        check=False,
    )
    if result.returncode != 0:
        return None
    return paths


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Certificate:
    """A self-signed certificate made now, with cryptography or else the openssl command."""
    directory = tmp_path_factory.mktemp("tls")
    made = _certificate_with_cryptography(directory) or _certificate_with_openssl(directory)
    if made is None:
        pytest.skip("no way to make a test certificate: neither cryptography nor openssl works")
    return made


# -- SMTPMailer ---------------------------------------------------------------------------------


def test_smtp_sends_plain_message() -> None:
    """A plain SMTP send reaches the server with the right envelope and text."""
    with smtp_server() as (controller, collector):
        mailer = SMTPMailer(controller.hostname, controller.port, sender=SENDER)
        mailer.send(make_email(), mode=Mode.TEST)

    [got] = collector.received
    assert got.mail_from == "billing@platform.test"
    assert got.rcpt_tos == ["ada@example.test"]
    assert not got.tls
    assert not got.authenticated
    message = got.message()
    assert not message.is_multipart()
    assert message.get_content().replace("\r\n", "\n") == "Hello Ada,\nyour account is ready.\n"


def test_smtp_sets_headers() -> None:
    """From, To, Subject, Date, the stable Message-ID and the mode header are set."""
    with smtp_server() as (controller, collector):
        mailer = SMTPMailer(controller.hostname, controller.port, sender=SENDER)
        mailer.send(make_email(), mode=Mode.LIVE)
        mailer.send(make_email(), mode=Mode.TEST)

    first, second = (r.message() for r in collector.received)
    assert first["From"] == SENDER
    assert first["To"] == "ada@example.test"
    assert first["Subject"] == "You are invited"
    assert first["Message-ID"] == "<invite.acme.cus_123@rational-billing>"
    assert second["Message-ID"] == first["Message-ID"]
    assert first[MODE_HEADER] == "live"
    assert second[MODE_HEADER] == "test"
    sent_at = first["Date"].datetime
    assert abs(sent_at - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)


def test_smtp_keeps_bracketed_message_id_and_email_sender() -> None:
    """A Message-ID already in <> is kept as is, and the email's own sender wins."""
    with smtp_server() as (controller, collector):
        mailer = SMTPMailer(controller.hostname, controller.port, sender=SENDER)
        mailer.send(
            make_email(message_id="<abc@host.test>", sender="Acme <hello@acme.test>"),
            mode=Mode.TEST,
        )

    [got] = collector.received
    assert got.mail_from == "hello@acme.test"
    assert got.message()["Message-ID"] == "<abc@host.test>"
    assert got.message()["From"] == "Acme <hello@acme.test>"


def test_smtp_sends_html_alternative() -> None:
    """With html, the message is multipart/alternative: text first, then HTML."""
    with smtp_server() as (controller, collector):
        mailer = SMTPMailer(controller.hostname, controller.port, sender=SENDER)
        mailer.send(make_email(html="<p>Hello <b>Ada</b></p>"), mode=Mode.TEST)

    message = collector.received[0].message()
    assert message.get_content_type() == "multipart/alternative"
    text, html = message.iter_parts()
    assert text.get_content_type() == "text/plain"
    assert "your account is ready" in text.get_content()
    assert html.get_content_type() == "text/html"
    assert "<b>Ada</b>" in html.get_content()


def test_smtp_logs_in() -> None:
    """With a username and password the mailer authenticates before sending."""
    with smtp_server(authenticator=authenticator, auth_require_tls=False) as (
        controller,
        collector,
    ):
        mailer = SMTPMailer(
            controller.hostname, controller.port, sender=SENDER, username=USER, password=PASSWORD
        )
        mailer.send(make_email(), mode=Mode.TEST)

    assert collector.received[0].authenticated


def test_smtp_wrong_password_raises() -> None:
    """A refused login raises SMTPAuthenticationError and nothing is delivered."""
    import smtplib

    with smtp_server(authenticator=authenticator, auth_require_tls=False) as (
        controller,
        collector,
    ):
        mailer = SMTPMailer(
            controller.hostname, controller.port, sender=SENDER, username=USER, password="nope"
        )
        with pytest.raises(smtplib.SMTPAuthenticationError):
            mailer.send(make_email(), mode=Mode.TEST)

    assert collector.received == []


def test_smtp_starttls(certificate: Certificate) -> None:
    """STARTTLS upgrades the connection before logging in (AUTH only offered over TLS)."""
    with smtp_server(
        tls_context=certificate.server_context(),
        require_starttls=True,
        authenticator=authenticator,
        auth_require_tls=True,
    ) as (controller, collector):
        mailer = SMTPMailer(
            controller.hostname,
            controller.port,
            security="starttls",
            ssl_context=certificate.client_context(),
            sender=SENDER,
            username=USER,
            password=PASSWORD,
        )
        mailer.send(make_email(), mode=Mode.TEST)

    [got] = collector.received
    assert got.tls
    assert got.authenticated


def test_smtp_starttls_verifies_certificate(certificate: Certificate) -> None:
    """STARTTLS with the default context refuses an untrusted self-signed certificate."""
    with smtp_server(tls_context=certificate.server_context(), require_starttls=True) as (
        controller,
        collector,
    ):
        mailer = SMTPMailer(
            controller.hostname, controller.port, security="starttls", sender=SENDER
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            mailer.send(make_email(), mode=Mode.TEST)

    assert collector.received == []


def test_smtp_starttls_not_offered_raises() -> None:
    """Asking for STARTTLS from a server that does not offer it fails; nothing is sent."""
    import smtplib

    with smtp_server() as (controller, collector):
        mailer = SMTPMailer(
            controller.hostname, controller.port, security="starttls", sender=SENDER
        )
        with pytest.raises(smtplib.SMTPNotSupportedError):
            mailer.send(make_email(), mode=Mode.TEST)

    assert collector.received == []


def test_smtp_implicit_tls(certificate: Certificate) -> None:
    """security='ssl' speaks TLS from the first byte."""
    with smtp_server(ssl_context=certificate.server_context()) as (controller, collector):
        mailer = SMTPMailer(
            controller.hostname,
            controller.port,
            security="ssl",
            ssl_context=certificate.client_context(),
            sender=SENDER,
        )
        mailer.send(make_email(html="<p>hi</p>"), mode=Mode.LIVE)

    [got] = collector.received
    assert got.tls
    assert got.message()[MODE_HEADER] == "live"


def test_smtp_server_down_raises_oserror() -> None:
    """No server listening: the send raises an OSError for the caller to retry."""
    mailer = SMTPMailer("127.0.0.1", free_port(), sender=SENDER, timeout=2.0)
    with pytest.raises(OSError):  # noqa: PT011  (any OSError: ConnectionRefusedError here)
        mailer.send(make_email(), mode=Mode.TEST)


def test_smtp_rejects_header_injection() -> None:
    """A subject with a line break is refused before any connection is made."""
    mailer = SMTPMailer("127.0.0.1", free_port(), sender=SENDER)
    with pytest.raises(ValueError, match=r"linefeed|carriage return"):
        mailer.send(make_email(subject="Hi\r\nBcc: eve@example.test"), mode=Mode.TEST)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"security": "tls"}, "security"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"port": True}, "port"),
        ({"sender": ""}, "sender"),
        ({"sender": "not an address"}, "sender"),
        ({"username": "u"}, "together"),
        ({"password": "p"}, "together"),
        ({"timeout": 0}, "timeout"),
        ({"host": ""}, "host"),
        ({"ssl_context": ssl.create_default_context()}, "ssl_context"),
    ],
)
def test_smtp_constructor_validates(kwargs: dict[str, Any], match: str) -> None:
    """Bad settings raise ConfigError naming the setting."""
    arguments: dict[str, Any] = {"host": "smtp.example.test", "sender": SENDER}
    arguments.update(kwargs)
    with pytest.raises(ConfigError, match=match):
        SMTPMailer(**arguments)


def test_smtp_repr_hides_password() -> None:
    """The password never appears in repr or str."""
    mailer = SMTPMailer(
        "smtp.example.test",
        587,
        security="starttls",
        sender=SENDER,
        username=USER,
        password=PASSWORD,
    )
    assert PASSWORD not in repr(mailer)
    assert PASSWORD not in str(mailer)
    assert "smtp.example.test:587" in repr(mailer)


# -- ConsoleMailer ------------------------------------------------------------------------------


def test_console_mailer_writes_to_stream() -> None:
    """The rendering shows mode, Message-ID, addresses, subject and text."""
    stream = io.StringIO()
    ConsoleMailer(stream).send(make_email(html="<p>x</p>"), mode=Mode.LIVE)

    out = stream.getvalue()
    assert "live mode" in out
    assert "Message-ID: <invite.acme.cus_123@rational-billing>" in out
    assert "To: ada@example.test" in out
    assert "Subject: You are invited" in out
    assert f"{MODE_HEADER}: live" in out
    assert "your account is ready." in out
    assert "HTML alternative" in out


def test_console_mailer_defaults_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    """Without a stream it prints to the current standard output."""
    ConsoleMailer().send(make_email(), mode=Mode.TEST)

    out = capsys.readouterr().out
    assert "test mode" in out
    assert "Subject: You are invited" in out


# -- RecordingMailer ----------------------------------------------------------------------------


def test_recording_mailer_records_email_and_mode() -> None:
    """Each send is kept as an (email, mode) pair, in order."""
    mailer = RecordingMailer()
    first, second = make_email(), make_email(to="bob@example.test")
    mailer.send(first, mode=Mode.TEST)
    mailer.send(second, mode=Mode.LIVE)

    assert mailer.sent == [(first, Mode.TEST), (second, Mode.LIVE)]
    assert mailer.sent[0] == SentEmail(email=first, mode=Mode.TEST)
    assert mailer.to("BOB@example.test") == [second]
    assert mailer.to("nobody@example.test") == []
    assert len(mailer) == 2


def test_recording_mailer_fails_on_demand() -> None:
    """With fail_times=2 the first two sends raise and record nothing; the third is kept."""
    mailer = RecordingMailer(fail_times=2)
    for _ in range(2):
        with pytest.raises(SimulatedMailFailure, match="told to fail"):
            mailer.send(make_email(), mode=Mode.TEST)
    assert mailer.sent == []

    mailer.send(make_email(), mode=Mode.TEST)
    assert len(mailer.sent) == 1
    assert mailer.attempts == 3
    assert isinstance(SimulatedMailFailure("x"), OSError)


def test_recording_mailer_fail_times_can_be_set_later() -> None:
    """Setting fail_times on a working mailer makes the next sends fail."""
    mailer = RecordingMailer()
    mailer.send(make_email(), mode=Mode.TEST)
    mailer.fail_times = 1
    with pytest.raises(SimulatedMailFailure):
        mailer.send(make_email(), mode=Mode.TEST)
    mailer.send(make_email(), mode=Mode.TEST)
    assert len(mailer.sent) == 2


def test_recording_mailer_rejects_negative_fail_times() -> None:
    """fail_times must be a whole number of at least 0."""
    with pytest.raises(ConfigError, match="fail_times"):
        RecordingMailer(fail_times=-1)


def test_recording_mailer_is_thread_safe() -> None:
    """Concurrent sends and failures are all accounted for."""
    mailer = RecordingMailer(fail_times=25)
    failures: list[BaseException] = []
    lock = threading.Lock()

    def worker(n: int) -> None:
        for i in range(50):
            try:
                mailer.send(make_email(message_id=f"m-{n}-{i}"), mode=Mode.TEST)
            except SimulatedMailFailure as exc:
                with lock:
                    failures.append(exc)

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(failures) == 25
    assert len(mailer.sent) == 8 * 50 - 25
    assert mailer.attempts == 8 * 50
    assert len({s.email.message_id for s in mailer.sent}) == len(mailer.sent)


class _RefusingRecipients(Collector):
    """An SMTP handler that answers every RCPT with a fixed reply."""

    def __init__(self, reply: str) -> None:
        super().__init__()
        self.reply = reply

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: Any
    ) -> str:
        return self.reply


@contextmanager
def _refusing_server(reply: str) -> Iterator[Controller]:
    controller = Controller(
        _RefusingRecipients(reply),
        hostname="127.0.0.1",
        port=free_port(),
        server_hostname="localhost",
        ready_timeout=10.0,
    )
    controller.start()
    try:
        yield controller
    finally:
        controller.stop()


def test_smtp_permanent_refusal_raises_mail_rejected() -> None:
    """A 550 for the recipient is a MailRejected: retrying cannot help."""
    with _refusing_server("550 5.1.1 no such user") as controller:
        mailer = SMTPMailer(controller.hostname, controller.port, sender=SENDER)
        with pytest.raises(MailRejected, match="for good"):
            mailer.send(make_email(), mode=Mode.TEST)


def test_smtp_temporary_refusal_is_an_ordinary_failure_to_retry() -> None:
    """A 450 for the recipient raises smtplib's refusal (an OSError), not MailRejected."""
    with _refusing_server("450 4.2.1 mailbox busy, try later") as controller:
        mailer = SMTPMailer(controller.hostname, controller.port, sender=SENDER)
        with pytest.raises(smtplib.SMTPRecipientsRefused):
            mailer.send(make_email(), mode=Mode.TEST)
