"""The worker's health endpoint, for Kubernetes probes and Compose health checks.

    GET /health        200 while the worker runs (liveness)
    GET /health/ready  200 while it runs and Temporal answers on its connection (readiness)

The worker serves no other HTTP, so this is a few lines on asyncio's own server rather than a
web framework. It listens on WORKER_HEALTH_PORT (0, the default, means no endpoint), on every
interface, because the kubelet probes the pod's address.

Why two answers: when Temporal is unreachable the worker cannot poll, and says so on
/health/ready, but it stays alive. The SDK reconnects by itself once Temporal is back; a restart
would not bring Temporal back, and restarts in a loop back off for minutes after it returns.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from http import HTTPStatus

from temporalio.api.workflowservice.v1 import GetSystemInfoRequest
from temporalio.client import Client
from temporalio.worker import Worker

from settings import Settings

log = logging.getLogger("worker.health")

# Below the readiness probe's timeout (deploy/worker.yaml), so the probe gets the answer.
_TEMPORAL_CHECK = timedelta(seconds=3)
# A probe sends a handful of header lines; anything slower or larger is not one.
_READ_TIMEOUT = 5
_MAX_HEADER_LINES = 100


class WorkerHealth:
    def __init__(self, worker: Worker, client: Client) -> None:
        self.worker = worker
        self.client = client
        self.reachable = True  # as last seen; logged when it changes, not on every probe

    async def check(self, path: str) -> tuple[HTTPStatus, dict]:
        if not self.worker.is_running:
            return HTTPStatus.SERVICE_UNAVAILABLE, {"status": "stopped"}
        if path == "/health":
            return HTTPStatus.OK, {"status": "running"}
        # The polls travel on this same connection: if it answers, the worker can poll.
        try:
            await self.client.workflow_service.get_system_info(
                GetSystemInfoRequest(), timeout=_TEMPORAL_CHECK
            )
        except Exception as exc:  # any failure means "cannot poll"; the log says which
            if self.reachable:
                log.warning("not ready: Temporal does not answer (%s)", exc)
            self.reachable = False
            return HTTPStatus.SERVICE_UNAVAILABLE, {
                "status": "not ready",
                "temporal": "unreachable; the worker cannot poll until it is back",
            }
        if not self.reachable:
            log.info("ready again: Temporal answers")
        self.reachable = True
        return HTTPStatus.OK, {"status": "ready", "temporal": "reachable"}

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(_READ_TIMEOUT):
                method, path = _request_line(await reader.readline())
                for _ in range(_MAX_HEADER_LINES):
                    if (await reader.readline()).strip() == b"":
                        break
            if method not in ("GET", "HEAD"):
                status, body = HTTPStatus.METHOD_NOT_ALLOWED, {"message": "use GET"}
            elif path not in ("/health", "/health/ready"):
                status, body = HTTPStatus.NOT_FOUND, {"message": "try /health or /health/ready"}
            else:
                status, body = await self.check(path)
            payload = json.dumps(body).encode()
            head = (
                f"HTTP/1.1 {status.value} {status.phrase}\r\n"
                "Content-Type: application/json\r\n"
                f"Content-Length: {len(payload)}\r\n"
                "Connection: close\r\n\r\n"
            )
            writer.write(head.encode() + (payload if method == "GET" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            pass  # not a probe, or it hung up: nothing to answer
        finally:
            writer.close()


def _request_line(line: bytes) -> tuple[str, str]:
    parts = line.decode("latin-1").split()
    if len(parts) != 3:
        raise ValueError("not an HTTP request line")
    return parts[0], parts[1].split("?", 1)[0]


@asynccontextmanager
async def serve_health(settings: Settings, client: Client, worker: Worker) -> AsyncIterator[None]:
    """Serve the endpoint while the block runs, if WORKER_HEALTH_PORT is set."""
    if not settings.worker_health_port:
        yield
        return
    health = WorkerHealth(worker, client)
    server = await asyncio.start_server(
        health.handle,
        host="0.0.0.0",  # noqa: S104 - the kubelet probes the pod's address
        port=settings.worker_health_port,
    )
    log.info("health endpoint on port %d (/health, /health/ready)", settings.worker_health_port)
    try:
        yield
    finally:
        server.close()
