"""The worker's own metrics outside workflow code: failed attempts and the Secret census.

Recorded through the worker runtime's meter (telemetry.py serves it on METRICS_PORT). Labels
never carry an email, a request id or a key. Metric names are part of the alert rules'
contract (deploy/monitoring): add, never rename.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime

from temporalio import activity
from temporalio.common import MetricMeter
from temporalio.worker import ActivityInboundInterceptor, ExecuteActivityInput, Interceptor

from domain import ANNOTATION_PREFIX, COMPONENT, COMPONENT_LABEL, STATE_LABEL
from settings import Settings

log = logging.getLogger(__name__)

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
