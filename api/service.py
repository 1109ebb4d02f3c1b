"""Key requests as the API sees them: Temporal workflows, addressed by request id.

The API never talks to Kubernetes, LiteLLM or SMTP; the worker does. That keeps the API's
permissions to "start, query, update and list workflows".
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime, timedelta

from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowQueryFailedError,
    WorkflowQueryRejectedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.client import (
    WorkflowExecutionStatus as Status,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RetryConfig, RPCError, RPCStatusCode

from connection import start_key_request
from domain import (
    KEY_REQUEST_WORKFLOW,
    QUERY_STATUS,
    SA_MODEL,
    SA_STATE,
    UPDATE_DECIDE,
    UPDATE_RESUBMIT,
    Decision,
    KeyRequest,
    RequestState,
    RequestStatus,
    Resubmission,
    ResubmitAnswer,
    request_id_for,
    request_id_from_workflow_id,
    workflow_id,
)
from settings import Settings

log = logging.getLogger(__name__)

# The API answers people who wait: when Temporal does not answer, a quick 503 (retrying is safe)
# beats the client's default retries, which hold the caller for 5-10 s. About 1 s in all.
RETRIES = RetryConfig(max_interval_millis=400, max_elapsed_time_millis=1000, max_retries=4)
# Bounds each call of a submission, so that a Temporal that accepts connections but hangs
# still gets the caller an answer within about 2 s.
_SUBMIT_RPC = timedelta(seconds=1.5)
# Bounds every read the API makes, so a caller always gets an answer.
_RPC = timedelta(seconds=10)
# A decision needs a worker to take it; with none polling, Temporal would hold the call open.
DECISION_WAIT = timedelta(seconds=5)
# A status query too needs a worker, which answers in milliseconds; without one, visibility
# answers after this.
_QUERY_WAIT = timedelta(seconds=3)
# Temporal's own trouble, as opposed to an answer about one workflow.
_SERVICE_PROBLEMS = (
    RPCStatusCode.UNAVAILABLE,
    RPCStatusCode.DEADLINE_EXCEEDED,
    RPCStatusCode.RESOURCE_EXHAUSTED,
    RPCStatusCode.PERMISSION_DENIED,
    RPCStatusCode.UNAUTHENTICATED,
)
# Bounds each row's query when a listing is filled in with what the workflows know.
_ROW_QUERY = timedelta(seconds=2)


class UnknownRequest(Exception):
    pass


class AlreadyDecided(Exception):
    pass


class DecisionUnconfirmed(Exception):
    """No worker took the decision in time. Temporal keeps it; a worker may still apply it."""


class CoolingDown(Exception):
    """Submitted again too soon after a denial (approval.resubmit_after)."""

    def __init__(self, request_id: str, retry_after: int) -> None:
        super().__init__(request_id, retry_after)
        self.request_id, self.retry_after = request_id, retry_after


class BadPageToken(Exception):
    """A page_token that Temporal cannot continue from (mangled, or from another query)."""


def _now() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _visible_status(execution: WorkflowExecution, memo: Mapping | None = None) -> RequestStatus:
    """What visibility alone tells: for listings, and when no worker can answer a query. The
    memo adds the key's life (expiry, next reminder, cycle, revocation)."""
    attrs = execution.typed_search_attributes
    status = RequestStatus(
        request_id=request_id_from_workflow_id(execution.id),
        state=RequestState(attrs.get(SA_STATE) or "pending"),
        model=attrs.get(SA_MODEL) or "",
        requested_at=_iso(execution.start_time),
        updated_at=_iso(execution.close_time or execution.start_time),
    )
    known = {f.name for f in fields(RequestStatus)}
    for name, value in (memo or {}).items():
        if name in known:
            setattr(status, name, value)
    status.key_expires = status.key_expires or None
    return status


def _query(state: RequestState | None) -> str:
    """The visibility query for the key requests, in one state or in any."""
    query = f"WorkflowType = '{KEY_REQUEST_WORKFLOW}'"
    if state is not None:
        query += f" AND {SA_STATE.name} = '{state.value}'"
    return query


