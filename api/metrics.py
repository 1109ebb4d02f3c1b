"""The API's own metrics: submissions, and requests with their latency by route.

Recorded through the API runtime's meter (telemetry.py serves it on METRICS_PORT).
"""

from __future__ import annotations

import time

from temporalio.common import MetricMeter


def count_submission(meter: MetricMeter, model: str, outcome: str) -> None:
    """A POST /api/request-key that was accepted, by what it did (api/service.py's outcomes:
    started, restarted, renewing, current, pending, adopted)."""
    meter.create_counter(
        "llm_key_api_submissions_total", "Key requests submitted to the API, by model and outcome"
    ).add(1, {"model": model, "outcome": outcome})


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
