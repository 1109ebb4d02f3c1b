"""A request whose Secret is deleted by hand (or lost) is recorded again instead of wedging, and
a key minted for it is never left live in LiteLLM without a holder."""

from __future__ import annotations

import base64

from conftest import NAMESPACE, mail_to, secret_of, settled, unique_email, wait_until
from domain import secret_name, workflow_id
from test_key_request_flow import KEY, plain, submit
from test_replay import record_history


def live_keys(litellm, request_id: str) -> list[dict]:
    return [
        k
        for k in litellm.keys()
        if k["key_alias"].startswith(secret_name(request_id)) and k["status"] == "active"
    ]


async def test_secret_deleted_while_pending_is_recorded_again_when_approved(
    api, mail, litellm, kube, core_api, temporal_client, admin_headers
):
    email = unique_email("manual.example.com")
    request_id = (await submit(api, email))["request_id"]

    async def waiting_for_a_person() -> bool:
        status = (await api.get(f"/api/requests/{request_id}")).json()
        return bool(status["deadline"])

    await wait_until(waiting_for_a_person, 30, "the request to wait for a person")
    core_api.delete_namespaced_secret(secret_name(request_id), NAMESPACE)
    answer = await api.post(
        f"/api/admin/requests/{request_id}/approve",
        json={"reviewer": "alice"},
        headers=admin_headers,
    )
    assert answer.status_code == 200, answer.text

    [message] = await mail_to(mail, email)
    key = KEY.search(plain(message)).group(0)
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "approved"
    assert base64.b64decode(secret["data"]["api-key"]).decode() == key
    assert [k["key"] for k in live_keys(litellm, request_id)] == [key]
    assert (await settled(temporal_client, request_id)).state == "approved"
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    record_history("v5-secret-lost-while-pending", await handle.fetch_history())


async def test_secret_lost_right_after_minting_the_key_is_deleted_and_a_new_one_delivered(
    api, mail, litellm, kube, core_api, temporal_client
):
    email = unique_email("approve.example.com")
    lost = []

    def delete_the_secret(record: dict) -> None:
        # LiteLLM has minted the key; its only copy (the Secret) goes before the worker hears.
        if record["user_id"] == email and not lost:
            lost.append(record["key"])
            core_api.delete_namespaced_secret(record["key_alias"].rsplit("-", 1)[0], NAMESPACE)

    litellm.on_generate(delete_the_secret)
    try:
        request_id = (await submit(api, email))["request_id"]
        [message] = await mail_to(mail, email, within=60)
    finally:
        litellm.on_generate(None)
    key = KEY.search(plain(message)).group(0)
    assert lost and lost[0] != key, "the first key could not be delivered"
    assert [k["key"] for k in live_keys(litellm, request_id)] == [key], "never orphaned"
    assert not litellm.has_live_key(lost[0])
    secret = secret_of(kube, request_id)
    assert base64.b64decode(secret["data"]["api-key"]).decode() == key
    assert (await settled(temporal_client, request_id)).state == "approved"
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    record_history("v5-secret-lost-after-mint", await handle.fetch_history())
