"""Conformance tests for LiteLLM's key-management API.

By default they run against ``devstack.litellm.LiteLLMStandin``. Point them at a real proxy
with ``CONFORMANCE_LITELLM_URL`` and ``CONFORMANCE_LITELLM_MASTER_KEY``; every key they mint
there carries a random alias and is deleted afterwards, and stand-in-only tests are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from devstack.litellm import LiteLLMStandin

pytestmark = pytest.mark.conformance

DUPLICATE_ALIAS_MESSAGE = (
    "Key with alias '{}' already exists. Unique key aliases across all keys are required."
)


@dataclass
class Target:
    url: str
    master_key: str
    standin: LiteLLMStandin | None


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    url = os.environ.get("CONFORMANCE_LITELLM_URL")
    master_key = os.environ.get("CONFORMANCE_LITELLM_MASTER_KEY")
    if url or master_key:
        if not (url and master_key):
            pytest.fail("set both CONFORMANCE_LITELLM_URL and CONFORMANCE_LITELLM_MASTER_KEY")
        yield Target(url.rstrip("/"), master_key, None)
        return
    standin = LiteLLMStandin()
    standin.start()
    try:
        yield Target(standin.url, standin.master_key, standin)
    finally:
        standin.stop()


@pytest.fixture
def standin(target: Target) -> LiteLLMStandin:
    if target.standin is None:
        pytest.skip("stand-in only: needs in-process fault injection and inspection")
    return target.standin


@pytest.fixture
def api(target: Target) -> Iterator[httpx.Client]:
    headers = {"Authorization": f"Bearer {target.master_key}"}
    with httpx.Client(base_url=target.url, headers=headers, timeout=30) as client:
        yield client


@pytest.fixture
def alias(api: httpx.Client) -> Iterator[Callable[[], str]]:
    """Make unique aliases; whatever keys carry them are deleted after the test."""
    made: list[str] = []

    def make() -> str:
        made.append(f"conformance-{secrets.token_hex(6)}")
        return made[-1]

    yield make
    if made:
        response = api.post("/key/delete", json={"key_aliases": made})
        assert response.status_code in (200, 404), response.text


def chosen_key() -> str:
    return f"sk-conformance-{secrets.token_hex(12)}"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def assert_proxy_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["code"] == str(status)
    return error


def test_liveliness_needs_no_auth(target: Target) -> None:
    response = httpx.get(f"{target.url}/health/liveliness", timeout=10)
    assert response.status_code == 200
    assert response.json() == "I'm alive!"


def test_generate_echoes_fields_and_uses_chosen_key(api: httpx.Client, alias) -> None:
    name, key = alias(), chosen_key()
    metadata = {"requested_by": "ada@example.org", "request_id": "req-123"}
    before = datetime.now(UTC)
    response = api.post(
        "/key/generate",
        json={
            "key": key,
            "key_alias": name,
            "models": ["gpt-4o-mini", "claude-sonnet"],
            "duration": "30m",
            "max_budget": 2.5,
            "budget_duration": "30d",
            "metadata": metadata,
            "user_id": "conformance-user",
        },
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["key"] == key
    assert body["token"] == sha256(key)
    assert body["token_id"] == sha256(key)
    assert body["key_alias"] == name
    assert body["models"] == ["gpt-4o-mini", "claude-sonnet"]
    assert body["max_budget"] == 2.5
    assert body["budget_duration"] == "30d"
    assert body["user_id"] == "conformance-user"
    assert body["metadata"].items() >= metadata.items()
    assert body["key_name"].endswith(key[-4:]) and key not in body["key_name"]
    expires = datetime.fromisoformat(body["expires"])
    expected = before + timedelta(minutes=30)
    assert expected - timedelta(seconds=60) < expires < expected + timedelta(seconds=60)


def test_generate_without_key_or_duration(api: httpx.Client, alias) -> None:
    response = api.post("/key/generate", json={"key_alias": alias()})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["key"].startswith("sk-")
    assert body["token"] == sha256(body["key"])
    assert body["expires"] is None
    assert body["models"] == []


def test_duplicate_alias_is_refused_with_exact_error(api: httpx.Client, alias) -> None:
    name = alias()
    assert api.post("/key/generate", json={"key_alias": name}).status_code == 200
    response = api.post("/key/generate", json={"key_alias": name, "models": ["other"]})
    error = assert_proxy_error(response, 400)
    assert error == {
        "message": DUPLICATE_ALIAS_MESSAGE.format(name),
        "type": "bad_request_error",
        "param": "key_alias",
        "code": "400",
    }


def test_retry_with_same_key_and_alias_is_refused_by_alias(api: httpx.Client, alias) -> None:
    name, key = alias(), chosen_key()
    request = {"key": key, "key_alias": name, "models": ["gpt-4o-mini"]}
    assert api.post("/key/generate", json=request).status_code == 200
    error = assert_proxy_error(api.post("/key/generate", json=request), 400)
    assert error["param"] == "key_alias"
    assert api.get("/key/info", params={"key": key}).status_code == 200


def test_existing_chosen_key_under_new_alias_keeps_the_original(api: httpx.Client, alias) -> None:
    """LiteLLM inserts keys with an upsert whose update is empty: no error, nothing changes."""
    first, second, key = alias(), alias(), chosen_key()
    assert api.post("/key/generate", json={"key": key, "key_alias": first}).status_code == 200
    response = api.post("/key/generate", json={"key": key, "key_alias": second})
    assert response.status_code == 200, response.text
    assert response.json()["token"] == sha256(key)
    info = api.get("/key/info", params={"key": key}).json()["info"]
    assert info["key_alias"] == first


def test_chosen_key_must_start_with_sk(api: httpx.Client, alias) -> None:
    name = alias()
    response = api.post("/key/generate", json={"key": "not-a-litellm-key", "key_alias": name})
    assert_proxy_error(response, 400)
    assert api.post("/key/generate", json={"key_alias": name}).status_code == 200


def test_negative_budget_is_refused(api: httpx.Client, alias) -> None:
    response = api.post("/key/generate", json={"key_alias": alias(), "max_budget": -1})
    assert_proxy_error(response, 400)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer sk-definitely-not-the-master-key"},
        {"Authorization": "Bearer not-even-shaped-like-a-key"},
        {"Authorization": "Bearer"},
    ],
    ids=["missing", "wrong", "malformed", "empty"],
)
def test_generate_requires_the_master_key(target: Target, headers: dict) -> None:
    response = httpx.post(
        f"{target.url}/key/generate", json={"models": []}, headers=headers, timeout=10
    )
    assert_proxy_error(response, 401)


def test_info_by_plaintext_and_by_hash_never_reveals_the_key(api: httpx.Client, alias) -> None:
    name, key = alias(), chosen_key()
    api.post("/key/generate", json={"key": key, "key_alias": name, "models": ["gpt-4o-mini"]})
    for query in (key, sha256(key)):
        response = api.get("/key/info", params={"key": query})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["key"] == query  # LiteLLM echoes what was asked for
        assert body["info"]["key_alias"] == name
        assert body["info"]["models"] == ["gpt-4o-mini"]
        assert "token" not in body["info"]
        assert key not in json.dumps(body["info"])
    assert key not in api.get("/key/info", params={"key": sha256(key)}).text


def test_info_for_unknown_key_is_404(api: httpx.Client) -> None:
    assert_proxy_error(api.get("/key/info", params={"key": chosen_key()}), 404)
    assert_proxy_error(api.get("/key/info", params={"key": sha256("nothing")}), 404)


def test_bad_duration_unit_is_500_and_creates_nothing(api: httpx.Client, alias) -> None:
    name = alias()
    response = api.post("/key/generate", json={"key_alias": name, "duration": "30x"})
    assert_proxy_error(response, 500)
    assert api.post("/key/generate", json={"key_alias": name}).status_code == 200


@pytest.mark.parametrize(
    ("payload", "field"),
    [({"models": "gpt-4o-mini"}, "models"), ({"max_budget": "lots"}, "max_budget")],
)
def test_wrong_json_types_are_422(api: httpx.Client, alias, payload: dict, field: str) -> None:
    response = api.post("/key/generate", json={"key_alias": alias(), **payload})
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    assert isinstance(detail, list)
    assert ["body", field] in [error["loc"] for error in detail]


def test_delete_by_alias_then_info_is_404(api: httpx.Client, alias) -> None:
    name = alias()
    key = api.post("/key/generate", json={"key_alias": name}).json()["key"]
    response = api.post("/key/delete", json={"key_aliases": [name]})
    assert response.status_code == 200, response.text
    assert response.json() == {"deleted_keys": [name]}
    assert_proxy_error(api.get("/key/info", params={"key": key}), 404)
    assert_proxy_error(api.post("/key/delete", json={"key_aliases": [name]}), 404)


def test_delete_by_key_then_info_is_404(api: httpx.Client, alias) -> None:
    key = api.post("/key/generate", json={"key_alias": alias()}).json()["key"]
    response = api.post("/key/delete", json={"keys": [key]})
    assert response.status_code == 200, response.text
    assert response.json() == {"deleted_keys": [key]}
    assert_proxy_error(api.get("/key/info", params={"key": sha256(key)}), 404)


def test_delete_unknown_key_is_404(api: httpx.Client) -> None:
    assert_proxy_error(api.post("/key/delete", json={"keys": [chosen_key()]}), 404)


# -- stand-in only ---------------------------------------------------------------------------


def test_fail_next_answers_500_and_creates_nothing(
    api: httpx.Client, alias, standin: LiteLLMStandin
) -> None:
    name = alias()
    standin.fail_next(1, status=500, message="database is unavailable")
    error = assert_proxy_error(api.post("/key/generate", json={"key_alias": name}), 500)
    assert error["message"] == "database is unavailable"
    assert standin.live_keys_for_alias(name) == 0
    assert api.post("/key/generate", json={"key_alias": name}).status_code == 200
    assert standin.live_keys_for_alias(name) == 1


def test_reject_next_answers_a_client_error(
    api: httpx.Client, alias, standin: LiteLLMStandin
) -> None:
    name = alias()
    standin.reject_next(1, status=400, message="models not allowed", param="models")
    error = assert_proxy_error(api.post("/key/generate", json={"key_alias": name}), 400)
    assert (error["type"], error["param"]) == ("bad_request_error", "models")
    assert standin.live_keys_for_alias(name) == 0


def test_delay_next_times_out_the_client_but_the_key_exists(
    api: httpx.Client, alias, standin: LiteLLMStandin
) -> None:
    name = alias()
    calls = standin.generate_calls
    standin.delay_next(1, seconds=5)
    with pytest.raises(httpx.ReadTimeout):
        api.post("/key/generate", json={"key_alias": name}, timeout=0.3)
    standin.wait_for_generate_calls(calls + 1)
    assert standin.live_keys_for_alias(name) == 1
    retry = api.post("/key/generate", json={"key_alias": name})
    assert_proxy_error(retry, 400)
    assert standin.live_keys_for_alias(name) == 1


def test_inspection_and_revocation(api: httpx.Client, alias, standin: LiteLLMStandin) -> None:
    name, key = alias(), chosen_key()
    request = {"key": key, "key_alias": name, "models": ["m"], "metadata": {"a": 1}}
    api.post("/key/generate", json=request)
    [record] = [r for r in standin.keys() if r["key_alias"] == name]
    assert record["token"] == sha256(key)
    assert (record["models"], record["metadata"], record["status"]) == (["m"], {"a": 1}, "active")
    assert standin.has_live_key(key)
    assert standin.revoke(name) == 1
    assert not standin.has_live_key(key)
    info = api.get("/key/info", params={"key": key}).json()["info"]
    assert (info["blocked"], info["status"]) == (True, "revoked")


def test_zero_duration_key_is_expired(api: httpx.Client, alias, standin: LiteLLMStandin) -> None:
    key = api.post("/key/generate", json={"key_alias": alias(), "duration": "0s"}).json()["key"]
    assert not standin.has_live_key(key)
    assert api.get("/key/info", params={"key": key}).json()["info"]["status"] == "expired"
