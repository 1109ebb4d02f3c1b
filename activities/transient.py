"""Failures expected to pass: retried by Temporal and logged as one WARNING line each.

An outage of LiteLLM, the mail server or the Kubernetes API is not a bug in this service: a
traceback per attempt would bury the log in noise. These errors are BENIGN to the SDK (which
then logs them at DEBUG), and `LogTransientFailures` writes the one line instead. Anything else
an activity raises keeps the SDK's WARNING with its traceback, because it is unexpected.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from temporalio import activity
from temporalio.exceptions import ApplicationError, ApplicationErrorCategory
from temporalio.worker import (
    ActivityInboundInterceptor,
    ExecuteActivityInput,
    Interceptor,
)


class Transient(ApplicationError):
    """A retryable failure outside our code; `retry_after` is the remote side's wish, if any."""

    def __init__(self, message: str, retry_after: timedelta | None = None) -> None:
        super().__init__(
            message,
            type=type(self).__name__,
            category=ApplicationErrorCategory.BENIGN,
            next_retry_delay=retry_after,
        )


class LogTransientFailures(Interceptor):
    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _LogTransient(next)


class _LogTransient(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        try:
            return await super().execute_activity(input)
        except Transient as exc:
            info = activity.info()
            activity.logger.warning(
                "%s attempt %d failed: %s", info.activity_type, info.attempt, exc.message
            )
            raise
