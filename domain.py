"""What a key request is: its states, names, and the data that crosses workflow boundaries.

Everything here is deterministic and free of I/O, so workflows may import it. Dataclasses (not
pydantic models) cross the Temporal boundary so that fields can be added with defaults without
breaking running workflows.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field, is_dataclass
from enum import StrEnum
from typing import get_type_hints

from temporalio.common import SearchAttributeKey


class RequestState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    FAILED = "failed"
    REVOKED = "revoked"  # the key was revoked by a person
    KEY_EXPIRED = "key-expired"  # the key reached its expiry and was deleted

    @property
    def is_final(self) -> bool:
        return self is not RequestState.PENDING

    @property
    def is_finished(self) -> bool:
        """No live key and nothing to wait for: only clean-up (or a new submission) is left."""
        return self not in (RequestState.PENDING, RequestState.APPROVED)


# Kubernetes: the names kubectl users rely on (kept from the polling service).
SECRET_PREFIX = "llm-key-request-"  # noqa: S105 - a name, not a password
COMPONENT_LABEL = "app.kubernetes.io/component"
COMPONENT = "llm-key-request"
STATE_LABEL = "request-state"
STATE_ANNOTATION = "state"
# What the workflow last wrote. kubectl users change `request-state`; comparing the two labels
# is how the reconciler spots a decision made with kubectl.
RECORDED_STATE_LABEL = "llm-key-requestor/recorded-state"
ANNOTATION_PREFIX = "llm-key-requestor/"
API_KEY_DATA = "api-key"

# Temporal: names operators type.
# The request workflow's type name: the API starts, updates and lists workflows by this name, so
# it needs neither the workflow's code nor the activities (and their Kubernetes client) it imports.
KEY_REQUEST_WORKFLOW = "KeyRequestWorkflow"
WORKFLOW_ID_PREFIX = "key-request-"
SIGNAL_APPROVE = "approve"
SIGNAL_DENY = "deny"
QUERY_STATUS = "status"
UPDATE_DECIDE = "decide"
# A key's life after the first email (PRODUCT.md, "A key's life").
SIGNAL_REVOKE = "revoke"
SIGNAL_ROTATE = "rotate"
# The admin API needs an answer (409 on a second revocation), so it sends updates.
UPDATE_REVOKE = "revoke-key"
UPDATE_ROTATE = "rotate-key"
UPDATE_RESUBMIT = "resubmit"
# workflow.patched() ids: each marks a change of the commands a running workflow issues. Never
# reuse or rename one; README, "Changing a workflow safely".
PATCH_KEY_LIFECYCLE = "key-lifecycle"
PATCH_SECRET_MISSING = "secret-missing"  # noqa: S105 - a patch id
PATCH_MAIL_REJECTED = "mail-rejected"
# A request waiting for people tells them (email, webhook, reminder, escalation) and records
# each approval as it comes (PRODUCT.md, "People").
PATCH_APPROVER_NOTIFICATIONS = "approver-notifications"
# Fewer commands per request (cost per request): the policy comes with record_request's answer,
# the key's plan with mint_key's, and a search attribute is upserted only when its value changes.
PATCH_FEWER_COMMANDS = "fewer-commands"
# The key is minted and emailed by local activities too: a policy-approved request goes from its
# start to its key's timers in one workflow task (implies PATCH_FEWER_COMMANDS).
PATCH_LOCAL_DELIVERY = "local-delivery"
SA_STATE = SearchAttributeKey.for_keyword("KeyRequestState")
SA_MODEL = SearchAttributeKey.for_keyword("KeyRequestModel")
SEARCH_ATTRIBUTES = (SA_STATE, SA_MODEL)


JUSTIFICATION_MAX = 1000
# How a decision made through a signal names its reviewer: signals carry no authentication, so
# the name is only what the sender declared.
DECLARED_PREFIX = "declared:"


def request_id_for(email: str, model: str, key: str) -> str:
    """The id of the request for (email, model): the same pair always maps to the same id.

    Deriving it (instead of drawing a random one) lets Temporal's workflow-id uniqueness
    deduplicate concurrent submissions. It is keyed so that the id cannot be traced back to
    an email address by hashing guesses.
    """
    message = f"{email.strip().lower()}\n{model}".encode()
    return hmac.new(key.encode(), message, hashlib.sha256).hexdigest()[:20]


def secret_name(request_id: str) -> str:
    return f"{SECRET_PREFIX}{request_id}"


def workflow_id(request_id: str) -> str:
    return f"{WORKFLOW_ID_PREFIX}{request_id}"


def request_id_from_workflow_id(wf_id: str) -> str:
    return wf_id.removeprefix(WORKFLOW_ID_PREFIX)


_REQUEST_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")


def is_request_id(value: str) -> bool:
    """Ours are 20 hex characters; the polling service's were UUIDs. Both fit a DNS label."""
    return _REQUEST_ID.fullmatch(value) is not None


