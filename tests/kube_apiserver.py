"""A real kube-apiserver on a real etcd, on loopback ports, for the tests.

The binaries come from scripts/build-kube-apiserver.sh (compiled from the published Go modules
into a cache folder outside the checkout). The server runs with RBAC on, static bearer tokens for
an administrator, a service-account signing key (so the TokenRequest API hands out real
ServiceAccount tokens) and a serving certificate from a throwaway CA. No controller-manager, no
scheduler, no nodes: the tests only need what the API server does by itself.
"""

from __future__ import annotations

import base64
import os
import re
import ssl
import subprocess
import time
from pathlib import Path

import httpx
import trustme
import yaml

from devstack.http import free_port

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = ROOT / "scripts" / "build-kube-apiserver.sh"
ADMIN_TOKEN = "kube-apiserver-admin-token"
ADMIN_USER = "test-admin"
COMPACT_REV_KEY = "compact_rev_key"  # where API servers record the revision etcd is compacted to
PROBE_PATH = "/api/v1/namespaces/kube-system/secrets"


def pinned_version(variable: str) -> str:
    """The version the build script pins (`VAR="${VAR:-1.2.3}"`), so the two cannot disagree."""
    script = BUILD_SCRIPT.read_text()
    match = re.search(rf'^{variable}="\$\{{{variable}:-([^}}]+)\}}"', script, re.M)
    if not match:
        raise RuntimeError(f"{BUILD_SCRIPT.name} no longer pins {variable}")
    return os.environ.get(variable) or match[1]


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "llm-key-requestor"


def binaries() -> dict[str, Path]:
    kube, etcd = pinned_version("KUBE_VERSION"), pinned_version("ETCD_VERSION")
    return {
        "kube-apiserver": cache_root() / f"kube-{kube}" / "kube-apiserver",
        "etcd": cache_root() / f"etcd-{etcd}" / "etcd",
    }


def missing_binaries() -> str | None:
    """Why the real API server cannot run here (one line), or None when it can."""
    missing = [name for name, path in binaries().items() if not os.access(path, os.X_OK)]
    if missing:
        return (
            f"{' and '.join(missing)} not built in {cache_root()}; "
            "run scripts/build-kube-apiserver.sh (needs Go)"
        )
    return None


