"""Notification emails: what each outcome tells the requester, and the SMTP client."""

from __future__ import annotations

import asyncio
import html
import socket
import ssl
from dataclasses import dataclass
from datetime import datetime
from email import policy
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.utils import formatdate

import aiosmtplib
from opentelemetry import trace
from temporalio.exceptions import ApplicationError

from activities.transient import Transient
from domain import RequestState

# A no-op until telemetry.py installs a tracer provider (OTEL_EXPORTER_OTLP_ENDPOINT).
_tracer = trace.get_tracer(__name__)


class _Headers(HeaderRegistry):
    """The standard header classes, each built once. The stock registry builds a new class for
    every header of every message: half the time it took to compose one (BENCHMARKS.md)."""

    def __init__(self) -> None:
        super().__init__()
        self._built: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        if key not in self._built:
            self._built[key] = super().__getitem__(name)
        return self._built[key]


_POLICY = policy.default.clone(header_factory=_Headers())


def new_message() -> EmailMessage:
    """An empty message under the standard policy (RFC 5322, headers encoded as needed)."""
    return EmailMessage(policy=_POLICY)


class MailUnavailable(Transient):
    """The mail server did not accept the message; worth retrying."""


class MailRejected(ApplicationError):
    """The mail server refused the recipient or the message for good (a 5xx answer): a retry
    cannot change it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="MailRejected", non_retryable=True)


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
    # Lifecycle emails: kind (reminder, renewed, renewal-denied, rotated, revoked, key-expired);
    # empty for the outcome of a decision, which `state` names.
    kind: str = ""
    cycle: int = 1
    detail: str = ""
    budget: str = ""  # "USD 50.00, reset every 30 days", from the settings
    resubmit_after: str = ""  # "24 hours": when a denied request may be sent again

    @property
    def carries_key(self) -> bool:
        return self.kind == "rotated" or (not self.kind and self.state is RequestState.APPROVED)


# Said in every email that invites a renewal.
HOW_TO_RENEW = (
    "To renew it, submit the same request again (same email address and model) on the request "
    "form or with POST /api/request-key; renewals go through the approval policy again."
)


def readable_time(value: str) -> str:
    """'2026-12-31T07:55:27.347492Z' -> '31 Dec 2026, 07:55 UTC'; '' -> ''."""
    if not value:
        return ""
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    return moment.strftime("%-d %b %Y, %H:%M UTC")


def human_span(seconds: float) -> str:
    """86400 -> '1 day', 2592000 -> '30 days', 5400 -> '90 minutes'."""
    seconds = int(seconds)
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60), ("second", 1)):
        if seconds >= size and seconds % size == 0:
            count = seconds // size
            return f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{seconds} seconds"


def _lifecycle_paragraphs(notice: Notice) -> tuple[str, list[str]]:
    model, expires = notice.model, readable_time(notice.key_expires) or "never"
    if notice.kind == "reminder":
        return f"Your API key for {model} expires on {expires}", [
            f"Your API key for {model} expires on {expires} (in about {notice.detail}).",
            HOW_TO_RENEW,
            "Renewed in time, the key stays the same; you only get a new expiry date.",
        ]
    if notice.kind == "renewed":
        return f"Your API key for {model} was renewed", [
            f"Your API key for {model} was renewed. It now expires on {expires}.",
            "Keep using the key you have: it has not changed.",
        ]
    if notice.kind == "renewal-denied":
        return f"Your API key renewal for {model} was not approved", [
            f"Your request to renew your API key for {model} was not approved.",
            f"Reason: {notice.reason or 'none given'}",
            f"Your current key keeps working until {expires}.",
        ]
    if notice.kind == "rotated":
        return f"Your new API key for {model}", [
            f"Your API key for {model} was rotated: here is its replacement.",
            f"It works for the model {model} only and expires on {expires}.",
            "Switch to it now: the previous key stops working after a short grace period.",
        ]
    if notice.kind == "revoked":
        by = f" by {notice.reviewer}" if notice.reviewer else ""
        return f"Your API key for {model} was revoked", [
            f"Your API key for {model} was revoked{by} and no longer works.",
            f"Reason: {notice.reason or 'none given'}",
            "If you still need a key, submit a new request.",
        ]
    return f"Your API key for {model} has expired", [
        f"Your API key for {model} reached its expiry date and no longer works.",
        HOW_TO_RENEW,
    ]


def _paragraphs(notice: Notice) -> tuple[str, list[str]]:
    """Subject and body paragraphs; the key itself is added by compose()."""
    if notice.kind:
        return _lifecycle_paragraphs(notice)
    model = notice.model
    if notice.reviewer.startswith("policy:"):
        by = " automatically by the approval policy"
    else:
        by = f" by {notice.reviewer}" if notice.reviewer else ""
    if notice.state is RequestState.APPROVED:
        expires = readable_time(notice.key_expires)
        expiry = f"It expires on {expires}." if expires else "It does not expire."
        budget = [f"Budget: {notice.budget}."] if notice.budget else []
        note = [f"Note from the reviewer: {notice.reason}"] if notice.reason else []
        return f"Your API key for {model}", [
            f"Your request for an API key for {model} was approved{by}.",
            f"The key works for the model {model} only. {expiry}",
            *budget,
            *note,
            "Keep it secret: anyone with the key can spend its budget.",
        ]
    if notice.state is RequestState.DENIED:
        wait = f" after {notice.resubmit_after}" if notice.resubmit_after else ""
        return f"Your API key request for {model} was denied", [
            f"Your request for an API key for {model} was denied{by}.",
            f"Reason: {notice.reason or 'none given'}",
            "What next: if you think this is a mistake, ask your manager or the platform team, "
            "quoting the request id below. You may submit the request again" + wait + ".",
        ]
    if notice.state is RequestState.EXPIRED:
        return f"Your API key request for {model} expired", [
            f"Your request for an API key for {model} was not reviewed in time and has expired.",
            "You may submit it again.",
        ]
    # The cause (LiteLLM's own error text) is for operators: it is in the Secret and the
    # request's status, not in mail to the requester.
    return f"Your API key request for {model} could not be completed", [
        f"Your request for an API key for {model} was approved, but the key could not be issued.",
        "Please contact the platform team and quote your request id below; they can see the "
        "cause. You may also submit the request again later.",
    ]


def compose(notice: Notice, sender: str) -> EmailMessage:
    subject, paragraphs = _paragraphs(notice)
    message = new_message()
    message["Subject"] = subject
    message["From"] = sender
    message["To"] = notice.email
    message["Date"] = formatdate(usegmt=True)
    # Stable per request, cycle and kind: a resend after a crash is recognisably the same mail,
    # and every other mail has an id of its own. The first cycle keeps the original form.
    message["Message-ID"] = f"<{message_id(notice)}@llm-key-requestor>"
    message["X-Key-Request-Id"] = notice.request_id

    text = list(paragraphs)
    markup = [f"<p>{html.escape(p)}</p>" for p in paragraphs]
    if notice.carries_key:
        usage = (
            f"export LITELLM_KEY='{notice.api_key}'\n"
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


def message_id(notice: Notice) -> str:
    kind = notice.kind or notice.state.value
    if notice.cycle == 1 and not notice.kind:
        return f"{notice.request_id}.{kind}"
    detail = f".{notice.detail}" if notice.kind in ("reminder", "rotated") else ""
    return f"{notice.request_id}.{notice.cycle}.{kind}{detail}"


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
        # The name our EHLO gives: looked up at the first email, then kept, where aiosmtplib would
        # ask the resolver again for every connection. Not here: a slow resolver would hold up
        # the worker's start, on its event loop.
        self._local_hostname: str | None = None

    @_tracer.start_as_current_span("smtp send", kind=trace.SpanKind.CLIENT)
    async def send(self, message: EmailMessage) -> None:
        trace.get_current_span().set_attributes(
            {"server.address": self.host, "server.port": self.port}
        )
        implicit_tls = self._use_tls and self.port == 465
        if self._local_hostname is None:
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        try:
            await aiosmtplib.send(
                message,
                hostname=self.host,
                port=self.port,
                local_hostname=self._local_hostname,
                username=self._user or None,
                password=self._password or None,
                use_tls=implicit_tls,
                start_tls=self._use_tls and not implicit_tls,
                tls_context=self._tls_context,
                timeout=self._timeout,
            )
        except (aiosmtplib.SMTPRecipientsRefused, aiosmtplib.SMTPRecipientRefused,
                aiosmtplib.SMTPDataError) as exc:  # fmt: skip
            # A refused recipient or message is final when the server says 5xx; 4xx is "later".
            # (A refused login or sender is our configuration: retried until it is fixed.)
            refusals = getattr(exc, "recipients", None) or [exc]
            if all(500 <= getattr(r, "code", 0) < 600 for r in refusals):
                reply = "; ".join(f"{r.code} {r.message}" for r in refusals)
                raise MailRejected(f"the mail server refused the message: {reply}"[:300]) from None
            raise MailUnavailable(
                f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            # aiosmtplib's messages carry the server's reply, never the message body.
            raise MailUnavailable(
                f"SMTP {self.host}:{self.port}: {type(exc).__name__}: {exc}"
            ) from None
