"""People deciding requests: admin API, the real temporal CLI, signals, and who may do it."""

from __future__ import annotations

import asyncio
import json
import subprocess

import httpx
import pytest
from pydantic import SecretStr

from api.main import create_app
from conftest import mail_to, secret_of, settled, unique_email, wait_until
from devstack.http import serve_in_thread
from devstack.temporal import binary
from domain import KeyRequest, Review, request_id_for, workflow_id
from test_key_request_flow import KEY, plain, submit
from workflows.key_request import KeyRequestWorkflow


async def pending_request(api) -> tuple[str, str]:
    email = unique_email("manual.example.com")
    body = await submit(api, email)
    assert body["status"] == "pending"
    return email, body["request_id"]


async def test_admin_api_approval_mails_the_key_and_records_the_reviewer(
    api, admin_headers, mail, kube, litellm
):
    email, request_id = await pending_request(api)
    response = await api.post(
        f"/api/admin/requests/{request_id}/approve",
        json={"reviewer": "alice", "reason": "Team budget approved"},
        headers=admin_headers,
    )
    assert response.status_code == 200, response.text
    # The body's name is never recorded: ADMIN_TOKEN decides under its configured name.
    assert response.json()["reviewer"] == "admin-token"

    [message] = await mail_to(mail, email)
    text = plain(message)
    assert "approved by admin-token" in text and "Team budget approved" in text
    assert "alice" not in text
    assert litellm.has_live_key(KEY.search(text).group(0))
    annotations = secret_of(kube, request_id)["metadata"]["annotations"]
    assert annotations["llm-key-requestor/reviewer"] == "admin-token"
    assert annotations["llm-key-requestor/decision-source"] == "api"

    # A second decision is refused and changes nothing.
    again = await api.post(
        f"/api/admin/requests/{request_id}/deny", json={"reason": "late"}, headers=admin_headers
    )
    assert again.status_code == 409
    assert "already approved" in again.json()["message"]
    assert len([m for m in mail.messages if m["To"] == email]) == 1


async def test_admin_api_denial_mails_the_reason(api, admin_headers, mail, kube):
    email, request_id = await pending_request(api)
    response = await api.post(
        f"/api/admin/requests/{request_id}/deny",
        json={"reviewer": "bob", "reason": "Use the shared team key <b>instead</b>"},
        headers=admin_headers,
    )
    assert response.status_code == 200, response.text

    [message] = await mail_to(mail, email)
    assert "Use the shared team key <b>instead</b>" in plain(message)
    html = message.get_body(("html",)).get_content()
    assert "&lt;b&gt;instead&lt;/b&gt;" in html and "<b>instead" not in html
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "denied"
    assert secret["metadata"]["annotations"]["llm-key-requestor/reviewer"] == "admin-token"
    shown = (await api.get(f"/api/admin/requests/{request_id}", headers=admin_headers)).json()
    assert shown["state"] == "denied" and shown["reviewer"] == "admin-token"
    assert shown["requester"] == email


async def test_deny_requires_a_reason(api, admin_headers):
    _, request_id = await pending_request(api)
    response = await api.post(
        f"/api/admin/requests/{request_id}/deny", json={}, headers=admin_headers
    )
    assert response.status_code == 422
    assert response.json()["message"].startswith("reason:")


async def test_approval_with_the_temporal_cli_as_the_readme_shows(api, mail, kube, temporal_server):
    email, request_id = await pending_request(api)
    command = [
        binary("temporal"), "workflow", "signal",
        "--address", temporal_server.address,
        "--workflow-id", workflow_id(request_id),
        "--name", "approve",
        "--input", '{"reviewer":"alice"}',
    ]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    # A signal carries no authentication: the name is recorded as declared, through Temporal.
    [message] = await mail_to(mail, email)
    assert "approved by declared:alice" in plain(message)
    annotations = secret_of(kube, request_id)["metadata"]["annotations"]
    assert annotations["llm-key-requestor/reviewer"] == "declared:alice"
    assert annotations["llm-key-requestor/decision-source"] == "signal"

    query = [
        binary("temporal"), "workflow", "query", "--address", temporal_server.address,
        "--workflow-id", workflow_id(request_id), "--name", "status", "--output", "json",
    ]  # fmt: skip
    shown = await asyncio.to_thread(subprocess.run, query, capture_output=True, text=True)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)["queryResult"][0]
    assert status["state"] == "approved" and status["reviewer"] == "declared:alice"


