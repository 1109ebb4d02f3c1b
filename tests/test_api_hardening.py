"""The API's failure paths and defaults: what anonymous callers and admins see when things break."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr
from temporalio import workflow
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from api.main import create_app
from conftest import unique_email, wait_until
from devstack.http import serve_in_thread
from devstack.temporal import TemporalDevServer
from domain import KEY_REQUEST_WORKFLOW, KeyRequest, workflow_id
from settings import Settings
from test_key_request_flow import submit
from workflows.key_request import KeyRequestWorkflow

ROOT = Path(__file__).resolve().parent.parent
# Every variable a setting reads, so that a child process sees only what the test gives it.
SETTING_VARIABLES = {name.upper() for name in Settings.model_fields}


def test_api_process_loads_no_worker_code():
    """The API starts and updates workflows by type name: no workflow code, no activities and
    no Kubernetes client in its process (they cost memory, and the API needs no cluster rights)."""
    probe = "import sys, api.main; print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))"
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    loaded = set(done.stdout.split())
    assert "api" in loaded and "temporalio" in loaded, "the probe imported the API"
    assert not loaded & {"kubernetes", "activities", "workflows"}, sorted(loaded)


# --- secrets outside the local stack -------------------------------------------------------


def start(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k.upper() not in SETTING_VARIABLES}
    return subprocess.run(  # noqa: S603
        [sys.executable, *argv], cwd=ROOT, env={**clean, **env},
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


API = ["-m", "uvicorn", "api.main:create_app", "--factory", "--port", "1"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({}, ["REQUEST_ID_KEY is the built-in default", "ADMIN_TOKEN is empty"]),
        (
            {
                "REQUEST_ID_KEY": "CHANGE-ME-long-random-request-id-key",
                "ADMIN_TOKEN": "short",
            },
            ["REQUEST_ID_KEY is still the example's placeholder", "ADMIN_TOKEN is shorter"],
        ),
    ],
)
def test_api_refuses_to_start_in_production_with_default_secrets(env, named):
    done = start(API, **env)  # ENVIRONMENT is unset: production
    assert done.returncode == 2, done.stderr
    for words in named:
        assert words in done.stderr
    assert "secrets.token_urlsafe" in done.stderr, "the message says how to make one"
    assert "ENVIRONMENT=local" in done.stderr
    assert "Traceback" not in done.stderr


def test_worker_refuses_to_start_in_production_without_the_litellm_key():
    done = start(["worker.py"], ENVIRONMENT="production")
    assert done.returncode == 2, done.stderr
    assert "LITELLM_API_KEY is empty" in done.stderr and "Traceback" not in done.stderr


def test_real_secrets_pass_and_local_accepts_the_defaults(settings):
    real = settings.model_copy(
        update={
            "environment": "production",
            "request_id_key": SecretStr("k" * 32),
            "admin_token": SecretStr("t" * 32),
            "litellm_api_key": SecretStr("sk-real-master-key"),
        }
    )
    real.check_secrets("request_id_key", "admin_token", "litellm_api_key")
    local = settings.model_copy(update={"environment": "local", "admin_token": SecretStr("")})
    local.check_secrets("request_id_key", "admin_token", "litellm_api_key")


async def test_a_page_token_signed_with_the_request_id_key_is_refused(api, admin_headers, settings):
    """Page tokens have a key of their own: knowing REQUEST_ID_KEY does not forge one."""
    raw = b"forged continuation"
    key = settings.request_id_key.get_secret_value().encode()
    mac = hmac.new(key, raw, hashlib.sha256).digest()[:16]
    token = base64.urlsafe_b64encode(mac + raw).decode()
    response = await api.get(
        "/api/admin/requests", params={"page_token": token}, headers=admin_headers
    )
    assert response.status_code == 422, response.text
    assert response.json()["message"].startswith("page_token:")


async def test_public_status_names_no_reviewer(api, admin_headers):
    request_id = (await submit(api, unique_email("manual.example.com")))["request_id"]
    decided = await api.post(
        f"/api/admin/requests/{request_id}/deny",
        json={"reviewer": "alice", "reason": "Alice Smith says the team key will do"},
        headers=admin_headers,
    )
    assert decided.status_code == 200, decided.text

    public = await wait_for(lambda: denied(api, request_id))
    assert public["decision_source"] == "api"
    assert "alice" not in str(public).lower()
    admin = (await api.get(f"/api/admin/requests/{request_id}", headers=admin_headers)).json()
    # The reviewer is the authenticated caller (the admin token's name), never the body's.
    assert admin["reviewer"] == "admin-token" and "Alice Smith" in admin["reason"]

    # The policy's reasons are the service's own words (config.yaml): those stay public.
    by_policy = (await submit(api, unique_email("deny.example.com")))["request_id"]

    status = await wait_for(lambda: denied(api, by_policy))
    assert status["reason"] == "Requests from deny.example.com are not allowed."
    assert status["reviewer"] == ""


async def denied(api, request_id: str) -> dict:
    status = (await api.get(f"/api/requests/{request_id}")).json()
    return status if status["state"] == "denied" else {}


async def wait_for(condition, within: float = 30):
    return await wait_until(condition, within, "the condition")


# --- CORS ------------------------------------------------------------------------------------


def preflight(origin: str) -> dict:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type",
    }


async def test_cors_allows_no_origin_unless_configured(api, settings):
    response = await api.options("/api/request-key", headers=preflight("https://elsewhere.example"))
    assert "access-control-allow-origin" not in response.headers
    simple = await api.get("/api/models", headers={"Origin": "https://elsewhere.example"})
    assert "access-control-allow-origin" not in simple.headers

    page = "https://keys.example.com"
    served = serve_in_thread(create_app(settings.model_copy(update={"api_cors_origins": (page,)})))
    try:
        async with httpx.AsyncClient(base_url=served.url) as client:
            allowed = await client.options("/api/request-key", headers=preflight(page))
            assert allowed.headers["access-control-allow-origin"] == page
            other = await client.options("/api/request-key", headers=preflight("https://x.example"))
            assert "access-control-allow-origin" not in other.headers
    finally:
        served.stop()


# --- Temporal down, or no worker --------------------------------------------------------------


@contextlib.asynccontextmanager
async def api_for(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    served = serve_in_thread(create_app(settings), lifespan="on")
    try:
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as client:
            yield client
    finally:
        served.stop()


async def test_temporal_gone_is_a_503_within_2_s_that_reveals_no_internals(settings, tmp_path):
    temporal = TemporalDevServer(log_file=tmp_path / "temporal.log")
    temporal.start()
    try:
        moved = settings.model_copy(update={"temporal_address": temporal.address})
        async with api_for(moved) as api:
            # Connected first: the client then retries a vanished server, where a server that
            # never answered fails at once.
            assert (await api.get("/health/ready")).status_code == 200
            temporal.stop()

            began = time.monotonic()
            response = await api.post(
                "/api/request-key", json={"email": unique_email("example.com"), "llm": "gpt-4o"}
            )
            took = time.monotonic() - began
            assert response.status_code == 503, response.text
            assert took < 2, f"the 503 took {took:.1f} s"
            body = response.json()["message"]
            assert "try again" in body.lower()
            ready = await api.get("/health/ready")
            assert ready.status_code == 503
            for leaked in (temporal.address, str(temporal.port), "TEMPORAL_ADDRESS", "tcp connect",
                           "rror", "grpc"):  # fmt: skip
                assert leaked not in response.text and leaked not in ready.text, leaked
    finally:
        temporal.stop()


async def test_decisions_with_no_worker_polling_get_a_prompt_503_or_429(
    settings, admin_headers, temporal_client
):
    """Decisions on a workflow that no worker serves: each answered within the bound with a
    503 that says to retry (or 429 past Temporal's limit of in-flight updates), never "409
    already decided"."""
    idle = settings.model_copy(update={"temporal_task_queue": f"no-worker-{uuid.uuid4().hex[:8]}"})
    async with api_for(idle) as api:
        request_id = (await submit(api, unique_email("manual.example.com")))["request_id"]
        began = time.monotonic()
        status = await api.get(f"/api/requests/{request_id}")
        assert status.status_code == 200 and status.json()["state"] == "pending"
        took = time.monotonic() - began
        assert took < 5, f"the status took {took:.1f} s"

        began = time.monotonic()
        answers = await asyncio.gather(
            *(
                api.post(
                    f"/api/admin/requests/{request_id}/approve",
                    json={"reviewer": f"admin-{i}"},
                    headers=admin_headers,
                )
                for i in range(12)
            )
        )
        took = time.monotonic() - began
        codes = sorted(a.status_code for a in answers)
        assert set(codes) <= {429, 503}, [(a.status_code, a.text) for a in answers]
        # With no worker the requester is unknown, so no decision can be checked against
        # self-approval: each is refused at once, saying to retry (none reaches Temporal's
        # limit of in-flight updates, which would answer 429).
        assert all("retry" in a.json()["message"] for a in answers), answers[0].text
        assert took < 15, f"the decisions took {took:.1f} s"
    await temporal_client.get_workflow_handle(workflow_id(request_id)).terminate("test done")


@workflow.defn(name=KEY_REQUEST_WORKFLOW)
class EarlierKeyRequestWorkflow:
    """A version of the workflow whose commands today's code does not issue."""

    @workflow.run
    async def run(self, request: KeyRequest) -> None:
        await workflow.sleep(timedelta(hours=1))


async def test_status_of_a_run_the_worker_cannot_replay_is_not_a_500(settings, temporal_client):
    """A run recorded by other code fails today's replay, so its status query fails; the
    status then comes from visibility."""
    queue = f"replay-{uuid.uuid4().hex[:8]}"
    async with api_for(settings.model_copy(update={"temporal_task_queue": queue})) as api:
        earlier = Worker(
            temporal_client, task_queue=queue, workflows=[EarlierKeyRequestWorkflow],
            workflow_runner=UnsandboxedWorkflowRunner(), max_cached_workflows=0,
        )  # fmt: skip
        async with earlier:
            request_id = (await submit(api, unique_email("manual.example.com")))["request_id"]
            handle = temporal_client.get_workflow_handle(workflow_id(request_id))

            async def timer_started() -> bool:
                history = await handle.fetch_history()
                return any(e.HasField("timer_started_event_attributes") for e in history.events)

            await wait_until(timer_started, 30, "the earlier code's timer")
        try:
            async with Worker(temporal_client, task_queue=queue, workflows=[KeyRequestWorkflow]):
                response = await api.get(f"/api/requests/{request_id}")
            assert response.status_code == 200, response.text
            assert response.json()["state"] == "pending"
        finally:
            await handle.terminate("test done")