class KubeAPIServer:
    """etcd + kube-apiserver as child processes, with their state in `workdir`."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.etcd_port, self.etcd_peer_port, self.port = free_port(), free_port(), free_port()
        self.processes: list[subprocess.Popen] = []
        self.ca = trustme.CA()
        self.ca_file = workdir / "ca.pem"
        self.admin_kubeconfig = workdir / "admin.kubeconfig"

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def etcd_url(self) -> str:
        return f"http://127.0.0.1:{self.etcd_port}"

    def start(self, within: float = 120) -> KubeAPIServer:
        deadline = time.monotonic() + within
        paths = binaries()
        self._spawn(
            "etcd",
            [
                str(paths["etcd"]),
                "--name", "test",
                "--data-dir", str(self.workdir / "etcd"),
                "--listen-client-urls", self.etcd_url,
                "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.etcd_peer_port}",
                "--initial-cluster", f"test=http://127.0.0.1:{self.etcd_peer_port}",
                # Throwaway data: no fsync per write.
                "--unsafe-no-fsync",
            ],
        )  # fmt: skip
        self._wait("etcd", f"{self.etcd_url}/health", deadline, verify=False)

        self.ca.cert_pem.write_to_path(str(self.ca_file))
        serving = self.ca.issue_cert("127.0.0.1", "localhost")
        serving.cert_chain_pems[0].write_to_path(str(self.workdir / "serving.pem"))
        serving.private_key_pem.write_to_path(str(self.workdir / "serving.key"))
        # Any key pair signs service-account tokens; trustme makes one with every certificate.
        sa_key = self.workdir / "service-accounts.key"
        self.ca.issue_cert("service-accounts").private_key_pem.write_to_path(str(sa_key))
        tokens = self.workdir / "tokens.csv"
        tokens.write_text(f'{ADMIN_TOKEN},{ADMIN_USER},{ADMIN_USER},"system:masters"\n')
        self._spawn(
            "kube-apiserver",
            [
                str(paths["kube-apiserver"]),
                "--etcd-servers", self.etcd_url,
                "--bind-address", "127.0.0.1",
                "--advertise-address", "127.0.0.1",
                # No `kubernetes` Service endpoints: they cannot point at a loopback address.
                "--endpoint-reconciler-type", "none",
                "--secure-port", str(self.port),
                "--tls-cert-file", str(self.workdir / "serving.pem"),
                "--tls-private-key-file", str(self.workdir / "serving.key"),
                "--token-auth-file", str(tokens),
                "--authorization-mode", "RBAC",
                "--service-account-issuer", "https://kubernetes.default.svc.cluster.local",
                "--service-account-key-file", str(sa_key),
                "--service-account-signing-key-file", str(sa_key),
                "--service-cluster-ip-range", "10.0.0.0/24",
                "--profiling=false",
            ],
        )  # fmt: skip
        self._wait("kube-apiserver", f"{self.url}/readyz", deadline, verify=self.tls())
        self.write_kubeconfig(self.admin_kubeconfig, ADMIN_TOKEN, "default")
        return self

    def tls(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def _spawn(self, name: str, command: list[str]) -> None:
        with open(self.workdir / f"{name}.log", "ab") as log:  # the child keeps its own copy
            self.processes.append(
                subprocess.Popen(
                    command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
                )
            )

    def _wait(self, name: str, url: str, deadline: float, verify: ssl.SSLContext | bool) -> None:
        """Poll a health endpoint until it answers 200; fail with the log's tail otherwise."""
        process = self.processes[-1]
        headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
        with httpx.Client(verify=verify, timeout=2, headers=headers) as http:
            while time.monotonic() < deadline:
                if process.poll() is not None:
                    break
                try:
                    if http.get(url).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        tail = (self.workdir / f"{name}.log").read_text(errors="replace")[-3000:]
        self.stop()
        raise RuntimeError(f"{name} did not become ready at {url}:\n{tail}")

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes.clear()

    def write_kubeconfig(self, path: Path, token: str, namespace: str) -> Path:
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": "test",
                    "cluster": {"server": self.url, "certificate-authority": str(self.ca_file)},
                }
            ],
            "users": [{"name": "user", "user": {"token": token}}],
            "contexts": [
                {
                    "name": "test",
                    "context": {"cluster": "test", "user": "user", "namespace": namespace},
                }
            ],
            "current-context": "test",
        }
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def compact_etcd(self, within: float = 60) -> int:
        """Compact etcd's history up to now, as the API server's own compactor does every 5
        minutes, and return once the API server answers 410 Gone for continue tokens from before.

        It is told the way its compactor tells the other API servers, through etcd's
        `compact_rev_key`; its watch cache drops the older list snapshots within 15 s.
        """
        with httpx.Client(
            base_url=self.url, verify=self.tls(), timeout=10,
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as api, httpx.Client(base_url=self.etcd_url, timeout=10) as etcd:  # fmt: skip
            probe = self._continue_token(api)
            now = etcd.post("/v3/kv/range", json={"key": _b64(COMPACT_REV_KEY)}).json()
            # This write is revision `now + 1` or later: compacting there drops the probe's.
            revision = int(now["header"]["revision"]) + 1
            put = {"key": _b64(COMPACT_REV_KEY), "value": _b64(str(revision))}
            etcd.post("/v3/kv/put", json=put).raise_for_status()
            compaction = {"revision": str(revision), "physical": True}
            etcd.post("/v3/kv/compaction", json=compaction).raise_for_status()
            deadline = time.monotonic() + within
            while time.monotonic() < deadline:
                answer = api.get(PROBE_PATH, params={"limit": 1, "continue": probe})
                if answer.status_code == 410:
                    return revision
                answer.raise_for_status()
                time.sleep(0.5)
        raise TimeoutError(f"the API server did not notice the compaction within {within}s")

    @staticmethod
    def _continue_token(api: httpx.Client) -> str:
        """A continue token of a listing of two probe Secrets, from now."""
        for name in ("compaction-probe-0", "compaction-probe-1"):
            created = api.post(PROBE_PATH, json={"metadata": {"name": name}})
            if created.status_code != 409:
                created.raise_for_status()
        return api.get(PROBE_PATH, params={"limit": 1}).json()["metadata"]["continue"]


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()
