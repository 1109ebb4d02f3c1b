"""The README's first command: the whole local stack from one process, used as a person would."""

from __future__ import annotations

import email
import email.policy
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
from kubernetes.client import CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.config import new_client_from_config

from devstack.http import free_port, port_in_use
from devstack.temporal import PortInUse, TemporalDevServer, binary

ROOT = Path(__file__).resolve().parent.parent
READY = "Ctrl-C stops everything"
# What a person's shell would not have: the stack must not pick these up.
CONFIGURED = ("KUBECONFIG", "LITELLM_BASE_URL", "SMTP_HOST", "ADMIN_TOKEN")


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


def stack_ports() -> dict[str, int]:
    ports = ("api", "temporal", "ui", "smtp", "litellm", "kube", "oidc")
    return {name: free_port() for name in ports}


def start_stack(state: Path, ports: dict[str, int], **env: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "devstack", "--state-dir", str(state)]
    for name, port in ports.items():
        command += [f"--{name}-port", str(port)]
    environment = {k: v for k, v in os.environ.items() if k not in CONFIGURED} | env
    return subprocess.Popen(  # noqa: S603
        command, cwd=ROOT, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )


def stop_stack(process: subprocess.Popen, sig: int = signal.SIGINT) -> str:
    process.send_signal(sig)
    try:
        return process.communicate(timeout=60)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        process.kill()
        raise


def exports(banner: str) -> dict[str, str]:
    """The `export NAME=value` lines the stack printed for the user's shell."""
    return dict(re.findall(r"^\s*export (\w+)=(.*)$", banner, re.M))


