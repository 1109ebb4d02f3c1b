"""How the service ships: the image, the Compose stack and the Kubernetes manifests.

Each test is a promise to whoever runs the files: the Role grants exactly what the code calls,
every environment variable is a setting the code reads, the images are pinned, the ports agree,
the shipped config loads. No Docker engine is needed: the files are parsed and checked against
the source. One check runs for real: a CA certificate mounted into the container is trusted by
the HTTP client the worker uses (docker/entrypoint.sh).
"""

from __future__ import annotations

import ast
import fnmatch
import json
import os
import re
import shlex
import ssl
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.metadata import distributions
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
import trustme
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from api.main import create_app
from devstack.http import free_port, serve_in_thread
from devstack.temporal import binary
from domain import SEARCH_ATTRIBUTES
from settings import ConfigError, Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
ENTRYPOINT = ROOT / "docker" / "entrypoint.sh"
# The processes the image runs; everything they import must be in it.
ENTRY_POINTS = ("worker.py", "api/main.py")
API_PORT = 8000

# Environment variables that are not settings.Settings fields but are read all the same.
NON_SETTING_VARIABLES = {
    "CONFIG_FILE",  # settings.py: where config.yaml is
    "KUBECONFIG",  # kubernetes client, outside a cluster
    "SSL_CERT_FILE",  # OpenSSL trust store (set by docker/entrypoint.sh)
    "REQUESTS_CA_BUNDLE",  # same, for requests
    "CERTS_DIR",  # docker/entrypoint.sh knobs
    "SYSTEM_CA_BUNDLE",
    "CA_BUNDLE_OUT",
}
SETTING_VARIABLES = {name.upper() for name in Settings.model_fields}

# What each process cannot run without, wherever it is deployed.
NEEDED = {
    "api": {
        "CONFIG_FILE",
        "TEMPORAL_ADDRESS",
        "TEMPORAL_NAMESPACE",
        "ADMIN_TOKEN",
        "REQUEST_ID_KEY",
    },
    "worker": {
        "CONFIG_FILE",
        "TEMPORAL_ADDRESS",
        "TEMPORAL_NAMESPACE",
        "LITELLM_BASE_URL",
        "LITELLM_API_KEY",
        "SMTP_HOST",
        "SMTP_PORT",
        "KUBERNETES_NAMESPACE",
    },
}


# ---- reading the files ---------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


# deploy/ files that are not manifests: kustomize's own, and the config file it turns into a
# ConfigMap.
NOT_MANIFESTS = {"kustomization.yaml", "config.yaml"}


def deploy_objects() -> list[dict]:
    objects = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name not in NOT_MANIFESTS:
            objects += load_yaml_documents(path)
    return objects


def kustomize() -> list[dict]:
    """deploy/ as `kubectl kustomize` renders it (kubectl comes with the dev dependencies)."""
    rendered = subprocess.run(  # noqa: S603
        [binary("kubectl"), "kustomize", str(DEPLOY)], capture_output=True, text=True, timeout=60
    )
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def deploy_object(kind: str, name: str) -> dict:
    found = [o for o in deploy_objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name} in deploy/, found {len(found)}"
    return found[0]


def deployment(component: str) -> dict:
    return deploy_object("Deployment", f"llm-key-requestor-{component}")


def only_container(deploy: dict) -> dict:
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def compose_environment(service: str) -> dict[str, str]:
    env = compose()["services"][service].get("environment") or {}
    assert isinstance(env, dict), f"compose {service}: write environment as a mapping"
    return {key: str(value) for key, value in env.items()}


