"""Real servers for the tests, started once per session on loopback ports.

Temporal is the real dev server; SMTP is a real aiosmtpd server; Kubernetes and LiteLLM are
stand-ins that speak their HTTP contracts (tests/conformance keeps them honest). The worker and
the API are the project's own code, unchanged, reached over real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from kubernetes import config as kube_config
from kubernetes.client import CoreV1Api
from pydantic import SecretStr
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.kubernetes import SecretsApi, SecretStore
from api.main import create_app
from devstack.http import serve_in_thread
from devstack.kube import KubeStandin
from devstack.litellm import LiteLLMStandin
from devstack.mail import MailSink
from devstack.oidc import APPROVERS_GROUP, OIDCIssuer
from devstack.temporal import TemporalDevServer, binary, connect_when_ready
from kube_apiserver import KubeAPIServer, missing_binaries
from settings import ApprovalRule, Settings, load_settings
from telemetry import JsonFormatter
from worker import run_worker

ADMIN_TOKEN = "test-admin-token-1234567890"
NAMESPACE = "default"

# The policy the tests rely on: the domain says what happens.
RULES = (
    ApprovalRule(name="auto-approve", email_domains=("approve.example.com",), decision="approve"),
    ApprovalRule(
        name="auto-deny",
        email_domains=("deny.example.com",),
        decision="deny",
        reason="Requests from deny.example.com are not allowed.",
    ),
    # Two approvers must approve (tests/test_approvals_several.py).
    ApprovalRule(
        name="two-approvers", email_domains=("two.example.com",), decision="manual", approvals=2
    ),
)


def unique_email(domain: str) -> str:
    return f"user-{uuid.uuid4().hex[:10]}@{domain}"


@pytest.fixture(scope="session")
def temporal_server(tmp_path_factory) -> Iterator[TemporalDevServer]:
    server = TemporalDevServer(log_file=tmp_path_factory.mktemp("temporal") / "server.log")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
async def temporal_client(temporal_server) -> Client:
    return await connect_when_ready(temporal_server.address)


@pytest.fixture(scope="session")
def kube(tmp_path_factory) -> Iterator[KubeStandin]:
    standin = KubeStandin()
    standin.start()
    standin.kubeconfig = standin.write_kubeconfig(
        tmp_path_factory.mktemp("kube") / "kubeconfig", NAMESPACE
    )
    yield standin
    standin.stop()


@pytest.fixture(scope="session")
def kube_apiserver(tmp_path_factory) -> Iterator[KubeAPIServer]:
    """A real kube-apiserver on etcd (RBAC on); skipped when scripts/build-kube-apiserver.sh has
    not been run, failed instead when REQUIRE_SYSTEM_TOOLS=1 (CI)."""
    if reason := missing_binaries():
        if os.environ.get("REQUIRE_SYSTEM_TOOLS") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    server = KubeAPIServer(tmp_path_factory.mktemp("kube-apiserver")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def core_api(kube) -> CoreV1Api:
    return CoreV1Api(kube_config.new_client_from_config(config_file=str(kube.kubeconfig)))


@pytest.fixture(scope="session")
def litellm() -> Iterator[LiteLLMStandin]:
    standin = LiteLLMStandin()
    standin.start()
    yield standin
    standin.stop()


@pytest.fixture(scope="session")
def mail(tmp_path_factory) -> Iterator[MailSink]:
    sink = MailSink(maildir=tmp_path_factory.mktemp("mail"))
    sink.start()
    yield sink
    sink.stop()


@pytest.fixture(scope="session")
def settings(temporal_server, kube, litellm, mail) -> Settings:
    return load_settings(
        temporal_address=temporal_server.address,
        temporal_task_queue=f"tests-{uuid.uuid4().hex[:8]}",
        litellm_base_url=litellm.url,
        litellm_api_key=litellm.master_key,
        litellm_timeout="5s",
        smtp_host=mail.host,
        smtp_port=mail.port,
        smtp_use_tls=False,
        smtp_timeout="5s",
        kubernetes_namespace=NAMESPACE,
        approval_rules=RULES,
        approval_default="manual",
        approval_deadline="1h",
        # The scheduled reconciler stays out of the way; tests run it when they mean to.
        approval_queue_interval="24h",
        admin_token=ADMIN_TOKEN,
        environment="local",
        # Tests count each requester's mails; tests/test_notifications.py turns this on.
        approval_acknowledge=False,
    )


@dataclass
class RunningWorker:
    task: asyncio.Task
    stop: asyncio.Event


async def start_worker(settings: Settings, client: Client, core_api: CoreV1Api) -> RunningWorker:
    stop = asyncio.Event()
    store = SecretStore(SecretsApi(core_api.api_client), settings.namespace)
    task = asyncio.create_task(run_worker(settings, client, store, stop))
    return RunningWorker(task, stop)


async def stop_worker(worker: RunningWorker) -> None:
    worker.stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(worker.task, 30)


@contextlib.asynccontextmanager
async def time_skipping(
    settings: Settings, core_api: CoreV1Api
) -> AsyncIterator[WorkflowEnvironment]:
    """Temporal's time-skipping test server with this project's worker on it, for tests where
    days must pass. The worker stops when the block ends, also when the test fails, so that it
    does not poll a stopped server until the session ends."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=binary("temporal-test-server")
    )
    async with env:
        running = await start_worker(settings, env.client, core_api)
        try:
            yield env
        finally:
            await stop_worker(running)


