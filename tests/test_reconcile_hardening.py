"""The reconciler against what long-lived clusters hold: expired listings, the older service's
Secrets at the cut-over, and a log that stays quiet when there is nothing to do."""

from __future__ import annotations

import base64
import uuid

from activities.reconcile import SELECTORS
from conftest import NAMESPACE, mail_to, secret_of, unique_email
from domain import ReconcilePage, workflow_id
from test_key_request_flow import KEY, plain
from test_reconcile import orphan, reconcile, runs_of
from workflows.reconcile import ReconcileWorkflow

OURS = {"app.kubernetes.io/component": "llm-key-request", "request-state": "pending",
        "llm-key-requestor/recorded-state": "pending"}  # fmt: skip


async def test_an_expired_continue_token_restarts_the_listing(
    temporal_client, settings, core_api, kube, worker
):
    """A run that starts (or continues as new) with a token the API server no longer honours
    goes on with the listing, instead of failing on the same 410 five times."""
    ids = [uuid.uuid4().hex[:20] for _ in range(2)]
    for request_id in ids:
        orphan(core_api, f"llm-key-request-{request_id}", OURS,
               {"state": "pending", "llm-key-requestor/email": unique_email("manual.example.com"),
                "llm-key-requestor/model": "gpt-4o"})  # fmt: skip
    first = core_api.list_namespaced_secret(NAMESPACE, label_selector=SELECTORS["pending"], limit=1)
    token = first.metadata._continue
    assert token, "two pending Secrets make two pages"
    kube.compact()

    counts = await temporal_client.execute_workflow(
        ReconcileWorkflow.run,
        ReconcilePage("pending", token, page_size=3),
        id=f"reconcile-test-{uuid.uuid4().hex[:8]}",
        task_queue=settings.temporal_task_queue,
    )
    assert counts.resumed >= 1, counts
    # The listing goes on from where the expired token stood (the server's 410 says where), so
    # the Secret past that point, which the earlier run never reached, is resumed once.
    assert len(await runs_of(temporal_client, workflow_id(max(ids)))) == 1


async def test_the_older_services_approved_secrets_are_served_or_adopted_at_the_cut_over(
    temporal_client, settings, core_api, kube, mail, litellm, worker
):
    """As the older service left them: relabelled `approved` with no key yet (served now, once),
    and approved with the key it minted and mailed (only labelled as ours: no second key)."""
    labels = {"app.kubernetes.io/component": "llm-key-request", "request-state": "approved"}
    waiting, served = str(uuid.uuid4()), str(uuid.uuid4())
    waiting_email, served_email = unique_email("manual.example.com"), unique_email("example.com")
    orphan(core_api, f"llm-key-request-{waiting}", labels,
           {"state": "approved", "email": waiting_email, "llm": "gpt-4o-mini"})  # fmt: skip
    old_key = "sk-minted-by-the-older-service"
    orphan(core_api, f"llm-key-request-{served}", labels,
           {"state": "approved", "email": served_email, "llm": "gpt-4o"})  # fmt: skip
    core_api.patch_namespaced_secret(
        f"llm-key-request-{served}", NAMESPACE,
        {"data": {"api-key": base64.b64encode(old_key.encode()).decode()}},
    )  # fmt: skip

    counts = await reconcile(temporal_client, settings)
    assert counts.relayed >= 1 and counts.adopted >= 1, counts

    [message] = await mail_to(mail, waiting_email, within=60)
    key = KEY.search(plain(message)).group(0)
    assert litellm.has_live_key(key)
    secret = secret_of(kube, waiting)
    assert secret["metadata"]["labels"]["llm-key-requestor/recorded-state"] == "approved"
    assert secret["metadata"]["annotations"]["llm-key-requestor/reviewer"] == "declared:kubectl"

    adopted = secret_of(kube, served)
    assert adopted["metadata"]["labels"]["llm-key-requestor/recorded-state"] == "approved"
    assert base64.b64decode(adopted["data"]["api-key"]).decode() == old_key
    assert not await runs_of(temporal_client, workflow_id(served)), "no workflow, no new key"
    assert not [m for m in mail.messages if m["To"] == served_email]

    again = await reconcile(temporal_client, settings)
    assert (again.relayed, again.adopted) == (0, 0), again
    assert len(await runs_of(temporal_client, workflow_id(waiting))) == 1


async def test_a_run_with_nothing_to_do_logs_its_counts_at_debug(
    temporal_client, settings, worker, captured_logs
):
    await reconcile(temporal_client, settings)
    run = f"reconcile-test-{uuid.uuid4().hex[:8]}"
    quiet = await temporal_client.execute_workflow(
        ReconcileWorkflow.run, ReconcilePage(page_size=3), id=run,
        task_queue=settings.temporal_task_queue,
    )  # fmt: skip
    assert (quiet.resumed, quiet.relayed, quiet.corrected, quiet.adopted, quiet.skipped) == (
        0, 0, 0, 0, 0,
    ), quiet  # fmt: skip
    [line] = [line for line in captured_logs.lines if "reconciled: " in line and run in line]
    assert line.startswith("temporalio.workflow DEBUG "), line
