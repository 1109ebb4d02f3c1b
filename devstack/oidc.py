"""A small OpenID Connect issuer on loopback, for the local stack and the tests.

It speaks the part of OIDC the API relies on: discovery, a JWKS, the authorization code flow
(an authorize page where you pick or type who you are, then a token endpoint), and RS256 ID and
access tokens. It signs anyone in as anyone: never expose it beyond loopback.
"""

from __future__ import annotations

import html
import secrets
import time
from urllib.parse import urlencode, urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Route

from devstack.http import ServedApp, serve_in_thread

CLIENT_ID = "llm-key-requestor"
CLIENT_SECRET = "devstack-client-secret"  # noqa: S105 - local stack only
APPROVERS_GROUP = "llm-key-approvers"
# The identities offered on the sign-in page (any other can be typed in).
IDENTITIES = (
    ("approver@example.com", (APPROVERS_GROUP,)),
    ("second.approver@example.com", (APPROVERS_GROUP,)),
    ("requester@example.com", ()),
)


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class OIDCIssuer:
    def __init__(self, client_id: str = CLIENT_ID, client_secret: str = CLIENT_SECRET) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.key = new_key()
        self.kid = secrets.token_hex(4)
        self._codes: dict[str, dict] = {}
        self.jwks_served = 0  # how often the key set was fetched
        self._served: ServedApp | None = None
        self.url = ""

    def start(self, port: int | None = None) -> OIDCIssuer:
        self._served = serve_in_thread(self.app(), port=port)
        self.url = self._served.url
        return self

    def stop(self) -> None:
        if self._served:
            self._served.stop()

    def jwks(self) -> dict:
        public = jwt.algorithms.RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**public, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def token(
        self,
        email: str,
        groups: tuple[str, ...] = (),
        audience: str | None = None,
        lifetime: int = 3600,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = None,
        **claims,
    ) -> str:
        """A token as this issuer signs them; `key`, `kid` and `claims` let tests forge bad ones."""
        now = int(time.time())
        body = {
            "iss": self.url,
            "sub": email,
            "aud": audience or self.client_id,
            "iat": now,
            "exp": now + lifetime,
            "email": email,
            "groups": list(groups),
            **claims,
        }
        return jwt.encode(
            body, key or self.key, algorithm="RS256", headers={"kid": kid or self.kid}
        )

    # HTTP

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/.well-known/openid-configuration", self._discovery),
                Route("/jwks", self._jwks),
                Route("/authorize", self._authorize, methods=["GET", "POST"]),
                Route("/token", self._token, methods=["POST"]),
            ]
        )

    async def _discovery(self, _: Request) -> Response:
        return JSONResponse(
            {
                "issuer": self.url,
                "authorization_endpoint": f"{self.url}/authorize",
                "token_endpoint": f"{self.url}/token",
                "jwks_uri": f"{self.url}/jwks",
                "response_types_supported": ["code"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "scopes_supported": ["openid", "email", "profile", "groups"],
                "claims_supported": ["email", "groups", "sub"],
            }
        )

    async def _jwks(self, _: Request) -> Response:
        self.jwks_served += 1
        return JSONResponse(self.jwks())

    async def _authorize(self, request: Request) -> Response:
        params = dict(request.query_params)
        if request.method == "POST":
            params.update({k: v for k, v in (await request.form()).items() if isinstance(v, str)})
        problem = self._check_client(params)
        if problem:
            return HTMLResponse(f"<p>{html.escape(problem)}</p>", 400)
        if request.method == "GET":
            return HTMLResponse(_sign_in_page(params))
        email = params.get("email", "").strip()
        if "@" not in email:
            return HTMLResponse(_sign_in_page(params, "Type an email address."), 422)
        groups = tuple(g.strip() for g in params.get("groups", "").split(",") if g.strip())
        code = secrets.token_urlsafe(24)
        self._codes[code] = {
            "email": email,
            "groups": groups,
            "nonce": params.get("nonce", ""),
            "redirect_uri": params["redirect_uri"],
            "expires": time.time() + 60,
        }
        query = urlencode({"code": code, "state": params.get("state", "")})
        return RedirectResponse(f"{params['redirect_uri']}?{query}", 303)

    def _check_client(self, params: dict) -> str:
        if params.get("client_id") != self.client_id:
            return f"unknown client_id; this issuer serves {self.client_id!r}"
        target = urlsplit(params.get("redirect_uri", ""))
        if target.scheme != "http" or target.hostname not in ("127.0.0.1", "localhost"):
            return "redirect_uri must be an http URL on loopback"
        return ""

    async def _token(self, request: Request) -> Response:
        form = await request.form()
        grant = self._codes.pop(str(form.get("code", "")), None)
        if (
            form.get("grant_type") != "authorization_code"
            or form.get("client_id") != self.client_id
            or not secrets.compare_digest(str(form.get("client_secret", "")), self.client_secret)
        ):
            return JSONResponse({"error": "invalid_client"}, 401)
        if (
            grant is None
            or grant["expires"] < time.time()
            or grant["redirect_uri"] != form.get("redirect_uri")
        ):
            return JSONResponse({"error": "invalid_grant"}, 400)
        id_token = self.token(grant["email"], grant["groups"], nonce=grant["nonce"])
        return JSONResponse(
            {
                "id_token": id_token,
                "access_token": self.token(grant["email"], grant["groups"]),
                "token_type": "Bearer",
                "expires_in": 3600,
            }
        )


def _sign_in_page(params: dict, error: str = "") -> str:
    def hidden() -> str:
        keep = ("client_id", "redirect_uri", "state", "nonce", "scope", "response_type")
        return "".join(
            f'<input type="hidden" name="{k}" value="{html.escape(params.get(k, ""))}">'
            for k in keep
        )

    presets = "".join(
        f'<form method="post" action="/authorize">{hidden()}'
        f'<input type="hidden" name="email" value="{html.escape(email)}">'
        f'<input type="hidden" name="groups" value="{html.escape(",".join(groups))}">'
        f'<button type="submit">Sign in as {html.escape(email)}'
        f"{' (' + html.escape(', '.join(groups)) + ')' if groups else ''}</button></form>"
        for email, groups in IDENTITIES
    )
    alert = f'<p role="alert">{html.escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Local sign-in</title>
<style>body{{font-family:sans-serif;max-width:36rem;margin:2rem auto;color:#111}}
form{{margin:.5rem 0}} label{{display:block;margin-top:.75rem}}
input[type=text],input[type=email]{{width:100%;padding:.4rem}}
button{{padding:.4rem .8rem;margin-top:.5rem}}</style></head>
<body><main><h1>Local sign-in (development issuer)</h1>
<p>This issuer signs anyone in as anyone. Pick an identity or type one.</p>{alert}
{presets}
<form method="post" action="/authorize">{hidden()}
<label for="email">Email</label><input id="email" name="email" type="email" required>
<label for="groups">Groups (comma-separated)</label><input id="groups" name="groups" type="text">
<button type="submit">Sign in</button></form></main></body></html>"""
