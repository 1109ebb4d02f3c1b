"""A 30-day key's whole life on the time-skipping server: reminders, renewal in place, a second
expiry and clean-up, in seconds. Real SMTP, the Kubernetes and LiteLLM stand-ins, the real worker.

The time-skipping server has no custom search attributes and no Schedules, so this file starts
the workflow directly; tests/test_lifecycle.py covers the same paths through the API on the dev
server. The LiteLLM stand-in keeps wall-clock time: a renewal's new expiry is 30 days after the
real now, which the skipped clock has already run three weeks past, so the second cycle is about
a week long here.
"""

from __future__ import annotations

import asyncio
import base64
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from temporalio.client import WorkflowHandle
from temporalio.service import RPCError

from activities.email import readable_time
from conftest import NAMESPACE, time_skipping, unique_email, wait_until
from domain import (
    QUERY_STATUS,
    UPDATE_RESUBMIT,
    KeyRequest,
    RequestState,
    RequestStatus,
    Resubmission,
    ResubmitAnswer,
    request_id_for,
    secret_name,
    workflow_id,
)
from test_key_request_flow import KEY, plain
from test_replay import record_history
from workflows.key_request import KeyRequestWorkflow

MODEL = "gpt-4o"


def mails(sink, email: str) -> list:
    return [m for m in sink.messages if m["To"] == email]


async def mail_count(sink, email: str, count: int, what: str) -> list:
    def arrived():
        found = mails(sink, email)
        return found if len(found) >= count else None

    found = await wait_until(arrived, 60, what)
    assert len(found) == count, [m["Subject"] for m in found]
    return found


async def state_of(handle: WorkflowHandle) -> RequestStatus:
    return await handle.query(QUERY_STATUS, result_type=RequestStatus)


async def runs_of(client, handle: WorkflowHandle) -> list:
    """The history of each run of the workflow, first to last, following continue-as-new."""
    histories, run_id = [], handle.first_execution_run_id
    while run_id:
        history = await client.get_workflow_handle(handle.id, run_id=run_id).fetch_history()
        histories.append(history)
        last = history.events[-1]
        attributes = last.workflow_execution_continued_as_new_event_attributes
        run_id = attributes.new_execution_run_id if last.HasField(
            "workflow_execution_continued_as_new_event_attributes") else ""  # fmt: skip
    return histories


@pytest.fixture
def litellm_clock(litellm):
    """The LiteLLM stand-in, its clock put back after a test that moved it."""
    yield litellm
    litellm.clock_offset = timedelta(0)


async def next_run(client, handle: WorkflowHandle) -> WorkflowHandle:
    """The run that followed the first one (continue-as-new), as visibility tells it."""

    async def started():
        described = await client.get_workflow_handle(handle.id).describe()
        return described.run_id if described.run_id != handle.first_execution_run_id else None

    return client.get_workflow_handle(handle.id, run_id=await wait_until(started, 60, "a new run"))


async def status_when(handle: WorkflowHandle, condition, what: str) -> RequestStatus:
    async def check():
        try:
            status = await state_of(handle)
        except RPCError:  # the run is just continuing as new, or the worker is busy: ask again
            return None
        return status if condition(status) else None

    return await wait_until(check, 60, what)


async def key_on_its_timers(env, settings, mail, tag: str):
    """A policy-approved request started on the time-skipping server, once its key is emailed
    and its timers are set: (handle, request id, email, the key's email, status)."""
    email = unique_email("approve.example.com")
    request_id = request_id_for(email, MODEL, tag)
    handle = await env.client.start_workflow(
        KeyRequestWorkflow.run,
        KeyRequest(request_id, email, MODEL, "2026-01-01T00:00:00Z"),
        id=workflow_id(request_id),
        task_queue=settings.temporal_task_queue,
    )
    [approved] = await mail_count(mail, email, 1, "the key")
    status = await status_when(handle, lambda s: s.next_reminder, "the reminder timer")
    return handle, request_id, email, approved, status


