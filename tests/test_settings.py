"""Configuration: config.yaml plus environment; a bad value stops start-up naming the field."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

from settings import DEFAULT_CONFIG_FILE, ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """Write a variant of the shipped config.yaml and point CONFIG_FILE at it."""

    def write(**changes) -> Path:
        data = yaml.safe_load(DEFAULT_CONFIG_FILE.read_text())
        for dotted, value in changes.items():
            section, _, key = dotted.partition("__")
            if key:
                data[section][key] = value
            else:
                data[section] = value
        path = tmp_path / "config.yaml"
        path.write_text(yaml.safe_dump(data))
        monkeypatch.setenv("CONFIG_FILE", str(path))
        return path

    return write


def test_shipped_config_loads():
    settings = load_settings()
    assert "gpt-4o" in settings.model_ids
    assert settings.approval_queue_interval == timedelta(seconds=30)


def test_environment_overrides_the_file_with_the_seed_names(config_file, monkeypatch):
    config_file()
    monkeypatch.setenv("LITELLM_BASE_URL", "https://litellm.internal:4000/")
    monkeypatch.setenv("SMTP_PORT", "2525")
    monkeypatch.setenv("SMTP_USE_TLS", "false")
    monkeypatch.setenv("APPROVAL_QUEUE_INTERVAL", "5m")
    monkeypatch.setenv("KUBERNETES_NAMESPACE", "llm-keys")
    settings = load_settings()
    assert settings.litellm_base_url == "https://litellm.internal:4000"
    assert (settings.smtp_port, settings.smtp_use_tls) == (2525, False)
    assert settings.approval_queue_interval == timedelta(minutes=5)
    assert settings.namespace == "llm-keys"


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"litellm__key_duration": "5y"}, "litellm.key_duration (env LITELLM_KEY_DURATION)"),
        ({"smtp__port": 70000}, "smtp.port (env SMTP_PORT)"),
        ({"litellm__base_url": "litellm:4000"}, "litellm.base_url"),
        ({"litellm__colour": "blue"}, "litellm.colour"),
        ({"approval__default": "maybe"}, "approval.default"),
        ({"models": []}, "models"),
        # Below twice the worker's concurrent workflow tasks, in-flight requests get evicted.
        (
            {"worker__max_cached_workflows": 100},
            "worker.max_cached_workflows (env WORKER_MAX_CACHED_WORKFLOWS)",
        ),
    ],
)
def test_bad_values_name_the_field(config_file, changes, named):
    config_file(**changes)
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert named in str(error.value)


@pytest.mark.parametrize(
    ("rule", "says"),
    [
        ({"name": "everyone", "decision": "approve"}, "rule 'everyone' has no condition"),
        ({"name": "typo", "models": ["gpt-5o"], "decision": "approve"}, "names model 'gpt-5o'"),
        ({"name": "at", "email_domains": ["@example.com"], "decision": "deny"}, "rule 'at'"),
        ({"name": "odd", "email_domains": ["x.com"], "decision": "perhaps"}, "approval.rules[0]"),
    ],
)
def test_invalid_rules_fail_naming_the_rule(config_file, rule, says):
    config_file(approval__rules=[rule])
    with pytest.raises(ConfigError) as error:
        load_settings()
    assert says in str(error.value)


@pytest.mark.parametrize(
    ("email", "model", "decision"),
    [
        ("jane@example.com", "gpt-4o-mini", "approve"),  # domain and model match
        ("jane@example.com", "gpt-4o", "manual"),  # model does not: default
        ("jane@GMAIL.com", "gpt-4o", "deny"),  # domains compare case-insensitively
        ("jane@eu.corp.example.org", "gpt-4o", "approve"),  # wildcard subdomain
        ("jane@example.org", "gpt-4o", "manual"),  # wildcard needs a subdomain
    ],
)
def test_rules_match_by_domain_and_model_first_match_wins(config_file, email, model, decision):
    config_file(
        approval__rules=[
            {"name": "staff", "email_domains": ["example.com"], "models": ["gpt-4o-mini"],
             "decision": "approve"},
            {"name": "free-mail", "email_domains": ["gmail.com"], "decision": "deny",
             "reason": "company addresses only"},
            {"name": "subsidiaries", "email_domains": ["*.example.org"], "decision": "approve"},
        ]
    )  # fmt: skip
    assert load_settings().decide(email, model)[0] == decision


def test_missing_config_file_names_the_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("CONFIG_FILE", str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="CONFIG_FILE"):
        load_settings()


def test_worker_refuses_to_start_on_bad_config(config_file):
    path = config_file(approval__deadline="soon")
    done = subprocess.run(  # noqa: S603
        [sys.executable, "worker.py"],
        cwd=ROOT,
        env={"CONFIG_FILE": str(path), "PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "approval.deadline (env APPROVAL_DEADLINE)" in done.stderr
