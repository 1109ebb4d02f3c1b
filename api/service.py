"""Key requests as the API sees them: Temporal workflows, addressed by request id.

The API never talks to Kubernetes, LiteLLM or SMTP; the worker does. That keeps the API's
permissions to "start, query, update and list workflows".
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowUpdateFailedError,
)
from temporalio.client import (
    WorkflowExecutionStatus as Status,
)
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError, RPCStatusCode

from connection import start_key_request
from domain import (
    QUERY_STATUS,
    SA_MODEL,
    SA_STATE,
    UPDATE_DECIDE,
    Decision,
    KeyRequest,
    RequestState,
    RequestStatus,
    request_id_for,
    request_id_from_workflow_id,
    workflow_id,
)
from settings import Settings
from workflows.key_request import KeyRequestWorkflow

_UNREACHABLE = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)
# Bounds every read the API makes, so a caller always gets an answer.
_RPC = timedelta(seconds=10)
# Bounds each row's query when a listing is filled in with what the workflows know.
_ROW_QUERY = timedelta(seconds=2)


class UnknownRequest(Exception):
    pass


class AlreadyDecided(Exception):
    pass


class BadPageToken(Exception):
    """A page_token that Temporal cannot continue from (mangled, or from another query)."""


def _now() -> str:
    return _iso(datetime.now(UTC))


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _visible_status(execution: WorkflowExecution) -> RequestStatus:
    """What visibility alone tells: for listings, and when no worker can answer a query."""
    attrs = execution.typed_search_attributes
    return RequestStatus(
        request_id=request_id_from_workflow_id(execution.id),
        state=RequestState(attrs.get(SA_STATE) or "pending"),
        model=attrs.get(SA_MODEL) or "",
        requested_at=_iso(execution.start_time),
        updated_at=_iso(execution.close_time or execution.start_time),
    )


class KeyRequests:
    def __init__(self, client: Client, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    async def _describe(self, request_id: str) -> WorkflowExecutionDescription | None:
        try:
            return await self.client.get_workflow_handle(workflow_id(request_id)).describe()
        except RPCError as exc:
            if exc.status == RPCStatusCode.NOT_FOUND:
                return None
            raise

    async def submit(
        self, email: str, model: str, justification: str = ""
    ) -> tuple[RequestStatus, bool]:
        """Start the request's workflow, or return the live one: (status, newly started)."""
        request_id = request_id_for(email, model, self.settings.request_id_key.get_secret_value())
        existing = await self._describe(request_id)
        if existing is not None:
            state = existing.typed_search_attributes.get(SA_STATE)
            if existing.status == Status.RUNNING or state == RequestState.APPROVED:
                return _visible_status(existing), False
        # Denied, expired, failed or never seen: a new request under the same id. Two
        # simultaneous submissions meet here, and the conflict policy makes them one workflow.
        requested_at = _now()
        await start_key_request(
            self.client,
            self.settings.temporal_task_queue,
            KeyRequest(request_id, email, model, requested_at, justification),
        )
        status = RequestStatus(request_id, RequestState.PENDING, model, requested_at)
        return status, existing is None or existing.status != Status.RUNNING

    async def status(self, request_id: str) -> RequestStatus:
        desc = await self._describe(request_id)
        if desc is None:
            raise UnknownRequest(request_id)
        handle = self.client.get_workflow_handle(workflow_id(request_id), run_id=desc.run_id)
        try:
            return await handle.query(QUERY_STATUS, result_type=RequestStatus, rpc_timeout=_RPC)
        except RPCError:
            # No worker to answer right now: visibility still knows state and model.
            return _visible_status(desc)

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
            except (RPCError, TimeoutError):
                return status  # no worker yet, or too slow: the caller still has an answer
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
        desc = await self._describe(request_id)
        if desc is None:
            raise UnknownRequest(request_id)
        if desc.status != Status.RUNNING:
            state = desc.typed_search_attributes.get(SA_STATE) or "closed"
            raise AlreadyDecided(f"request {request_id} is already {state}")
        handle = self.client.get_workflow_handle(workflow_id(request_id), run_id=desc.run_id)
        try:
            return await handle.execute_update(UPDATE_DECIDE, decision, result_type=RequestStatus)
        except WorkflowUpdateFailedError as exc:
            cause = exc.cause
            if isinstance(cause, ApplicationError) and cause.type == "AlreadyDecided":
                raise AlreadyDecided(f"request {request_id}: {cause.message}") from None
            raise
        except RPCError as exc:
            if exc.status in _UNREACHABLE:
                raise
            # The workflow closed while the update was on its way: it was decided meanwhile.
            closed = await self._describe(request_id)
            state = closed.typed_search_attributes.get(SA_STATE) if closed else "closed"
            raise AlreadyDecided(f"request {request_id} is already {state}") from None

    async def list(
        self, state: RequestState | None, page_size: int, page_token: str | None
    ) -> tuple[list[RequestStatus], str | None]:
        query = f"WorkflowType = '{KeyRequestWorkflow.__name__}'"
        if state is not None:
            query += f" AND {SA_STATE.name} = '{state.value}'"
        token = self._open_token(page_token) if page_token else None
        iterator = self.client.list_workflows(
            query, page_size=page_size, next_page_token=token, limit=None, rpc_timeout=_RPC
        )
        await iterator.fetch_next_page()
        rows = [_visible_status(execution) for execution in iterator.current_page or []]
        next_token = iterator.next_page_token
        return rows, self._seal_token(next_token) if next_token else None

    # Page tokens are Temporal's, signed: a forged or mangled one is refused here instead of
    # costing Temporal a failing query (which the client would retry for seconds).

    def _mac(self, raw: bytes) -> bytes:
        key = self.settings.request_id_key.get_secret_value().encode()
        return hmac.new(key, raw, hashlib.sha256).digest()[:16]

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
