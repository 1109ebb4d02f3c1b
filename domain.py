"""What a key request is: its states, names, and the data that crosses workflow boundaries.

Everything here is deterministic and free of I/O, so workflows may import it. Dataclasses (not
pydantic models) cross the Temporal boundary so that fields can be added with defaults without
breaking running workflows.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from enum import StrEnum

from temporalio.common import SearchAttributeKey


class RequestState(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    EXPIRED = "expired"
    FAILED = "failed"

    @property
    def is_final(self) -> bool:
        return self is not RequestState.PENDING


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
WORKFLOW_ID_PREFIX = "key-request-"
SIGNAL_APPROVE = "approve"
SIGNAL_DENY = "deny"
QUERY_STATUS = "status"
UPDATE_DECIDE = "decide"
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


@dataclass
class RecordedRequest:
    """What the Secret says when the workflow (re)starts."""

    state: RequestState
    # Set when the Secret already carries a decision (a resumed request).
    decision: Decision | None = None
    key_minted: bool = False
    notified: bool = False


@dataclass
class PolicyOutcome:
    decision: str  # approve | deny | manual
    reason: str = ""
    rule: str = ""
    # How long a manual decision may take; config is read in the activity, not the workflow.
    wait_seconds: int = 0


@dataclass
class MintedKey:
    """What the workflow may know about a minted key: never the key itself."""

    key_alias: str
    expires: str | None = None


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
    # For approvers (admin API, inbox); the public status endpoint leaves them out.
    email: str = ""
    justification: str = ""
    # approved | denied once decided: the state lags while the key is minted or mail sent.
    decision: str = ""


# The reconciler.
RECONCILE_SCHEDULE_ID = "llm-key-requestor-reconcile"
RECONCILE_PHASES = ("pending", "legacy")


@dataclass
class ReconcilePage:
    """One page of one listing; `phase` says which Secrets the listing selects."""

    phase: str = "pending"
    continue_token: str | None = None
    page_size: int = 250


@dataclass
class ReconcileCounts:
    scanned: int = 0  # pending Secrets looked at
    in_flight: int = 0  # their workflow is running: nothing to do
    resumed: int = 0  # no running workflow: started again
    relayed: int = 0  # relabelled with kubectl: decision passed to the workflow
    corrected: int = 0  # workflow finished, Secret behind: brought in line
    skipped: int = 0  # cannot be resumed (no email or model on the Secret)
    pages: int = 0  # listing pages, one activity each

    def add(self, other: ReconcileCounts) -> None:
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass
class ReconcilePageResult:
    counts: ReconcileCounts
    next_token: str | None = None
