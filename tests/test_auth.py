"""Who may decide: identities from OIDC tokens, trusted proxy headers and ADMIN_TOKEN only.

The issuer is the local stack's (devstack/oidc.py) on loopback; the API fetches its discovery
document and JWKS over HTTP like it would a company's. Bad tokens are made the ways attackers
and misconfigurations make them.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from temporalio.client import WorkflowUpdateFailedError

from conftest import (
    ADMIN_TOKEN,
    NAMED_APPROVER,
    TRUSTED_PROXY,
    mail_to,
    secret_of,
    unique_email,
    wait_until,
)
from devstack.oidc import APPROVERS_GROUP, new_key
from domain import UPDATE_DECIDE, Decision, RequestStatus, workflow_id
from test_key_request_flow import plain, submit

APPROVER = "approver@example.com"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


async def pending(api) -> tuple[str, str]:
    email = unique_email("manual.example.com")
    body = await submit(api, email)
    assert body["status"] == "pending"
    return email, body["request_id"]


async def approve(api, request_id: str, headers: dict, **body) -> httpx.Response:
    return await api.post(
        f"/api/admin/requests/{request_id}/approve", json=body or None, headers=headers
    )


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def unsigned(claims: dict, kid: str) -> str:
    """A token with `alg: none` and no signature (PyJWT will not make one for us)."""
    header = {"alg": "none", "typ": "JWT", "kid": kid}
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}."


def keyed_with_public_key(claims: dict, issuer) -> str:
    """HS256 with the issuer's public key as the secret: the algorithm-confusion attack."""
    public = issuer.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.kid}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(public, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def bad_tokens(issuer) -> dict[str, tuple[str, str]]:
    """name -> (token, a word the refusal must contain)."""
    groups = (APPROVERS_GROUP,)
    good = jwt.decode(issuer.token(APPROVER, groups), options={"verify_signature": False})
    return {
        "expired": (issuer.token(APPROVER, groups, lifetime=-120), "expired"),
        "wrong audience": (issuer.token(APPROVER, groups, audience="another-app"), "audience"),
        "wrong issuer": (
            issuer.token(APPROVER, groups, iss="https://login.evil.example"),
            "issuer",
        ),
        "key not in the JWKS": (issuer.token(APPROVER, groups, key=new_key()), "signature"),
        "unknown kid": (
            issuer.token(APPROVER, groups, key=new_key(), kid="made-up"),
            "not in the issuer's jwks",
        ),
        "alg none": (unsigned(good, issuer.kid), "token refused"),
        "HS256 keyed with the public key": (keyed_with_public_key(good, issuer), "token refused"),
    }


async def test_a_valid_token_decides_as_its_subject_and_the_body_name_is_ignored(
    signon_api, issuer, mail, kube
):
    email, request_id = await pending(signon_api)
    token = issuer.token(APPROVER, (APPROVERS_GROUP,))
    response = await approve(
        signon_api, request_id, bearer(token), reviewer="mallory", reason="Budget ok"
    )
    assert response.status_code == 200, response.text
    assert response.json()["reviewer"] == APPROVER
    assert response.json()["decision_source"] == "api"

    [message] = await mail_to(mail, email)
    assert f"approved by {APPROVER}" in plain(message) and "mallory" not in plain(message)
    annotations = secret_of(kube, request_id)["metadata"]["annotations"]
    assert annotations["llm-key-requestor/reviewer"] == APPROVER


@pytest.mark.parametrize(
    "name",
    [
        "expired",
        "wrong audience",
        "wrong issuer",
        "key not in the JWKS",
        "unknown kid",
        "alg none",
        "HS256 keyed with the public key",
    ],
)
async def test_bad_tokens_are_refused(signon_api, issuer, name):
    _, request_id = await pending(signon_api)
    token, word = bad_tokens(issuer)[name]
    response = await approve(signon_api, request_id, bearer(token))
    assert response.status_code == 401, response.text
    assert word in response.json()["message"].lower()
    shown = await signon_api.get(f"/api/requests/{request_id}")
    assert shown.json()["state"] == "pending" and shown.json()["reviewer"] == ""


async def test_made_up_key_ids_do_not_make_the_api_call_the_issuer_each_time(signon_api, issuer):
    _, request_id = await pending(signon_api)
    before = issuer.jwks_served
    for n in range(5):
        token = issuer.token(APPROVER, (APPROVERS_GROUP,), key=new_key(), kid=f"made-up-{n}")
        assert (await approve(signon_api, request_id, bearer(token))).status_code == 401
    assert issuer.jwks_served - before <= 1


async def test_a_forged_proxy_header_from_an_untrusted_address_is_refused(signon_api):
    _, request_id = await pending(signon_api)
    forged = {"X-Auth-Request-Email": APPROVER, "X-Auth-Request-Groups": APPROVERS_GROUP}
    response = await approve(signon_api, request_id, forged)  # from 127.0.0.1: not the proxy
    assert response.status_code == 403
    assert "auth.trusted_proxies" in response.json()["message"]
    assert (await signon_api.get(f"/api/requests/{request_id}")).json()["state"] == "pending"


async def test_the_trusted_proxy_s_headers_name_the_reviewer(signon_api, signon_url, mail):
    email, request_id = await pending(signon_api)
    transport = httpx.AsyncHTTPTransport(local_address=TRUSTED_PROXY)
    async with httpx.AsyncClient(base_url=signon_url, transport=transport) as proxy:
        response = await approve(
            proxy, request_id, {"X-Auth-Request-Email": NAMED_APPROVER}, reviewer="alice"
        )
    assert response.status_code == 200, response.text
    assert response.json()["reviewer"] == NAMED_APPROVER
    [message] = await mail_to(mail, email)
    assert f"approved by {NAMED_APPROVER}" in plain(message)


async def test_a_bearer_that_is_neither_admin_token_nor_a_jwt_is_refused(signon_api):
    _, request_id = await pending(signon_api)
    response = await approve(signon_api, request_id, bearer("not-the-token"))
    assert response.status_code == 401
    assert "neither ADMIN_TOKEN nor a JWT" in response.json()["message"]


async def test_admin_token_decides_under_its_configured_name(signon_api, signon_settings):
    _, request_id = await pending(signon_api)
    response = await signon_api.post(
        f"/api/admin/requests/{request_id}/deny",
        json={"reviewer": "alice", "reason": "No budget"},
        headers=bearer(ADMIN_TOKEN),
    )
    assert response.status_code == 200, response.text
    assert response.json()["reviewer"] == signon_settings.auth_admin_token_name == "admin-token"


async def test_nobody_approves_their_own_request(signon_api, issuer, temporal_client):
    # An approver asks for a key, then tries to approve it: by the API, then straight to the
    # workflow's update (the check the workflow makes itself).
    email = unique_email("manual.example.com")
    request_id = (await submit(signon_api, email))["request_id"]
    response = await approve(
        signon_api, request_id, bearer(issuer.token(email, (APPROVERS_GROUP,)))
    )
    assert response.status_code == 403
    assert "own request" in response.json()["message"]

    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    with pytest.raises(WorkflowUpdateFailedError) as refused:
        await handle.execute_update(
            UPDATE_DECIDE, Decision(True, email.upper(), "", "api"), result_type=RequestStatus
        )
    assert refused.value.cause.type == "SelfApproval"
    assert (await signon_api.get(f"/api/requests/{request_id}")).json()["state"] == "pending"


async def test_only_approvers_of_the_request_s_rule_decide(signon_api, issuer):
    _, request_id = await pending(signon_api)
    outsider = issuer.token("someone@example.com", ("staff",))
    response = await approve(signon_api, request_id, bearer(outsider))
    assert response.status_code == 403
    assert "not an approver" in response.json()["message"]
    listing = await signon_api.get("/api/admin/requests", headers=bearer(outsider))
    assert listing.status_code == 403


async def test_the_admin_list_shows_requester_reviewer_and_decision_time(signon_api, issuer):
    email, request_id = await pending(signon_api)
    token = bearer(issuer.token(APPROVER, (APPROVERS_GROUP,)))
    assert (await approve(signon_api, request_id, token)).status_code == 200

    async def listed():
        page = await signon_api.get("/api/admin/requests", params={"page_size": 100}, headers=token)
        rows = {r["request_id"]: r for r in page.json()["requests"]}
        row = rows.get(request_id)
        return row if row and row["decided_at"] else None

    row = await wait_until(listed, what="the decided request in the listing")
    assert row["requester"] == email
    assert row["reviewer"] == APPROVER
    assert row["decided_at"]
    public = (await signon_api.get(f"/api/requests/{request_id}")).json()
    assert public["requester"] == "" and public["justification"] == ""


async def test_request_key_answers_with_the_policy_s_decision(settings, signon_settings, worker):
    from api.main import create_app
    from devstack.http import serve_in_thread

    # A generous bound, so that the answer does not depend on how busy the machine is; the
    # API answers as soon as the policy has spoken.
    patient = signon_settings.model_copy(update={"api_decision_wait": settings.litellm_timeout * 4})
    served = serve_in_thread(create_app(patient), lifespan="on")
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            denied = await submit(client, unique_email("deny.example.com"))
            approved = await submit(client, unique_email("approve.example.com"))
            waiting = await submit(client, unique_email("manual.example.com"))
    finally:
        served.stop()
    assert denied["decision"] == "denied" and denied["status"] in ("pending", "denied")
    assert "denied" in denied["message"]
    assert approved["decision"] == "approved" and approved["status"] in ("pending", "approved")
    assert "approved" in approved["message"]
    assert waiting["decision"] == "" and waiting["status"] == "pending"
    assert "when it is decided" in waiting["message"]
