"""The requester's justification: kept on the Secret, shown to approvers, never lost."""

from __future__ import annotations

from temporalio.client import WorkflowExecutionStatus

from conftest import ADMIN_TOKEN, secret_of, unique_email, wait_until
from domain import JUSTIFICATION_MAX, workflow_id
from test_reconcile import reconcile

WHY = "Summarising <b>support tickets</b> & triage"


async def test_a_resumed_request_keeps_its_justification(api, temporal_client, settings, kube):
    email = unique_email("manual.example.com")
    body = {"email": email, "llm": "gpt-4o", "justification": WHY}
    request_id = (await api.post("/api/request-key", json=body)).json()["request_id"]
    await wait_until(lambda: secret_of_or_none(kube, request_id), what="the Secret")
    annotations = secret_of(kube, request_id)["metadata"]["annotations"]
    assert annotations["llm-key-requestor/justification"] == WHY

    # The workflow is lost; the reconciler starts it again from the Secret.
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    await handle.terminate("lost")
    await reconcile(temporal_client, settings)
    assert (await handle.describe()).status == WorkflowExecutionStatus.RUNNING

    async def shown() -> bool:
        response = await api.get(
            f"/api/admin/requests/{request_id}",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        status = response.json()
        return status["state"] == "pending" and status["justification"] == WHY

    await wait_until(shown, what="the resumed request with its justification")


async def test_a_justification_over_the_limit_is_refused(api):
    body = {
        "email": unique_email("manual.example.com"),
        "llm": "gpt-4o",
        "justification": "x" * (JUSTIFICATION_MAX + 1),
    }
    response = await api.post("/api/request-key", json=body)
    assert response.status_code == 422
    assert response.json()["message"].startswith("justification:")


def secret_of_or_none(kube, request_id: str):
    try:
        return secret_of(kube, request_id)
    except StopIteration:
        return None
