"""The OIDC issuer, as the API talks to it: discovery, the key set, tokens and the code exchange.

Imported only when `auth.oidc_issuer` is set (api/auth.py): PyJWT's signature checks bring in
`cryptography`, about 11 MB of every API process that would never use it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import jwt

from api.auth import AuthError
from connection import tls_context
from settings import Settings

# Asymmetric only: with a symmetric algorithm the issuer's public key would become a password
# anyone can read, and "none" is no signature at all.
ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512"]
_LEEWAY = 30  # seconds of clock skew tolerated on exp/iat/nbf
# The key set is refetched when older than this, and for an unknown kid at most this often.
_JWKS_LIFESPAN = 300
_JWKS_REFETCH = 60


class Issuer:
    """One per app, held by the Authenticator."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._discovery: dict[str, Any] | None = None
        self._jwks: jwt.PyJWKClient | None = None
        self._refetched = float("-inf")
        self._lock = asyncio.Lock()

    @property
    def audience(self) -> str:
        return self.settings.auth_oidc_audience or self.settings.auth_oidc_client_id

    async def discovery(self) -> dict[str, Any]:
        """The issuer's discovery document (fetched once)."""
        if self._discovery is None:
            issuer = self.settings.auth_oidc_issuer
            url = f"{issuer}/.well-known/openid-configuration"
            try:
                async with httpx.AsyncClient(verify=tls_context(), timeout=10) as client:
                    response = await client.get(url)
                    response.raise_for_status()
                    document = response.json()
            except (httpx.HTTPError, ValueError) as exc:
                raise AuthError(
                    503, f"OIDC issuer {issuer} unreachable or answering badly ({exc}); retry"
                ) from None
            if document.get("issuer", "").rstrip("/") != issuer:
                raise AuthError(
                    503,
                    f"auth.oidc_issuer is {issuer!r} but the issuer calls itself "
                    f"{document.get('issuer')!r}; make them equal",
                )
            self._discovery = document
        return self._discovery

    async def exchange_code(self, code: str, redirect_uri: str) -> str:
        """The ID token the issuer gives for an authorization code; AuthError(502) if none."""
        discovery = await self.discovery()
        try:
            async with httpx.AsyncClient(verify=tls_context(), timeout=10) as client:
                answer = await client.post(
                    discovery["token_endpoint"],
                    data={
                        "grant_type": "authorization_code",
                        "code": code,
                        "redirect_uri": redirect_uri,
                        "client_id": self.settings.auth_oidc_client_id,
                        "client_secret": self.settings.auth_oidc_client_secret.get_secret_value(),
                    },
                )
            answer.raise_for_status()
            return answer.json()["id_token"]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            raise AuthError(
                502, f"The issuer did not give a token ({type(exc).__name__})."
            ) from None

    async def _jwks_client(self) -> jwt.PyJWKClient:
        async with self._lock:
            if self._jwks is None:
                url = self.settings.auth_oidc_jwks_url or (await self.discovery())["jwks_uri"]
                self._jwks = jwt.PyJWKClient(
                    url, lifespan=_JWKS_LIFESPAN, timeout=10, ssl_context=tls_context()
                )
            return self._jwks

    async def verify_token(self, token: str, audience: str | None = None) -> dict[str, Any]:
        """The claims of a JWT the issuer signed for us; AuthError(401) naming what is wrong."""
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.DecodeError as exc:
            raise AuthError(401, f"token refused: neither ADMIN_TOKEN nor a JWT ({exc})") from None
        key = await self._signing_key(kid)
        if key is None:
            raise AuthError(
                401, f"token refused: key {str(kid)[:40]!r} is not in the issuer's JWKS"
            )
        try:
            return jwt.decode(
                token,
                key.key,
                algorithms=ALGORITHMS,
                audience=audience or self.audience,
                issuer=self.settings.auth_oidc_issuer,
                leeway=_LEEWAY,
                options={"require": ["exp", "iss", "aud"]},
            )
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"token refused: {exc}") from None

    async def _signing_key(self, kid: Any) -> jwt.PyJWK | None:
        """The issuer's key `kid`. An unknown kid refetches the key set (the issuer may have
        rotated its keys), at most once per _JWKS_REFETCH: otherwise every made-up kid would
        make us call the issuer."""
        client = await self._jwks_client()

        def find(refresh: bool) -> jwt.PyJWK | None:
            keys = client.get_signing_keys(refresh=refresh)
            return next((k for k in keys if k.key_id == kid), None)

        try:
            # PyJWKClient is synchronous (urllib): off the event loop.
            key = await asyncio.to_thread(find, False)
            now = time.monotonic()
            if key is None and now - self._refetched > _JWKS_REFETCH:
                self._refetched = now
                key = await asyncio.to_thread(find, True)
        except jwt.PyJWKClientConnectionError as exc:
            raise AuthError(503, f"cannot fetch the issuer's JWKS ({exc}); retry") from None
        except jwt.PyJWKClientError as exc:
            raise AuthError(503, f"the issuer's JWKS is unusable ({exc})") from None
        return key
