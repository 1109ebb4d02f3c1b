"""An in-memory stand-in for the Kubernetes API: core/v1 Secrets, for the service and for kubectl.

It speaks the real HTTP contract, JSON only, to the official `kubernetes` Python client and to
`kubectl` (tests/conformance/test_kubernetes_api.py runs the same tests against it and against a
real kube-apiserver):

- discovery: /version, /api, /api/v1 (secrets; namespaces), /apis (no groups), /healthz,
  /readyz, /livez. Aggregated discovery is not offered: kubectl falls back to these legacy forms;
- Secrets, one lock and one global resourceVersion: create (201; AlreadyExists; 422 Invalid
  with the API server's causes for names, label keys and values, annotation keys, data keys, and
  the 256 KiB annotation and 1 MiB data limits),
  get, replace (PUT; 409 Conflict on a stale metadata.resourceVersion), patch (JSON merge patch;
  strategic merge patch treated as a merge patch, which is what it amounts to for Secrets;
  RFC 6902 JSON patch), delete (with preconditions), deletecollection, list (set-based label
  selectors; metadata.name, metadata.namespace and type field selectors; limit/continue paging
  over a snapshot of membership, remainingItemCount only without selectors; a token from before
  a compaction is 410 Expired with a token to go on inconsistently) and watch (newline-delimited
  events, resumable from a resourceVersion, sendInitialEvents with its closing BOOKMARK).
  stringData folds into data, and a write that changes nothing keeps the resourceVersion, as on
  a real server;
- server-side printing: `as=Table` answers with NAME/TYPE/DATA/AGE, honouring includeObject;
- every error is a `Status` whose `code` is the HTTP status;
- test hooks: fault injection, the RBAC verbs requested against secrets, a callback on every
  stored write (to crash a client at a precise moment), and compaction of the history.

Deliberately not implemented: protobuf and CBOR bodies (415 with a hint to use JSON), server-side
apply, the `<`/`>` label operators, authentication and authorization (any token is accepted),
admission, immutable Secrets, finalizers and garbage collection, compaction on a timer,
OpenAPI documents (404, so `kubectl create -f` needs --validate=false) and every resource other
than Secrets and Namespaces (which all exist, are Active and read-only).
"""

from __future__ import annotations

import asyncio
import base64
import bisect
import copy
import json
import re
import threading
import uuid
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from devstack.http import ServedApp, serve_in_thread

REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    410: "Expired",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}
SECRET_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]
DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
DATA_KEY = re.compile(r"[-._a-zA-Z0-9]+")
SELECTOR_TOKEN = re.compile(r"\s*(==|!=|=|!|\(|\)|,|[^\s,()=!]+)")
SELECTOR_SPECIAL = {"==", "!=", "=", "!", "(", ")", ","}
HISTORY = 1000  # watch events kept for resourceVersion-based resumption
EXPIRED_CONTINUE = (
    "The provided continue parameter is too old to display a consistent list result. You can "
    "start a new list without the continue parameter."
)
PATCH_TYPES = {
    "application/merge-patch+json",
    "application/strategic-merge-patch+json",
    "application/json-patch+json",
}
BODY_TYPES = {
    "POST": {"application/json", "application/yaml"},
    "PUT": {"application/json", "application/yaml"},
    "PATCH": PATCH_TYPES,
    "DELETE": {"application/json"},
}
JSON_ONLY = (
    "this Kubernetes stand-in speaks JSON only (no protobuf or CBOR); "
    "use `kubectl create -f file.json --validate=false` or the Python client"
)


class KubeError(Exception):
    def __init__(
        self,
        code: int,
        message: str,
        reason: str | None = None,
        *,
        metadata: dict | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.details = code, message, details
        self.metadata = metadata or {}
        self.reason = REASONS.get(code, "") if reason is None else reason

    def status(self) -> dict:
        body = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": self.metadata,
            "status": "Failure",
            "message": self.message,
            "code": self.code,
        }
        if self.reason:
            body["reason"] = self.reason
        if self.details:
            body["details"] = self.details
        return body


def not_found(name: str) -> KubeError:
    return KubeError(404, f'secrets "{name}" not found', name=name, kind="secrets")


def conflict(name: str) -> KubeError:
    return KubeError(
        409,
        f'Operation cannot be fulfilled on secrets "{name}": the object has been modified; '
        "please apply your changes to the latest version and try again",
        name=name,
        kind="secrets",
    )


def continue_token(rv: int, after: tuple[str, str] | list[str]) -> str:
    token = {"rv": rv, "start": list(after)}
    return base64.urlsafe_b64encode(json.dumps(token).encode()).decode()


