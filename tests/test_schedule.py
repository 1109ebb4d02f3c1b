"""The reconcile Schedule across worker restarts: the worker's fields follow its settings, the
operator's edits (pause, note, policies, jitter) stay."""

from __future__ import annotations

from datetime import timedelta

from temporalio.client import ScheduleDescription, ScheduleUpdate, ScheduleUpdateInput

from conftest import wait_until
from domain import RECONCILE_SCHEDULE_ID
from worker import ensure_reconcile_schedule


async def test_a_worker_restart_keeps_the_operators_edits(temporal_client, settings, worker):
    handle = temporal_client.get_schedule_handle(RECONCILE_SCHEDULE_ID)
    await ensure_reconcile_schedule(temporal_client, settings)

    async def shows(condition) -> ScheduleDescription | None:
        """The description once it reflects an edit (Temporal applies edits asynchronously)."""
        description = await handle.describe()
        return description if condition(description.schedule) else None

    await wait_until(lambda: shows(lambda s: s.spec.intervals[0].every == timedelta(hours=24)))
    # An operator pauses the reconciler and tunes its policy.
    await handle.pause(note="paused during the migration (ops-1234)")
    await wait_until(lambda: shows(lambda s: s.state.paused), what="the pause")

    def tune(current: ScheduleUpdateInput) -> ScheduleUpdate:
        schedule = current.description.schedule
        schedule.policy.catchup_window = timedelta(minutes=7)
        schedule.spec.jitter = timedelta(seconds=3)
        return ScheduleUpdate(schedule=schedule)

    await handle.update(tune)
    edited = await wait_until(
        lambda: shows(lambda s: s.spec.jitter == timedelta(seconds=3) and s.state.paused),
        what="the operator's edits",
    )
    try:
        # A worker of the same configuration starts: nothing to write.
        await ensure_reconcile_schedule(temporal_client, settings)
        same = await handle.describe()
        assert same.info.last_updated_at == edited.info.last_updated_at, "nothing was written"

        # One with another interval (a rollout): the interval follows, the edits stay.
        five = settings.model_copy(update={"approval_queue_interval": timedelta(minutes=5)})
        await ensure_reconcile_schedule(temporal_client, five)
        after = (
            await wait_until(
                lambda: shows(lambda s: s.spec.intervals[0].every == timedelta(minutes=5)),
                what="the new interval",
            )
        ).schedule
        assert [i.every for i in after.spec.intervals] == [timedelta(minutes=5)]
        assert after.state.paused
        assert after.state.note == "paused during the migration (ops-1234)"
        assert after.policy.catchup_window == timedelta(minutes=7)
        assert after.spec.jitter == timedelta(seconds=3)
        assert after.action.task_queue == settings.temporal_task_queue
    finally:
        await handle.unpause(note="")
        await ensure_reconcile_schedule(temporal_client, settings)
