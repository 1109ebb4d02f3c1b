"""A request end to end: REST submission, the real Temporal workflow, Secret, LiteLLM, email."""

from __future__ import annotations

import asyncio
import base64
import re

from conftest import history_bytes, mail_to, secret_of, settled, unique_email, wait_until
from domain import workflow_id

KEY = re.compile(r"sk-[A-Za-z0-9_-]{20,}")


def plain(message) -> str:
    return message.get_body(("plain",)).get_content()


def html_part(message) -> str:
    return message.get_body(("html",)).get_content()


async def submit(api, email: str, model: str = "gpt-4o") -> dict:
    response = await api.post("/api/request-key", json={"email": email, "llm": model})
    assert response.status_code == 200, response.text
    return response.json()


async def test_auto_approved_request_emails_a_key_bound_to_the_model(
    api, mail, litellm, kube, temporal_client
):
    email = unique_email("approve.example.com")
    body = await submit(api, email, "gpt-4o-mini")
    # The API waits a moment for the policy: by then the key may already be minted.
    assert body["status"] in ("pending", "approved")
    request_id = body["request_id"]

    [message] = await mail_to(mail, email)
    text = plain(message)
    key = KEY.search(text).group(0)
    assert "gpt-4o-mini" in text and "expires" in text
    # Written for a person: a readable date, the budget, an example that works as pasted.
    assert re.search(r"expires on \d{1,2} [A-Z][a-z]{2} 20\d\d, \d\d:\d\d UTC", text)
    assert not re.search(r"\d{4}-\d\d-\d\dT", text), "no ISO timestamps in the mail"
    assert "Budget: USD 50.00, reset every 30 days." in text
    assert f"export LITELLM_KEY='{key}'" in text
    assert key in html_part(message)
    assert message["Message-ID"] == f"<{request_id}.approved@llm-key-requestor>"

    # The key the requester got is live in LiteLLM, and only for the requested model.
    record = next(
        k for k in litellm.keys() if k["key_alias"].startswith(f"llm-key-request-{request_id}")
    )
    assert record["models"] == ["gpt-4o-mini"]
    assert litellm.has_live_key(key)
    assert litellm.live_keys_for_alias(record["key_alias"]) == 1

    # The Secret is what kubectl users see.
    secret = secret_of(kube, request_id)
    labels, annotations = secret["metadata"]["labels"], secret["metadata"]["annotations"]
    assert labels["app.kubernetes.io/component"] == "llm-key-request"
    assert labels["request-state"] == "approved"
    assert annotations["state"] == "approved"
    assert annotations["llm-key-requestor/email"] == email
    assert annotations["llm-key-requestor/model"] == "gpt-4o-mini"
    assert annotations["llm-key-requestor/workflow-id"] == workflow_id(request_id)
    assert annotations["llm-key-requestor/reviewer"] == "policy:auto-approve"
    assert base64.b64decode(secret["data"]["api-key"]).decode() == key

    # The API reports the outcome, never the key; the workflow history never held it.
    status = await api.get(f"/api/requests/{request_id}")
    assert status.json()["state"] == "approved"
    assert key not in status.text
    await settled(temporal_client, request_id)
    assert key.encode() not in await history_bytes(temporal_client, workflow_id(request_id))
    assert email.encode() not in workflow_id(request_id).encode()


async def test_auto_denied_request_emails_the_reason_and_stores_no_key(api, mail, kube):
    email = unique_email("deny.example.com")
    request_id = (await submit(api, email))["request_id"]

    [message] = await mail_to(mail, email)
    assert "Requests from deny.example.com are not allowed." in plain(message)
    assert "What next" in plain(message) and "again after 1 day" in plain(message)
    assert not KEY.search(plain(message))
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "denied"
    assert secret["metadata"]["annotations"]["state"] == "denied"
    assert not secret.get("data")
    status = (await api.get(f"/api/requests/{request_id}")).json()
    assert status["state"] == "denied"
    assert status["reason"] == "Requests from deny.example.com are not allowed."


