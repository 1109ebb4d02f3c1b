"""A key's life on the real Temporal dev server, through the paths people use: the REST API, the
`temporal` CLI's signals, kubectl relabelling relayed by the reconciler.

What is checked is what a person notices: the emails, the keys LiteLLM knows (over the
stand-in's HTTP API), the Secret, the HTTP answers. The session's leak check (conftest) covers
every history, log line and response of these tests too.
"""

from __future__ import annotations

import base64
import subprocess
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from api.main import create_app
from conftest import (
    ADMIN_TOKEN,
    mail_to,
    secret_of,
    settled,
    start_worker,
    stop_worker,
    unique_email,
    wait_until,
)
from devstack.http import serve_in_thread
from devstack.litellm import hash_key
from devstack.temporal import binary
from domain import QUERY_STATUS, RequestStatus, workflow_id
from test_key_request_flow import KEY, plain, submit
from test_reconcile import kubectl, reconcile
from test_replay import record_history

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def key_info(litellm, key: str) -> dict | None:
    """LiteLLM's record of a key, over its HTTP API (None once the key is gone). Asked by its
    hash, as the worker does, so that the key never lands in a logged URL."""
    async with httpx.AsyncClient(base_url=litellm.url) as http:
        answer = await http.get(
            "/key/info",
            params={"key": hash_key(key)},
            headers={"Authorization": f"Bearer {litellm.master_key}"},
        )
    return answer.json()["info"] if answer.status_code == 200 else None


async def approved_key(api, mail, temporal_client) -> tuple[str, str, str]:
    """A fresh auto-approved request whose workflow now follows its key: (email, id, key)."""
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email))["request_id"]
    [message] = await mail_to(mail, email)
    await settled(temporal_client, request_id)
    return email, request_id, KEY.search(plain(message)).group(0)


async def history_of(temporal_client, request_id: str):
    return await temporal_client.get_workflow_handle(workflow_id(request_id)).fetch_history()


