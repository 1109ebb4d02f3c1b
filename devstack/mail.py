"""An SMTP sink for tests and the local stack, built on aiosmtpd's threaded ``Controller``.

It accepts every message (optionally behind STARTTLS and AUTH PLAIN/LOGIN), keeps it parsed
in memory, and can also drop a copy of each message into a directory as ``NNNN-<rcpt>.eml``
so a person running the local stack can open the mails. ``stop()`` followed by ``start()``
serves again on the same port, which is how tests simulate the mail server going away.
``on_data`` and ``on_accepted`` hooks let a test refuse one message, or crash the sender at the
moment a message arrives or has just been accepted.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import secrets
import ssl
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword

from devstack.http import free_port

__all__ = ["Envelope", "MailSink"]

_UNSAFE_FILENAME_CHARS = re.compile(r"[^A-Za-z0-9@._+-]")
_EML_NAME = re.compile(r"^(\d+)-")


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope of one accepted message and how its session was secured."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    tls: bool
    auth_login: str | None


class _Handler:
    def __init__(self, sink: MailSink) -> None:
        self._sink = sink

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802 (aiosmtpd hook)
        raw = envelope.original_content or envelope.content
        if isinstance(raw, str):
            raw = raw.encode("utf-8", "surrogateescape")
        login = session.auth_data.login if isinstance(session.auth_data, LoginPassword) else None
        received = Envelope(
            mail_from=envelope.mail_from,
            rcpt_tos=tuple(envelope.rcpt_tos),
            tls=session.ssl is not None,
            auth_login=login.decode("utf-8", "replace") if login is not None else None,
        )
        message = _parse(raw)
        # Test hooks run in a thread of their own: they may block, e.g. to kill the sender.
        if (before := self._sink._on_data) is not None:
            refusal = await asyncio.to_thread(before, message, received)
            if refusal:
                return refusal
        self._sink._accept(raw, received, message)
        if (after := self._sink._on_accepted) is not None:
            await asyncio.to_thread(after, message, received)
        return "250 2.0.0 OK: queued by mail sink"


def _parse(raw: bytes) -> EmailMessage:
    # SMTP carries CRLF; parse with plain newlines so bodies compare like Python text.
    return email.message_from_bytes(  # type: ignore[return-value]
        raw.replace(b"\r\n", b"\n"), policy=email.policy.default
    )


class _SinkController(Controller):
    def factory(self) -> SMTP:
        # aiosmtpd warns about AUTH without TLS; that is an explicit choice for plain sinks.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Requiring AUTH while not requiring TLS")
            return super().factory()


class MailSink:
    """Threaded SMTP server that records every accepted message.

    Usage: ``sink = MailSink().start()``, deliver to ``sink.host:sink.port``, then
    ``[msg] = sink.wait_for(1)`` and finally ``sink.stop()`` (or use it as a context manager).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int | None = None,
        *,
        maildir: Path | None = None,
        tls_context: ssl.SSLContext | None = None,
        require_starttls: bool = False,
        auth: tuple[str, str] | None = None,
        server_hostname: str = "mail-sink.localhost",
    ) -> None:
        if require_starttls and tls_context is None:
            raise ValueError("require_starttls needs a tls_context")
        self.host = host
        self.port = port or free_port(host)
        self.maildir = Path(maildir) if maildir is not None else None
        self.tls_context = tls_context
        self.require_starttls = require_starttls
        self.auth = auth
        self.server_hostname = server_hostname
        self._cond = threading.Condition()
        self._messages: list[EmailMessage] = []
        self._envelopes: list[Envelope] = []
        self._controller: Controller | None = None
        self._file_counter = 0
        self._on_data: Callable[[EmailMessage, Envelope], str | None] | None = None
        self._on_accepted: Callable[[EmailMessage, Envelope], None] | None = None
        if self.maildir is not None:
            self.maildir.mkdir(parents=True, exist_ok=True)
            names = (_EML_NAME.match(p.name) for p in self.maildir.glob("*.eml"))
            self._file_counter = max((int(m.group(1)) for m in names if m), default=0)

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self._controller is not None

    def start(self) -> MailSink:
        """Serve on ``host:port`` (the same port on every start)."""
        if self._controller is not None:
            raise RuntimeError(f"mail sink already running on {self.host}:{self.port}")
        smtp_kwargs: dict = {"server_hostname": self.server_hostname}
        if self.tls_context is not None:
            smtp_kwargs.update(tls_context=self.tls_context, require_starttls=self.require_starttls)
        if self.auth is not None:
            smtp_kwargs.update(
                auth_required=True,
                auth_require_tls=self.tls_context is not None,
                authenticator=self._authenticate,
            )
        # A Controller closes its event loop on stop, so every start gets a fresh one.
        controller = _SinkController(
            _Handler(self), hostname=self.host, port=self.port, **smtp_kwargs
        )
        controller.start()
        self._controller = controller
        return self

    def stop(self) -> None:
        """Stop serving and drop open sessions; safe to call when not running."""
        controller, self._controller = self._controller, None
        if controller is not None:
            controller.stop()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> MailSink:
        return self.start() if not self.running else self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- test hooks ------------------------------------------------------------------------

    def on_data(self, callback: Callable[[EmailMessage, Envelope], str | None] | None) -> None:
        """Call ``callback(message, envelope)`` when a message has arrived, before it is kept.

        A returned SMTP reply (e.g. ``"451 4.3.0 try again later"``) refuses the message: it is
        not kept and the sender gets that reply. None (the return value) accepts it. The
        callback runs in a thread of its own and may block. None (the argument) removes it.
        """
        self._on_data = callback

    def on_accepted(self, callback: Callable[[EmailMessage, Envelope], None] | None) -> None:
        """Call ``callback(message, envelope)`` once a message is kept, before the sender is
        told (``250``). It runs in a thread of its own and may block. None removes it."""
        self._on_accepted = callback

    # -- inspection ------------------------------------------------------------------------

    @property
    def messages(self) -> list[EmailMessage]:
        with self._cond:
            return list(self._messages)

    @property
    def envelopes(self) -> list[Envelope]:
        with self._cond:
            return list(self._envelopes)

    def clear(self) -> None:
        with self._cond:
            self._messages.clear()
            self._envelopes.clear()

    def wait_for(self, count: int, timeout: float = 10) -> list[EmailMessage]:
        """Block until at least ``count`` messages arrived; return all of them."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._messages) >= count, timeout):
                raise TimeoutError(
                    f"expected {count} message(s) within {timeout}s, got {len(self._messages)}"
                )
            return list(self._messages)

    async def wait_for_async(
        self,
        count: int,
        timeout: float = 10,  # noqa: ASYNC109 (mirrors wait_for; the wait runs in a thread)
    ) -> list[EmailMessage]:
        return await asyncio.to_thread(self.wait_for, count, timeout)

    # -- internals -------------------------------------------------------------------------

    def _authenticate(self, server, session, envelope, mechanism, auth_data) -> AuthResult:
        assert self.auth is not None
        if isinstance(auth_data, LoginPassword):
            user, password = self.auth
            ok_user = secrets.compare_digest(auth_data.login, user.encode())
            ok_password = secrets.compare_digest(auth_data.password, password.encode())
            if ok_user and ok_password:
                return AuthResult(success=True, auth_data=auth_data)
        return AuthResult(success=False, handled=False)

    def _accept(self, raw: bytes, envelope: Envelope, message: EmailMessage | None = None) -> None:
        message = message if message is not None else _parse(raw)
        with self._cond:
            if self.maildir is not None:
                self._file_counter += 1
                rcpt = _UNSAFE_FILENAME_CHARS.sub("_", envelope.rcpt_tos[0])
                (self.maildir / f"{self._file_counter:04d}-{rcpt}.eml").write_bytes(raw)
            self._messages.append(message)
            self._envelopes.append(envelope)
            self._cond.notify_all()
