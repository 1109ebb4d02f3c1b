"""The REST API: submit a key request, follow it, and (with the admin token) decide it.

uvicorn api.main:create_app --factory --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import asdict, replace
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.service import RPCError, RPCStatusCode

from api import pages
from api.audit import routes as audit_routes
from api.auth import ApproverDep, Authenticator, decide_as, require_approver
from api.metrics import HttpMetrics, count_submission
from api.schemas import (
    DenyIn,
    ErrorOut,
    KeyRequestIn,
    KeyRequestOut,
    ModelInfo,
    ModelList,
    RequestPage,
    RequestStatusOut,
    ReviewIn,
    RevokeIn,
    RotateIn,
)
from api.service import (
    DECISION_WAIT,
    RETRIES,
    AlreadyDecided,
    BadPageToken,
    CoolingDown,
    DecisionUnconfirmed,
    KeyRequests,
    UnknownRequest,
)
from connection import connect_temporal
from domain import (
    UPDATE_REVOKE,
    UPDATE_ROTATE,
    RequestState,
    RequestStatus,
    Revocation,
    RotationOrder,
    is_request_id,
    workflow_id,
)
from settings import ConfigError, Settings, load_settings, parse_duration
from telemetry import Telemetry, web_ui_url
from telemetry import start as start_telemetry

log = logging.getLogger("api")

ERRORS = {
    400: {"model": ErrorOut, "description": "The body is not readable JSON text"},
    401: {"model": ErrorOut, "description": "No credentials, or a token that is not valid"},
    403: {
        "model": ErrorOut,
        "description": "Not allowed: wrong token, not an approver of the "
        "request, your own request, or the admin API is disabled",
    },
    404: {"model": ErrorOut, "description": "No such request"},
    409: {"model": ErrorOut, "description": "The request is already decided"},
    413: {"model": ErrorOut, "description": "Body too large"},
    422: {"model": ErrorOut, "description": "Invalid input; the message names the field"},
    429: {
        "model": ErrorOut,
        "description": "Denied recently, or Temporal is rate limiting; retry after Retry-After",
    },
    503: {
        "model": ErrorOut,
        "description": "Temporal is unreachable or refuses the service, or (decisions) no worker "
        "took the decision in time; retry shortly",
    },
}


# Dependencies are coroutines because FastAPI runs a plain `def` dependency in its thread pool:
# two thread hand-offs per request, and 40 more threads under a burst.
async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_requests(request: Request) -> KeyRequests:
    return request.app.state.requests


SettingsDep = Annotated[Settings, Depends(get_settings)]
RequestsDep = Annotated[KeyRequests, Depends(get_requests)]


def _out(status: RequestStatus, settings: Settings, admin: bool = False) -> RequestStatusOut:
    """The status as shown. Without `admin` (anyone who knows the id) it names no person.

    A reviewer's name is personal, and a reviewer's or revoker's reason, a failure's cause or a
    mail server's refusal may name people or internals: the public view keeps only the reasons
    the service itself wrote (a denying policy rule's text from config.yaml, the expiry notice).
    The requester and the justification are for approvers.
    """
    if not admin:
        own_words = status.state == RequestState.EXPIRED or (
            status.state == RequestState.DENIED and status.decision_source == "policy"
        )
        status = replace(
            status,
            reviewer="",
            reason=status.reason if own_words else "",
            revoked_by="",
            revocation_reason="",
            notification_failed="",
            approvals=[],
        )
    # The answer is the workflow's status (fields it does not declare, such as the email,
    # are left out), plus what only the API adds.
    return RequestStatusOut.model_validate(
        {
            **asdict(status),
            "state": str(status.state),
            "workflow_id": workflow_id(status.request_id),
            "requester": status.email if admin else "",
            "justification": status.justification if admin else "",
            "web_ui_url": web_ui_url(settings, workflow_id(status.request_id)),
        }
    )


def _checked_id(request_id: str) -> str:
    if not is_request_id(request_id):
        raise HTTPException(404, f"no request {request_id[:40]!r}: not a request id")
    return request_id


public = APIRouter()
admin = APIRouter(prefix="/api/admin", tags=["admin"], dependencies=[Depends(require_approver)])


@public.get("/", tags=["status"])
async def root() -> dict:
    return {"service": "llm-key-requestor", "status": "ok", "docs": "/docs"}


@public.get("/health", tags=["status"])
async def health() -> dict:
    """Liveness: the process answers. Readiness (Temporal reachable) is /health/ready."""
    return {"status": "ok"}


@public.get("/health/ready", tags=["status"], responses={503: ERRORS[503]})
async def ready(requests: RequestsDep) -> JSONResponse:
    try:
        await requests.client.workflow_service.get_system_info(
            GetSystemInfoRequest(), timeout=timedelta(seconds=3)
        )
    except Exception as exc:  # any failure means "not ready"; the log says which
        log.warning("readiness: Temporal does not answer: %s", _short(exc))
        return JSONResponse({"status": "not ready", "temporal": "unreachable"}, status_code=503)
    return JSONResponse({"status": "ready", "temporal": "reachable"})


@public.get("/api/models", tags=["models"])
async def models(settings: SettingsDep) -> ModelList:
    return ModelList(models=[ModelInfo(**m.model_dump()) for m in settings.models])


@public.post("/api/request-key", tags=["requests"], responses=ERRORS)
async def request_key(
    body: KeyRequestIn, settings: SettingsDep, requests: RequestsDep, request: Request
) -> KeyRequestOut:
    """Start a key request. A repeat while one is pending returns that one; for a live key it
    renews the key inside the renewal window (lifecycle.remind_before) and otherwise reports
    the key's expiry; after a denial it is refused with 429 for approval.resubmit_after."""
    if body.llm not in settings.model_ids:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "llm"),
                    "msg": f"unknown model {body.llm[:80]!r}; valid models: "
                    + ", ".join(settings.model_ids),
                    "type": "value_error",
                }
            ]
        )
    status, outcome = await requests.submit(str(body.email), body.llm, body.justification)
    count_submission(request.app.state.meter, body.llm, outcome)
    if outcome in ("started", "restarted"):
        status = await requests.settled(status, settings.api_decision_wait.total_seconds())
        message = _submitted_message(status)
    elif outcome == "renewing":
        message = "Renewal requested. You will get an email when it is decided."
    elif outcome == "adopted":
        message = (
            "A key for this email and model was issued earlier; it is now followed: you will be "
            "reminded before it expires, and a new submission then renews it."
        )
    elif status.state == RequestState.APPROVED:
        message = (
            "A request for this email and model is already approved; the key expires "
            f"{status.key_expires or 'never'}. Renewal opens {status.next_reminder or 'later'}; "
            "nothing was sent."
        )
    else:
        message = f"A request for this email and model is already {status.state}."
    return KeyRequestOut(
        request_id=status.request_id,
        status=str(status.state),
        decision=status.decision,
        model=status.model,
        message=message,
        workflow_id=workflow_id(status.request_id),
        key_expires=status.key_expires,
    )


