"""What the API and the worker tell their operators: logs, metrics and traces, set up here.

- Logs: plain text by default; `LOG_FORMAT=json` gives one JSON object per line, with the request
  and workflow ids and the trace id wherever they are known. Audit events (audit.py) come out as
  one object carrying their fields.
- Metrics: each process serves Prometheus text on METRICS_PORT (0 = none) through the Temporal
  SDK runtime's own exporter. The SDK's metrics (`temporal_*`) and the service's (`llm_key_*`,
  recorded through the SDK's metric meters: workflows/metrics.py for workflow code, the
  activity interceptor and the Secret census here for the worker, api/ for the API) share that
  one endpoint, so a process has one port to scrape, not two.
- Traces: OpenTelemetry, exported by OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set. Otherwise
  nothing is set up at all: no SDK tracer provider, no interceptor, no instrumentation.

Process-wide pieces (the root logger, the global tracer provider, the Prometheus listener) are
set up once by `start()`, called by each process's entry point; tests build `Telemetry` with
what they exercise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import quote

from opentelemetry import trace
from temporalio import activity
from temporalio.common import MetricMeter
from temporalio.runtime import (
    LogForwardingConfig,
    LoggingConfig,
    PrometheusConfig,
    Runtime,
    TelemetryConfig,
)
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)

from domain import (
    ANNOTATION_PREFIX,
    COMPONENT,
    COMPONENT_LABEL,
    STATE_LABEL,
    WORKFLOW_ID_PREFIX,
    request_id_from_workflow_id,
)
from settings import Settings

log = logging.getLogger(__name__)

# ---- logs ---------------------------------------------------------------------------------

_PLAIN = "%(asctime)s %(levelname)s %(name)s %(message)s"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, ids, trace id, and an audit
    event's fields. Other `extra` attributes are left out: nobody checked them for secrets."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict = {
            "time": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(_ids(record))
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            out["trace_id"] = format(span.trace_id, "032x")
            out["span_id"] = format(span.span_id, "016x")
        audit = getattr(record, "audit", None)
        if isinstance(audit, Mapping):
            # An event's fields never replace the line's own time, level, logger or message.
            out.update({k: v for k, v in audit.items() if k not in out or k == "request_id"})
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _ids(record: logging.LogRecord) -> dict:
    """request_id and workflow_id: from the record, else from the Temporal context it ran in."""
    details = getattr(record, "temporal_activity", None) or getattr(
        record, "temporal_workflow", None
    )
    wf_id = getattr(record, "workflow_id", None) or (details or {}).get("workflow_id")
    if wf_id is None and activity.in_activity():
        wf_id = activity.info().workflow_id
    audit = getattr(record, "audit", None) or {}
    request_id = getattr(record, "request_id", None) or audit.get("request_id")
    if request_id is None and wf_id and wf_id.startswith(WORKFLOW_ID_PREFIX):
        request_id = request_id_from_workflow_id(wf_id)
    ids = {}
    if request_id:
        ids["request_id"] = request_id
    if wf_id:
        ids["workflow_id"] = wf_id
    return ids


def configure_logging(log_format: str) -> None:
    """The process's root logger, in the chosen format; uvicorn's loggers go through it too."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if log_format == "json" else logging.Formatter(_PLAIN))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    if log_format == "json":
        # uvicorn installs its own plain-text handlers; let its records reach ours instead.
        for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
            uvicorn_log = logging.getLogger(name)
            uvicorn_log.handlers.clear()
            uvicorn_log.propagate = True


# ---- metrics ------------------------------------------------------------------------------

# Buckets, in seconds, of the service's duration histograms: a decision by policy takes well
# under a second, a human's hours to days (approval.deadline is 7 days by default).
WAIT_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 86400, 3 * 86400, 7 * 86400)
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
HISTOGRAM_BUCKETS = {
    "llm_key_request_decision_seconds": WAIT_BUCKETS,
    "llm_key_request_email_seconds": WAIT_BUCKETS,
    "llm_key_api_request_seconds": HTTP_BUCKETS,
}


