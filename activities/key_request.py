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

import audit
from activities.email import Mailer, Notice, compose
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
    KeyRequest,
    MintedKey,
    PolicyOutcome,
    RecordedRequest,
    RequestState,
    secret_name,
    workflow_id,
)
from settings import Settings

log = logging.getLogger(__name__)


# How often a running activity tells Temporal its worker is alive; the workflow's
# heartbeat_timeout is a few times this (the SDK batches heartbeats to 80% of that timeout).
HEARTBEAT_EVERY = 2.0


def heartbeating(fn):
    """Heartbeat while the activity runs, so that a worker that dies mid-activity is noticed
    within the heartbeat timeout instead of after the whole start-to-close timeout."""

    @functools.wraps(fn)
    async def run(*args, **kwargs):
        async def beat() -> None:
            while True:
                activity.heartbeat()
                await asyncio.sleep(HEARTBEAT_EVERY)

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
DECISION_ANNOTATIONS = (DECISION, DECISION_SOURCE, DECIDED_AT, REVIEWER, REASON)


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


def _key_of(secret: client.V1Secret) -> str:
    raw = (secret.data or {}).get(API_KEY_DATA)
    return base64.b64decode(raw).decode() if raw else ""


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
        """Make sure the request's Secret exists, and say what it already records."""
        name = secret_name(request.request_id)
        if await self.store.create(new_secret(request)) is not None:
            return RecordedRequest(RequestState.PENDING)

        def adopt(secret: client.V1Secret) -> bool:
            fresh = new_secret(request)
            if recorded_state(secret) not in (RequestState.PENDING, RequestState.APPROVED):
                # Denied, expired or failed, and asked for again: the request starts over.
                secret.metadata.labels = {**(secret.metadata.labels or {}), **fresh.metadata.labels}
                annotations = {
                    k: v
                    for k, v in (secret.metadata.annotations or {}).items()
                    if k not in (*DECISION_ANNOTATIONS, NOTIFIED, KEY_ALIAS, KEY_EXPIRES)
                }
                secret.metadata.annotations = {**annotations, **fresh.metadata.annotations}
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
            notified=annotations.get(NOTIFIED) == state.value,
        )

    @activity.defn
    @heartbeating
    async def evaluate_policy(self, request: KeyRequest) -> PolicyOutcome:
        """Apply config.yaml's approval rules; read here so a restart picks up new rules."""
        decision, reason, rule = self.settings.decide(request.email, request.model)
        return PolicyOutcome(
            decision=decision,
            reason=reason,
            rule=rule,
            wait_seconds=int(self.settings.approval_deadline.total_seconds()),
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
            raise RuntimeError(f"secret {name} is missing; it is recreated on the next attempt")
        annotations = secret.metadata.annotations
        if annotations.get(KEY_ALIAS) and recorded_state(secret) is RequestState.APPROVED:
            return MintedKey(annotations[KEY_ALIAS], annotations.get(KEY_EXPIRES) or None)

        # The Secret's uid makes the alias unique to this Secret: a request whose Secret was
        # deleted and recreated gets a new key instead of colliding with the old alias.
        alias = f"{name}-{secret.metadata.uid[:8]}"
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

        await self.store.update(name, mark_approved)
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
        )
        return MintedKey(alias, expires or None)

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
            raise RuntimeError(f"secret {secret_name(final.request_id)} is missing")
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
            raise RuntimeError(f"secret {name} is missing; cannot tell the requester")
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
        )
        await self.mailer.send(compose(notice, self.settings.smtp_from))

        def mark_notified(secret: client.V1Secret) -> bool:
            secret.metadata.annotations[NOTIFIED] = state.value
            return True

        await self.store.update(name, mark_notified)


def _seconds(duration) -> str | None:
    return None if duration is None else f"{int(duration.total_seconds())}s"
