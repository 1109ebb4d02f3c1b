"""The audit trail: one structured log line per decision and key change.

Who did what to which request, when, and by which path. A company's log pipeline keeps these
lines for as long as it must, long after Temporal's retention has dropped the history; the
stable event names below are what such a pipeline filters on.

Emitted by activities (never by workflow code, which may replay), so an event is logged when
its effect happened. The email address and the key are never part of an event.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

log = logging.getLogger("audit")

# Stable event names: add new ones, never rename.
DECIDED = "request.decided"  # approved or denied, by policy or a person
EXPIRED = "request.expired"  # no decision before the deadline
FAILED = "request.failed"
KEY_MINTED = "key.minted"
KEY_RENEWED = "key.renewed"
KEY_ROTATED = "key.rotated"
KEY_REVOKED = "key.revoked"
KEY_EXPIRED = "key.expired"
KEY_DELETED = "key.deleted"  # an old key removed from LiteLLM (rotation grace over, cleanup)
SECRET_DELETED = "secret.deleted"  # noqa: S105 - a finished request's Secret removed after retention
DECISION_REFUSED = "decision.refused"  # a person may not decide this request (own, not approver)
APPROVAL_RECORDED = "request.approval"  # one of several approvals a rule needs

# The paths a decision or change can come through.
SOURCES = ("policy", "api", "web", "signal", "kubectl", "reconciler", "timer")


def record(event: str, *, request_id: str, actor: str = "", source: str = "", **details) -> None:
    """Log one audit event. `details` must hold no email address and no key."""
    fields = {
        "event": event,
        "request_id": request_id,
        "actor": actor,
        "source": source,
        "at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
        **details,
    }
    # The message reads well as plain text; the `audit` attribute carries the same fields for a
    # JSON formatter (LOG_FORMAT=json) to emit as one object.
    summary = " ".join(f"{k}={v}" for k, v in fields.items() if k != "event" and v != "")
    log.info("%s %s", event, summary, extra={"audit": fields})


# The event a request's closing state stands for.
CLOSED = {"denied": DECIDED, "expired": EXPIRED, "failed": FAILED}


def record_decision(event: str, *, request_id: str, decision, **details) -> None:
    """An event that `decision` (a domain.Decision) led to; None means no one decided in time."""
    if decision is None:
        record(event, request_id=request_id, source="timer", **details)
        return
    verdict = "approved" if decision.approved else "denied"
    record(
        event,
        request_id=request_id,
        actor=decision.reviewer,
        source=decision.source,
        decision=verdict,
        **details,
    )