def interpolate(value: str, variables: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:?message} and ${VAR:-default}, enough for these files."""

    def substitute(match: re.Match) -> str:
        name, op, rest = match.group(1), match.group(2), match.group(3)
        if name in variables:
            return variables[name]
        if op == ":-":
            return rest
        raise AssertionError(f"{name} is neither set nor defaulted")

    return re.sub(r"\$\{(\w+)(?:(:[?-])([^}]*))?\}", substitute, value).replace("$$", "$")


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        keyword, _, args = current.partition(" ")
        instructions.append((keyword.upper(), args.strip()))
        current = ""
    return instructions


def dockerfile_stages() -> list[dict]:
    """Each stage: its base image (ARG defaults resolved) and its instructions."""
    args: dict[str, str] = {}
    stages: list[dict] = []
    for keyword, rest in dockerfile_instructions():
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            words = rest.split()
            image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            stages.append({"image": image, "name": name, "instructions": []})
        else:
            stages[-1]["instructions"].append((keyword, rest))
    return stages


def runtime_stage() -> dict:
    return dockerfile_stages()[-1]


def exec_form(args: str) -> list[str]:
    value = json.loads(args)
    assert isinstance(value, list), f"use the exec (JSON) form, got {args!r}"
    return value


def uvicorn_port(command: list[str]) -> int:
    assert "uvicorn" in command[0] and "api.main:create_app" in command and "--factory" in command
    return int(command[command.index("--port") + 1])


# ---- the code's Kubernetes calls, read from the source ------------------------------------


def local_module(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def runtime_modules() -> set[Path]:
    """The project's own files the entry points import, transitively."""
    seen: set[Path] = set()
    todo = [ROOT / entry for entry in ENTRY_POINTS]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        package = ".".join(path.relative_to(ROOT).parent.parts)
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(p for p in [*parent, base] if p)
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            for name in names:
                # `import a.b.c` runs a/__init__.py and a/b/__init__.py too.
                parts = name.split(".") if name else []
                for end in range(1, len(parts) + 1):
                    if module := local_module(".".join(parts[:end])):
                        todo.append(module)
    return seen


KUBE_METHOD = re.compile(
    r"^(read|list|create|replace|patch|delete_collection|delete)_namespaced_([a-z_]+)$"
)
CLUSTER_WIDE_METHOD = re.compile(r"^(list|watch)_([a-z_]+)_for_all_namespaces$")
WATCH = re.compile(r"(^|_)watch(_|$)|^Watch$", re.IGNORECASE)
VERB = {
    "read": "get",
    "list": "list",
    "create": "create",
    "replace": "update",
    "patch": "patch",
    "delete": "delete",
    "delete_collection": "deletecollection",
}


def plural(resource: str) -> str:
    """CoreV1Api's `namespaced_config_map` -> `configmaps`; `secret` -> `secrets`."""
    return resource.replace("_", "") + "s"


def kubernetes_calls(paths: set[Path]) -> set[tuple[str, str]]:
    """(resource, verb) for every CoreV1Api method the code names, called or passed along."""
    calls: set[tuple[str, str]] = set()
    watches = False
    for path in paths:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Attribute):
                name = node.attr
            elif isinstance(node, ast.Name):
                name = node.id
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                name = node.value  # getattr(api, "read_namespaced_secret")
            elif isinstance(node, ast.keyword) and node.arg:
                name = node.arg  # list_namespaced_secret(..., watch=True)
            else:
                continue
            if match := KUBE_METHOD.match(name):
                resource, subresource = match.group(2), ""
                if resource.endswith("_status"):
                    resource, subresource = resource.removesuffix("_status"), "/status"
                calls.add((plural(resource) + subresource, VERB[match.group(1)]))
            elif match := CLUSTER_WIDE_METHOD.match(name):
                calls.add((plural(match.group(2)), "list in all namespaces (needs a ClusterRole)"))
            elif WATCH.search(name) and not isinstance(node, ast.Constant):
                watches = True
    if watches:
        calls |= {(resource, "watch") for resource, _ in calls} or {("secrets", "watch")}
    return calls


def role_grants(role: dict) -> set[tuple[str, str]]:
    return {
        (resource, verb)
        for rule in role["rules"]
        for resource in rule.get("resources", [])
        for verb in rule.get("verbs", [])
    }


# ---- RBAC ----------------------------------------------------------------------------------


def test_the_role_grants_exactly_the_kubernetes_calls_the_code_makes():
    modules = runtime_modules()
    assert ROOT / "activities" / "kubernetes.py" in modules, "import tracing lost the store"
    needed = kubernetes_calls(modules)
    assert ("secrets", "get") in needed, "found no Kubernetes call: is the AST scan still right?"
    granted = role_grants(deploy_object("Role", "llm-key-requestor-worker"))
    assert granted == needed, (
        f"deploy/rbac.yaml grants {sorted(granted - needed)} the code never uses and lacks "
        f"{sorted(needed - granted)} that it does"
    )


