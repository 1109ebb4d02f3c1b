"""The web pages: a request form, a status page per request, and the approvers' inbox.

Server-rendered (Jinja2 escapes every value), no JavaScript needed, no CDN. People sign in the
way the API is configured: the OIDC authorization code flow (a signed session cookie follows),
or an authenticating proxy's headers. Every form post carries a CSRF token: a random value,
signed, sent both as a cookie and as a form field (a cross-site form can send the cookie but
cannot read it to fill the field).
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode

from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from itsdangerous import BadSignature, URLSafeTimedSerializer
from pydantic import ValidationError

from api.auth import Authenticator, AuthError, Principal, all_approvers, decide_as, session_key
from api.schemas import KeyRequestIn
from api.service import AlreadyDecided, BadPageToken, KeyRequests, UnknownRequest
from domain import JUSTIFICATION_MAX, RequestState, RequestStatus, is_request_id
from settings import Settings

if TYPE_CHECKING:
    from fastapi.templating import Jinja2Templates

    from api.oidc import Issuer

HERE = Path(__file__).parent
SESSION_COOKIE = "llmkr_session"
CSRF_COOKIE = "llmkr_csrf"
LOGIN_COOKIE = "llmkr_login"
REASON_MAX = 2000
INBOX_PAGE = 100  # waiting requests per inbox page

router = APIRouter(include_in_schema=False)


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")


def _age(iso: str) -> str:
    """'5 min', '3 h', '2 d' since an ISO timestamp."""
    try:
        then = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    except ValueError:
        return ""
    seconds = max(0, int((datetime.now(UTC) - then).total_seconds()))
    if seconds < 60:
        return "under a minute"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h"
    return f"{seconds // 86400} d"


@cache
def _templates() -> Jinja2Templates:
    """Jinja2, loaded at the first page rather than at start: about 2 MB of the API process
    that one answering only JSON never needs."""
    from fastapi.templating import Jinja2Templates

    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.filters["age"] = _age
    return templates


# Sessions and CSRF


def _serializer(request: Request, salt: str) -> URLSafeTimedSerializer:
    return URLSafeTimedSerializer(session_key(request.app.state.settings), salt=salt)


def _lifetime(request: Request) -> int:
    return int(request.app.state.settings.auth_session_lifetime.total_seconds())


def principal_of(request: Request) -> Principal | None:
    """Who is signed in: the trusted proxy's headers, else the session cookie."""
    auth: Authenticator = request.app.state.auth
    principal = auth.from_proxy(request)  # AuthError when the headers come from elsewhere
    if principal is not None:
        return principal
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    try:
        data = _serializer(request, "session").loads(cookie, max_age=_lifetime(request))
    except BadSignature:
        return None
    return Principal(data["email"], frozenset(data.get("groups", ())), "session")


def _csrf(request: Request) -> tuple[str, bool]:
    """The CSRF token of this browser, and whether it is new (to be set as a cookie)."""
    current = request.cookies.get(CSRF_COOKIE, "")
    try:
        _serializer(request, "csrf").loads(current, max_age=_lifetime(request))
        return current, False
    except BadSignature:
        return _serializer(request, "csrf").dumps(secrets.token_hex(16)), True


