"""Configuration: one pydantic-settings class fed by config.yaml, overridden by the environment.

config.yaml is nested for people (`litellm.base_url`); the settings are flat so that every
scalar has exactly one environment variable, the section and key joined (`LITELLM_BASE_URL`,
`SMTP_HOST`, ...), which keeps the seed's variable names. Environment beats the file.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

DEFAULT_CONFIG_FILE = Path(__file__).with_name("config.yaml")
# Sections of config.yaml whose keys become `<section>_<key>` settings.
_FLATTENED_SECTIONS = (
    "litellm", "approval", "smtp", "kubernetes", "temporal", "api", "lifecycle", "auth",
    "worker",
)  # fmt: skip

_DURATION = re.compile(r"^\s*(\d+)\s*([smhd])\s*$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class ConfigError(Exception):
    """The configuration cannot be used; the message names every offending field."""


def parse_duration(value: Any) -> timedelta | None:
    """'30s', '5m', '2h', '7d', or a number of seconds; '' or null means 'none'."""
    if value is None or value == "":
        return None
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return timedelta(seconds=value)
    match = _DURATION.match(str(value))
    if not match:
        raise ValueError(
            f"{value!r} is not a duration; use a number with a unit s, m, h or d, e.g. 30s or 7d"
        )
    return timedelta(seconds=int(match.group(1)) * _UNIT_SECONDS[match.group(2)])


def _positive(value: timedelta | None) -> timedelta | None:
    if value is not None and value.total_seconds() <= 0:
        raise ValueError("must be longer than 0s")
    return value


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]
OptionalDuration = Annotated[timedelta | None, BeforeValidator(parse_duration)]


def _empty_to_none(value: Any) -> Any:
    return None if value == "" else value


class Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/@-]*$")
    name: str = Field(min_length=1)
    description: str = ""


Decision = Literal["approve", "deny", "manual"]


class ApprovalRule(BaseModel):
    """First matching rule decides. A rule must name at least one condition."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    models: tuple[str, ...] = ()
    email_domains: tuple[str, ...] = ()
    decision: Decision
    reason: str = ""
    # What a renewal of a key granted by this rule needs; unset: the same as `decision`.
    renewals: Decision | None = None
    # Who may decide a request this rule leaves to a person: emails and/or group names.
    # Empty: approval.approvers.
    approvers: tuple[str, ...] = ()
    # Distinct approvals a request needs; one denial denies. Unset: approval.approvals.
    approvals: int | None = Field(default=None, ge=1, le=20)
    # Who is emailed when a request waits (groups cannot be emailed): the approvers that are
    # email addresses, plus these. Unset: approval.notify.
    notify: tuple[str, ...] = ()
    # Told when the request still waits after approval.escalate_after. Unset:
    # approval.escalate_to.
    escalate_to: tuple[str, ...] = ()
    # A Slack-compatible incoming webhook that gets the same messages. Unset: approval.webhook.
    webhook: str = ""

    @model_validator(mode="after")
    def _check(self) -> ApprovalRule:
        where = f"rule {self.name!r}"
        _check_addresses(self.notify, f"{where} notify: ")
        _check_addresses(self.escalate_to, f"{where} escalate_to: ")
        _check_webhook(self.webhook, f"{where} webhook: ")
        if not self.models and not self.email_domains:
            raise ValueError(
                f"rule {self.name!r} has no condition; give it `models` or `email_domains` "
                "(use approval.default for a catch-all)"
            )
        for pattern in self.email_domains:
            if "@" in pattern or not re.fullmatch(r"(\*\.)?[A-Za-z0-9.-]+|\*", pattern):
                raise ValueError(
                    f"rule {self.name!r}: email domain {pattern!r} must look like "
                    "'example.com' or '*.example.com'"
                )
        return self

    def matches(self, email: str, model: str) -> bool:
        domain = email.rpartition("@")[2].lower()
        if self.models and not any(fnmatch.fnmatchcase(model, m) for m in self.models):
            return False
        if self.email_domains and not any(
            _domain_matches(domain, pattern.lower()) for pattern in self.email_domains
        ):
            return False
        return True


_ADDRESS = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


def _check_addresses(addresses: tuple[str, ...], where: str) -> None:
    for address in addresses:
        if not _ADDRESS.match(address):
            raise ValueError(f"{where}{address!r} is not an email address, e.g. a@example.com")