@dataclass
class KeyRequest:
    """Workflow input. The email is payload (encryptable), never an id or search attribute."""

    request_id: str
    email: str
    model: str
    requested_at: str  # ISO 8601, UTC
    # Why the requester needs the key, shown to approvers (at most JUSTIFICATION_MAX characters).
    justification: str = ""
    # Which turn of the request this is: 1 for the first submission, +1 for each renewal or
    # new submission after the request finished. Part of each email's Message-ID.
    cycle: int = 1
    renewal: bool = False  # a renewal goes through the policy's `renewals` decision
    # Set when a run continues as new with a live key: the state it carries over.
    life: KeyLife | None = None


@dataclass
class Review:
    """The optional JSON object of the `approve` and `deny` signals."""

    reviewer: str = ""
    reason: str = ""


@dataclass
class Decision:
    approved: bool
    reviewer: str = ""
    reason: str = ""
    # policy, api, signal or kubectl: how the decision reached the workflow.
    source: str = ""
    decided_at: str = ""
    # Every approver's identity, in order, when the rule needs several (the last is `reviewer`).
    approvals: list[str] = field(default_factory=list)


@dataclass
class RecordedRequest:
    """What the Secret says when the workflow (re)starts."""

    state: RequestState
    # Set when the Secret already carries a decision (a resumed request).
    decision: Decision | None = None
    key_minted: bool = False
    notified: bool = False
    key_alias: str = ""
    # The policy's answer, evaluated in the same activity: a workflow past PATCH_FEWER_COMMANDS
    # schedules no evaluate_policy of its own for the first decision.
    policy: PolicyOutcome | None = None


@dataclass
class PolicyOutcome:
    decision: str  # approve | deny | manual
    reason: str = ""
    rule: str = ""
    # How long a manual decision may take; config is read in the activity, not the workflow.
    wait_seconds: int = 0
    # Distinct approvals a manual decision needs (the rule's `approvals`).
    approvals: int = 1
    # When approvers are reminded, and when the rule's escalate_to list is told, after the
    # request began waiting; 0: never.
    remind_seconds: int = 0
    escalate_seconds: int = 0


@dataclass
class MintedKey:
    """What the workflow may know about a minted key: never the key itself."""

    key_alias: str
    expires: str | None = None
    # The key's life as plan_key_life would answer it right after the mint: a workflow past
    # PATCH_FEWER_COMMANDS then needs no plan_key_life.
    plan: LifecyclePlan | None = None


@dataclass
class FinalState:
    request_id: str
    state: RequestState
    reason: str = ""
    decision: Decision | None = None


@dataclass
class RequestStatus:
    """The `status` query's answer; also what GET /api/requests/{id} shows."""

    request_id: str
    state: RequestState
    model: str
    requested_at: str
    decided_at: str = ""
    reviewer: str = ""
    reason: str = ""
    decision_source: str = ""
    key_expires: str | None = None
    deadline: str = ""
    updated_at: str = ""
    cycle: int = 1
    next_reminder: str = ""
    revoked_at: str = ""
    revoked_by: str = ""
    revocation_reason: str = ""
    rotated_at: str = ""
    # When a finished request's Secret is deleted (lifecycle.retention after it finished).
    cleanup_at: str = ""
    # For approvers (admin API, inbox); the public status endpoint leaves them out.
    email: str = ""
    justification: str = ""
    # approved | denied once decided: the state lags while the key is minted or mail sent.
    decision: str = ""
    # The mail server refused an email for good (5xx): which one, and its answer.
    notification_failed: str = ""
    # Who has approved so far (identities, never the requester's email), and how many must.
    approvals: list[str] = field(default_factory=list)
    approvals_needed: int = 1


