"""The yardstick: a bare workflow that runs one trivial activity, and a worker for it.

    python -m bench.bare --address 127.0.0.1:7233 --task-queue bench-bare

The worker uses the SDK's defaults, as the project's worker does. It prints one JSON line when
it polls, and stops on SIGTERM, when the benchmark process dies, or after --max-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
from datetime import timedelta

from temporalio import activity, workflow
from temporalio.client import Client
from temporalio.worker import Worker


@activity.defn
async def bare_activity(n: int) -> int:
    return n


@workflow.defn
class BareWorkflow:
    @workflow.run
    async def run(self, n: int) -> int:
        return await workflow.execute_activity(
            bare_activity, n, start_to_close_timeout=timedelta(seconds=30)
        )


async def serve(address: str, task_queue: str, max_seconds: float) -> None:
    client = await Client.connect(address)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Worker(
        client, task_queue=task_queue, workflows=[BareWorkflow], activities=[bare_activity]
    ):
        print(json.dumps({"ready": task_queue}), flush=True)
        try:
            await asyncio.wait_for(stop.wait(), max_seconds)
        except TimeoutError:
            pass


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bare")
    parser.add_argument("--address", required=True)
    parser.add_argument("--task-queue", required=True)
    parser.add_argument("--max-seconds", type=float, default=3600)
    args = parser.parse_args()
    asyncio.run(serve(args.address, args.task_queue, args.max_seconds))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
