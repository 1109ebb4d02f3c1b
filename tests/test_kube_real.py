"""The service's Kubernetes side against a real kube-apiserver, with the RBAC of deploy/ applied.

The worker here is the same code as everywhere else in the suite, but its Kubernetes client holds
a token of the ServiceAccount that deploy/rbac.yaml binds, issued by the API server itself (the
TokenRequest API), so every call it makes is authorised the way it would be in a cluster.
Skipped with a one-line reason when the binaries are not built (tests/kube_apiserver.py).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client as k8s
from kubernetes import config as kube_config
from kubernetes.client.exceptions import ApiException

from activities.kubernetes import SecretsApi, SecretStore
from api.main import create_app
from conftest import mail_to, settled, start_worker, stop_worker, unique_email, wait_until
from devstack.http import serve_in_thread
from devstack.temporal import binary
from kube_apiserver import KubeAPIServer
from test_key_request_flow import KEY, plain, submit
from test_reconcile import reconcile
from worker import ensure_reconcile_schedule

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "llm-keys"  # the worker's own namespace, as deploy/rbac.yaml advises
ELSEWHERE = "elsewhere"
WORKER_ACCOUNT = "llm-key-requestor-worker"
API_ACCOUNT = "llm-key-requestor-api"
COMPONENT = {"app.kubernetes.io/component": "llm-key-request"}


@dataclass
class Cluster:
    server: KubeAPIServer
    admin: k8s.CoreV1Api
    kubectl: Callable[..., str]
    kubeconfig_of: Callable[[str], Path]  # a ServiceAccount's kubeconfig (namespace NAMESPACE)


def client_for(kubeconfig: Path) -> k8s.ApiClient:
    return kube_config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture(scope="module")
def cluster(kube_apiserver: KubeAPIServer, tmp_path_factory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("kube-real")

    def kubectl(*args: str, kubeconfig: Path = kube_apiserver.admin_kubeconfig) -> str:
        done = subprocess.run(
            [binary("kubectl"), "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp / "cache"),
             *args],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, f"kubectl {' '.join(args)}:\n{done.stderr}"
        return done.stdout

    for namespace in (NAMESPACE, ELSEWHERE):
        if namespace not in kubectl("get", "namespaces", "-o", "name"):
            kubectl("create", "namespace", namespace)
    # Applied for real, exactly as shipped.
    kubectl("apply", "--namespace", NAMESPACE, "-f", str(ROOT / "deploy" / "rbac.yaml"))

    def kubeconfig_of(account: str) -> Path:
        path = tmp / f"{account}.kubeconfig"
        if not path.exists():
            token = kubectl("create", "token", account, "--namespace", NAMESPACE,
                            "--duration", "2h").strip()  # fmt: skip
            kube_apiserver.write_kubeconfig(path, token, NAMESPACE)
        return path

    admin = client_for(kube_apiserver.admin_kubeconfig)
    yield Cluster(kube_apiserver, k8s.CoreV1Api(admin), kubectl, kubeconfig_of)
    admin.close()


# --- RBAC: what the Role in deploy/rbac.yaml grants, the server enforces ---------------------


def role_verbs_on_secrets(offered: set[str]) -> set[str]:
    """What the worker's Role in deploy/rbac.yaml grants on Secrets (`*` meaning all)."""
    documents = yaml.safe_load_all((ROOT / "deploy" / "rbac.yaml").read_text())
    (role,) = [d for d in documents if d and d["kind"] == "Role"]
    verbs = {
        verb
        for rule in role["rules"]
        if set(rule.get("apiGroups", [])) & {"", "*"}
        and set(rule.get("resources", [])) & {"secrets", "*"}
        for verb in rule["verbs"]
    }
    return offered if "*" in verbs else verbs


def secret_verbs(api: k8s.CoreV1Api) -> set[str]:
    """The verbs the server itself offers on Secrets (from discovery)."""
    resources = api.get_api_resources().resources
    return set(next(r for r in resources if r.name == "secrets").verbs)