async def test_signal_without_input_and_second_signal_ignored(api, mail, kube, temporal_client):
    email, request_id = await pending_request(api)
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    await handle.signal("deny", Review(reviewer="bob", reason="No budget left this quarter"))
    await handle.signal("approve")  # too late: ignored, and logged by the workflow

    [message] = await mail_to(mail, email)
    assert "No budget left this quarter" in plain(message)
    await settled(temporal_client, request_id)
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "denied"
    assert not secret.get("data")


async def test_pending_requests_are_listed_by_search_attribute(api, admin_headers, temporal_server):
    ids = {(await pending_request(api))[1] for _ in range(3)}

    async def listed():
        seen, token = set(), None
        while True:
            params = {"state": "pending", "page_size": 2}
            if token:
                params["page_token"] = token
            response = await api.get("/api/admin/requests", params=params, headers=admin_headers)
            page = response.json()
            assert all(r["state"] == "pending" for r in page["requests"])
            seen |= {r["request_id"] for r in page["requests"]}
            token = page["next_page_token"]
            if not token:
                return ids <= seen

    await wait_until(listed, what="pending requests in visibility")

    # The same query an operator types.
    command = [binary("temporal"), "workflow", "list", "--address", temporal_server.address,
               "--query", 'KeyRequestState="pending"', "--output", "json"]  # fmt: skip
    done = await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed_ids = {row["execution"]["workflowId"] for row in json.loads(done.stdout)}
    assert {workflow_id(i) for i in ids} <= listed_ids


async def test_admin_api_refuses_without_the_right_token(api, settings):
    _, request_id = await pending_request(api)
    path = f"/api/admin/requests/{request_id}/approve"
    missing = await api.post(path)
    assert missing.status_code == 401
    assert "Bearer" in missing.json()["message"]
    wrong = await api.post(path, headers={"Authorization": "Bearer not-the-token"})
    assert wrong.status_code == 403
    listing = await api.get("/api/admin/requests", headers={"Authorization": "Basic abc"})
    assert listing.status_code == 401
    assert (await api.get(f"/api/requests/{request_id}")).json()["state"] == "pending"


async def test_admin_api_is_off_without_a_token(settings):
    served = serve_in_thread(create_app(settings.model_copy(update={"admin_token": SecretStr("")})))
    try:
        async with httpx.AsyncClient(base_url=served.url) as client:
            response = await client.get(
                "/api/admin/requests", headers={"Authorization": "Bearer anything"}
            )
        assert response.status_code == 403
        assert "set ADMIN_TOKEN" in response.json()["message"]
    finally:
        served.stop()


async def test_unknown_request_cannot_be_decided(api, admin_headers):
    response = await api.post(
        "/api/admin/requests/0123456789abcdef0123/approve", headers=admin_headers
    )
    assert response.status_code == 404


@pytest.mark.parametrize(
    ("email", "model", "decision", "rule"),
    [
        ("a@approve.example.com", "gpt-4o", "approve", "auto-approve"),
        ("a@deny.example.com", "gpt-4o", "deny", "auto-deny"),
        ("a@elsewhere.example.org", "gpt-4o", "manual", "default"),
    ],
)
def test_test_policy_rules(settings, email, model, decision, rule):
    assert settings.decide(email, model)[::2] == (decision, rule)


async def test_a_decision_delivered_with_the_start_is_kept(temporal_client, settings, mail, kube):
    """Signal-with-start (how the reconciler relays kubectl decisions to a stopped request)."""
    email = unique_email("manual.example.com")
    request_id = request_id_for(email, "gpt-4o", "signal-with-start")
    await temporal_client.start_workflow(
        KeyRequestWorkflow.run,
        KeyRequest(request_id, email, "gpt-4o", "2026-01-01T00:00:00Z"),
        id=workflow_id(request_id),
        task_queue=settings.temporal_task_queue,
        start_signal="approve",
        start_signal_args=[Review(reviewer="dave")],
    )
    assert (await settled(temporal_client, request_id)).state == "approved"
    [message] = await mail_to(mail, email)
    assert "approved by declared:dave" in plain(message)
