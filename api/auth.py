"""Who is calling: an authenticated principal, from sign-on and never from a request body.

Three ways in, tried in this order:

1. an OIDC bearer token (a JWT), checked against the issuer's JWKS, issuer, audience and expiry
   (api/oidc.py);
2. the headers of an authenticating proxy (oauth2-proxy's `X-Auth-Request-Email` and
   `X-Auth-Request-Groups`), believed only from the addresses in `auth.trusted_proxies`;
3. `ADMIN_TOKEN`, for automation, recorded as `auth.admin_token_name`.

The web pages add a fourth, a signed session cookie set by the browser sign-in (api/pages.py),
which the JSON admin API never accepts: a cookie rides along on cross-site requests, a bearer
token does not.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from temporalio.client import WorkflowUpdateFailedError
from temporalio.exceptions import ApplicationError

import audit
from api.service import KeyRequests
from domain import Decision, RequestStatus
from settings import Settings

if TYPE_CHECKING:
    from api.oidc import Issuer

EMAIL_HEADER = "X-Auth-Request-Email"
GROUPS_HEADER = "X-Auth-Request-Groups"


class AuthError(HTTPException):
    """401 (no or unusable credentials) or 403 (credentials fine, permission not)."""

    def __init__(self, status: int, message: str) -> None:
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        super().__init__(status, message, headers=headers)


@dataclass(frozen=True)
class Principal:
    """An authenticated caller. `reviewer` is what a decision by them records."""

    email: str
    groups: frozenset[str] = field(default_factory=frozenset)
    # oidc (bearer token), proxy (trusted headers), session (browser sign-in), admin-token.
    method: str = "oidc"
    name: str = ""

    @property
    def reviewer(self) -> str:
        return self.name or self.email

    @property
    def is_automation(self) -> bool:
        return self.method == "admin-token"

    def is_one_of(self, approvers: tuple[str, ...]) -> bool:
        """Whether an approvers list (emails and/or groups) names this principal."""
        email = self.email.lower()
        for entry in approvers:
            if "@" in entry:
                if entry.lower() == email:
                    return True
            elif entry in self.groups:
                return True
        return False


def all_approvers(settings: Settings) -> tuple[str, ...]:
    return settings.approval_approvers + tuple(
        a for rule in settings.approval_rules for a in rule.approvers
    )


def session_key(settings: Settings) -> str:
    """The key that signs session and CSRF cookies: configured, else derived."""
    configured = settings.auth_session_secret.get_secret_value()
    if configured:
        return configured
    seed = settings.request_id_key.get_secret_value().encode()
    return hmac.new(seed, b"llm-key-requestor session", hashlib.sha256).hexdigest()


class Authenticator:
    """Turns a request's credentials into a Principal. One per app (held in app.state)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._networks = [
            ipaddress.ip_network(c, strict=False) for c in settings.auth_trusted_proxies
        ]
        self.issuer: Issuer | None = None
        if settings.auth_oidc_issuer:
            from api.oidc import Issuer  # with cryptography: only where OIDC is on

            self.issuer = Issuer(settings)

    @property
    def oidc_enabled(self) -> bool:
        return self.issuer is not None

    @property
    def proxy_enabled(self) -> bool:
        return bool(self._networks)

    @property
    def admin_token_enabled(self) -> bool:
        return bool(self.settings.admin_token.get_secret_value())

    # OIDC

    def principal_from_claims(self, claims: dict[str, Any], method: str) -> Principal:
        email = claims.get("email")
        if not isinstance(email, str) or "@" not in email:
            raise AuthError(401, "token refused: it has no `email` claim")
        groups = claims.get(self.settings.auth_group_claim) or []
        if isinstance(groups, str):
            groups = groups.split(",")
        if not isinstance(groups, list):
            raise AuthError(
                401, f"token refused: claim {self.settings.auth_group_claim!r} is not a list"
            )
        return Principal(email, frozenset(str(g).strip() for g in groups if g), method)

    # Proxy headers

    def _trusted_proxy(self, request: Request) -> bool:
        # The direct peer, never X-Forwarded-For: that header is as forgeable as the others.
        host = request.client.host if request.client else ""
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            return False
        return any(address in network for network in self._networks)

    def from_proxy(self, request: Request) -> Principal | None:
        email = request.headers.get(EMAIL_HEADER)
        if email is None:
            return None
        if not self._trusted_proxy(request):
            peer = request.client.host if request.client else "?"
            raise AuthError(
                403,
                f"{EMAIL_HEADER} from {peer} refused: only the proxies in auth.trusted_proxies "
                "(env AUTH_TRUSTED_PROXIES) may vouch for a user",
            )
        email = email.strip()
        if "@" not in email:
            raise AuthError(401, f"{EMAIL_HEADER} is not an email address")
        groups = request.headers.get(GROUPS_HEADER, "")
        return Principal(
            email, frozenset(g.strip() for g in groups.split(",") if g.strip()), "proxy"
        )

    # The JSON API

    async def from_bearer_or_proxy(self, request: Request, token: str | None) -> Principal:
        if not (self.oidc_enabled or self.proxy_enabled or self.admin_token_enabled):
            raise AuthError(
                403,
                "the admin API is disabled; set ADMIN_TOKEN, AUTH_OIDC_ISSUER or "
                "AUTH_TRUSTED_PROXIES to enable it",
            )
        if token:
            if self.admin_token_enabled and secrets.compare_digest(
                token.encode(), self.settings.admin_token.get_secret_value().encode()
            ):
                return Principal(
                    "", frozenset(), "admin-token", self.settings.auth_admin_token_name
                )
            if self.issuer is not None:
                return self.principal_from_claims(await self.issuer.verify_token(token), "oidc")
            raise AuthError(403, "invalid bearer token: not ADMIN_TOKEN (and OIDC is off)")
        principal = self.from_proxy(request)
        if principal is not None:
            return principal
        raise AuthError(
            401,
            "authentication required: Authorization: Bearer <OIDC token or ADMIN_TOKEN>",
        )


