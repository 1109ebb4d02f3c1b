"""A request waiting for people tells them: the approvers' email and chat webhook, a reminder,
an escalation, the requester's acknowledgement; a webhook that is down changes nothing.

Days pass on the time-skipping server; the mail server (aiosmtpd) and the webhook receiver are
real servers on loopback. The workflow is started directly, as in tests/test_deadline.py.
"""

from __future__ import annotations

import json
import socket
import threading
import uuid
from collections.abc import Iterator
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import RULES, secret_of, time_skipping, unique_email, wait_until
from devstack.mail import MailSink
from domain import (
    QUERY_STATUS,
    SIGNAL_APPROVE,
    KeyRequest,
    RequestState,
    RequestStatus,
    Review,
    request_id_for,
    workflow_id,
)
from settings import ApprovalRule
from test_key_request_flow import KEY, plain
from test_replay import record_history
from workflows.key_request import KeyRequestWorkflow

LEAD, TEAM, HEAD = "lead@example.com", "team@example.com", "head@example.com"
JUSTIFICATION = "Benchmarking the support bot"


class WebhookReceiver:
    """A Slack-style incoming webhook: keeps each JSON body it is posted."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length", 0))
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T0/B0/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def webhook() -> Iterator[WebhookReceiver]:
    receiver = WebhookReceiver()
    yield receiver
    receiver.stop()


def closed_port_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def to(sink, address: str) -> list:
    return [m for m in sink.messages if address in (m["To"] or "")]


def kind(sink, request_id: str, name: str) -> list:
    return [m for m in sink.messages if f"{request_id}.1.approval-{name}@" in m["Message-ID"]]


def approved(sink, request_id: str) -> list:
    return [
        m for m in sink.messages if m["Message-ID"] == f"<{request_id}.approved@llm-key-requestor>"
    ]


async def one(sink, request_id: str, name: str):
    found = await wait_until(lambda: kind(sink, request_id, name), 30, f"the {name} email")
    assert len(found) == 1, [m["Subject"] for m in found]
    return found[0]


async def status_of(handle) -> RequestStatus:
    return await handle.query(QUERY_STATUS, result_type=RequestStatus)


async def test_approvers_are_told_reminded_and_escalated_to_and_two_must_approve(
    settings, core_api, kube, litellm, mail, webhook
):
    told = settings.model_copy(
        update={
            "temporal_task_queue": f"ts-{uuid.uuid4()}",
            "approval_acknowledge": True,
            "approval_deadline": timedelta(days=7),
            "approval_remind_after": timedelta(days=1),
            "approval_escalate_after": timedelta(days=3),
            "approval_rules": (
                *RULES,
                ApprovalRule(
                    name="notified",
                    email_domains=("notified.example.com",),
                    decision="manual",
                    approvals=2,
                    approvers=(LEAD, "llm-key-approvers"),
                    notify=(TEAM,),
                    escalate_to=(HEAD,),
                    webhook=webhook.url,
                ),
            ),
        }
    )
    async with time_skipping(told, core_api) as env:
        email = unique_email("notified.example.com")
        request_id = request_id_for(email, "gpt-4o", f"notify-{uuid.uuid4()}")
        handle = await env.client.start_workflow(
            KeyRequestWorkflow.run,
            KeyRequest(request_id, email, "gpt-4o", "2026-01-01T00:00:00Z", JUSTIFICATION),
            id=workflow_id(request_id),
            task_queue=told.temporal_task_queue,
        )

        # The requester is told who decides; the approvers who asked, for what, why, by when.
        ack = await one(mail, request_id, "acknowledgement")
        assert ack["To"] == email
        text = plain(ack)
        assert LEAD in text and "group llm-key-approvers" in text and "2 of them" in text
        waiting = await one(mail, request_id, "waiting")
        assert set(waiting["To"].split(", ")) == {LEAD, TEAM}
        text = plain(waiting)
        deadline = (await status_of(handle)).deadline
        for part in (email, "gpt-4o", JUSTIFICATION, deadline, f"{told.api_public_url}/inbox"):
            assert part in text, part
        assert "nobody yet (0 of 2)" in text
        [posted] = await wait_until(lambda: webhook.received, 30, "the webhook message")
        assert set(posted) == {"text"} and email in posted["text"] and "gpt-4o" in posted["text"]

        await handle.signal(SIGNAL_APPROVE, Review("alice"))
        status = await wait_until(
            lambda: _with_approvals(handle), 30, "the first approval in the status"
        )
        assert status.state is RequestState.PENDING and status.approvals == ["declared:alice"]

        # A day later: the reminder, saying who approved so far.
        await env.sleep(timedelta(days=1, minutes=1))
        reminder = await one(mail, request_id, "reminder")
        assert set(reminder["To"].split(", ")) == {LEAD, TEAM}
        assert "declared:alice (1 of 2)" in plain(reminder)
        assert not kind(mail, request_id, "escalation")

        # Three days in: the escalation list is told.
        await env.sleep(timedelta(days=2))
        escalation = await one(mail, request_id, "escalation")
        assert escalation["To"] == HEAD and "declared:alice (1 of 2)" in plain(escalation)
        await wait_until(lambda: len(webhook.received) == 3, 30, "three webhook messages")

        # The same name again counts once; a second approver completes the request.
        await handle.signal(SIGNAL_APPROVE, Review("ALICE"))
        await handle.signal(SIGNAL_APPROVE, Review("bob"))
        [key_mail] = await wait_until(lambda: approved(mail, request_id), 30, "the key")
        assert litellm.has_live_key(KEY.search(plain(key_mail)).group(0))
        annotations = secret_of(kube, request_id)["metadata"]["annotations"]
        assert annotations["llm-key-requestor/approvals"] == "declared:alice,declared:bob"
        status = await wait_until(lambda: _on_key_timers(handle), 30, "the key's timers")
        assert status.approvals == ["declared:alice", "declared:bob"]
        # Nothing more was sent to the people once the request was decided.
        assert len(to(mail, HEAD)) == 1 and len(kind(mail, request_id, "reminder")) == 1
        record_history("v5-reminded-escalated-two-approvers", await handle.fetch_history())


async def test_a_webhook_that_is_down_never_holds_up_the_request(
    settings, core_api, kube, litellm, mail
):
    down = settings.model_copy(
        update={
            "temporal_task_queue": f"ts-{uuid.uuid4()}",
            "approval_rules": (
                *RULES,
                ApprovalRule(
                    name="hook-down",
                    email_domains=("hookdown.example.com",),
                    decision="manual",
                    approvers=(LEAD,),
                    webhook=closed_port_url(),
                ),
            ),
        }
    )
    async with time_skipping(down, core_api) as env:
        email = unique_email("hookdown.example.com")
        request_id = request_id_for(email, "gpt-4o", f"hook-down-{uuid.uuid4()}")
        handle = await env.client.start_workflow(
            KeyRequestWorkflow.run,
            KeyRequest(request_id, email, "gpt-4o", "2026-01-01T00:00:00Z"),
            id=workflow_id(request_id),
            task_queue=down.temporal_task_queue,
        )
        # The email goes out although the webhook refuses every connection.
        assert (await one(mail, request_id, "waiting"))["To"] == LEAD

        async def webhook_failing():
            pending = (await handle.describe()).raw_description.pending_activities
            if any(a.activity_type.name != "post_to_webhook" for a in pending):
                # The emails are still finishing: a decision now would ask to cancel an activity
                # that completes meanwhile, which the time-skipping server cannot take.
                return []
            return [
                a for a in pending
                if a.activity_type.name == "post_to_webhook" and a.last_failure.message
            ]  # fmt: skip

        [retrying] = await wait_until(webhook_failing, 30, "the webhook to fail and be retried")
        assert "127.0.0.1" in retrying.last_failure.message
        assert "/hook" not in retrying.last_failure.message  # the URL's token stays out of it
        await handle.signal(SIGNAL_APPROVE, Review("alice"))
        [key_mail] = await wait_until(lambda: approved(mail, request_id), 30, "the key")
        assert KEY.search(plain(key_mail))
        status = await wait_until(lambda: _on_key_timers(handle), 30, "the key's timers")
        assert status.state is RequestState.APPROVED


async def test_a_mail_server_that_is_down_never_holds_up_the_decision(
    settings, core_api, kube, litellm
):
    sink = MailSink()  # not started: the mail server refuses every connection
    down = settings.model_copy(
        update={
            "temporal_task_queue": f"ts-{uuid.uuid4()}",
            "smtp_host": sink.host,
            "smtp_port": sink.port,
            "approval_acknowledge": True,
            "approval_rules": (
                *RULES,
                ApprovalRule(
                    name="mail-down",
                    email_domains=("maildown.example.com",),
                    decision="manual",
                    approvers=(LEAD,),
                ),
            ),
        }
    )
    async with time_skipping(down, core_api) as env:
        try:
            email = unique_email("maildown.example.com")
            request_id = request_id_for(email, "gpt-4o", f"mail-down-{uuid.uuid4()}")
            handle = await env.client.start_workflow(
                KeyRequestWorkflow.run,
                KeyRequest(request_id, email, "gpt-4o", "2026-01-01T00:00:00Z"),
                id=workflow_id(request_id),
                task_queue=down.temporal_task_queue,
            )

            async def mail_failing():
                pending = (await handle.describe()).raw_description.pending_activities
                return [a for a in pending if a.activity_type.name == "email_approvers"
                        and a.last_failure.message]  # fmt: skip

            await wait_until(mail_failing, 30, "the approvers' email to fail and be retried")
            # The decision is taken and the key minted while the notifications still fail.
            await handle.signal(SIGNAL_APPROVE, Review("alice"))

            async def minted():
                status = await status_of(handle)
                return status if status.state is RequestState.APPROVED else None

            assert (await wait_until(minted, 30, "the key to be minted")).key_expires
            sink.start()  # the mail server is back: the key is delivered, once
            [key_mail] = await wait_until(lambda: approved(sink, request_id), 60, "the key")
            assert KEY.search(plain(key_mail))
            # Decided: the notifications still under way were called off, not sent late.
            assert not [m for m in sink.messages if ".approval-" in m["Message-ID"]]
        finally:
            sink.stop()


async def _with_approvals(handle) -> RequestStatus | None:
    status = await status_of(handle)
    return status if status.approvals else None


async def _on_key_timers(handle) -> RequestStatus | None:
    status = await status_of(handle)
    return status if status.next_reminder else None


def test_notification_settings_are_checked_at_start_naming_the_field():
    from settings import ConfigError, load_settings

    with pytest.raises(ConfigError) as bad:
        load_settings(
            approval_webhook="ftp://hooks.example.com",
            approval_escalate_to=("not-an-address",),
            approval_remind_after="0s",
            approval_rules=({"name": "r", "models": ["gpt-4o"], "decision": "manual",
                             "approvals": 0, "notify": ["nobody"]},),
        )  # fmt: skip
    message = str(bad.value)
    for expected in (
        "approval.webhook (env APPROVAL_WEBHOOK): 'ftp://hooks.example.com' is not an http(s) URL",
        "approval.escalate_to (env APPROVAL_ESCALATE_TO): 'not-an-address' is not an email",
        "approval.remind_after (env APPROVAL_REMIND_AFTER): must be longer than 0s",
        "approval.rules[0].approvals",
    ):
        assert expected in message, message
