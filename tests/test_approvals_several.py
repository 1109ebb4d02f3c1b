"""A rule that needs two approvers (`approvals: 2`), through the admin API with two signed-on
identities (tokens from the local OIDC issuer), and what the Temporal Web UI shows meanwhile.

The shared worker's policy (tests/conftest.py) sends two.example.com to the two-approver rule.
"""

from __future__ import annotations

from temporalio.api.sdk.v1 import WorkflowMetadata

from conftest import mail_to, secret_of, settled, unique_email, wait_until
from devstack.oidc import APPROVERS_GROUP
from domain import workflow_id
from test_key_request_flow import KEY, plain
from test_replay import record_history

FIRST, SECOND = "first.approver@example.com", "second.approver@example.com"
APPROVALS = "llm-key-requestor/approvals"


def signed_on(issuer, email: str) -> dict:
    return {"Authorization": f"Bearer {issuer.token(email, (APPROVERS_GROUP,))}"}


async def decide(signon_api, issuer, request_id: str, who: str, verdict: str, reason: str = ""):
    response = await signon_api.post(
        f"/api/admin/requests/{request_id}/{verdict}",
        json={"reason": reason} if reason else None,
        headers=signed_on(issuer, who),
    )
    assert response.status_code == 200, response.text
    return response.json()


async def two_approver_request(signon_api) -> tuple[str, str]:
    email = unique_email("two.example.com")
    response = await signon_api.post(
        "/api/request-key",
        json={"email": email, "llm": "gpt-4o", "justification": "Evaluating summaries"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["status"] == "pending"
    return email, response.json()["request_id"]


async def test_two_distinct_approvers_are_needed_and_the_same_one_counts_once(
    signon_api, issuer, mail, kube, litellm, temporal_client
):
    email, request_id = await two_approver_request(signon_api)

    first = await decide(signon_api, issuer, request_id, FIRST, "approve")
    assert first["state"] == "pending" and first["decision"] == ""
    assert first["approvals"] == [FIRST] and first["approvals_needed"] == 2

    # The same person again, spelled in capitals: still one approval, still pending.
    again = await decide(signon_api, issuer, request_id, FIRST.upper(), "approve")
    assert again["state"] == "pending" and again["approvals"] == [FIRST]

    def recorded():
        return secret_of(kube, request_id)["metadata"]["annotations"].get(APPROVALS) == FIRST

    await wait_until(recorded, 30, "the first approval on the Secret")
    shown = await signon_api.get(
        f"/api/admin/requests/{request_id}", headers=signed_on(issuer, SECOND)
    )
    assert shown.json()["approvals"] == [FIRST]
    public = (await signon_api.get(f"/api/requests/{request_id}")).json()
    assert public["approvals"] == [] and public["state"] == "pending"

    # The Temporal Web UI: the static summary and the current details, never the email.
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    description = await handle.describe()
    summary, details = await description.static_summary(), await description.static_details()
    assert "gpt-4o" in summary and email not in summary and email not in details
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    current = metadata.current_details
    assert "gpt-4o" in current and "pending" in current
    assert f"{FIRST} (1 of 2)" in current and "Deadline:" in current
    assert email not in current

    second = await decide(signon_api, issuer, request_id, SECOND, "approve")
    assert second["decision"] == "approved" and second["approvals"] == [FIRST, SECOND]
    [message] = await mail_to(mail, email)
    assert litellm.has_live_key(KEY.search(plain(message)).group(0))
    annotations = secret_of(kube, request_id)["metadata"]["annotations"]
    assert annotations[APPROVALS] == f"{FIRST},{SECOND}"
    assert annotations["llm-key-requestor/reviewer"] == SECOND
    assert email not in annotations[APPROVALS]

    await settled(temporal_client, request_id)
    metadata = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    assert "approved" in metadata.current_details and email not in metadata.current_details
    history = await handle.fetch_history()
    record_history("v5-two-approvers-approved", history)


async def test_one_denial_denies_whoever_gives_it(signon_api, issuer, mail, kube):
    # The second approver denies after the first approved...
    email, request_id = await two_approver_request(signon_api)
    await decide(signon_api, issuer, request_id, FIRST, "approve")
    denied = await decide(signon_api, issuer, request_id, SECOND, "deny", "Not this quarter")
    assert denied["decision"] == "denied"
    [message] = await mail_to(mail, email)
    assert "Not this quarter" in plain(message)
    assert secret_of(kube, request_id)["metadata"]["annotations"][APPROVALS] == FIRST

    # ...or the first one denies at once.
    email, request_id = await two_approver_request(signon_api)
    denied = await decide(signon_api, issuer, request_id, FIRST, "deny", "Use the team key")
    assert denied["decision"] == "denied" and denied["approvals"] == []
    [message] = await mail_to(mail, email)
    assert "Use the team key" in plain(message)
    late = await signon_api.post(
        f"/api/admin/requests/{request_id}/approve", headers=signed_on(issuer, SECOND)
    )
    assert late.status_code == 409