async def test_a_30_day_key_is_reminded_renewed_in_place_expires_and_is_cleaned_up(
    settings, core_api, kube, litellm, mail
):
    month = settings.model_copy(
        update={
            "litellm_key_duration": timedelta(days=30),
            "lifecycle_remind_before": (timedelta(days=7), timedelta(days=1)),
            "lifecycle_retention": timedelta(days=30),
            "temporal_task_queue": f"ts-{uuid.uuid4()}",
        }
    )
    async with time_skipping(month, core_api) as env:
        handle, request_id, email, approved, first = await key_on_its_timers(
            env, month, mail, "time-skipping-life"
        )
        key = KEY.search(plain(approved)).group(0)
        assert first.state == RequestState.APPROVED and first.cycle == 1 and first.key_expires

        # Outside the renewal window a submission changes nothing and sends nothing.
        early = await handle.execute_update(
            UPDATE_RESUBMIT, Resubmission("2026-01-02T00:00:00Z"), result_type=ResubmitAnswer
        )
        assert early.outcome == "current" and early.status.key_expires == first.key_expires

        # 23 days on: the 7-day reminder, which says how to renew.
        await env.sleep(timedelta(days=23, hours=1))
        reminder = (await mail_count(mail, email, 2, "the 7-day reminder"))[1]
        assert "expires" in reminder["Subject"] and "POST /api/request-key" in plain(reminder)
        assert not KEY.search(plain(reminder))

        # The holder asks again: renewed in place, same key, a new expiry, no key in the mail.
        answer = await handle.execute_update(
            UPDATE_RESUBMIT, Resubmission("2026-01-24T01:00:00Z"), result_type=ResubmitAnswer
        )
        assert answer.outcome == "renewing"
        renewed = (await mail_count(mail, email, 3, "the renewal"))[2]
        assert "renewed" in renewed["Subject"] and not KEY.search(plain(renewed))

        # Queried only once the run has continued as new: a query racing that step can leave
        # the time-skipping server's clock locked, and the next sleep then never ends.
        second_run = await next_run(env.client, handle)
        status = await status_when(second_run, lambda s: s.cycle == 2, "the second cycle")
        assert status.key_expires != first.key_expires
        assert readable_time(status.key_expires) in plain(renewed)
        assert litellm.has_live_key(key)
        assert renewed["Message-ID"] != approved["Message-ID"]

        # The renewed key runs out: one more reminder (the 1-day one), then expiry.
        await env.sleep(timedelta(days=8))
        *_, last_reminder, expired = await mail_count(mail, email, 5, "reminder and expiry")
        assert "expires" in last_reminder["Subject"]
        assert "expired" in expired["Subject"]
        assert not litellm.has_live_key(key)
        secret = await asyncio.to_thread(
            core_api.read_namespaced_secret, secret_name(request_id), NAMESPACE
        )
        assert secret.metadata.labels["request-state"] == "key-expired"
        assert not secret.data, "the plaintext leaves the Secret when the key ends"

        # 30 days later the finished request's Secret is deleted, and the workflow ends.
        final = await asyncio.wait_for(handle.result(), 60)
        assert final.state == RequestState.KEY_EXPIRED
        names = [s["metadata"]["name"] for s in kube.secrets(NAMESPACE)]
        assert secret_name(request_id) not in names
        assert len({m["Message-ID"] for m in mails(mail, email)}) == 5
        # Two runs: the first ended in the renewal (continue-as-new), the second in expiry.
        runs = await runs_of(env.client, handle)
        assert len(runs) == 2
        record_history("v5-renewed-in-place", runs[0])
        record_history("v5-key-expired", runs[1])