def process_runtime(metrics_port: int) -> Runtime:
    """The Temporal runtime of a process: with a port, every metric of the process served there.

    Core's own log lines (connection trouble, say) go through Python logging, so LOG_FORMAT
    applies to them as well instead of Core printing its own format to stderr.
    """
    metrics = None
    if metrics_port:
        metrics = PrometheusConfig(
            bind_address=f"0.0.0.0:{metrics_port}",
            # Seconds, as Prometheus expects, for the SDK's latencies too.
            durations_as_seconds=True,
            histogram_bucket_overrides={k: list(v) for k, v in HISTOGRAM_BUCKETS.items()},
        )
    return Runtime(
        telemetry=TelemetryConfig(
            logging=LoggingConfig(
                filter=LoggingConfig.default.filter,
                forwarding=LogForwardingConfig(logger=logging.getLogger("temporalio.core")),
            ),
            metrics=metrics,
            # Every series would otherwise carry service_name="temporal-core-sdk".
            attach_service_name=False,
        )
    )


# Activity types whose failures are counted by cause, and the metric each goes to.
_FAILURE_METRICS = {
    "mint_key": "llm_key_mint_failures_total",
    "notify_requester": "llm_key_email_failures_total",
}


class _FailureCounter(ActivityInboundInterceptor):
    def __init__(self, next: ActivityInboundInterceptor, counters: dict) -> None:
        super().__init__(next)
        self.counters = counters

    async def execute_activity(self, input: ExecuteActivityInput):
        try:
            return await super().execute_activity(input)
        except Exception as exc:
            counter = self.counters.get(activity.info().activity_type)
            if counter is not None:
                # The exception's class is the cause: a small fixed set (LiteLLMUnavailable,
                # KeyRejected, MailUnavailable, ...), never a message that could hold an email.
                counter.add(1, {"cause": type(exc).__name__})
            raise


class FailureMetrics(Interceptor):
    """Counts failed attempts of minting and emailing, per cause (retries included)."""

    def __init__(self, meter: MetricMeter) -> None:
        self.counters = {
            activity_type: meter.create_counter(name, "Failed attempts, by the exception")
            for activity_type, name in _FAILURE_METRICS.items()
        }
        # Alerts use increase(), which misses a series' first sample: start the causes they
        # watch at zero.
        self.counters["mint_key"].add(0, {"cause": "KeyRejected"})
        self.counters["notify_requester"].add(0, {"cause": "MailUnavailable"})

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _FailureCounter(next, self.counters)


# The Secret census: how many request Secrets there are, per state. Secrets are the system of
# record (one per request, whatever Temporal's retention dropped), so this is the count an
# operator sees with kubectl. One listing of every request Secret per run: a minute between runs
# keeps that at a few calls a second even at tens of thousands of Secrets.
CENSUS_EVERY = 60.0
_CENSUS_PAGE = 500


async def census(store, meter, settings: Settings) -> None:
    """Count the request Secrets per state once; the gauges keep the last count."""
    counts: dict[str, int] = {}
    oldest_pending: float | None = None
    token = None
    while True:
        page = await store.list_page(f"{COMPONENT_LABEL}={COMPONENT}", _CENSUS_PAGE, token)
        for secret in page.items:
            state = (secret.metadata.labels or {}).get(STATE_LABEL, "unknown")
            counts[state] = counts.get(state, 0) + 1
            if state == "pending":
                moment = _requested_at(secret)
                oldest_pending = moment if oldest_pending is None else min(oldest_pending, moment)
        token = page.continue_token
        if not token:
            break
    secrets_gauge = meter.create_gauge(
        "llm_key_request_secrets", "Request Secrets in the namespace, by request-state label"
    )
    for state in sorted({*counts, "pending", "approved", "denied", "expired", "failed"}):
        secrets_gauge.set(counts.get(state, 0), {"state": state})
    meter.create_gauge(
        "llm_key_request_oldest_pending_timestamp_seconds",
        "Creation time of the oldest pending request Secret (now when none is pending)",
    ).set(int(oldest_pending or time.time()))
    meter.create_gauge(
        "llm_key_request_approval_deadline_seconds", "approval.deadline: how long a request waits"
    ).set(int(settings.approval_deadline.total_seconds()))
    meter.create_gauge(
        "llm_key_reconcile_interval_seconds", "APPROVAL_QUEUE_INTERVAL: reconciler period"
    ).set(int(settings.approval_queue_interval.total_seconds()))


