"""The README's first command: the whole local stack from one process, used as a person would."""

from __future__ import annotations

import email
import email.policy
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from devstack.http import free_port
from devstack.temporal import binary

ROOT = Path(__file__).resolve().parent.parent


def read_until(process: subprocess.Popen, marker: str, within: float = 60) -> str:
    """Collect the process's output until a line contains `marker`."""
    seen = ""
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + within
    while marker not in seen:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or process.poll() is not None:
            raise AssertionError(f"no {marker!r} from the local stack; it printed:\n{seen}")
        if selector.select(remaining):
            # Raw reads: a buffered readline would hide lines from select().
            seen += os.read(process.stdout.fileno(), 65536).decode(errors="replace")
    return seen


def test_local_stack_serves_a_request_end_to_end_and_stops_cleanly(tmp_path):
    ports = {
        name: free_port() for name in ("api", "temporal", "ui", "smtp", "litellm", "kube", "oidc")
    }
    env = {
        k: v
        for k, v in os.environ.items()
        if k
        not in ("KUBECONFIG", "LITELLM_BASE_URL", "SMTP_HOST", "ADMIN_TOKEN", "AUTH_OIDC_ISSUER")
    }
    command = [sys.executable, "-m", "devstack", "--state-dir", str(tmp_path)]
    for name, port in ports.items():
        command += [f"--{name}-port", str(port)]
    process = subprocess.Popen(  # noqa: S603
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:
        banner = read_until(process, "ready")
        assert f"http://127.0.0.1:{ports['ui']}" in banner  # the Web UI
        assert "STAND-IN" in banner and f"KUBECONFIG={tmp_path / 'kubeconfig'}" in banner
        assert f"Sign-on         http://127.0.0.1:{ports['oidc']}" in banner

        # config.yaml approves example.com staff for gpt-4o-mini without a human.
        response = httpx.post(
            f"http://127.0.0.1:{ports['api']}/api/request-key",
            json={"email": "jane.doe@example.com", "llm": "gpt-4o-mini"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        request_id = response.json()["request_id"]

        deadline = time.monotonic() + 30
        while not list((tmp_path / "mail").glob("*.eml")) and time.monotonic() < deadline:
            time.sleep(0.1)
        [mail_file] = list((tmp_path / "mail").glob("*.eml"))
        message = email.message_from_bytes(mail_file.read_bytes(), policy=email.policy.default)
        assert message["To"] == "jane.doe@example.com"
        key = re.search(r"sk-[A-Za-z0-9_-]{20,}", message.get_body(("plain",)).get_content())
        assert key

        # kubectl, pointed at the printed kubeconfig, sees the request's Secret.
        listing = subprocess.run(  # noqa: S603
            [binary("kubectl"), "--kubeconfig", str(tmp_path / "kubeconfig"),
             "--cache-dir", str(tmp_path / "kubectl-cache"),
             "get", "secrets", "-l", "app.kubernetes.io/component=llm-key-request",
             "-L", "request-state"],
            capture_output=True, text=True, timeout=30, check=True,
        )  # fmt: skip
        assert f"llm-key-request-{request_id}" in listing.stdout
        assert "approved" in listing.stdout
    finally:
        process.send_signal(signal.SIGINT)
        try:
            rest = process.communicate(timeout=30)[0].decode(errors="replace")
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, rest
    assert "stopped" in rest
    assert key.group(0) not in banner + rest, "the key appeared in the stack's output"
