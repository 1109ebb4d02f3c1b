"""The whole stack on one machine, on embedded defaults:

    uv run python -m devstack

Starts the real Temporal dev server with its Web UI, the worker and the API, and, for every
component not configured through the environment, a local stand-in: the Kubernetes API
(with a kubeconfig for kubectl), the LiteLLM key API, and an SMTP sink that keeps each mail as
an .eml file. Ctrl-C (or closing the terminal) stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from devstack.http import port_in_use
from devstack.oidc import APPROVERS_GROUP, IDENTITIES, OIDCIssuer
from devstack.oidc import CLIENT_ID as OIDC_CLIENT_ID
from devstack.oidc import CLIENT_SECRET as OIDC_CLIENT_SECRET
from settings import ConfigError, Settings, load_settings

# The rest of the stack (Temporal's SDK, the Kubernetes client, the API, the worker) takes
# seconds to import: run() imports it once the checks have passed, so that a bad setting or a
# taken port is reported at once.

DEV_ADMIN_TOKEN = "dev-admin-token"  # noqa: S105 - local stack only, printed at start
DEV_LITELLM_KEY = "sk-devstack-master"  # the LiteLLM stand-in's master key
# The Kubernetes stand-in keeps its Secrets here, as Temporal keeps its workflows in temporal.db.
KUBE_SNAPSHOT = "kubernetes.json"
SNAPSHOT_EVERY = 1.0  # seconds; and once more at stop
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class StackError(Exception):
    """The stack cannot start; the message says why and what to change. Nothing is running."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".devstack"),
        help="Temporal database, Secrets, kubeconfig, mails and logs (default .devstack)",
    )
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--temporal-port", type=int, default=7233)
    parser.add_argument("--ui-port", type=int, default=8233)
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--litellm-port", type=int, default=4000)
    parser.add_argument("--kube-port", type=int, default=6443)
    parser.add_argument("--oidc-port", type=int, default=9400)
    return parser.parse_args(argv)  # fmt: skip


@dataclass
class Plan:
    """What will run where, decided and checked before anything starts."""

    args: argparse.Namespace
    state: Path
    settings: Settings
    # Which stand-ins run: those the environment does not replace with a real service.
    kube: bool
    litellm: bool
    mail: bool
    oidc: bool

    def ports(self) -> Iterator[tuple[str, str, int]]:
        """(component, flag, port) of every server the stack will start."""
        a = self.args
        yield "the API", "--api-port", a.api_port
        yield "Temporal", "--temporal-port", a.temporal_port
        yield "the Temporal Web UI", "--ui-port", a.ui_port
        if self.kube:
            yield "the Kubernetes stand-in", "--kube-port", a.kube_port
        if self.litellm:
            yield "the LiteLLM stand-in", "--litellm-port", a.litellm_port
        if self.mail:
            yield "the SMTP sink", "--smtp-port", a.smtp_port
        if self.oidc:
            yield "the sign-on issuer", "--oidc-port", a.oidc_port


def plan(args: argparse.Namespace) -> Plan:
    """Settings and ports, all checked; raises StackError or ConfigError, starts nothing."""
    state = args.state_dir.resolve()
    # The local stack is local by definition, whatever the shell says.
    os.environ["ENVIRONMENT"] = "local"
    overrides: dict = {"temporal_address": f"127.0.0.1:{args.temporal_port}"}
    kube, litellm, mail, oidc = (
        not os.environ.get(v)
        for v in ("KUBECONFIG", "LITELLM_BASE_URL", "SMTP_HOST", "AUTH_OIDC_ISSUER")
    )
    if not kube:
        from activities.kubernetes import secrets_api

        try:
            secrets_api()
        except Exception as exc:  # the kubernetes client raises several kinds; all mean this
            raise StackError(
                f"KUBECONFIG={os.environ['KUBECONFIG']}: cannot use it ({exc}); fix it, or unset "
                "KUBECONFIG to use the local Kubernetes stand-in"
            ) from None
    else:
        overrides["kubernetes_namespace"] = "default"
    if litellm:
        overrides.update(
            litellm_base_url=f"http://127.0.0.1:{args.litellm_port}",
            litellm_api_key=DEV_LITELLM_KEY,
        )
    if mail:
        overrides.update(smtp_host="127.0.0.1", smtp_port=args.smtp_port, smtp_use_tls=False)
    if oidc:
        overrides.update(
            auth_oidc_issuer=f"http://127.0.0.1:{args.oidc_port}",
            auth_oidc_client_id=OIDC_CLIENT_ID,
            auth_oidc_client_secret=OIDC_CLIENT_SECRET,
        )
    if not os.environ.get("ADMIN_TOKEN"):
        overrides["admin_token"] = DEV_ADMIN_TOKEN
    stack = Plan(args, state, load_settings(**overrides), kube, litellm, mail, oidc)

    problems, seen = [], {}
    for component, flag, port in stack.ports():
        if not 0 < port < 65536:
            problems.append(f"{flag} {port}: not a port number (1-65535)")
        elif port in seen:
            problems.append(f"{flag} and {seen[port]} both ask for port {port}; give each its own")
        elif port_in_use(port):
            problems.append(
                f"port {port} ({component}) is in use by another program, perhaps another local "
                f"stack; stop it, or choose another port with {flag}"
            )
        seen.setdefault(port, flag)
    if problems:
        raise StackError("cannot start the local stack:\n" + "\n".join(f"  {p}" for p in problems))
    return stack