class KeyRequests:
    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings
        # A key of its own, derived one-way: a page token tells nothing about REQUEST_ID_KEY.
        self._page_key = hmac.new(
            settings.request_id_key.get_secret_value().encode(), b"page tokens", hashlib.sha256
        ).digest()

    async def _describe(self, request_id: str) -> WorkflowExecutionDescription | None:
        try:
            handle = self.client.get_workflow_handle(workflow_id(request_id))
            return await handle.describe(rpc_timeout=_SUBMIT_RPC)
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    async def _running(self, request_id: str, ended: str) -> WorkflowExecutionDescription:
        """The request's workflow while it runs. UnknownRequest if there is none; AlreadyDecided,
        worded by `ended` ({id}, {state}), if it has ended."""
        desc = await self._describe(request_id)
        if desc is None:
            raise UnknownRequest(request_id)
        if desc.status != Status.RUNNING:
            state = desc.typed_search_attributes.get(SA_STATE) or "closed"
            raise AlreadyDecided(ended.format(id=request_id, state=state))
        return desc

    async def submit(
        self, email: str, model: str, justification: str = ""
    ) -> tuple[RequestStatus, str]:
        """Start the request's workflow, or pass the submission to the running one.

        Returns the status and what happened: started, restarted (a finished request starts
        over), renewing, current (live key, outside the renewal window), pending.
        """
        request_id = request_id_for(email, model, self.settings.request_id_key.get_secret_value())
        cooldown = self.settings.approval_resubmit_after
        existing = await self._describe(request_id)
        if existing is not None and existing.status == Status.RUNNING:
            again = Resubmission(_now(), int(cooldown.total_seconds()), justification)
            answer = await self._resubmit(existing, again)
            if answer.outcome == "cooldown":
                raise CoolingDown(request_id, answer.retry_after)
            if answer.outcome != "restarted":
                return answer.status, answer.outcome
            return RequestStatus(request_id, RequestState.PENDING, model, _now()), "restarted"
        if existing is not None:
            state = existing.typed_search_attributes.get(SA_STATE)
            closed = existing.close_time or existing.start_time
            left = (closed + cooldown - datetime.now(UTC)).total_seconds()
            if state == RequestState.DENIED and left > 0:
                raise CoolingDown(request_id, int(left) + 1)
        # Denied, expired, failed or never seen: a new request under the same id. Two
        # simultaneous submissions meet here, and the conflict policy makes them one workflow.
        requested_at = _now()
        await start_key_request(
            self.client,
            self.settings.temporal_task_queue,
            KeyRequest(request_id, email, model, requested_at, justification),
            rpc_timeout=_SUBMIT_RPC,
        )
        if existing is not None and state == RequestState.APPROVED:
            # Approved by older code, whose workflow ended with the email: the new run adopts
            # the key from the Secret (no second key, no second email) and follows its life.
            return _visible_status(existing), "adopted"
        status = RequestStatus(request_id, RequestState.PENDING, model, requested_at)
        return status, "started"

    async def _resubmit(
        self, desc: WorkflowExecutionDescription, again: Resubmission
    ) -> ResubmitAnswer:
        handle = self.client.get_workflow_handle(desc.id, run_id=desc.run_id)
        try:
            return await handle.execute_update(
                UPDATE_RESUBMIT, again, result_type=ResubmitAnswer, rpc_timeout=_RPC
            )
        except (
            WorkflowUpdateFailedError,
            WorkflowUpdateRPCTimeoutOrCancelledError,
            RPCError,
        ) as exc:
            if isinstance(exc, RPCError) and exc.status in _SERVICE_PROBLEMS:
                raise  # Temporal itself: answered 503 or 429 by the API
            # Closed meanwhile, a run of older code without the update, or a worker too busy
            # to answer within _RPC (the update may still be applied; a repeat is harmless):
            # say what the request is.
            status = await self.status(request_id_from_workflow_id(desc.id))
            return ResubmitAnswer("current", status)

    async def order_key(self, request_id: str, update: str, order) -> RequestStatus:
        """Revoke or rotate the live key; AlreadyDecided (409) when there is none."""
        desc = await self._running(request_id, "request {id} is {state}: there is no live key")
        handle = self.client.get_workflow_handle(desc.id, run_id=desc.run_id)
        try:
            return await handle.execute_update(update, order, result_type=RequestStatus)
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type == "NoLiveKey":
                raise AlreadyDecided(f"request {request_id}: {cause.message}") from None
            raise

    async def status(self, request_id: str) -> RequestStatus:
        desc = await self._describe(request_id)
        if desc is None:
            raise UnknownRequest(request_id)
        handle = self.client.get_workflow_handle(workflow_id(request_id), run_id=desc.run_id)
        try:
            return await handle.query(
                QUERY_STATUS, result_type=RequestStatus, rpc_timeout=_QUERY_WAIT
            )
        except (RPCError, WorkflowQueryFailedError, WorkflowQueryRejectedError) as exc:
            # No worker to answer right now, or this worker cannot replay that (old) run:
            # visibility still knows state and model.
            log.warning("status query of request %s failed (%s); answering from visibility",
                        request_id, getattr(exc, "message", None) or exc)  # fmt: skip
            return _visible_status(desc, await desc.memo())

    async def settled(self, status: RequestStatus, within: float) -> RequestStatus:
        """The request's status once the policy has spoken, or as it is after `within` s.

        Spoken: a decision is recorded (the key may still be in the making), or the request
        waits for a person (the deadline is set), or it is final. The policy usually answers
        within a moment: waiting that long lets the submitter hear the outcome at once.
        """
        handle = self.client.get_workflow_handle(workflow_id(status.request_id))
        deadline = asyncio.get_running_loop().time() + within
        while (remaining := deadline - asyncio.get_running_loop().time()) > 0:
            try:
                current = await asyncio.wait_for(
                    handle.query(QUERY_STATUS, result_type=RequestStatus), remaining
                )
            except (RPCError, TimeoutError, WorkflowQueryFailedError, WorkflowQueryRejectedError):
                # No worker yet, too slow, or a worker that cannot answer this run: the caller
                # still has an answer.
                return status
            status = current
            if status.state.is_final or status.decided_at or status.deadline:
                break
            await asyncio.sleep(0.05)
        return status

    async def detailed(self, rows: list[RequestStatus]) -> list[RequestStatus]:
        """Listing rows with what only the workflow knows (requester, reviewer, decided_at).

        A row whose workflow no worker answers for (none polling its task queue) stays as
        visibility has it, after a short wait: one such row must not hold up the page.
        """
        limit = asyncio.Semaphore(32)

        async def one(row: RequestStatus) -> RequestStatus:
            handle = self.client.get_workflow_handle(workflow_id(row.request_id))
            async with limit:
                try:
                    return await handle.query(
                        QUERY_STATUS, result_type=RequestStatus, rpc_timeout=_ROW_QUERY
                    )
                except RPCError:
                    return row

        return list(await asyncio.gather(*(one(row) for row in rows)))

    async def decide(self, request_id: str, decision: Decision) -> RequestStatus:
        desc = await self._running(request_id, "request {id} is already {state}")
        handle = self.client.get_workflow_handle(workflow_id(request_id), run_id=desc.run_id)
        try:
            # The SDK re-sends an update that the server reports as only admitted (no worker
            # took it yet), so rpc_timeout alone does not bound the call: the timeout does.
            async with asyncio.timeout(DECISION_WAIT.total_seconds()):
                return await handle.execute_update(
                    UPDATE_DECIDE, decision, result_type=RequestStatus, rpc_timeout=DECISION_WAIT
                )
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type == "AlreadyDecided":
                raise AlreadyDecided(f"request {request_id}: {cause.message}") from None
            raise
        except (TimeoutError, WorkflowUpdateRPCTimeoutOrCancelledError):
            log.warning("no worker took the decision on request %s within %ss",
                        request_id, DECISION_WAIT.total_seconds())  # fmt: skip
            raise DecisionUnconfirmed(request_id) from None
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND:
                raise
            # The workflow closed while the update was on its way: it was decided meanwhile.
            closed = await self._describe(request_id)
            state = closed.typed_search_attributes.get(SA_STATE) if closed else "closed"
            raise AlreadyDecided(f"request {request_id} is already {state}") from None

    async def list(
        self, state: RequestState | None, page_size: int, page_token: str | None
    ) -> tuple[list[RequestStatus], str | None]:
        token = self._open_token(page_token) if page_token else None
        iterator = self.client.list_workflows(
            _query(state), page_size=page_size, next_page_token=token, limit=None, rpc_timeout=_RPC
        )
        await iterator.fetch_next_page()
        rows = [
            _visible_status(execution, await execution.memo())
            for execution in iterator.current_page or []
        ]
        next_token = iterator.next_page_token
        return rows, self._seal_token(next_token) if next_token else None

    async def count(self, state: RequestState) -> int:
        return (await self.client.count_workflows(_query(state), rpc_timeout=_RPC)).count

    # Page tokens are Temporal's, signed: a forged or mangled one is refused here instead of
    # costing Temporal a failing query (which the client would retry for seconds).

    def _mac(self, raw: bytes) -> bytes:
        return hmac.new(self._page_key, raw, hashlib.sha256).digest()[:16]

    def _seal_token(self, raw: bytes) -> str:
        return base64.urlsafe_b64encode(self._mac(raw) + raw).decode()

    def _open_token(self, token: str) -> bytes:
        try:
            sealed = base64.urlsafe_b64decode(token.encode("ascii"))
        except (ValueError, UnicodeEncodeError):
            raise BadPageToken() from None
        mac, raw = sealed[:16], sealed[16:]
        if not raw or not hmac.compare_digest(mac, self._mac(raw)):
            raise BadPageToken()
        return raw
