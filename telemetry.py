"""What the API and the worker tell their operators: logs, metrics and traces, set up here.

- Logs: plain text by default; `LOG_FORMAT=json` gives one JSON object per line, with the request
  and workflow ids and the trace id wherever they are known. Audit events (audit.py) come out as
  one object carrying their fields.
- Metrics: each process serves Prometheus text on METRICS_PORT (0 = none) through the Temporal
  SDK runtime's own exporter. The SDK's metrics (`temporal_*`) and the service's (`llm_key_*`,
  recorded through the SDK's metric meters by workflows/metrics.py, activities/metrics.py and
  api/metrics.py) share that one endpoint, so a process has one port to scrape, not two.
- Traces: OpenTelemetry, exported by OTLP when OTEL_EXPORTER_OTLP_ENDPOINT is set. Otherwise
  nothing is set up at all: no SDK tracer provider, no interceptor, no instrumentation.

Process-wide pieces (the root logger, the global tracer provider, the Prometheus listener) are
set up once by `start()`, called by each process's entry point; tests build `Telemetry` with
what they exercise.
"""

from __future__ import annotations

import json
import logging
import os
import sys
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

from domain import WORKFLOW_ID_PREFIX, request_id_from_workflow_id
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
