"""Operating it: the real /metrics endpoints of the API and the worker, traces, JSON logs.

This module runs its own API and worker (their own task queue, metrics endpoints and tracing),
so every count below is exactly this module's requests.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client.parser import text_string_to_metric_families
from temporalio.client import Client, WorkflowHistory
from temporalio.worker import Replayer

from activities.kubernetes import SecretsApi, SecretStore
from activities.metrics import census
from api.main import create_app
from conftest import mail_to, settled, unique_email, wait_until
from connection import connect_temporal, start_key_request
from devstack.http import free_port, serve_in_thread
from domain import KeyRequest, Review, request_id_for, workflow_id
from settings import Settings
from telemetry import Telemetry, process_runtime, start_tracing
from test_key_request_flow import submit
from test_reconcile import reconcile
from worker import ensure_reconcile_schedule, run_worker
from workflows.key_request import KeyRequestWorkflow

SPANS = InMemorySpanExporter()
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Observed:
    api: httpx.AsyncClient
    api_metrics: str
    worker_metrics: str
    settings: Settings
    client: Client  # the worker's, with its metrics runtime
    store: SecretStore
    meter: object  # the worker runtime's metric meter


@pytest.fixture(scope="module")
async def observed(settings, temporal_client, core_api, worker, responses):
    start_tracing("llm-key-requestor-tests", "", exporter=SPANS)
    ours = settings.model_copy(
        update={
            "temporal_task_queue": f"telemetry-{uuid.uuid4().hex[:8]}",
            "temporal_ui_url": "http://temporal-ui.example:8233",
        }
    )
    worker_port, api_port = free_port(), free_port()
    worker_telemetry = Telemetry(runtime=process_runtime(worker_port), tracing=True)
    api_telemetry = Telemetry(runtime=process_runtime(api_port), tracing=True)
    client = await connect_temporal(ours, telemetry=worker_telemetry)
    store = SecretStore(SecretsApi(core_api.api_client), ours.namespace)
    stop = asyncio.Event()
    running = asyncio.create_task(run_worker(ours, client, store, stop, worker_telemetry))
    served = serve_in_thread(create_app(ours, api_telemetry), lifespan="on")

    async def keep(response: httpx.Response) -> None:
        responses.append(await response.aread())

    try:
        async with httpx.AsyncClient(
            base_url=served.url, timeout=30, event_hooks={"response": [keep]}
        ) as api:
            yield Observed(
                api,
                f"http://127.0.0.1:{api_port}/metrics",
                f"http://127.0.0.1:{worker_port}/metrics",
                ours,
                client,
                store,
                worker_telemetry.runtime.metric_meter,
            )
    finally:
        served.stop()
        stop.set()
        await asyncio.wait_for(running, 30)
        # Our worker pointed the one reconcile Schedule at its task queue; give it back.
        await ensure_reconcile_schedule(temporal_client, settings)


def samples(url: str) -> list:
    """Every sample of a /metrics answer, parsed by Prometheus' own client library."""
    text = httpx.get(url, timeout=10).text
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(found: list, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    return sum(
        s.value
        for s in found
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def metric_reaches(url: str, name: str, target: float, **labels: str) -> list:
    """Scrape until `name` (summed over matching series) reaches `target`; the last scrape."""

    def reached():
        try:
            found = samples(url)
        except httpx.TransportError:
            return None  # the process is still starting
        return found if value(found, name, **labels) >= target else None

    return await wait_until(reached, 30, f"{name}{labels} to reach {target}")


# ---- metrics ------------------------------------------------------------------------------


async def test_metrics_count_every_path_by_model_and_decision(observed, mail, temporal_client):
    api = observed.api
    emails = {
        "policy-approved": unique_email("approve.example.com"),
        "policy-denied": unique_email("deny.example.com"),
        "admin-approved": unique_email("manual.example.com"),
        "signal-denied": unique_email("manual.example.com"),
    }
    ids = {path: (await submit(api, email))["request_id"] for path, email in emails.items()}
    approved = await api.post(
        f"/api/admin/requests/{ids['admin-approved']}/approve",
        json={"reason": "fine"},
        headers={"Authorization": f"Bearer {observed.settings.admin_token.get_secret_value()}"},
    )
    assert approved.status_code == 200, approved.text
    handle = temporal_client.get_workflow_handle(workflow_id(ids["signal-denied"]))
    await handle.signal("deny", Review(reviewer="bob", reason="not this quarter"))
    for path, email in emails.items():
        await mail_to(mail, email)
        await settled(temporal_client, ids[path])  # past its email: on the key's timers now
    # A repeat of an approved request returns it: counted, but no new workflow.
    again = await submit(api, emails["admin-approved"])
    assert again["request_id"] == ids["admin-approved"]

    worker = await metric_reaches(observed.worker_metrics, "llm_key_request_email_seconds_count", 4)
    assert value(worker, "llm_key_requests_started_total", model="gpt-4o") == 4
    decided = "llm_key_requests_decided_total"
    assert value(worker, decided, decision="approved", source="policy") == 1
    assert value(worker, decided, decision="denied", source="policy") == 1
    assert value(worker, decided, decision="approved", source="api") == 1
    assert value(worker, decided, decision="denied", source="signal") == 1
    assert value(worker, decided) == 4
    for decision in ("approved", "denied"):
        histogram = "llm_key_request_decision_seconds"
        count = value(worker, f"{histogram}_count", decision=decision)
        assert count == 2
        buckets = sorted(
            (float(s.labels["le"]), s.value)
            for s in worker
            if s.name == f"{histogram}_bucket" and s.labels["decision"] == decision
        )
        assert [v for _, v in buckets] == sorted(v for _, v in buckets), "buckets are cumulative"
        assert buckets[-1] == (float("inf"), count)
        assert 0 <= value(worker, f"{histogram}_sum", decision=decision) < 600
    assert value(worker, "llm_key_request_email_seconds_count", state="approved") == 2
    assert value(worker, "llm_key_request_email_seconds_count", state="denied") == 2
    # The Temporal SDK's own metrics, from the same endpoint.
    assert value(worker, "temporal_activity_execution_latency_count") > 0

    api_found = samples(observed.api_metrics)
    submissions = "llm_key_api_submissions_total"
    assert value(api_found, submissions, model="gpt-4o", outcome="started") == 4
    # The key is live and outside its renewal window: the answer reports it, nothing else.
    assert value(api_found, submissions, model="gpt-4o", outcome="current") == 1
    requests = "llm_key_api_requests_total"
    assert value(api_found, requests, route="/api/request-key", method="POST", status="200") == 5
    assert value(api_found, "llm_key_api_request_seconds_count", route="/api/request-key") == 5
    assert value(api_found, "temporal_request_total") > 0, "the API's Temporal client metrics"

    # No label anywhere carries an email address or a request id.
    for found in (worker, api_found):
        labels = " ".join(v for s in found for v in s.labels.values())
        for secret in (*emails.values(), *ids.values()):
            assert secret not in labels


async def test_mint_and_email_failures_are_counted_by_cause(observed, mail, litellm):
    url = observed.worker_metrics
    litellm.fail_next(1, status=500)
    first = unique_email("approve.example.com")
    await submit(observed.api, first)
    await mail_to(mail, first)
    await metric_reaches(url, "llm_key_mint_failures_total", 1, cause="LiteLLMUnavailable")

    litellm.reject_next(1, status=400, message="max_budget must be positive", param="max_budget")
    refused = unique_email("approve.example.com")
    await submit(observed.api, refused)
    await mail_to(mail, refused)
    found = await metric_reaches(url, "llm_key_requests_failed_total", 1, model="gpt-4o")
    assert value(found, "llm_key_mint_failures_total", cause="KeyRejected") == 1

    mail.stop()
    try:
        denied = unique_email("deny.example.com")
        await submit(observed.api, denied)
        await metric_reaches(url, "llm_key_email_failures_total", 1, cause="MailUnavailable")
    finally:
        mail.start()
    await mail_to(mail, denied, within=60)


async def test_reconciler_runs_report_what_they_found(observed):
    before = time.time()
    counts = await reconcile(observed.client, observed.settings)
    found = await metric_reaches(observed.worker_metrics, "llm_key_reconcile_runs_total", 1)
    for outcome in ("in_flight", "resumed", "relayed", "corrected", "skipped"):
        assert value(found, "llm_key_reconcile_secrets_total", outcome=outcome) == getattr(
            counts, outcome
        )
    last_run = value(found, "llm_key_reconcile_last_run_timestamp_seconds")
    assert before - 1 <= last_run <= time.time() + 1


async def test_the_secret_census_counts_requests_per_state(observed, kube):
    await census(observed.store, observed.meter, observed.settings)
    found = samples(observed.worker_metrics)
    secrets = [
        s for s in kube.secrets("default") if s["metadata"]["name"].startswith("llm-key-request-")
    ]
    for state in ("pending", "approved", "denied", "failed"):
        expected = sum(1 for s in secrets if s["metadata"]["labels"]["request-state"] == state)
        assert value(found, "llm_key_request_secrets", state=state) == expected, state
    assert value(found, "llm_key_request_approval_deadline_seconds") == 3600
    assert value(found, "llm_key_request_oldest_pending_timestamp_seconds") <= time.time() + 1


# ---- traces and logs ----------------------------------------------------------------------


async def test_one_request_is_one_trace_continuing_the_callers(observed, mail, captured_logs):
    trace_id, parent_id = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    email = unique_email("approve.example.com")
    response = await observed.api.post(
        "/api/request-key",
        json={"email": email, "llm": "gpt-4o"},
        headers={"traceparent": f"00-{trace_id}-{parent_id}-01"},
    )
    assert response.status_code == 200
    request_id = response.json()["request_id"]
    await mail_to(mail, email)

    def finished():
        spans = [
            s for s in SPANS.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id
        ]
        names = {s.name for s in spans}
        return spans if "RunActivity:notify_requester" in names else None

    spans = await wait_until(finished, 30, "the request's spans")
    names = [s.name for s in spans]
    by_id = {s.context.span_id: s for s in spans}
    # The API's server span is the trace's entry, and its parent is the caller's span.
    (server,) = [s for s in spans if s.name == "POST /api/request-key"]
    assert format(server.parent.span_id, "016x") == parent_id and server.parent.is_remote
    assert all(s.parent is not None for s in spans), "every span hangs off the caller's"
    assert "StartWorkflow:KeyRequestWorkflow" in names
    assert "RunWorkflow:KeyRequestWorkflow" in names
    for activity in ("record_request", "mint_key", "notify_requester"):
        assert f"RunActivity:{activity}" in names, activity
    (generate,) = [s for s in spans if "/key/generate" in str(s.attributes.get("http.url"))]
    (smtp,) = [s for s in spans if s.name == "smtp send"]
    assert by_id[generate.parent.span_id].name == "RunActivity:mint_key"
    assert by_id[smtp.parent.span_id].name == "RunActivity:notify_requester"
    # Nothing personal in any span.
    attributes = json.dumps([dict(s.attributes) for s in spans], default=str)
    assert email not in attributes

    # The audit lines of that request, as LOG_FORMAT=json writes them.
    lines = [json.loads(line) for line in captured_logs.json_lines]
    minted = [
        e for e in lines if e.get("event") == "key.minted" and e.get("request_id") == request_id
    ]
    assert len(minted) == 1
    (event,) = minted
    assert event["logger"] == "audit" and event["level"] == "INFO"
    assert event["workflow_id"] == workflow_id(request_id)
    assert event["trace_id"] == trace_id
    assert event["actor"] == "policy:auto-approve" and event["source"] == "policy"
    assert event["model"] == "gpt-4o" and event["decision"] == "approved"
    assert not [line for line in captured_logs.json_lines if email in line]


def test_log_format_json_writes_one_object_per_line():
    program = (
        "import logging, audit, telemetry\n"
        "telemetry.configure_logging('json')\n"
        "logging.getLogger('worker').info('ready on %s', 'queue-a')\n"
        "audit.record(audit.DECIDED, request_id='r1', actor='alice', source='api', model='m')\n"
        "try:\n    1 / 0\nexcept ZeroDivisionError:\n    logging.getLogger('x').exception('boom')\n"
    )
    done = subprocess.run(  # noqa: S603
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr
    ready, decided, boom = (json.loads(line) for line in done.stdout.splitlines())
    assert ready["message"] == "ready on queue-a" and ready["logger"] == "worker"
    assert {"time", "level", "logger", "message"} <= set(ready)
    assert decided["event"] == "request.decided" and decided["request_id"] == "r1"
    assert decided["actor"] == "alice" and decided["source"] == "api" and decided["model"] == "m"
    assert boom["level"] == "ERROR" and "ZeroDivisionError" in boom["exception"]


# ---- the audit export and Web UI links ----------------------------------------------------


async def test_the_audit_export_says_who_decided_what(observed, mail, captured_logs):
    api = observed.api
    admin = {"Authorization": f"Bearer {observed.settings.admin_token.get_secret_value()}"}
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    emails = {
        "approved": unique_email("approve.example.com"),
        "denied": unique_email("deny.example.com"),
        "manual": unique_email("manual.example.com"),
    }
    ids = {name: (await submit(api, email))["request_id"] for name, email in emails.items()}
    decided = await api.post(
        f"/api/admin/requests/{ids['manual']}/approve",
        json={"reason": "=HYPERLINK(1)"},  # must reach a spreadsheet as text
        headers=admin,
    )
    assert decided.status_code == 200
    for email in emails.values():
        await mail_to(mail, email)

    async def exported():
        response = await api.get("/api/admin/audit", params={"since": since}, headers=admin)
        assert response.status_code == 200, response.text
        rows = [json.loads(line) for line in response.text.splitlines()]
        ours = [r for r in rows if r["request_id"] in ids.values()]
        # Closed runs answer with their result, running ones with their status query.
        return (response, ours) if len(ours) == 5 else None

    response, rows = await wait_until(exported, 30, "the export to show the three requests")
    assert response.headers["content-type"] == "application/x-ndjson"
    assert response.headers["x-audit-complete"] == "true"
    by = {(r["request_id"], r["event"]): r for r in rows}
    approved = by[(ids["approved"], "request.decided")]
    assert approved["actor"] == "policy:auto-approve" and approved["source"] == "policy"
    assert approved["decision"] == "approved" and approved["model"] == "gpt-4o"
    assert by[(ids["approved"], "key.minted")]["state"] == "approved"
    denied = by[(ids["denied"], "request.decided")]
    assert denied["decision"] == "denied" and denied["actor"] == "policy:auto-deny"
    manual = by[(ids["manual"], "request.decided")]
    assert manual["source"] == "api" and manual["decision"] == "approved"
    assert [r["at"] for r in rows] == sorted(r["at"] for r in rows)
    # The same decisions as the audit log lines wrote them.
    logged = [json.loads(line) for line in captured_logs.json_lines]
    for row in rows:
        if row["event"] == "request.decided":
            (line,) = [
                e
                for e in logged
                if e.get("event") == "request.decided" and e.get("request_id") == row["request_id"]
            ]
            assert (line["actor"], line["source"]) == (row["actor"], row["source"])
    assert not any(email in response.text for email in emails.values())

    as_csv = await api.get(
        "/api/admin/audit", params={"since": since}, headers={**admin, "Accept": "text/csv"}
    )
    assert as_csv.headers["content-type"].startswith("text/csv")
    table = list(csv.DictReader(io.StringIO(as_csv.text)))
    (cell,) = [r["reason"] for r in table if r["request_id"] == ids["manual"] and r["reason"]]
    assert cell == "'=HYPERLINK(1)"
    forced = await api.get(
        "/api/admin/audit",
        params={"since": since, "format": "jsonl", "limit": 1},
        headers={**admin, "Accept": "text/csv"},
    )
    assert forced.headers["content-type"] == "application/x-ndjson"
    assert forced.headers["x-audit-complete"] == "false"


async def test_the_audit_export_is_for_admins_and_checks_its_window(observed):
    url = "/api/admin/audit"
    assert (
        await observed.api.get(url, params={"since": "2026-01-01T00:00:00Z"})
    ).status_code == 401
    admin = {"Authorization": f"Bearer {observed.settings.admin_token.get_secret_value()}"}
    backwards = await observed.api.get(
        url,
        params={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
        headers=admin,
    )
    assert backwards.status_code == 422 and "since" in backwards.json()["message"]
    missing = await observed.api.get(url, headers=admin)
    assert missing.status_code == 422 and "since" in missing.json()["message"]
    for since, until in (
        ("0001-01-01T00:00:00+05:00", "2026-01-01T00:00:00Z"),
        ("0001-01-01T00:00:00Z", "9999-12-31T23:59:59Z"),
    ):
        edge = await observed.api.get(url, params={"since": since, "until": until}, headers=admin)
        assert edge.status_code in (200, 422), edge.text


async def test_status_answers_link_to_the_temporal_web_ui(observed, mail):
    email = unique_email("deny.example.com")
    request_id = (await submit(observed.api, email))["request_id"]
    status = (await observed.api.get(f"/api/requests/{request_id}")).json()
    assert status["web_ui_url"] == (
        "http://temporal-ui.example:8233/namespaces/default/workflows"
        f"?query=WorkflowId%3D%22key-request-{request_id}%22"
    )
    await mail_to(mail, email)


def test_the_api_process_exports_traces_by_otlp_logs_json_and_serves_metrics():
    """The API as deployed (uvicorn's factory, settings from the environment), in its own
    process: OTLP/HTTP to a collector when OTEL_EXPORTER_OTLP_ENDPOINT is set."""
    received: list[bytes] = []
    collector = FastAPI()

    @collector.post("/v1/traces")
    async def traces(request: Request) -> Response:
        received.append(await request.body())
        return Response(status_code=200)

    served = serve_in_thread(collector)
    api_port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "OTEL_EXPORTER_OTLP_ENDPOINT": served.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # export within a tenth of a second, not five
        "ENVIRONMENT": "local",  # the built-in secrets will do here
        "LOG_FORMAT": "json",
        "METRICS_PORT": str(metrics_port),
        "TEMPORAL_ADDRESS": f"127.0.0.1:{free_port()}",  # nothing there; /api/models needs none
    }
    api = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "uvicorn", "api.main:create_app", "--factory",
         "--host", "127.0.0.1", "--port", str(api_port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    trace_id = uuid.uuid4().hex
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                answer = httpx.get(
                    f"http://127.0.0.1:{api_port}/api/models",
                    headers={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"},
                )
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the API process did not start"
                time.sleep(0.1)
        assert answer.status_code == 200
        while not received:
            assert time.monotonic() < deadline, "no spans reached the collector"
            time.sleep(0.1)
        found = samples(f"http://127.0.0.1:{metrics_port}/metrics")
        assert value(found, "llm_key_api_requests_total", route="/api/models", status="200") == 1
    finally:
        api.terminate()
        output, _ = api.communicate(timeout=30)
        served.stop()

    export = ExportTraceServiceRequest.FromString(received[0])
    (resource,) = export.resource_spans
    service = {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"]
    assert service == "llm-key-requestor-api"
    spans = [s for scope in resource.scope_spans for s in scope.spans]
    assert [s.name for s in spans] == ["GET /api/models"]
    assert spans[0].trace_id.hex() == trace_id
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any(line["logger"].startswith("uvicorn") for line in lines), output


async def test_the_worker_process_logs_json_and_serves_metrics(
    settings, temporal_client, kube, litellm, mail, worker
):
    """worker.py as deployed, configured by the environment only, on a task queue of its own."""
    queue, metrics_port = f"telemetry-process-{uuid.uuid4().hex[:8]}", free_port()
    env = {
        **os.environ,
        "TEMPORAL_ADDRESS": settings.temporal_address,
        "TEMPORAL_TASK_QUEUE": queue,
        "KUBECONFIG": str(kube.kubeconfig),
        "KUBERNETES_NAMESPACE": settings.namespace,
        "LITELLM_BASE_URL": litellm.url,
        "LITELLM_API_KEY": litellm.master_key,
        "SMTP_HOST": mail.host,
        "SMTP_PORT": str(mail.port),
        "SMTP_USE_TLS": "false",
        "APPROVAL_QUEUE_INTERVAL": "24h",
        "LOG_FORMAT": "json",
        "METRICS_PORT": str(metrics_port),
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable, "worker.py", cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    email = unique_email("example.com")  # config.yaml: example.com + gpt-4o-mini is approved
    request_id = request_id_for(email, "gpt-4o-mini", settings.request_id_key.get_secret_value())
    try:
        await metric_reaches(url, "temporal_num_pollers", 1, task_queue=queue)
        request = KeyRequest(request_id, email, "gpt-4o-mini", "2026-12-01T00:00:00Z")
        await start_key_request(temporal_client, queue, request)
        await mail_to(mail, email)
        await metric_reaches(url, "llm_key_requests_decided_total", 1, source="policy")
    finally:
        process.terminate()
        output = (await asyncio.wait_for(process.communicate(), 60))[0].decode()
        # The worker pointed the one reconcile Schedule at its task queue; give it back.
        await ensure_reconcile_schedule(temporal_client, settings)
    lines = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any(line["message"].startswith("worker ready") for line in lines)
    (minted,) = [line for line in lines if line.get("event") == "key.minted"]
    assert minted["request_id"] == request_id
    assert minted["workflow_id"] == workflow_id(request_id)
    assert email not in output
    assert not [k["key"] for k in litellm.keys() if k.get("key") and k["key"] in output]


async def test_a_replay_counts_nothing():
    """Workflow metrics go through the replay-safe meter: replaying a recorded history (as a
    worker does after losing its cache) records no request a second time."""
    port = free_port()
    runtime = process_runtime(port)
    # The same meter outside a workflow does record: the endpoint would show a count.
    runtime.metric_meter.create_counter("replay_test_control_total").add(1)
    replayer = Replayer(workflows=[KeyRequestWorkflow], runtime=runtime)
    history = Path(__file__).parent / "histories" / "policy-approved.json"
    await replayer.replay_workflow(WorkflowHistory.from_json("replayed", history.read_text()))
    found = samples(f"http://127.0.0.1:{port}/metrics")
    assert value(found, "replay_test_control_total") == 1
    for name in (
        "llm_key_requests_started_total",
        "llm_key_requests_decided_total",
        "llm_key_request_email_seconds_count",
    ):
        assert value(found, name) == 0, name
