"""The key request's side effects, as Temporal activities.

Each activity is safe to run more than once: it reads the Secret first and only does what is
still missing. That, not luck, is what makes a crash at any point recoverable. The plaintext key
is generated here, kept in the Secret, and never returned to the workflow.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import logging
import secrets
from datetime import UTC, datetime

from kubernetes import client
from temporalio import activity
from temporalio.exceptions import ApplicationError

import audit
from activities.email import Mailer, MailRejected, Notice, compose, human_span
from activities.kubernetes import SecretStore
from activities.litellm import LiteLLMClient
from domain import (
    ANNOTATION_PREFIX,
    API_KEY_DATA,
    COMPONENT,
    COMPONENT_LABEL,
    RECORDED_STATE_LABEL,
    STATE_ANNOTATION,
    STATE_LABEL,
    Decision,
    FinalState,
    HolderNotice,
    KeyEnd,
    KeyRequest,
    LifecyclePlan,
    MintedKey,
    PolicyOutcome,
    RecordedRequest,
    RequestState,
    RotatedKey,
    secret_name,
    workflow_id,
)
from settings import Settings

log = logging.getLogger(__name__)


class SecretMissing(ApplicationError):
    """The request's Secret is gone (deleted by hand, or lost). Retrying cannot bring it back:
    the workflow records the request again and carries on."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"secret {name} is missing (deleted by hand?); the request is recorded again",
            type="SecretMissing",
            non_retryable=True,
        )


# How often a running activity tells Temporal its worker is alive; the workflow's
# heartbeat_timeout is a few times this (the SDK batches heartbeats to 80% of that timeout).
HEARTBEAT_EVERY = 2.0


def heartbeating(fn):
    """Heartbeat while the activity runs, so that a worker that dies mid-activity is noticed
    within the heartbeat timeout instead of after the whole start-to-close timeout.

    The first beat waits HEARTBEAT_EVERY: the heartbeat timeout counts from the activity's
    start, and most activities end well before that, so an immediate beat would only cost the
    server one more call per activity."""

    @functools.wraps(fn)
    async def run(*args, **kwargs):
        async def beat() -> None:
            while True:
                await asyncio.sleep(HEARTBEAT_EVERY)
                activity.heartbeat()

        beating = asyncio.create_task(beat())
        try:
            return await fn(*args, **kwargs)
        finally:
            beating.cancel()

    return run


def _a(name: str) -> str:
    return ANNOTATION_PREFIX + name


# Annotation names, as `kubectl describe secret` shows them.
EMAIL, MODEL, REQUESTED_AT, UPDATED_AT = (
    _a("email"),
    _a("model"),
    _a("requested-at"),
    _a("updated-at"),
)
WORKFLOW_ID = _a("workflow-id")
DECISION, DECISION_SOURCE, DECIDED_AT = _a("decision"), _a("decision-source"), _a("decided-at")
REVIEWER, REASON = _a("reviewer"), _a("reason")
KEY_ALIAS, KEY_EXPIRES = _a("key-alias"), _a("key-expires")
NOTIFIED = _a("notified")  # the state the requester was last emailed about
JUSTIFICATION = _a("justification")
DECISION_ANNOTATIONS = (DECISION, DECISION_SOURCE, DECIDED_AT, REVIEWER, REASON)
# A key's life: which cycle the request is in (1 = first submission), the last lifecycle email
# sent (so a retried activity does not send it twice), rotation and revocation records.
CYCLE, LAST_NOTICE = _a("cycle"), _a("last-notice")
ROTATION, NEXT_KEY_ALIAS, OLD_KEY_ALIAS = _a("rotation"), _a("next-key-alias"), _a("old-key-alias")
RENEWED_CYCLE, ENDED_BY, ENDED_AT = _a("renewed-cycle"), _a("ended-by"), _a("ended-at")
NOTIFY_FAILED = _a("notification-failed")  # the mail server refused an email for good
LIFE_ANNOTATIONS = (CYCLE, LAST_NOTICE, ROTATION, NEXT_KEY_ALIAS, OLD_KEY_ALIAS, RENEWED_CYCLE,
                    ENDED_BY, ENDED_AT, NOTIFY_FAILED)  # fmt: skip
