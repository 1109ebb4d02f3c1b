"""Keeps Kubernetes and Temporal in step; run by a Temporal Schedule every APPROVAL_QUEUE_INTERVAL.

It pages through the pending Secrets (one activity per page) and, for each: resumes a request
whose workflow is gone, relays a decision made with kubectl, or corrects a Secret whose workflow
already finished. Secrets of the older polling service that it left approved are served too:
with no key yet, the approval is relayed; with its key, the Secret is only labelled as ours.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy

from workflows import metrics

with workflow.unsafe.imports_passed_through():
    from activities.reconcile import ReconcileActivities
    from domain import RECONCILE_PHASES, ReconcileCounts, ReconcilePage

# Past this many pages in one run, continue as new so the history stays small.
PAGES_PER_RUN = 200


@workflow.defn
class ReconcileWorkflow:
    @workflow.run
    async def run(self, start: ReconcilePage | None = None) -> ReconcileCounts:
        page = start or ReconcilePage()
        total = ReconcileCounts()
        phases = list(RECONCILE_PHASES)
        phases = phases[phases.index(page.phase) :]
        for phase in phases:
            token = page.continue_token if phase == page.phase else None
            while True:
                result = await workflow.execute_activity_method(
                    ReconcileActivities.reconcile_page,
                    ReconcilePage(phase, token, page.page_size),
                    start_to_close_timeout=timedelta(minutes=5),
                    heartbeat_timeout=timedelta(minutes=2),
                    retry_policy=RetryPolicy(maximum_attempts=5),
                )
                total.add(result.counts)
                token = result.next_token
                if not token:
                    break
                if total.pages >= PAGES_PER_RUN:
                    workflow.continue_as_new(ReconcilePage(phase, token, page.page_size))
        acted = total.resumed + total.relayed + total.corrected + total.adopted + total.skipped
        # Every APPROVAL_QUEUE_INTERVAL: a run that found nothing to do is not news.
        (workflow.logger.info if acted else workflow.logger.debug)("reconciled: %s", total)
        metrics.reconciled(total)
        return total