def _submitted_message(status: RequestStatus) -> str:
    if status.state.is_final:
        return f"Request {status.state}. You will get an email with the details."
    if status.decision == "approved":
        return "Request approved. Your key is being created and will be emailed to you."
    if status.decision == "denied":
        return "Request denied. You will get an email with the reason."
    return "Request received. You will get an email when it is decided."


@public.get("/api/requests/{request_id}", tags=["requests"], responses=ERRORS)
async def get_request(request_id: str, requests: RequestsDep) -> RequestStatusOut:
    """State, model, timestamps and decision of one request. Never the key, nor the reviewer."""
    return _out(await requests.status(_checked_id(request_id)), requests.settings)


@admin.get("/requests", responses=ERRORS)
async def list_requests(
    requests: RequestsDep,
    state: RequestState | None = None,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str | None, Query(max_length=4096)] = None,
) -> RequestPage:
    """Requests with who asked, who decided and when (one workflow query per row)."""
    rows, token = await requests.list(state, page_size, page_token)
    rows = await requests.detailed(rows)
    return RequestPage(
        requests=[_out(r, requests.settings, admin=True) for r in rows], next_page_token=token
    )


@admin.get("/requests/{request_id}", responses=ERRORS)
async def admin_get_request(request_id: str, requests: RequestsDep) -> RequestStatusOut:
    return _out(await requests.status(_checked_id(request_id)), requests.settings, admin=True)


@admin.post("/requests/{request_id}/approve", responses=ERRORS)
async def approve(
    request_id: str,
    requests: RequestsDep,
    principal: ApproverDep,
    body: ReviewIn | None = None,
) -> RequestStatusOut:
    """Approve as the authenticated caller (a body `reviewer` is ignored)."""
    reason = body.reason if body else ""
    status = await decide_as(principal, _checked_id(request_id), True, reason, "api", requests)
    return _out(status, requests.settings, admin=True)