def temporal_cli(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(  # noqa: S603 - the CLI the README shows
        [binary("temporal"), *args, "--address", server.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


# --- revocation ---------------------------------------------------------------------------


async def test_revoke_by_api_deletes_the_key_and_tells_the_holder_why_and_twice_is_409(
    api, mail, litellm, kube, temporal_client
):
    email, request_id, key = await approved_key(api, mail, temporal_client)
    assert (await key_info(litellm, key))["status"] == "active"

    # curl -X POST $API/api/admin/requests/$ID/revoke -H "Authorization: Bearer $ADMIN_TOKEN"
    #      -H 'Content-Type: application/json' -d '{"reason": "..."}'
    answer = await api.post(
        f"/api/admin/requests/{request_id}/revoke",
        json={"reason": "The key was pasted into a public repository."},
        headers=ADMIN,
    )
    assert answer.status_code == 200, answer.text
    revoked = (await mail_to(mail, email, 2))[1]
    assert "revoked" in revoked["Subject"]
    assert "The key was pasted into a public repository." in plain(revoked)
    assert not KEY.search(plain(revoked))
    assert await key_info(litellm, key) is None, "the key is deleted in LiteLLM"
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "revoked"
    assert not secret.get("data"), "the plaintext leaves the Secret"

    # Who revoked is for operators: read through the admin API.
    status = (await api.get(f"/api/admin/requests/{request_id}", headers=ADMIN)).json()
    assert status["state"] == "revoked" and status["revoked_by"] == "admin-token"
    assert status["revocation_reason"] == "The key was pasted into a public repository."
    assert status["cleanup_at"]

    again = await api.post(
        f"/api/admin/requests/{request_id}/revoke", json={"reason": "again"}, headers=ADMIN
    )
    assert again.status_code == 409 and "revoked" in again.json()["message"]
    assert len([m for m in mail.messages if m["To"] == email]) == 2
    record_history("v5-revoked-by-api", await history_of(temporal_client, request_id))


async def test_revoke_by_signal_from_the_temporal_cli(
    api, mail, litellm, kube, temporal_client, temporal_server
):
    email, request_id, key = await approved_key(api, mail, temporal_client)
    done = temporal_cli(
        temporal_server, "workflow", "signal", "--workflow-id", workflow_id(request_id),
        "--name", "revoke", "--input", '{"reviewer": "sec-team", "reason": "Leaked in a log"}',
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    revoked = (await mail_to(mail, email, 2))[1]
    assert "Leaked in a log" in plain(revoked) and "sec-team" in plain(revoked)
    assert await key_info(litellm, key) is None
    assert secret_of(kube, request_id)["metadata"]["labels"]["request-state"] == "revoked"


async def test_revoke_by_kubectl_label_is_relayed_by_the_reconciler(
    api, mail, litellm, kube, temporal_client, settings, tmp_path
):
    email, request_id, key = await approved_key(api, mail, temporal_client)
    kubectl(kube, tmp_path, "label", "secret", f"llm-key-request-{request_id}",
            "request-state=revoked", "--overwrite")  # fmt: skip
    counts = await reconcile(temporal_client, settings)
    assert counts.relayed >= 1
    revoked = (await mail_to(mail, email, 2))[1]
    assert "revoked" in revoked["Subject"] and "kubectl" in plain(revoked)
    assert await key_info(litellm, key) is None
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["llm-key-requestor/recorded-state"] == "revoked"
    assert not secret.get("data")
    # The next run finds nothing more to do for it.
    await reconcile(temporal_client, settings)
    assert len([m for m in mail.messages if m["To"] == email]) == 2


async def test_revoking_a_pending_request_is_409(api, admin_headers):
    request_id = (await submit(api, unique_email("manual.example.com")))["request_id"]
    answer = await api.post(
        f"/api/admin/requests/{request_id}/revoke", json={"reason": "x"}, headers=admin_headers
    )
    assert answer.status_code == 409 and "no live key" in answer.json()["message"]


# --- rotation -----------------------------------------------------------------------------


async def test_rotate_with_zero_grace_replaces_the_key_at_once(
    api, mail, litellm, kube, temporal_client
):
    email, request_id, old = await approved_key(api, mail, temporal_client)
    # curl -X POST $API/api/admin/requests/$ID/rotate -H "Authorization: Bearer $ADMIN_TOKEN"
    #      -H 'Content-Type: application/json' -d '{"grace": "0s"}'
    answer = await api.post(
        f"/api/admin/requests/{request_id}/rotate", json={"grace": "0s"}, headers=ADMIN
    )
    assert answer.status_code == 200, answer.text
    rotated = (await mail_to(mail, email, 2))[1]
    new = KEY.search(plain(rotated)).group(0)
    assert new != old and "rotated" in plain(rotated)

    async def old_gone():
        return await key_info(litellm, old) is None

    await wait_until(old_gone, 30, "the old key to be deleted")
    assert (await key_info(litellm, new))["status"] == "active"
    secret = secret_of(kube, request_id)
    assert base64.b64decode(secret["data"]["api-key"]).decode() == new
    assert set(secret["data"]) == {"api-key"}
    status = (await api.get(f"/api/requests/{request_id}")).json()
    assert status["state"] == "approved" and status["rotated_at"]
    # The new key ends when the old one would have (to the minute): rotation is not renewal.
    assert status["key_expires"][:16] == secret["metadata"]["annotations"][
        "llm-key-requestor/key-expires"][:16]  # fmt: skip
    record_history("v5-rotated", await history_of(temporal_client, request_id))


async def test_rotate_by_signal_keeps_the_old_key_for_the_grace_period(
    api, mail, litellm, temporal_client, temporal_server
):
    email, request_id, old = await approved_key(api, mail, temporal_client)
    done = temporal_cli(
        temporal_server, "workflow", "signal", "--workflow-id", workflow_id(request_id),
        "--name", "rotate", "--input", '{"reviewer": "ops"}',
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    rotated = (await mail_to(mail, email, 2))[1]
    new = KEY.search(plain(rotated)).group(0)
    # lifecycle.rotation_grace (24h by default): both keys work for now.
    assert (await key_info(litellm, old))["status"] == "active"
    assert (await key_info(litellm, new))["status"] == "active"
    # A rotation of the rotation deletes the key that was waiting out its grace.
    answer = await api.post(f"/api/admin/requests/{request_id}/rotate", headers=ADMIN)
    assert answer.status_code == 200, answer.text
    third = KEY.search(plain((await mail_to(mail, email, 3))[2])).group(0)
    assert await key_info(litellm, old) is None
    assert (await key_info(litellm, new))["status"] == "active"  # its own grace now
    assert (await key_info(litellm, third))["status"] == "active"
    assert len({m["Message-ID"] for m in mail.messages if m["To"] == email}) == 3


async def test_rotate_rejects_a_bad_grace_and_a_request_without_a_key(api, admin_headers):
    request_id = (await submit(api, unique_email("manual.example.com")))["request_id"]
    bad = await api.post(
        f"/api/admin/requests/{request_id}/rotate", json={"grace": "soon"}, headers=admin_headers
    )
    assert bad.status_code == 422 and "grace" in bad.json()["message"]
    pending = await api.post(f"/api/admin/requests/{request_id}/rotate", headers=admin_headers)
    assert pending.status_code == 409


# --- submissions again: renewal window, denial cooldown -----------------------------------


async def test_a_submission_outside_the_renewal_window_reports_the_expiry_and_sends_nothing(
    api, mail, temporal_client
):
    email, request_id, _ = await approved_key(api, mail, temporal_client)
    again = await submit(api, email)
    assert again["request_id"] == request_id and again["status"] == "approved"
    assert again["key_expires"] and again["key_expires"] in again["message"]
    assert "nothing was sent" in again["message"]
    # The workflow answered without starting anything: no activity after the first email's.
    history = await history_of(temporal_client, request_id)
    kinds = [e.WhichOneof("attributes") for e in history.events]
    scheduled = kinds.count("activity_task_scheduled_event_attributes")
    assert scheduled == kinds.count("activity_task_completed_event_attributes")
    assert len([m for m in mail.messages if m["To"] == email]) == 1


async def test_a_submission_soon_after_a_denial_is_429_with_retry_after_and_no_email(
    api, mail, temporal_client
):
    email = unique_email("deny.example.com")
    request_id = (await submit(api, email))["request_id"]
    await mail_to(mail, email)
    await settled(temporal_client, request_id)
    for _ in range(3):
        answer = await api.post("/api/request-key", json={"email": email, "llm": "gpt-4o"})
        assert answer.status_code == 429, answer.text
        assert 0 < int(answer.headers["Retry-After"]) <= 24 * 3600
        assert "resubmit_after" in answer.json()["message"]
    assert len([m for m in mail.messages if m["To"] == email]) == 1
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    status = await handle.query(QUERY_STATUS, result_type=RequestStatus)
    assert status.state == "denied" and status.cycle == 1
    record_history("v5-denied-cooldown", await handle.fetch_history())


# --- short-lived keys: expiry and renewal of an expired key -------------------------------


@pytest.fixture(scope="module")
async def short(settings, temporal_client, core_api) -> AsyncIterator[httpx.AsyncClient]:
    """A worker and an API of their own, for keys that live 4 seconds and denials that may be
    resubmitted at once."""
    quick = settings.model_copy(
        update={
            "temporal_task_queue": f"short-{uuid.uuid4().hex[:8]}",
            "litellm_key_duration": timedelta(seconds=4),
            "lifecycle_remind_before": (timedelta(seconds=2),),
            "approval_resubmit_after": timedelta(0),
        }
    )
    worker = await start_worker(quick, temporal_client, core_api)
    served = serve_in_thread(create_app(quick), lifespan="on")
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as api:
        yield api
    served.stop()
    await stop_worker(worker)


async def test_an_expired_key_is_deleted_and_renewing_it_mints_a_new_one_once(
    short, mail, litellm, kube, temporal_client
):
    email = unique_email("approve.example.com")
    request_id = (await submit(short, email))["request_id"]
    first = KEY.search(plain((await mail_to(mail, email))[0])).group(0)
    reminder, expired = (await mail_to(mail, email, 3, within=30))[1:]
    assert "expires" in reminder["Subject"] and "expired" in expired["Subject"]
    assert await key_info(litellm, first) is None
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "key-expired"
    assert not secret.get("data")
    record_history("v5-key-expired-short", await history_of(temporal_client, request_id))

    # curl -X POST $API/api/request-key -d '{"email": ..., "llm": "gpt-4o"}': a renewal.
    renewal = await submit(short, email)
    # A fresh cycle, not "already approved"; how far the policy got within the API's short
    # wait for its answer depends on timing.
    assert renewal["request_id"] == request_id and renewal["status"] in ("pending", "approved")
    assert "already" not in renewal["message"]
    new_mail = (await mail_to(mail, email, 4))[3]
    second = KEY.search(plain(new_mail)).group(0)
    assert second != first and (await key_info(litellm, second)) is not None
    assert new_mail["Message-ID"] == f"<{request_id}.2.approved@llm-key-requestor>"
    aliases = [k["key_alias"] for k in litellm.keys() if k["key"] == second]
    assert len(aliases) == 1 and aliases[0].endswith("-c2")
    secret = secret_of(kube, request_id)
    assert base64.b64decode(secret["data"]["api-key"]).decode() == second
    assert secret["metadata"]["annotations"]["llm-key-requestor/cycle"] == "2"


async def test_a_denied_request_asked_for_again_after_the_cooldown_is_a_new_cycle(
    short, mail, kube, temporal_client
):
    email = unique_email("deny.example.com")
    request_id = (await submit(short, email))["request_id"]
    await mail_to(mail, email)
    await settled(temporal_client, request_id)
    again = await submit(short, email)
    # A new cycle: answered as new, whether or not the policy has spoken yet.
    assert again["status"] in ("pending", "denied") and "already" not in again["message"]
    denials = await mail_to(mail, email, 2)
    assert [m["Message-ID"] for m in denials] == [
        f"<{request_id}.denied@llm-key-requestor>",
        f"<{request_id}.2.denied@llm-key-requestor>",
    ]


async def test_status_shows_the_expiry_the_next_reminder_and_the_cycle(api, mail, temporal_client):
    _, request_id, _ = await approved_key(api, mail, temporal_client)
    status = (await api.get(f"/api/requests/{request_id}")).json()
    assert status["key_expires"] and status["next_reminder"] and status["cycle"] == 1
    assert status["next_reminder"] < status["key_expires"]

    # The admin list reads visibility only (no query per row): the workflow's memo carries it.
    async def listed_row():
        listed = await api.get(
            "/api/admin/requests", params={"state": "approved", "page_size": 500}, headers=ADMIN
        )
        rows = [r for r in listed.json()["requests"] if r["request_id"] == request_id]
        return rows[0] if rows and rows[0]["next_reminder"] else None

    row = await wait_until(listed_row, 30, "the request in the admin list, with its key's life")
    assert row["key_expires"] == status["key_expires"] and row["cycle"] == 1
    assert row["next_reminder"] == status["next_reminder"]


async def test_a_key_approved_by_older_code_is_adopted_on_the_next_submission(
    api, mail, litellm, temporal_client
):
    email, request_id, key = await approved_key(api, mail, temporal_client)
    # As the code before the key lifecycle left it: the workflow ended after the email.
    await temporal_client.get_workflow_handle(workflow_id(request_id)).terminate("older code")
    again = await submit(api, email)
    assert again["status"] == "approved" and "issued earlier" in again["message"]

    async def followed():
        status = await settled(temporal_client, request_id)
        return status if status.state == "approved" and status.next_reminder else None

    status = await wait_until(followed, 30, "the new run to follow the key")
    assert status.key_expires
    assert litellm.has_live_key(key)
    minted = [
        k for k in litellm.keys() if k["key_alias"].startswith(f"llm-key-request-{request_id}")
    ]
    assert len(minted) == 1, "adopted, not minted again"
    assert len([m for m in mail.messages if m["To"] == email]) == 1, "and not mailed again"