def attempt(admin: k8s.CoreV1Api, api: k8s.CoreV1Api, namespace: str, verb: str) -> int:
    """Use `verb` on a Secret of its own (made by the admin); the HTTP status it got."""
    name = f"rbac-{verb}-{uuid.uuid4().hex[:8]}"
    label = {"rbac-probe": name}
    if verb != "create":
        admin.create_namespaced_secret(
            namespace, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name, labels=label))
        )
    calls: dict[str, Callable[[], object]] = {
        "get": lambda: api.read_namespaced_secret(name, namespace),
        "list": lambda: api.list_namespaced_secret(namespace, label_selector=f"rbac-probe={name}"),
        "watch": lambda: api.list_namespaced_secret(
            namespace, watch=True, timeout_seconds=1, _preload_content=False
        ).read(),
        "create": lambda: api.create_namespaced_secret(
            namespace, k8s.V1Secret(metadata=k8s.V1ObjectMeta(name=name))
        ),
        "update": lambda: api.replace_namespaced_secret(
            name, namespace, admin.read_namespaced_secret(name, namespace)
        ),
        "patch": lambda: api.patch_namespaced_secret(
            name, namespace, {"metadata": {"annotations": {"patched": "yes"}}}
        ),
        "delete": lambda: api.delete_namespaced_secret(name, namespace),
        "deletecollection": lambda: api.delete_collection_namespaced_secret(
            namespace, label_selector=f"rbac-probe={name}"
        ),
    }
    try:
        calls[verb]()
    except ApiException as exc:
        if exc.status == 403:
            assert json.loads(exc.body)["reason"] == "Forbidden"
        return exc.status
    return 200


def test_the_worker_account_gets_exactly_the_roles_verbs_in_its_namespace(cluster: Cluster):
    worker = k8s.CoreV1Api(client_for(cluster.kubeconfig_of(WORKER_ACCOUNT)))
    offered = secret_verbs(cluster.admin)
    granted = role_verbs_on_secrets(offered)
    assert granted and granted <= offered, f"the Role names verbs Secrets lack: {granted - offered}"

    outcomes = {verb: attempt(cluster.admin, worker, NAMESPACE, verb) for verb in offered}
    assert outcomes == {verb: 200 if verb in granted else 403 for verb in offered}

    # Nothing in any other namespace, and nothing but Secrets.
    elsewhere = {verb: attempt(cluster.admin, worker, ELSEWHERE, verb) for verb in offered}
    assert set(elsewhere.values()) == {403}, elsewhere
    with pytest.raises(ApiException) as caught:
        worker.list_namespaced_config_map(NAMESPACE)
    assert caught.value.status == 403


def test_the_api_account_has_no_rights_at_all(cluster: Cluster):
    api_account = client_for(cluster.kubeconfig_of(API_ACCOUNT))
    offered = secret_verbs(cluster.admin)
    for namespace in (NAMESPACE, ELSEWHERE):
        outcomes = {verb: attempt(cluster.admin, k8s.CoreV1Api(api_account), namespace, verb)
                    for verb in offered}  # fmt: skip
        assert set(outcomes.values()) == {403}, outcomes

    # What the server says it may do is exactly what an account bound to nothing may do (the
    # discovery and self-review rights every authenticated user has).
    unbound = f"unbound-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "serviceaccount", unbound, "--namespace", NAMESPACE)
    assert rules_of(api_account) == rules_of(client_for(cluster.kubeconfig_of(unbound)))


def rules_of(api_client: k8s.ApiClient) -> set[tuple]:
    review = k8s.AuthorizationV1Api(api_client).create_self_subject_rules_review(
        k8s.V1SelfSubjectRulesReview(spec=k8s.V1SelfSubjectRulesReviewSpec(namespace=NAMESPACE))
    )
    return {
        (tuple(r.verbs), tuple(r.api_groups or ()), tuple(r.resources or ()),
         tuple(r.resource_names or ()))
        for r in review.status.resource_rules
    }  # fmt: skip


# --- the service, its worker holding the worker account's token ------------------------------


