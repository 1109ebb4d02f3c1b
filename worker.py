"""The Temporal worker: runs the request and reconcile workflows and all their activities.

    python worker.py

Configuration comes from config.yaml and the environment (README, "Configuration").
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from contextlib import AsyncExitStack
from datetime import timedelta

import httpx
from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)
from temporalio.service import RPCError
from temporalio.worker import UnsandboxedWorkflowRunner, Worker

from activities.email import Mailer
from activities.key_request import KeyRequestActivities
from activities.kubernetes import SecretStore, secrets_api
from activities.litellm import LiteLLMClient
from activities.metrics import FailureMetrics, run_census
from activities.notify import NotifyActivities
from activities.reconcile import ReconcileActivities
from activities.transient import LogTransientFailures
from connection import connect_temporal, ensure_search_attributes, tls_context
from domain import RECONCILE_SCHEDULE_ID, ReconcilePage
from settings import ConfigError, Settings, load_settings
from telemetry import Telemetry
from telemetry import start as start_telemetry
from worker_health import serve_health
from workflows.key_request import EMAIL, MINTING, KeyRequestWorkflow
from workflows.reconcile import ReconcileWorkflow

log = logging.getLogger("worker")


def build_activities(
    settings: Settings, store: SecretStore, http: httpx.AsyncClient, client: Client
) -> list:
    litellm = LiteLLMClient(http, settings.litellm_api_key.get_secret_value())
    mailer = Mailer(
        host=settings.smtp_host,
        port=settings.smtp_port,
        sender=settings.smtp_from,
        user=settings.smtp_user,
        password=settings.smtp_password.get_secret_value(),
        use_tls=settings.smtp_use_tls,
        timeout=settings.smtp_timeout.total_seconds(),
        tls_context=tls_context(settings.smtp_ca_file),
    )
    requests = KeyRequestActivities(settings, store, litellm, mailer)
    reconcile = ReconcileActivities(settings, store, client)
    notify = NotifyActivities(settings, store, mailer, http)
    return [
        requests.record_request,
        requests.evaluate_policy,
        requests.mint_key,
        requests.close_request,
        requests.notify_requester,
        requests.plan_key_life,
        requests.tell_holder,
        requests.end_key,
        requests.extend_key,
        requests.rotate_key,
        requests.delete_old_key,
        requests.delete_request,
        reconcile.reconcile_page,
        notify.email_approvers,
        notify.post_to_webhook,
        notify.record_approvals,
    ]


def _reconcile_action(settings: Settings) -> ScheduleActionStartWorkflow:
    return ScheduleActionStartWorkflow(
        ReconcileWorkflow.run,
        ReconcilePage(),
        id=RECONCILE_SCHEDULE_ID,
        task_queue=settings.temporal_task_queue,
    )


def _align_schedule(schedule: Schedule, settings: Settings) -> list[str]:
    """Bring the fields a worker owns in line with `settings`; say what changed.

    A worker owns the interval (APPROVAL_QUEUE_INTERVAL) and the action (which workflow, on
    which task queue). Everything else is the operators': paused or not and its note, the
    policies, jitter, and a spec they gave calendars or cron expressions (then the timing is
    theirs too). Fields are written only when they differ, so workers of one configuration
    never write at all, and during a rollout the Schedule changes once, when the first new
    worker starts. (An old worker that restarts before the rollout ends sets its interval back
    until the next new worker starts; every change is logged with both values.)
    """
    changes = []
    spec, every = schedule.spec, settings.approval_queue_interval
    if not spec.calendars and not spec.cron_expressions:
        current = [interval.every for interval in spec.intervals]
        if current != [every]:
            spec.intervals = [ScheduleIntervalSpec(every=every)]
            changes.append(f"interval {', '.join(map(str, current)) or 'none'} -> {every}")
    action, ours = schedule.action, _reconcile_action(settings)
    if not (
        isinstance(action, ScheduleActionStartWorkflow)
        and (action.workflow, action.id, action.task_queue)
        == (ours.workflow, ours.id, ours.task_queue)
    ):
        schedule.action = ours
        changes.append(f"action -> {ours.workflow} on task queue {ours.task_queue}")
    return changes


def check_activity_timeouts(settings: Settings) -> None:
    """Refuse settings under which every activity attempt would time out.

    The activities' start-to-close timeouts (workflows/key_request.py) are part of the workflow
    code, so they cannot follow the settings; one attempt must fit in them instead: an email is
    one SMTP conversation, minting or renewing at most two LiteLLM calls.
    """
    problems = []
    email = EMAIL["start_to_close_timeout"]
    if settings.smtp_timeout >= email:
        problems.append(
            f"smtp.timeout (env SMTP_TIMEOUT): {int(settings.smtp_timeout.total_seconds())}s "
            f"must be shorter than the email activity's {int(email.total_seconds())}s"
        )
    minting = MINTING["start_to_close_timeout"]
    if 2 * settings.litellm_timeout >= minting:
        problems.append(
            "litellm.timeout (env LITELLM_TIMEOUT): "
            f"{int(settings.litellm_timeout.total_seconds())}s must be under half the minting "
            f"activity's {int(minting.total_seconds())}s "
            "(an attempt makes up to two calls)"
        )
    if problems:
        raise ConfigError("invalid configuration:\n" + "\n".join(f"  {p}" for p in problems))


async def ensure_reconcile_schedule(client: Client, settings: Settings) -> None:
    """Create the reconciler's Schedule, or update the fields a worker owns (_align_schedule).

    Every worker does this at start; the fixed id makes it one Schedule however many start.
    """
    schedule = Schedule(
        action=_reconcile_action(settings),
        spec=ScheduleSpec(intervals=[ScheduleIntervalSpec(every=settings.approval_queue_interval)]),
        # A run still going when the next is due makes the next one pointless.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )
    changes: list[str] = []

    def align(current: ScheduleUpdateInput) -> ScheduleUpdate | None:
        # Edits the Schedule as it is now, so an operator's pause or policy survives.
        changes[:] = _align_schedule(current.description.schedule, settings)
        return ScheduleUpdate(schedule=current.description.schedule) if changes else None

    try:
        try:
            await client.create_schedule(RECONCILE_SCHEDULE_ID, schedule)
            log.info("created schedule %s", RECONCILE_SCHEDULE_ID)
        except ScheduleAlreadyRunningError:
            await client.get_schedule_handle(RECONCILE_SCHEDULE_ID).update(align)
            if changes:
                log.info("updated schedule %s: %s", RECONCILE_SCHEDULE_ID, "; ".join(changes))
    except RPCError as exc:
        # Requests still flow without it; only the repair of stray Secrets waits.
        log.error(
            "could not create or update schedule %s (%s); stray pending Secrets are not "
            "reconciled until a worker can",
            RECONCILE_SCHEDULE_ID,
            exc.message,
        )


def litellm_http(settings: Settings) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        base_url=settings.litellm_base_url,
        timeout=settings.litellm_timeout.total_seconds(),
        verify=tls_context(),
    )


async def run_worker(
    settings: Settings,
    client: Client,
    store: SecretStore,
    stop: asyncio.Event,
    telemetry: Telemetry | None = None,
) -> None:
    """Serve the task queue until `stop` is set, then finish in-flight tasks and return.

    `telemetry` is what `client` was connected with (its runtime, its tracing).
    """
    telemetry = telemetry or Telemetry()
    await ensure_search_attributes(client)
    await ensure_reconcile_schedule(client, settings)
    async with AsyncExitStack() as stack:
        http = await stack.enter_async_context(litellm_http(settings))
        telemetry.instrument_http(http)
        if settings.metrics_port:
            census = asyncio.create_task(run_census(store, telemetry.meter, settings))
            stack.callback(census.cancel)
        worker = Worker(
            client,
            task_queue=settings.temporal_task_queue,
            workflows=[KeyRequestWorkflow, ReconcileWorkflow],
            activities=build_activities(settings, store, http, client),
            # On SIGTERM, running activities get this long to finish before they are cancelled
            # (and retried elsewhere); every one of ours is idempotent either way.
            graceful_shutdown_timeout=timedelta(seconds=30),
            # The SDK's sandbox re-imports the workflow's module for every workflow it starts or
            # replays and keeps that copy for as long as the workflow is cached: it cost over a
            # third of this worker's CPU per request and of its memory (BENCHMARKS.md). Its guard
            # against non-deterministic calls still runs where it can stop a bad change: the
            # replay tests run every recorded history of every path in the sandbox.
            workflow_runner=UnsandboxedWorkflowRunner(),
            max_cached_workflows=settings.worker_max_cached_workflows,
            interceptors=[LogTransientFailures(), FailureMetrics(telemetry.meter)],
        )
        async with worker, serve_health(settings, client, worker):
            log.info(
                "worker ready on %s, namespace %s, task queue %s; Kubernetes namespace %s",
                settings.temporal_address,
                settings.temporal_namespace,
                settings.temporal_task_queue,
                store.namespace,
            )
            await stop.wait()
            log.info("stopping: finishing in-flight tasks")


async def main() -> int:
    try:
        settings = load_settings()
        settings.check_secrets("litellm_api_key")
        check_activity_timeouts(settings)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    telemetry = start_telemetry(settings, "llm-key-requestor-worker")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client = await connect_temporal(settings, telemetry=telemetry)
    store = SecretStore(secrets_api(), settings.namespace)
    await run_worker(settings, client, store, stop, telemetry)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
