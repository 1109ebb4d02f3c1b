"""A mail server's final refusal (5xx) ends the retries: recorded, and no key left undelivered."""

from __future__ import annotations

from conftest import secret_of, settled, unique_email, wait_until
from domain import secret_name, workflow_id
from test_key_request_flow import submit
from test_replay import record_history


async def test_a_refused_recipient_fails_the_request_and_deletes_the_key_it_could_not_get(
    api, mail, litellm, kube, temporal_client, admin_headers
):
    email = unique_email("approve.example.com")
    refused = []

    def refuse(message, envelope):
        if message["To"] == email:
            refused.append(message["Subject"])
            return "550 5.1.1 <mailbox unavailable>"
        return None

    mail.on_data(refuse)
    try:
        request_id = (await submit(api, email))["request_id"]
        status = await settled(temporal_client, request_id)
    finally:
        mail.on_data(None)
    assert status.state == "failed"
    assert "550" in status.notification_failed and "could not be emailed" in status.reason
    # Two refusals (the key, then the failure notice), each tried once: no retry of a 5xx.
    await wait_until(lambda: len(refused) >= 2, 10, "both emails to be refused")
    assert len(refused) == 2, refused
    minted = [k for k in litellm.keys() if k["key_alias"].startswith(secret_name(request_id))]
    assert len(minted) == 1 and minted[0]["status"] == "deleted", "no live key nobody has"
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "failed"
    assert "550" in secret["metadata"]["annotations"]["llm-key-requestor/notification-failed"]
    assert not secret.get("data")
    # The mail server's answer may echo the address: for operators, not the public status.
    shown = (await api.get(f"/api/admin/requests/{request_id}", headers=admin_headers)).json()
    assert "550" in shown["notification_failed"]
    public = (await api.get(f"/api/requests/{request_id}")).json()
    assert public["state"] == "failed" and public["notification_failed"] == ""
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    record_history("v5-mail-rejected", await handle.fetch_history())