@dataclass
class LifecyclePlan:
    """What the workflow needs to run a key's life: read from the Secret and config.yaml by an
    activity, so a running workflow never reads configuration itself."""

    key_alias: str = ""
    key_expires: str | None = None
    cycle: int = 1
    remind_before: list[int] = field(default_factory=list)  # seconds before expiry, descending
    rotation_grace: int = 86400
    retention: int = 30 * 86400


@dataclass
class KeyLife:
    """What a run hands to the next when it continues as new: the state, nothing else."""

    status: RequestStatus
    old_key_alias: str = ""  # a rotated-out key, deleted at old_key_delete_at
    old_key_delete_at: str = ""
    rotations: int = 0


@dataclass
class Resubmission:
    """The same email and model submitted again while the request's workflow runs."""

    requested_at: str
    # approval.resubmit_after, passed by the API so that the workflow never reads config.
    resubmit_after_seconds: int = 0
    # The new submission's own justification, for the request it starts over (if it does).
    justification: str = ""


@dataclass
class ResubmitAnswer:
    # renewing: a renewal started; restarted: a finished request starts over; current: the
    # key is live outside the reminder window (nothing sent); pending: still waiting for a
    # decision; cooldown: denied less than resubmit_after ago (retry_after seconds left).
    outcome: str
    status: RequestStatus
    retry_after: int = 0


@dataclass
class Revocation:
    """The optional JSON object of the `revoke` signal."""

    reviewer: str = ""
    reason: str = ""
    source: str = ""


@dataclass
class RotationOrder:
    """The optional JSON object of the `rotate` signal; grace_seconds None means the config's."""

    reviewer: str = ""
    grace_seconds: int | None = None
    source: str = ""


@dataclass
class KeyEnd:
    """Ends the live key (revoked or key-expired): LiteLLM, the Secret, then the email."""

    request_id: str
    state: RequestState
    reason: str = ""
    reviewer: str = ""
    source: str = ""


@dataclass
class RotatedKey:
    key_alias: str
    key_expires: str | None
    old_key_alias: str


@dataclass
class HolderNotice:
    """One email to the key holder about the key's life; kind names the email."""

    request_id: str
    kind: str  # reminder, renewed, renewal-denied, rotated, revoked, key-expired
    cycle: int
    detail: str = ""  # reminder: which point (e.g. "7d")


@dataclass
class ApproverNotice:
    """One notification about a request waiting for people; kind names it.

    waiting (the rule's approvers), reminder (the same people, later), escalation (the rule's
    escalate_to), acknowledgement (the requester, naming who will decide).
    """

    request_id: str
    kind: str
    cycle: int = 1
    deadline: str = ""
    approvals: list[str] = field(default_factory=list)
    approvals_needed: int = 1


# The reconciler.
RECONCILE_SCHEDULE_ID = "llm-key-requestor-reconcile"
RECONCILE_PHASES = ("pending", "legacy", "revoked")


@dataclass
class ReconcilePage:
    """One page of one listing; `phase` says which Secrets the listing selects."""

    phase: str = "pending"
    continue_token: str | None = None
    page_size: int = 250


@dataclass
class ReconcileCounts:
    scanned: int = 0  # Secrets looked at
    in_flight: int = 0  # their workflow is running: nothing to do
    resumed: int = 0  # no running workflow: started again
    relayed: int = 0  # relabelled with kubectl: decision passed to the workflow
    corrected: int = 0  # workflow finished, Secret behind: brought in line
    skipped: int = 0  # cannot be resumed (no email or model on the Secret)
    adopted: int = 0  # served by the older service (approved, with its key): labelled as ours
    pages: int = 0  # listing pages, one activity each

    def add(self, other: ReconcileCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ReconcilePageResult:
    counts: ReconcileCounts
    next_token: str | None = None


def _resolve_annotations() -> None:
    """Give every dataclass here the types its annotations name, in place of their text.

    The SDK's data converter calls typing.get_type_hints on a dataclass each time it converts
    one (every activity's and workflow's input and result). With the text annotations of
    `from __future__ import annotations`, that evaluated every field's type again each time:
    40-100 us per dataclass instead of 20 (BENCHMARKS.md).
    """
    for value in list(globals().values()):
        if isinstance(value, type) and is_dataclass(value) and value.__module__ == __name__:
            value.__annotations__ = get_type_hints(value)


_resolve_annotations()