@pytest.fixture(scope="session")
async def worker(settings, temporal_client, core_api) -> AsyncIterator[RunningWorker]:
    running = await start_worker(settings, temporal_client, core_api)
    yield running
    await stop_worker(running)


@pytest.fixture(scope="session")
def issuer() -> Iterator[OIDCIssuer]:
    """The local stack's OIDC issuer (devstack/oidc.py), serving its JWKS on loopback."""
    started = OIDCIssuer().start()
    yield started
    started.stop()


# Proxy headers are believed from this address only; clients connect from 127.0.0.1.
TRUSTED_PROXY = "127.0.0.2"
# Default approvers of the signed-on API: the issuer's approvers group and one named person.
NAMED_APPROVER = "named.approver@example.com"


@pytest.fixture(scope="session")
def signon_settings(settings, issuer) -> Settings:
    """The test settings with every sign-on on: OIDC, a trusted proxy, and ADMIN_TOKEN."""
    return settings.model_copy(
        update={
            "auth_oidc_issuer": issuer.url,
            "auth_oidc_client_id": issuer.client_id,
            "auth_oidc_client_secret": SecretStr(issuer.client_secret),
            "auth_trusted_proxies": (f"{TRUSTED_PROXY}/32",),
            "approval_approvers": (APPROVERS_GROUP, NAMED_APPROVER),
        }
    )


@pytest.fixture(scope="session")
def signon_url(signon_settings, temporal_server, worker) -> Iterator[str]:
    served = serve_in_thread(create_app(signon_settings), lifespan="on")
    yield served.url
    served.stop()


@pytest.fixture(scope="session")
async def signon_api(signon_url, responses) -> AsyncIterator[httpx.AsyncClient]:
    async def keep(response: httpx.Response) -> None:
        responses.append(await response.aread())

    async with httpx.AsyncClient(
        base_url=signon_url, timeout=30, event_hooks={"response": [keep]}
    ) as client:
        yield client


@pytest.fixture(scope="session")
def api_url(settings, temporal_server) -> Iterator[str]:
    served = serve_in_thread(create_app(settings), lifespan="on")
    yield served.url
    served.stop()