async def test_an_undecided_renewal_outlives_the_key_and_goes_on_as_a_new_cycle(
    settings, core_api, kube, litellm_clock, mail
):
    """A renewal needing a person, still undecided when the key expires: the key ends on time,
    and the renewal waits on as the next cycle, which mints a new key once approved."""
    rules = tuple(
        r.model_copy(update={"renewals": "manual"}) if r.name == "auto-approve" else r
        for r in settings.approval_rules
    )
    month = settings.model_copy(
        update={
            "approval_rules": rules,
            "approval_deadline": timedelta(days=7),
            # Only the key's timers: an approver reminder or escalation timer while cycle 2
            # waits would let the skipped clock run further past the stand-in's wall-clock
            # expiry of the new key (tests/test_notifications.py covers those timers).
            "approval_remind_after": None,
            "approval_escalate_after": None,
            "litellm_key_duration": timedelta(days=30),
            "lifecycle_remind_before": (timedelta(days=2),),
            "temporal_task_queue": f"ts-{uuid.uuid4()}",
        }
    )
    async with time_skipping(month, core_api) as env:
        handle, request_id, email, approved, _ = await key_on_its_timers(
            env, month, mail, "time-skipping-renewal"
        )
        old_key = KEY.search(plain(approved)).group(0)
        await env.sleep(timedelta(days=28, hours=12))
        await mail_count(mail, email, 2, "the reminder")
        answer = await handle.execute_update(
            UPDATE_RESUBMIT, Resubmission("2026-01-29T12:00:00Z"), result_type=ResubmitAnswer
        )
        assert answer.outcome == "renewing"
        await env.sleep(timedelta(days=2))
        expired = (await mail_count(mail, email, 3, "the expiry"))[2]
        assert "expired" in expired["Subject"]
        assert not litellm_clock.has_live_key(old_key)

        await status_when(
            await next_run(env.client, handle),
            lambda s: s.state == RequestState.PENDING and s.deadline,
            "cycle 2 to wait",
        )
        # The new key's expiry must lie ahead on the workflow's clock, which is days past the
        # wall clock by now.
        litellm_clock.clock_offset = await env.get_current_time() - datetime.now(UTC)
        await handle.signal("approve", {"reviewer": "carol", "reason": "still needed"})
        new = (await mail_count(mail, email, 4, "the new key"))[3]
        new_key = KEY.search(plain(new)).group(0)
        assert new_key != old_key and litellm_clock.has_live_key(new_key)
        secret = await asyncio.to_thread(
            core_api.read_namespaced_secret, secret_name(request_id), NAMESPACE
        )
        assert base64.b64decode(secret.data["api-key"]).decode() == new_key
        assert secret.metadata.annotations["llm-key-requestor/cycle"] == "2"
        assert new["Message-ID"] != approved["Message-ID"]
        runs = await runs_of(env.client, handle)
        assert len(runs) == 2, "the renewal went on as a run of its own"
        record_history("v5-renewal-outlived-key", runs[0])


async def test_a_revocation_while_a_renewal_waits_for_a_person_wins_at_once(
    settings, core_api, litellm, mail
):
    rules = tuple(
        r.model_copy(update={"renewals": "manual"}) if r.name == "auto-approve" else r
        for r in settings.approval_rules
    )
    month = settings.model_copy(
        update={
            "approval_rules": rules,
            "approval_deadline": timedelta(days=7),
            "litellm_key_duration": timedelta(days=30),
            "lifecycle_remind_before": (timedelta(days=7),),
            "temporal_task_queue": f"ts-{uuid.uuid4()}",
        }
    )
    async with time_skipping(month, core_api) as env:
        handle, request_id, email, approved, _ = await key_on_its_timers(
            env, month, mail, "time-skipping-revoke"
        )
        key = KEY.search(plain(approved)).group(0)
        await env.sleep(timedelta(days=24))
        await mail_count(mail, email, 2, "the reminder")
        answer = await handle.execute_update(
            UPDATE_RESUBMIT, Resubmission("2026-01-25T00:00:00Z"), result_type=ResubmitAnswer
        )
        assert answer.outcome == "renewing"
        await status_when(handle, lambda s: s.deadline, "the renewal to wait for a person")
        await handle.signal("revoke", {"reviewer": "sec-team", "reason": "Leaked"})
        revoked = (await mail_count(mail, email, 3, "the revocation"))[2]
        assert "revoked" in revoked["Subject"] and "Leaked" in plain(revoked)
        assert not litellm.has_live_key(key)
        status = await status_when(handle, lambda s: s.state == "revoked", "the revoked state")
        assert status.revoked_by == "sec-team" and not status.deadline
