"""Fault injection: crashes and outages, on the real Temporal dev server with a database file.

The worker runs as its own process (`python worker.py`, configured through the environment as
in production) so that it can be killed with SIGKILL at an exact moment: the stand-ins call a
hook at that moment (a Secret stored, a key minted, a mail arriving or accepted) and the hook
kills the worker before the answer reaches it. Temporal is stopped and started again on the same
port and database file. Each test then checks what a requester and an operator would see: one
email with a key that LiteLLM knows as live and bound to the model, exactly one key per request,
the Secret's final labels, and no request left behind.

These tests use their own Temporal server and stand-ins (module-scoped), never the session ones.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from api.main import create_app
from conftest import ADMIN_TOKEN, NAMESPACE, secret_of, settled, unique_email, wait_until
from devstack.http import ServedApp, serve_in_thread
from devstack.kube import KubeStandin
from devstack.litellm import LiteLLMStandin
from devstack.mail import MailSink
from devstack.temporal import TemporalDevServer, connect_when_ready
from domain import (
    Review,
    request_id_for,
    request_id_from_workflow_id,
    secret_name,
    workflow_id,
)
from settings import Settings, load_settings
from test_key_request_flow import KEY, plain, submit

ROOT = Path(__file__).resolve().parent.parent
MODEL = "gpt-4o"
APPROVE = "approve.example.com"  # the worker's policy approves these at once
MANUAL = "manual.example.com"  # ...and leaves these to a person
LITELLM_TIMEOUT = 2  # seconds; the worker's LITELLM_TIMEOUT
# Long enough for a killed worker's activity to be noticed and retried on the next worker.
COMPLETES_WITHIN = 60


class WorkerProcess:
    """`python worker.py` in a process of its own, as it runs in production."""

    def __init__(self, env: dict[str, str], log_file: Path) -> None:
        self.log_file = log_file
        with open(log_file, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "worker.py"],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    async def ready(self, within: float = 30) -> None:
        def up() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"worker exited with {self.process.returncode}:\n{self.log()[-3000:]}"
                )
            return "worker ready" in self.log()

        await wait_until(up, within, "the worker to be ready")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, no chance to report anything to Temporal."""
        self.process.kill()
        self.process.wait(10)

    async def stop(self) -> None:
        if self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            # The worker finishes in-flight tasks first (up to 30 s).
            await asyncio.to_thread(self.process.wait, 45)
        except subprocess.TimeoutExpired:
            self.kill()


@dataclass
class Lane:
    api: httpx.AsyncClient
    worker_env: dict[str, str]


@dataclass
class Stack:
    temporal: TemporalDevServer
    kube: KubeStandin
    litellm: LiteLLMStandin
    mail: MailSink
    settings: Settings  # the API's
    worker_env: dict[str, str]
    workdir: Path
    client: Client
    api: httpx.AsyncClient
    workers: list[WorkerProcess] = field(default_factory=list)
    _numbers: itertools.count = field(default_factory=lambda: itertools.count(1))

    async def start_worker(self, env: dict[str, str] | None = None) -> WorkerProcess:
        log_file = self.workdir / f"worker-{next(self._numbers)}.log"
        worker = WorkerProcess(env or self.worker_env, log_file)
        self.workers.append(worker)
        await worker.ready()
        return worker

    @contextlib.asynccontextmanager
    async def lane(self) -> AsyncIterator[Lane]:
        """A task queue of its own, with its own API: its workers only ever see its requests."""
        queue = f"faults-{uuid.uuid4().hex[:8]}"
        settings = self.settings.model_copy(update={"temporal_task_queue": queue})
        served = serve_in_thread(create_app(settings), lifespan="on")
        try:
            async with httpx.AsyncClient(base_url=served.url, timeout=60) as api:
                yield Lane(api, {**self.worker_env, "TEMPORAL_TASK_QUEUE": queue})
        finally:
            served.stop()

    async def stop_workers(self) -> None:
        for worker in self.workers:
            await worker.stop()
        self.workers.clear()

    def kill_workers(self) -> None:
        for worker in self.workers:
            if worker.process.poll() is None:
                worker.kill()

    async def temporal_back(self) -> None:
        """Start Temporal again (same port, same database) and wait until it answers."""
        self.temporal.start()

        async def answers() -> bool:
            try:
                await self.client.count_workflows()
            except Exception:  # still coming up
                return False
            return True

        await wait_until(answers, 30, "Temporal to answer again")