# A rotation's new key, reserved here before LiteLLM sees it (the same pattern as minting).
NEXT_KEY_DATA = "api-key-next"


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def set_state(secret: client.V1Secret, state: RequestState) -> None:
    """The three places a state lives on the Secret, always written together."""
    secret.metadata.labels = {
        **(secret.metadata.labels or {}),
        STATE_LABEL: state.value,
        RECORDED_STATE_LABEL: state.value,
    }
    annotations = secret.metadata.annotations or {}
    annotations[STATE_ANNOTATION] = state.value
    annotations[UPDATED_AT] = now_iso()
    secret.metadata.annotations = annotations


def recorded_state(secret: client.V1Secret) -> RequestState:
    labels = secret.metadata.labels or {}
    return RequestState(labels.get(RECORDED_STATE_LABEL) or labels.get(STATE_LABEL, "pending"))


def decision_of(secret: client.V1Secret) -> Decision | None:
    annotations = secret.metadata.annotations or {}
    if annotations.get(DECISION) not in ("approved", "denied"):
        return None
    return Decision(
        approved=annotations[DECISION] == "approved",
        reviewer=annotations.get(REVIEWER, ""),
        reason=annotations.get(REASON, ""),
        source=annotations.get(DECISION_SOURCE, ""),
        decided_at=annotations.get(DECIDED_AT, ""),
    )


def _write_decision(secret: client.V1Secret, decision: Decision) -> None:
    secret.metadata.annotations.update(
        {
            DECISION: "approved" if decision.approved else "denied",
            DECISION_SOURCE: decision.source,
            DECIDED_AT: decision.decided_at or now_iso(),
            REVIEWER: decision.reviewer,
            REASON: decision.reason,
        }
    )


def _key_of(secret: client.V1Secret, field: str = API_KEY_DATA) -> str:
    raw = (secret.data or {}).get(field)
    return base64.b64decode(raw).decode() if raw else ""


def _encoded(key: str) -> str:
    return base64.b64encode(key.encode()).decode()


def cycle_of(secret: client.V1Secret) -> int:
    value = (secret.metadata.annotations or {}).get(CYCLE, "1")
    return int(value) if value.isdigit() else 1


def new_secret(request: KeyRequest) -> client.V1Secret:
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name=secret_name(request.request_id),
            labels={
                COMPONENT_LABEL: COMPONENT,
                "app.kubernetes.io/managed-by": "llm-key-requestor",
            },
            annotations={
                EMAIL: request.email,
                MODEL: request.model,
                REQUESTED_AT: request.requested_at,
                WORKFLOW_ID: workflow_id(request.request_id),
                **({JUSTIFICATION: request.justification} if request.justification else {}),
            },
        ),
        type="Opaque",
    )
    set_state(secret, RequestState.PENDING)
    return secret