def test_the_role_is_namespaced_and_covers_only_secrets():
    objects = deploy_objects()
    kinds = {o["kind"] for o in objects}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}, "no cluster-wide rights"
    role = deploy_object("Role", "llm-key-requestor-worker")
    for rule in role["rules"]:
        assert rule["apiGroups"] == [""], "core API group only"
        assert rule["resources"] == ["secrets"]
        assert "*" not in rule["verbs"] and not rule.get("nonResourceURLs")
    # delete: one Secret at a time, a finished request's after lifecycle.retention; never more.
    assert not {"watch", "patch", "deletecollection"} & {v for _, v in role_grants(role)}

    binding = deploy_object("RoleBinding", "llm-key-requestor-worker")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "llm-key-requestor-worker",
    }
    worker_account = deployment("worker")["spec"]["template"]["spec"]["serviceAccountName"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": worker_account}]
    # Namespace-agnostic: `kubectl apply -k deploy/ -n NS` decides where everything goes.
    assert all("namespace" not in o["metadata"] for o in objects)


def test_the_api_runs_without_kubernetes_credentials():
    pod = deployment("api")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    account = deploy_object("ServiceAccount", pod["serviceAccountName"])
    assert account["automountServiceAccountToken"] is False
    bound = {
        s["name"] for o in deploy_objects() if o["kind"] == "RoleBinding" for s in o["subjects"]
    }
    assert pod["serviceAccountName"] not in bound
    worker_pod = deployment("worker")["spec"]["template"]["spec"]
    assert worker_pod["serviceAccountName"] != pod["serviceAccountName"]


# ---- the image -----------------------------------------------------------------------------


def test_the_image_runs_as_a_non_root_user():
    users = [rest for keyword, rest in runtime_stage()["instructions"] if keyword == "USER"]
    assert users, "the runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the runtime user must not be root"
    assert user.isdigit(), "a fixed numeric uid, which runAsNonRoot can verify"
    for component in ("api", "worker"):
        security = deployment(component)["spec"]["template"]["spec"]["securityContext"]
        assert security["runAsNonRoot"] is True
        assert str(security["runAsUser"]) == user, "deploy/ runs the image's own uid"


def test_the_image_builds_from_pinned_python_311_in_both_stages():
    stages = dockerfile_stages()
    assert len(stages) >= 2, "multi-stage: a builder with uv, a runtime without it"
    images = {stage["image"] for stage in stages}
    # The virtualenv is copied between stages: its interpreter must be the same one.
    assert len(images) == 1, f"builder and runtime must use one Python image, got {images}"
    (image,) = images
    assert_pinned(image)
    assert image.startswith("python:3.11"), "the project targets Python 3.11"
    builder = "\n".join(rest for _, rest in stages[0]["instructions"])
    assert "uv sync --no-dev" in builder and "uv.lock" not in builder


def test_every_dependency_is_pinned_and_installed_at_its_pin():
    """uv.lock is not committed; pyproject.toml's constraints pin the whole tree instead."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    pins: dict[str, str] = {}
    for text in pyproject["tool"]["uv"].get("constraint-dependencies", []):
        requirement = Requirement(text)
        if requirement.marker is None or requirement.marker.evaluate():
            pins[canonicalize_name(requirement.name)] = str(requirement.specifier)
    rerun = "run scripts/pin-dependencies.sh (README, Dependencies)"
    direct = pyproject["project"]["dependencies"] + pyproject["dependency-groups"]["dev"]
    for text in direct:
        requirement = Requirement(text)
        name = canonicalize_name(requirement.name)
        assert pins.get(name) == str(requirement.specifier), f"{text} is not in the pins: {rerun}"
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in distributions()}
    unpinned = sorted(
        f"{name} {version}" for name, version in installed.items() if name not in pins
    )
    assert not unpinned, f"installed but not pinned: {unpinned}; {rerun}"
    other = sorted(
        f"{name} {version} (pinned {pins[name]})"
        for name, version in installed.items()
        if pins[name] != f"=={version}"
    )
    assert not other, f"installed at another version than pinned: {other}; run uv sync"


def test_ci_and_the_image_install_with_the_same_uv_and_the_pins():
    (uv_version,) = [
        rest.partition("=")[2]
        for keyword, rest in dockerfile_stages()[0]["instructions"]
        if keyword == "ARG" and rest.startswith("UV_VERSION=")
    ]
    ci = (ROOT / ".ci" / "run").read_text()
    assert f'"uv=={uv_version}"' in ci
    assert "scripts/pin-dependencies.sh --check" in ci
    assert ci.index("uv sync") < ci.index("uv run pytest")


def test_everything_the_processes_import_is_copied_into_the_image():
    copied = set()
    for keyword, rest in runtime_stage()["instructions"]:
        if keyword == "COPY" and "--from" not in rest:
            *sources, _destination = [w for w in shlex.split(rest) if not w.startswith("--")]
            copied |= {s.rstrip("/") for s in sources}
    missing = []
    for module in sorted(runtime_modules()):
        relative = module.relative_to(ROOT).as_posix()
        if not any(relative == c or relative.startswith(c + "/") for c in copied):
            missing.append(relative)
    assert not missing, f"the Dockerfile does not copy {missing}"
    assert {"config.yaml", "docker/entrypoint.sh"} <= copied


def dockerignore_excludes(path: str) -> bool:
    """Docker's rule, enough for an allow-list: the last matching pattern wins, a pattern that
    matches a directory covers its content, and `**/` matches at any depth."""
    parts = path.split("/")
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    windows = [
        "/".join(parts[i:j]) for i in range(len(parts)) for j in range(i + 1, len(parts) + 1)
    ]
    excluded = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            matched = any(fnmatch.fnmatchcase(w, pattern[3:]) for w in windows)
        else:
            matched = any(fnmatch.fnmatchcase(p, pattern) for p in prefixes)
        if matched:
            excluded = not negate
    return excluded


def test_the_build_context_holds_what_the_image_copies_and_no_secrets():
    for keyword, rest in runtime_stage()["instructions"] + dockerfile_stages()[0]["instructions"]:
        if keyword == "COPY" and "--from" not in rest:
            *sources, _ = [w for w in shlex.split(rest) if not w.startswith("--")]
            for source in sources:
                probe = source.rstrip("/") + ("/x.py" if source.endswith("/") else "")
                assert not dockerignore_excludes(probe), f".dockerignore hides {source}"
    for private in (".env", ".git/config", "uv.lock", "tests/test_api.py", "api/__pycache__/a.pyc"):
        assert dockerignore_excludes(private), f".dockerignore lets {private} into the context"


def test_the_api_port_agrees_everywhere():
    instructions = runtime_stage()["instructions"]
    exposed = {rest.split("/")[0] for keyword, rest in instructions if keyword == "EXPOSE"}
    assert exposed == {str(API_PORT)}
    (cmd,) = [exec_form(rest) for keyword, rest in instructions if keyword == "CMD"]
    assert uvicorn_port(cmd) == API_PORT, "the default command serves the API"
    (healthcheck,) = [rest for keyword, rest in instructions if keyword == "HEALTHCHECK"]
    assert f"127.0.0.1:{API_PORT}/health'" in healthcheck

    ports = compose()["services"]["api"]["ports"]
    assert [str(p).rsplit(":", 1)[-1] for p in ports] == [str(API_PORT)]

    api = deployment("api")
    container = only_container(api)
    assert uvicorn_port(container["args"]) == API_PORT
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named["http"] == API_PORT
    service = deploy_object("Service", "llm-key-requestor-api")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()


def test_the_entrypoint_adds_certificates_then_runs_the_command():
    instructions = runtime_stage()["instructions"]
    (entrypoint,) = [exec_form(rest) for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    assert entrypoint == ["/app/docker/entrypoint.sh"]
    script = ENTRYPOINT.read_text()
    assert script.startswith("#!/bin/sh\n") and "\nset -eu\n" in script
    assert script.rstrip().endswith('exec "$@"'), "the command must become PID 1 (signals)"


# ---- Compose -------------------------------------------------------------------------------


def assert_pinned(image: str) -> None:
    name, _, digest = image.partition("@")
    repository, _, tag = name.rpartition(":")
    assert digest or (repository and "/" not in tag), f"{image}: no tag"
    assert tag != "latest", f"{image}: `latest` is not a version"


def test_every_image_is_pinned():
    images = [service["image"] for service in compose()["services"].values()]
    images += [c["image"] for d in ("api", "worker") for c in [only_container(deployment(d))]]
    images += [stage["image"] for stage in dockerfile_stages()]
    assert len(images) >= 10
    for image in images:
        assert_pinned(image)


def test_compose_runs_the_whole_stack():
    services = compose()["services"]
    required = {"temporal", "temporal-ui", "postgres", "api", "worker", "mailpit", "litellm", "k3s"}
    assert required <= services.keys()
    for name in ("api", "worker"):
        assert services[name]["build"] == ".", f"{name} is built from this repository"
    assert services["k3s"]["privileged"] is True
    assert "--tls-san=k3s" in services["k3s"]["command"]


def test_compose_waits_only_on_what_can_report_ready():
    services = compose()["services"]
    image_has_healthcheck = any(k == "HEALTHCHECK" for k, _ in runtime_stage()["instructions"])
    for name, service in services.items():
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):  # the short form: just started
            depends_on = {target: {"condition": "service_started"} for target in depends_on}
        for target, rule in depends_on.items():
            assert target in services, f"{name} depends on unknown service {target}"
            if rule["condition"] == "service_healthy":
                check = services[target].get("healthcheck")
                built = services[target].get("build") == "."
                assert (check and not check.get("disable")) or (built and image_has_healthcheck), (
                    f"{name} waits for {target} to be healthy, but {target} has no health check"
                )
    # The image's check probes the API port; the worker's probes its own health endpoint.
    port = compose_environment("worker")["WORKER_HEALTH_PORT"]
    assert f"127.0.0.1:{port}/health/ready'" in " ".join(services["worker"]["healthcheck"]["test"])


def test_every_service_restarts_and_every_image_is_an_exact_version():
    for name, service in compose()["services"].items():
        policy = service.get("restart")
        if name == "temporal-admin-tools":  # a one-shot job: retried until it succeeds
            assert policy == "on-failure"
        else:
            assert policy in ("unless-stopped", "always"), f"{name}: restart policy {policy!r}"
        if "build" in service:
            continue  # built from this repository
        image = service["image"]
        assert_pinned(image)
        tag = image.partition("@")[0].rpartition(":")[2]
        # A version has digits; `stable`, `main`, `lts` move under your feet.
        assert "@sha256:" in image or re.search(r"\d+\.\d+", tag), f"{name}: {image}"


def test_the_compose_stack_runs_as_local():
    for component in ("api", "worker"):
        assert compose_environment(component)["ENVIRONMENT"] == "local"
    assert deploy_environment("api")["ENVIRONMENT"] == "production"


def test_compose_creates_the_search_attributes_before_the_app_starts():
    services = compose()["services"]
    script = "\n".join(services["temporal-admin-tools"]["command"])
    for attribute in SEARCH_ATTRIBUTES:
        assert attribute.name in script
    assert "--type Keyword" in script
    for name in ("api", "worker"):
        rule = services[name]["depends_on"]["temporal-admin-tools"]
        assert rule == {"condition": "service_completed_successfully"}


def test_the_apps_point_at_the_stacks_services():
    services = compose()["services"]
    worker = compose_environment("worker")
    for variable, service in (
        ("TEMPORAL_ADDRESS", "temporal"),
        ("LITELLM_BASE_URL", "litellm"),
        ("SMTP_HOST", "mailpit"),
    ):
        value = worker[variable]
        host = urlsplit(value).hostname if "://" in value else value.split(":")[0]
        assert host == service and service in services, f"{variable}={value}"
    # The worker reaches k3s by name: the kubeconfig's 127.0.0.1 is rewritten to k3s.
    volumes = services["worker"]["volumes"]
    assert any(str(v).startswith("kubeconfig:") for v in volumes)
    assert "https://k3s:" in " ".join(services["worker"]["command"])
    assert f"> {worker['KUBECONFIG']}" in " ".join(services["worker"]["command"])
    assert compose_environment("api")["TEMPORAL_ADDRESS"] == worker["TEMPORAL_ADDRESS"]


# ---- environment variables -----------------------------------------------------------------


def deploy_environment(component: str) -> dict[str, str]:
    """What the container's environment holds: env, the ConfigMaps in envFrom, Secret keys."""
    container = only_container(deployment(component))
    secret = deploy_object("Secret", "llm-key-requestor-credentials")["stringData"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert "configMapRef" in source, "credentials are picked per key, not with envFrom"
        env |= deploy_object("ConfigMap", source["configMapRef"]["name"])["data"]
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "secretKeyRef" in item["valueFrom"]:
            ref = item["valueFrom"]["secretKeyRef"]
            assert ref["name"] == "llm-key-requestor-credentials"
            assert ref["key"] in secret, f"{ref['key']} is missing from secret.example.yaml"
            env[item["name"]] = secret[ref["key"]]
        else:
            env[item["name"]] = "from-the-downward-api"
    return env


@pytest.mark.parametrize("component", ["api", "worker"])
def test_every_variable_is_a_real_setting(component):
    allowed = SETTING_VARIABLES | NON_SETTING_VARIABLES
    for where, names in (
        ("docker-compose.yml", compose_environment(component)),
        ("deploy/", deploy_environment(component)),
    ):
        unknown = sorted(set(names) - allowed)
        assert not unknown, f"{where} {component}: {unknown} are read by nothing"
    secret = deploy_object("Secret", "llm-key-requestor-credentials")["stringData"]
    assert not set(secret) - SETTING_VARIABLES


@pytest.mark.parametrize("component", ["api", "worker"])
def test_each_process_gets_the_settings_it_needs(component, tmp_path, monkeypatch):
    """Set, and valid: the settings load from exactly the environment each place gives."""
    (tmp_path / "config.yaml").write_text((DEPLOY / "config.yaml").read_text())
    compose_env = {
        name: interpolate(value, {v: "placeholder" for v in re.findall(r"\$\{(\w+)", value)})
        for name, value in compose_environment(component).items()
    }
    for where, env, config in (
        ("docker-compose.yml", compose_env, ROOT / "config.yaml"),  # mounted from the checkout
        ("deploy/", deploy_environment(component), tmp_path / "config.yaml"),
    ):
        missing = sorted(NEEDED[component] - env.keys())
        assert not missing, f"{where} {component} lacks {missing}"
        with monkeypatch.context() as patch:
            for name in SETTING_VARIABLES:
                patch.delenv(name, raising=False)
            for name, value in env.items():
                patch.setenv(name, value)
            patch.setenv("CONFIG_FILE", str(config))
            settings = load_settings()
        assert settings.temporal_address == env["TEMPORAL_ADDRESS"]


def test_the_shipped_configmap_config_yaml_loads(tmp_path, monkeypatch):
    (configmap,) = [
        o
        for o in kustomize()
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("llm-key-requestor-config")
    ]
    (tmp_path / "config.yaml").write_text(configmap["data"]["config.yaml"])
    for name in SETTING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CONFIG_FILE", str(tmp_path / "config.yaml"))
    settings = load_settings()
    assert settings.model_ids
    # Mounted where CONFIG_FILE points.
    for component in ("api", "worker"):
        env = deploy_environment(component)
        mounts = only_container(deployment(component))["volumeMounts"]
        config_dir = next(m["mountPath"] for m in mounts if m["name"] == "config")
        assert env["CONFIG_FILE"] == f"{config_dir}/config.yaml"


# ---- Kubernetes manifests ------------------------------------------------------------------


def test_the_deployments_are_locked_down_and_sized():
    api, worker = deployment("api"), deployment("worker")
    assert api["spec"]["replicas"] == 2 and worker["spec"]["replicas"] >= 1
    for deploy in (api, worker):
        pod = deploy["spec"]["template"]["spec"]
        container = only_container(deploy)
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True
        assert security["allowPrivilegeEscalation"] is False
        assert security["capabilities"]["drop"] == ["ALL"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        tmp = next(m for m in container["volumeMounts"] if m["mountPath"] == "/tmp")  # noqa: S108
        assert "emptyDir" in volumes[tmp["name"]], "the CA bundle needs a writable emptyDir there"
        certs = next(m for m in container["volumeMounts"] if m["mountPath"] == "/certs")
        assert volumes[certs["name"]]["configMap"]["optional"] is True
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= container["resources"][kind].keys()


def test_the_secret_template_is_placeholders_and_never_applied():
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    manifests = {p.name for p in DEPLOY.glob("*.yaml")} - NOT_MANIFESTS
    assert set(kustomization["resources"]) == manifests - {"secret.example.yaml"}
    secret = deploy_object("Secret", "llm-key-requestor-credentials")["stringData"]
    assert {"LITELLM_API_KEY", "SMTP_PASSWORD", "ADMIN_TOKEN", "TEMPORAL_API_KEY"} <= secret.keys()
    for key, value in secret.items():
        assert value == "" or "CHANGE-ME" in value, f"{key} is not a placeholder"


def test_kustomize_renders_the_manifests():
    rendered = kustomize()
    kinds = sorted(doc["kind"] for doc in rendered)
    generated = ["ConfigMap"]  # llm-key-requestor-config, from config.yaml
    applied = [o["kind"] for o in deploy_objects() if o["kind"] != "Secret"]
    assert kinds == sorted(applied + generated)


def test_the_config_map_is_generated_from_config_yaml_and_cannot_drift():
    assert (DEPLOY / "config.yaml").read_text() == (ROOT / "config.yaml").read_text(), (
        "deploy/config.yaml must be a copy of config.yaml: cp config.yaml deploy/config.yaml"
    )
    rendered = kustomize()
    (configmap,) = [
        o
        for o in rendered
        if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("llm-key-requestor-config")
    ]
    assert configmap["data"] == {"config.yaml": (ROOT / "config.yaml").read_text()}
    # The hashed name reaches the pods, so a changed config.yaml rolls them.
    name = configmap["metadata"]["name"]
    assert name != "llm-key-requestor-config"
    for deploy in (o for o in rendered if o["kind"] == "Deployment"):
        volumes = {v["name"]: v for v in deploy["spec"]["template"]["spec"]["volumes"]}
        assert volumes["config"]["configMap"]["name"] == name


def test_no_service_links_reach_the_pods(monkeypatch):
    """A Service named `smtp` would set SMTP_PORT=tcp://...; the settings rightly refuse it."""
    for name in SETTING_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SMTP_PORT", "tcp://10.0.0.7:25")
    with pytest.raises(ConfigError, match="SMTP_PORT"):
        load_settings()
    for component in ("api", "worker"):
        pod = deployment(component)["spec"]["template"]["spec"]
        assert pod.get("enableServiceLinks") is False, f"{component}: enableServiceLinks: false"


def test_api_readiness_does_not_depend_on_temporal(monkeypatch):
    """Every replica stays in the Service during a Temporal outage, answering the JSON 503."""
    container = only_container(deployment("api"))
    paths = {container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    assert paths == {"/health"}
    # The probed endpoint answers with no Temporal at all; /health/ready tells monitoring.
    monkeypatch.setenv("ENVIRONMENT", "local")
    nothing_there = f"127.0.0.1:{free_port()}"
    served = serve_in_thread(
        create_app(load_settings(temporal_address=nothing_there)), lifespan="on"
    )
    try:
        assert httpx.get(f"{served.url}/health", timeout=10).status_code == 200
        assert httpx.get(f"{served.url}/health/ready", timeout=10).status_code == 503
    finally:
        served.stop()


def test_the_worker_is_probed_on_its_health_port():
    worker = deployment("worker")
    container = only_container(worker)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert str(ports["health"]) == deploy_environment("worker")["WORKER_HEALTH_PORT"]
    expected = {"startupProbe": "/health", "livenessProbe": "/health"}
    expected["readinessProbe"] = "/health/ready"
    for probe, path in expected.items():
        assert container[probe]["httpGet"] == {"path": path, "port": "health"}, probe
    # The readiness check gives Temporal 3 s (worker_health.py); the probe waits longer.
    assert container["readinessProbe"]["timeoutSeconds"] > 3


def test_a_disruption_budget_keeps_the_api_serving():
    (budget,) = [o for o in deploy_objects() if o["kind"] == "PodDisruptionBudget"]
    api = deployment("api")
    labels = api["spec"]["template"]["metadata"]["labels"]
    assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    replicas = api["spec"]["replicas"]
    if "maxUnavailable" in budget["spec"]:
        assert 0 < budget["spec"]["maxUnavailable"] < replicas
    else:
        assert 0 < budget["spec"]["minAvailable"] < replicas, "a drain must stay possible"


def test_every_reference_to_deploy_readme_leads_somewhere():
    readme = DEPLOY / "README.md"
    headings = set(re.findall(r"^#+ (.+)$", readme.read_text(), re.M))
    referring = []
    for path in [ROOT / "README.md", COMPOSE, DOCKERFILE, *DEPLOY.glob("*.yaml")]:
        text = path.read_text()
        if "deploy/README.md" in text:
            referring.append(path.name)
        for section in re.findall(r'deploy/README\.md, "([^"]+)"', text):
            assert section in headings, f'{path.name} points to a missing section "{section}"'
    assert len(referring) >= 4
    # What a deployer looks for there.
    for topic in ("Secrets", "Probes", "Configuration", "Custom CA certificates", "Service links"):
        assert topic in headings, topic


def test_the_readme_gives_the_search_attribute_commands():
    readme = (ROOT / "README.md").read_text()
    for attribute in SEARCH_ATTRIBUTES:
        assert f"temporal operator search-attribute create --name {attribute.name}" in readme
        assert attribute.name in readme.split("tcld", 1)[1]


# ---- a mounted CA is really trusted --------------------------------------------------------


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello over company TLS"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def company_tls() -> Iterator[tuple[str, trustme.CA]]:
    """An HTTPS server on loopback whose certificate only a throwaway CA vouches for."""
    ca = trustme.CA(organization_name="Example Corp Test CA")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{server.server_address[1]}/", ca
    server.shutdown()
    server.server_close()


# What the worker does: httpx with connection.tls_context(), as for LiteLLM.
CLIENT = """
import sys, httpx, connection
print(httpx.get(sys.argv[1], verify=connection.tls_context(), timeout=10).text)
"""


def run_in_container(
    certs: Path, url: str, bundle: Path, **knobs: str
) -> subprocess.CompletedProcess:
    """`sh docker/entrypoint.sh python -c CLIENT url`, as the container would start."""
    trust = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE")
    env = {k: v for k, v in os.environ.items() if k not in trust}
    env |= {"CERTS_DIR": str(certs), "CA_BUNDLE_OUT": str(bundle), **knobs}
    return subprocess.run(
        ["sh", str(ENTRYPOINT), sys.executable, "-c", CLIENT, url],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_mounted_crt_is_trusted_and_without_it_tls_fails(company_tls, tmp_path):
    url, ca = company_tls
    certs = tmp_path / "certs"
    certs.mkdir()
    refused = run_in_container(certs, url, tmp_path / "bundle.pem")
    assert refused.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr

    ca.cert_pem.write_to_path(str(certs / "company-ca.crt"))
    trusted = run_in_container(certs, url, tmp_path / "bundle.pem")
    assert trusted.returncode == 0, trusted.stderr
    assert trusted.stdout.strip() == "hello over company TLS"
    assert f"trusting {certs / 'company-ca.crt'} (1 certificate(s))" in trusted.stderr


def test_a_mounted_pem_is_trusted_without_its_private_key(company_tls, tmp_path):
    url, ca = company_tls
    certs = tmp_path / "certs"
    certs.mkdir()
    # A .pem as people export it: certificate and key in one file, no final newline.
    key = ca.issue_cert("unrelated.example").private_key_pem.bytes()
    (certs / "company-ca.pem").write_bytes(ca.cert_pem.bytes() + key.rstrip(b"\n"))
    # Stand-in for the system roots, to see them kept in the bundle.
    public_root = trustme.CA(organization_name="Public Root Stand-in").cert_pem
    public_root.write_to_path(str(tmp_path / "system.crt"))
    bundle = tmp_path / "bundle.pem"
    trusted = run_in_container(certs, url, bundle, SYSTEM_CA_BUNDLE=str(tmp_path / "system.crt"))
    assert trusted.returncode == 0, trusted.stderr
    assert f"trusting {certs / 'company-ca.pem'} (1 certificate(s))" in trusted.stderr
    text = bundle.read_text()
    assert text.startswith(public_root.bytes().decode()), "the system roots stay trusted"
    assert ca.cert_pem.bytes().decode() in text
    assert "PRIVATE KEY" not in text


def test_other_files_in_the_certs_directory_are_ignored(company_tls, tmp_path):
    url, ca = company_tls
    certs = tmp_path / "certs"
    certs.mkdir()
    ca.cert_pem.write_to_path(str(certs / "README.txt"))
    refused = run_in_container(certs, url, tmp_path / "bundle.pem")
    assert refused.returncode != 0 and "CERTIFICATE_VERIFY_FAILED" in refused.stderr
    assert "README.txt" not in refused.stderr
