"""Telling people that a request waits for them: approvers, escalation, a chat webhook, and the
requester's acknowledgement; and recording each approval on the Secret as it comes.

The workflow starts these from its timers while the request waits. Their failure is logged by
the workflow and never fails the request: a decision reaches the workflow whether or not anyone
was told (PRODUCT.md, "People").
"""

from __future__ import annotations

import html
from email.utils import formatdate

import httpx
from kubernetes import client
from temporalio import activity
from temporalio.exceptions import ApplicationError

import audit
from activities.email import Mailer, new_message
from activities.key_request import EMAIL, JUSTIFICATION, MODEL, _a, heartbeating
from activities.kubernetes import SecretStore
from activities.transient import Transient
from domain import ApproverNotice, secret_name
from settings import Settings

# Who has approved so far, comma-separated approver identities; and how many approvals the
# request needs. Never the requester's email.
APPROVALS, APPROVALS_NEEDED = _a("approvals"), _a("approvals-needed")


class WebhookUnavailable(Transient):
    """The webhook did not answer, or answered 5xx/429; worth retrying."""


def _who(approvers: tuple[str, ...]) -> str:
    named = [a if "@" in a else f"group {a}" for a in approvers]
    return ", ".join(named) or "nobody is configured (approval.approvers)"


def _approved_so_far(notice: ApproverNotice) -> str:
    done = ", ".join(notice.approvals) or "nobody yet"
    return f"Approved so far: {done} ({len(notice.approvals)} of {notice.approvals_needed})."


