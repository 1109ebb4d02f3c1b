"""The API's yardstick: FastAPI and the Temporal client, with one endpoint that starts the bare
workflow (bench/bare.py) and returns.

    TEMPORAL_ADDRESS=127.0.0.1:7233 BARE_TASK_QUEUE=bench-bare \
        uvicorn bench.bare_api:create_app --factory

The benchmark sends it the same burst as the project's API and reads its peak RSS: the floor of
any API built from these two libraries, served the way the image serves ours. What our API uses
beyond it is its own.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from pydantic import BaseModel
from temporalio.client import Client


class Start(BaseModel):
    workflow_id: str


class Started(BaseModel):
    workflow_id: str


def create_app() -> FastAPI:
    address, task_queue = os.environ["TEMPORAL_ADDRESS"], os.environ["BARE_TASK_QUEUE"]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.client = await Client.connect(address)
        yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/ready")
    async def ready() -> dict:
        return {}

    @app.post("/start")
    async def start(body: Start, request: Request) -> Started:
        client: Client = request.app.state.client
        await client.start_workflow("BareWorkflow", 0, id=body.workflow_id, task_queue=task_queue)
        return Started(workflow_id=body.workflow_id)

    return app
