"""Request and response bodies of the REST API (these are what /docs shows)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, EmailStr, Field


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


class KeyRequestOut(BaseModel):
    request_id: str
    status: str = Field(description="pending, approved, denied, expired or failed")
    model: str
    message: str
    workflow_id: str


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
    key_expires: str | None = None
    deadline: str = ""
    workflow_id: str
    web_ui_url: str | None = Field(
        default=None,
        description="The request's runs in the Temporal Web UI, when TEMPORAL_UI_URL is set",
    )


class RequestPage(BaseModel):
    requests: list[RequestStatusOut]
    next_page_token: str | None = Field(
        default=None, description="Pass as page_token to get the next page; null on the last"
    )


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    reviewer: str = Field(default="", max_length=200)
    reason: str = Field(default="", max_length=2000)


class DenyIn(ReviewIn):
    reason: str = Field(min_length=1, max_length=2000, description="Shown to the requester")


class ErrorOut(BaseModel):
    message: str
    detail: object | None = None
