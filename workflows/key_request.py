"""One key request, from submission to the requester's inbox.

Deterministic: every side effect is an activity, and the configuration is read by activities,
so a worker restarted with a new config.yaml never changes the path of a running request.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

from workflows import metrics

with workflow.unsafe.imports_passed_through():
    from activities.key_request import KeyRequestActivities
    from domain import (
        QUERY_STATUS,
        SA_MODEL,
        SA_STATE,
        SIGNAL_APPROVE,
        SIGNAL_DENY,
        UPDATE_DECIDE,
        Decision,
        FinalState,
        KeyRequest,
        RequestState,
        RequestStatus,
        Review,
    )

# Kubernetes and the mail server get retried until they answer: a request waits out an outage
# instead of failing. Only an answer that can never change (an invalid object, LiteLLM refusing
# the key) ends the retries.
#
# Two timeouts per attempt, for two different failures. start_to_close bounds an attempt whose
# worker is alive but stuck; it must cover the slowest legitimate attempt (minting may make two
# LiteLLM calls of up to LITELLM_TIMEOUT each, 30 s by default), so it is long. A worker that
# dies (OOM-killed, node lost) reports nothing, and Temporal would only retry its activity when
# start_to_close runs out: the request would stall for up to 2 minutes. The activities heartbeat
# every few seconds (activities/key_request.py, `heartbeating`), so heartbeat_timeout notices a
# dead worker within seconds and the retry runs on another one. Every activity is idempotent, so
# a retry beside a live-but-slow attempt is harmless.
HEARTBEAT = timedelta(seconds=10)
# Kubernetes calls and the policy: quick, and retried until they answer.
SHORT_CALLS = dict(
    start_to_close_timeout=timedelta(seconds=30),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(
        maximum_interval=timedelta(seconds=30), non_retryable_error_types=["KubernetesRejected"]
    ),
)
MINTING = dict(
    start_to_close_timeout=timedelta(minutes=2),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(
        maximum_interval=timedelta(minutes=1),
        non_retryable_error_types=["KeyRejected", "KubernetesRejected"],
    ),
)
EMAIL = dict(
    start_to_close_timeout=timedelta(minutes=2),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(
        maximum_interval=timedelta(minutes=5), non_retryable_error_types=["KubernetesRejected"]
    ),
)


@workflow.defn
class KeyRequestWorkflow:
    @workflow.init
    def __init__(self, request: KeyRequest) -> None:
        # Built here, not in run(): a signal delivered with the start (signal-with-start, or
        # simply sent at once) is handled before run() begins.
        self._status = RequestStatus(
            request.request_id, RequestState.PENDING, request.model, request.requested_at
        )
        self._decision: Decision | None = None
        self._expired = False

    @workflow.run
    async def run(self, request: KeyRequest) -> FinalState:
        self._set_state(RequestState.PENDING)

        recorded = await workflow.execute_activity_method(
            KeyRequestActivities.record_request, request, **SHORT_CALLS
        )
        if recorded.state is RequestState.APPROVED and recorded.key_minted:
            # Resumed after the key was minted: only the email may still be owed.
            self._decide(recorded.decision or Decision(approved=True, source="record"))
            self._set_state(RequestState.APPROVED)
            await self._notify(request)
            return self._final(request)
        if recorded.decision is not None:
            self._decide(recorded.decision)

        decision = await self._decision_for(request)
        if decision is None:
            return await self._close(
                request, RequestState.EXPIRED, "No decision was made before the deadline."
            )
        if not decision.approved:
            return await self._close(request, RequestState.DENIED, decision.reason)

        try:
            minted = await workflow.execute_activity_method(
                KeyRequestActivities.mint_key, args=[request, decision], **MINTING
            )
        except ActivityError as err:
            cause = err.cause.message if isinstance(err.cause, ApplicationError) else str(err)
            return await self._close(request, RequestState.FAILED, cause)
        self._status.key_expires = minted.expires
        self._set_state(RequestState.APPROVED)
        await self._notify(request)
        return self._final(request)

    async def _decision_for(self, request: KeyRequest) -> Decision | None:
        """The policy's decision, or a human's before the deadline; None if none came."""
        if self._decision is not None:
            return self._decision
        outcome = await workflow.execute_activity_method(
            KeyRequestActivities.evaluate_policy, request, **SHORT_CALLS
        )
        if self._decision is None and outcome.decision != "manual":
            self._decide(
                Decision(
                    approved=outcome.decision == "approve",
                    reviewer=f"policy:{outcome.rule}",
                    reason=outcome.reason,
                    source="policy",
                )
            )
        if self._decision is None:
            deadline = timedelta(seconds=outcome.wait_seconds)
            self._status.deadline = _iso(workflow.now() + deadline)
            try:
                await workflow.wait_condition(lambda: self._decision is not None, timeout=deadline)
            except TimeoutError:
                self._expired = True  # from here on, a late decision is refused
                return None
        return self._decision

    async def _close(self, request: KeyRequest, state: RequestState, reason: str) -> FinalState:
        self._status.reason = reason
        await workflow.execute_activity_method(
            KeyRequestActivities.close_request,
            FinalState(request.request_id, state, reason, self._decision),
            **SHORT_CALLS,
        )
        self._set_state(state)
        await self._notify(request)
        return self._final(request)

    async def _notify(self, request: KeyRequest) -> None:
        await workflow.execute_activity_method(
            KeyRequestActivities.notify_requester, request.request_id, **EMAIL
        )
        metrics.emailed(self._status)

    # Decisions from people: signals (CLI, reconciler relaying kubectl) and the admin API's update.

    @workflow.signal(name=SIGNAL_APPROVE)
    def approve(self, review: Review | None = None) -> None:
        self._on_review(True, review or Review(), "signal")

    @workflow.signal(name=SIGNAL_DENY)
    def deny(self, review: Review | None = None) -> None:
        self._on_review(False, review or Review(), "signal")

    @workflow.update(name=UPDATE_DECIDE)
    def decide(self, decision: Decision) -> RequestStatus:
        self._on_review(decision.approved, Review(decision.reviewer, decision.reason), "api")
        return self._status

    @decide.validator
    def _validate_decide(self, decision: Decision) -> None:
        if self._closed_to_decisions():
            raise ApplicationError(
                f"request already {self._closed_to_decisions()}", type="AlreadyDecided"
            )

    @workflow.query(name=QUERY_STATUS)
    def status(self) -> RequestStatus:
        return self._status

    def _closed_to_decisions(self) -> str:
        """What the request already is, if a decision can no longer change it."""
        if self._decision is not None:
            return "approved" if self._decision.approved else "denied"
        return "expired" if self._expired else ""

    def _on_review(self, approved: bool, review: Review, source: str) -> None:
        if self._closed_to_decisions():
            workflow.logger.info(
                "ignoring %s from %r: request already %s",
                "approval" if approved else "denial",
                review.reviewer,
                self._closed_to_decisions(),
            )
            return
        self._decide(Decision(approved, review.reviewer, review.reason, source))

    def _decide(self, decision: Decision) -> None:
        if not decision.decided_at:
            decision.decided_at = _iso(workflow.now())
        self._decision = decision
        self._status.decided_at = decision.decided_at
        self._status.reviewer = decision.reviewer
        self._status.reason = decision.reason
        self._status.decision_source = decision.source

    def _set_state(self, state: RequestState) -> None:
        self._status.state = state
        self._status.updated_at = _iso(workflow.now())
        metrics.state_entered(self._status, self._decision)
        # Every start by the API or the reconciler sets these attributes. A start without them
        # (a namespace where they were never created) must still run the request: upserting an
        # unknown attribute would fail every workflow task.
        if workflow.info().typed_search_attributes.get(SA_STATE) is not None:
            workflow.upsert_search_attributes(
                [SA_STATE.value_set(state.value), SA_MODEL.value_set(self._status.model)]
            )

    def _final(self, request: KeyRequest) -> FinalState:
        status = self._status
        return FinalState(request.request_id, status.state, status.reason, self._decision)


def _iso(moment) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")
