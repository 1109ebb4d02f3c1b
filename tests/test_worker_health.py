"""The worker's health endpoint, on the real process: `python worker.py` against a real Temporal.

Readiness follows Temporal (down: 503, back: 200) while liveness stays 200, and the endpoint
goes away with the worker.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from devstack.http import free_port
from devstack.temporal import TemporalDevServer

ROOT = Path(__file__).resolve().parents[1]


def wait_for(what: str, condition: Callable[[], bool], within: float, process=None) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the worker exited with {process.returncode} while waiting")
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within}s: {what}")
        time.sleep(0.2)


def status(url: str) -> int | None:
    """The endpoint's HTTP status, or None when nothing answers."""
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return None


@pytest.fixture
def temporal(tmp_path) -> Iterator[TemporalDevServer]:
    """A Temporal of this test's own: it is stopped and started again."""
    server = TemporalDevServer(log_file=tmp_path / "temporal.log").start()
    yield server
    server.stop()


def test_readiness_follows_temporal_and_liveness_the_worker(temporal, kube, tmp_path):
    port = free_port()
    env = {
        **os.environ,
        "ENVIRONMENT": "local",
        "TEMPORAL_ADDRESS": temporal.address,
        "TEMPORAL_TASK_QUEUE": f"health-{uuid.uuid4().hex[:8]}",
        "KUBECONFIG": str(kube.kubeconfig),
        "KUBERNETES_NAMESPACE": "default",
        "APPROVAL_QUEUE_INTERVAL": "24h",
        "WORKER_HEALTH_PORT": str(port),
    }
    log = (tmp_path / "worker.log").open("wb")
    worker = subprocess.Popen(  # noqa: S603
        [sys.executable, "worker.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
    )
    live, ready = f"http://127.0.0.1:{port}/health", f"http://127.0.0.1:{port}/health/ready"
    try:
        wait_for("the worker is ready", lambda: status(ready) == 200, 60, worker)
        assert httpx.get(ready, timeout=5).json() == {"status": "ready", "temporal": "reachable"}
        assert status(live) == 200
        assert status(f"http://127.0.0.1:{port}/nothing") == 404

        temporal.stop()
        wait_for("readiness turns 503 with Temporal down", lambda: status(ready) == 503, 30)
        assert "cannot poll" in httpx.get(ready, timeout=5).json()["temporal"]
        assert status(live) == 200, "a Temporal outage is no reason to restart the worker"

        temporal.start()
        wait_for("readiness is back with Temporal", lambda: status(ready) == 200, 60, worker)

        worker.send_signal(signal.SIGTERM)
        assert worker.wait(timeout=60) == 0
        assert status(live) is None, "nothing answers once the worker is gone"
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        log.close()
    output = (tmp_path / "worker.log").read_text()
    assert "health endpoint on port" in output, output
    # One line per change, not one per probe.
    assert output.count("not ready: Temporal does not answer") == 1, output
    assert output.count("ready again: Temporal answers") == 1, output
