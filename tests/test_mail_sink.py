"""The mail sink speaks real SMTP: aiosmtplib delivers to it, with and without STARTTLS/AUTH."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from devstack.mail import MailSink

USER, PASSWORD = "mailer", "s3cret-pass"


def make_message(subject: str, to: str = "ada@example.org") -> EmailMessage:
    message = EmailMessage()
    message["From"] = "keys@example.org"
    message["To"] = to
    message["Subject"] = subject
    message.set_content(f"body of {subject}\n")
    return message


async def deliver(sink: MailSink, message: EmailMessage, **kwargs) -> None:
    kwargs.setdefault("start_tls", False)
    await aiosmtplib.send(
        message,
        hostname=sink.host,
        port=sink.port,
        local_hostname="client.localhost",
        timeout=5,
        **kwargs,
    )


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


@pytest.fixture(scope="module")
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


@pytest.fixture
def sink() -> Iterator[MailSink]:
    with MailSink() as running:
        yield running


async def test_plain_delivery(sink: MailSink) -> None:
    await deliver(sink, make_message("hello"))
    [message] = await sink.wait_for_async(1)
    assert isinstance(message, EmailMessage)
    assert message["Subject"] == "hello"
    assert message.get_content() == "body of hello\n"
    [envelope] = sink.envelopes
    assert envelope.mail_from == "keys@example.org"
    assert envelope.rcpt_tos == ("ada@example.org",)
    assert (envelope.tls, envelope.auth_login) == (False, None)


async def test_starttls_with_required_auth(
    server_tls: ssl.SSLContext, client_tls: ssl.SSLContext
) -> None:
    with MailSink(tls_context=server_tls, require_starttls=True, auth=(USER, PASSWORD)) as sink:
        tls = {"start_tls": True, "tls_context": client_tls}
        await deliver(sink, make_message("authed"), username=USER, password=PASSWORD, **tls)
        [message] = await sink.wait_for_async(1)
        assert message["Subject"] == "authed"
        assert (sink.envelopes[0].tls, sink.envelopes[0].auth_login) == (True, USER)

        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as refused:
            await deliver(sink, make_message("bad"), username=USER, password="wrong", **tls)
        assert refused.value.code == 535
        with pytest.raises(aiosmtplib.SMTPResponseException) as unauthenticated:
            await deliver(sink, make_message("anonymous"), **tls)
        assert unauthenticated.value.code == 530
        assert [m["Subject"] for m in sink.messages] == ["authed"]


async def test_require_starttls_refuses_a_plain_client(server_tls: ssl.SSLContext) -> None:
    with MailSink(tls_context=server_tls, require_starttls=True) as sink:
        with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
            await deliver(sink, make_message("plain"), start_tls=False)
        assert refused.value.code == 530
        assert sink.messages == []


async def test_stop_then_start_on_the_same_port(sink: MailSink) -> None:
    port = sink.port
    sink.stop()
    with pytest.raises(aiosmtplib.SMTPConnectError):
        await deliver(sink, make_message("while down"))
    sink.start()
    assert sink.port == port
    await deliver(sink, make_message("after start"))
    sink.restart()
    await deliver(sink, make_message("after restart"))
    messages = await sink.wait_for_async(2)
    assert [m["Subject"] for m in messages] == ["after start", "after restart"]


async def test_maildir_gets_eml_files(tmp_path: Path) -> None:
    maildir = tmp_path / "mail"
    with MailSink(maildir=maildir) as sink:
        await deliver(sink, make_message("first", to="ada@example.org"))
        await deliver(sink, make_message("second", to="bob@example.org"))
        await sink.wait_for_async(2)
    names = sorted(p.name for p in maildir.iterdir())
    assert names == ["0001-ada@example.org.eml", "0002-bob@example.org.eml"]
    assert b"Subject: second" in (maildir / names[1]).read_bytes()
    with MailSink(maildir=maildir) as again:  # numbering continues, nothing is overwritten
        await deliver(again, make_message("third"))
        await again.wait_for_async(1)
    assert len(list(maildir.iterdir())) == 3 and (maildir / "0003-ada@example.org.eml").exists()


def test_wait_for_times_out_with_a_clear_error(sink: MailSink) -> None:
    with pytest.raises(TimeoutError, match="expected 1 message"):
        sink.wait_for(1, timeout=0.05)


async def test_hooks_see_each_message_and_can_refuse_it(sink: MailSink) -> None:
    arrived, accepted = [], []

    def before(message: EmailMessage, envelope) -> str | None:
        arrived.append((message["Subject"], len(sink.messages)))
        return "451 4.3.0 try again later" if message["Subject"] == "refused" else None

    sink.on_data(before)
    sink.on_accepted(lambda message, envelope: accepted.append(len(sink.messages)))
    with pytest.raises(aiosmtplib.SMTPDataError) as refused:
        await deliver(sink, make_message("refused"))
    assert refused.value.code == 451
    await deliver(sink, make_message("kept"))
    assert [m["Subject"] for m in sink.messages] == ["kept"]
    # on_data runs before the message is kept, on_accepted after (and only for kept ones).
    assert arrived == [("refused", 0), ("kept", 0)]
    assert accepted == [1]

    sink.on_data(None)
    sink.on_accepted(None)
    await deliver(sink, make_message("unhooked"))
    assert len(arrived) == 2 and len(accepted) == 1 and len(sink.messages) == 2