class NotifyActivities:
    def __init__(
        self, settings: Settings, store: SecretStore, mailer: Mailer, http: httpx.AsyncClient
    ) -> None:
        self.settings = settings
        self.store = store
        self.mailer = mailer
        self.http = http

    async def _request(self, request_id: str) -> dict[str, str]:
        secret = await self.store.get(secret_name(request_id))
        if secret is None:
            raise ApplicationError(
                f"secret {secret_name(request_id)} is missing; nobody can be told about it",
                type="RequestGone",
                non_retryable=True,
            )
        return secret.metadata.annotations or {}

    def _message(self, notice: ApproverNotice, annotations: dict[str, str]) -> tuple[str, list]:
        """Subject and paragraphs of the approvers' message (email and webhook alike)."""
        email, model = annotations.get(EMAIL, ""), annotations.get(MODEL, "")
        subject = {
            "waiting": f"Key request waiting for your decision: {model} for {email}",
            "reminder": f"Reminder: key request for {model} by {email} still waits",
            "escalation": f"Escalated: key request for {model} by {email} still waits",
        }[notice.kind]
        paragraphs = [
            f"{email} asks for an API key for the model {model}.",
            f"Justification: {annotations.get(JUSTIFICATION) or '(none given)'}",
            f"Decide before {notice.deadline}; after that the request expires.",
            _approved_so_far(notice),
            f"Approve or deny it in the inbox: {self.settings.api_public_url}/inbox",
        ]
        if notice.kind == "escalation":
            paragraphs.insert(0, "Nobody has decided this request yet, so it comes to you.")
        return subject, paragraphs

    def _acknowledgement(
        self, notice: ApproverNotice, annotations: dict[str, str]
    ) -> tuple[str, list]:
        email, model = annotations.get(EMAIL, ""), annotations.get(MODEL, "")
        approvers = self.settings.approvers_for(email, model)
        needed = notice.approvals_needed
        return f"Your API key request for {model} was received", [
            f"Your request for an API key for {model} waits for a decision.",
            f"It is decided by: {_who(approvers)}"
            + (f" ({needed} of them must approve)." if needed > 1 else "."),
            f"If nobody decides before {notice.deadline}, it expires and you may ask again.",
            f"Follow it at {self.settings.api_public_url}/request/{notice.request_id}",
        ]

    @activity.defn
    @heartbeating
    async def email_approvers(self, notice: ApproverNotice) -> None:
        """One notification email: to the rule's approvers, its escalation list, or (an
        acknowledgement) the requester. Nobody to send to is not an error."""
        annotations = await self._request(notice.request_id)
        email, model = annotations.get(EMAIL, ""), annotations.get(MODEL, "")
        s = self.settings
        if notice.kind == "acknowledgement":
            recipients: tuple[str, ...] = (email,) if email and s.approval_acknowledge else ()
            subject, paragraphs = self._acknowledgement(notice, annotations)
        else:
            if notice.kind == "escalation":
                recipients = s.escalate_to_for(email, model)
            else:
                recipients = s.notify_for(email, model)
            subject, paragraphs = self._message(notice, annotations)
        # Never the requester in an approvers' message: they may not decide their own request.
        if notice.kind != "acknowledgement":
            recipients = tuple(r for r in recipients if r.lower() != email.lower())
        if not recipients:
            activity.logger.info(
                "request %s: nobody to email about %s (set approval.notify or escalate_to)",
                notice.request_id,
                notice.kind,
            )
            return
        message = new_message()
        message["Subject"] = subject
        message["From"] = s.smtp_from
        message["To"] = ", ".join(recipients)
        message["Date"] = formatdate(usegmt=True)
        # Unique per request, cycle and kind, the same on every resend of this one message.
        message["Message-ID"] = (
            f"<{notice.request_id}.{notice.cycle}.approval-{notice.kind}@llm-key-requestor>"
        )
        message["X-Key-Request-Id"] = notice.request_id
        paragraphs = [*paragraphs, f"Request id: {notice.request_id}"]
        message.set_content("\n\n".join(paragraphs) + "\n")
        markup = "".join(f"<p>{html.escape(p)}</p>" for p in paragraphs)
        message.add_alternative(f"<html><body>{markup}</body></html>\n", subtype="html")
        await self.mailer.send(message)

    @activity.defn
    @heartbeating
    async def post_to_webhook(self, notice: ApproverNotice) -> None:
        """The approvers' message as a Slack-compatible incoming webhook's `{"text": ...}`."""
        annotations = await self._request(notice.request_id)
        url = self.settings.webhook_for(annotations.get(EMAIL, ""), annotations.get(MODEL, ""))
        if not url:
            return
        subject, paragraphs = self._message(notice, annotations)
        text = "\n".join([f"*{subject}*", *paragraphs])
        # The URL carries the webhook's secret token: errors name the host only.
        host = httpx.URL(url).host
        try:
            answer = await self.http.post(url, json={"text": text}, timeout=10)
        except httpx.HTTPError as exc:
            raise WebhookUnavailable(f"webhook at {host}: {type(exc).__name__}") from None
        if answer.status_code == 429 or answer.status_code >= 500:
            raise WebhookUnavailable(f"webhook at {host} answered {answer.status_code}")
        if answer.status_code >= 400:
            raise ApplicationError(
                f"webhook at {host} refused the message ({answer.status_code}); check the "
                "rule's `webhook` (or approval.webhook) URL",
                type="WebhookRejected",
                non_retryable=True,
            )

    @activity.defn
    @heartbeating
    async def record_approvals(self, notice: ApproverNotice) -> None:
        """Who has approved so far, on the Secret (kubectl describe shows it)."""
        approvals = ",".join(notice.approvals)
        needed = str(notice.approvals_needed)

        changed = False

        def record(secret: client.V1Secret) -> bool:
            nonlocal changed
            annotations = secret.metadata.annotations
            changed = (annotations.get(APPROVALS, ""), annotations.get(APPROVALS_NEEDED)) != (
                approvals, needed)  # fmt: skip
            annotations[APPROVALS], annotations[APPROVALS_NEEDED] = approvals, needed
            return changed

        if await self.store.update(secret_name(notice.request_id), record) is None:
            # Deleted by hand while people decide: retrying cannot bring it back, and the
            # decision's next step (mint_key or close_request) records the request again.
            activity.logger.warning("secret %s is missing; approvals not recorded on it",
                                    secret_name(notice.request_id))  # fmt: skip
            return
        if changed and notice.approvals:
            audit.record(audit.APPROVAL_RECORDED, request_id=notice.request_id,
                         actor=notice.approvals[-1], approvals=len(notice.approvals),
                         needed=notice.approvals_needed)  # fmt: skip
