"""Notification emails: what each outcome tells the requester, and the SMTP client."""

from __future__ import annotations

import html
import ssl
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib
from opentelemetry import trace

from domain import RequestState

# A no-op until telemetry.py installs a tracer provider (OTEL_EXPORTER_OTLP_ENDPOINT).
_tracer = trace.get_tracer(__name__)


class MailUnavailable(Exception):
    """The mail server did not accept the message; worth retrying."""


@dataclass
class Notice:
    """Everything a notification needs, read from the request's Secret."""

    request_id: str
    state: RequestState
    email: str
    model: str
    reason: str = ""
    reviewer: str = ""
    api_key: str = ""
    key_expires: str = ""
    proxy_url: str = ""


def _paragraphs(notice: Notice) -> tuple[str, list[str]]:
    """Subject and body paragraphs; the key itself is added by compose()."""
    model = notice.model
    if notice.reviewer.startswith("policy:"):
        by = " automatically by the approval policy"
    else:
        by = f" by {notice.reviewer}" if notice.reviewer else ""
    if notice.state is RequestState.APPROVED:
        expiry = (
            f"It expires {notice.key_expires}." if notice.key_expires else "It does not expire."
        )
        note = [f"Note from the reviewer: {notice.reason}"] if notice.reason else []
        return f"Your API key for {model}", [
            f"Your request for an API key for {model} was approved{by}.",
            f"The key works for the model {model} only. {expiry}",
            *note,
            "Keep it secret: anyone with the key can spend its budget.",
        ]
    if notice.state is RequestState.DENIED:
        return f"Your API key request for {model} was denied", [
            f"Your request for an API key for {model} was denied{by}.",
            f"Reason: {notice.reason or 'none given'}",
        ]
    if notice.state is RequestState.EXPIRED:
        return f"Your API key request for {model} expired", [
            f"Your request for an API key for {model} was not reviewed in time and has expired.",
            "You may submit it again.",
        ]
    return f"Your API key request for {model} could not be completed", [
        f"Your request for an API key for {model} was approved, but the key could not be issued.",
        f"Cause: {notice.reason or 'unknown'}",
        "Please contact the platform team and quote your request id.",
    ]


def compose(notice: Notice, sender: str) -> EmailMessage:
    subject, paragraphs = _paragraphs(notice)
    message = EmailMessage()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = notice.email
    message["Date"] = formatdate(usegmt=True)
    # Stable per request and outcome: a resend after a crash is recognisably the same mail.
    message["Message-ID"] = f"<{notice.request_id}.{notice.state.value}@llm-key-requestor>"
    message["X-Key-Request-Id"] = notice.request_id

    text = list(paragraphs)
    markup = [f"<p>{html.escape(p)}</p>" for p in paragraphs]
    if notice.state is RequestState.APPROVED:
        usage = (
            f"curl {notice.proxy_url}/v1/chat/completions \\\n"
            f'  -H "Authorization: Bearer $LITELLM_KEY" -H "Content-Type: application/json" \\\n'
            f'  -d \'{{"model": "{notice.model}", "messages": [{{"role": "user", '
            f'"content": "Hello"}}]}}\''
        )
        text[1:1] = [f"Your key: {notice.api_key}"]
        text += ["How to use it (OpenAI-compatible API):", usage]
        markup[1:1] = [f"<p>Your key: <code>{html.escape(notice.api_key)}</code></p>"]
        markup += [
            "<p>How to use it (OpenAI-compatible API):</p>",
            f"<pre>{html.escape(usage)}</pre>",
        ]
    text.append(f"Request id: {notice.request_id}")
    markup.append(f"<p>Request id: <code>{html.escape(notice.request_id)}</code></p>")
    message.set_content("\n\n".join(text) + "\n")
    message.add_alternative("<html><body>" + "".join(markup) + "</body></html>\n", subtype="html")
    return message


class Mailer:
    def __init__(
        self,
        host: str,
        port: int,
        sender: str,
        user: str = "",
        password: str = "",
        use_tls: bool = True,
        timeout: float = 30,
        tls_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host, self.port, self.sender = host, port, sender
        self._user, self._password = user, password
        self._use_tls, self._timeout = use_tls, timeout
        self._tls_context = tls_context

    @_tracer.start_as_current_span("smtp send", kind=trace.SpanKind.CLIENT)
    async def send(self, message: EmailMessage) -> None:
        trace.get_current_span().set_attributes(
            {"server.address": self.host, "server.port": self.port}
        )
        implicit_tls = self._use_tls and self.port == 465
        try:
            await aiosmtplib.send(
                message,
                hostname=self.host,
                port=self.port,
                username=self._user or None,
                password=self._password or None,
                use_tls=implicit_tls,
                start_tls=self._use_tls and not implicit_tls,
                tls_context=self._tls_context,
                timeout=self._timeout,
            )
        except (aiosmtplib.SMTPException, OSError) as exc:
            # aiosmtplib's messages carry the server's reply, never the message body.
            raise MailUnavailable(
                f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from None
