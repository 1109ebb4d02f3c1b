"""Key requests as the API sees them: Temporal workflows, addressed by request id.

The API never talks to Kubernetes, LiteLLM or SMTP; the worker does. That keeps the API's
permissions to "start, query, update and list workflows".
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import fields
from datetime import UTC, datetime, timedelta

from temporalio.client import (
    Client,
    WorkflowExecution,
    WorkflowExecutionDescription,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
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
from workflows.key_request import KeyRequestWorkflow

_UNREACHABLE = (RPCStatusCode.UNAVAILABLE, RPCStatusCode.DEADLINE_EXCEEDED)
# Bounds every read the API makes, so a caller always gets an answer.
_RPC = timedelta(seconds=10)


class UnknownRequest(Exception):
    pass


class AlreadyDecided(Exception):
    pass


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

    async def submit(self, email: str, model: str) -> tuple[RequestStatus, str]:
        """Start the request's workflow, or pass the submission to the running one.

        Returns the status and what happened: started, restarted (a finished request starts
        over), renewing, current (live key, outside the renewal window), pending.
        """
        request_id = request_id_for(email, model, self.settings.request_id_key.get_secret_value())
        cooldown = self.settings.approval_resubmit_after
        existing = await self._describe(request_id)
        if existing is not None and existing.status == Status.RUNNING:
            again = Resubmission(_now(), int(cooldown.total_seconds()))
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
            KeyRequest(request_id, email, model, requested_at),
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
            if isinstance(exc, RPCError) and exc.status in _UNREACHABLE:
                raise
            # Closed meanwhile, a run of older code without the update, or a worker too busy
            # to answer within _RPC (the update may still be applied; a repeat is harmless):
            # say what the request is.
            status = await self.status(request_id_from_workflow_id(desc.id))
            return ResubmitAnswer("current", status)

    async def order_key(self, request_id: str, update: str, order) -> RequestStatus:
        """Revoke or rotate the live key; AlreadyDecided (409) when there is none."""
        desc = await self._describe(request_id)
        if desc is None:
            raise UnknownRequest(request_id)
        if desc.status != Status.RUNNING:
            state = desc.typed_search_attributes.get(SA_STATE) or "closed"
            raise AlreadyDecided(f"request {request_id} is {state}: there is no live key")
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
            return await handle.query(QUERY_STATUS, result_type=RequestStatus, rpc_timeout=_RPC)
        except RPCError:
            # No worker to answer right now: visibility still knows state and model.
            return _visible_status(desc)

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
        rows = [
            _visible_status(execution, await execution.memo())
            for execution in iterator.current_page or []
        ]
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