async def test_repeat_submission_returns_the_pending_request(api, temporal_client):
    email = unique_email("manual.example.com")
    first = await submit(api, email)
    second = await submit(api, email)
    assert second["request_id"] == first["request_id"]
    assert second["status"] == "pending"
    assert "already pending" in second["message"]
    # A different model is a different request.
    other = await submit(api, email, "claude-sonnet-4")
    assert other["request_id"] != first["request_id"]


async def test_simultaneous_submissions_start_one_workflow(api, temporal_client):
    email = unique_email("manual.example.com")
    bodies = await asyncio.gather(*(submit(api, email) for _ in range(8)))
    assert len({b["request_id"] for b in bodies}) == 1
    wf_id = bodies[0]["workflow_id"]

    async def runs():
        return [e async for e in temporal_client.list_workflows(f"WorkflowId = '{wf_id}'")]

    found = await wait_until(runs, what="the workflow in visibility")
    assert len(found) == 1


async def test_request_id_reveals_no_email(api):
    email = unique_email("manual.example.com")
    body = await submit(api, email)
    local_part = email.split("@")[0]
    assert local_part not in body["request_id"] and local_part not in body["workflow_id"]
    assert "example" not in body["workflow_id"]


async def test_litellm_outage_then_recovery_mints_exactly_one_key(api, mail, litellm, kube):
    litellm.fail_next(2, status=500)
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email))["request_id"]

    [message] = await mail_to(mail, email)
    key = KEY.search(plain(message)).group(0)
    alias = secret_of(kube, request_id)["metadata"]["annotations"]["llm-key-requestor/key-alias"]
    assert litellm.has_live_key(key)
    assert litellm.live_keys_for_alias(alias) == 1
    assert sum(1 for k in litellm.keys() if k["key_alias"] == alias) == 1


async def test_litellm_answer_lost_after_minting_still_one_key(api, mail, litellm, kube, settings):
    # The proxy mints the key but answers after our client gave up; the retry must recognise it.
    litellm.delay_next(1, settings.litellm_timeout.total_seconds() + 1)
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email))["request_id"]

    [message] = await mail_to(mail, email, within=60)
    key = KEY.search(plain(message)).group(0)
    alias = secret_of(kube, request_id)["metadata"]["annotations"]["llm-key-requestor/key-alias"]
    assert litellm.has_live_key(key)
    assert sum(1 for k in litellm.keys() if k["key_alias"] == alias) == 1


async def test_litellm_permanent_refusal_ends_failed_with_the_cause(
    api, mail, litellm, kube, temporal_client, admin_headers
):
    litellm.reject_next(1, status=400, message="max_budget must be positive", param="max_budget")
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email))["request_id"]

    [message] = await mail_to(mail, email)
    assert "could not be issued" in plain(message)
    # LiteLLM's own error text is for operators (Secret, status), not mailed to the requester.
    assert "max_budget" not in plain(message) and "quote your request id" in plain(message)
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "failed"
    assert (
        "max_budget must be positive"
        in secret["metadata"]["annotations"]["llm-key-requestor/reason"]
    )
    assert not secret.get("data"), "a key that never went live must not linger in the Secret"
    assert (await settled(temporal_client, request_id)).state == "failed"
    status = (await api.get(f"/api/admin/requests/{request_id}", headers=admin_headers)).json()
    assert status["state"] == "failed" and "max_budget" in status["reason"]
    # LiteLLM's words are internals: the public status says what happened, not why.
    public = (await api.get(f"/api/requests/{request_id}")).json()
    assert public["state"] == "failed" and public["reason"] == ""


async def test_mail_server_down_then_up_the_key_still_arrives(api, mail, kube):
    mail.stop()
    try:
        email = unique_email("approve.example.com")
        request_id = (await submit(api, email))["request_id"]

        def approved():
            secret = next(
                (s for s in kube.secrets() if s["metadata"]["name"].endswith(request_id)), None
            )
            return secret and secret["metadata"]["labels"]["request-state"] == "approved"

        await wait_until(approved, what="the key to be minted while SMTP is down")
        assert not [m for m in mail.messages if m["To"] == email]
    finally:
        mail.start()
    [message] = await mail_to(mail, email, within=60)
    assert KEY.search(plain(message))
