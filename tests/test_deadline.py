"""A request nobody decides expires at the deadline; time-skipping makes 7 days instant."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta

from conftest import mail_to, secret_of, time_skipping, unique_email
from domain import KeyRequest, RequestState, request_id_for, secret_name, workflow_id
from test_key_request_flow import plain
from test_replay import record_history
from workflows.key_request import KeyRequestWorkflow


async def test_undecided_request_expires_after_seven_days_and_the_requester_is_told(
    settings, core_api, kube, mail
):
    week = settings.model_copy(
        update={"approval_deadline": timedelta(days=7), "temporal_task_queue": f"ts-{uuid.uuid4()}"}
    )
    async with time_skipping(week, core_api) as env:
        email = unique_email("manual.example.com")
        request_id = request_id_for(email, "gpt-4o", "time-skipping")
        started = await env.get_current_time()
        handle = await env.client.start_workflow(
            KeyRequestWorkflow.run,
            KeyRequest(request_id, email, "gpt-4o", "2026-01-01T00:00:00Z"),
            id=workflow_id(request_id),
            task_queue=week.temporal_task_queue,
        )
        await env.sleep(timedelta(days=7, minutes=1))
        [message] = await mail_to(mail, email)
        assert "expired" in plain(message)
        secret = secret_of(kube, request_id)
        assert secret["metadata"]["labels"]["request-state"] == "expired"
        assert secret["metadata"]["annotations"]["state"] == "expired"
        assert not secret.get("data")

        # lifecycle.retention (30 days) later, the finished request's Secret is deleted.
        result = await asyncio.wait_for(handle.result(), 60)
        assert result.state == RequestState.EXPIRED
        assert await env.get_current_time() - started >= timedelta(days=7 + 30)
        assert secret_name(request_id) not in [s["metadata"]["name"] for s in kube.secrets()]
        record_history("v5-deadline-expired", await handle.fetch_history())
