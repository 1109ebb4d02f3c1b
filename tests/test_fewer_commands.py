"""The commands of a policy-approved request (the cost per request). Since PATCH_LOCAL_DELIVERY
it goes from its start to its key's timers without an activity task: record_request (which
brings the policy's answer), mint_key (which brings the key's plan) and the email run as local
activities, and the state search attribute is upserted only when it changes (the start sets it
to pending, and the model). Runs of the earlier paths replay in test_replay.py."""

from __future__ import annotations

from temporalio.api.enums.v1 import EventType

from conftest import mail_to, unique_email, wait_until
from domain import PATCH_LOCAL_DELIVERY, workflow_id
from test_key_request_flow import submit
from test_replay import waiting_on_timers


async def test_a_policy_approved_request_runs_every_step_locally_with_one_upsert(
    api, mail, temporal_client
):
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email, "gpt-4o-mini"))["request_id"]
    await mail_to(mail, email)
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    await wait_until(lambda: waiting_on_timers(handle), 30, "the key's timers")
    events = (await handle.fetch_history()).events

    # No activity task: every step ran inside the workflow's own task (usually one; a busy worker
    # may see it split in two, while a step waits its turn).
    assert not [e for e in events if e.HasField("activity_task_scheduled_event_attributes")]
    upserts = [
        e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
        for e in events
        if e.HasField("upsert_workflow_search_attributes_event_attributes")
    ]
    # The SDK's own upsert for the patch marker, then the one change of state.
    assert [set(fields) for fields in upserts] == [{"TemporalChangeVersion"}, {"KeyRequestState"}]
    assert PATCH_LOCAL_DELIVERY.encode() in upserts[0]["TemporalChangeVersion"].data
    assert upserts[1]["KeyRequestState"].data == b'"approved"'
    # One patch marker (the older patches need none of their own), then record_request,
    # mint_key and the email, each a local activity.
    markers = [
        e.marker_recorded_event_attributes.marker_name
        for e in events
        if e.HasField("marker_recorded_event_attributes")
    ]
    assert markers == ["core_patch"] + ["core_local_activity"] * 3
    assert events[-1].event_type == EventType.EVENT_TYPE_TIMER_STARTED
