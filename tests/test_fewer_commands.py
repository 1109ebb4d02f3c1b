"""The commands of a request started after PATCH_FEWER_COMMANDS (the cost per request):
record_request runs locally in the first workflow task and brings the policy's answer, mint_key
brings the key's plan, and the state search attribute is upserted only when it changes (the start
sets it to pending, and the model)."""

from __future__ import annotations

from conftest import mail_to, unique_email, wait_until
from domain import PATCH_FEWER_COMMANDS, workflow_id
from test_key_request_flow import submit
from test_replay import waiting_on_timers


async def test_a_policy_approved_request_runs_one_local_two_activities_and_one_upsert(
    api, mail, temporal_client
):
    email = unique_email("approve.example.com")
    request_id = (await submit(api, email, "gpt-4o-mini"))["request_id"]
    await mail_to(mail, email)
    handle = temporal_client.get_workflow_handle(workflow_id(request_id))
    await wait_until(lambda: waiting_on_timers(handle), 30, "the key's timers")
    events = (await handle.fetch_history()).events

    scheduled = [
        e.activity_task_scheduled_event_attributes.activity_type.name
        for e in events
        if e.HasField("activity_task_scheduled_event_attributes")
    ]
    assert scheduled == ["mint_key", "notify_requester"]
    upserts = [
        e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields
        for e in events
        if e.HasField("upsert_workflow_search_attributes_event_attributes")
    ]
    # The SDK's own upsert for the patch marker, then the one change of state.
    assert [set(fields) for fields in upserts] == [{"TemporalChangeVersion"}, {"KeyRequestState"}]
    assert PATCH_FEWER_COMMANDS.encode() in upserts[0]["TemporalChangeVersion"].data
    assert upserts[1]["KeyRequestState"].data == b'"approved"'
    # record_request ran as a local activity, in the first workflow task; the older patches
    # need no marker of their own.
    markers = [
        e.marker_recorded_event_attributes.marker_name
        for e in events
        if e.HasField("marker_recorded_event_attributes")
    ]
    assert markers == ["core_patch", "core_local_activity"]
