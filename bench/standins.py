"""The Kubernetes and LiteLLM stand-ins in a process of their own, so their CPU is their own.

    python -m bench.standins --state-dir DIR

Prints one JSON line (URLs, kubeconfig, master key) once both serve; stops on SIGTERM, when
the benchmark process dies, or after --max-seconds.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from devstack.kube import KubeStandin
from devstack.litellm import LiteLLMStandin


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.standins")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--max-seconds", type=float, default=3600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    kube, litellm = KubeStandin(), LiteLLMStandin()
    kube.start()
    litellm.start()
    try:
        kubeconfig = kube.write_kubeconfig(args.state_dir / "kubeconfig", "default")
        info = {
            "kube": kube.url,
            "kubeconfig": str(kubeconfig),
            "litellm": litellm.url,
            "litellm_master_key": litellm.master_key,
        }
        print(json.dumps(info), flush=True)
        stop.wait(args.max_seconds)
    finally:
        litellm.stop()
        kube.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
