"""The reconciler's work on one page of Secrets: compare with Temporal, act on the difference.

One activity call handles a whole page. Temporal is asked through visibility, never one describe
per Secret: once per run for every running request workflow still pending (streamed, and kept
by the worker for the run's next pages), then, per page, only about the Secrets whose workflow
was not among them. Pending requests have running workflows, so a run costs one listing of them plus
the Secret pages, and grows linearly with the Secrets.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

from kubernetes import client as k8s
from temporalio import activity
from temporalio.client import Client, WorkflowExecution, WorkflowExecutionStatus

from activities.key_request import (
    EMAIL,
    JUSTIFICATION,
    MODEL,
    REQUESTED_AT,
    decision_of,
    now_iso,
    recorded_state,
    set_state,
)
from activities.kubernetes import SecretStore
from connection import start_key_request
from domain import (
    API_KEY_DATA,
    COMPONENT,
    COMPONENT_LABEL,
    KEY_REQUEST_WORKFLOW,
    RECORDED_STATE_LABEL,
    SA_STATE,
    SECRET_PREFIX,
    SIGNAL_APPROVE,
    SIGNAL_DENY,
    SIGNAL_REVOKE,
    STATE_LABEL,
    KeyRequest,
    ReconcileCounts,
    ReconcilePage,
    ReconcilePageResult,
    RequestState,
    Review,
    Revocation,
    workflow_id,
)
from settings import Settings

log = logging.getLogger(__name__)

SELECTORS = {
    # Requests this service recorded as pending, whatever kubectl has done to request-state.
    "pending": f"{COMPONENT_LABEL}={COMPONENT},{RECORDED_STATE_LABEL}=pending",
    # Requests written by the older polling service, which never set recorded-state: pending
    # ones, and approved ones (relabelled by hand, or already served by it: see _reconcile).
    "legacy": f"{COMPONENT_LABEL}={COMPONENT},!{RECORDED_STATE_LABEL},"
    f"{STATE_LABEL} in (pending,approved)",
    # Live keys relabelled `request-state=revoked` with kubectl: the revocation is relayed.
    "revoked": (
        f"{COMPONENT_LABEL}={COMPONENT},{RECORDED_STATE_LABEL}=approved,{STATE_LABEL}=revoked"
    ),
}
# Annotation names the polling service may have used for the same facts.
LEGACY_EMAIL = ("email", "user-email", "requester-email")
LEGACY_MODEL = ("llm", "model", "llm-model")
_CONCURRENCY = 16
# A request-state set with kubectl, and the signal that relays it.
SIGNALS = {"approved": SIGNAL_APPROVE, "denied": SIGNAL_DENY, "revoked": SIGNAL_REVOKE}


@dataclass(frozen=True)
class _Run:
    """What the reconciler needs of a request's latest workflow run."""

    running: bool
    completed: bool
    state: str | None  # its KeyRequestState search attribute
    close_time: datetime | None = None

    @classmethod
    def of(cls, run: WorkflowExecution) -> _Run:
        return cls(
            running=run.status == WorkflowExecutionStatus.RUNNING,
            completed=run.status == WorkflowExecutionStatus.COMPLETED,
            state=run.typed_search_attributes.get(SA_STATE),
            close_time=run.close_time,
        )


def _first(annotations: dict, names: tuple[str, ...]) -> str:
    return next((annotations[n] for n in names if annotations.get(n)), "")


def _parse_time(value: str) -> datetime | None:
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


