"""A LiteLLM proxy stand-in for virtual-key management: no database, no models, no spend.

Implemented endpoints (shapes follow litellm's
``litellm/proxy/management_endpoints/key_management_endpoints.py``):

- ``POST /key/generate``  mint a virtual key (master key only)
- ``GET  /key/info?key=<plaintext or sha256>``  ``{"key": <as queried>, "info": {...}}``
- ``POST /key/update``  ``{"key": <plaintext or sha256>, "duration"?, "metadata"?, "max_budget"?,
  "models"?}``: ``duration`` sets a new expiry from now; unknown key 404
- ``POST /key/delete``  ``{"keys": [...]}`` or ``{"key_aliases": [...]}``
- ``POST /key/block``  ``{"key": ...}`` (what ``LiteLLMStandin.revoke`` does in-process)
- ``GET  /health/liveliness`` and ``/health/liveness`` (no auth)

Errors carry the proxy's body ``{"error": {"message", "type", "param", "code"}}`` with the HTTP
status equal to ``code``; request bodies of the wrong shape get FastAPI's 422 ``{"detail": [...]}``.
Faults (``fail_next``, ``reject_next``, ``delay_next``) apply to ``/key/generate`` only; so does
the ``on_generate`` hook, called once a key exists and before the answer goes out.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from devstack.http import ServedApp, serve_in_thread

__all__ = ["LiteLLMStandin", "hash_key"]

_DURATION = re.compile(r"(\d+)(mo|[smhdw]?)")  # litellm's duration_in_seconds, re.match semantics
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "mo": 30 * 86400}
_ERROR_TYPES = {400: "bad_request_error", 401: "auth_error", 404: "not_found_error"}


def hash_key(key: str) -> str:
    """The token LiteLLM stores for a virtual key: sha256 hex of the plaintext."""
    return hashlib.sha256(key.encode()).hexdigest()


def _token_for(key_or_hash: str) -> str:
    return hash_key(key_or_hash) if key_or_hash.startswith("sk-") else key_or_hash


def _duration_seconds(duration: str) -> int:
    match = _DURATION.match(duration)
    if not match:
        raise ValueError("Invalid duration format")
    value, unit = int(match.group(1)), match.group(2)
    if unit not in _UNIT_SECONDS:
        raise ValueError(f"Unsupported duration unit, passed duration: {duration}")
    return value * _UNIT_SECONDS[unit]


def _iso(when: datetime | None, z: bool = False) -> str | None:
    if when is None:
        return None
    text = when.isoformat()
    return text.replace("+00:00", "Z") if z else text


class ProxyError(Exception):
    """An error answered in the proxy's ``{"error": {...}}`` shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str | None = None,
        param: str = "None",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.type = type_ or "internal_server_error"
        self.headers = headers

    @classmethod
    def detail(cls, status: int, text: str) -> ProxyError:
        # HTTPException(detail={"error": ...}) re-raised via handle_exception_on_proxy
        return cls(status, str({"error": text}))

    def response(self) -> JSONResponse:
        body = {"message": self.message, "type": self.type, "param": self.param}
        return JSONResponse(
            {"error": {**body, "code": str(self.status)}}, self.status, headers=self.headers
        )


class _Unprocessable(Exception):
    def __init__(self, errors: list[dict]):
        self.errors = errors


class _GenerateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    key: str | None = None
    key_alias: str | None = None
    duration: str | None = None
    models: list | None = []
    max_budget: float | None = None
    soft_budget: float | None = None
    budget_duration: str | None = None
    metadata: dict | None = {}
    user_id: str | None = None
    team_id: str | None = None
    tpm_limit: int | None = None
    rpm_limit: int | None = None
    max_parallel_requests: int | None = None


class _KeyRequest(BaseModel):
    keys: list[str] | None = None
    key_aliases: list[str] | None = None


class _UpdateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    key: str
    duration: str | None = None
    metadata: dict | None = None
    max_budget: float | None = None
    models: list | None = None


