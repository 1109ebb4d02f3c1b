"""The reconciler: stray Secrets resumed, kubectl decisions relayed, stale Secrets corrected."""

from __future__ import annotations

import asyncio
import json
import subprocess
import uuid
from datetime import timedelta

from kubernetes import client as k8s

from conftest import (
    mail_to,
    secret_of,
    settled,
    start_worker,
    stop_worker,
    unique_email,
    wait_until,
)
from devstack.temporal import binary, connect_when_ready
from domain import RECONCILE_SCHEDULE_ID, ReconcileCounts, ReconcilePage, workflow_id
from test_key_request_flow import KEY, plain, submit
from worker import ensure_reconcile_schedule
from workflows.reconcile import ReconcileWorkflow


async def reconcile(temporal_client, settings) -> ReconcileCounts:
    """One reconciler run, as the Schedule starts it."""
    return await temporal_client.execute_workflow(
        ReconcileWorkflow.run,
        ReconcilePage(page_size=3),  # small pages: every run crosses page boundaries
        id=f"reconcile-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.temporal_task_queue,
    )


def kubectl(kube, tmp_path, *args: str) -> str:
    done = subprocess.run(  # noqa: S603
        [binary("kubectl"), "--kubeconfig", str(kube.kubeconfig),
         "--cache-dir", str(tmp_path / "kubectl-cache"), *args],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


def orphan(core_api, name: str, labels: dict, annotations: dict) -> None:
    """A Secret made straight through the Kubernetes API, with no workflow behind it."""
    body = k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name=name, labels=labels, annotations=annotations)
    )
    core_api.create_namespaced_secret("default", body)


async def runs_of(temporal_client, wf_id: str) -> list:
    return [r async for r in temporal_client.list_workflows(f"WorkflowId = '{wf_id}'")]


async def test_orphaned_pending_secrets_are_resumed_and_emailed(
    temporal_client, settings, core_api, kube, mail, worker
):
    ours, legacy = uuid.uuid4().hex[:20], str(uuid.uuid4())
    ours_email, legacy_email = (
        unique_email("approve.example.com"),
        unique_email("approve.example.com"),
    )
    orphan(
        core_api,
        f"llm-key-request-{ours}",
        {"app.kubernetes.io/component": "llm-key-request", "request-state": "pending",
         "llm-key-requestor/recorded-state": "pending"},
        {"state": "pending", "llm-key-requestor/email": ours_email,
         "llm-key-requestor/model": "gpt-4o"},
    )  # fmt: skip
    # As the older polling service wrote them: no recorded-state, its own annotation names.
    orphan(
        core_api,
        f"llm-key-request-{legacy}",
        {"app.kubernetes.io/component": "llm-key-request", "request-state": "pending"},
        {"state": "pending", "email": legacy_email, "llm": "gpt-4o-mini"},
    )

    counts = await reconcile(temporal_client, settings)
    assert counts.resumed >= 2 and counts.pages >= 2

    for request_id, email, model in ((ours, ours_email, "gpt-4o"),
                                     (legacy, legacy_email, "gpt-4o-mini")):  # fmt: skip
        [message] = await mail_to(mail, email)
        assert KEY.search(plain(message)) and model in plain(message)
        secret = secret_of(kube, request_id)
        assert secret["metadata"]["labels"]["request-state"] == "approved"
        assert secret["metadata"]["annotations"]["state"] == "approved"
        assert len(await runs_of(temporal_client, workflow_id(request_id))) == 1


async def test_secret_without_email_is_skipped_not_guessed(temporal_client, settings, core_api):
    name = f"llm-key-request-{uuid.uuid4().hex[:20]}"
    orphan(core_api, name,
           {"app.kubernetes.io/component": "llm-key-request", "request-state": "pending"},
           {"state": "pending"})  # fmt: skip
    try:
        counts = await reconcile(temporal_client, settings)
        assert counts.skipped >= 1
        assert (
            core_api.read_namespaced_secret(name, "default").metadata.labels["request-state"]
            == "pending"
        )
    finally:
        core_api.delete_namespaced_secret(name, "default")