def _requested_at(secret) -> float:
    """When the request was made: its annotation (a resubmission reuses the Secret), else the
    Secret's creation."""
    value = (secret.metadata.annotations or {}).get(ANNOTATION_PREFIX + "requested-at", "")
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        created = secret.metadata.creation_timestamp
        return created.timestamp() if created else time.time()


async def run_census(store, meter, settings: Settings) -> None:
    """The census every CENSUS_EVERY seconds until cancelled; a failed run is logged and
    retried."""
    while True:
        try:
            await census(store, meter, settings)
        except Exception as exc:  # metrics never take the worker down
            log.warning("Secret census failed (%s); the gauges keep the last count", exc)
        await asyncio.sleep(CENSUS_EVERY)


def count_submission(meter: MetricMeter, model: str, started: bool) -> None:
    """A POST /api/request-key that was accepted: a new request, or the live one returned."""
    meter.create_counter(
        "llm_key_api_submissions_total", "Key requests submitted to the API, by model and outcome"
    ).add(1, {"model": model, "outcome": "started" if started else "existing"})


class HttpMetrics:
    """ASGI middleware: API requests and their latency, by route template, method and status.

    The route template (`/api/requests/{request_id}`), never the path, so no id is a label.
    """

    def __init__(self, app, meter: MetricMeter) -> None:
        self.app = app
        self.requests = meter.create_counter("llm_key_api_requests_total", "API requests answered")
        self.latency = meter.create_histogram_float(
            "llm_key_api_request_seconds", "Time to answer an API request", "s"
        )

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        status = 500

        async def sending(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            labels = {"route": route, "method": scope["method"]}
            self.requests.add(1, {**labels, "status": str(status)})
            self.latency.record(time.perf_counter() - started, labels)


# ---- Temporal Web UI ----------------------------------------------------------------------


def web_ui_url(settings: Settings, wf_id: str) -> str | None:
    """The Web UI's list of the request's runs (every submission of it), if TEMPORAL_UI_URL."""
    if not settings.temporal_ui_url:
        return None
    query = quote(f'WorkflowId="{wf_id}"', safe="")
    namespace = quote(settings.temporal_namespace, safe="")
    return f"{settings.temporal_ui_url.rstrip('/')}/namespaces/{namespace}/workflows?query={query}"


# ---- traces -------------------------------------------------------------------------------


def start_tracing(service: str, endpoint: str, exporter=None) -> bool:
    """Install the global tracer provider: OTLP to `endpoint`, or `exporter` (tests).

    Without either, nothing is installed, and OpenTelemetry's API stays a no-op.
    """
    if not endpoint and exporter is None:
        return False
    # The SDK is imported only here: a process without tracing never loads it.
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    name = os.environ.get("OTEL_SERVICE_NAME") or service
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        otlp = OTLPSpanExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
        provider.add_span_processor(BatchSpanProcessor(otlp))
    trace.set_tracer_provider(provider)
    return True


@dataclass
class Telemetry:
    """What one process exports; `Telemetry()` exports nothing."""

    runtime: Runtime | None = None  # the Temporal runtime (process_runtime); None: the SDK's
    tracing: bool = False

    @property
    def meter(self) -> MetricMeter:
        """Where this process's own metrics go (nowhere without METRICS_PORT)."""
        return self.runtime.metric_meter if self.runtime is not None else MetricMeter.noop

    @property
    def interceptors(self) -> list:
        """Temporal client interceptors (workers built on the client inherit them)."""
        if not self.tracing:
            return []
        from temporalio.contrib.opentelemetry import TracingInterceptor

        return [TracingInterceptor()]

    def instrument_app(self, app) -> None:
        if self.tracing:
            from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

            # One span per request; the ASGI receive/send sub-spans only add noise and cost.
            FastAPIInstrumentor.instrument_app(
                app, excluded_urls="health", exclude_spans=["receive", "send"]
            )

    def instrument_http(self, client) -> None:
        if self.tracing:
            from opentelemetry.instrumentation.httpx import HTTPXClientInstrumentor

            HTTPXClientInstrumentor.instrument_client(client)


def start(settings: Settings, service: str) -> Telemetry:
    """Set up this process's logs, traces and metrics endpoint; once, at its start."""
    configure_logging(settings.log_format)
    tracing = start_tracing(service, settings.otel_exporter_otlp_endpoint)
    return Telemetry(runtime=process_runtime(settings.metrics_port), tracing=tracing)