class KeyRequestActivities:
    def __init__(
        self, settings: Settings, store: SecretStore, litellm: LiteLLMClient, mailer: Mailer
    ) -> None:
        self.settings = settings
        self.store = store
        self.litellm = litellm
        self.mailer = mailer

    @activity.defn
    @heartbeating
    async def record_request(self, request: KeyRequest) -> RecordedRequest:
        """Make sure the request's Secret exists, and say what it already records and what the
        policy decides (the workflow then needs no step of its own for the policy)."""
        recorded = await self._record(request)
        recorded.policy = self._policy(request)
        return recorded

    async def _record(self, request: KeyRequest) -> RecordedRequest:
        name = secret_name(request.request_id)
        if await self.store.create(new_secret(request)) is not None:
            return RecordedRequest(RequestState.PENDING)

        def adopt(secret: client.V1Secret) -> bool:
            fresh = new_secret(request)
            if recorded_state(secret).is_finished:
                # Finished (denied, expired, failed, revoked, key-expired) and asked for again:
                # the request starts over as the next cycle.
                cycle = max(request.cycle, cycle_of(secret) + 1)
                secret.metadata.labels = {**(secret.metadata.labels or {}), **fresh.metadata.labels}
                dropped = (*DECISION_ANNOTATIONS, NOTIFIED, KEY_ALIAS, KEY_EXPIRES)
                dropped += LIFE_ANNOTATIONS
                annotations = {
                    k: v for k, v in (secret.metadata.annotations or {}).items() if k not in dropped
                }
                secret.metadata.annotations = {
                    **annotations,
                    **fresh.metadata.annotations,
                    CYCLE: str(cycle),
                }
                secret.data = None
                return True
            # Live already. A Secret written by the polling service, or by hand, lacks some of
            # our labels and annotations: add them, leaving whatever it has.
            # (The client's models copy a dict on assignment: edit copies, then assign.)
            labels = dict(secret.metadata.labels or {})
            annotations = dict(secret.metadata.annotations or {})
            missing_labels = {k: v for k, v in fresh.metadata.labels.items() if k not in labels}
            missing_annotations = {
                k: v for k, v in fresh.metadata.annotations.items() if k not in annotations
            }
            state = recorded_state(secret).value
            for key in (RECORDED_STATE_LABEL, STATE_LABEL):
                if key in missing_labels:
                    missing_labels[key] = state
            if STATE_ANNOTATION in missing_annotations:
                missing_annotations[STATE_ANNOTATION] = state
            secret.metadata.labels = {**labels, **missing_labels}
            secret.metadata.annotations = {**annotations, **missing_annotations}
            return bool(missing_labels or missing_annotations)

        secret = await self.store.update(name, adopt)
        if secret is None:  # deleted between our create and read: try again from the top
            raise RuntimeError(f"secret {name} vanished while recording the request; retrying")
        state = recorded_state(secret)
        decision = decision_of(secret)
        labels = secret.metadata.labels or {}
        if state is RequestState.PENDING and decision is None:
            # Relabelled with kubectl while no workflow was watching: honour that decision.
            label_state = labels.get(STATE_LABEL)
            if label_state in ("approved", "denied"):
                decision = Decision(
                    approved=label_state == "approved", reviewer="kubectl", source="kubectl"
                )
        annotations = secret.metadata.annotations or {}
        return RecordedRequest(
            state=state,
            decision=decision,
            key_minted=bool(annotations.get(KEY_ALIAS)),
            key_alias=annotations.get(KEY_ALIAS, ""),
            notified=annotations.get(NOTIFIED) == state.value,
        )

    @activity.defn
    @heartbeating
    async def evaluate_policy(self, request: KeyRequest) -> PolicyOutcome:
        """Apply config.yaml's approval rules; read here so a restart picks up new rules."""
        return self._policy(request)

    def _policy(self, request: KeyRequest) -> PolicyOutcome:
        s = self.settings
        decision, reason, rule = s.decide(request.email, request.model, request.renewal)
        return PolicyOutcome(
            decision=decision,
            reason=reason,
            rule=rule,
            wait_seconds=int(s.approval_deadline.total_seconds()),
            approvals=s.approvals_for(request.email, request.model),
            remind_seconds=_whole_seconds(s.approval_remind_after),
            escalate_seconds=_whole_seconds(s.approval_escalate_after),
        )

    @activity.defn
    @heartbeating
    async def mint_key(self, request: KeyRequest, decision: Decision) -> MintedKey:
        """Record the approval, mint the key in LiteLLM exactly once, mark the Secret approved."""
        name = secret_name(request.request_id)

        def reserve(secret: client.V1Secret) -> bool:
            # The key is chosen before LiteLLM sees it and stored first, so every retry mints
            # the same key and a lost answer can be recognised by its alias.
            if _key_of(secret) and decision_of(secret):
                return False
            _write_decision(secret, decision)
            if not _key_of(secret):
                key = "sk-" + secrets.token_urlsafe(32)
                secret.data = {API_KEY_DATA: base64.b64encode(key.encode()).decode()}
            return True

        secret = await self.store.update(name, reserve)
        if secret is None:
            raise SecretMissing(name)
        annotations = secret.metadata.annotations
        if annotations.get(KEY_ALIAS) and recorded_state(secret) is RequestState.APPROVED:
            return MintedKey(annotations[KEY_ALIAS], annotations.get(KEY_EXPIRES) or None,
                             self._plan(secret))  # fmt: skip

        # The Secret's uid makes the alias unique to this Secret: a request whose Secret was
        # deleted and recreated gets a new key instead of colliding with the old alias. Later
        # cycles (a gone key replaced) add the cycle, so each cycle's key has its own alias.
        alias = f"{name}-{secret.metadata.uid[:8]}"
        if cycle_of(secret) > 1:
            alias += f"-c{cycle_of(secret)}"
        s = self.settings
        body = {
            "key_alias": alias,
            "models": [request.model],
            "user_id": request.email,
            "duration": _seconds(s.litellm_key_duration),
            "max_budget": s.litellm_max_budget,
            "budget_duration": _seconds(s.litellm_budget_duration),
            "metadata": {**s.litellm_metadata, "request_id": request.request_id},
        }
        minted = await self.litellm.generate_key(_key_of(secret), body)
        expires = minted.get("expires") or ""

        def mark_approved(secret: client.V1Secret) -> bool:
            set_state(secret, RequestState.APPROVED)
            secret.metadata.annotations.update({KEY_ALIAS: alias, KEY_EXPIRES: expires})
            return True

        approved = await self.store.update(name, mark_approved, current=secret)
        if approved is None:
            # The Secret (and the only copy of the key) went while we minted: a key nobody can
            # be given must not stay live.
            await self.litellm.delete_keys([alias])
            raise SecretMissing(name)
        activity.logger.info("minted key %s for request %s", alias, request.request_id)
        audit.record_decision(
            audit.DECIDED, request_id=request.request_id, decision=decision, model=request.model
        )
        audit.record_decision(
            audit.KEY_MINTED,
            request_id=request.request_id,
            decision=decision,
            model=request.model,
            key_alias=alias,
            expires=expires,
            cycle=cycle_of(secret),
        )
        return MintedKey(alias, expires or None, self._plan(approved))

    @activity.defn
    @heartbeating
    async def close_request(self, final: FinalState) -> None:
        """Mark the Secret denied, expired or failed, with the decision that led there."""

        def close(secret: client.V1Secret) -> bool:
            if recorded_state(secret) is final.state:
                return False
            set_state(secret, final.state)
            if final.decision is not None:
                _write_decision(secret, final.decision)
            secret.metadata.annotations[REASON] = final.reason
            if final.state is RequestState.FAILED:
                # The reserved key never became a live key: drop it.
                secret.data = None
            return True

        if await self.store.update(secret_name(final.request_id), close) is None:
            raise SecretMissing(secret_name(final.request_id))
        audit.record_decision(
            audit.CLOSED[final.state.value],
            request_id=final.request_id,
            decision=final.decision,
            state=final.state.value,
            reason=final.reason,
        )

    @activity.defn
    @heartbeating
    async def notify_requester(self, request_id: str) -> None:
        """Email the requester about the Secret's current state, once per state."""
        name = secret_name(request_id)
        secret = await self.store.get(name)
        if secret is None:
            raise SecretMissing(name)
        annotations = secret.metadata.annotations or {}
        state = recorded_state(secret)
        if annotations.get(NOTIFIED) == state.value:
            return
        notice = Notice(
            request_id=request_id,
            state=state,
            email=annotations.get(EMAIL, ""),
            model=annotations.get(MODEL, ""),
            reason=annotations.get(REASON, ""),
            reviewer=annotations.get(REVIEWER, ""),
            api_key=_key_of(secret),
            key_expires=annotations.get(KEY_EXPIRES, ""),
            proxy_url=self.settings.litellm_public_url or self.settings.litellm_base_url,
            cycle=cycle_of(secret),
            budget=budget_text(self.settings),
            resubmit_after=human_span(self.settings.approval_resubmit_after.total_seconds()),
        )
        await self._send(name, compose(notice, self.settings.smtp_from), state.value)

        def mark_notified(secret: client.V1Secret) -> bool:
            secret.metadata.annotations[NOTIFIED] = state.value
            return True

        await self.store.update(name, mark_notified, current=secret)

    async def _send(self, name: str, message, what: str) -> None:
        """Send; a final refusal is written on the Secret before the workflow hears of it."""
        try:
            await self.mailer.send(message)
        except MailRejected as exc:
            refusal = f"{what}: {exc.message}"

            def failed(secret: client.V1Secret) -> bool:
                secret.metadata.annotations[NOTIFY_FAILED] = refusal
                return True

            await self.store.update(name, failed)
            raise

    # A key's life after the first email.

    @activity.defn
    @heartbeating
    async def plan_key_life(self, request_id: str) -> LifecyclePlan:
        """The key's alias and expiry from the Secret, the timers' settings from config.yaml."""
        return self._plan(await self.store.get(secret_name(request_id)))

    def _plan(self, secret: client.V1Secret | None) -> LifecyclePlan:
        s = self.settings
        plan = LifecyclePlan(
            remind_before=[int(p.total_seconds()) for p in s.lifecycle_remind_before],
            rotation_grace=int(s.lifecycle_rotation_grace.total_seconds()),
            retention=int(s.lifecycle_retention.total_seconds()),
        )
        if secret is not None:
            annotations = secret.metadata.annotations or {}
            plan.key_alias = annotations.get(KEY_ALIAS, "")
            plan.key_expires = annotations.get(KEY_EXPIRES) or None
            plan.cycle = cycle_of(secret)
        return plan

    @activity.defn
    @heartbeating
    async def tell_holder(self, notice: HolderNotice) -> None:
        """One lifecycle email (reminder, renewed, rotated, revoked, key-expired...), once."""
        secret = await self.store.get(secret_name(notice.request_id))
        if secret is None:  # the address was only there: nobody to tell
            log.warning("secret %s is missing; %s email not sent",
                        secret_name(notice.request_id), notice.kind)  # fmt: skip
            return
        annotations = secret.metadata.annotations or {}
        sent = f"{notice.cycle}.{notice.kind}.{notice.detail}"[:200]
        if annotations.get(LAST_NOTICE) == sent:
            return
        await self._send(
            secret_name(notice.request_id),
            compose(
                Notice(
                    request_id=notice.request_id,
                    state=recorded_state(secret),
                    email=annotations.get(EMAIL, ""),
                    model=annotations.get(MODEL, ""),
                    reason=notice.detail if notice.kind == "renewal-denied" else
                    annotations.get(REASON, ""),
                    reviewer=annotations.get(ENDED_BY) or annotations.get(REVIEWER, ""),
                    api_key=_key_of(secret) if notice.kind == "rotated" else "",
                    key_expires=annotations.get(KEY_EXPIRES, ""),
                    proxy_url=self.settings.litellm_public_url or self.settings.litellm_base_url,
                    kind=notice.kind,
                    cycle=notice.cycle,
                    detail=notice.detail,
                    budget=budget_text(self.settings),
                ),
                self.settings.smtp_from,
            ),
            notice.kind,
        )  # fmt: skip

        def mark_sent(secret: client.V1Secret) -> bool:
            secret.metadata.annotations[LAST_NOTICE] = sent
            return True

        await self.store.update(secret_name(notice.request_id), mark_sent)

    @activity.defn
    @heartbeating
    async def end_key(self, end: KeyEnd, aliases: list[str]) -> None:
        """Revoked or expired: delete the key(s) in LiteLLM, then the plaintext, then mark it."""
        if aliases:
            await self.litellm.delete_keys(aliases)

        def ended(secret: client.V1Secret) -> bool:
            if recorded_state(secret) is end.state and not secret.data:
                return False
            set_state(secret, end.state)
            secret.data = None
            annotations = secret.metadata.annotations
            annotations.update({REASON: end.reason, ENDED_AT: now_iso(), ENDED_BY: end.reviewer})
            for name in (NEXT_KEY_ALIAS, OLD_KEY_ALIAS):
                annotations.pop(name, None)
            return True

        if await self.store.update(secret_name(end.request_id), ended) is None:
            log.warning("secret %s is gone; its key is deleted in LiteLLM",
                        secret_name(end.request_id))  # fmt: skip
        event = audit.KEY_REVOKED if end.state is RequestState.REVOKED else audit.KEY_EXPIRED
        audit.record(event, request_id=end.request_id, actor=end.reviewer, source=end.source,
                     key_aliases=",".join(aliases), reason=end.reason)  # fmt: skip

    @activity.defn
    @heartbeating
    async def extend_key(self, request: KeyRequest, decision: Decision) -> MintedKey | None:
        """Renewal in place: the same key gets a new duration from now. None if LiteLLM no
        longer has the key (it is then replaced by a new one)."""
        secret = await self.store.get(secret_name(request.request_id))
        if secret is None:  # the key's only copy is gone: replaced in a new cycle
            return None
        annotations = secret.metadata.annotations or {}
        if annotations.get(RENEWED_CYCLE) == str(request.cycle):  # an earlier attempt did it
            return MintedKey(annotations.get(KEY_ALIAS, ""), annotations.get(KEY_EXPIRES) or None)
        key = _key_of(secret)
        if not key:
            return None
        duration = _seconds(self.settings.litellm_key_duration)
        updated = await self.litellm.update_key(key, {"duration": duration})
        if updated is None:
            return None
        expires = updated.get("expires") or ""
        if not expires and duration:
            expires = ((await self.litellm.key_info(key)) or {}).get("expires") or ""

        def renewed(secret: client.V1Secret) -> bool:
            set_state(secret, RequestState.APPROVED)
            _write_decision(secret, decision)
            secret.metadata.annotations.update({
                KEY_EXPIRES: expires, CYCLE: str(request.cycle),
                RENEWED_CYCLE: str(request.cycle), REQUESTED_AT: request.requested_at,
            })  # fmt: skip
            return True

        await self.store.update(secret_name(request.request_id), renewed)
        alias = annotations.get(KEY_ALIAS, "")
        audit.record(audit.KEY_RENEWED, request_id=request.request_id, actor=decision.reviewer,
                     source=decision.source, key_alias=alias, expires=expires,
                     cycle=request.cycle)  # fmt: skip
        return MintedKey(alias, expires or None)

    @activity.defn
    @heartbeating
    async def rotate_key(self, request: KeyRequest, rotation: int) -> RotatedKey:
        """Mint the rotation's new key exactly once, then make it the Secret's key.

        Reserve-then-mint, as for the first key: the new key and its alias are stored before
        LiteLLM sees them, so a retry after a crash mints the same key or finds it minted.
        The old key stays live until the workflow deletes it after the grace period.
        """
        name = secret_name(request.request_id)

        def reserve(secret: client.V1Secret) -> bool:
            annotations = secret.metadata.annotations
            if annotations.get(ROTATION) == str(rotation) or _key_of(secret, NEXT_KEY_DATA):
                return False
            uid = secret.metadata.uid[:8]
            annotations[NEXT_KEY_ALIAS] = f"{name}-{uid}-c{cycle_of(secret)}-r{rotation}"
            next_key = "sk-" + secrets.token_urlsafe(32)
            secret.data = {**(secret.data or {}), NEXT_KEY_DATA: _encoded(next_key)}
            return True

        secret = await self.store.update(name, reserve)
        if secret is None:
            raise RuntimeError(f"secret {name} is missing; cannot rotate its key")
        annotations = secret.metadata.annotations
        if annotations.get(ROTATION) == str(rotation):
            return RotatedKey(annotations.get(KEY_ALIAS, ""), annotations.get(KEY_EXPIRES) or None,
                              annotations.get(OLD_KEY_ALIAS, ""))  # fmt: skip
        alias, old_alias = annotations[NEXT_KEY_ALIAS], annotations.get(KEY_ALIAS, "")
        # The new key ends when the old one would have: rotation is not renewal.
        left = _until(annotations.get(KEY_EXPIRES, ""))
        s = self.settings
        body = {
            "key_alias": alias,
            "models": [request.model],
            "user_id": request.email,
            "duration": None if left is None else f"{max(left, 60)}s",
            "max_budget": s.litellm_max_budget,
            "budget_duration": _seconds(s.litellm_budget_duration),
            "metadata": {**s.litellm_metadata, "request_id": request.request_id},
        }
        minted = await self.litellm.generate_key(_key_of(secret, NEXT_KEY_DATA), body)
        expires = minted.get("expires") or ""

        def swap(secret: client.V1Secret) -> bool:
            annotations = secret.metadata.annotations
            if annotations.get(ROTATION) == str(rotation):
                return False
            secret.data = {API_KEY_DATA: secret.data[NEXT_KEY_DATA]}
            annotations.pop(NEXT_KEY_ALIAS, None)
            annotations.update({KEY_ALIAS: alias, KEY_EXPIRES: expires, OLD_KEY_ALIAS: old_alias,
                                ROTATION: str(rotation)})  # fmt: skip
            return True

        await self.store.update(name, swap)
        audit.record(audit.KEY_ROTATED, request_id=request.request_id, key_alias=alias,
                     old_key_alias=old_alias, rotation=rotation)  # fmt: skip
        return RotatedKey(alias, expires or None, old_alias)

    @activity.defn
    @heartbeating
    async def delete_old_key(self, request_id: str, alias: str) -> None:
        """A rotated-out key, once its grace period is over."""
        await self.litellm.delete_keys([alias])

        def forget(secret: client.V1Secret) -> bool:
            if secret.metadata.annotations.get(OLD_KEY_ALIAS) != alias:
                return False
            del secret.metadata.annotations[OLD_KEY_ALIAS]
            return True

        await self.store.update(secret_name(request_id), forget)
        audit.record(audit.KEY_DELETED, request_id=request_id, source="timer", key_alias=alias)

    @activity.defn
    @heartbeating
    async def delete_request(self, request_id: str, cycle: int) -> None:
        """lifecycle.retention after the request finished: its Secret goes. Only if it is
        still that finished cycle: a new submission meanwhile keeps it."""
        secret = await self.store.get(secret_name(request_id))
        if secret is None or not recorded_state(secret).is_finished or cycle_of(secret) > cycle:
            return
        if await self.store.delete(secret.metadata.name, secret.metadata.resource_version):
            audit.record(audit.SECRET_DELETED, request_id=request_id, source="timer",
                         state=recorded_state(secret).value)  # fmt: skip


def budget_text(settings: Settings) -> str:
    """The key's budget as the email states it: 'USD 50.00, reset every 30 days'."""
    if settings.litellm_max_budget is None:
        return "no spending limit"
    text = f"USD {settings.litellm_max_budget:.2f}"
    if settings.litellm_budget_duration is not None:
        text += f", reset every {human_span(settings.litellm_budget_duration.total_seconds())}"
    return text


def _until(expires: str) -> int | None:
    """Seconds from now until an ISO time; None when there is no time (never expires)."""
    if not expires:
        return None
    moment = datetime.fromisoformat(expires.replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int((moment - datetime.now(UTC)).total_seconds())


def _whole_seconds(duration) -> int:
    return 0 if duration is None else int(duration.total_seconds())


def _seconds(duration) -> str | None:
    return None if duration is None else f"{int(duration.total_seconds())}s"