@pytest.fixture(scope="module")
def real_settings(settings):
    return settings.model_copy(
        update={
            "kubernetes_namespace": NAMESPACE,
            # Its own task queue: the session's worker (on the stand-in) never sees these tasks.
            "temporal_task_queue": f"real-kube-{uuid.uuid4().hex[:8]}",
        }
    )


@pytest.fixture(scope="module")
async def real_worker(real_settings, settings, temporal_client, cluster) -> AsyncIterator[None]:
    core = k8s.CoreV1Api(client_for(cluster.kubeconfig_of(WORKER_ACCOUNT)))
    running = await start_worker(real_settings, temporal_client, core)
    yield
    await stop_worker(running)
    # Every worker points the one reconcile Schedule at its task queue; give it back.
    await ensure_reconcile_schedule(temporal_client, settings)


@pytest.fixture(scope="module")
async def real_api(real_settings, real_worker, responses) -> AsyncIterator[httpx.AsyncClient]:
    served = serve_in_thread(create_app(real_settings), lifespan="on")

    async def keep(response: httpx.Response) -> None:
        responses.append(await response.aread())  # held to "no key" by conftest.no_key_leaks

    async with httpx.AsyncClient(
        base_url=served.url, timeout=30, event_hooks={"response": [keep]}
    ) as http:
        yield http
    served.stop()


def secret(cluster: Cluster, request_id: str) -> k8s.V1Secret:
    return cluster.admin.read_namespaced_secret(f"llm-key-request-{request_id}", NAMESPACE)


async def secret_exists(cluster: Cluster, request_id: str) -> bool:
    try:
        await asyncio.to_thread(secret, cluster, request_id)
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise
    return True


async def test_an_approved_request_end_to_end(real_api, cluster, mail, litellm, temporal_client):
    email = unique_email("approve.example.com")
    request_id = (await submit(real_api, email, "gpt-4o-mini"))["request_id"]

    [message] = await mail_to(mail, email)
    key = KEY.search(plain(message)).group(0)
    assert litellm.has_live_key(key)
    await settled(temporal_client, request_id)  # the key lives on: its timers are next

    stored = secret(cluster, request_id)
    assert stored.metadata.labels["request-state"] == "approved"
    assert stored.metadata.annotations["state"] == "approved"
    assert stored.metadata.annotations["llm-key-requestor/email"] == email
    assert base64.b64decode(stored.data["api-key"]).decode() == key
    assert (await real_api.get(f"/api/requests/{request_id}")).json()["state"] == "approved"


async def test_a_kubectl_relabel_approves_through_the_reconciler(
    real_api, cluster, mail, temporal_client, real_settings
):
    email = unique_email("manual.example.com")
    request_id = (await submit(real_api, email))["request_id"]
    name = f"llm-key-request-{request_id}"
    await wait_until(lambda: secret_exists(cluster, request_id), what="the pending Secret")

    # An operator's own kubectl, as the README documents it.
    await asyncio.to_thread(cluster.kubectl, "label", "secret", name, "request-state=approved",
                            "--overwrite", "--namespace", NAMESPACE)  # fmt: skip
    counts = await reconcile(temporal_client, real_settings)
    assert counts.relayed >= 1

    [message] = await mail_to(mail, email)
    assert KEY.search(plain(message))
    annotations = secret(cluster, request_id).metadata.annotations
    assert annotations["state"] == "approved"
    assert annotations["llm-key-requestor/reviewer"] == "declared:kubectl"


