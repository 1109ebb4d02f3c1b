"""One key request, from submission to the requester's inbox.

Deterministic: every side effect is an activity, and the configuration is read by activities,
so a worker restarted with a new config.yaml never changes the path of a running request.
"""

from __future__ import annotations

import asyncio
import math
from datetime import datetime, timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import (
    ActivityError,
    ApplicationError,
    CancelledError,
    FailureError,
    RetryState,
)

from workflows import metrics

with workflow.unsafe.imports_passed_through():
    from activities.key_request import KeyRequestActivities
    from activities.notify import NotifyActivities
    from domain import (
        DECLARED_PREFIX,
        PATCH_APPROVER_NOTIFICATIONS,
        PATCH_FEWER_COMMANDS,
        PATCH_KEY_LIFECYCLE,
        PATCH_LOCAL_DELIVERY,
        PATCH_MAIL_REJECTED,
        PATCH_SECRET_MISSING,
        QUERY_STATUS,
        SA_MODEL,
        SA_STATE,
        SIGNAL_APPROVE,
        SIGNAL_DENY,
        SIGNAL_REVOKE,
        SIGNAL_ROTATE,
        UPDATE_DECIDE,
        UPDATE_RESUBMIT,
        UPDATE_REVOKE,
        UPDATE_ROTATE,
        ApproverNotice,
        Decision,
        FinalState,
        HolderNotice,
        KeyEnd,
        KeyLife,
        KeyRequest,
        LifecyclePlan,
        PolicyOutcome,
        RecordedRequest,
        RequestState,
        RequestStatus,
        Resubmission,
        ResubmitAnswer,
        Review,
        Revocation,
        RotationOrder,
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
# A request whose Secret vanishes (deleted by hand) is recorded again; this many times at most.
SECRET_LOSSES = 3
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
# Steps that run as local activities, inside the workflow task at hand, so that they need no
# trip through the server: since PATCH_FEWER_COMMANDS a new request's first record_request, and
# since PATCH_LOCAL_DELIVERY minting and the requester's emails too. A policy-approved request
# then goes from its start to its key's timers in one workflow task. Each is idempotent
# (record_request creates or adopts the Secret; mint_key stores the key it will mint before
# LiteLLM sees it; an email is marked sent in the Secret, and a resend keeps its Message-ID), so
# a worker that dies meanwhile only means that the next one runs them again.
# A local activity's retries hold its workflow task open, so it gets a few quick attempts and
# then the regular activity takes over, whose retries wait in the server. The bound is the
# number of attempts: the SDK (temporalio 1.35) does not end a local activity's retries at its
# schedule_to_close_timeout.
LOCALLY = dict(
    start_to_close_timeout=timedelta(seconds=30),
    retry_policy=RetryPolicy(maximum_interval=timedelta(seconds=4), maximum_attempts=4),
)
# Telling people a request waits: a few attempts within a bounded time, then the workflow logs
# the failure and goes on. A decision never waits for a notification.
NOTIFY = dict(
    start_to_close_timeout=timedelta(seconds=60),
    schedule_to_close_timeout=timedelta(minutes=15),
    heartbeat_timeout=HEARTBEAT,
    retry_policy=RetryPolicy(
        maximum_attempts=5,
        maximum_interval=timedelta(minutes=2),
        non_retryable_error_types=["WebhookRejected", "RequestGone"],
    ),
)


@workflow.defn
class KeyRequestWorkflow:
    @workflow.init
    def __init__(self, request: KeyRequest) -> None:
        # Built here, not in run(): a signal delivered with the start (signal-with-start, or
        # simply sent at once) is handled before run() begins.
        self._status = RequestStatus(
            request.request_id,
            RequestState.PENDING,
            request.model,
            request.requested_at,
            email=request.email,
            justification=request.justification,
        )
        self._decision: Decision | None = None
        self._expired = False
        # The key's life (after the first email). Orders from signals and updates wait here
        # until the main loop acts on them.
        if request.life is not None:
            self._status = request.life.status
            self._decision = Decision(True, self._status.reviewer, self._status.reason)
        self._life = request.life or KeyLife(self._status)
        self._plan: LifecyclePlan | None = None
        self._key_alias = ""
        self._revocation: Revocation | None = None
        self._rotation: RotationOrder | None = None
        self._renewal: Resubmission | None = None  # asked for, not yet acted on
        self._renewing = False
        self._resubmitted: Resubmission | None = None  # a finished request asked for again
        self._published: dict = {}
        # States this run has counted in the metrics: a run that carries a live key over (a
        # renewal's continue-as-new) has counted its approval already.
        self._counted: set[RequestState] = set()
        if request.life is not None:
            self._counted = {RequestState.PENDING, RequestState.APPROVED}
        # Approvals so far (identities), and how many the rule needs: 1 until the policy says.
        self._approvals: list[Review] = []
        self._needed = 1
        self._telling: list[asyncio.Task] = []  # notifications under way while people decide
        # Set in run(): workflow.patched(PATCH_LOCAL_DELIVERY), and PATCH_FEWER_COMMANDS.
        self._local_delivery = False
        self._fewer_commands = False

    @workflow.run
    async def run(self, request: KeyRequest) -> FinalState:
        # Asked once, first: a run started before a change keeps the commands it began with. A
        # run past the newest patch began with every older one, so it records no marker (and no
        # TemporalChangeVersion upsert) for them.
        self._local_delivery = workflow.patched(PATCH_LOCAL_DELIVERY)
        self._fewer_commands = self._local_delivery or workflow.patched(PATCH_FEWER_COMMANDS)
        if request.life is not None:
            # Continued as new after a renewal: the key lives on, with a fresh history.
            return await self._live(request)
        self._set_state(RequestState.PENDING)

        recorded = await self._record_first(request)
        if recorded.state is RequestState.APPROVED and recorded.key_minted:
            # Resumed after the key was minted: only the email may still be owed.
            self._decide(recorded.decision or Decision(approved=True, source="record"))
            self._set_state(RequestState.APPROVED)
            delivered = await self._delivered(request, recorded.key_alias)
            if delivered == "sent":
                if self._patched(PATCH_KEY_LIFECYCLE):
                    return await self._live(request)
                return self._final(request)
            if delivered == "rejected":
                return await self._undeliverable(request)
            # The Secret vanished with the key: a new key, for the decision already made.
        elif recorded.decision is not None:
            self._decide(recorded.decision)

        policy = recorded.policy if self._fewer_commands else None
        decision = await self._decision_for(request, policy=policy)
        if decision is None:
            return await self._close(
                request, RequestState.EXPIRED, "No decision was made before the deadline."
            )
        if not decision.approved:
            return await self._close(request, RequestState.DENIED, decision.reason)

        for _ in range(SECRET_LOSSES):
            try:
                minted = await self._step(
                    KeyRequestActivities.mint_key,
                    [request, decision],
                    MINTING,
                    LOCALLY if self._local_delivery else None,
                )
            except ActivityError as err:
                if self._secret_lost(err):
                    await self._record_again(request)
                    continue
                cause = err.cause.message if isinstance(err.cause, ApplicationError) else str(err)
                return await self._close(request, RequestState.FAILED, cause)
            self._status.key_expires = minted.expires
            self._set_state(RequestState.APPROVED)
            delivered = await self._delivered(request, minted.key_alias)
            if delivered == "sent":
                if self._patched(PATCH_KEY_LIFECYCLE):
                    plan = minted.plan if self._fewer_commands else None
                    return await self._live(request, plan)
                return self._final(request)
            if delivered == "rejected":
                return await self._undeliverable(request)
        reason = "The request's Kubernetes Secret kept disappearing; no key could be delivered."
        return await self._close(request, RequestState.FAILED, reason)

    async def _delivered(self, request: KeyRequest, alias: str) -> str:
        """Email the key: sent; rejected (the mail server refused it for good); or lost (the
        Secret, the key's only copy, vanished first). Either way a key nobody will get is
        deleted in LiteLLM, never orphaned; a lost request is recorded again."""
        try:
            if await self._notify(request):
                return "sent"
            outcome = "rejected"
        except ActivityError as err:
            if not self._secret_lost(err):
                raise
            outcome = "lost"
        if alias:
            await workflow.execute_activity_method(
                KeyRequestActivities.delete_old_key, args=[request.request_id, alias], **SHORT_CALLS
            )
        if outcome == "lost":
            await self._record_again(request)
        return outcome

    async def _undeliverable(self, request: KeyRequest) -> FinalState:
        reason = (
            "The key could not be emailed and was deleted: "
            f"{self._status.notification_failed}. Check the address and submit again."
        )
        return await self._close(request, RequestState.FAILED, reason)

    def _secret_lost(self, err: ActivityError) -> bool:
        cause = err.cause
        return (
            isinstance(cause, ApplicationError)
            and cause.type == "SecretMissing"
            and self._patched(PATCH_SECRET_MISSING)
        )

    async def _record_first(self, request: KeyRequest) -> RecordedRequest:
        return await self._step(
            KeyRequestActivities.record_request,
            [request],
            SHORT_CALLS,
            LOCALLY if self._fewer_commands else None,
        )

    async def _step(self, activity, args: list, regular: dict, local: dict | None = None):
        """Run `activity` with `regular`'s options; first as a local activity with `local`'s, if
        given. The regular activity takes over when the local one did not succeed."""
        if local is not None:
            try:
                return await workflow.execute_local_activity_method(activity, args=args, **local)
            except FailureError as err:
                if isinstance(err, CancelledError):
                    raise
                cause = err.cause if isinstance(err, ActivityError) else err
                if isinstance(cause, ApplicationError) and cause.non_retryable:
                    if isinstance(err, ActivityError):
                        raise
                    # A local activity's failure comes bare; shaped as a regular activity's, it
                    # meets the same handlers.
                    raise ActivityError(
                        f"{activity.__name__} failed",
                        scheduled_event_id=0,
                        started_event_id=0,
                        identity="",
                        activity_type=activity.__name__,
                        activity_id="",
                        retry_state=RetryState.NON_RETRYABLE_FAILURE,
                    ) from cause
                workflow.logger.warning("%s failed locally (%s); retrying as a regular activity",
                                        activity.__name__, cause)  # fmt: skip
        return await workflow.execute_activity_method(activity, args=args, **regular)

    async def _record_again(self, request: KeyRequest) -> None:
        workflow.logger.warning(
            "request %s lost its Secret; recording it again", request.request_id
        )
        await workflow.execute_activity_method(
            KeyRequestActivities.record_request, request, **SHORT_CALLS
        )

    async def _decision_for(
        self,
        request: KeyRequest,
        until: datetime | None = None,
        revocable: bool = False,
        policy: PolicyOutcome | None = None,
    ) -> Decision | None:
        """The policy's decision (`policy` if evaluated already), or a human's before the
        deadline (or `until`, if sooner); None if none came, or if `revocable` and a revocation
        came first."""
        if self._decision is not None:
            return self._decision
        outcome = policy or await workflow.execute_activity_method(
            KeyRequestActivities.evaluate_policy, request, **SHORT_CALLS
        )
        self._needed = self._status.approvals_needed = outcome.approvals
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
            if until is not None:
                deadline = max(min(deadline, until - workflow.now()), timedelta(seconds=1))
            self._show_details()
            if self._patched(PATCH_APPROVER_NOTIFICATIONS):
                return await self._wait_for_people(request, outcome.remind_seconds,
                                                   outcome.escalate_seconds, deadline,
                                                   revocable)  # fmt: skip
            try:
                await workflow.wait_condition(
                    lambda: self._decision is not None or (revocable and self._revocation),
                    timeout=deadline,
                )
            except TimeoutError:
                self._expired = True  # from here on, a late decision is refused
                return None
        return self._decision

    # Waiting for people (PRODUCT.md, "People"). Runs only in workflows that passed
    # workflow.patched(PATCH_APPROVER_NOTIFICATIONS): requests already waiting when it landed
    # keep their single timer.

    async def _wait_for_people(
        self,
        request: KeyRequest,
        remind: int,
        escalate: int,
        wait: timedelta,
        revocable: bool = False,
    ) -> Decision | None:
        """Tell the approvers and the requester, remind, escalate, and record each approval,
        until a decision or the deadline (None); also None if `revocable` and a revocation
        came first (a renewal waiting for people, on a key that is revoked meanwhile)."""

        def revoked() -> bool:
            return revocable and self._revocation is not None

        start = workflow.now()
        due = start + wait
        recorded = await self._record_approvals(request)
        self._tell_people(request, "acknowledgement")
        self._tell_people(request, "waiting")
        timers = sorted(
            (start + timedelta(seconds=after), kind)
            for kind, after in (("reminder", remind), ("escalation", escalate))
            if after and start + timedelta(seconds=after) < due
        )
        while self._decision is None and not revoked():
            now = workflow.now()
            if self._approvals != recorded:
                recorded = await self._record_approvals(request)
            elif timers and timers[0][0] <= now:
                self._tell_people(request, timers.pop(0)[1])
            elif now >= due:
                self._expired = True  # from here on, a late decision is refused
                break
            else:
                wake = min([due, *(at for at, _ in timers[:1])])
                try:
                    await workflow.wait_condition(
                        lambda n=recorded: (
                            self._decision is not None or self._approvals != n or revoked()
                        ),
                        timeout=wake - now,
                    )
                except TimeoutError:
                    pass
        for task in self._telling:
            task.cancel()  # decided or expired: nobody needs telling any more
        self._telling = []
        if self._decision is not None and self._approvals != recorded:
            await self._record_approvals(request)
        return self._decision

    def _notice(self, request: KeyRequest, kind: str) -> ApproverNotice:
        return ApproverNotice(
            request.request_id, kind, request.cycle, self._status.deadline,
            [a.reviewer for a in self._approvals], self._needed,
        )  # fmt: skip

    async def _record_approvals(self, request: KeyRequest) -> list[Review]:
        approvals = list(self._approvals)
        await workflow.execute_activity_method(
            NotifyActivities.record_approvals, self._notice(request, "approvals"), **SHORT_CALLS
        )
        return approvals

    def _tell_people(self, request: KeyRequest, kind: str) -> None:
        """Start a notification without waiting for it; a failure is logged, never raised."""
        notice = self._notice(request, kind)
        self._telling.append(asyncio.create_task(self._send(NotifyActivities.email_approvers,
                                                            notice)))  # fmt: skip
        if kind != "acknowledgement":
            self._telling.append(
                asyncio.create_task(self._send(NotifyActivities.post_to_webhook, notice))
            )

    async def _send(self, activity, notice: ApproverNotice) -> None:
        try:
            await workflow.execute_activity_method(activity, notice, **NOTIFY)
        except ActivityError as err:
            cause = err.cause.message if isinstance(err.cause, ApplicationError) else str(err)
            workflow.logger.warning("request %s: %s (%s) not sent, the request goes on: %s",
                                    notice.request_id, notice.kind, activity.__name__,
                                    cause)  # fmt: skip

    async def _close(self, request: KeyRequest, state: RequestState, reason: str) -> FinalState:
        self._status.reason = reason
        for _ in range(SECRET_LOSSES):
            try:
                await workflow.execute_activity_method(
                    KeyRequestActivities.close_request,
                    FinalState(request.request_id, state, reason, self._decision),
                    **SHORT_CALLS,
                )
                self._set_state(state)
                await self._notify(request)
                break
            except ActivityError as err:
                if not self._secret_lost(err):
                    raise
                await self._record_again(request)
        if self._patched(PATCH_KEY_LIFECYCLE):
            return await self._retain(request)
        return self._final(request)

    async def _notify(self, request: KeyRequest) -> bool:
        """Email the requester; False if the mail server refused it for good."""
        try:
            await self._step(
                KeyRequestActivities.notify_requester,
                [request.request_id],
                EMAIL,
                LOCALLY if self._local_delivery else None,
            )
        except ActivityError as err:
            if not self._mail_rejected(err):
                raise
            return False
        metrics.emailed(self._status)
        return True

    def _mail_rejected(self, err: ActivityError) -> bool:
        """A 5xx refusal (activities/email.py): recorded in the status, never retried."""
        cause = err.cause
        if not (
            isinstance(cause, ApplicationError)
            and cause.type == "MailRejected"
            and self._patched(PATCH_MAIL_REJECTED)
        ):
            return False
        self._status.notification_failed = cause.message
        return True

    # A key's life after the first email (PRODUCT.md, "A key's life"). Everything below runs only
    # in workflows that passed workflow.patched(PATCH_KEY_LIFECYCLE): histories recorded before
    # it replay unchanged.

    async def _live(self, request: KeyRequest, plan: LifecyclePlan | None = None) -> FinalState:
        """Wait on the key's timers (reminders, expiry, a rotated-out key's grace) and act on
        revocation, rotation and renewal, until the key ends. `plan`: as minting left it."""
        plan = plan or await workflow.execute_activity_method(
            KeyRequestActivities.plan_key_life, request.request_id, **SHORT_CALLS
        )
        self._plan = plan
        self._key_alias = plan.key_alias
        status = self._status
        status.key_expires = plan.key_expires or status.key_expires
        status.cycle = plan.cycle
        self._set_state(RequestState.APPROVED)
        expires = _parse(status.key_expires)
        # Points already past when this cycle began are not sent late.
        reminders = [
            p for p in plan.remind_before
            if expires is not None and expires - timedelta(seconds=p) > workflow.now()
        ]  # fmt: skip
        while True:
            expires = _parse(status.key_expires)
            status.next_reminder = (
                _iso(expires - timedelta(seconds=reminders[0])) if reminders and expires else ""
            )
            now = workflow.now()
            if self._revocation is not None:
                order = self._revocation
                status.revoked_at, status.revoked_by = _iso(now), order.reviewer
                status.revocation_reason = order.reason
                return await self._end_key(request, RequestState.REVOKED, order)
            if self._rotation is not None:
                await self._rotate(request)
                continue
            if self._renewal is not None and not self._renewing:
                outcome = await self._renew(request)
                if outcome == "gone":
                    reason = "The key no longer exists in LiteLLM; it is replaced by a new one."
                    return await self._end_key(
                        request, RequestState.KEY_EXPIRED, Revocation("", reason, "timer")
                    )
                if outcome == "extended":
                    await workflow.wait_condition(workflow.all_handlers_finished)
                    workflow.continue_as_new(
                        KeyRequest(
                            request.request_id,
                            request.email,
                            request.model,
                            status.requested_at,
                            request.justification,
                            cycle=status.cycle,
                            life=KeyLife(
                                status, self._life.old_key_alias, self._life.old_key_delete_at
                            ),
                        )
                    )
                continue
            old_due = _parse(self._life.old_key_delete_at)
            if self._life.old_key_alias and old_due is not None and old_due <= now:
                await self._delete_old_key(request)
                continue
            if expires is not None and expires <= now:
                reason = "The key reached its expiry date."
                return await self._end_key(
                    request, RequestState.KEY_EXPIRED, Revocation("", reason, "timer")
                )
            if reminders and expires - timedelta(seconds=reminders[0]) <= now:
                point = reminders.pop(0)
                await self._tell(request, "reminder", _span(point))
                metrics.reminded(request.model)
                continue
            wakes = [t for t in (expires, old_due if self._life.old_key_alias else None) if t]
            if reminders and expires is not None:
                wakes.append(expires - timedelta(seconds=reminders[0]))
            timeout = min(wakes) - now if wakes else None
            self._publish()
            try:
                await workflow.wait_condition(self._has_order, timeout=timeout)
            except TimeoutError:
                pass

    def _publish(self) -> None:
        """The key's life in the workflow's memo, which the admin list reads from visibility
        (no query per row). Written only when it changed; never an email or a key."""
        status = self._status
        memo = {
            "key_expires": status.key_expires or "",
            "next_reminder": status.next_reminder,
            "cycle": status.cycle,
            "revoked_at": status.revoked_at,
            "revoked_by": status.revoked_by,
            "revocation_reason": status.revocation_reason,
            "rotated_at": status.rotated_at,
            "cleanup_at": status.cleanup_at,
        }
        if memo != self._published:
            workflow.upsert_memo(memo)
            self._published = memo

    def _has_order(self) -> bool:
        return (
            self._revocation is not None
            or self._rotation is not None
            or (self._renewal is not None and not self._renewing)
        )

    async def _renew(self, request: KeyRequest) -> str:
        """Through the policy again: extended (the cycle is over), kept (not renewed, the key
        lives on) or gone (LiteLLM lost the key: it is replaced in a new cycle)."""
        asked = self._renewal
        status = self._status
        self._renewing = True
        renewal = KeyRequest(
            request.request_id, request.email, request.model, asked.requested_at,
            request.justification, cycle=status.cycle + 1, renewal=True,
        )  # fmt: skip
        granted = self._decision
        self._decision, self._expired = None, False
        self._approvals, self._status.approvals = [], []
        expires = _parse(status.key_expires)
        decision = await self._decision_for(renewal, until=expires, revocable=True)
        self._renewal, self._renewing = None, False
        if self._revocation is not None:  # revoked while the renewal waited: that wins
            self._decision, self._expired, self._status.deadline = granted, False, ""
            return "kept"
        if decision is None and expires is not None and workflow.now() >= expires:
            # The key expired while a person was still to decide: the renewal goes on as a
            # new cycle (the key is replaced once approved).
            self._decision, self._expired = granted, False
            self._resubmitted = Resubmission(asked.requested_at)
            return "kept"
        if decision is None or not decision.approved:
            reason = decision.reason if decision else "No decision was made before the deadline."
            self._decision, self._expired = granted, False
            self._status.deadline = ""
            await self._tell(request, "renewal-denied", reason)
            return "kept"
        extended = await workflow.execute_activity_method(
            KeyRequestActivities.extend_key, args=[renewal, decision], **MINTING
        )
        if extended is None:
            self._resubmitted = Resubmission(asked.requested_at)
            return "gone"
        status.key_expires = extended.expires
        status.cycle, status.requested_at, status.deadline = renewal.cycle, asked.requested_at, ""
        self._set_state(RequestState.APPROVED)
        metrics.renewed(request.model, "extended")
        await self._tell(request, "renewed")
        return "extended"

    async def _rotate(self, request: KeyRequest) -> None:
        order = self._rotation
        if self._life.old_key_alias:
            await self._delete_old_key(request)  # a key rotated out earlier goes now
        self._life.rotations += 1
        rotated = await workflow.execute_activity_method(
            KeyRequestActivities.rotate_key, args=[request, self._life.rotations], **MINTING
        )
        grace = order.grace_seconds
        if grace is None:
            grace = self._plan.rotation_grace
        now = workflow.now()
        self._key_alias = rotated.key_alias
        self._status.key_expires = rotated.key_expires
        self._status.rotated_at = _iso(now)
        self._life.old_key_alias = rotated.old_key_alias
        self._life.old_key_delete_at = _iso(now + timedelta(seconds=grace))
        self._rotation = None
        metrics.rotated(request.model, order.source)
        await self._tell(request, "rotated", str(self._life.rotations))

    async def _delete_old_key(self, request: KeyRequest) -> None:
        await workflow.execute_activity_method(
            KeyRequestActivities.delete_old_key,
            args=[request.request_id, self._life.old_key_alias],
            **SHORT_CALLS,
        )
        self._life.old_key_alias, self._life.old_key_delete_at = "", ""

    async def _end_key(
        self, request: KeyRequest, state: RequestState, order: Revocation
    ) -> FinalState:
        aliases = [a for a in (self._key_alias, self._life.old_key_alias) if a]
        await workflow.execute_activity_method(
            KeyRequestActivities.end_key,
            args=[KeyEnd(request.request_id, state, order.reason, order.reviewer, order.source),
                  aliases],
            **SHORT_CALLS,
        )  # fmt: skip
        self._life.old_key_alias, self._life.old_key_delete_at = "", ""
        self._status.reason = order.reason
        self._status.next_reminder = ""
        self._set_state(state)
        if state is RequestState.REVOKED:
            metrics.revoked(request.model, order.source)
        else:
            metrics.key_expired(request.model)
        await self._tell(request, state.value)
        return await self._retain(request)

    async def _retain(self, request: KeyRequest) -> FinalState:
        """A finished request keeps its Secret for lifecycle.retention, then deletes it; a
        submission meanwhile starts the request over as the next cycle."""
        if self._plan is None:
            self._plan = await workflow.execute_activity_method(
                KeyRequestActivities.plan_key_life, request.request_id, **SHORT_CALLS
            )
            self._status.cycle = self._plan.cycle
        retention = timedelta(seconds=self._plan.retention)
        self._status.cleanup_at = _iso(workflow.now() + retention)
        self._publish()
        try:
            await workflow.wait_condition(lambda: self._resubmitted is not None, timeout=retention)
        except TimeoutError:
            await workflow.execute_activity_method(
                KeyRequestActivities.delete_request,
                args=[request.request_id, self._status.cycle],
                **SHORT_CALLS,
            )
            self._status.cleanup_at = ""
            return self._final(request)
        again = self._resubmitted
        await workflow.wait_condition(workflow.all_handlers_finished)
        workflow.continue_as_new(
            KeyRequest(
                request.request_id, request.email, request.model, again.requested_at,
                again.justification, cycle=self._status.cycle + 1,
                renewal=self._status.state is RequestState.KEY_EXPIRED,
            )
        )  # fmt: skip

    async def _tell(self, request: KeyRequest, kind: str, detail: str = "") -> None:
        try:
            await workflow.execute_activity_method(
                KeyRequestActivities.tell_holder,
                HolderNotice(request.request_id, kind, self._status.cycle, detail),
                **EMAIL,
            )
        except ActivityError as err:
            # Refused for good: recorded (status, Secret); the key's life goes on.
            if not self._mail_rejected(err):
                raise

    def _in_renewal_window(self) -> bool:
        expires = _parse(self._status.key_expires)
        if expires is None:
            return False  # a key that never expires has nothing to renew
        points = self._plan.remind_before if self._plan is not None else []
        window = timedelta(seconds=max(points, default=0))
        return workflow.now() >= expires - window

    # Revocation, rotation and renewal: signals (CLI, the reconciler relaying kubectl) and the
    # admin API's updates, which answer (409 when there is no live key to act on).

    @workflow.signal(name=SIGNAL_REVOKE)
    def revoke(self, order: Revocation | None = None) -> None:
        order = order or Revocation()
        refusal = self._refuse_key_order("revoke")
        if refusal:
            workflow.logger.info("ignoring revoke from %r: %s", order.reviewer, refusal)
            return
        self._revocation = Revocation(order.reviewer, order.reason, order.source or "signal")

    @workflow.update(name=UPDATE_REVOKE)
    def revoke_key(self, order: Revocation) -> RequestStatus:
        self._revocation = order
        return self._status

    @revoke_key.validator
    def _validate_revoke(self, order: Revocation) -> None:
        refusal = self._refuse_key_order("revoke")
        if refusal:
            raise ApplicationError(refusal, type="NoLiveKey")

    @workflow.signal(name=SIGNAL_ROTATE)
    def rotate(self, order: RotationOrder | None = None) -> None:
        order = order or RotationOrder()
        refusal = self._refuse_key_order("rotate")
        if refusal:
            workflow.logger.info("ignoring rotate from %r: %s", order.reviewer, refusal)
            return
        self._rotation = RotationOrder(
            order.reviewer, order.grace_seconds, order.source or "signal"
        )

    @workflow.update(name=UPDATE_ROTATE)
    def rotate_key(self, order: RotationOrder) -> RequestStatus:
        self._rotation = order
        return self._status

    @rotate_key.validator
    def _validate_rotate(self, order: RotationOrder) -> None:
        refusal = self._refuse_key_order("rotate")
        if refusal:
            raise ApplicationError(refusal, type="NoLiveKey")

    def _refuse_key_order(self, what: str) -> str:
        """Why `what` cannot be done now; empty if it can."""
        state = self._status.state
        if self._revocation is not None:
            return "the key is already being revoked"
        if state is not RequestState.APPROVED:
            return f"request is {state.value}: there is no live key to {what}"
        if what == "rotate" and self._rotation is not None:
            return "a rotation is already under way"
        return ""

    @workflow.update(name=UPDATE_RESUBMIT)
    def resubmit(self, again: Resubmission) -> ResubmitAnswer:
        """The same email and model submitted again; the answer says what happens."""
        status = self._status
        if status.state is RequestState.PENDING or self._resubmitted is not None:
            return ResubmitAnswer("pending", status)
        if status.state is RequestState.APPROVED:
            if self._renewal is not None or self._renewing:
                return ResubmitAnswer("renewing", status)
            if self._revocation is not None or not self._in_renewal_window():
                return ResubmitAnswer("current", status)
            self._renewal = again
            return ResubmitAnswer("renewing", status)
        if status.state is RequestState.DENIED and again.resubmit_after_seconds:
            decided = _parse(status.decided_at) or workflow.now()
            left = decided + timedelta(seconds=again.resubmit_after_seconds) - workflow.now()
            if left.total_seconds() > 0:
                return ResubmitAnswer("cooldown", status, math.ceil(left.total_seconds()))
        self._resubmitted = again
        return ResubmitAnswer("restarted", status)

    # Decisions from people: signals (CLI, reconciler relaying kubectl) and the admin API's update.

    # Signals carry no authentication: whoever Temporal lets signal may send any name, so the
    # name is recorded as declared, never as an identity.

    @workflow.signal(name=SIGNAL_APPROVE)
    def approve(self, review: Review | None = None) -> None:
        self._on_review(True, _declared(review or Review()), "signal")

    @workflow.signal(name=SIGNAL_DENY)
    def deny(self, review: Review | None = None) -> None:
        self._on_review(False, _declared(review or Review()), "signal")

    @workflow.update(name=UPDATE_DECIDE)
    def decide(self, decision: Decision) -> RequestStatus:
        review = Review(decision.reviewer, decision.reason)
        self._on_review(decision.approved, review, decision.source or "api")
        return self._status

    @decide.validator
    def _validate_decide(self, decision: Decision) -> None:
        if self._closed_to_decisions():
            raise ApplicationError(
                f"request already {self._closed_to_decisions()}", type="AlreadyDecided"
            )
        # The API refuses this first; a second check here, where the requester is known for sure.
        requester = self._status.email.strip().lower()
        if requester and decision.reviewer.strip().lower() == requester:
            raise ApplicationError(
                "nobody may decide their own request", type="SelfApproval", non_retryable=True
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
        if not approved:
            self._decide(Decision(False, review.reviewer, review.reason, source))
            return
        # One denial denies; approvals add up to the rule's `approvals`, each person once.
        identity = review.reviewer.strip().lower()
        if any(a.reviewer.strip().lower() == identity for a in self._approvals):
            workflow.logger.info("ignoring a second approval from %r", review.reviewer)
            return
        self._approvals.append(review)
        self._status.approvals = [a.reviewer for a in self._approvals]
        if len(self._approvals) >= self._needed:
            approvals = self._status.approvals if self._needed > 1 else []
            self._decide(Decision(True, review.reviewer, review.reason, source, "", approvals))
        self._show_details()

    def _decide(self, decision: Decision) -> None:
        if not decision.decided_at:
            decision.decided_at = _iso(workflow.now())
        self._decision = decision
        self._status.decided_at = decision.decided_at
        self._status.reviewer = decision.reviewer
        self._status.reason = decision.reason
        self._status.decision_source = decision.source
        self._status.decision = "approved" if decision.approved else "denied"

    def _show_details(self) -> None:
        """What the Temporal Web UI shows on the workflow's page: never the email or the key."""
        status = self._status
        lines = [f"**{status.model}** key request: **{status.state.value}**"]
        if status.state is RequestState.PENDING:
            done = ", ".join(status.approvals) or "none yet"
            count = f"{len(status.approvals)} of {status.approvals_needed}"
            lines.append(f"Approvals: {done} ({count})")
            if status.deadline:
                lines.append(f"Deadline: {status.deadline}")
        elif status.decision:
            lines.append(f"Decision: {status.decision} by {status.reviewer}")
        if status.key_expires:
            lines.append(f"Key expires: {status.key_expires}")
        workflow.set_current_details("\n\n".join(lines))

    def _set_state(self, state: RequestState) -> None:
        self._status.state = state
        self._status.updated_at = _iso(workflow.now())
        if state not in self._counted:
            self._counted.add(state)
            metrics.state_entered(self._status, self._decision)
        self._show_details()
        # Every start by the API or the reconciler sets these attributes. A start without them
        # (a namespace where they were never created) must still run the request: upserting an
        # unknown attribute would fail every workflow task.
        shown = workflow.info().typed_search_attributes.get(SA_STATE)
        if shown is None:
            return
        if not self._fewer_commands:
            workflow.upsert_search_attributes(
                [SA_STATE.value_set(state.value), SA_MODEL.value_set(self._status.model)]
            )
        elif shown != state.value:
            # The model never changes and the start set it: only a new state is news.
            workflow.upsert_search_attributes([SA_STATE.value_set(state.value)])

    def _patched(self, patch: str) -> bool:
        """workflow.patched(patch) for a patch older than PATCH_FEWER_COMMANDS. A run that passed
        that one began with every older patch in the code, so it needs no marker (and no
        TemporalChangeVersion upsert) for them."""
        return self._fewer_commands or workflow.patched(patch)

    def _final(self, request: KeyRequest) -> FinalState:
        status = self._status
        return FinalState(request.request_id, status.state, status.reason, self._decision)


def _declared(review: Review) -> Review:
    name = review.reviewer.strip()
    if name and not name.startswith(DECLARED_PREFIX):
        name = DECLARED_PREFIX + name
    return Review(name, review.reason)


def _iso(moment) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _parse(value: str | None) -> datetime | None:
    """An ISO time from LiteLLM or our own status; naive times are UTC."""
    if not value:
        return None
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=workflow.now().tzinfo)


def _span(seconds: int) -> str:
    """7d, 12h, 30m or 45s: how config.yaml writes a reminder point."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"
