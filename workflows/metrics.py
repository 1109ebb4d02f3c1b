"""The service's metrics that workflow code records, through the workflow's metric meter.

That meter records nothing while a worker replays a history, so a request counts once however
often its workflow is replayed; and recording creates no command, so adding a call here never
needs `workflow.patched`. Labels are the model, a state, a decision and its source: never an
email, a request id or a key. The metric names are part of the alert rules' contract
(deploy/monitoring): add, never rename.
"""

from __future__ import annotations

from datetime import datetime

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from domain import Decision, ReconcileCounts, RequestStatus


def _count(name: str, description: str, labels: dict[str, str], value: int = 1) -> None:
    workflow.metric_meter().create_counter(name, description).add(value, labels)


def _seconds_since(iso: str) -> float:
    try:
        start = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max((workflow.now() - start).total_seconds(), 0.0)


def _between(start: str, end: str) -> float:
    try:
        first = datetime.fromisoformat(start.replace("Z", "+00:00"))
        last = datetime.fromisoformat(end.replace("Z", "+00:00"))
    except ValueError:
        return 0.0
    return max((last - first).total_seconds(), 0.0)


def state_entered(status: RequestStatus, decision: Decision | None) -> None:
    """A request entered `status.state`: count it; a first decision is also timed."""
    model, state = status.model, status.state.value
    if state == "pending":
        _count("llm_key_requests_started_total", "Request workflows started", {"model": model})
        return
    if state == "failed":
        _count("llm_key_requests_failed_total", "Requests ended failed", {"model": model})
        return
    if state not in ("approved", "denied", "expired"):
        return  # a key's later life: see the lifecycle counters below
    if state == "expired" or decision is None:
        source, waited = "timer", _seconds_since(status.requested_at)
    else:
        source = decision.source or "unknown"
        waited = _between(status.requested_at, decision.decided_at or status.decided_at)
    _count(
        "llm_key_requests_decided_total",
        "Requests by model and first decision (approved, denied, expired) and its source",
        {"model": model, "decision": state, "source": source},
    )
    workflow.metric_meter().create_histogram_float(
        "llm_key_request_decision_seconds", "From submission to decision", "s"
    ).record(waited, {"model": model, "decision": state})


def emailed(status: RequestStatus) -> None:
    """The requester was emailed about `status.state`: time it from the submission."""
    workflow.metric_meter().create_histogram_float(
        "llm_key_request_email_seconds", "From submission to the email about the outcome", "s"
    ).record(
        _seconds_since(status.requested_at), {"model": status.model, "state": status.state.value}
    )


# A key's life after the first email (reminders, renewals, revocations, rotations, expiry).


def reminded(model: str) -> None:
    _count("llm_key_reminders_total", "Expiry reminders sent", {"model": model})


def renewed(model: str, how: str) -> None:
    """`how`: extended (the live key's expiry moved) or replaced (a new key minted)."""
    _count("llm_key_renewals_total", "Keys renewed", {"model": model, "how": how})


def revoked(model: str, source: str) -> None:
    _count("llm_key_revocations_total", "Keys revoked", {"model": model, "source": source})


def rotated(model: str, source: str) -> None:
    _count("llm_key_rotations_total", "Keys rotated", {"model": model, "source": source})


def key_expired(model: str) -> None:
    _count("llm_key_keys_expired_total", "Keys deleted at their expiry", {"model": model})


def reconciled(counts: ReconcileCounts) -> None:
    """One reconciler run (or one continue-as-new part of it) and what it found."""
    _count("llm_key_reconcile_runs_total", "Reconciler runs finished", {})
    for outcome in ("in_flight", "resumed", "relayed", "corrected", "skipped"):
        _count(
            "llm_key_reconcile_secrets_total",
            "Pending Secrets the reconciler looked at, by what it did with them",
            {"outcome": outcome},
            getattr(counts, outcome),
        )
    workflow.metric_meter().create_gauge(
        "llm_key_reconcile_last_run_timestamp_seconds", "When a reconciler run last finished", "s"
    ).set(int(workflow.now().timestamp()))