class ReconcileActivities:
    def __init__(self, settings: Settings, store: SecretStore, temporal: Client) -> None:
        self.settings = settings
        self.store = store
        self.temporal = temporal
        # The running request workflows, as listed at the start of one reconcile run: (that
        # run's id, {workflow id: run}). Pages of the same run that land on this worker reuse it.
        self._running: tuple[str, dict[str, _Run]] | None = None

    @activity.defn
    async def reconcile_page(self, page: ReconcilePage) -> ReconcilePageResult:
        selector = SELECTORS[page.phase]
        # An expired continue token (a run that continued as new, or waited out an outage) is
        # handled in list_page: it goes on from where the server says, or lists again.
        listing = await self.store.list_page(selector, page.page_size, page.continue_token)
        activity.heartbeat()
        counts = ReconcileCounts(scanned=len(listing.items), pages=1)
        runs = await self._runs_of(listing.items)
        limit = asyncio.Semaphore(_CONCURRENCY)

        async def one(secret: k8s.V1Secret) -> str:
            async with limit:
                request_id = secret.metadata.name.removeprefix(SECRET_PREFIX)
                outcome = await self._reconcile(secret, runs.get(workflow_id(request_id)))
            # Per Secret, not per page: a page of slow calls is not mistaken for a dead worker.
            activity.heartbeat()
            return outcome

        for outcome in await asyncio.gather(*(one(s) for s in listing.items)):
            setattr(counts, outcome, getattr(counts, outcome) + 1)
        return ReconcilePageResult(counts, listing.continue_token)

    async def _runs_of(self, secrets: list[k8s.V1Secret]) -> dict[str, _Run]:
        """Each request's running workflow run, else its latest closed run.

        Running ones come from the run's listing (a workflow that ended since is taken for
        running until the next reconcile run, which then acts on it); the others are asked
        about by id, so a workflow started since the listing is never started twice.
        """
        if not secrets:
            return {}
        running = await self._running_now()
        ids = [workflow_id(s.metadata.name.removeprefix(SECRET_PREFIX)) for s in secrets]
        runs = {i: running[i] for i in ids if i in running}
        rest = [i for i in ids if i not in running]
        if rest:
            quoted = ", ".join(f"'{i}'" for i in rest)
            latest: dict[str, WorkflowExecution] = {}
            async for run in self.temporal.list_workflows(
                f"WorkflowType = '{KEY_REQUEST_WORKFLOW}' AND WorkflowId IN ({quoted})"
            ):
                known = latest.get(run.id)
                if known is None or _rank(run) > _rank(known):
                    latest[run.id] = run
            runs.update({i: _Run.of(run) for i, run in latest.items()})
        return runs

    async def _running_now(self) -> dict[str, _Run]:
        """Every running request workflow still pending, listed once per reconcile run (per
        worker). Pending ones only: a live key's workflow runs for months, and the few Secrets
        whose workflow is past pending are asked about by id."""
        this_run = activity.info().workflow_run_id or ""
        if self._running is not None and self._running[0] == this_run:
            return self._running[1]
        running: dict[str, _Run] = {}
        async for run in self.temporal.list_workflows(
            f"WorkflowType = '{KEY_REQUEST_WORKFLOW}' AND ExecutionStatus = 'Running' "
            f"AND {SA_STATE.name} = 'pending'"
        ):
            running[run.id] = _Run.of(run)
            if len(running) % 1000 == 0:
                activity.heartbeat()
        self._running = (this_run, running)
        return running

    async def _reconcile(self, secret: k8s.V1Secret, run: _Run | None) -> str:
        running = run is not None and run.running
        labels = secret.metadata.labels or {}
        annotations = secret.metadata.annotations or {}
        relabelled = labels.get(STATE_LABEL) in ("approved", "denied") and not decision_of(secret)

        if RECORDED_STATE_LABEL not in labels and labels.get(STATE_LABEL) == "approved":
            if (secret.data or {}).get(API_KEY_DATA):
                # The older service minted and sent this key: ours to keep from now on.
                await self._adopt(secret.metadata.name)
                return "adopted"
            # Relabelled approved with kubectl before the cut-over, never served: fall through
            # and relay the approval like any kubectl decision.
        if relabelled or labels.get(STATE_LABEL) == "revoked":
            await self._start(secret, signal=labels[STATE_LABEL])
            return "relayed"
        if running:
            # Past its decision, the workflow now waits on the key's timers or the clean-up;
            # a Secret still saying pending is brought in line.
            state = run.state
            if state and state != "pending" and recorded_state(secret) is RequestState.PENDING:
                await self._correct(secret.metadata.name, RequestState(state))
                return "corrected"
            return "in_flight"
        if run is not None and run.completed:
            final = run.state
            requested = _parse_time(annotations.get(REQUESTED_AT, ""))
            # Only if that run served this Secret's request, not an earlier one.
            if final and final != "pending" and (requested is None or run.close_time >= requested):
                await self._correct(secret.metadata.name, RequestState(final))
                return "corrected"
        return await self._start(secret)

    async def _start(self, secret: k8s.V1Secret, signal: str | None = None) -> str:
        """Start the request's workflow again, or signal the running one (never a duplicate)."""
        annotations = secret.metadata.annotations or {}
        email = annotations.get(EMAIL) or _first(annotations, LEGACY_EMAIL)
        model = annotations.get(MODEL) or _first(annotations, LEGACY_MODEL)
        if not email or not model:
            log.warning("secret %s has no email or model annotation; cannot resume it",
                        secret.metadata.name)  # fmt: skip
            return "skipped"
        request_id = secret.metadata.name.removeprefix(SECRET_PREFIX)
        created = secret.metadata.creation_timestamp
        requested_at = annotations.get(REQUESTED_AT) or (
            created.isoformat().replace("+00:00", "Z") if created else now_iso()
        )
        review = Review(reviewer="kubectl", reason=annotations.get("llm-key-requestor/reason", ""))
        if signal == "revoked":
            review = Revocation("kubectl", "Revoked by an operator with kubectl.", "kubectl")
        await start_key_request(
            self.temporal,
            self.settings.temporal_task_queue,
            KeyRequest(request_id, email, model, requested_at, annotations.get(JUSTIFICATION, "")),
            signal=SIGNALS.get(signal or ""),
            review=review,
        )
        return "resumed"

    async def _adopt(self, name: str) -> None:
        """Mark a served legacy Secret as recorded, so that no listing selects it again."""

        def mark(secret: k8s.V1Secret) -> bool:
            labels = dict(secret.metadata.labels or {})
            if RECORDED_STATE_LABEL in labels or labels.get(STATE_LABEL) != "approved":
                return False
            secret.metadata.labels = {**labels, RECORDED_STATE_LABEL: "approved"}
            return True

        await self.store.update(name, mark)

    async def _correct(self, name: str, state: RequestState) -> None:
        def align(secret: k8s.V1Secret) -> bool:
            if recorded_state(secret) is not RequestState.PENDING:
                return False
            set_state(secret, state)
            return True

        await self.store.update(name, align)


def _rank(run: WorkflowExecution) -> tuple:
    return (run.status == WorkflowExecutionStatus.RUNNING, run.start_time)