@admin.post("/requests/{request_id}/deny", responses=ERRORS)
async def deny(
    request_id: str,
    body: DenyIn,
    requests: RequestsDep,
    principal: ApproverDep,
) -> RequestStatusOut:
    """Deny as the authenticated caller (a body `reviewer` is ignored)."""
    status = await decide_as(
        principal, _checked_id(request_id), False, body.reason, "api", requests
    )
    return _out(status, requests.settings, admin=True)


@admin.post("/requests/{request_id}/revoke", responses=ERRORS)
async def revoke(
    request_id: str, body: RevokeIn, requests: RequestsDep, principal: ApproverDep
) -> RequestStatusOut:
    """Delete the live key in LiteLLM and tell its holder why. 409 if there is no live key.
    Recorded as the authenticated caller (a body `reviewer` is ignored)."""
    order = Revocation(principal.reviewer, body.reason, "api")
    status = await requests.order_key(_checked_id(request_id), UPDATE_REVOKE, order)
    return _out(status, requests.settings, admin=True)


@admin.post("/requests/{request_id}/rotate", responses=ERRORS)
async def rotate(
    request_id: str, requests: RequestsDep, principal: ApproverDep, body: RotateIn | None = None
) -> RequestStatusOut:
    """Mint and email a new key; the old one is deleted after the grace period. Recorded as
    the authenticated caller (a body `reviewer` is ignored)."""
    body = body or RotateIn()
    grace = None
    if body.grace is not None:
        try:
            grace = int(parse_duration(body.grace).total_seconds())
        except (ValueError, AttributeError):
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "grace"),
                        "msg": f"{body.grace!r} is not a duration such as 0s, 30m or 2h",
                        "type": "value_error",
                    }
                ]  # fmt: skip
            ) from None
    order = RotationOrder(principal.reviewer, grace, "api")
    status = await requests.order_key(_checked_id(request_id), UPDATE_ROTATE, order)
    return _out(status, requests.settings, admin=True)


# Errors: always JSON with a `message` a person can act on.


def _short(exc: BaseException) -> str:
    return (getattr(exc, "message", None) or str(exc) or type(exc).__name__)[:200]


def _validation_message(errors: list) -> str:
    parts = []
    for error in errors:
        loc = [str(p) for p in error.get("loc", ()) if p != "body"]
        parts.append(f"{'.'.join(loc) or 'body'}: {error.get('msg', 'invalid')}")
    return "; ".join(parts)


def _install_error_handlers(app: FastAPI, settings: Settings) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in exc.errors()]
        return JSONResponse(
            {"message": _validation_message(errors), "detail": errors}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"message": exc.detail}, exc.status_code, headers=exc.headers)

    @app.exception_handler(UnknownRequest)
    async def unknown(_: Request, exc: UnknownRequest) -> JSONResponse:
        return JSONResponse({"message": f"no request {exc.args[0]}"}, 404)

    @app.exception_handler(BadPageToken)
    async def bad_token(_: Request, exc: BadPageToken) -> JSONResponse:
        message = "page_token: not a token from this listing; start again without page_token"
        return JSONResponse({"message": message}, 422)

    @app.exception_handler(CoolingDown)
    async def cooling_down(_: Request, exc: CoolingDown) -> JSONResponse:
        message = (
            f"request {exc.request_id} was denied recently; it can be submitted again in "
            f"{exc.retry_after} s (approval.resubmit_after)"
        )
        return JSONResponse(
            {"message": message}, 429, headers={"Retry-After": str(exc.retry_after)}
        )

    @app.exception_handler(AlreadyDecided)
    async def decided(_: Request, exc: AlreadyDecided) -> JSONResponse:
        return JSONResponse({"message": str(exc)}, 409)

    @app.exception_handler(DecisionUnconfirmed)
    async def unconfirmed(_: Request, exc: DecisionUnconfirmed) -> JSONResponse:
        wait = int(DECISION_WAIT.total_seconds())
        message = (
            f"no worker took the decision within {wait} s (workers down or restarting?), so it "
            "is not confirmed. It may still take effect when a worker is back: look at "
            f"GET /api/admin/requests/{exc.args[0]} before deciding again."
        )
        return JSONResponse({"message": message}, 503, headers={"Retry-After": "30"})

    # Anyone may call the public endpoints: the caller learns what to do, the log learns why.
    def temporal_down(exc: Exception) -> JSONResponse:
        log.warning("Temporal at %s failed: %s", settings.temporal_address, _short(exc))
        return JSONResponse(
            {
                "message": "Temporal, which records every request, is not answering. Try again "
                "in a minute; sending the same request again is safe."
            },
            503,
            headers={"Retry-After": "30"},
        )

    @app.exception_handler(RPCError)
    async def temporal_error(_: Request, exc: RPCError) -> JSONResponse:
        if exc.status == RPCStatusCode.RESOURCE_EXHAUSTED:
            log.warning("Temporal is rate limiting us: %s", _short(exc))
            message = "too many requests at the moment; try again in a few seconds"
            return JSONResponse({"message": message}, 429, headers={"Retry-After": "5"})
        if exc.status in (RPCStatusCode.PERMISSION_DENIED, RPCStatusCode.UNAUTHENTICATED):
            # The service's own Temporal credentials, not the caller's: an operator must act.
            log.error(
                "Temporal refused the API's credentials (%s): check TEMPORAL_API_KEY or the TLS "
                "client certificate, and its permissions on the namespace",
                _short(exc),
            )
            message = (
                "the service is not allowed to record this in Temporal (a configuration error "
                "on our side, logged for the operators); nothing was changed"
            )
            return JSONResponse({"message": message}, 503)
        return temporal_down(exc)

    @app.exception_handler(RuntimeError)
    async def runtime_error(_: Request, exc: RuntimeError) -> JSONResponse:
        # The lazily connected client reports a refused connection as "Failed client connect".
        if "client connect" in str(exc):
            return temporal_down(exc)
        log.exception("unexpected error")
        return JSONResponse({"message": "internal error; the API log has the details"}, 500)


