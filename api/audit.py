"""The audit trail as Temporal still holds it: GET /api/admin/audit.

The durable trail is the `audit` log lines (audit.py), kept by the company's log pipeline. This
export rebuilds the same events from the request workflows Temporal still has (running ones,
and closed ones within the namespace's retention), for a quick answer without the log store.

Bounded by construction: one visibility listing for the window, then one call per workflow (a
`status` query for a running one, the close event for a closed one), at most `limit` workflows,
newest first. When more workflows matched, the answer says so and the caller narrows the window.
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Literal

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response
from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionStatus,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
)
from temporalio.service import RPCError, RPCStatusCode

import audit
from api.schemas import ErrorOut
from domain import (
    QUERY_STATUS,
    SA_MODEL,
    FinalState,
    RequestStatus,
    request_id_from_workflow_id,
)

FIELDS = (
    "at",
    "event",
    "request_id",
    "model",
    "actor",
    "source",
    "decision",
    "state",
    "reason",
    "workflow_id",
)
_CONCURRENCY = 16
# A running request answers from its worker in milliseconds; a request whose worker is gone
# (its task queue no longer polled) would hold each query for the RPC's full time.
_RPC = timedelta(seconds=2)
# The whole export answers within this; what is not read by then makes X-Audit-Complete false.
_BUDGET = 20.0
# The event a request's state stands for, when the workflow reports it.
_STATE_EVENTS = {
    "approved": audit.KEY_MINTED,
    "expired": audit.EXPIRED,
    "failed": audit.FAILED,
    "revoked": audit.KEY_REVOKED,
    "key-expired": audit.KEY_EXPIRED,
}


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


async def events(
    client: Client, since: datetime, until: datetime, limit: int
) -> tuple[list[dict], bool]:
    """Events in [since, until), oldest first, and whether every matching workflow was read."""
    query = (
        f"WorkflowType = 'KeyRequestWorkflow' AND StartTime < '{_iso(until)}' "
        f"AND (ExecutionStatus = 'Running' OR CloseTime >= '{_iso(since)}')"
    )
    runs = [run async for run in client.list_workflows(query, limit=limit + 1)]
    complete = len(runs) <= limit
    limited = asyncio.Semaphore(_CONCURRENCY)

    async def one(run: WorkflowExecution) -> list[dict]:
        async with limited:
            return await _events_of(client, run)

    tasks = [asyncio.ensure_future(one(r)) for r in runs[:limit]]
    done, late = await asyncio.wait(tasks, timeout=_BUDGET) if tasks else (set(), set())
    for task in late:
        task.cancel()
    complete = complete and not late
    found = [e for task in done for e in task.result()]
    lower, upper = _iso(since), _iso(until)
    found = [e for e in found if lower <= e["at"] < upper]
    return sorted(found, key=lambda e: (e["at"], e["request_id"], e["event"])), complete


async def _events_of(client: Client, run: WorkflowExecution) -> list[dict]:
    handle = client.get_workflow_handle(run.id, run_id=run.run_id, result_type=FinalState)
    try:
        if run.status == WorkflowExecutionStatus.RUNNING:
            status = await handle.query(QUERY_STATUS, result_type=RequestStatus, rpc_timeout=_RPC)
            state, at = str(status.state), status.updated_at
            approved = None if state == "pending" else state != "denied"
            decided = (status.decided_at, status.reviewer, status.decision_source, status.reason)
        elif run.status == WorkflowExecutionStatus.COMPLETED:
            final = await handle.result(follow_runs=False, rpc_timeout=_RPC)
            state, at = str(final.state), _iso(run.close_time or run.start_time)
            d = final.decision
            approved = d.approved if d else None
            decided = (d.decided_at or at, d.reviewer, d.source, d.reason) if d else ("",) * 4
        else:
            return []  # terminated or timed out: no decision of ours to report
    except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
        return []  # no worker to answer right now, or one that cannot; the log lines have it
    base = {
        "request_id": request_id_from_workflow_id(run.id),
        "workflow_id": run.id,
        "model": run.typed_search_attributes.get(SA_MODEL) or "",
    }
    found = []
    if approved is not None and decided[0]:
        verdict = "approved" if approved else "denied"
        at_, actor, source, reason = decided
        found.append(
            {**base, "at": at_, "event": audit.DECIDED, "actor": actor, "source": source,
             "decision": verdict, "reason": reason}
        )  # fmt: skip
    event = _STATE_EVENTS.get(state)
    if event is not None:
        source = "timer" if state == "expired" else ""
        found.append({**base, "at": at, "event": event, "state": state, "source": source})
    return [{field: e.get(field, "") for field in FIELDS} for e in found]


def as_json_lines(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def as_csv(rows: Iterable[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(v) for k, v in row.items()})
    return out.getvalue()


def _cell(value: str) -> str:
    # A reviewer's reason opened in a spreadsheet must stay text, never become a formula.
    return "'" + value if value[:1] in ("=", "+", "-", "@") else value


# Mounted by api/main.py under the admin prefix, behind the admin API's authentication.
routes = APIRouter(tags=["admin"])


@routes.get(
    "/audit",
    responses={
        200: {
            "description": "One event per line (JSON lines), or CSV with a header row. "
            "X-Audit-Complete: false when more workflows matched than `limit`: narrow the window.",
            "content": {"application/x-ndjson": {}, "text/csv": {}},
        },
        401: {"model": ErrorOut, "description": "No bearer token"},
        403: {"model": ErrorOut, "description": "Wrong token, or the admin API is disabled"},
        422: {"model": ErrorOut, "description": "Invalid window; the message names the field"},
        503: {"model": ErrorOut, "description": "Temporal is unreachable; retry shortly"},
    },
)
async def audit_export(
    request: Request,
    since: datetime,
    until: datetime | None = None,
    output: Annotated[Literal["jsonl", "csv"] | None, Query(alias="format")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 1000,
) -> Response:
    """Decisions, mints, expiries and failures in [since, until) that Temporal still holds.

    The complete trail is the `audit` log lines (README, "Operating it"). Times without a zone
    are UTC. `format` (jsonl or csv) beats the Accept header (text/csv for CSV).
    """
    since, until = _utc(since, "since"), _utc(until or datetime.now(UTC), "until")
    if since >= until:
        raise HTTPException(422, "since: must be earlier than until")
    try:
        rows, complete = await events(request.app.state.requests.client, since, until, limit)
    except RPCError as exc:
        if exc.status != RPCStatusCode.INVALID_ARGUMENT:
            raise
        raise HTTPException(422, "since, until: Temporal cannot search that range") from None
    if output == "csv" or (output is None and "text/csv" in request.headers.get("accept", "")):
        body, media = as_csv(rows), "text/csv; charset=utf-8"
    else:
        body, media = as_json_lines(rows), "application/x-ndjson"
    return Response(body, media_type=media, headers={"X-Audit-Complete": str(complete).lower()})


def _utc(moment: datetime, name: str) -> datetime:
    try:
        return moment.astimezone(UTC) if moment.tzinfo else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise HTTPException(422, f"{name}: out of range") from None