class _BlockKeyRequest(BaseModel):
    key: str


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    body = await request.body()
    if not body:
        missing = {"type": "missing", "loc": ["body"], "msg": "Field required", "input": None}
        raise _Unprocessable([missing])
    try:
        data = json.loads(body)
    except json.JSONDecodeError as exc:
        raise _Unprocessable(
            [
                {
                    "type": "json_invalid",
                    "loc": ["body", exc.pos],
                    "msg": "JSON decode error",
                    "input": {},
                    "ctx": {"error": exc.msg},
                }
            ]  # fmt: skip
        ) from None
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = json.loads(exc.json(include_url=False))
        raise _Unprocessable([{**e, "loc": ["body", *e["loc"]]} for e in errors]) from None


@dataclass
class _Key:
    key: str
    token: str
    key_alias: str | None
    models: list
    metadata: dict
    max_budget: float | None
    budget_duration: str | None
    duration: str | None
    expires: datetime | None
    user_id: str | None
    team_id: str | None
    tpm_limit: int | None
    rpm_limit: int | None
    max_parallel_requests: int | None
    created_at: datetime
    blocked: bool = False
    deleted: bool = False
    clock: Callable[[], datetime] = lambda: datetime.now(UTC)

    def status(self) -> str:
        if self.deleted:
            return "deleted"
        if self.blocked:
            return "revoked"
        if self.expires is not None and self.expires <= self.clock():
            return "expired"
        return "active"

    def info(self) -> dict:
        reset_at = None
        if self.budget_duration:
            reset_at = self.created_at + timedelta(seconds=_duration_seconds(self.budget_duration))
        return {
            "key_name": f"sk-...{self.key[-4:]}",
            "key_alias": self.key_alias,
            "spend": 0.0,
            "max_budget": self.max_budget,
            "expires": _iso(self.expires),
            "models": list(self.models),
            "aliases": {},
            "config": {},
            "user_id": self.user_id,
            "team_id": self.team_id,
            "max_parallel_requests": self.max_parallel_requests,
            "metadata": json.loads(json.dumps(self.metadata)),
            "tpm_limit": self.tpm_limit,
            "rpm_limit": self.rpm_limit,
            "budget_duration": self.budget_duration,
            "budget_reset_at": _iso(reset_at),
            "allowed_cache_controls": [],
            "allowed_routes": [],
            "permissions": {},
            "model_spend": {},
            "model_max_budget": {},
            "soft_budget_cooldown": False,
            "blocked": True if self.blocked else None,
            "litellm_budget_table": None,
            "organization_id": None,
            "created_at": _iso(self.created_at),
            "created_by": "default_user_id",
            "updated_at": _iso(self.created_at),
            "updated_by": "default_user_id",
            "status": self.status(),  # stand-in addition, not a LiteLLM field
        }

    def record(self) -> dict:
        return {
            "token": self.token,
            "key": self.key,
            "key_alias": self.key_alias,
            "models": list(self.models),
            "metadata": json.loads(json.dumps(self.metadata)),
            "max_budget": self.max_budget,
            "budget_duration": self.budget_duration,
            "duration": self.duration,
            "expires": _iso(self.expires),
            "status": self.status(),
            "user_id": self.user_id,
            "team_id": self.team_id,
            "created_at": _iso(self.created_at),
        }


@dataclass(frozen=True)
class _Fault:
    status: int
    message: str
    type: str
    param: str
    retry_after: str | None = None