def continue_expired(after: tuple[str, str]) -> KubeError:
    """410 for a continue token older than the history, with one that goes on inconsistently."""
    return KubeError(
        410,
        "The provided continue parameter is too old to display a consistent list result. You "
        "can start a new list without the continue parameter, or use the continue token in this "
        "response to retrieve the remainder of the results. Continuing with the provided token "
        "results in an inconsistent list - objects that were created, modified, or deleted "
        "between the time the first chunk was returned and now may show up in the list.",
        "Expired",
        metadata={"continue": continue_token(-1, after)},
    )


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def age(timestamp: str | None) -> str:
    """kubectl's HumanDuration, roughly: 42s, 5m, 3h, 2d."""
    if not timestamp:
        return "<unknown>"
    created = datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    seconds = max(0, int((datetime.now(UTC) - created).total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 3 * 3600:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h" if seconds < 48 * 3600 else f"{seconds // 86400}d"


# --- selectors -----------------------------------------------------------------------------


# The API server's wording (k8s.io/apimachinery/pkg/util/validation), for errors and causes.
def _regex_rule(what: str, examples: str, regex: re.Pattern) -> str:
    return (
        f"{what}, and must start and end with an alphanumeric character (e.g. {examples}, "
        f"regex used for validation is '{regex.pattern}')"
    )


NAME_PART_RULE = _regex_rule(
    "name part must consist of alphanumeric characters, '-', '_' or '.'",
    "'MyName',  or 'my.name',  or '123-abc'",
    LABEL_NAME,
)
LABEL_VALUE_RULE = _regex_rule(
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.'",
    "'MyValue',  or 'my_value',  or '12345'",
    LABEL_VALUE,
)
SUBDOMAIN_RULE = _regex_rule(
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.'",
    "'example.com'",
    DNS_SUBDOMAIN,
)
DATA_KEY_RULE = (
    "a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. "
    "'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is "
    f"'{DATA_KEY.pattern}')"
)


def key_errors(key: str) -> list[str]:
    """Why `key` is no qualified name (label or annotation key); empty if it is one."""
    prefix, slash, name = key.rpartition("/")
    errors = []
    if slash and not prefix:
        errors.append("prefix part must be non-empty")
    elif slash and (len(prefix) > 253 or not DNS_SUBDOMAIN.fullmatch(prefix)):
        errors.append(f"prefix part {SUBDOMAIN_RULE}")
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 bytes")
    if name and not LABEL_NAME.fullmatch(name):
        errors.append(NAME_PART_RULE)
    return errors


def value_errors(value: str) -> list[str]:
    errors = ["must be no more than 63 bytes"] if len(value) > 63 else []
    return errors + ([] if LABEL_VALUE.fullmatch(value) else [LABEL_VALUE_RULE])


def _check_key(key: str) -> str:
    if errors := key_errors(key):
        raise KubeError(400, f"invalid label key {key!r}: {'; '.join(errors)}")
    return key


def _check_value(value: str) -> str:
    if errors := value_errors(value):
        raise KubeError(400, f"invalid label value {value!r}: {'; '.join(errors)}")
    return value


def parse_label_selector(text: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """Parse `a=b,c!=d,e in (f,g),h notin (i),j,!k` into (key, operator, values) triples."""
    tokens = SELECTOR_TOKEN.findall(text)
    if "".join(tokens) != re.sub(r"\s", "", text):
        raise KubeError(400, f"unable to parse label selector {text!r}")
    reqs, i = [], 0

    def take() -> str | None:
        nonlocal i
        i += 1
        return tokens[i - 1] if i <= len(tokens) else None

    while i < len(tokens):
        tok = take()
        if tok == "!":
            reqs.append((_check_key(take() or ""), "!", ()))
        elif tok is None or tok in SELECTOR_SPECIAL:
            raise KubeError(400, f"unable to parse requirement in label selector {text!r}")
        else:
            key, op = _check_key(tok), (tokens[i] if i < len(tokens) else ",")
            if op == ",":
                reqs.append((key, "exists", ()))
            elif op in ("=", "==", "!="):
                take()
                value = "" if i >= len(tokens) or tokens[i] == "," else take()
                reqs.append((key, "!=" if op == "!=" else "=", (_check_value(value),)))
            elif op in ("in", "notin"):
                take()
                if take() != "(":
                    raise KubeError(400, f"expected '(' after {op} in label selector {text!r}")
                values: list[str] = []
                while True:
                    tok = take()
                    if tok is None or tok in SELECTOR_SPECIAL:
                        raise KubeError(400, f"bad value set after {key} {op} in {text!r}")
                    values.append(_check_value(tok))
                    if (sep := take()) == ")":
                        break
                    if sep != ",":
                        raise KubeError(400, f"expected ',' or ')' in value set in {text!r}")
                reqs.append((key, op, tuple(values)))
            else:
                raise KubeError(400, f"unexpected {op!r} in label selector {text!r}")
        if i < len(tokens) and take() != ",":
            raise KubeError(400, f"expected ',' in label selector {text!r}")
    return reqs


def labels_match(labels: dict, reqs: list[tuple[str, str, tuple[str, ...]]]) -> bool:
    for key, op, values in reqs:
        value = labels.get(key)
        if (op in ("=", "in") and value not in values) or (op == "exists" and key not in labels):
            return False
        if (op in ("!=", "notin") and value in values) or (op == "!" and key in labels):
            return False
    return True


def parse_field_selector(text: str) -> list[tuple[str, bool, str]]:
    fields = {"metadata.name", "metadata.namespace", "type"}
    reqs = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = re.fullmatch(r"([^=!]+?)\s*(==|=|!=)\s*(.*)", part)
        if not match or match[1] not in fields:
            field = match[1] if match else part
            raise KubeError(400, f"field label not supported: {field} (one of {sorted(fields)})")
        reqs.append((match[1], match[2] != "!=", match[3]))
    return reqs


def fields_match(obj: dict, reqs: list[tuple[str, bool, str]]) -> bool:
    meta = obj["metadata"]
    values = {
        "metadata.name": meta["name"],
        "metadata.namespace": meta["namespace"],
        "type": obj.get("type", ""),
    }
    return all((values[f] == v) == equal for f, equal, v in reqs)


def selected(obj: dict, labels: list, fields: list) -> bool:
    return labels_match(obj["metadata"].get("labels") or {}, labels) and fields_match(obj, fields)


# --- patches -------------------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386; strategic-merge `$` directives are dropped (Secrets have no merge keys)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if key.startswith("$"):
            continue
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 add/remove/replace/move/copy/test; failures are 422 as on a real API server."""
    if not isinstance(ops, list) or not all(isinstance(op, dict) and "op" in op for op in ops):
        raise KubeError(400, "a JSON patch must be a list of operations")
    root = {"": copy.deepcopy(doc)}  # so that even the whole document has a parent

    def resolve(pointer: str, adding: bool = False) -> tuple[Any, Any]:
        """The container of the value at `pointer` and its key (or index) in there."""
        if pointer and not pointer.startswith("/"):
            raise KubeError(422, f"invalid JSON pointer {pointer!r}")
        keys = ["", *(k.replace("~1", "/").replace("~0", "~") for k in pointer.split("/")[1:])]
        parent: Any = root
        try:
            for key in keys[:-1]:
                parent = parent[int(key) if isinstance(parent, list) else key]
            key = keys[-1]
            if isinstance(parent, list):
                key = len(parent) if key == "-" and adding else int(key)
                if not 0 <= key < len(parent) + adding:
                    raise IndexError(key)
            elif not isinstance(parent, dict) or (key not in parent and not adding):
                raise KeyError(key)
        except (KeyError, IndexError, ValueError, TypeError):
            raise KubeError(422, f"the path {pointer!r} does not exist") from None
        return parent, key

    def add(pointer: str, value: Any) -> None:
        parent, key = resolve(pointer, adding=True)
        if isinstance(parent, list):
            parent.insert(key, value)
        else:
            parent[key] = value

    def remove(pointer: str) -> Any:
        parent, key = resolve(pointer)
        return parent.pop(key)

    for op in ops:
        kind, path, value = op["op"], op.get("path", ""), copy.deepcopy(op.get("value"))
        if kind == "add":
            add(path, value)
        elif kind in ("remove", "replace"):
            remove(path)
            if kind == "replace":
                add(path, value)
        elif kind in ("move", "copy"):
            parent, key = resolve(op.get("from", ""))
            add(path, parent.pop(key) if kind == "move" else copy.deepcopy(parent[key]))
        elif kind == "test":
            parent, key = resolve(path)
            if parent[key] != value:
                raise KubeError(422, f"testing value {path!r} failed: test operation failed")
        else:
            raise KubeError(400, f"unexpected JSON patch operation {kind!r}")
    return root[""]


# --- storage -------------------------------------------------------------------------------


class SecretStore:
    """Secrets keyed by (namespace, name); one lock, one global resourceVersion counter."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.objects: dict[tuple[str, str], dict] = {}
        self.born: dict[tuple[str, str], int] = {}  # resourceVersion at creation, for paging
        self.keys: list[tuple[str, str]] = []  # sorted: a page starts where the last one ended
        self.compacted = 0  # history before this resourceVersion is gone, as after etcd compacts
        self.rv = 1
        self.history: deque[tuple[int, str, dict | None, dict]] = deque(maxlen=HISTORY)
        self.waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.closing = False
        self.faults: list[tuple[int, set[str] | None]] = []
        self.verbs: set[str] = set()
        # Called as on_write(method, object) after a write is stored, before it is answered.
        self.on_write: Callable[[str, dict], None] | None = None

    def notify(self) -> None:
        for loop, event in list(self.waiters):
            loop.call_soon_threadsafe(event.set)

    def _commit(self, key: tuple[str, str], obj: dict | None) -> dict | None:
        """Store (or delete, if obj is None) under the lock; records the watch event."""
        old = self.objects.get(key)
        self.rv += 1
        if obj is None:
            del self.objects[key]
            self.born.pop(key, None)
            del self.keys[bisect.bisect_left(self.keys, key)]
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self.history.append((self.rv, "DELETED", old, gone))
        else:
            obj["metadata"]["resourceVersion"] = str(self.rv)
            if old is None:
                bisect.insort(self.keys, key)
            self.objects[key] = obj
            self.born.setdefault(key, self.rv)
            self.history.append((self.rv, "MODIFIED" if old else "ADDED", old, obj))
        self.notify()
        return old

    def fault_for(self, method: str) -> int | None:
        with self.lock:
            for i, (code, methods) in enumerate(self.faults):
                if methods is None or method in methods:
                    del self.faults[i]
                    return code
        return None

    def get(self, ns: str, name: str) -> dict:
        with self.lock:
            if (ns, name) not in self.objects:
                raise not_found(name)
            return copy.deepcopy(self.objects[ns, name])

    def create(self, ns: str, body: dict) -> dict:
        obj = normalize(body, ns)
        meta = obj["metadata"]
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + uuid.uuid4().hex[:5]
        validate(obj)
        if meta.get("resourceVersion", "0") not in ("", "0"):  # as etcd3 storage answers
            raise KubeError(500, "resourceVersion should not be set on objects to be created", "")
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now())
        for field in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(field, None)
        with self.lock:
            if (ns, meta["name"]) in self.objects:
                raise KubeError(
                    409,
                    f'secrets "{meta["name"]}" already exists',
                    "AlreadyExists",
                    name=meta["name"],
                    kind="secrets",
                )
            self._commit((ns, meta["name"]), obj)
            return copy.deepcopy(obj)

    def update(self, ns: str, name: str, body: dict | None = None, patch=None) -> dict:
        """PUT `body`, or apply `patch(current) -> new`, checking resourceVersion either way."""
        with self.lock:
            current = self.objects.get((ns, name))
            if current is None:
                raise not_found(name)
            new = patch(copy.deepcopy(current)) if patch else body
            if not isinstance(new, dict):
                raise KubeError(400, "the object must be a JSON object")
            obj = normalize(new, ns)
            meta = obj["metadata"]
            if meta.get("name", name) != name:
                raise KubeError(
                    400,
                    f"the name of the object ({meta['name']}) does not match the name on the URL "
                    f"({name})",
                )
            wanted = meta.get("resourceVersion")
            if wanted and wanted != current["metadata"]["resourceVersion"]:
                raise conflict(name)
            for field in ("uid", "creationTimestamp", "name", "resourceVersion"):
                meta[field] = current["metadata"][field]
            validate(obj)
            if obj != current:  # like the real API, a no-op write keeps the resourceVersion
                self._commit((ns, name), obj)
            return copy.deepcopy(obj)

    def delete(self, ns: str, name: str, preconditions: dict | None = None) -> dict:
        with self.lock:
            current = self.objects.get((ns, name))
            if current is None:
                raise not_found(name)
            meta = current["metadata"]
            for field in ("uid", "resourceVersion"):
                if (preconditions or {}).get(field) not in (None, meta[field]):
                    raise KubeError(
                        409,
                        f"Precondition failed: {field} in precondition: "
                        f"{preconditions[field]}, {field} in object meta: "  # type: ignore[index]
                        f"{meta[field]}",
                        name=name,
                        kind="secrets",
                    )
            self._commit((ns, name), None)
            return copy.deepcopy(current)

    def list(
        self, ns: str | None, labels: str = "", fields: str = "", limit: int = 0, cont: str = ""
    ) -> tuple[list[dict], dict]:
        label_reqs, field_reqs = parse_label_selector(labels), parse_field_selector(fields)
        with self.lock:
            list_rv, after = self.rv, None
            if cont:
                try:
                    token = json.loads(base64.urlsafe_b64decode(cont.encode()))
                    token_rv, after = int(token["rv"]), tuple(token["start"])
                except (ValueError, KeyError, TypeError):
                    raise KubeError(400, "invalid continue token") from None
                if token_rv != -1 and token_rv < self.compacted:
                    raise continue_expired(after)
                if token_rv != -1:  # -1: go on from `after` at the latest resourceVersion
                    list_rv = token_rv
            # Only the page is copied, and the scan stops after it: paging through n Secrets
            # costs O(n), not O(n^2 / limit).
            first, end = 0, len(self.keys)
            if ns is not None:  # keys sort by namespace first
                first = bisect.bisect_left(self.keys, (ns, ""))
                end = bisect.bisect_left(self.keys, (ns + "\x00", ""))
            if after is not None:
                first = max(first, bisect.bisect_right(self.keys, after))
            page: list[dict] = []
            stopped_at = None
            for i in range(first, end):
                key = self.keys[i]
                obj = self.objects[key]
                if self.born[key] > list_rv or not selected(obj, label_reqs, field_reqs):
                    continue  # a continued list is a snapshot of membership
                if 0 < limit == len(page):
                    stopped_at = i
                    break
                page.append(copy.deepcopy(obj))
        meta: dict[str, Any] = {"resourceVersion": str(list_rv)}
        if stopped_at is not None:
            last = page[-1]["metadata"]
            meta["continue"] = continue_token(list_rv, (last["namespace"], last["name"]))
            if not label_reqs and not field_reqs:
                # As etcd counts it; with a selector the real server gives no count at all.
                meta["remainingItemCount"] = end - stopped_at
        return page, meta

    def events_since(self, rv: int, ns: str | None, labels: list, fields: list) -> list:
        """Watch events after `rv`, seen through the selectors (leaving a selection = DELETED)."""
        with self.lock:
            too_old = len(self.history) == HISTORY and rv < self.history[0][0] - 1
            if too_old or rv < self.compacted:
                raise KubeError(410, f"too old resource version: {rv}", "Expired")
            out = []
            for event_rv, kind, old, new in self.history:
                if event_rv <= rv or (ns is not None and new["metadata"]["namespace"] != ns):
                    continue
                was = kind != "ADDED" and selected(old, labels, fields)
                now_in = kind != "DELETED" and selected(new, labels, fields)
                if was or now_in:
                    kind = "MODIFIED" if was and now_in else "ADDED" if now_in else "DELETED"
                    out.append((event_rv, kind, copy.deepcopy(new)))
            return out


def normalize(body: dict, ns: str) -> dict:
    """Copy `body` into a Secret: kind/apiVersion/namespace/type set, stringData folded in."""
    if body.get("kind") not in (None, "Secret") or body.get("apiVersion") not in (None, "v1"):
        raise KubeError(
            400, f"expected a v1 Secret, got {body.get('apiVersion')}/{body.get('kind')}"
        )
    obj = copy.deepcopy(body)
    meta = obj.setdefault("metadata", {}) or {}
    obj["metadata"] = meta
    if (meta.get("namespace") or ns) != ns:
        raise KubeError(
            400,
            "the namespace of the provided object does not match the namespace sent on the request",
        )
    meta["namespace"] = ns
    for field in ("labels", "annotations"):
        if not meta.get(field):
            meta.pop(field, None)
    obj.update(kind="Secret", apiVersion="v1")
    obj["type"] = obj.get("type") or "Opaque"
    data = obj.get("data") or {}
    for key, value in (obj.pop("stringData", None) or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    if data:
        obj["data"] = data
    else:
        obj.pop("data", None)
    return obj


ANNOTATIONS_LIMIT = 256 * 1024  # bytes, keys and values together
DATA_LIMIT = 1024 * 1024  # bytes of decoded data


def validate(obj: dict) -> None:
    """The API server's checks on a Secret: 422 Invalid with one cause per problem."""
    meta, name = obj["metadata"], obj["metadata"].get("name") or ""
    causes: list[dict] = []

    def invalid(field: str, value: Any, detail: str) -> None:
        message = f"Invalid value: {json.dumps(value)}: {detail}"
        causes.append({"reason": "FieldValueInvalid", "message": message, "field": field})

    def too_long(field: str, limit: int) -> None:
        message = f"Too long: may not be more than {limit} bytes"
        causes.append({"reason": "FieldValueTooLong", "message": message, "field": field})

    if not name:
        causes.append(
            {
                "reason": "FieldValueRequired",
                "message": "Required value: name or generateName is required",
                "field": "metadata.name",
            }
        )
    elif len(name) > 253 or not DNS_SUBDOMAIN.fullmatch(name):
        invalid("metadata.name", name, SUBDOMAIN_RULE)
    for key, value in (meta.get("labels") or {}).items():
        if errors := key_errors(key):
            invalid("metadata.labels", key, "; ".join(errors))
        if errors := value_errors(value if isinstance(value, str) else "!"):
            invalid("metadata.labels", value, "; ".join(errors))
    annotations = meta.get("annotations") or {}
    for key in annotations:
        if errors := key_errors(key.lower()):  # annotation keys may have capitals
            invalid("metadata.annotations", key, "; ".join(errors))
    if sum(len(k.encode()) + len(str(v).encode()) for k, v in annotations.items()) > (
        ANNOTATIONS_LIMIT
    ):
        too_long("metadata.annotations", ANNOTATIONS_LIMIT)
    size = 0
    for key, value in (obj.get("data") or {}).items():
        if not isinstance(value, str):
            raise KubeError(400, 'Secret in version "v1" cannot be handled as a Secret')
        try:
            size += len(key) + len(base64.b64decode(value, validate=True))
        except ValueError:
            raise KubeError(
                400, 'Secret in version "v1" cannot be handled as a Secret: illegal base64 data'
            ) from None
        if not DATA_KEY.fullmatch(key):
            invalid(f"data[{key}]", key, DATA_KEY_RULE)
    if size > DATA_LIMIT:
        too_long("data", DATA_LIMIT)
    if causes:
        problems = [f"{c['field']}: {c['message']}" for c in causes]
        summary = problems[0] if len(problems) == 1 else f"[{', '.join(problems)}]"
        details: dict[str, Any] = {"name": name} if name else {}
        raise KubeError(
            422, f'Secret "{name}" is invalid: {summary}', kind="Secret", causes=causes, **details
        )


# --- HTTP ----------------------------------------------------------------------------------


def status_response(error: KubeError) -> JSONResponse:
    return JSONResponse(error.status(), status_code=error.code)


def wants_table(request: Request) -> bool:
    accept = request.headers.get("accept", "")
    first = accept.split(",")[0].replace(" ", "")
    return "as=Table" in first and "g=meta.k8s.io" in first


def table(request: Request, items: list[dict], meta: dict) -> dict:
    include = request.query_params.get("includeObject", "Metadata")

    def row_object(obj: dict) -> dict | None:
        if include == "Object":
            return obj
        if include == "None":
            return None
        return {
            "kind": "PartialObjectMetadata",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"],
        }

    columns = [
        ("Name", "string", "name", "Name must be unique within a namespace."),
        ("Type", "string", "", "Used to facilitate programmatic handling of secret data."),
        ("Data", "string", "", "Data contains the secret data."),
        ("Age", "string", "", "CreationTimestamp: the server time the object was created at."),
    ]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": [
            {"name": n, "type": t, "format": f, "description": d, "priority": 0}
            for n, t, f, d in columns
        ],
        "rows": [
            {
                "cells": [
                    o["metadata"]["name"],
                    o.get("type", ""),
                    len(o.get("data") or {}),
                    age(o["metadata"].get("creationTimestamp")),
                ],
                "object": row_object(o),
            }
            for o in items
        ],
    }


async def read_body(request: Request) -> Any:
    kind = (request.headers.get("content-type") or "application/json").split(";")[0].strip()
    if "protobuf" in kind or "cbor" in kind:
        raise KubeError(415, JSON_ONLY)
    if kind not in BODY_TYPES[request.method]:
        accepted = "accepted media types include: " + ", ".join(sorted(BODY_TYPES[request.method]))
        raise KubeError(
            415, f"the body of the request was in an unknown format ({kind}) - {accepted}"
        )
    raw = await request.body()
    try:
        return yaml.safe_load(raw) if kind == "application/yaml" else json.loads(raw or b"null")
    except (ValueError, yaml.YAMLError) as e:
        raise KubeError(400, f"the request body is not valid: {e}") from None


def number(text: str | None, default: float) -> float:
    try:
        return float(text) if text else default
    except ValueError:
        raise KubeError(400, f"not a number: {text!r}") from None


def json_response(body: Any, code: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=code)


def build_app(store: SecretStore) -> Starlette:
    def verb(request: Request) -> str:
        named = "name" in request.path_params
        watch = request.query_params.get("watch") in ("true", "1")
        return {
            "GET": "get" if named else "watch" if watch else "list",
            "POST": "create",
            "PUT": "update",
            "PATCH": "patch",
            "DELETE": "delete" if named else "deletecollection",
        }.get(request.method, request.method.lower())

    async def secrets(request: Request) -> Response:
        with store.lock:
            store.verbs.add(verb(request))
        try:
            if (code := store.fault_for(request.method)) is not None:
                raise KubeError(code, f"injected fault ({code}) from the Kubernetes stand-in")
            return await handle(request)
        except KubeError as e:
            return status_response(e)
        except Exception as e:  # a bug in the stand-in: still answer like an API server
            return status_response(KubeError(500, f"stand-in error: {e!r}"))

    async def stored(method: str, obj: dict) -> dict:
        """Run the test's on_write hook (in a thread: it may block) before the answer goes out."""
        hook = store.on_write
        if hook is not None:
            await asyncio.to_thread(hook, method, copy.deepcopy(obj))
        return obj

    async def handle(request: Request) -> Response:
        ns, name = request.path_params.get("ns"), request.path_params.get("name")
        q, method = request.query_params, request.method
        if method == "GET" and name:
            obj = store.get(ns, name)
            return json_response(table(request, [obj], {}) if wants_table(request) else obj)
        if method == "GET" and q.get("watch") in ("true", "1"):
            return watch(request, ns)
        if method == "GET":
            items, meta = store.list(
                ns,
                q.get("labelSelector", ""),
                q.get("fieldSelector", ""),
                int(number(q.get("limit"), 0)),
                q.get("continue", ""),
            )
            if wants_table(request):
                return json_response(table(request, items, meta))
            return json_response(
                {"kind": "SecretList", "apiVersion": "v1", "metadata": meta, "items": items}
            )
        if method == "POST":
            body = await read_body(request)
            if not isinstance(body, dict):
                raise KubeError(400, "the request body must be a Secret object")
            return json_response(await stored(method, store.create(ns, body)), 201)
        if method == "PUT":
            body = await read_body(request)
            if not isinstance(body, dict):
                raise KubeError(400, "the request body must be a Secret object")
            return json_response(await stored(method, store.update(ns, name, body)))
        if method == "PATCH":
            body = await read_body(request)
            kind = request.headers.get("content-type", "").split(";")[0].strip()
            if kind == "application/json-patch+json":
                updated = store.update(ns, name, patch=lambda cur: json_patch(cur, body))
                return json_response(await stored(method, updated))
            if not isinstance(body, dict):
                raise KubeError(400, "a merge patch must be a JSON object")
            updated = store.update(ns, name, patch=lambda cur: merge_patch(cur, body))
            return json_response(await stored(method, updated))
        if method == "DELETE" and name:
            options = await read_body(request) or {}
            gone = await stored(method, store.delete(ns, name, options.get("preconditions")))
            return json_response(
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "metadata": {},
                    "status": "Success",
                    "details": {"name": name, "kind": "secrets", "uid": gone["metadata"]["uid"]},
                }
            )
        if method == "DELETE":
            items, meta = store.list(ns, q.get("labelSelector", ""), q.get("fieldSelector", ""))
            for obj in items:
                try:
                    gone = store.delete(ns, obj["metadata"]["name"])
                except KubeError:
                    continue  # deleted meanwhile
                await stored(method, gone)
            return json_response(
                {"kind": "SecretList", "apiVersion": "v1", "metadata": meta, "items": items}
            )
        raise KubeError(405, f"the server does not allow this method ({method}) here")

    def watch(request: Request, ns: str | None) -> Response:
        q = request.query_params
        labels = parse_label_selector(q.get("labelSelector", ""))
        fields = parse_field_selector(q.get("fieldSelector", ""))
        rv_text, timeout = q.get("resourceVersion", ""), number(q.get("timeoutSeconds"), 1800)
        initial: list[tuple[str, dict]] = []
        if rv_text in ("", "0") or q.get("sendInitialEvents") == "true":
            # synthetic ADDED events for what exists, then (watch-list) a BOOKMARK marking the end
            items, meta = store.list(ns, q.get("labelSelector", ""), q.get("fieldSelector", ""))
            start = int(meta["resourceVersion"])
            initial = [("ADDED", obj) for obj in items]
            if q.get("sendInitialEvents") == "true":
                end = {"resourceVersion": str(start)}
                end["annotations"] = {"k8s.io/initial-events-end": "true"}
                initial.append(
                    ("BOOKMARK", {"kind": "Secret", "apiVersion": "v1", "metadata": end})
                )
        elif rv_text.isdigit():
            start = int(rv_text)
            store.events_since(start, ns, labels, fields)  # raises 410 when too old
        else:
            raise KubeError(400, f"invalid resourceVersion {rv_text!r}")

        def line(kind: str, obj: dict) -> str:
            if wants_table(request) and kind != "BOOKMARK":
                obj = table(request, [obj], {"resourceVersion": obj["metadata"]["resourceVersion"]})
            return json.dumps({"type": kind, "object": obj}) + "\n"

        async def stream():
            loop, event = asyncio.get_running_loop(), asyncio.Event()
            waiter, sent, deadline = (loop, event), start, loop.time() + timeout
            with store.lock:
                store.waiters.add(waiter)
            try:
                for kind, obj in initial:
                    yield line(kind, obj)
                while not store.closing:
                    event.clear()
                    try:
                        events = store.events_since(sent, ns, labels, fields)
                    except KubeError as e:
                        yield json.dumps({"type": "ERROR", "object": e.status()}) + "\n"
                        return
                    for _, kind, obj in events:
                        yield line(kind, obj)
                    sent = events[-1][0] if events else sent
                    try:
                        await asyncio.wait_for(event.wait(), max(0.0, deadline - loop.time()))
                    except TimeoutError:
                        return
            finally:
                with store.lock:
                    store.waiters.discard(waiter)

        return StreamingResponse(stream(), media_type="application/json")

    async def namespace(request: Request) -> Response:
        ns = request.path_params["ns"]
        if not DNS_SUBDOMAIN.fullmatch(ns):
            return status_response(
                KubeError(404, f'namespaces "{ns}" not found', name=ns, kind="namespaces")
            )
        return json_response(namespace_object(ns))

    async def namespaces(request: Request) -> Response:
        with store.lock:
            names = sorted({"default", *(ns for ns, _ in store.objects)})
        return json_response(
            {
                "kind": "NamespaceList",
                "apiVersion": "v1",
                "metadata": {"resourceVersion": str(store.rv)},
                "items": [namespace_object(n) for n in names],
            }
        )

    async def api(request: Request) -> Response:
        address = {"clientCIDR": "0.0.0.0/0", "serverAddress": request.url.netloc}
        body = {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [address]}
        return json_response(body)

    async def not_found_route(request: Request) -> Response:
        return status_response(KubeError(404, "the server could not find the requested resource"))

    async def ok(request: Request) -> Response:
        return PlainTextResponse("ok")

    def static(body: dict):
        async def endpoint(request: Request) -> Response:
            return json_response(body)

        return endpoint

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    routes = [
        Route("/version", static(VERSION)),
        Route("/api", api),
        Route("/api/v1", static(API_RESOURCES)),
        Route("/apis", static({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})),
        Route("/api/v1/secrets", secrets, methods=["GET"]),
        Route("/api/v1/namespaces", namespaces),
        Route("/api/v1/namespaces/{ns}", namespace),
        Route("/api/v1/namespaces/{ns}/secrets", secrets, methods=methods),
        Route("/api/v1/namespaces/{ns}/secrets/{name}", secrets, methods=methods),
        *(Route(path, ok) for path in ("/healthz", "/readyz", "/livez")),
        Route("/{path:path}", not_found_route, methods=methods),
    ]
    return Starlette(routes=routes)


def namespace_object(ns: str) -> dict:
    """Every namespace exists, always has, and is Active."""
    meta = {"name": ns, "uid": str(uuid.uuid5(uuid.NAMESPACE_DNS, ns)), "resourceVersion": "1"}
    meta["labels"] = {"kubernetes.io/metadata.name": ns}
    return {
        "kind": "Namespace",
        "apiVersion": "v1",
        "metadata": meta,
        "status": {"phase": "Active"},
    }


VERSION = {"major": "1", "minor": "37", "gitVersion": "v1.37.0", "platform": "linux/amd64"}
API_RESOURCES = {
    "kind": "APIResourceList",
    "apiVersion": "v1",
    "groupVersion": "v1",
    "resources": [
        {"name": "secrets", "namespaced": True, "kind": "Secret", "verbs": SECRET_VERBS},
        {
            "name": "namespaces",
            "namespaced": False,
            "kind": "Namespace",
            "verbs": ["get", "list"],
            "shortNames": ["ns"],
        },
    ],
}


class KubeStandin:
    """The stand-in served by uvicorn from a daemon thread, with hooks for tests."""

    def __init__(self) -> None:
        self.store = SecretStore()
        self.app = build_app(self.store)
        self._served: ServedApp | None = None

    def start(self, port: int | None = None) -> str:
        self.store.closing = False
        self._served = serve_in_thread(self.app, port=port)
        return self._served.url

    def stop(self) -> None:
        if self._served:
            with self.store.lock:
                self.store.closing = True  # let open watches end so the server can shut down
                self.store.notify()
            self._served.stop()
            self._served = None

    @property
    def url(self) -> str:
        if not self._served:
            raise RuntimeError("the Kubernetes stand-in is not running")
        return self._served.url

    def write_kubeconfig(self, path: str | Path, namespace: str = "default") -> Path:
        """A kubeconfig for kubectl and the Python client: this server, a dummy token."""
        path = Path(path)
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": "standin-token"}}],
            "contexts": [
                {
                    "name": "standin",
                    "context": {"cluster": "standin", "user": "standin", "namespace": namespace},
                }
            ],
            "current-context": "standin",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def secrets(self, namespace: str = "default") -> list[dict]:
        """A snapshot of the stored Secrets (JSON dicts, data base64), sorted by name."""
        with self.store.lock:
            return [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self.store.objects.items())
                if ns == namespace
            ]

    def inject_faults(self, count: int, status: int, methods: set[str] | None = None) -> None:
        """Answer the next `count` Secret requests (of these HTTP methods) with a `status` Status.

        The failing requests change nothing; faults queue up behind those already injected.
        """
        wanted = {m.upper() for m in methods} if methods else None
        with self.store.lock:
            self.store.faults.extend([(status, wanted)] * count)

    def on_write(self, callback: Callable[[str, dict], None] | None) -> None:
        """Call `callback(method, secret)` after each Secret write is stored, before the answer.

        `method` is the HTTP method (POST, PUT, PATCH, DELETE) and `secret` a copy of the stored
        (for DELETE: the deleted) object. It runs in a thread of its own, so it may block, e.g.
        to kill the client at exactly that moment. An exception from it is answered as a 500
        (a KubeError as its own status); the write stays stored either way. None removes it.
        """
        with self.store.lock:
            self.store.on_write = callback

    def compact(self) -> int:
        """Forget the history up to now, as etcd's compaction does: continue tokens and watches
        from before it are answered 410 Gone. Returns the resourceVersion compacted to."""
        with self.store.lock:
            self.store.compacted = self.store.rv
            return self.store.compacted

    def clear_faults(self) -> None:
        with self.store.lock:
            self.store.faults.clear()

    def pending_faults(self) -> int:
        """How many injected faults have not been answered yet."""
        with self.store.lock:
            return len(self.store.faults)

    def verbs_seen(self) -> set[str]:
        """RBAC verbs (get, list, watch, create, update, patch, delete...) asked for on secrets."""
        with self.store.lock:
            return set(self.store.verbs)

    def reset_verbs(self) -> None:
        with self.store.lock:
            self.store.verbs.clear()

    # --- a snapshot in a file, so that the local stack keeps its Secrets across restarts ----

    def save_snapshot(self, path: str | Path) -> None:
        """Write every Secret and the resourceVersion counter to `path` (atomically)."""
        path = Path(path)
        with self.store.lock:
            snapshot = {
                "resourceVersion": self.store.rv,
                "secrets": [copy.deepcopy(obj) for _, obj in sorted(self.store.objects.items())],
            }
        partial = path.with_name(path.name + ".partial")
        partial.unlink(missing_ok=True)
        partial.touch(mode=0o600)  # the Secrets hold keys: readable by this user only
        partial.write_text(json.dumps(snapshot))
        partial.replace(path)

    def load_snapshot(self, path: str | Path) -> int:
        """Replace the stored Secrets with those saved in `path`; returns how many there are.

        The watch history is not saved: start watches afresh after a restart.
        """
        snapshot = json.loads(Path(path).read_text())
        with self.store.lock:
            self.store.objects = {
                (obj["metadata"]["namespace"], obj["metadata"]["name"]): obj
                for obj in snapshot["secrets"]
            }
            self.store.born = {
                key: int(obj["metadata"]["resourceVersion"])
                for key, obj in self.store.objects.items()
            }
            self.store.keys = sorted(self.store.objects)
            self.store.rv = int(snapshot["resourceVersion"])
            self.store.history.clear()
            return len(self.store.objects)
