"""Connections to the outside world that both the API and the worker make the same way."""

from __future__ import annotations

import logging
import ssl
from datetime import timedelta
from pathlib import Path

from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.service import RetryConfig, RPCError, TLSConfig

from domain import (
    KEY_REQUEST_WORKFLOW,
    SA_MODEL,
    SA_STATE,
    SEARCH_ATTRIBUTES,
    KeyRequest,
    RequestState,
    Review,
    workflow_id,
)
from settings import Settings
from telemetry import Telemetry

log = logging.getLogger(__name__)


def tls_context(ca_file: str = "") -> ssl.SSLContext:
    """Trust the system store (where mounted /certs land) plus an optional extra CA file.

    httpx would otherwise trust only certifi's bundle and ignore the company's CA.
    """
    context = ssl.create_default_context()
    if ca_file:
        context.load_verify_locations(cafile=ca_file)
    return context


def _temporal_tls(settings: Settings) -> TLSConfig | bool:
    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    if settings.temporal_tls_cert_file or settings.temporal_tls_ca_file:
        return TLSConfig(
            server_root_ca_cert=read(settings.temporal_tls_ca_file),
            client_cert=read(settings.temporal_tls_cert_file),
            client_private_key=read(settings.temporal_tls_key_file),
        )
    # An API key (Temporal Cloud) always travels over TLS.
    return settings.temporal_tls or bool(settings.temporal_api_key.get_secret_value())


async def connect_temporal(
    settings: Settings,
    lazy: bool = False,
    retry_config: RetryConfig | None = None,
    telemetry: Telemetry | None = None,
) -> Client:
    """`telemetry` gives the client (and workers built on it) its metrics runtime and tracing."""
    telemetry = telemetry or Telemetry()
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        tls=_temporal_tls(settings),
        api_key=settings.temporal_api_key.get_secret_value() or None,
        lazy=lazy,
        **({"retry_config": retry_config} if retry_config else {}),
        interceptors=telemetry.interceptors,
        runtime=telemetry.runtime,
    )


async def ensure_search_attributes(client: Client) -> None:
    """Register KeyRequestState and KeyRequestModel on the namespace when missing.

    Temporal Cloud does not let workers do this; there an operator creates them once (README).
    """
    namespace = client.namespace
    try:
        existing = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=namespace)
        )
        missing = {
            key.name: IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
            for key in SEARCH_ATTRIBUTES
            if key.name not in existing.custom_attributes
        }
        if missing:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(namespace=namespace, search_attributes=missing)
            )
            log.info("registered search attributes %s on %s", ", ".join(missing), namespace)
    except RPCError as exc:
        log.warning(
            "could not check or register search attributes %s on namespace %s (%s); create them "
            "as the README's 'Deploy to Kubernetes' section shows",
            ", ".join(k.name for k in SEARCH_ATTRIBUTES),
            namespace,
            exc.message,
        )


async def start_key_request(
    client: Client,
    task_queue: str,
    request: KeyRequest,
    signal: str | None = None,
    review: Review | None = None,
    rpc_timeout: timedelta | None = None,
) -> None:
    """Start the request's workflow, or join the running one: never two at once.

    A closed run (denied, expired, failed, terminated) may be followed by a new one under the
    same id. With `signal`, the signal reaches the running workflow or the one just started.
    """
    signal_args = {"start_signal": signal, "start_signal_args": [review or Review()]}
    await client.start_workflow(
        KEY_REQUEST_WORKFLOW,
        request,
        id=workflow_id(request.request_id),
        task_queue=task_queue,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes(
            [
                SearchAttributePair(SA_STATE, RequestState.PENDING.value),
                SearchAttributePair(SA_MODEL, request.model),
            ]
        ),
        rpc_timeout=rpc_timeout,
        # What the Temporal Web UI lists: the model, never the email.
        static_summary=f"LLM key request: {request.model}",
        static_details=(
            f"Key request `{request.request_id}` for the model **{request.model}**, "
            f"submitted {request.requested_at}. The workflow's current details say its state, "
            "approvals and deadline."
        ),
        **(signal_args if signal else {}),
    )