class BodySizeLimit:
    """413 for bodies over the limit, whether announced by Content-Length or streamed."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            return await self._reject(send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI passes an HTTPException raised while reading the body through.
                    raise HTTPException(413, self._message)
            return message

        await self.app(scope, limited_receive, send)

    @property
    def _message(self) -> str:
        return f"request body larger than {self.max_bytes} bytes"

    async def _reject(self, send) -> None:
        await JSONResponse({"message": self._message}, status_code=413)(
            {"type": "http"}, None, send
        )


def _openapi(app: FastAPI, settings: Settings) -> dict:
    """The generated schema, plus what only the configuration knows: the valid model ids."""
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        llm = schema["components"]["schemas"]["KeyRequestIn"]["properties"]["llm"]
        llm["enum"] = settings.model_ids
        app.openapi_schema = schema
    return app.openapi_schema


def create_app(settings: Settings | None = None, telemetry: Telemetry | None = None) -> FastAPI:
    """Without arguments (uvicorn --factory) this is the API process: it reads the settings and
    sets up the process's logs, metrics and traces. Tests pass their own."""
    process = settings is None
    try:
        settings = settings or load_settings()
        settings.check_secrets("request_id_key", "admin_token")
    except ConfigError as exc:
        # Under uvicorn an exception becomes a traceback; the message is all there is to say.
        print(exc, file=sys.stderr)
        raise SystemExit(2) from None
    if process:
        telemetry = start_telemetry(settings, "llm-key-requestor-api")
    telemetry = telemetry or Telemetry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Lazy: the API starts (and reports not-ready) while Temporal is still coming up.
        client = await connect_temporal(
            settings, lazy=True, retry_config=RETRIES, telemetry=telemetry
        )
        app.state.requests = KeyRequests(client, settings)
        yield

    # FastAPIOffline: /docs serves Swagger UI 5 from files shipped in the package, no CDN.
    app = FastAPIOffline(
        title="LLM Key Requestor",
        version="1.0.0",
        description="Request an LLM API key; a Temporal workflow takes it from here to your inbox.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth = Authenticator(settings)
    app.state.meter = telemetry.meter
    app.openapi = lambda: _openapi(app, settings)
    app.include_router(public)
    app.include_router(admin)
    app.include_router(audit_routes, prefix=admin.prefix, dependencies=admin.dependencies)
    pages.install(app)
    _install_error_handlers(app, settings)
    app.add_middleware(
        CORSMiddleware,
        allow_origins=list(settings.api_cors_origins),
        allow_methods=["GET", "POST"],
        allow_headers=["Authorization", "Content-Type"],
    )
    app.add_middleware(BodySizeLimit, max_bytes=settings.api_max_body_bytes)
    app.add_middleware(HttpMetrics, meter=telemetry.meter)
    telemetry.instrument_app(app)
    return app
