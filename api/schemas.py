"""Request and response bodies of the REST API (these are what /docs shows)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, EmailStr, Field

from domain import JUSTIFICATION_MAX


class ModelInfo(BaseModel):
    id: str
    name: str
    description: str = ""


class ModelList(BaseModel):
    models: list[ModelInfo]


class KeyRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    email: EmailStr = Field(max_length=254, examples=["jane.doe@example.com"])
    llm: str = Field(min_length=1, max_length=200, description="A model id from GET /api/models")
    justification: str = Field(
        default="", max_length=JUSTIFICATION_MAX, description="Why you need it; approvers see it"
    )


class KeyRequestOut(BaseModel):
    request_id: str
    status: str = Field(
        description="pending, approved, denied, expired, failed, revoked or key-expired"
    )
    decision: str = Field(
        default="",
        description="approved or denied once decided (the policy usually decides at once); "
        "`status` follows when the key is minted or the denial recorded",
    )
    model: str
    message: str
    workflow_id: str
    key_expires: str | None = Field(default=None, description="The live key's expiry, if any")


class RequestStatusOut(BaseModel):
    request_id: str
    state: str
    model: str
    requested_at: str = ""
    updated_at: str = ""
    decided_at: str = ""
    decision_source: str = ""
    reviewer: str = ""
    reason: str = ""
    decision: str = Field(default="", description="approved or denied once decided")
    key_expires: str | None = None
    deadline: str = ""
    workflow_id: str
    cycle: int = Field(default=1, description="1 for the first key; +1 per renewal or new start")
    next_reminder: str = ""
    revoked_at: str = ""
    revoked_by: str = ""
    revocation_reason: str = ""
    rotated_at: str = ""
    cleanup_at: str = Field(default="", description="When the finished request's Secret goes")
    requester: str = Field(default="", description="The requester's email (admin API only)")
    justification: str = Field(default="", description="The requester's reason (admin API only)")
    notification_failed: str = Field(
        default="", description="The mail server's final refusal of an email, if any"
    )
    web_ui_url: str | None = Field(
        default=None,
        description="The request's runs in the Temporal Web UI, when TEMPORAL_UI_URL is set",
    )
    approvals: list[str] = Field(
        default_factory=list, description="Who has approved so far (admin API only)"
    )
    approvals_needed: int = Field(default=1, description="Distinct approvals the rule needs")


class RequestPage(BaseModel):
    requests: list[RequestStatusOut]
    next_page_token: str | None = Field(
        default=None, description="Pass as page_token to get the next page; null on the last"
    )


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reviewer: str = Field(
        default="",
        max_length=200,
        description="Ignored: the reviewer recorded is always the authenticated caller",
        json_schema_extra={"deprecated": True},
    )
    reason: str = Field(default="", max_length=2000)


class DenyIn(ReviewIn):
    reason: str = Field(min_length=1, max_length=2000, description="Shown to the requester")


class RevokeIn(ReviewIn):
    reason: str = Field(min_length=1, max_length=2000, description="Shown to the key holder")


class RotateIn(ReviewIn):
    grace: str | None = Field(
        default=None,
        max_length=20,
        description="How long the old key keeps working, e.g. 0s or 2h; "
        "default lifecycle.rotation_grace",
        examples=["0s"],
    )


class ErrorOut(BaseModel):
    message: str
    detail: object | None = None
