"""Answers that mean "not now": retried, honouring Retry-After, and logged as one line each."""

from __future__ import annotations

import asyncio
import uuid

from conftest import mail_to, secret_of, unique_email, wait_until
from domain import workflow_id
from test_key_request_flow import KEY, plain, submit


async def test_litellm_busy_answers_are_retried_honouring_retry_after(
    api, mail, litellm, kube, settings
):
    calls = litellm.generate_calls
    litellm.fail_next(1, status=429, message="Rate limit exceeded.", retry_after="3")
    litellm.fail_next(1, status=408, message="Request timed out.")
    litellm.fail_next(1, status=425, message="Too early.")
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email))["request_id"]

    # The 429 has been answered: the next attempt waits the 3 s LiteLLM asked for, where
    # Temporal's own first retry would come after 1 s.
    await wait_until(lambda: litellm.generate_calls > calls, 30, "the 429")
    refused_at = asyncio.get_running_loop().time()
    await wait_until(lambda: litellm.generate_calls > calls + 1, 30, "the retry")
    waited = asyncio.get_running_loop().time() - refused_at
    assert waited >= 2.5, f"the retry came {waited:.1f} s after a Retry-After of 3 s"

    [message] = await mail_to(mail, email, within=60)
    key = KEY.search(plain(message)).group(0)
    assert litellm.has_live_key(key)
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "approved"
    alias = secret["metadata"]["annotations"]["llm-key-requestor/key-alias"]
    assert sum(1 for k in litellm.keys() if k["key_alias"] == alias) == 1


async def test_outages_that_pass_log_one_warning_line_each_without_a_traceback(
    api, mail, litellm, kube, captured_logs
):
    """Kubernetes 500, LiteLLM 500, mail server refusing: each failed attempt is one WARNING
    naming the cause; no traceback, which stays for the unexpected."""
    seen = len(captured_logs.lines)
    marker = uuid.uuid4().hex[:8]
    kube.inject_faults(1, 500, {"POST"})  # recording the request's Secret
    litellm.fail_next(1, status=500, message=f"LiteLLM had a bad moment {marker}.")
    mail.stop()
    try:
        email = unique_email("approve.example.com")
        request_id = (await submit(api, email))["request_id"]

        def refused() -> bool:
            return any(
                "notify_requester attempt" in line and request_id in line
                for line in captured_logs.lines[seen:]
            )

        await wait_until(refused, 60, "a refused mail")
    finally:
        mail.start()
    await mail_to(mail, email, within=60)

    ours = [line for line in captured_logs.lines[seen:] if request_id in line]
    warnings = [line for line in ours if " WARNING " in line or " ERROR " in line]
    assert all("Traceback" not in line for line in warnings), "\n".join(warnings)
    expected = {
        "record_request": "Kubernetes API: creating secret",
        "mint_key": f"LiteLLM /key/generate answered 500: LiteLLM had a bad moment {marker}.",
        "notify_requester": "SMTP",
    }
    for activity_type, cause in expected.items():
        lines = [w for w in warnings if w.split(" WARNING ")[-1].startswith(activity_type)]
        assert lines, f"no WARNING for {activity_type}:\n" + "\n".join(warnings)
        assert cause in lines[0], lines[0]
    assert len([w for w in warnings if "mint_key" in w]) == 1, "one line per failed attempt"


async def test_an_outage_longer_than_the_quick_local_attempts_is_waited_out_in_the_server(
    api, mail, litellm, kube, temporal_client
):
    """Minting runs as a local activity, in the workflow task that started the request, for a
    few quick attempts only: a LiteLLM that stays down longer is retried by the regular activity,
    whose retries wait in the server instead of holding the workflow task open."""
    litellm.fail_next(6, status=503, message="LiteLLM is restarting.")
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email))["request_id"]

    [message] = await mail_to(mail, email, within=60)
    key = KEY.search(plain(message)).group(0)
    assert litellm.has_live_key(key)
    alias = secret_of(kube, request_id)["metadata"]["annotations"]["llm-key-requestor/key-alias"]
    assert sum(1 for k in litellm.keys() if k["key_alias"] == alias) == 1
    history = await temporal_client.get_workflow_handle(workflow_id(request_id)).fetch_history()
    regular = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in history.events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert regular == ["mint_key"], "the quick attempts ran out, and only then"