def _csrf_ok(request: Request, form: Any) -> bool:
    cookie = request.cookies.get(CSRF_COOKIE, "")
    field = form.get("csrf", "")
    if not cookie or not isinstance(field, str) or not secrets.compare_digest(cookie, field):
        return False
    try:
        _serializer(request, "csrf").loads(cookie, max_age=_lifetime(request))
    except BadSignature:
        return False
    return True


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def render(request: Request, template: str, status_code: int = 200, **context) -> HTMLResponse:
    token, new = _csrf(request)
    settings: Settings = request.app.state.settings
    auth: Authenticator = request.app.state.auth
    try:
        signed_in = context.pop("principal", None) or principal_of(request)
    except AuthError:
        signed_in = None
    response = _templates().TemplateResponse(
        request,
        template,
        {
            "csrf": token,
            "principal": signed_in,
            "oidc": auth.oidc_enabled,
            "models": settings.models,
            "justification_max": JUSTIFICATION_MAX,
            "reason_max": REASON_MAX,
            **context,
        },
        status_code=status_code,
    )
    if new:
        response.set_cookie(
            CSRF_COOKIE, token, httponly=True, samesite="strict", secure=_secure(request)
        )
    # No framing (a hidden inbox under a decoy page would turn clicks into approvals), no
    # scripts, nothing from elsewhere.
    response.headers["Content-Security-Policy"] = (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def _refused(request: Request, status_code: int, message: str) -> HTMLResponse:
    return render(request, "error.html", status_code, message=message)


async def _form(request: Request) -> Any | HTMLResponse:
    form = await request.form()
    if not _csrf_ok(request, form):
        return _refused(
            request,
            403,
            "This form has expired or did not come from this site. Reload the page and try again.",
        )
    return form


def _requests(request: Request) -> KeyRequests:
    return request.app.state.requests


# The requester's pages


@router.get("/request")
async def request_form(request: Request) -> HTMLResponse:
    try:
        principal = principal_of(request)
    except AuthError:
        principal = None
    email = principal.email if principal and not principal.is_automation else ""
    return render(request, "request_form.html", values={"email": email}, errors={})


@router.post("/request")
async def submit_request(request: Request) -> Response:
    form = await _form(request)
    if isinstance(form, Response):
        return form
    values = {k: str(form.get(k, "")) for k in ("email", "llm", "justification")}
    errors: dict[str, str] = {}
    settings: Settings = request.app.state.settings
    try:
        body = KeyRequestIn(**values)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            field = str(error["loc"][0]) if error["loc"] else "email"
            errors.setdefault(field, error["msg"].removeprefix("Value error, "))
    else:
        if body.llm not in settings.model_ids:
            errors["llm"] = "Choose one of the models listed."
    if errors:
        return render(request, "request_form.html", 422, values=values, errors=errors)
    requests = _requests(request)
    status, outcome = await requests.submit(str(body.email), body.llm, body.justification)
    if outcome in ("started", "restarted"):
        await requests.settled(status, settings.api_decision_wait.total_seconds())
    return RedirectResponse(f"/request/{status.request_id}", 303)


@router.get("/request/{request_id}")
async def request_status(request: Request, request_id: str) -> HTMLResponse:
    if not is_request_id(request_id):
        return _refused(request, 404, "There is no such request.")
    try:
        status = await _requests(request).status(request_id)
    except UnknownRequest:
        return _refused(request, 404, "There is no such request.")
    return render(request, "request_status.html", status=status)


# The approvers' inbox


def _approver(request: Request) -> Principal | Response:
    """The signed-in approver, or the page that says why not."""
    try:
        principal = principal_of(request)
    except AuthError as exc:
        return _refused(request, exc.status_code, str(exc.detail))
    auth: Authenticator = request.app.state.auth
    if principal is None:
        if auth.oidc_enabled:
            return RedirectResponse("/login?" + urlencode({"next": request.url.path}), 303)
        return _refused(
            request,
            401,
            "Sign-in is not configured: set auth.oidc_issuer, or put an authenticating proxy "
            "in front of this service and list it in auth.trusted_proxies.",
        )
    if not principal.is_one_of(all_approvers(request.app.state.settings)):
        return _refused(
            request,
            403,
            f"{principal.email} is not an approver of any request.",
            principal=principal,
        )
    return principal


@router.get("/inbox")
async def inbox(request: Request, decided: str = "", page: str = "") -> Response:
    """The waiting requests, INBOX_PAGE at a time: the newest first, each page's oldest at its
    top; and the latest decisions."""
    principal = _approver(request)
    if isinstance(principal, Response):
        return principal
    requests = _requests(request)
    settings: Settings = request.app.state.settings
    try:
        pending, older = await requests.list(RequestState.PENDING, INBOX_PAGE, page or None)
    except BadPageToken:
        return _refused(request, 400, "That inbox page link is not valid; start again at /inbox.")
    waiting = await requests.count(RequestState.PENDING)
    pending = await requests.detailed(pending)
    recent: list[RequestStatus] = []
    for state in (RequestState.APPROVED, RequestState.DENIED):
        rows, _ = await requests.list(state, 10, None)
        recent += rows
    recent = sorted(
        await requests.detailed(recent), key=lambda r: r.decided_at or r.updated_at, reverse=True
    )[:10]
    rows = []
    for status in sorted(pending, key=lambda r: r.requested_at):
        own = bool(status.email) and status.email.lower() == principal.email.lower()
        mine = principal.is_one_of(settings.approvers_for(status.email, status.model))
        approved = principal.reviewer.lower() in (a.lower() for a in status.approvals)
        rows.append(
            {"status": status, "own": own, "may_decide": mine and not own, "approved": approved}
        )
    return render(
        request,
        "inbox.html",
        principal=principal,
        pending=rows,
        waiting=max(waiting, len(rows)),
        older=older,
        first_page=not page,
        recent=recent,
        decided=decided if is_request_id(decided) else "",
    )


@router.post("/inbox/{request_id}")
async def decide(request: Request, request_id: str) -> Response:
    form = await _form(request)
    if isinstance(form, Response):
        return form
    principal = _approver(request)
    if isinstance(principal, Response):
        return principal
    verdict = form.get("decision")
    reason = str(form.get("reason", "")).strip()[:REASON_MAX]
    if verdict not in ("approve", "deny") or not is_request_id(request_id):
        return _refused(request, 422, "Choose approve or deny for a listed request.")
    if verdict == "deny" and not reason:
        return _refused(request, 422, "A denial needs a reason: the requester is told it.")
    try:
        await decide_as(
            principal, request_id, verdict == "approve", reason, "web", _requests(request)
        )
    except HTTPException as exc:
        return _refused(request, exc.status_code, str(exc.detail))
    except UnknownRequest:
        return _refused(request, 404, "There is no such request.")
    except AlreadyDecided as exc:
        return _refused(request, 409, str(exc))
    return RedirectResponse("/inbox?" + urlencode({"decided": request_id}), 303)


# Browser sign-in (OIDC authorization code flow)


def _safe_next(target: str) -> str:
    # Only a path on this site: an open redirect would lend our sign-in to phishing.
    return target if target.startswith("/") and not target.startswith("//") else "/inbox"


def _issuer(request: Request) -> Issuer | None:
    return request.app.state.auth.issuer


def _sign_in_off(request: Request) -> Response:
    return _refused(request, 404, "Sign-in here is off: this service signs people in "
                    "through an authenticating proxy, or only takes API tokens.")  # fmt: skip


@router.get("/login")
async def login(request: Request, next: str = "/inbox") -> Response:
    issuer = _issuer(request)
    if issuer is None:
        return _sign_in_off(request)
    settings: Settings = request.app.state.settings
    discovery = await issuer.discovery()
    state, nonce = secrets.token_urlsafe(16), secrets.token_urlsafe(16)
    query = urlencode(
        {
            "response_type": "code",
            "client_id": settings.auth_oidc_client_id,
            "redirect_uri": str(request.url_for("auth_callback")),
            "scope": "openid email profile groups",
            "state": state,
            "nonce": nonce,
        }
    )
    response = RedirectResponse(f"{discovery['authorization_endpoint']}?{query}", 303)
    cookie = _serializer(request, "login").dumps({"s": state, "n": nonce, "next": _safe_next(next)})
    response.set_cookie(
        LOGIN_COOKIE, cookie, max_age=600, httponly=True, samesite="lax", secure=_secure(request)
    )
    return response


@router.get("/auth/callback", name="auth_callback")
async def auth_callback(request: Request, code: str = "", state: str = "") -> Response:
    issuer, auth = _issuer(request), request.app.state.auth
    if issuer is None:
        return _sign_in_off(request)
    settings: Settings = request.app.state.settings
    try:
        started = _serializer(request, "login").loads(
            request.cookies.get(LOGIN_COOKIE, ""), max_age=600
        )
    except BadSignature:
        return _refused(request, 400, "This sign-in was not started here or took too long.")
    if not code or not secrets.compare_digest(state, started["s"]):
        return _refused(request, 400, "The issuer's answer does not match this sign-in.")
    try:
        id_token = await issuer.exchange_code(code, str(request.url_for("auth_callback")))
        claims = await issuer.verify_token(id_token, audience=settings.auth_oidc_client_id)
        if not secrets.compare_digest(str(claims.get("nonce", "")), started["n"]):
            raise AuthError(401, "token refused: nonce does not match this sign-in")
        principal = auth.principal_from_claims(claims, "session")
    except AuthError as exc:
        return _refused(request, exc.status_code, str(exc.detail))
    response = RedirectResponse(started["next"], 303)
    session = _serializer(request, "session").dumps(
        {"email": principal.email, "groups": sorted(principal.groups)}
    )
    response.set_cookie(
        SESSION_COOKIE,
        session,
        max_age=_lifetime(request),
        httponly=True,
        samesite="lax",
        secure=_secure(request),
    )
    response.delete_cookie(LOGIN_COOKIE)
    return response


@router.post("/logout")
async def logout(request: Request) -> Response:
    form = await _form(request)
    if isinstance(form, Response):
        return form
    response = RedirectResponse("/request", 303)
    response.delete_cookie(SESSION_COOKIE)
    return response
