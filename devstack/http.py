"""Serve an ASGI app on a loopback port from a background thread."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass

import uvicorn


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something listens on (or holds) the port, so that a server of ours cannot bind it.

    SO_REUSEADDR as servers set it: a port left in TIME_WAIT by a stopped server counts as free.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


@dataclass
class ServedApp:
    url: str
    port: int
    _server: uvicorn.Server
    _thread: threading.Thread

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve_in_thread(
    app,
    host: str = "127.0.0.1",
    port: int | None = None,
    ssl: dict | None = None,
    lifespan: str = "off",
) -> ServedApp:
    """Start `app` with uvicorn in a daemon thread and return once it accepts connections."""
    port = port or free_port(host)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        lifespan=lifespan,
        # Longer than any pause between a test's requests, so a pooled connection is not
        # closed by the server just as the client reuses it.
        timeout_keep_alive=120,
        **(ssl or {}),
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"asgi-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"could not serve on {host}:{port}")
        time.sleep(0.01)
    scheme = "https" if ssl else "http"
    return ServedApp(f"{scheme}://{host}:{port}", port, server, thread)