async def test_workflow_terminated_by_hand_is_resumed_once(
    api, admin_headers, temporal_client, settings, mail
):
    email = unique_email("manual.example.com")
    request_id = (await submit(api, email))["request_id"]
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    await wait_until(lambda: secret_exists(api, request_id), what="the pending Secret")
    await handle.terminate(reason="operator mistake")

    await reconcile(temporal_client, settings)
    await reconcile(temporal_client, settings)
    runs = await runs_of(temporal_client, workflow_id(request_id))
    assert len(runs) == 2, "resumed exactly once"

    response = await api.post(
        f"/api/admin/requests/{request_id}/approve", json={"reviewer": "carol"},
        headers=admin_headers,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    [message] = await mail_to(mail, email)
    assert "approved by admin-token" in plain(message)


async def secret_exists(api, request_id) -> bool:
    status = (await api.get(f"/api/requests/{request_id}")).json()
    return status.get("state") == "pending"


async def test_kubectl_relabel_approves_through_the_workflow(
    api, temporal_client, settings, kube, mail, litellm, tmp_path
):
    email = unique_email("manual.example.com")
    request_id = (await submit(api, email))["request_id"]
    name = f"llm-key-request-{request_id}"
    await wait_until(lambda: any(s["metadata"]["name"] == name for s in kube.secrets()),
                     what="the Secret")  # fmt: skip

    # The seed's documented manual path, verbatim.
    await asyncio.to_thread(
        kubectl, kube, tmp_path, "label", "secret", name, "request-state=approved", "--overwrite"
    )
    await asyncio.to_thread(
        kubectl, kube, tmp_path, "annotate", "secret", name, "state=approved", "--overwrite"
    )
    counts = await reconcile(temporal_client, settings)
    assert counts.relayed >= 1

    [message] = await mail_to(mail, email)
    key = KEY.search(plain(message)).group(0)
    assert litellm.has_live_key(key)
    annotations = secret_of(kube, request_id)["metadata"]["annotations"]
    assert annotations["llm-key-requestor/reviewer"] == "declared:kubectl"
    assert annotations["llm-key-requestor/decision-source"] == "signal"
    shown = await asyncio.to_thread(
        kubectl, kube, tmp_path, "get", "secret", name,
        "-o", "jsonpath={.metadata.labels.request-state}",
    )  # fmt: skip
    assert shown == "approved"


async def test_kubectl_denial_with_a_reason(api, temporal_client, settings, kube, mail, tmp_path):
    email = unique_email("manual.example.com")
    request_id = (await submit(api, email))["request_id"]
    name = f"llm-key-request-{request_id}"
    await wait_until(lambda: any(s["metadata"]["name"] == name for s in kube.secrets()),
                     what="the Secret")  # fmt: skip
    await asyncio.to_thread(
        kubectl, kube, tmp_path, "annotate", "secret", name,
        "llm-key-requestor/reason=Please use the team key", "--overwrite",
    )  # fmt: skip
    await asyncio.to_thread(
        kubectl, kube, tmp_path, "label", "secret", name, "request-state=denied", "--overwrite"
    )
    await reconcile(temporal_client, settings)

    [message] = await mail_to(mail, email)
    assert "Please use the team key" in plain(message)
    assert secret_of(kube, request_id)["metadata"]["annotations"]["state"] == "denied"


async def test_stale_secret_of_a_finished_workflow_is_corrected_without_a_new_run(
    api, temporal_client, settings, core_api, kube, mail
):
    email = unique_email("deny.example.com")
    request_id = (await submit(api, email))["request_id"]
    await mail_to(mail, email)
    await settled(temporal_client, request_id)

    name = f"llm-key-request-{request_id}"
    secret = core_api.read_namespaced_secret(name, "default")
    secret.metadata.labels.update(
        {"request-state": "pending", "llm-key-requestor/recorded-state": "pending"}
    )
    secret.metadata.annotations["state"] = "pending"
    core_api.replace_namespaced_secret(name, "default", secret)

    counts = await reconcile(temporal_client, settings)
    assert counts.corrected >= 1
    secret = secret_of(kube, request_id)
    assert secret["metadata"]["labels"]["request-state"] == "denied"
    assert secret["metadata"]["annotations"]["state"] == "denied"
    assert len(await runs_of(temporal_client, workflow_id(request_id))) == 1
    assert len([m for m in mail.messages if m["To"] == email]) == 1


async def test_a_second_run_changes_nothing(temporal_client, settings, worker):
    await reconcile(temporal_client, settings)
    again = await reconcile(temporal_client, settings)
    assert (again.resumed, again.relayed, again.corrected) == (0, 0, 0)
    assert again.scanned == again.in_flight + again.skipped


def temporal_cli(server, *args: str) -> str:
    done = subprocess.run(  # noqa: S603
        [binary("temporal"), *args, "--address", server.address],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_schedule_is_one_after_two_worker_starts_and_follows_the_interval(
    temporal_client, temporal_server, settings, core_api, worker
):
    # A second worker process, with its own connection, configured with another interval.
    five_minutes = settings.model_copy(update={"approval_queue_interval": timedelta(minutes=5)})
    second = await start_worker(
        five_minutes, await connect_when_ready(temporal_server.address), core_api
    )
    try:
        await wait_until(lambda: interval(temporal_server) == "300s", what="the new interval")
    finally:
        await stop_worker(second)
        # Give the session's Schedule its interval back: at 5 minutes it would fire during
        # later tests and run the reconciler beside theirs.
        await ensure_reconcile_schedule(temporal_client, settings)

    listed = json.loads(temporal_cli(temporal_server, "schedule", "list", "--output", "json"))
    assert [s["scheduleId"] for s in listed].count(RECONCILE_SCHEDULE_ID) == 1
    described = schedule(temporal_server)
    assert described["policies"]["overlapPolicy"] == "SCHEDULE_OVERLAP_POLICY_SKIP"

    # Triggered by hand, as an operator would.
    temporal_cli(temporal_server, "schedule", "trigger", "--schedule-id", RECONCILE_SCHEDULE_ID)

    async def triggered_run_completed():
        query = "WorkflowType = 'ReconcileWorkflow' AND WorkflowId STARTS_WITH 'llm-key-requestor'"
        runs = [r async for r in temporal_client.list_workflows(query)]
        return any(r.status.name == "COMPLETED" for r in runs)

    await wait_until(triggered_run_completed, what="the triggered reconcile run")


def interval(server) -> str | None:
    """The Schedule's interval, or None while it does not exist yet."""
    try:
        return schedule(server)["spec"]["interval"][0]["interval"]
    except AssertionError:
        return None


def schedule(server) -> dict:
    shown = temporal_cli(server, "schedule", "describe", "--schedule-id", RECONCILE_SCHEDULE_ID,
                         "--output", "json")  # fmt: skip
    return json.loads(shown)["schedule"]