def say(label: str, text: str) -> None:
    print(f"{label:<15} {text}", flush=True)


async def save_snapshots(kube, path: Path) -> None:
    """Keep the Secrets on disk while the stack runs, so that a crash loses a second at most."""
    while True:
        await asyncio.sleep(SNAPSHOT_EVERY)
        await asyncio.to_thread(kube.save_snapshot, path)


class ApiServer(uvicorn.Server):
    """uvicorn inside the stack, which handles the signals itself (uvicorn ignores SIGHUP)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def stop_task(task: asyncio.Task, stopping: asyncio.Event | None = None) -> None:
    if stopping:
        stopping.set()
    else:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def run(stack: Plan, stop: asyncio.Event) -> int:
    """Start each component, saying so as it is ready; stop everything once `stop` is set.

    A signal during start-up stops the stack after the step under way.
    """
    print(f"\nLLM Key Requestor local stack, state in {stack.state}\n", flush=True)
    from kubernetes import config as kube_config

    from activities.kubernetes import SecretsApi, SecretStore, secrets_api
    from api.main import create_app
    from devstack.kube import KubeStandin
    from devstack.litellm import LiteLLMStandin
    from devstack.mail import MailSink
    from devstack.temporal import (
        PortInUse,
        TemporalDevServer,
        connect_when_ready,
        wait_for_poller,
    )
    from worker import run_worker

    args, state, settings = stack.args, stack.state, stack.settings
    (state / "mail").mkdir(parents=True, exist_ok=True)
    exports = [f'export PATH="{Path(sys.executable).parent}:$PATH"']

    async with contextlib.AsyncExitStack() as cleanup:
        temporal = TemporalDevServer(
            port=args.temporal_port, ui_port=args.ui_port, ui=True,
            db_file=state / "temporal.db", log_file=state / "temporal.log",
        )  # fmt: skip
        cleanup.callback(temporal.stop)
        try:
            temporal.start()
        except PortInUse as exc:  # taken since the check
            raise StackError(f"{exc}; choose another with --temporal-port or --ui-port") from None
        except (RuntimeError, TimeoutError) as exc:  # the message points to its log
            raise StackError(str(exc)) from None
        client = await connect_when_ready(temporal.address)
        say("Temporal", f"{temporal.address}  (Web UI {temporal.ui_url})")
        exports.append(f"export TEMPORAL_ADDRESS={temporal.address}")

        if stack.kube:
            kube, snapshot = KubeStandin(), state / KUBE_SNAPSHOT
            try:
                kept = kube.load_snapshot(snapshot) if snapshot.exists() else 0
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise StackError(
                    f"{snapshot}: cannot read the saved Secrets ({exc!r}); to start afresh, "
                    f"delete {state}"
                ) from None
            kube.start(args.kube_port)
            cleanup.callback(kube.save_snapshot, snapshot)  # after kube.stop, just below
            cleanup.callback(kube.stop)
            cleanup.push_async_callback(
                stop_task, asyncio.create_task(save_snapshots(kube, snapshot))
            )
            kubeconfig = kube.write_kubeconfig(state / "kubeconfig", "default")
            api = SecretsApi(kube_config.new_client_from_config(config_file=str(kubeconfig)))
            say("Kubernetes", f"{kube.url}  STAND-IN, {kept} Secret(s) kept in {snapshot}")
            exports.append(f"export KUBECONFIG={kubeconfig}")
        else:
            api = secrets_api()
            say("Kubernetes", f"KUBECONFIG={os.environ['KUBECONFIG']}")

        if stack.litellm:
            litellm = LiteLLMStandin(master_key=DEV_LITELLM_KEY)
            litellm.start(args.litellm_port)
            cleanup.callback(litellm.stop)
            say("LiteLLM", f"{litellm.url}  STAND-IN (mints keys in memory)")
        else:
            say("LiteLLM", settings.litellm_base_url)

        if stack.mail:
            mail = MailSink(
                host=settings.smtp_host, port=settings.smtp_port, maildir=state / "mail"
            )
            mail.start()
            cleanup.callback(mail.stop)
            say("SMTP", f"{mail.host}:{mail.port}  STAND-IN, mails in {state / 'mail'}")
        else:
            say("SMTP", f"{settings.smtp_host}:{settings.smtp_port}")
        if stop.is_set():
            return await stop_early(cleanup)

        if stack.oidc:
            issuer = OIDCIssuer().start(args.oidc_port)
            cleanup.callback(issuer.stop)
            say("Sign-on", f"{issuer.url}  LOCAL ISSUER, anyone signs in as anyone")
            say("", f"approvers: group {APPROVERS_GROUP}, {IDENTITIES[0][0]}")
        else:
            say("Sign-on", settings.auth_oidc_issuer)

        worker_stop = asyncio.Event()
        store = SecretStore(api, settings.namespace)
        worker = asyncio.create_task(run_worker(settings, client, store, worker_stop))
        cleanup.push_async_callback(stop_task, worker, worker_stop)
        polling = asyncio.create_task(wait_for_poller(client, settings.temporal_task_queue))
        await asyncio.wait({polling, worker}, return_when=asyncio.FIRST_COMPLETED)
        if worker.done():  # it failed at start: its error says why
            polling.cancel()
            await worker
        await polling
        say("Worker", f"polling task queue {settings.temporal_task_queue}")
        if stop.is_set():
            return await stop_early(cleanup)

        server = ApiServer(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=args.api_port,
                           log_level="warning")
        )  # fmt: skip
        serving = asyncio.create_task(server.serve())
        cleanup.push_async_callback(stop_server, server, serving)
        while not server.started:
            if serving.done():
                raise StackError(f"the API could not serve on port {args.api_port}")
            await asyncio.sleep(0.05)
        say("API", f"http://127.0.0.1:{args.api_port}  (docs /docs)")
        say("Request a key", f"http://127.0.0.1:{args.api_port}/request")
        say("Approver inbox", f"http://127.0.0.1:{args.api_port}/inbox  (signs you in)")

        token = settings.admin_token.get_secret_value()
        if token == DEV_ADMIN_TOKEN:
            say("Admin token", token)
            exports.append(f"export ADMIN_TOKEN={token}")
        else:
            say("Admin token", "(from ADMIN_TOKEN)")
        print(
            "\nIn another terminal, for the README's temporal, kubectl and curl commands:\n"
            + "".join(f"  {line}\n" for line in exports)
            + "\nready - Ctrl-C stops everything\n",
            flush=True,
        )
        await stop.wait()
        print("stopping...", flush=True)
    return stopped()


async def stop_server(server: uvicorn.Server, serving: asyncio.Task) -> None:
    server.should_exit = True
    await serving


async def stop_early(cleanup: contextlib.AsyncExitStack) -> int:
    """A signal came during start-up: stop what has started."""
    print("stopping...", flush=True)
    await cleanup.aclose()
    return stopped()


def stopped() -> int:
    print("stopped", flush=True)
    return 0


async def main_async(args: argparse.Namespace) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Closing the terminal (SIGHUP) stops the stack like Ctrl-C, so no server outlives it.
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)
    return await run(plan(args), stop)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        return asyncio.run(main_async(parse_args(argv)))
    except (ConfigError, StackError) as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
