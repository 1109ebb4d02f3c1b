"""The Kubernetes Secret store: one Secret per request, written with optimistic concurrency.

The official client is synchronous; calls run in a thread so the worker's event loop stays free.
Writes are read-modify-replace with the object's resourceVersion, so a concurrent edit (another
activity attempt, a kubectl relabel) is never overwritten: the write is redone on the fresh copy.
The store remembers the copy it last created or wrote of each recent Secret; the next write may
start from that copy instead of reading again, because the resourceVersion check catches a stale
one.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from temporalio.exceptions import ApplicationError

from activities.transient import Transient

log = logging.getLogger(__name__)

_CONFLICT_RETRIES = 8
# Secrets whose last copy is remembered: more than the requests in flight in one worker.
_REMEMBERED = 512


class KubernetesRejected(ApplicationError):
    """The API server refused a request that will not succeed on retry (invalid object)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, type="KubernetesRejected", non_retryable=True)


class KubernetesUnavailable(Transient):
    """The API server failed on its side, throttled us, or could not be reached."""


class SecretsApi:
    """The Secret endpoints the worker calls, on the official client's ApiClient.

    The same requests, answers and ApiExceptions as CoreV1Api's methods for Secrets, without
    CoreV1Api itself: that class holds the whole core API in one 63,000-line module, 22 MB of
    every worker that loads it (BENCHMARKS.md).
    """

    _PATH = "/api/v1/namespaces/{namespace}/secrets"

    def __init__(self, api_client: client.ApiClient) -> None:
        self.api_client = api_client

    def _call(self, method: str, path: str, answer: str, body=None, query=None, **path_params):
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        request = self.api_client.param_serialize(
            method=method,
            resource_path=path,
            path_params=path_params,
            query_params=[(k, v) for k, v in (query or {}).items() if v is not None],
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        response = self.api_client.call_api(*request)
        response.read()
        # A status other than 2xx raises ApiException, as CoreV1Api's methods do.
        return self.api_client.response_deserialize(response, {"2XX": answer}).data

    # CoreV1Api's names and arguments: the store reads the same either way, and deploy/rbac.yaml
    # is checked against these names (tests/test_shipping.py).

    def read_namespaced_secret(self, name: str, namespace: str) -> client.V1Secret:
        return self._call("GET", self._PATH + "/{name}", "V1Secret", namespace=namespace, name=name)

    def create_namespaced_secret(self, namespace: str, body: client.V1Secret) -> client.V1Secret:
        return self._call("POST", self._PATH, "V1Secret", body=body, namespace=namespace)

    def replace_namespaced_secret(
        self, name: str, namespace: str, body: client.V1Secret
    ) -> client.V1Secret:
        return self._call(
            "PUT", self._PATH + "/{name}", "V1Secret", body=body, namespace=namespace, name=name
        )

    def delete_namespaced_secret(
        self, name: str, namespace: str, body: client.V1DeleteOptions
    ) -> None:
        self._call(
            "DELETE", self._PATH + "/{name}", "V1Status", body=body, namespace=namespace, name=name
        )

    def list_namespaced_secret(
        self, namespace: str, label_selector: str, limit: int, _continue: str | None = None
    ) -> client.V1SecretList:
        query = {"labelSelector": label_selector, "limit": limit, "continue": _continue}
        return self._call("GET", self._PATH, "V1SecretList", query=query, namespace=namespace)


def secrets_api() -> SecretsApi:
    """A client from the pod's service account when in a cluster, else from KUBECONFIG."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)
    # The proxy the environment names for this host (HTTPS_PROXY, NO_PROXY), fixed now: left to
    # the environment, the client reads all of it again at every call (its token refresh sets the
    # host). That was 0.37 of the 0.85 ms a GET cost with 35 variables; a pod has one per service.
    configuration.proxy = configuration.proxy
    return SecretsApi(client.ApiClient(configuration))


def _explain(exc: ApiException, what: str) -> Exception:
    hint = {
        401: "the API server rejected our credentials; check the service account or KUBECONFIG",
        403: "missing RBAC permission; apply deploy/rbac.yaml to this namespace",
    }.get(exc.status or 0, "")
    message = f"Kubernetes API: {what} failed with {exc.status} {exc.reason}"
    if hint:
        message += f" ({hint})"
    if exc.status in (400, 422):
        return KubernetesRejected(message)
    if exc.status == 429 or (exc.status or 0) >= 500:
        return KubernetesUnavailable(message)
    return RuntimeError(message)


@dataclass
class SecretPage:
    items: list[client.V1Secret]
    continue_token: str | None


class SecretStore:
    def __init__(self, api: SecretsApi, namespace: str, threads: int = 16) -> None:
        self.api = api
        self.namespace = namespace
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="kube")
        self._last: OrderedDict[str, client.V1Secret] = OrderedDict()

    def _remember(self, secret: client.V1Secret | None) -> client.V1Secret | None:
        if secret is not None:
            self._last[secret.metadata.name] = secret
            self._last.move_to_end(secret.metadata.name)
            if len(self._last) > _REMEMBERED:
                self._last.popitem(last=False)
        return secret

    async def _call(self, fn: Callable, *args, **kwargs):
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._pool, lambda: fn(*args, **kwargs))
        except urllib3.exceptions.HTTPError as exc:  # refused, reset, timed out: no answer
            raise KubernetesUnavailable(
                f"Kubernetes API: no answer ({type(exc).__name__}); check that the API server is "
                "up and KUBECONFIG or the pod's service account points at it"
            ) from None

    async def get(self, name: str) -> client.V1Secret | None:
        try:
            return await self._call(self.api.read_namespaced_secret, name, self.namespace)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise _explain(exc, f"reading secret {name}") from None

    async def create(self, secret: client.V1Secret) -> client.V1Secret | None:
        """Create the Secret; None if one of that name exists already."""
        try:
            return self._remember(
                await self._call(self.api.create_namespaced_secret, self.namespace, secret)
            )
        except ApiException as exc:
            if exc.status == 409:
                return None
            raise _explain(exc, f"creating secret {secret.metadata.name}") from None

    async def update(
        self,
        name: str,
        mutate: Callable[[client.V1Secret], bool],
        current: client.V1Secret | None = None,
    ) -> client.V1Secret | None:
        """Apply `mutate` to the current Secret and write it back; None if there is none.

        `mutate` edits the object in place and returns False when nothing needs writing.
        `current` is a copy the caller has just read or written, else the store's last copy is
        used: the first attempt starts from it instead of reading again, and its resourceVersion
        makes the API server refuse the write (409) if the Secret changed since, which sends the
        next attempt to a fresh read. "Nothing to write" is only believed of a fresh copy or the
        caller's: the store's may be older than a change that another process made.
        """
        for _ in range(_CONFLICT_RETRIES):
            # Taken out: `mutate` edits in place, and only the API server's answer is kept.
            remembered = self._last.pop(name, None)
            if current is not None:
                secret, believed = current, True
            elif remembered is not None:
                secret, believed = remembered, False
            else:
                secret, believed = await self.get(name), True
            current = None
            if secret is None:
                return None
            if not mutate(secret):
                if believed:
                    return secret
                continue
            try:
                return self._remember(
                    await self._call(
                        self.api.replace_namespaced_secret, name, self.namespace, secret
                    )
                )
            except ApiException as exc:
                if exc.status == 409:
                    log.debug("secret %s changed while we wrote it; retrying", name)
                    continue
                if exc.status == 404:
                    return None
                raise _explain(exc, f"updating secret {name}") from None
        raise KubernetesUnavailable(
            f"Kubernetes API: secret {name} kept changing under us ({_CONFLICT_RETRIES} conflicts)"
        )

    async def delete(self, name: str, resource_version: str) -> bool:
        """Delete the Secret if it is still the version the caller decided on; False if it
        changed meanwhile (a new submission reused it) or is gone."""
        body = client.V1DeleteOptions(preconditions=client.V1Preconditions(
            resource_version=resource_version))  # fmt: skip
        self._last.pop(name, None)
        try:
            await self._call(self.api.delete_namespaced_secret, name, self.namespace, body=body)
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise _explain(exc, f"deleting secret {name}") from None
        return True

    async def list_page(
        self, label_selector: str, limit: int, continue_token: str | None = None
    ) -> SecretPage:
        """One page of the Secrets matching `label_selector`, and the token for the next one.

        A token older than etcd's history (the API server compacts it every 5 minutes by
        default) is answered 410 Gone, with a token that continues from the same place, no longer
        as one snapshot of the list. The listing carries on with that: the reconciler takes each
        Secret on its own, so it needs every Secret once, not one consistent snapshot.
        """
        for _ in range(2):
            try:
                result = await self._call(
                    self.api.list_namespaced_secret,
                    self.namespace,
                    label_selector=label_selector,
                    limit=limit,
                    _continue=continue_token or None,
                )
                return SecretPage(result.items, result.metadata._continue or None)
            except ApiException as exc:
                if exc.status != 410 or not continue_token:
                    raise _explain(exc, f"listing secrets ({label_selector})") from None
                log.info("continue token expired listing secrets (%s); continuing", label_selector)
                continue_token = _continue_after_expiry(exc)
        raise RuntimeError(
            f"Kubernetes API: listing secrets ({label_selector}) expired twice in a row"
        )


def _continue_after_expiry(exc: ApiException) -> str | None:
    """The token a 410 offers to go on from (None: start the list again)."""
    try:
        return json.loads(exc.body)["metadata"]["continue"] or None
    except (TypeError, ValueError, KeyError):
        return None