class Captured(logging.Handler):
    """Every log record of the session, formatted with its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        # The same records as LOG_FORMAT=json writes them: held to the same promises.
        self.json_lines: list[str] = []
        self._json = JsonFormatter()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))

    # The stand-ins play the remote side (the mail server must receive the key); only the
    # service's own logs, client libraries included, are held to "no key".
    REMOTE_SIDE = ("mail.log", "devstack")

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith(self.REMOTE_SIDE):
            self.lines.append(self.format(record))
            self.json_lines.append(self._json.format(record))


@pytest.fixture(scope="session")
def captured_logs() -> Iterator[Captured]:
    handler = Captured()
    root = logging.getLogger()
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(previous)


@pytest.fixture(scope="session")
def responses() -> list[bytes]:
    """Every body the API answered to the tests' client."""
    return []


@pytest.fixture(scope="session")
async def api(api_url, worker, responses) -> AsyncIterator[httpx.AsyncClient]:
    async def keep(response: httpx.Response) -> None:
        responses.append(await response.aread())

    async with httpx.AsyncClient(
        base_url=api_url, timeout=30, event_hooks={"response": [keep]}
    ) as client:
        yield client


@pytest.fixture(scope="session", autouse=True)
async def no_key_leaks(litellm, temporal_client, captured_logs, responses):
    """After every test: no key LiteLLM minted may appear outside the Secret and the email.

    Checked over the whole session, failure paths included: every log record (API and worker
    run in this process), every API response body, and every event of every workflow history.
    """
    yield
    keys = [k["key"] for k in litellm.keys() if k.get("key")]
    histories = b""
    async for execution in temporal_client.list_workflows():
        handle = temporal_client.get_workflow_handle(execution.id, run_id=execution.run_id)
        histories += _raw(await handle.fetch_history())
    logs = "\n".join(captured_logs.lines + captured_logs.json_lines)
    bodies = b"\n".join(responses)
    for key in keys:
        assert key not in logs, "a minted key appeared in the logs"
        assert key.encode() not in bodies, "a minted key appeared in an API response"
        assert key.encode() not in histories, "a minted key appeared in a workflow history"


def _raw(history) -> bytes:
    from temporalio.api.history.v1 import History

    return History(events=history.events).SerializeToString()


@pytest.fixture
def admin_headers() -> dict:
    return {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def mail_to(sink: MailSink, address: str, count: int = 1, within: float = 30) -> list:
    """Wait until `count` messages to `address` have arrived; return them (fails on more)."""

    def arrived():
        found = [m for m in sink.messages if m["To"] == address]
        return found if len(found) >= count else None

    found = await wait_until(arrived, within, f"{count} mail(s) to {address}")
    assert len(found) == count, f"expected {count} mail(s) to {address}, got {len(found)}"
    return found


def secret_of(kube: KubeStandin, request_id: str) -> dict:
    name = f"llm-key-request-{request_id}"
    return next(s for s in kube.secrets(NAMESPACE) if s["metadata"]["name"] == name)


def kubeconfig_path(kube: KubeStandin) -> Path:
    return kube.kubeconfig


async def history_bytes(client: Client, wf_id: str) -> bytes:
    """Every event of every run of the workflow, payloads included, as raw bytes."""
    from temporalio.api.history.v1 import History

    raw = b""
    async for execution in client.list_workflows(f"WorkflowId = '{wf_id}'"):
        history = await client.get_workflow_handle(wf_id, run_id=execution.run_id).fetch_history()
        raw += History(events=history.events).SerializeToString()
    return raw


async def wait_until(condition, within: float = 30, what: str = "condition"):
    """Re-check `condition` (sync or async) until it returns something truthy."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        result = condition()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.05)


async def settled(client: Client, request_id: str, within: float = 30):
    """Wait until the request's workflow is past its first email: the key's timers (a live key)
    or the clean-up timer (a finished request) are what it waits on now. Returns the status."""
    from domain import QUERY_STATUS, RequestStatus, workflow_id

    handle = client.get_workflow_handle(workflow_id(request_id))

    async def waiting():
        status = await handle.query(QUERY_STATUS, result_type=RequestStatus)
        return status if status.next_reminder or status.cleanup_at else None

    return await wait_until(waiting, within, f"request {request_id} to wait on its timers")