def worker_config(path: Path) -> Path:
    """The shipped config.yaml with a test policy: APPROVE at once, everything else manual."""
    config = yaml.safe_load((ROOT / "config.yaml").read_text())
    config["approval"] = {
        "default": "manual",
        "deadline": "1h",
        "rules": [{"name": "auto-approve", "email_domains": [APPROVE], "decision": "approve"}],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
async def stack(tmp_path_factory) -> AsyncIterator[Stack]:
    workdir = tmp_path_factory.mktemp("faults")
    queue = f"faults-{uuid.uuid4().hex[:8]}"
    with contextlib.ExitStack() as cleanup:
        temporal = TemporalDevServer(
            db_file=workdir / "temporal.db", log_file=workdir / "temporal.log"
        )
        cleanup.callback(temporal.stop)
        temporal.start()
        kube = KubeStandin()
        cleanup.callback(kube.stop)
        kube.start()
        kubeconfig = kube.write_kubeconfig(workdir / "kubeconfig", NAMESPACE)
        litellm = LiteLLMStandin()
        cleanup.callback(litellm.stop)
        litellm.start()
        mail = MailSink()
        cleanup.callback(mail.stop)
        mail.start()
        worker_env = {
            "PATH": os.environ.get("PATH", ""),
            "CONFIG_FILE": str(worker_config(workdir / "config.yaml")),
            "TEMPORAL_ADDRESS": temporal.address,
            "TEMPORAL_TASK_QUEUE": queue,
            "LITELLM_BASE_URL": litellm.url,
            "LITELLM_API_KEY": litellm.master_key,
            "LITELLM_TIMEOUT": f"{LITELLM_TIMEOUT}s",
            "SMTP_HOST": mail.host,
            "SMTP_PORT": str(mail.port),
            "SMTP_USE_TLS": "false",
            "SMTP_TIMEOUT": "5s",
            "KUBECONFIG": str(kubeconfig),
            "KUBERNETES_NAMESPACE": NAMESPACE,
            "APPROVAL_QUEUE_INTERVAL": "24h",
            "APPROVAL_ACKNOWLEDGE": "false",  # the requesters' mails are counted
            "ENVIRONMENT": "local",
        }
        settings = load_settings(
            temporal_address=temporal.address,
            temporal_task_queue=queue,
            admin_token=ADMIN_TOKEN,
            environment="local",
        )
        served: ServedApp = serve_in_thread(create_app(settings), lifespan="on")
        cleanup.callback(served.stop)
        client = await connect_when_ready(temporal.address)
        async with httpx.AsyncClient(base_url=served.url, timeout=60) as api:
            stack = Stack(temporal, kube, litellm, mail, settings, worker_env, workdir, client, api)
            cleanup.callback(stack.kill_workers)
            yield stack
            await stack.stop_workers()


@pytest.fixture(autouse=True)
async def restored(stack) -> AsyncIterator[None]:
    """Whatever a test broke or armed, the next one starts from a healthy stack."""
    yield
    stack.kube.on_write(None)
    stack.kube.clear_faults()
    stack.litellm.on_generate(None)
    stack.mail.on_data(None)
    stack.mail.on_accepted(None)
    if not stack.mail.running:
        stack.mail.start()
    if stack.temporal.process is None or stack.temporal.process.poll() is not None:
        await stack.temporal_back()
    await stack.stop_workers()


class Killer:
    """Kills one worker process, once, from inside a stand-in's hook."""

    def __init__(self, worker: WorkerProcess) -> None:
        self.worker = worker
        self.done = threading.Event()
        self._lock = threading.Lock()

    def __call__(self) -> bool:
        with self._lock:
            if self.done.is_set():
                return False
            self.worker.kill()
            self.done.set()
            return True


async def delivered(stack: Stack, email: str, request_id: str, *, mails: int = 1) -> str:
    """Wait for the request's workflow to reach the key's timers; check what its requester and
    operators see.

    Returns the key. Once the workflow waits on the key's timers, the first email is sent and
    recorded, so the mails counted then are all the mails there will be until the key's life
    moves on (a reminder, weeks later).
    """
    final = await settled(stack.client, request_id, COMPLETES_WITHIN)
    assert final.state == "approved", final

    messages = [m for m in stack.mail.messages if m["To"] == email]
    assert len(messages) == mails, f"expected {mails} mail(s) to {email}, got {len(messages)}"
    # A repeat (after a crash between sending and recording it) is recognisably the same mail.
    assert {m["Message-ID"] for m in messages} == {f"<{request_id}.approved@llm-key-requestor>"}
    keys = {KEY.search(plain(m)).group(0) for m in messages}
    assert len(keys) == 1, "every copy of the mail carries the same key"
    [key] = keys

    # LiteLLM knows exactly one key for this request: the one mailed, live, for this model only.
    minted = [k for k in stack.litellm.keys() if k["key_alias"].startswith(secret_name(request_id))]
    assert len(minted) == 1, minted
    [record] = minted
    assert record["key"] == key and record["status"] == "active"
    assert record["models"] == [MODEL]
    assert stack.litellm.has_live_key(key)
    assert stack.litellm.live_keys_for_alias(record["key_alias"]) == 1

    secret = secret_of(stack.kube, request_id)
    labels, annotations = secret["metadata"]["labels"], secret["metadata"]["annotations"]
    assert labels["request-state"] == "approved"
    assert labels["llm-key-requestor/recorded-state"] == "approved"
    assert annotations["state"] == "approved"
    assert annotations["llm-key-requestor/notified"] == "approved"
    assert annotations["llm-key-requestor/key-alias"] == record["key_alias"]
    assert base64.b64decode(secret["data"]["api-key"]).decode() == key
    return key


async def nothing_left_behind(stack: Stack, request_ids) -> None:
    """Each request ran as exactly one workflow, now following its live key, and no Secret is
    left pending."""
    ids = sorted(request_ids)
    query = " OR ".join(f"WorkflowId = '{workflow_id(rid)}'" for rid in ids)

    async def all_following() -> list:
        runs = [run async for run in stack.client.list_workflows(query)]
        seen = {request_id_from_workflow_id(r.id) for r in runs}
        done = all(r.status == WorkflowExecutionStatus.RUNNING for r in runs)
        return runs if done and seen == set(ids) else []

    # Visibility trails the workflows by a moment.
    runs = await wait_until(all_following, 10, "the requests' workflows to follow their keys")
    assert sorted(request_id_from_workflow_id(r.id) for r in runs) == ids, "one run per request"
    secrets = {s["metadata"]["name"]: s for s in stack.kube.secrets(NAMESPACE)}
    states = {rid: secrets[secret_name(rid)]["metadata"]["labels"]["request-state"] for rid in ids}
    assert set(states.values()) == {"approved"}, states


def ours(email: str) -> Callable[[dict], bool]:
    return lambda secret: (
        secret["metadata"].get("annotations", {}).get("llm-key-requestor/email") == email
    )


# --- 1. the worker killed at the worst moments --------------------------------------------


MOMENTS = ("secret-recorded", "key-minted", "email-arriving", "email-accepted")


async def test_worker_killed_at_each_moment_the_next_worker_finishes_the_request(stack):
    """The four moments run side by side, each in a lane (task queue, API, workers) of its own,
    so that the heartbeat timeouts they wait for overlap instead of adding up."""
    results = await asyncio.gather(
        *(killed_at(stack, moment) for moment in MOMENTS), return_exceptions=True
    )
    failures = []
    for moment, result in zip(MOMENTS, results, strict=True):
        if isinstance(result, BaseException):
            result.add_note(f"(the worker killed at {moment})")
            failures.append(result)
    if failures:
        raise BaseExceptionGroup("a request did not survive its worker's death", failures)


async def killed_at(stack: Stack, moment: str) -> None:
    async with stack.lane() as lane:
        email = unique_email(APPROVE)
        first = await stack.start_worker(lane.worker_env)
        kill = Killer(first)
        if moment == "secret-recorded":
            # The pending Secret is stored; the worker dies before Kubernetes' answer reaches it.
            is_ours = ours(email)
            stack.kube.on_write(lambda method, obj: method == "POST" and is_ours(obj) and kill())
        elif moment == "key-minted":
            # LiteLLM has created the key; the worker dies before it hears so.
            stack.litellm.on_generate(lambda record: record["user_id"] == email and kill())
        elif moment == "email-arriving":
            # The mail reaches the server, which has not accepted it yet when the worker dies.
            def arriving(message, envelope):
                if message["To"] == email and kill():
                    return "451 4.3.0 sender went away"
                return None

            stack.mail.on_data(arriving)
        else:
            # The server has accepted the mail; the worker dies before it can record that.
            stack.mail.on_accepted(lambda message, envelope: message["To"] == email and kill())

        request_id = (await submit(lane.api, email, MODEL))["request_id"]
        await wait_until(kill.done.is_set, 30, f"the worker to be killed at {moment}")
        assert first.process.returncode == -signal.SIGKILL

        # What the crash left: exactly the work done up to that moment.
        secret = secret_of(stack.kube, request_id)
        state = secret["metadata"]["labels"]["request-state"]
        minted = [
            k for k in stack.litellm.keys() if k["key_alias"].startswith(secret_name(request_id))
        ]
        arrived = [m for m in stack.mail.messages if m["To"] == email]
        if moment == "secret-recorded":
            assert (state, len(minted), len(arrived)) == ("pending", 0, 0)
        elif moment == "key-minted":
            assert (state, len(minted), len(arrived)) == ("pending", 1, 0)
        elif moment == "email-arriving":
            assert (state, len(minted), len(arrived)) == ("approved", 1, 0)
        else:
            assert (state, len(minted), len(arrived)) == ("approved", 1, 1)
            assert "llm-key-requestor/notified" not in secret["metadata"]["annotations"]

        await stack.start_worker(lane.worker_env)
        # Only a mail accepted just before the crash is sent again, as the very same mail.
        await delivered(stack, email, request_id, mails=2 if moment == "email-accepted" else 1)
        await nothing_left_behind(stack, [request_id])


async def test_worker_killed_between_new_key_minted_and_old_key_deleted_leaves_one_live_key(
    stack,
):
    """Rotation with no grace: the worker dies as LiteLLM mints the new key, before the old one
    is deleted. The next worker finishes the rotation: exactly one live key for the request,
    the one in the last email and in the Secret."""
    async with stack.lane() as lane:
        email = unique_email(APPROVE)
        first = await stack.start_worker(lane.worker_env)
        request_id = (await submit(lane.api, email, MODEL))["request_id"]
        old = await delivered(stack, email, request_id)
        kill = Killer(first)
        stack.litellm.on_generate(lambda record: record["user_id"] == email and kill())
        answer = await lane.api.post(
            f"/api/admin/requests/{request_id}/rotate",
            json={"grace": "0s"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert answer.status_code == 200, answer.text
        await wait_until(kill.done.is_set, 30, "the worker to be killed as the new key is minted")

        def live() -> list[dict]:
            return [
                k
                for k in stack.litellm.keys()
                if k["key_alias"].startswith(secret_name(request_id)) and k["status"] == "active"
            ]

        assert len(live()) == 2, "the crash left the old and the new key live"
        await stack.start_worker(lane.worker_env)
        await wait_until(lambda: len(live()) == 1, COMPLETES_WITHIN, "the old key to be deleted")
        messages = await wait_until(
            lambda: [m for m in stack.mail.messages if m["To"] == email][1:],
            COMPLETES_WITHIN,
            "the new key's email",
        )
        keys = {KEY.search(plain(m)).group(0) for m in messages}
        assert len(keys) == 1, "every copy of the rotation mail carries the same key"
        [new] = keys
        assert new != old
        assert [k["key"] for k in live()] == [new]
        minted = [
            k for k in stack.litellm.keys() if k["key_alias"].startswith(secret_name(request_id))
        ]
        assert len(minted) == 2, "the new key was minted exactly once"
        secret = secret_of(stack.kube, request_id)
        assert base64.b64decode(secret["data"]["api-key"]).decode() == new


# --- 2. Temporal restarted with requests in flight ----------------------------------------


async def test_temporal_restart_mid_flight_loses_no_request(stack):
    await stack.start_worker()
    manual = [unique_email(MANUAL) for _ in range(2)]
    auto = [unique_email(APPROVE) for _ in range(2)]

    # Hold the automatic ones inside LiteLLM's /key/generate: mid-minting when Temporal stops.
    release, minting, lock = threading.Event(), set(), threading.Lock()

    def hold(record: dict) -> None:
        with lock:
            minting.add(record["user_id"])
        release.wait(COMPLETES_WITHIN)  # bounded, so a failing test never wedges the stand-in

    stack.litellm.on_generate(hold)
    try:
        await restart_with_requests_in_flight(stack, manual, auto, release, minting)
    finally:
        release.set()


async def restart_with_requests_in_flight(stack, manual, auto, release, minting) -> None:
    ids = {email: (await submit(stack.api, email, MODEL))["request_id"] for email in manual + auto}

    async def waiting_for_a_person() -> bool:
        for email in manual:
            status = (await stack.api.get(f"/api/requests/{ids[email]}")).json()
            if status["state"] != "pending" or not status["deadline"]:
                return False
        return True

    await wait_until(waiting_for_a_person, 30, "the manual requests to wait for a decision")
    await wait_until(lambda: minting >= set(auto), 30, "both automatic requests to be minting")

    stack.temporal.stop()
    # LiteLLM answers while Temporal is away: the worker finishes minting (the Secrets say
    # approved) but cannot report it. Temporal must not lose the result or mint again.
    release.set()

    def minted_while_down() -> bool:
        return all(
            secret_of(stack.kube, ids[email])["metadata"]["labels"]["request-state"] == "approved"
            for email in auto
        )

    await wait_until(minted_while_down, 30, "the keys to be minted while Temporal is down")
    assert stack.temporal.process.poll() is not None
    await stack.temporal_back()

    # The manual requests survived the restart and still take a decision, by either path.
    approved = await stack.api.post(
        f"/api/admin/requests/{ids[manual[0]]}/approve",
        json={"reviewer": "alice"},
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
    )
    assert approved.status_code == 200, approved.text
    await stack.client.get_workflow_handle(workflow_id(ids[manual[1]])).signal(
        "approve", Review(reviewer="bob")
    )

    for email in manual + auto:
        await delivered(stack, email, ids[email])
    reviewers = {
        email: secret_of(stack.kube, ids[email])["metadata"]["annotations"][
            "llm-key-requestor/reviewer"
        ]
        for email in manual
    }
    # The admin token decides under its configured name; a signal's name is only declared.
    assert reviewers == {manual[0]: "admin-token", manual[1]: "declared:bob"}
    await nothing_left_behind(stack, ids.values())


# --- 3. Kubernetes, LiteLLM and SMTP misbehaving at once -----------------------------------


async def test_outages_everywhere_several_requests_each_complete_once(stack):
    await stack.start_worker()
    calls_before = stack.litellm.generate_calls
    stack.mail.stop()  # connections refused until every request has tried to send its mail
    stack.kube.inject_faults(6, 409, {"PUT"})  # someone else keeps writing the Secrets
    stack.kube.inject_faults(6, 500)  # then the API server fails for a while
    stack.litellm.delay_next(2, LITELLM_TIMEOUT + 1)  # answers that come after the client gave up

    emails = [unique_email(APPROVE) for _ in range(6)]
    bodies = await asyncio.gather(*(submit(stack.api, email, MODEL) for email in emails))
    ids = {email: body["request_id"] for email, body in zip(emails, bodies, strict=True)}

    async def mail_refused(request_id: str) -> bool:
        """The request is at its email and has had it refused at least once."""
        handle = stack.client.get_workflow_handle(workflow_id(request_id))
        pending = (await handle.describe()).raw_description.pending_activities
        return any(a.activity_type.name == "notify_requester" and a.attempt >= 2 for a in pending)

    for email in emails:
        await wait_until(
            lambda rid=ids[email]: mail_refused(rid), COMPLETES_WITHIN, f"a refused mail to {email}"
        )
    assert not stack.kube.pending_faults(), "every injected Kubernetes fault was met"
    assert stack.litellm.generate_calls >= calls_before + len(emails) + 2, "timed-out calls retried"
    stack.mail.start()

    for email in emails:
        await delivered(stack, email, ids[email])
    await nothing_left_behind(stack, ids.values())


# --- 4. the API while Temporal is down -----------------------------------------------------


async def test_api_says_503_while_temporal_is_down_then_accepts_the_same_request(stack):
    await stack.start_worker()
    email = unique_email(APPROVE)
    request = {"email": email, "llm": MODEL}
    # The API has been talking to Temporal (a connection exists) when Temporal goes away;
    # test_api.py covers a Temporal that was never there.
    assert (await stack.api.get("/health/ready")).status_code == 200

    stack.temporal.stop()
    refused = await stack.api.post("/api/request-key", json=request)
    assert refused.status_code == 503, refused.text
    assert refused.headers["content-type"] == "application/json"
    assert "Temporal" in refused.json()["message"]
    ready = await stack.api.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["temporal"].startswith("unreachable")
    await stack.temporal_back()

    # Nothing was recorded for the refused submission: no workflow, no Secret.
    request_id = request_id_for(email, MODEL, stack.settings.request_id_key.get_secret_value())
    with pytest.raises(RPCError) as missing:
        await stack.client.get_workflow_handle(workflow_id(request_id)).describe()
    assert missing.value.status == RPCStatusCode.NOT_FOUND
    assert not [s for s in stack.kube.secrets(NAMESPACE) if ours(email)(s)]

    accepted = await stack.api.post("/api/request-key", json=request)
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["request_id"] == request_id
    assert accepted.json()["status"] in ("pending", "approved")
    await delivered(stack, email, request_id)
    await nothing_left_behind(stack, [request_id])
