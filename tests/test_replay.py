"""Determinism: recorded histories of real runs must replay against today's workflow code.

A change that would break running workflows (reordered activities, a new timer on an old path)
fails here. The replayer runs each history in the SDK's workflow sandbox, which the worker leaves
out for its cost (worker.py): a workflow path that calls something non-deterministic (the clock,
randomness, I/O) fails here too. Histories are only ever added, never overwritten: the tests
that run a path call `record_history(name, history)`, which writes `tests/histories/<name>.json`
when RECORD_HISTORIES=1 is set and no file of that name exists yet (README, "Changing a workflow
safely"):

    RECORD_HISTORIES=1 uv run pytest tests/test_replay.py tests/test_lifecycle.py \
        tests/test_lifecycle_timers.py tests/test_deadline.py tests/test_notifications.py \
        tests/test_approvals_several.py tests/test_mail_rejected.py tests/test_secret_lost.py
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

import pytest
from temporalio.client import WorkflowHistory
from temporalio.worker import Replayer

from conftest import mail_to, unique_email, wait_until
from domain import QUERY_STATUS, RequestStatus, Review, workflow_id
from test_key_request_flow import submit
from test_reconcile import orphan, reconcile
from workflows.key_request import KeyRequestWorkflow

HISTORIES = Path(__file__).parent / "histories"


def record_history(name: str, history: WorkflowHistory) -> None:
    """Keep `history` as a new recorded history when RECORD_HISTORIES=1; never overwrite.

    Failures' stack traces name the recording machine's paths; replay never reads them, so they
    are left out.
    """
    path = HISTORIES / f"{name}.json"
    if os.environ.get("RECORD_HISTORIES") and not path.exists():
        path.write_text(json.dumps(without_stack_traces(json.loads(history.to_json())), indent=2))


def without_stack_traces(node):
    if isinstance(node, dict):
        return {k: "" if k == "stackTrace" else without_stack_traces(v) for k, v in node.items()}
    if isinstance(node, list):
        return [without_stack_traces(v) for v in node]
    return node


def recorded() -> list[Path]:
    return sorted(HISTORIES.glob("*.json"))


@pytest.mark.parametrize("path", recorded(), ids=lambda p: p.stem)
async def test_recorded_history_replays(path):
    history = WorkflowHistory.from_json(path.stem, path.read_text())
    await Replayer(workflows=[KeyRequestWorkflow]).replay_workflow(history)


async def test_fresh_histories_replay_and_can_be_recorded(
    api, mail, temporal_client, litellm, core_api, settings, admin_headers
):
    """Runs each path once on the real server; replays it; records it when asked to."""
    runs = {}
    # LiteLLM refuses the next key: alone, so that no other request takes the refusal.
    litellm.reject_next(1, status=400, message="max_budget must be positive", param="max_budget")
    email = unique_email("approve.example.com")
    runs["failed"] = ((await submit(api, email))["request_id"], email)
    await mail_to(mail, email)
    for name, domain in (("policy-approved", "approve.example.com"),
                         ("policy-denied", "deny.example.com")):  # fmt: skip
        email = unique_email(domain)
        runs[name] = ((await submit(api, email))["request_id"], email)
    email = unique_email("manual.example.com")
    request_id = (await submit(api, email))["request_id"]
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    await handle.signal("approve", Review(reviewer="alice", reason="ok"))
    await handle.signal("deny", Review(reviewer="late"))  # ignored
    runs["signal-approved"] = (request_id, email)
    email = unique_email("manual.example.com")
    request_id = (await submit(api, email))["request_id"]
    answer = await api.post(
        f"/api/admin/requests/{request_id}/approve", json={"reviewer": "bo"}, headers=admin_headers
    )
    assert answer.status_code == 200, answer.text
    runs["admin-approved"] = (request_id, email)
    # A pending Secret with no workflow behind it: the reconciler starts one.
    email, request_id = unique_email("approve.example.com"), uuid.uuid4().hex[:20]
    orphan(core_api, f"llm-key-request-{request_id}",
           {"app.kubernetes.io/component": "llm-key-request", "request-state": "pending",
            "llm-key-requestor/recorded-state": "pending"},
           {"state": "pending", "llm-key-requestor/email": email,
            "llm-key-requestor/model": "gpt-4o"})  # fmt: skip
    assert (await reconcile(temporal_client, settings)).resumed >= 1
    runs["reconciler-resumed"] = (request_id, email)

    replayer = Replayer(workflows=[KeyRequestWorkflow])
    for name, (request_id, email) in runs.items():
        await mail_to(mail, email)
        handle = temporal_client.get_workflow_handle(workflow_id(request_id))
        # The key (or the finished request's Secret) now lives on: the history up to here.
        await wait_until(lambda h=handle: waiting_on_timers(h), 30, f"{name} to be told")
        history = await handle.fetch_history()
        await replayer.replay_workflow(history)
        record_history(f"v5-{name}", history)


async def waiting_on_timers(handle) -> bool:
    """Past the first email: the key's reminders, or the finished request's clean-up, wait."""
    status = await handle.query(QUERY_STATUS, result_type=RequestStatus)
    return bool(status.next_reminder or status.cleanup_at)