# Also what /docs shows as the admin API's "Authorize" (an OIDC token or ADMIN_TOKEN).
_bearer = HTTPBearer(auto_error=False, description="An OIDC access token, or ADMIN_TOKEN")


async def get_authenticator(request: Request) -> Authenticator:
    return request.app.state.auth


async def require_approver(
    request: Request,
    auth: Annotated[Authenticator, Depends(get_authenticator)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """The admin API's caller: ADMIN_TOKEN, or someone named in some approvers list."""
    principal = await auth.from_bearer_or_proxy(request, bearer.credentials if bearer else None)
    if not principal.is_automation and not principal.is_one_of(all_approvers(auth.settings)):
        raise AuthError(
            403,
            f"{principal.email} is not an approver; approvers are listed in approval.approvers "
            "and each rule's `approvers`",
        )
    return principal


ApproverDep = Annotated[Principal, Depends(require_approver)]


def check_may_decide(
    principal: Principal, status: RequestStatus, settings: Settings, source: str
) -> None:
    """403 unless `principal` may decide this request: an approver of its rule, not its owner."""
    if not status.email:
        raise HTTPException(
            503, "the worker did not answer, so the requester is unknown; retry in a moment"
        )
    refusal, why = "", ""
    if principal.email and principal.email.lower() == status.email.lower():
        refusal = "nobody may decide their own request; ask another approver"
        why = "own request"
    elif not principal.is_automation:
        approvers = settings.approvers_for(status.email, status.model)
        if not principal.is_one_of(approvers):
            why = "not an approver of the request's rule"
            refusal = (
                f"{principal.email} is not an approver of this request; its approvers are "
                f"{', '.join(approvers) or 'nobody (set approval.approvers)'}"
            )
    if refusal:
        audit.record(
            audit.DECISION_REFUSED,
            request_id=status.request_id,
            actor=principal.reviewer,
            source=source,
            sign_on=principal.method,
            why=why,
        )
        raise HTTPException(403, refusal)


async def decide_as(
    principal: Principal,
    request_id: str,
    approved: bool,
    reason: str,
    source: str,
    requests: KeyRequests,
) -> RequestStatus:
    """Decide as the authenticated principal: the one path of the admin API and the inbox."""
    status = await requests.status(request_id)
    check_may_decide(principal, status, requests.settings, source)
    try:
        return await requests.decide(
            request_id, Decision(approved, principal.reviewer, reason, source)
        )
    except WorkflowUpdateFailedError as exc:
        # The workflow's own check (the status above could have been stale).
        if isinstance(exc.cause, ApplicationError) and exc.cause.type == "SelfApproval":
            raise HTTPException(403, f"{exc.cause.message}; ask another approver") from None
        raise
