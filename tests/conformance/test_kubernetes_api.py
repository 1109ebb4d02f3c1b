"""Conformance tests for the Kubernetes API contract the service and its operators rely on.

Every test runs against the in-memory stand-in (devstack/kube.py) and against a real
kube-apiserver on etcd started by the tests (tests/kube_apiserver.py; skipped with a one-line
reason when its binaries are not built). Set CONFORMANCE_KUBECONFIG (and optionally
CONFORMANCE_NAMESPACE, default "default") to run them against a cluster of yours as well: every
Secret they create carries a random name prefix and a `conformance-run` label and is deleted
afterwards. Tests marked STANDIN_ONLY exercise test hooks of the stand-in (fault injection, RBAC
verb recording, its JSON-only hint) and run against it alone.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from activities.kubernetes import SecretsApi, SecretStore
from devstack.kube import KubeStandin

pytestmark = pytest.mark.conformance

EXTERNAL_KUBECONFIG = os.environ.get("CONFORMANCE_KUBECONFIG")
KUBECTL = Path(sys.executable).parent / "kubectl"
COMPONENT = "app.kubernetes.io/component"
SERVERS = ["standin", "kube-apiserver", *(["external"] if EXTERNAL_KUBECONFIG else [])]
STANDIN_ONLY = pytest.mark.parametrize("cluster", ["standin"], indirect=True)


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def status_of(error: ApiException) -> dict:
    """The Kubernetes Status object carried by an error response."""
    return json.loads(error.body)


@dataclass
class Kube:
    api: client.CoreV1Api
    kubectl: Callable[..., subprocess.CompletedProcess]
    standin: KubeStandin | None
    run: str  # random prefix of this run's Secret names and value of its `conformance-run` label
    namespace: str
    # Compacts the server's history (None where the tests cannot: a cluster of yours).
    compact: Callable[[], object] | None

    def name(self, suffix: str) -> str:
        return f"{self.run}-{suffix}"

    def create(self, suffix: str, labels: dict | None = None, **fields) -> client.V1Secret:
        meta = {
            "name": self.name(suffix),
            "labels": {"conformance-run": self.run, **(labels or {})},
        }
        meta.update(fields.pop("metadata", {}))
        return self.api.create_namespaced_secret(self.namespace, {"metadata": meta, **fields})

    def get(self, suffix: str) -> client.V1Secret:
        return self.api.read_namespaced_secret(self.name(suffix), self.namespace)

    def names(self, selector: str, **kwargs) -> list[str]:
        selector = ",".join(filter(None, [f"conformance-run={self.run}", selector]))
        found = self.api.list_namespaced_secret(self.namespace, label_selector=selector, **kwargs)
        return [s.metadata.name.removeprefix(f"{self.run}-") for s in found.items]


@pytest.fixture(scope="module", params=SERVERS)
def cluster(request: pytest.FixtureRequest, tmp_path_factory) -> Iterator[Kube]:
    tmp = tmp_path_factory.mktemp("kube")
    standin, namespace, compact = None, "default", None
    if request.param == "external":
        kubeconfig = Path(EXTERNAL_KUBECONFIG or "")
        namespace = os.environ.get("CONFORMANCE_NAMESPACE", "default")
    elif request.param == "kube-apiserver":
        server = request.getfixturevalue("kube_apiserver")
        kubeconfig, compact = server.admin_kubeconfig, server.compact_etcd
    else:
        standin = KubeStandin()
        standin.start()
        kubeconfig = standin.write_kubeconfig(tmp / "kubeconfig", namespace)
        compact = standin.compact
    api_client = config.new_client_from_config(config_file=str(kubeconfig))

    def kubectl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        command = [str(KUBECTL), "--kubeconfig", str(kubeconfig), "--cache-dir", str(tmp / "cache")]
        done = subprocess.run(
            [*command, "--namespace", namespace, *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if check and done.returncode:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{done.stderr}")
        return done

    run = f"conf-{uuid.uuid4().hex[:8]}"
    cluster = Kube(client.CoreV1Api(api_client), kubectl, standin, run, namespace, compact)
    try:
        yield cluster
    finally:
        for secret in cluster.api.list_namespaced_secret(
            namespace, label_selector=f"conformance-run={cluster.run}"
        ).items:
            cluster.api.delete_namespaced_secret(secret.metadata.name, namespace)
        api_client.close()
        if standin:
            standin.stop()


# --- the Python client ---------------------------------------------------------------------


def test_create_then_get_round_trips_metadata_and_data(cluster: Kube) -> None:
    created = cluster.create(
        "roundtrip",
        labels={COMPONENT: "llm-key-request", "request-state": "pending"},
        metadata={"annotations": {"requester": "ada@example.org"}},
        data={"api-key": b64("sk-123")},
        stringData={"note": "plain text"},
    )
    assert created.kind == "Secret" and created.type == "Opaque"
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert created.metadata.resource_version

    got = cluster.get("roundtrip")
    assert got.metadata.labels == {
        "conformance-run": cluster.run,
        COMPONENT: "llm-key-request",
        "request-state": "pending",
    }
    assert got.metadata.annotations == {"requester": "ada@example.org"}
    assert got.data == {"api-key": b64("sk-123"), "note": b64("plain text")}
    assert got.string_data is None
    assert got.metadata.uid == created.metadata.uid
    assert got.metadata.resource_version == created.metadata.resource_version
    if cluster.standin:
        (stored,) = [
            s
            for s in cluster.standin.secrets(cluster.namespace)
            if s["metadata"]["uid"] == got.metadata.uid
        ]
        assert stored["data"]["note"] == b64("plain text") and "stringData" not in stored


def test_duplicate_create_is_already_exists(cluster: Kube) -> None:
    cluster.create("dup")
    with pytest.raises(ApiException) as caught:
        cluster.create("dup")
    assert caught.value.status == 409
    status = status_of(caught.value)
    assert status["kind"] == "Status" and status["code"] == 409
    assert status["reason"] == "AlreadyExists"
    assert status["details"]["name"] == cluster.name("dup")


def test_get_missing_is_not_found(cluster: Kube) -> None:
    with pytest.raises(ApiException) as caught:
        cluster.get("missing")
    assert caught.value.status == 404
    status = status_of(caught.value)
    assert status["reason"] == "NotFound"
    assert status["message"] == f'secrets "{cluster.name("missing")}" not found'
    assert status["details"] == {"name": cluster.name("missing"), "kind": "secrets"}


def test_invalid_name_is_rejected(cluster: Kube) -> None:
    with pytest.raises(ApiException) as caught:
        cluster.api.create_namespaced_secret(
            cluster.namespace, {"metadata": {"name": "Not_A_DNS_Name"}}
        )
    assert caught.value.status == 422
    assert status_of(caught.value)["reason"] == "Invalid"


def test_create_with_a_resource_version_is_refused(cluster: Kube) -> None:
    """Re-creating a Secret from an object read earlier fails: the server wants no RV on create."""
    with pytest.raises(ApiException) as caught:
        cluster.create("with-rv", metadata={"resourceVersion": "12345"})
    assert caught.value.status == 500
    assert "resourceVersion should not be set" in status_of(caught.value)["message"]


def test_replace_uses_resource_version_for_optimistic_concurrency(cluster: Kube) -> None:
    first = cluster.create("replace", stringData={"k": "v1"})
    stale = first.metadata.resource_version
    first.data = {"k": b64("v2")}
    second = cluster.api.replace_namespaced_secret(first.metadata.name, cluster.namespace, first)
    assert second.metadata.resource_version != stale
    assert second.metadata.uid == first.metadata.uid
    assert second.metadata.creation_timestamp == first.metadata.creation_timestamp

    second.data = {"k": b64("lost update")}
    second.metadata.resource_version = stale
    with pytest.raises(ApiException) as caught:
        cluster.api.replace_namespaced_secret(first.metadata.name, cluster.namespace, second)
    assert caught.value.status == 409
    status = status_of(caught.value)
    assert status["reason"] == "Conflict"
    assert "the object has been modified" in status["message"]
    assert cluster.get("replace").data == {"k": b64("v2")}


async def test_the_secret_store_redoes_a_write_from_a_stale_copy_on_a_fresh_read(
    cluster: Kube,
) -> None:
    # The worker writes from the copy it last read or wrote in the same activity, without reading
    # again: the server's 409 on that copy's resourceVersion is what keeps an edit made meanwhile.
    store = SecretStore(SecretsApi(cluster.api.api_client), cluster.namespace, threads=1)
    ours = cluster.create("store", stringData={"k": "v"})
    relabelled = cluster.get("store")
    relabelled.metadata.labels = {**relabelled.metadata.labels, "by": "kubectl"}
    cluster.api.replace_namespaced_secret(ours.metadata.name, cluster.namespace, relabelled)
    started_from: list[str] = []

    def mark(value: str) -> Callable[[client.V1Secret], bool]:
        def mutate(secret: client.V1Secret) -> bool:
            started_from.append(secret.metadata.resource_version)
            secret.metadata.annotations = {**(secret.metadata.annotations or {}), "mark": value}
            return True

        return mutate

    written = await store.update(ours.metadata.name, mark("1"), current=ours)
    assert started_from[0] == ours.metadata.resource_version and len(started_from) == 2
    assert written.metadata.labels["by"] == "kubectl"
    assert written.metadata.annotations["mark"] == "1"

    started_from.clear()
    again = await store.update(ours.metadata.name, mark("2"), current=written)
    assert started_from == [written.metadata.resource_version], "a current copy needs no read"
    assert cluster.get("store").metadata.annotations["mark"] == "2"
    assert again.data == {"k": b64("v")}


async def test_the_secret_store_writes_from_its_last_write_and_keeps_edits_made_since(
    cluster: Kube,
) -> None:
    # Between activities, the worker's next write starts from the copy it last wrote, with no
    # read. An edit made meanwhile turns that write into a 409 and a fresh read; and "nothing to
    # write" is never concluded from the remembered copy, which may be that old.
    store = SecretStore(SecretsApi(cluster.api.api_client), cluster.namespace, threads=1)
    name = cluster.create("remembered", stringData={"k": "v"}).metadata.name
    started_from: list[str] = []

    def ensure(value: str) -> Callable[[client.V1Secret], bool]:
        def mutate(secret: client.V1Secret) -> bool:
            started_from.append(secret.metadata.resource_version)
            if (secret.metadata.annotations or {}).get("mark") == value:
                return False
            secret.metadata.annotations = {**(secret.metadata.annotations or {}), "mark": value}
            return True

        return mutate

    first = await store.update(name, ensure("1"))
    started_from.clear()
    second = await store.update(name, ensure("2"))
    assert started_from == [first.metadata.resource_version], "the last write needs no read"

    # Someone puts the old value back: the remembered copy says "2" is written already.
    reverted = cluster.get("remembered")
    reverted.metadata.annotations["mark"] = "1"
    reverted = cluster.api.replace_namespaced_secret(name, cluster.namespace, reverted)
    started_from.clear()
    await store.update(name, ensure("2"))
    assert started_from == [second.metadata.resource_version, reverted.metadata.resource_version]
    assert cluster.get("remembered").metadata.annotations["mark"] == "2"

    # Someone relabels: the write from the remembered copy is refused and redone, label kept.
    relabelled = cluster.get("remembered")
    relabelled.metadata.labels = {**relabelled.metadata.labels, "by": "kubectl"}
    cluster.api.replace_namespaced_secret(name, cluster.namespace, relabelled)
    written = await store.update(name, ensure("3"))
    assert written.metadata.labels["by"] == "kubectl"
    assert cluster.get("remembered").metadata.annotations["mark"] == "3"
    assert written.data == {"k": b64("v")}


@pytest.mark.parametrize(
    "content_type", ["application/merge-patch+json", "application/strategic-merge-patch+json"]
)
def test_merge_patch_with_stale_resource_version_conflicts(
    cluster: Kube, content_type: str
) -> None:
    suffix = "merge-" + content_type.split("/")[1].split("-patch")[0]
    stale = cluster.create(suffix, labels={"request-state": "pending"}).metadata.resource_version
    patched = cluster.api.patch_namespaced_secret(
        cluster.name(suffix),
        cluster.namespace,
        {"metadata": {"labels": {"request-state": "approved", "conformance-run": cluster.run}}},
        _content_type=content_type,
    )
    assert patched.metadata.labels["request-state"] == "approved"
    assert patched.metadata.resource_version != stale

    with pytest.raises(ApiException) as caught:
        cluster.api.patch_namespaced_secret(
            cluster.name(suffix),
            cluster.namespace,
            {"metadata": {"resourceVersion": stale, "labels": {"request-state": "denied"}}},
            _content_type=content_type,
        )
    assert caught.value.status == 409
    assert status_of(caught.value)["reason"] == "Conflict"

    removed = cluster.api.patch_namespaced_secret(
        cluster.name(suffix), cluster.namespace, {"metadata": {"labels": {"request-state": None}}}
    )
    assert "request-state" not in removed.metadata.labels


def test_patch_that_changes_nothing_keeps_the_resource_version(cluster: Kube) -> None:
    created = cluster.create("noop", labels={"request-state": "pending"})
    same = {"metadata": {"labels": {"request-state": "pending"}}}
    patched = cluster.api.patch_namespaced_secret(created.metadata.name, cluster.namespace, same)
    assert patched.metadata.resource_version == created.metadata.resource_version


def test_json_patch_adds_and_removes_labels(cluster: Kube) -> None:
    cluster.create("jsonpatch", labels={"request-state": "pending"})
    name = cluster.name("jsonpatch")
    patched = cluster.api.patch_namespaced_secret(
        name,
        cluster.namespace,
        [
            {"op": "test", "path": "/metadata/labels/request-state", "value": "pending"},
            {"op": "add", "path": "/metadata/labels/app.kubernetes.io~1component", "value": "x"},
            {"op": "remove", "path": "/metadata/labels/request-state"},
        ],
    )
    assert patched.metadata.labels == {"conformance-run": cluster.run, COMPONENT: "x"}

    with pytest.raises(ApiException) as caught:  # a failed `test` applies nothing
        cluster.api.patch_namespaced_secret(
            name,
            cluster.namespace,
            [
                {
                    "op": "replace",
                    "path": "/metadata/labels/app.kubernetes.io~1component",
                    "value": "y",
                },
                {
                    "op": "test",
                    "path": "/metadata/labels/app.kubernetes.io~1component",
                    "value": "z",
                },
            ],
        )
    assert caught.value.status == 422
    assert cluster.get("jsonpatch").metadata.labels[COMPONENT] == "x"


@pytest.fixture(scope="module")
def selector_secrets(cluster: Kube) -> None:
    for suffix, labels in {
        "sel-a": {"tier": "gold", "env": "prod"},
        "sel-b": {"tier": "silver", "env": "dev"},
        "sel-c": {"tier": "bronze"},
        "sel-d": {"env": "prod"},
    }.items():
        cluster.create(suffix, labels={"set": "selectors", **labels})


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("tier=gold", ["sel-a"]),
        ("tier==gold", ["sel-a"]),
        ("tier!=gold", ["sel-b", "sel-c", "sel-d"]),  # != also matches Secrets without the key
        ("tier in (gold,silver)", ["sel-a", "sel-b"]),
        ("tier notin (gold, silver)", ["sel-c", "sel-d"]),
        ("tier", ["sel-a", "sel-b", "sel-c"]),
        ("!tier", ["sel-d"]),
        ("env=prod,tier", ["sel-a"]),
        ("env in (prod),!tier", ["sel-d"]),
        ("tier=platinum", []),
    ],
)
def test_label_selectors_filter(
    cluster: Kube, selector_secrets: None, selector: str, expected: list[str]
) -> None:
    assert cluster.names(f"set=selectors,{selector}") == expected


@pytest.mark.parametrize("selector", ["tier in (gold", "tier=gold=silver", "tier notin gold"])
def test_invalid_label_selector_is_bad_request(cluster: Kube, selector: str) -> None:
    with pytest.raises(ApiException) as caught:
        cluster.names(selector)
    assert caught.value.status == 400
    assert status_of(caught.value)["reason"] == "BadRequest"


def test_field_selector_on_name(cluster: Kube, selector_secrets: None) -> None:
    names = cluster.names("", field_selector=f"metadata.name={cluster.name('sel-b')}")
    assert names == ["sel-b"]


def test_paging_returns_every_secret_exactly_once(cluster: Kube) -> None:
    expected = [f"page-{i:02d}" for i in range(25)]
    for suffix in expected:
        cluster.create(suffix, labels={"set": "paging"})
    selector = f"conformance-run={cluster.run},set=paging"
    pages: list[list[str]] = []
    token = None
    while True:
        page = cluster.api.list_namespaced_secret(
            cluster.namespace, label_selector=selector, limit=10, _continue=token
        )
        pages.append([s.metadata.name.removeprefix(f"{cluster.run}-") for s in page.items])
        token = page.metadata._continue
        if len(pages) == 1:  # created mid-listing, one sorting before and one after the cursor
            cluster.create("page-00a", labels={"set": "paging"})
            cluster.create("page-zz", labels={"set": "paging"})
        if not token:
            break
        assert len(pages) < 5, "paging does not terminate"
    assert [len(p) for p in pages] == [10, 10, 5]
    # a continued list is a consistent snapshot: exactly the 25, each once, nothing new
    assert sorted(n for p in pages for n in p) == expected
    assert page.metadata.resource_version


def test_a_continue_token_from_before_a_compaction_is_410_expired(cluster: Kube) -> None:
    """Compaction drops the history a continue token reads from. The 410 carries a token that
    continues the list from the same place, no longer as a snapshot."""
    if cluster.compact is None:
        pytest.skip("the tests cannot compact this cluster's history")
    for suffix in ("expire-0", "expire-1", "expire-2"):
        cluster.create(suffix, labels={"set": "expire"})
    selector = f"conformance-run={cluster.run},set=expire"
    first = cluster.api.list_namespaced_secret(cluster.namespace, label_selector=selector, limit=1)
    cluster.create("expire-3", labels={"set": "expire"})  # history moves past the token
    cluster.compact()

    with pytest.raises(ApiException) as caught:
        cluster.api.list_namespaced_secret(
            cluster.namespace, label_selector=selector, limit=1, _continue=first.metadata._continue
        )
    assert caught.value.status == 410
    status = status_of(caught.value)
    assert status["reason"] == "Expired"
    assert "continue parameter is too old" in status["message"]

    rest = cluster.api.list_namespaced_secret(
        cluster.namespace, label_selector=selector, _continue=status["metadata"]["continue"]
    )
    names = [s.metadata.name.removeprefix(f"{cluster.run}-") for s in rest.items]
    assert names == ["expire-1", "expire-2", "expire-3"]  # includes what came after the snapshot


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("a" * 63, True),
        ("", True),
        ("gpt-4o_mini.2024", True),
        ("a" * 64, False),  # at most 63 characters
        ("ada@example.org", False),  # why emails live in annotations
        ("-pending", False),  # must start and end with an alphanumeric character
        ("two words", False),
    ],
)
def test_label_values_are_validated(cluster: Kube, value: str, valid: bool) -> None:
    suffix = f"label-value-{uuid.uuid4().hex[:6]}"
    if valid:
        assert (
            cluster.create(suffix, labels={"request-state": value}).metadata.labels["request-state"]
            == value
        )
        return
    with pytest.raises(ApiException) as caught:
        cluster.create(suffix, labels={"request-state": value})
    assert caught.value.status == 422
    status = status_of(caught.value)
    assert status["reason"] == "Invalid"
    assert "metadata.labels: Invalid value" in status["message"]
    assert status["details"]["causes"][0]["field"] == "metadata.labels"


def test_annotations_are_limited_to_256_kib_in_total(cluster: Kube) -> None:
    limit = 256 * 1024
    key = "llm-key-requestor/reason"
    fits = {key: "x" * (limit - len(key))}
    assert cluster.create("annotations-fit", metadata={"annotations": fits}).metadata.annotations

    too_big = {key: "x" * (limit - len(key) + 1)}
    with pytest.raises(ApiException) as caught:
        cluster.create("annotations-too-big", metadata={"annotations": too_big})
    assert caught.value.status == 422
    status = status_of(caught.value)
    assert status["reason"] == "Invalid"
    assert "metadata.annotations: Too long: may not be more than 262144 bytes" in status["message"]

    # The same limit holds for an update: the object stays as it was.
    secret = cluster.get("annotations-fit")
    secret.metadata.annotations["state"] = "approved"
    with pytest.raises(ApiException) as caught:
        cluster.api.replace_namespaced_secret(secret.metadata.name, cluster.namespace, secret)
    assert caught.value.status == 422
    assert "state" not in cluster.get("annotations-fit").metadata.annotations


def test_watch_reports_changes_since_a_resource_version(cluster: Kube) -> None:
    created = cluster.create("watched", labels={"request-state": "pending"})
    name = created.metadata.name
    cluster.api.patch_namespaced_secret(
        name, cluster.namespace, {"metadata": {"labels": {"request-state": "approved"}}}
    )
    cluster.api.delete_namespaced_secret(name, cluster.namespace)
    seen = []
    stream = watch.Watch()
    for event in stream.stream(
        cluster.api.list_namespaced_secret,
        cluster.namespace,
        field_selector=f"metadata.name={name}",
        resource_version=created.metadata.resource_version,
        timeout_seconds=10,
    ):
        seen.append((event["type"], event["object"].metadata.labels.get("request-state")))
        if event["type"] == "DELETED":
            stream.stop()
    assert seen == [("MODIFIED", "approved"), ("DELETED", "approved")]


# --- kubectl, as operators use it ----------------------------------------------------------


def test_kubectl_get_prints_the_secrets_table(cluster: Kube) -> None:
    cluster.create("table", labels={COMPONENT: "llm-key-request"}, stringData={"a": "1", "b": "2"})
    selector = f"{COMPONENT}=llm-key-request,conformance-run={cluster.run}"
    lines = cluster.kubectl("get", "secrets", "-l", selector).stdout.splitlines()
    assert lines[0].split() == ["NAME", "TYPE", "DATA", "AGE"]
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert rows[cluster.name("table")][:2] == ["Opaque", "2"]

    labelled = cluster.kubectl("get", "secrets", "-l", selector, "--show-labels").stdout
    assert f"{COMPONENT}=llm-key-request" in labelled and "LABELS" in labelled


def test_kubectl_label_and_annotate_are_seen_by_the_python_client(cluster: Kube) -> None:
    cluster.create("label", labels={"request-state": "pending"})
    name = cluster.name("label")
    out = cluster.kubectl("label", "secret", name, "request-state=approved", "--overwrite").stdout
    assert "labeled" in out
    assert cluster.get("label").metadata.labels["request-state"] == "approved"

    cluster.kubectl("annotate", "secret", name, "state=approved", "--overwrite")
    assert cluster.get("label").metadata.annotations == {"state": "approved"}

    printed = cluster.kubectl(
        "get", "secret", name, "-o", "jsonpath={.metadata.labels.request-state}"
    )
    assert printed.stdout == "approved"


def test_kubectl_describe_shows_metadata_but_not_values(cluster: Kube) -> None:
    cluster.create(
        "describe",
        labels={"request-state": "approved"},
        metadata={"annotations": {"state": "approved"}},
        stringData={"api-key": "sk-very-secret"},
    )
    out = cluster.kubectl("describe", "secret", cluster.name("describe")).stdout
    assert "request-state=approved" in out
    assert "state: approved" in out
    assert "api-key:" in out and "14 bytes" in out
    assert "sk-very-secret" not in out and b64("sk-very-secret") not in out


def test_kubectl_get_json_and_yaml(cluster: Kube) -> None:
    cluster.create("output", stringData={"k": "v"})
    as_json = json.loads(
        cluster.kubectl("get", "secret", cluster.name("output"), "-o", "json").stdout
    )
    assert as_json["kind"] == "Secret" and as_json["data"] == {"k": b64("v")}
    as_yaml = cluster.kubectl("get", "secret", cluster.name("output"), "-o", "yaml").stdout
    assert f"name: {cluster.name('output')}" in as_yaml


def test_kubectl_delete_removes_the_secret(cluster: Kube) -> None:
    cluster.create("delete")
    out = cluster.kubectl("delete", "secret", cluster.name("delete")).stdout
    assert f'secret "{cluster.name("delete")}" deleted' in out
    with pytest.raises(ApiException) as caught:
        cluster.get("delete")
    assert caught.value.status == 404

    missing = cluster.kubectl("delete", "secret", cluster.name("delete"), check=False)
    assert missing.returncode != 0 and "NotFound" in missing.stderr


# --- stand-in test hooks -------------------------------------------------------------------


@STANDIN_ONLY
def test_kubectl_create_generic_gets_a_json_only_hint(cluster: Kube) -> None:
    done = cluster.kubectl(
        "create", "secret", "generic", cluster.name("pb"), "--from-literal=a=b", check=False
    )
    assert done.returncode != 0 and "JSON only" in done.stderr and "--validate=false" in done.stderr


@STANDIN_ONLY
def test_injected_faults_fail_the_next_calls_then_clear(cluster: Kube) -> None:
    assert cluster.standin
    cluster.create("faults")
    cluster.standin.inject_faults(2, 500)
    for _ in range(2):
        with pytest.raises(ApiException) as caught:
            cluster.get("faults")
        assert caught.value.status == 500
        assert status_of(caught.value)["reason"] == "InternalError"
    assert cluster.get("faults").metadata.name == cluster.name("faults")

    cluster.standin.inject_faults(1, 409, methods={"PUT"})
    cluster.standin.inject_faults(1, 503, methods={"PATCH"})
    current = cluster.get("faults")  # only the chosen methods are affected
    with pytest.raises(ApiException) as caught:
        cluster.api.replace_namespaced_secret(current.metadata.name, cluster.namespace, current)
    assert (caught.value.status, status_of(caught.value)["reason"]) == (409, "Conflict")
    with pytest.raises(ApiException) as caught:
        cluster.api.patch_namespaced_secret(
            current.metadata.name, cluster.namespace, {"metadata": {}}
        )
    assert (caught.value.status, status_of(caught.value)["reason"]) == (503, "ServiceUnavailable")
    assert cluster.get("faults").metadata.resource_version == current.metadata.resource_version

    cluster.standin.inject_faults(5, 500)
    cluster.standin.clear_faults()
    patch = {"metadata": {"labels": {"request-state": "approved"}}}
    cluster.api.patch_namespaced_secret(current.metadata.name, cluster.namespace, patch)
    assert cluster.get("faults").metadata.labels["request-state"] == "approved"


@STANDIN_ONLY
def test_verbs_seen_lists_the_rbac_verbs_used(cluster: Kube) -> None:
    assert cluster.standin
    cluster.standin.reset_verbs()
    cluster.create("verbs")
    cluster.get("verbs")
    cluster.names("")
    assert cluster.standin.verbs_seen() == {"create", "get", "list"}
    secret = cluster.get("verbs")
    cluster.api.replace_namespaced_secret(secret.metadata.name, cluster.namespace, secret)
    cluster.api.patch_namespaced_secret(secret.metadata.name, cluster.namespace, {"metadata": {}})
    cluster.kubectl("delete", "secret", secret.metadata.name)
    assert cluster.standin.verbs_seen() == {"create", "get", "list", "update", "patch", "delete"}
