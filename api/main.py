"""The REST API: submit a key request, follow it, and (with the admin token) decide it.

uvicorn api.main:create_app --factory --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.exceptions import HTTPException as StarletteHTTPException
from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.service import RPCError

from api.audit import routes as audit_routes
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
)
from api.service import AlreadyDecided, BadPageToken, KeyRequests, UnknownRequest
from connection import connect_temporal
from domain import Decision, RequestState, RequestStatus, is_request_id, workflow_id
from settings import Settings, load_settings
from telemetry import Telemetry, web_ui_url
from telemetry import start as start_telemetry

log = logging.getLogger("api")

ERRORS = {
    400: {"model": ErrorOut, "description": "The body is not readable JSON text"},
    401: {"model": ErrorOut, "description": "No bearer token"},
    403: {"model": ErrorOut, "description": "Wrong token, or the admin API is disabled"},
    404: {"model": ErrorOut, "description": "No such request"},
    409: {"model": ErrorOut, "description": "The request is already decided"},
    413: {"model": ErrorOut, "description": "Body too large"},
    422: {"model": ErrorOut, "description": "Invalid input; the message names the field"},
    503: {"model": ErrorOut, "description": "Temporal is unreachable; retry shortly"},
}


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_requests(request: Request) -> KeyRequests:
    return request.app.state.requests


SettingsDep = Annotated[Settings, Depends(get_settings)]
RequestsDep = Annotated[KeyRequests, Depends(get_requests)]
_bearer = HTTPBearer(auto_error=False)


def require_admin(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    expected = settings.admin_token.get_secret_value()
    if not expected:
        raise HTTPException(403, "the admin API is disabled; set ADMIN_TOKEN to enable it")
    if credentials is None:
        raise HTTPException(
            401,
            "admin token required: Authorization: Bearer <ADMIN_TOKEN>",
            headers={"WWW-Authenticate": "Bearer"},
        )
    if not secrets.compare_digest(credentials.credentials.encode(), expected.encode()):
        raise HTTPException(403, "invalid admin token")


def _out(status: RequestStatus, settings: Settings) -> RequestStatusOut:
    return RequestStatusOut(
        request_id=status.request_id,
        state=str(status.state),
        model=status.model,
        requested_at=status.requested_at,
        updated_at=status.updated_at,
        decided_at=status.decided_at,
        decision_source=status.decision_source,
        reviewer=status.reviewer,
        reason=status.reason,
        key_expires=status.key_expires,
        deadline=status.deadline,
        workflow_id=workflow_id(status.request_id),
        web_ui_url=web_ui_url(settings, workflow_id(status.request_id)),
    )


def _checked_id(request_id: str) -> str:
    if not is_request_id(request_id):
        raise HTTPException(404, f"no request {request_id[:40]!r}: not a request id")
    return request_id


public = APIRouter()
admin = APIRouter(prefix="/api/admin", tags=["admin"], dependencies=[Depends(require_admin)])


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
    except Exception as exc:  # any failure means "not ready"; the message says which
        return JSONResponse(
            {"status": "not ready", "temporal": f"unreachable: {_short(exc)}"}, status_code=503
        )
    return JSONResponse({"status": "ready", "temporal": "reachable"})


@public.get("/api/models", tags=["models"])
async def models(settings: SettingsDep) -> ModelList:
    return ModelList(models=[ModelInfo(**m.model_dump()) for m in settings.models])


@public.post("/api/request-key", tags=["requests"], responses=ERRORS)
async def request_key(
    body: KeyRequestIn, settings: SettingsDep, requests: RequestsDep, request: Request
) -> KeyRequestOut:
    """Start a key request. A repeat while one is pending or approved returns that one."""
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
    status, started = await requests.submit(str(body.email), body.llm)
    count_submission(request.app.state.meter, body.llm, started)
    if started:
        message = "Request received. You will get an email when it is decided."
    else:
        message = f"A request for this email and model is already {status.state}."
    return KeyRequestOut(
        request_id=status.request_id,
        status=str(status.state),
        model=status.model,
        message=message,
        workflow_id=workflow_id(status.request_id),
    )


@public.get("/api/requests/{request_id}", tags=["requests"], responses=ERRORS)
async def get_request(request_id: str, requests: RequestsDep) -> RequestStatusOut:
    """State, model, timestamps and decision of one request. Never the key."""
    return _out(await requests.status(_checked_id(request_id)), requests.settings)


@admin.get("/requests", responses=ERRORS)
async def list_requests(
    requests: RequestsDep,
    state: RequestState | None = None,
    page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    page_token: Annotated[str | None, Query(max_length=4096)] = None,
) -> RequestPage:
    rows, token = await requests.list(state, page_size, page_token)
    return RequestPage(requests=[_out(r, requests.settings) for r in rows], next_page_token=token)


@admin.get("/requests/{request_id}", responses=ERRORS)
async def admin_get_request(request_id: str, requests: RequestsDep) -> RequestStatusOut:
    return _out(await requests.status(_checked_id(request_id)), requests.settings)


@admin.post("/requests/{request_id}/approve", responses=ERRORS)
async def approve(
    request_id: str, requests: RequestsDep, body: ReviewIn | None = None
) -> RequestStatusOut:
    body = body or ReviewIn()
    decision = Decision(True, body.reviewer or "admin-api", body.reason, "api")
    return _out(await requests.decide(_checked_id(request_id), decision), requests.settings)


@admin.post("/requests/{request_id}/deny", responses=ERRORS)
async def deny(request_id: str, body: DenyIn, requests: RequestsDep) -> RequestStatusOut:
    decision = Decision(False, body.reviewer or "admin-api", body.reason, "api")
    return _out(await requests.decide(_checked_id(request_id), decision), requests.settings)


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

    @app.exception_handler(AlreadyDecided)
    async def decided(_: Request, exc: AlreadyDecided) -> JSONResponse:
        return JSONResponse({"message": str(exc)}, 409)

    def temporal_down(exc: Exception) -> JSONResponse:
        log.warning("Temporal call failed: %s", _short(exc))
        return JSONResponse(
            {
                "message": f"Temporal at {settings.temporal_address} is unreachable or failing; "
                "nothing was recorded, retry in a moment"
            },
            503,
        )

    app.add_exception_handler(RPCError, lambda _, exc: temporal_down(exc))

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
    if settings is None:
        settings = load_settings()
        telemetry = start_telemetry(settings, "llm-key-requestor-api")
    telemetry = telemetry or Telemetry()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Lazy: the API starts (and reports not-ready) while Temporal is still coming up.
        client = await connect_temporal(settings, lazy=True, telemetry=telemetry)
        app.state.requests = KeyRequests(client, settings)
        yield

    app = FastAPI(
        title="LLM Key Requestor",
        version="1.0.0",
        description="Request an LLM API key; a Temporal workflow takes it from here to your inbox.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.meter = telemetry.meter
    app.openapi = lambda: _openapi(app, settings)
    app.include_router(public)
    app.include_router(admin)
    app.include_router(audit_routes, prefix=admin.prefix, dependencies=admin.dependencies)
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
