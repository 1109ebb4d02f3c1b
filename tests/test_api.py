"""The REST contract: what callers see for good and bad input, and when Temporal is down."""

from __future__ import annotations

import httpx
import pytest

from api.main import create_app
from conftest import unique_email
from devstack.http import free_port, serve_in_thread


async def test_models_come_from_config(api, settings):
    body = (await api.get("/api/models")).json()
    assert [m["id"] for m in body["models"]] == settings.model_ids
    assert all(m["name"] for m in body["models"])


async def test_status_health_and_readiness(api):
    assert (await api.get("/")).json()["status"] == "ok"
    assert (await api.get("/health")).json() == {"status": "ok"}
    ready = await api.get("/health/ready")
    assert ready.status_code == 200 and ready.json()["temporal"] == "reachable"


async def test_openapi_documents_the_endpoints(api):
    paths = (await api.get("/openapi.json")).json()["paths"]
    assert {"/api/request-key", "/api/models", "/api/requests/{request_id}"} <= set(paths)
    assert (await api.get("/docs")).status_code == 200


@pytest.mark.parametrize(
    "email",
    [
        "not-an-email",
        "",
        "jane@",
        "jane.doe@example.com\r\nBcc: victim@example.com",
        "jane doe@example.com",
        "<script>alert(1)</script>@example.com",
        "a" * 300 + "@example.com",
    ],
)
async def test_invalid_email_is_422_naming_the_field(api, email):
    response = await api.post("/api/request-key", json={"email": email, "llm": "gpt-4o"})
    assert response.status_code == 422
    assert response.json()["message"].startswith("email:")
    assert "<script>" not in response.text


async def test_unknown_model_is_422_listing_the_valid_ones(api, settings):
    response = await api.post(
        "/api/request-key", json={"email": unique_email("example.com"), "llm": "gpt-17"}
    )
    assert response.status_code == 422
    message = response.json()["message"]
    assert "llm: unknown model 'gpt-17'" in message
    for model_id in settings.model_ids:
        assert model_id in message


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[]",
        b'{"email": "a@example.com"}',
        b'{"email": "a@example.com", "llm": "gpt-4o", "admin": true}',
        b'{"email": 42, "llm": ["gpt-4o"]}',
        b'{"email": "a@example.com", "llm": "' + b"m" * 5000 + b'"}',
    ],
)
async def test_malformed_bodies_are_422_never_500(api, body):
    response = await api.post(
        "/api/request-key", content=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["message"]


async def test_oversized_body_is_413(api, settings):
    big = b'{"email": "a@example.com", "llm": "' + b"x" * settings.api_max_body_bytes + b'"}'
    response = await api.post(
        "/api/request-key", content=big, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 413
    assert "larger than" in response.json()["message"]

    async def chunks():
        for _ in range(20):
            yield b"x" * 4096

    streamed = await api.post(
        "/api/request-key", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status_code == 413


async def test_unknown_request_id_is_404(api):
    assert (await api.get("/api/requests/0123456789abcdef0123")).status_code == 404
    response = await api.get("/api/requests/..%2F..%2Fetc")
    assert response.status_code == 404
    assert "message" in response.json()


async def test_temporal_unreachable_is_503_json(settings):
    down = settings.model_copy(update={"temporal_address": f"127.0.0.1:{free_port()}"})
    served = serve_in_thread(create_app(down), lifespan="on")
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=30) as client:
            response = await client.post(
                "/api/request-key", json={"email": unique_email("example.com"), "llm": "gpt-4o"}
            )
            assert response.status_code == 503
            assert "Temporal" in response.json()["message"]
            ready = await client.get("/health/ready")
            assert ready.status_code == 503
            assert ready.json()["temporal"].startswith("unreachable")
            assert (await client.get("/health")).status_code == 200
    finally:
        served.stop()


async def test_look_alike_domain_does_not_ride_an_approval_rule(api, settings):
    # "аpprove" with a Cyrillic "а": a different domain that a person may not tell apart.
    email = "jane@\u0430pprove.example.com"
    response = await api.post("/api/request-key", json={"email": email, "llm": "gpt-4o-mini"})
    if response.status_code == 422:
        return  # refusing it outright is fine too
    assert response.status_code == 200
    assert settings.decide(email, "gpt-4o-mini")[0] == "manual"
    status = (await api.get(f"/api/requests/{response.json()['request_id']}")).json()
    assert status["state"] == "pending" and status["decision_source"] == ""


async def test_forged_page_token_is_refused_at_once(api, admin_headers):
    for token in ("not-base64!", "AAAA", "QUFBQUFBQUFBQUFBQUFBQUFBQUFBQUFB"):
        response = await api.get(
            "/api/admin/requests", params={"page_token": token}, headers=admin_headers
        )
        assert response.status_code == 422
        assert response.json()["message"].startswith("page_token:")