class LiteLLMStandin:
    """In-memory LiteLLM key management served over HTTP from a background thread."""

    def __init__(self, master_key: str = "sk-standin-master", host: str = "127.0.0.1") -> None:
        if not master_key.startswith("sk-"):
            raise ValueError("LiteLLM master keys start with 'sk-'")
        self.master_key = master_key
        self.host = host
        self._cond = threading.Condition()
        # Ahead of the wall clock by this much: a test whose Temporal clock skips days sets it,
        # so that expiry dates the stand-in gives agree with the workflows' clock.
        self.clock_offset = timedelta(0)
        self._keys: dict[str, _Key] = {}
        # Token of the key with each alias, for the keys in _keys: an alias is unique among them,
        # and with thousands of keys a scan per /key/generate was most of this stand-in's CPU.
        self._by_alias: dict[str, str] = {}
        self._deleted: list[_Key] = []
        self._faults: list[_Fault] = []
        self._delays: list[float] = []
        self._generate_calls = 0
        self._on_generate: Callable[[dict], None] | None = None
        self._served: ServedApp | None = None
        self._port: int | None = None
        self._stopping = threading.Event()
        self.app = Starlette(
            routes=[
                Route("/key/generate", self._generate, methods=["POST"]),
                Route("/key/info", self._info, methods=["GET"]),
                Route("/key/update", self._update, methods=["POST"]),
                Route("/key/delete", self._delete, methods=["POST"]),
                Route("/key/block", self._block, methods=["POST"]),
                Route("/health/liveliness", self._alive, methods=["GET"]),
                Route("/health/liveness", self._alive, methods=["GET"]),
            ]
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, port: int | None = None) -> str:
        if self._served is not None:
            raise RuntimeError(f"stand-in already serving at {self._served.url}")
        self._stopping.clear()
        self._served = serve_in_thread(self.app, host=self.host, port=port or self._port)
        self._port = self._served.port
        return self._served.url

    def stop(self) -> None:
        served, self._served = self._served, None
        self._stopping.set()  # cut delayed answers short so shutdown does not wait for them
        if served is not None:
            served.stop()

    @property
    def url(self) -> str:
        if self._served is None:
            raise RuntimeError("stand-in is not running")
        return self._served.url

    def __enter__(self) -> LiteLLMStandin:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # -- inspection and control ------------------------------------------------------------

    def now(self) -> datetime:
        return datetime.now(UTC) + self.clock_offset

    def keys(self) -> list[dict]:
        """Every key minted so far (deleted ones too, with status "deleted")."""
        with self._cond:
            return [k.record() for k in [*self._keys.values(), *self._deleted]]

    def has_live_key(self, plaintext: str) -> bool:
        with self._cond:
            record = self._keys.get(hash_key(plaintext))
            return record is not None and record.status() == "active"

    def live_keys_for_alias(self, alias: str) -> int:
        with self._cond:
            return sum(
                1 for k in self._keys.values() if k.key_alias == alias and k.status() == "active"
            )

    @property
    def generate_calls(self) -> int:
        """How many /key/generate requests have been answered (counted before any delay)."""
        with self._cond:
            return self._generate_calls

    def wait_for_generate_calls(self, count: int, timeout: float = 5.0) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self._generate_calls >= count, timeout):
                raise TimeoutError(f"{self._generate_calls} /key/generate calls, wanted {count}")

    def fail_next(
        self,
        count: int = 1,
        status: int = 500,
        message: str = "Internal Server Error.",
        retry_after: str | None = None,
    ) -> None:
        """The next ``count`` /key/generate calls answer this error and create nothing.

        ``retry_after`` adds a Retry-After header, as a proxy or gateway that rate limits does.
        """
        error_type = _ERROR_TYPES.get(status, "internal_server_error")
        fault = _Fault(status, message, error_type, "None", retry_after)
        with self._cond:
            self._faults.extend([fault] * count)

    def reject_next(
        self,
        count: int = 1,
        status: int = 400,
        message: str = "Rejected by the LiteLLM stand-in.",
        param: str | None = None,
    ) -> None:
        """Like ``fail_next`` but a client error: type bad_request_error and ``param``."""
        fault = _Fault(status, message, "bad_request_error", param if param is not None else "None")
        with self._cond:
            self._faults.extend([fault] * count)

    def delay_next(self, count: int, seconds: float) -> None:
        """The next ``count`` /key/generate calls do their work, then wait before answering.

        The key exists as soon as the request is processed, so a client that times out has
        still caused a key, as with a real proxy whose response is lost or slow.
        """
        with self._cond:
            self._delays.extend([seconds] * count)

    def on_generate(self, callback: Callable[[dict], None] | None) -> None:
        """Call ``callback(record)`` after /key/generate has created (or found) a key, before
        the answer goes out; ``record`` is what ``keys()`` lists for it.

        It runs in a thread of its own, so it may block (wait for an event, kill the client)
        without holding up other requests. An exception from it is answered as a 500; the key
        stays minted. None removes it.
        """
        with self._cond:
            self._on_generate = callback

    def revoke(self, alias: str) -> int:
        """Block every active key with ``alias`` (as /key/block does); returns how many."""
        with self._cond:
            hits = [k for k in self._keys.values() if k.key_alias == alias]
            hits = [k for k in hits if k.status() == "active"]
            for k in hits:
                k.blocked = True
            return len(hits)

    def reset(self) -> None:
        """Forget all keys, pending faults and counters."""
        with self._cond:
            self._keys.clear()
            self._by_alias.clear()
            self._deleted.clear()
            self._faults.clear()
            self._delays.clear()
            self._generate_calls = 0

    # -- HTTP handlers ---------------------------------------------------------------------

    def _authorize(self, request: Request) -> None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        token = token.strip() if scheme.lower() in ("bearer", "basic") else ""
        if not token:
            raise ProxyError(401, "Authentication Error, No api key passed in.", "auth_error")
        if not token.startswith("sk-"):
            masked = f"{token[:4]}****{token[-4:]}" if len(token) > 8 else "****"
            raise ProxyError(
                401,
                f"Authentication Error, LiteLLM Virtual Key expected. Received={masked}, "
                "expected to start with 'sk-'.",
                "auth_error",
            )
        if secrets.compare_digest(token.encode(), self.master_key.encode()):
            return
        with self._cond:
            known = hash_key(token) in self._keys
        if known:
            raise ProxyError(
                401,
                "Authentication Error, the LiteLLM stand-in only accepts the master key here.",
                "auth_error",
            )
        raise ProxyError(
            401,
            "Authentication Error, Invalid proxy server token passed. Unable to find token in "
            "cache or `LiteLLM_VerificationTokenTable`",
            "auth_error",
        )

    @staticmethod
    def _answer(exc: Exception) -> JSONResponse:
        if isinstance(exc, _Unprocessable):
            return JSONResponse({"detail": exc.errors}, 422)
        assert isinstance(exc, ProxyError)
        return exc.response()

    async def _generate(self, request: Request) -> JSONResponse:
        with self._cond:
            delay = self._delays.pop(0) if self._delays else 0.0
        try:
            self._authorize(request)
            with self._cond:
                fault = self._faults.pop(0) if self._faults else None
            if fault is not None:
                headers = {"Retry-After": fault.retry_after} if fault.retry_after else None
                raise ProxyError(fault.status, fault.message, fault.type, fault.param, headers)
            minted = self._mint(await _parse(request, _GenerateKeyRequest))
            with self._cond:
                hook, record = self._on_generate, self._keys[minted["token"]].record()
            if hook is not None:
                try:
                    await asyncio.to_thread(hook, record)
                except Exception as exc:  # the test's hook failed: answer as a proxy error would
                    raise ProxyError(500, f"on_generate hook failed: {exc!r}") from None
            response = JSONResponse(minted)
        except (ProxyError, _Unprocessable) as exc:
            response = self._answer(exc)
        with self._cond:
            self._generate_calls += 1
            self._cond.notify_all()
        if delay > 0:
            await asyncio.to_thread(self._stopping.wait, delay)
        return response

    def _mint(self, req: _GenerateKeyRequest) -> dict:
        for name in ("max_budget", "soft_budget"):
            value = getattr(req, name)
            if value is not None and value < 0:
                raise ProxyError.detail(400, f"{name} cannot be negative. Received: {value}")
        with self._cond:
            alias = req.key_alias
            if alias is not None and alias in self._by_alias:
                raise ProxyError(
                    400,
                    f"Key with alias '{alias}' already exists. "
                    "Unique key aliases across all keys are required.",
                    "bad_request_error",
                    "key_alias",
                )
            if req.key is not None and not req.key.startswith("sk-"):
                masked = f"{req.key[:4]}****{req.key[-4:]}" if len(req.key) > 8 else "****"
                raise ProxyError.detail(
                    400,
                    "Invalid key format. LiteLLM Virtual Key must start with 'sk-'. "
                    f"Received: {masked}",
                )
            now = self.now()
            try:
                expires = None
                if req.duration is not None:
                    expires = now + timedelta(seconds=_duration_seconds(req.duration))
                if req.budget_duration is not None:
                    _duration_seconds(req.budget_duration)
            except ValueError as exc:
                raise ProxyError(500, str(exc)) from None
            plaintext = req.key or f"sk-{secrets.token_urlsafe(16)}"
            token = hash_key(plaintext)
            models, metadata = list(req.models or []), dict(req.metadata or {})
            stored = self._keys.get(token)
            if stored is None:  # LiteLLM upserts with an empty update: an existing key is kept
                stored = _Key(
                    key=plaintext,
                    token=token,
                    key_alias=alias,
                    models=models,
                    metadata=metadata,
                    max_budget=req.max_budget,
                    budget_duration=req.budget_duration,
                    duration=req.duration,
                    expires=expires,
                    user_id=req.user_id,
                    team_id=req.team_id,
                    tpm_limit=req.tpm_limit,
                    rpm_limit=req.rpm_limit,
                    max_parallel_requests=req.max_parallel_requests,
                    created_at=now,
                    clock=self.now,
                )
                self._keys[token] = stored
                if alias is not None:
                    self._by_alias[alias] = token
        return {
            "key_alias": alias,
            "duration": None,  # LiteLLM does not echo it; `expires` carries the result
            "models": models,
            "spend": 0.0,
            "max_budget": req.max_budget,
            "user_id": req.user_id,
            "team_id": req.team_id,
            "max_parallel_requests": req.max_parallel_requests,
            "metadata": metadata,
            "tpm_limit": req.tpm_limit,
            "rpm_limit": req.rpm_limit,
            "budget_duration": req.budget_duration,
            "soft_budget": req.soft_budget,
            "allowed_cache_controls": [],
            "config": {},
            "permissions": {},
            "model_max_budget": {},
            "aliases": {},
            "blocked": None,
            "key": plaintext,
            "key_name": f"sk-...{plaintext[-4:]}",
            "expires": _iso(expires, z=True),
            "token_id": token,
            "token": token,
            "budget_id": None,
            "litellm_budget_table": None,
            "created_by": "default_user_id",
            "updated_by": "default_user_id",
            "created_at": _iso(stored.created_at, z=True),
            "updated_at": _iso(stored.created_at, z=True),
        }

    async def _info(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            key = request.query_params.get("key") or ""
            with self._cond:
                record = self._keys.get(_token_for(key)) if key else None
                if record is None:
                    raise ProxyError(404, "Key not found in database", "not_found_error", "key")
                return JSONResponse({"key": key, "info": record.info()})
        except ProxyError as exc:
            return exc.response()

    async def _delete(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            data: _KeyRequest = await _parse(request, _KeyRequest)
            with self._cond:
                if data.keys:
                    requested = data.keys
                    tokens = {_token_for(k) for k in data.keys}
                elif data.key_aliases:
                    requested = data.key_aliases
                    tokens = {self._by_alias[a] for a in data.key_aliases if a in self._by_alias}
                else:
                    raise ProxyError(500, "Invalid request type")
                found = [self._keys.pop(t) for t in tokens if t in self._keys]
                if not found:
                    raise ProxyError.detail(404, "No keys found")
                for record in found:
                    record.deleted = True
                    self._by_alias.pop(record.key_alias or "", None)
                self._deleted.extend(found)
            return JSONResponse({"deleted_keys": requested})
        except (ProxyError, _Unprocessable) as exc:
            return self._answer(exc)

    async def _update(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            data: _UpdateKeyRequest = await _parse(request, _UpdateKeyRequest)
            with self._cond:
                record = self._keys.get(_token_for(data.key))
                if record is None:
                    raise ProxyError(404, f"Key not found: {data.key[:8]}...", "not_found_error")
                if data.duration is not None:
                    try:
                        seconds = _duration_seconds(data.duration)
                    except ValueError as exc:
                        raise ProxyError(500, str(exc)) from None
                    record.duration = data.duration
                    record.expires = self.now() + timedelta(seconds=seconds)
                if data.metadata is not None:
                    record.metadata = dict(data.metadata)
                if data.max_budget is not None:
                    record.max_budget = data.max_budget
                if data.models is not None:
                    record.models = list(data.models)
                return JSONResponse({"token": record.token, **record.info(),
                                     "expires": _iso(record.expires, z=True)})  # fmt: skip
        except (ProxyError, _Unprocessable) as exc:
            return self._answer(exc)

    async def _block(self, request: Request) -> JSONResponse:
        try:
            self._authorize(request)
            data: _BlockKeyRequest = await _parse(request, _BlockKeyRequest)
            with self._cond:
                record = self._keys.get(_token_for(data.key))
                if record is None:
                    raise ProxyError(404, f"Key {data.key} not found", "bad_request_error", "key")
                record.blocked = True
                return JSONResponse({"token": record.token, **record.info()})
        except (ProxyError, _Unprocessable) as exc:
            return self._answer(exc)

    async def _alive(self, request: Request) -> JSONResponse:
        return JSONResponse("I'm alive!")