async def test_the_reconciler_pages_through_hundreds_of_secrets(
    real_worker, cluster, mail, temporal_client, real_settings
):
    batch = f"batch-{uuid.uuid4().hex[:6]}"
    labels = {**COMPONENT, "request-state": "pending", "reconcile-batch": batch}

    def orphan(i: int) -> None:
        # Pending, as the older polling service wrote them, but with nothing to resume from.
        meta = k8s.V1ObjectMeta(name=f"llm-key-request-{uuid.uuid4()}", labels=labels,
                                annotations={"state": "pending"})  # fmt: skip
        cluster.admin.create_namespaced_secret(NAMESPACE, k8s.V1Secret(metadata=meta))

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(orphan, range(300)))
    # And one the reconciler can resume: it must be found among the others.
    email, request_id = unique_email("approve.example.com"), str(uuid.uuid4())
    cluster.admin.create_namespaced_secret(NAMESPACE, k8s.V1Secret(metadata=k8s.V1ObjectMeta(
        name=f"llm-key-request-{request_id}", labels={**COMPONENT, "request-state": "pending"},
        annotations={"state": "pending", "email": email, "llm": "gpt-4o"})))  # fmt: skip
    try:
        counts = await reconcile(temporal_client, real_settings)  # pages of 3
        assert counts.scanned >= 301 and counts.pages >= 301 // 3
        assert counts.skipped >= 300 and counts.resumed >= 1
        await mail_to(mail, email)
        untouched = cluster.admin.list_namespaced_secret(
            NAMESPACE, label_selector=f"reconcile-batch={batch},request-state=pending"
        )
        assert len(untouched.items) == 300
    finally:
        cluster.admin.delete_collection_namespaced_secret(
            NAMESPACE, label_selector=f"reconcile-batch={batch}"
        )


async def test_a_listing_continues_across_a_compaction(cluster):
    """A continue token outlives etcd's history when the reconciler's pages are slow (the API
    server compacts every 5 minutes): the listing carries on instead of failing every retry."""
    store = SecretStore(SecretsApi(client_for(cluster.kubeconfig_of(WORKER_ACCOUNT))), NAMESPACE)
    batch = f"compaction-{uuid.uuid4().hex[:6]}"
    for i in range(4):
        meta = k8s.V1ObjectMeta(name=f"{batch}-{i}", labels={"compaction-batch": batch})
        cluster.admin.create_namespaced_secret(NAMESPACE, k8s.V1Secret(metadata=meta))
    first = await store.list_page(f"compaction-batch={batch}", 2)
    meta = k8s.V1ObjectMeta(name=f"{batch}-9", labels={"compaction-batch": batch})
    cluster.admin.create_namespaced_secret(NAMESPACE, k8s.V1Secret(metadata=meta))
    cluster.server.compact_etcd()

    rest = await store.list_page(f"compaction-batch={batch}", 10, first.continue_token)
    names = [s.metadata.name for s in first.items + rest.items]
    assert names == [f"{batch}-{i}" for i in (0, 1, 2, 3, 9)]
    assert rest.continue_token is None


def test_kubectl_server_side_dry_run_accepts_the_manifests(cluster: Cluster):
    """What a client-side dry run cannot check: the server's own validation and admission."""
    out = cluster.kubectl("apply", "--dry-run=server", "-k", str(ROOT / "deploy"),
                          "--namespace", NAMESPACE)  # fmt: skip
    assert "(server dry run)" in out
    applied = {line.split()[0] for line in out.splitlines()}
    assert {"deployment.apps/llm-key-requestor-api", "deployment.apps/llm-key-requestor-worker",
            "role.rbac.authorization.k8s.io/llm-key-requestor-worker"} <= applied  # fmt: skip


async def test_a_pending_secret_deleted_by_hand_then_approved(
    real_api, cluster, mail, admin_headers, litellm
):
    email = unique_email("manual.example.com")
    request_id = (await submit(real_api, email))["request_id"]
    name = f"llm-key-request-{request_id}"
    await wait_until(lambda: secret_exists(cluster, request_id), what="the pending Secret")
    await asyncio.to_thread(cluster.kubectl, "delete", "secret", name, "--namespace", NAMESPACE)

    response = await real_api.post(
        f"/api/admin/requests/{request_id}/approve", json={"reviewer": "carol"},
        headers=admin_headers,
    )  # fmt: skip
    assert response.status_code == 200, response.text
    [message] = await mail_to(mail, email, within=60)
    key = KEY.search(plain(message)).group(0)
    assert litellm.has_live_key(key)
    assert base64.b64decode(secret(cluster, request_id).data["api-key"]).decode() == key
