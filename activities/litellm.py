"""LiteLLM proxy client: mint and look up virtual keys over its management API."""

from __future__ import annotations

import hashlib
import logging
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime

import httpx
from temporalio.exceptions import ApplicationError

from activities.transient import Transient

log = logging.getLogger(__name__)


class KeyRejected(ApplicationError):
    """LiteLLM refused to mint the key for a reason a retry cannot fix (a 4xx but 408/425/429)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="KeyRejected", non_retryable=True)


class LiteLLMUnavailable(Transient):
    """LiteLLM could not be reached, failed on its side, or asked us to come back later."""


# Answers that mean "not now" rather than "no": request timeout, too early, rate limited.
_LATER = (408, 425, 429)
# A longer Retry-After is cut short: one answer should not park a request for hours.
_LONGEST_WAIT = timedelta(minutes=10)


def _retry_after(response: httpx.Response) -> timedelta | None:
    """Retry-After (seconds, or an HTTP date) as a delay; None if absent or unreadable."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        delay = timedelta(seconds=int(value))
    else:
        try:
            delay = parsedate_to_datetime(value) - datetime.now(UTC)
        except (TypeError, ValueError):
            return None
    return max(timedelta(0), min(delay, _LONGEST_WAIT))


def token_hash(key: str) -> str:
    """LiteLLM identifies keys by the sha256 of their value."""
    return hashlib.sha256(key.encode()).hexdigest()


def _error_message(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:300]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("message", ""))[:300]
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])[:300]
    return str(body)[:300]


def _is_duplicate_alias(response: httpx.Response) -> bool:
    try:
        error = response.json().get("error", {})
    except (ValueError, AttributeError):
        return False
    return response.status_code == 400 and error.get("param") == "key_alias"


class LiteLLMClient:
    def __init__(self, http: httpx.AsyncClient, master_key: str) -> None:
        # `http` carries base_url, timeout and TLS trust; built once in worker.py.
        self.http = http
        self._headers = {"Authorization": f"Bearer {master_key}"}

    async def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = await self.http.request(method, path, headers=self._headers, **kwargs)
        except httpx.TimeoutException as exc:
            raise LiteLLMUnavailable(
                f"LiteLLM {path}: no answer in time ({type(exc).__name__})"
            ) from None
        except httpx.TransportError as exc:
            raise LiteLLMUnavailable(
                f"LiteLLM {path}: cannot reach {self.http.base_url} ({type(exc).__name__}); "
                "check LITELLM_BASE_URL"
            ) from None
        if response.status_code >= 500 or response.status_code in _LATER:
            raise LiteLLMUnavailable(
                f"LiteLLM {path} answered {response.status_code}: {_error_message(response)}",
                retry_after=_retry_after(response),
            )
        if response.status_code in (401, 403):
            # A configuration problem, not the request's: keep retrying so that fixing
            # LITELLM_API_KEY and restarting the worker completes the waiting requests.
            raise LiteLLMUnavailable(
                f"LiteLLM {path} answered {response.status_code}: the master key was refused; "
                "check LITELLM_API_KEY"
            )
        return response

    async def key_info(self, key: str) -> dict | None:
        """The proxy's record of `key` (looked up by its hash), or None if it has none."""
        response = await self._request("GET", "/key/info", params={"key": token_hash(key)})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise LiteLLMUnavailable(
                f"LiteLLM /key/info answered {response.status_code}: {_error_message(response)}"
            )
        return response.json().get("info") or {}

    async def generate_key(self, key: str, body: dict) -> dict:
        """Create the key `key` (caller-chosen) with `body`'s settings, at most once.

        A retry after a lost answer meets LiteLLM's unique-alias check; if the key we chose
        exists, the earlier attempt succeeded and this one is a success too.
        """
        response = await self._request("POST", "/key/generate", json={**body, "key": key})
        if response.status_code == 200:
            data = response.json()
            return {k: v for k, v in data.items() if k != "key"}
        if _is_duplicate_alias(response):
            info = await self.key_info(key)
            if info is not None:
                log.info("key %s was minted by an earlier attempt", body.get("key_alias"))
                return {"key_alias": body.get("key_alias"), "expires": info.get("expires")}
        raise KeyRejected(
            f"LiteLLM refused to mint the key ({response.status_code}): {_error_message(response)}"
        )

    async def update_key(self, key: str, body: dict) -> dict | None:
        """Change an existing key (a new `duration` extends it from now); None if it is gone.

        Every other answer is retried: extending a key the holder relies on must not be given
        up on by accident.
        """
        response = await self._request("POST", "/key/update", json={**body, "key": key})
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise LiteLLMUnavailable(
                f"LiteLLM /key/update answered {response.status_code}: {_error_message(response)}"
            )
        data = response.json()
        return {k: v for k, v in data.items() if k != "key"}

    async def delete_keys(self, aliases: list[str]) -> None:
        """Delete the keys with these aliases; keys already gone count as deleted."""
        response = await self._request("POST", "/key/delete", json={"key_aliases": aliases})
        if response.status_code not in (200, 404):
            raise LiteLLMUnavailable(
                f"LiteLLM /key/delete answered {response.status_code}: {_error_message(response)}"
            )