def submit(api_port: int, email: str, llm: str) -> str:
    response = httpx.post(
        f"http://127.0.0.1:{api_port}/api/request-key",
        json={"email": email, "llm": llm},
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()["request_id"]


def wait_for_mail(maildir: Path, count: int = 1, within: float = 30) -> list[Path]:
    deadline = time.monotonic() + within
    while len(mails := sorted(maildir.glob("*.eml"))) < count:
        assert time.monotonic() < deadline, f"fewer than {count} mail(s) in {within}s"
        time.sleep(0.1)
    return mails


def wait_until_recorded(secrets: CoreV1Api, request_id: str, within: float = 30) -> None:
    """The workflow writes the request's Secret a moment after the API has answered."""
    deadline = time.monotonic() + within
    while True:
        try:
            secrets.read_namespaced_secret(f"llm-key-request-{request_id}", "default")
            return
        except ApiException as exc:
            if exc.status != 404 or time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def readme_commands() -> list[str]:
    """The README's temporal and kubectl commands for the local stack, as a user pastes them."""
    readme = (ROOT / "README.md").read_text()
    local = readme[: readme.index("## Run with Docker Compose")]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", local, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip().startswith(("temporal ", "kubectl ")):
                commands.append(line.strip())
    return commands


def test_local_stack_serves_a_request_end_to_end_and_stops_cleanly(tmp_path):
    ports = stack_ports()
    process = start_stack(tmp_path, ports)
    try:
        banner = read_until(process, READY)
        assert f"http://127.0.0.1:{ports['ui']}" in banner  # the Web UI
        assert "STAND-IN" in banner
        # Each component says so as it becomes ready, before the summary.
        for label in ("Temporal", "Kubernetes", "LiteLLM", "SMTP", "Sign-on", "Worker", "API"):
            assert re.search(rf"^{label} +\S", banner, re.M), label
        assert f"Sign-on         http://127.0.0.1:{ports['oidc']}" in banner
        shell = exports(banner)
        assert shell["KUBECONFIG"] == str(tmp_path / "kubeconfig")
        assert shell["TEMPORAL_ADDRESS"] == f"127.0.0.1:{ports['temporal']}"
        assert shell["ADMIN_TOKEN"] == "dev-admin-token"

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

        # Every temporal and kubectl command of the README works as written, pasted into a
        # shell that has the printed export lines, each on a request waiting for a person.
        commands = readme_commands()
        assert len(commands) >= 15
        preamble = "".join(f"export {name}={value}\n" for name, value in shell.items())
        secrets = CoreV1Api(new_client_from_config(config_file=shell["KUBECONFIG"]))
        for command in commands:
            pending = submit(ports["api"], f"pat-{uuid.uuid4().hex[:8]}@corp.example.org", "gpt-4o")
            wait_until_recorded(secrets, pending)
            ran = subprocess.run(  # noqa: S603
                ["bash", "-c", preamble + command.replace("<request-id>", pending)],
                cwd=tmp_path, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert ran.returncode == 0, f"{command}\n{ran.stdout}{ran.stderr}"
    finally:
        rest = stop_stack(process)
    assert process.returncode == 0, rest
    assert "stopped" in rest
    assert key.group(0) not in banner + rest, "the key appeared in the stack's output"


def run_stack_expecting_refusal(state: Path, ports: dict[str, int], **env: str) -> str:
    process = start_stack(state, ports, **env)
    try:
        output = process.communicate(timeout=60)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 2, output
    assert "Traceback" not in output, output
    assert not state.exists(), "nothing may start (nor be written) before the checks pass"
    for name, port in ports.items():
        assert name == "temporal" or not port_in_use(port), f"{name}: something was started"
    return output


def test_taken_and_clashing_ports_are_all_named_before_anything_starts(tmp_path):
    ports = stack_ports()
    ports["ui"] = ports["api"]  # a typo: two servers on one port
    with socket.socket() as foreign:  # another program on the Temporal port
        foreign.bind(("127.0.0.1", ports["temporal"]))
        foreign.listen()
        output = run_stack_expecting_refusal(tmp_path / "state", ports)
    assert f"port {ports['temporal']} (Temporal) is in use" in output
    assert "--temporal-port" in output
    assert f"--ui-port and --api-port both ask for port {ports['api']}" in output


def test_a_bad_setting_is_reported_before_anything_starts(tmp_path):
    output = run_stack_expecting_refusal(
        tmp_path / "state", stack_ports(), LITELLM_KEY_DURATION="5y"
    )
    assert "litellm.key_duration (env LITELLM_KEY_DURATION): '5y' is not a duration" in output


def test_a_restarted_stack_keeps_its_secrets_and_sighup_stops_everything(tmp_path):
    """A request pending when the terminal closed is approved after a restart and delivered."""
    ports = stack_ports()
    process = start_stack(tmp_path, ports)
    try:
        read_until(process, READY)
        request_id = submit(ports["api"], "sam@corp.example.org", "gpt-4o")  # waits for a person
    finally:
        rest = stop_stack(process, signal.SIGHUP)  # what closing the terminal sends
    assert process.returncode == 0, rest
    assert "stopped" in rest
    for name in ("temporal", "ui", "api", "kube"):
        assert not port_in_use(ports[name]), f"the {name} port is still held after SIGHUP"

    process = start_stack(tmp_path, ports)
    try:
        banner = read_until(process, READY)
        assert "1 Secret(s) kept" in banner
        response = httpx.post(
            f"http://127.0.0.1:{ports['api']}/api/admin/requests/{request_id}/approve",
            headers={"Authorization": f"Bearer {exports(banner)['ADMIN_TOKEN']}"},
            json={"reviewer": "alice"},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        # The acknowledgement (sent while the request waited), then the key.
        mails = wait_for_mail(tmp_path / "mail", count=2)
        message = email.message_from_bytes(mails[-1].read_bytes(), policy=email.policy.default)
        assert message["To"] == "sam@corp.example.org"
        assert re.search(r"sk-[A-Za-z0-9_-]{20,}", message.get_body(("plain",)).get_content())
    finally:
        rest = stop_stack(process)
    assert process.returncode == 0, rest


def test_the_dev_server_never_stands_in_for_a_server_already_on_its_port():
    """Else its port would answer at once, from someone else's Temporal."""
    with socket.socket() as foreign:
        foreign.bind(("127.0.0.1", 0))
        foreign.listen()
        server = TemporalDevServer(port=foreign.getsockname()[1])
        with pytest.raises(PortInUse, match=f"port {server.port} is in use"):
            server.start()
        assert server.process is None, "nothing was started"