def _check_webhook(url: str, where: str) -> None:
    if url and not re.match(r"^https?://[^/\s]+", url):
        raise ValueError(f"{where}{url!r} is not an http(s) URL, e.g. https://hooks.example.com/T0")


def _domain_matches(domain: str, pattern: str) -> bool:
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return domain.endswith(pattern[1:])
    return domain == pattern


BUILT_IN_REQUEST_ID_KEY = "llm-key-requestor"  # noqa: S105 - public by design; refused in production
# Placeholders that the shipped examples use; a secret still containing one was never set.
_PLACEHOLDERS = ("change-me", "changeme", "changethis")
_MIN_SECRET_LENGTH = 16
_URL_EXAMPLES = {
    "litellm_base_url": "http://litellm:4000",
    "api_public_url": "https://keys.example.com",
}
_MAKE_ONE = 'python -c "import secrets; print(secrets.token_urlsafe(32))"'
_SECRET_HINTS = {
    "request_id_key": f"set it once to a long random value and keep it, e.g. {_MAKE_ONE}",
    "admin_token": f"set it to a long random value, e.g. {_MAKE_ONE}",
    "litellm_api_key": "set it to the LiteLLM proxy's master key (sk-...)",
}


class Settings(BaseSettings):
    """Every setting of the API and the worker. Field `a_b` is config.yaml `a.b` and env `A_B`."""

    model_config = SettingsConfigDict(extra="forbid", case_sensitive=False)

    models: tuple[Model, ...] = Field(min_length=1)

    litellm_base_url: str = "http://localhost:4000"
    litellm_api_key: SecretStr = SecretStr("")
    litellm_public_url: str = ""
    litellm_key_duration: OptionalDuration = timedelta(days=30)
    litellm_max_budget: Annotated[float | None, BeforeValidator(_empty_to_none)] = Field(
        default=None, ge=0
    )
    litellm_budget_duration: OptionalDuration = None
    litellm_timeout: Duration = timedelta(seconds=30)
    litellm_metadata: dict[str, str] = Field(default_factory=dict)

    approval_default: Decision = "manual"
    approval_default_reason: str = "Your request was not approved."
    approval_deadline: Duration = timedelta(days=7)
    approval_rules: tuple[ApprovalRule, ...] = ()
    # Approvers of requests whose rule names none (emails and/or group names).
    approval_approvers: tuple[str, ...] = ()
    # Approver notifications (README: "Approvers are told"): the defaults of the rules' own
    # `approvals`, `notify`, `escalate_to` and `webhook`, and the timers of a waiting request.
    approval_approvals: int = Field(default=1, ge=1, le=20)
    approval_notify: tuple[str, ...] = ()
    approval_escalate_to: tuple[str, ...] = ()
    approval_webhook: str = ""
    # The requester is told, when their request starts waiting, who will decide it.
    approval_acknowledge: bool = True
    approval_remind_after: OptionalDuration = timedelta(days=2)
    approval_escalate_after: OptionalDuration = timedelta(days=4)

    smtp_host: str = "localhost"
    smtp_port: int = Field(default=587, ge=1, le=65535)
    smtp_user: str = ""
    smtp_password: SecretStr = SecretStr("")
    smtp_from: str = "noreply@example.com"
    smtp_use_tls: bool = True
    smtp_ca_file: str = ""
    smtp_timeout: Duration = timedelta(seconds=30)

    kubernetes_namespace: str = ""

    temporal_address: str = "localhost:7233"
    temporal_namespace: str = "default"
    temporal_task_queue: str = "llm-key-requests"
    temporal_tls: bool = False
    temporal_tls_ca_file: str = ""
    temporal_tls_cert_file: str = ""
    temporal_tls_key_file: str = ""
    temporal_api_key: SecretStr = SecretStr("")

    approval_queue_interval: Duration = timedelta(seconds=30)

    # The worker's health endpoint for probes (worker_health.py); 0 = none.
    worker_health_port: int = Field(default=0, ge=0, le=65535)
    # Workflows the worker keeps in memory between their tasks (the SDK's sticky cache); the
    # rest are rebuilt from their history when a timer, signal or query reaches them. At least
    # twice the SDK's 100 concurrent workflow tasks: a cache that in-flight requests fill evicts
    # workflows while their email is being sent, and the email goes out again (BENCHMARKS.md).
    worker_max_cached_workflows: int = Field(default=250, ge=200)

    # Browser origins allowed to call the API from another origin; none by default.
    api_cors_origins: Annotated[tuple[str, ...], NoDecode] = ()
    api_max_body_bytes: int = Field(default=16384, ge=1024)
    # How long POST /api/request-key waits for the policy's decision before answering.
    api_decision_wait: Duration = timedelta(milliseconds=500)
    # Where people reach the web pages: the base of the inbox link in approvers' emails.
    api_public_url: str = "http://localhost:8000"

    # A submission this soon after a denial is refused (429) instead of starting over.
    approval_resubmit_after: Duration = timedelta(hours=24)

    # A key's life after the first email: reminders this long before expiry, how long a
    # rotated-out key keeps working, how long a finished request's Secret is kept.
    lifecycle_remind_before: Annotated[tuple[Duration, ...], NoDecode] = (
        timedelta(days=7),
        timedelta(days=1),
    )
    lifecycle_rotation_grace: Duration = timedelta(hours=24)
    lifecycle_retention: Duration = timedelta(days=30)

    admin_token: SecretStr = SecretStr("")

    # Sign-on (api/auth.py). OIDC is on when an issuer is set; proxy headers when proxies are.
    auth_oidc_issuer: str = ""
    auth_oidc_audience: str = ""  # bearer tokens' `aud`; default: the client id
    auth_oidc_jwks_url: str = ""  # default: from the issuer's discovery document
    auth_oidc_client_id: str = ""  # the web pages' browser sign-in
    auth_oidc_client_secret: SecretStr = SecretStr("")
    auth_group_claim: str = "groups"
    auth_trusted_proxies: Annotated[tuple[str, ...], NoDecode] = ()
    auth_admin_token_name: str = Field(default="admin-token", min_length=1, max_length=100)
    # Signs session and CSRF cookies; default: derived from request_id_key.
    auth_session_secret: SecretStr = SecretStr("")
    auth_session_lifetime: Duration = timedelta(hours=8)
    # Operating it (telemetry.py). text or json: one JSON object per log line.
    log_format: Literal["text", "json"] = "text"
    # Prometheus metrics on this port (all interfaces), path /metrics; 0 serves none.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    # OTLP/HTTP collector (e.g. http://otel-collector:4318); empty: no tracing at all.
    otel_exporter_otlp_endpoint: str = ""
    # The Temporal Web UI (e.g. http://temporal-ui:8080): status answers link to each request.
    temporal_ui_url: str = ""
    # Keys the request id derived from (email, model), so ids reveal nothing about the email.
    request_id_key: SecretStr = SecretStr(BUILT_IN_REQUEST_ID_KEY)

    # `local`: the developer's stack and the tests, where built-in secrets are fine. Anything
    # else refuses to start with them (check_secrets).
    environment: Literal["local", "production"] = "production"

    @field_validator(
        "litellm_key_duration",
        "litellm_budget_duration",
        "approval_deadline",
        "approval_queue_interval",
        "litellm_timeout",
        "smtp_timeout",
        "lifecycle_retention",
        "auth_session_lifetime",
        "approval_remind_after",
        "approval_escalate_after",
    )
    @classmethod
    def _durations_positive(cls, value: timedelta | None) -> timedelta | None:
        return _positive(value)

    @field_validator("lifecycle_rotation_grace", "approval_resubmit_after")
    @classmethod
    def _durations_not_negative(cls, value: timedelta) -> timedelta:
        if value.total_seconds() < 0:
            raise ValueError("must be 0s or longer")
        return value

    @field_validator("lifecycle_remind_before", mode="before")
    @classmethod
    def _remind_points(cls, value: Any) -> Any:
        # LIFECYCLE_REMIND_BEFORE=7d,1d (or a JSON/YAML list, or "" for no reminders).
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return yaml.safe_load(value)
            return tuple(v.strip() for v in value.split(",") if v.strip())
        return value

    @field_validator("lifecycle_remind_before")
    @classmethod
    def _remind_points_positive(cls, value: tuple[timedelta, ...]) -> tuple[timedelta, ...]:
        for point in value:
            _positive(point)
        return tuple(sorted(set(value), reverse=True))

    @field_validator("litellm_base_url", "api_public_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        if not re.match(r"^https?://[^/\s]+", value):
            example = _URL_EXAMPLES[info.field_name]
            raise ValueError(f"{value!r} is not an http(s) URL, e.g. {example}")
        return value.rstrip("/")

    @field_validator("api_cors_origins", mode="before")
    @classmethod
    def _origins(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.strip()
            if value.startswith("["):
                return yaml.safe_load(value)
            return tuple(o.strip() for o in value.split(",") if o.strip())
        return value

    @field_validator("auth_trusted_proxies", mode="before")
    @classmethod
    def _proxies(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(p.strip() for p in value.split(",") if p.strip())
        return value

    @field_validator("auth_trusted_proxies")
    @classmethod
    def _cidrs(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for cidr in value:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise ValueError(
                    f"{cidr!r} is not an address or CIDR, e.g. 10.0.0.0/8 or 127.0.0.1"
                ) from None
        return value

    @field_validator("approval_notify", "approval_escalate_to")
    @classmethod
    def _addresses(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        _check_addresses(value, "")
        return value

    @field_validator("approval_webhook")
    @classmethod
    def _webhook(cls, value: str) -> str:
        _check_webhook(value, "")
        return value

    @field_validator("auth_oidc_issuer", "auth_oidc_jwks_url")
    @classmethod
    def _oidc_url(cls, value: str) -> str:
        if value and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http(s) URL, e.g. https://login.example.com")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _cross_checks(self) -> Settings:
        ids = [m.id for m in self.models]
        duplicates = sorted({i for i in ids if ids.count(i) > 1})
        if duplicates:
            raise ValueError(f"models: duplicate id(s) {', '.join(duplicates)}")
        names = [r.name for r in self.approval_rules]
        for rule in self.approval_rules:
            if names.count(rule.name) > 1:
                raise ValueError(f"approval.rules: rule name {rule.name!r} is used twice")
            for pattern in rule.models:
                if pattern != "*" and not any(fnmatch.fnmatchcase(i, pattern) for i in ids):
                    raise ValueError(
                        f"approval.rules: rule {rule.name!r} names model {pattern!r}, which "
                        f"matches no model in `models` ({', '.join(ids)})"
                    )
        if self.auth_oidc_issuer and not (self.auth_oidc_audience or self.auth_oidc_client_id):
            raise ValueError(
                "auth.oidc_audience (env AUTH_OIDC_AUDIENCE): required with auth.oidc_issuer; "
                "set it (or auth.oidc_client_id) to the audience your issuer puts in tokens"
            )
        return self

    def check_secrets(self, *names: str) -> None:
        """Refuse empty, built-in or example values of these secret settings, unless local.

        Each process names the secrets it uses: the API its REQUEST_ID_KEY (with the built-in
        one anyone can derive request ids from emails) and ADMIN_TOKEN, the worker its
        LITELLM_API_KEY.
        """
        if self.environment == "local":
            return
        problems = []
        for name in names:
            value = getattr(self, name).get_secret_value()
            env = name.upper()
            if not value:
                problem = "is empty"
            elif name == "request_id_key" and value == BUILT_IN_REQUEST_ID_KEY:
                problem = "is the built-in default, with which anyone can link ids to emails"
            elif any(p in value.lower() for p in _PLACEHOLDERS):
                problem = "is still the example's placeholder"
            elif name != "litellm_api_key" and len(value) < _MIN_SECRET_LENGTH:
                problem = f"is shorter than {_MIN_SECRET_LENGTH} characters"
            else:
                continue
            problems.append(f"  {env} {problem}; {_SECRET_HINTS[name]}")
        if problems:
            raise ConfigError(
                f"refusing to start with ENVIRONMENT={self.environment}:\n"
                + "\n".join(problems)
                + "\n(ENVIRONMENT=local accepts these defaults, for a stack on your own machine)"
            )

    @property
    def model_ids(self) -> list[str]:
        return [m.id for m in self.models]

    def decide(self, email: str, model: str, renewal: bool = False) -> tuple[Decision, str, str]:
        """(decision, reason, rule name) of the first matching rule, else the default.

        A renewal follows the rule's `renewals` when it has one.
        """
        for rule in self.approval_rules:
            if rule.matches(email, model):
                decision = (rule.renewals if renewal else None) or rule.decision
                reason = rule.reason or (self.approval_default_reason if decision == "deny" else "")
                return decision, reason, rule.name
        reason = self.approval_default_reason if self.approval_default == "deny" else ""
        return self.approval_default, reason, "default"

    def rule_for(self, email: str, model: str) -> ApprovalRule | None:
        """The first matching rule; None when the default decides."""
        _, _, rule_name = self.decide(email, model)
        return next((r for r in self.approval_rules if r.name == rule_name), None)

    def approvers_for(self, email: str, model: str) -> tuple[str, ...]:
        """Who may decide the request (emails and/or groups): its rule's, else the default."""
        rule = self.rule_for(email, model)
        return (rule.approvers if rule else ()) or self.approval_approvers

    def approvals_for(self, email: str, model: str) -> int:
        rule = self.rule_for(email, model)
        return (rule.approvals if rule else None) or self.approval_approvals

    def notify_for(self, email: str, model: str) -> tuple[str, ...]:
        """Who is emailed when the request waits: approvers that are addresses, and `notify`."""
        rule = self.rule_for(email, model)
        listed = (rule.notify if rule else ()) or self.approval_notify
        addresses = [a for a in self.approvers_for(email, model) if "@" in a] + list(listed)
        return tuple(dict.fromkeys(a.lower() for a in addresses))

    def escalate_to_for(self, email: str, model: str) -> tuple[str, ...]:
        rule = self.rule_for(email, model)
        return (rule.escalate_to if rule else ()) or self.approval_escalate_to

    def webhook_for(self, email: str, model: str) -> str:
        rule = self.rule_for(email, model)
        return (rule.webhook if rule else "") or self.approval_webhook

    @property
    def namespace(self) -> str:
        """KUBERNETES_NAMESPACE, else the namespace of the pod we run in, else 'default'."""
        if self.kubernetes_namespace:
            return self.kubernetes_namespace
        pod_ns = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
        if pod_ns.is_file():
            return pod_ns.read_text().strip() or "default"
        return "default"

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, _YamlSource(settings_cls)


class _YamlSource(PydanticBaseSettingsSource):
    """Reads CONFIG_FILE (default config.yaml beside this module) and flattens its sections."""

    def get_field_value(self, field, field_name):  # pragma: no cover - __call__ is used
        raise NotImplementedError

    def __call__(self) -> dict[str, Any]:
        path = Path(os.environ.get("CONFIG_FILE") or DEFAULT_CONFIG_FILE)
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(
                f"CONFIG_FILE: cannot read {str(path)!r} ({exc.strerror}); set CONFIG_FILE to the "
                "path of config.yaml"
            ) from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"CONFIG_FILE {str(path)!r} is not valid YAML: {exc}") from exc
        if not isinstance(raw, dict):
            raise ConfigError(f"CONFIG_FILE {str(path)!r}: the top level must be a mapping")
        flat: dict[str, Any] = {}
        for key, value in raw.items():
            if key in _FLATTENED_SECTIONS:
                if not isinstance(value, dict):
                    raise ConfigError(f"{key}: must be a mapping of settings, got {value!r}")
                for sub, sub_value in value.items():
                    flat[f"{key}_{sub}"] = sub_value
            else:
                flat[key] = value
        return flat


def _field_label(loc: tuple) -> str:
    """`litellm_base_url` -> 'litellm.base_url (env LITELLM_BASE_URL)'."""
    if not loc:
        return "configuration"
    head, rest = str(loc[0]), "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc[1:])
    for section in _FLATTENED_SECTIONS:
        if head.startswith(section + "_"):
            return f"{section}.{head[len(section) + 1 :]}{rest} (env {head.upper()})"
    return f"{head}{rest}" + (f" (env {head.upper()})" if not rest else "")


def load_settings(**overrides: Any) -> Settings:
    """Build Settings, turning validation errors into one ConfigError naming each field."""
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        lines = []
        for error in exc.errors(include_url=False, include_input=False):
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown setting; check the spelling against config.yaml's comments"
            lines.append(f"  {_field_label(error['loc'])}: {message}")
        raise ConfigError("invalid configuration:\n" + "\n".join(lines)) from None
