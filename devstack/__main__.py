"""The whole stack on one machine, on embedded defaults:

    uv run python -m devstack

Starts the real Temporal dev server with its Web UI, the worker and the API, and, for every
component not configured through the environment, a local stand-in: the Kubernetes API
(with a kubeconfig for kubectl), the LiteLLM key API, and an SMTP sink that keeps each mail as
an .eml file. Ctrl-C stops everything.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import uvicorn
from kubernetes import config as kube_config
from kubernetes.client import CoreV1Api

from activities.kubernetes import SecretStore, core_api
from api.main import create_app
from devstack.kube import KubeStandin
from devstack.litellm import LiteLLMStandin
from devstack.mail import MailSink
from devstack.oidc import APPROVERS_GROUP, IDENTITIES, OIDCIssuer
from devstack.temporal import TemporalDevServer, connect_when_ready
from settings import ConfigError, load_settings
from worker import run_worker

log = logging.getLogger("devstack")
DEV_ADMIN_TOKEN = "dev-admin-token"  # noqa: S105 - local stack only, printed at start


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(".devstack"),
        help="Temporal database, kubeconfig, mails and logs (default .devstack)",
    )
    parser.add_argument("--api-port", type=int, default=8000)
    parser.add_argument("--temporal-port", type=int, default=7233)
    parser.add_argument("--ui-port", type=int, default=8233)
    parser.add_argument("--smtp-port", type=int, default=1025)
    parser.add_argument("--litellm-port", type=int, default=4000)
    parser.add_argument("--kube-port", type=int, default=6443)
    parser.add_argument("--oidc-port", type=int, default=9400)
    return parser.parse_args(argv)  # fmt: skip


async def run(args: argparse.Namespace) -> int:
    state = args.state_dir.resolve()
    (state / "mail").mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    overrides: dict = {"temporal_address": f"127.0.0.1:{args.temporal_port}"}
    stack = contextlib.ExitStack()

    with stack:
        temporal = TemporalDevServer(
            port=args.temporal_port, ui_port=args.ui_port, ui=True,
            db_file=state / "temporal.db", log_file=state / "temporal.log",
        ).start()  # fmt: skip
        stack.callback(temporal.stop)
        lines.append(f"Temporal        {temporal.address}  (Web UI {temporal.ui_url})")

        if os.environ.get("KUBECONFIG"):
            api = core_api()
            lines.append(f"Kubernetes      KUBECONFIG={os.environ['KUBECONFIG']}")
        else:
            kube = KubeStandin()
            kube.start(args.kube_port)
            stack.callback(kube.stop)
            kubeconfig = kube.write_kubeconfig(state / "kubeconfig", "default")
            api = CoreV1Api(kube_config.new_client_from_config(config_file=str(kubeconfig)))
            overrides["kubernetes_namespace"] = "default"
            lines.append(f"Kubernetes      {kube.url}  STAND-IN (in memory)")
            lines.append(f"                export KUBECONFIG={kubeconfig}")

        if os.environ.get("LITELLM_BASE_URL"):
            lines.append(f"LiteLLM         {os.environ['LITELLM_BASE_URL']}")
        else:
            litellm = LiteLLMStandin()
            litellm.start(args.litellm_port)
            stack.callback(litellm.stop)
            overrides.update(litellm_base_url=litellm.url, litellm_api_key=litellm.master_key)
            lines.append(f"LiteLLM         {litellm.url}  STAND-IN (mints keys in memory)")

        if os.environ.get("SMTP_HOST"):
            lines.append(f"SMTP            {os.environ['SMTP_HOST']}")
        else:
            sink = MailSink(port=args.smtp_port, maildir=state / "mail")
            sink.start()
            stack.callback(sink.stop)
            overrides.update(smtp_host=sink.host, smtp_port=sink.port, smtp_use_tls=False)
            lines.append(
                f"SMTP            {sink.host}:{sink.port}  STAND-IN, mails in {state / 'mail'}"
            )

        if os.environ.get("AUTH_OIDC_ISSUER"):
            lines.append(f"Sign-on         {os.environ['AUTH_OIDC_ISSUER']}")
        else:
            issuer = OIDCIssuer().start(args.oidc_port)
            stack.callback(issuer.stop)
            overrides.update(auth_oidc_issuer=issuer.url, auth_oidc_client_id=issuer.client_id,
                             auth_oidc_client_secret=issuer.client_secret)  # fmt: skip
            lines.append(f"Sign-on         {issuer.url}  LOCAL ISSUER, anyone signs in as anyone")
            lines.append(f"                approvers: group {APPROVERS_GROUP}, {IDENTITIES[0][0]}")

        if not os.environ.get("ADMIN_TOKEN"):
            overrides["admin_token"] = DEV_ADMIN_TOKEN
        settings = load_settings(**overrides)
        client = await connect_when_ready(temporal.address)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        worker = asyncio.create_task(
            run_worker(settings, client, SecretStore(api, settings.namespace), stop)
        )
        server = uvicorn.Server(
            uvicorn.Config(create_app(settings), host="127.0.0.1", port=args.api_port,
                           log_level="warning")
        )  # fmt: skip
        serving = asyncio.create_task(server.serve())
        while not server.started:
            if serving.done():
                return await serving or 1
            await asyncio.sleep(0.05)

        lines.insert(0, f"API             http://127.0.0.1:{args.api_port}  (docs /docs)")
        lines.insert(1, f"Request a key   http://127.0.0.1:{args.api_port}/request")
        lines.insert(2, f"Approver inbox  http://127.0.0.1:{args.api_port}/inbox  (signs you in)")
        token = settings.admin_token.get_secret_value()
        lines.append(
            f"Admin token     {token if token == DEV_ADMIN_TOKEN else '(from ADMIN_TOKEN)'}"
        )
        print("\n".join(["", "LLM Key Requestor local stack", *lines, "",
                         "ready - Ctrl-C stops everything", ""]), flush=True)  # fmt: skip

        await stop.wait()
        print("stopping...", flush=True)
        server.should_exit = True
        await asyncio.gather(serving, worker)
    print("stopped", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    try:
        return asyncio.run(run(parse_args(argv)))
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
