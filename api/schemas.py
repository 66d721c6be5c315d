"""Request and response bodies: one schema per direction. The contract in docs/api.md."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class SandboxCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: str = Field(min_length=1, max_length=40, examples=["backend-python"])
    ttl: str | None = Field(default=None, max_length=20, examples=["30m"])
    env: dict[str, str] | None = Field(default=None, max_length=50)
    metadata: dict[str, str] | None = Field(default=None, max_length=20)


class SandboxExtend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: str = Field(max_length=20, examples=["1h"], description="new time to live, from now")


class Endpoint(BaseModel):
    port: int
    public: bool
    url: str


class SandboxPublic(BaseModel):
    id: str
    template: str
    state: Literal[
        "creating",
        "pooled",
        "running",
        "repairing",
        "failed",
        "destroying",
        "destroyed",
        "expired",
    ]
    reason: str | None
    owner: str | None = Field(
        default=None, description="name of the API key that made it; none for a pool sandbox"
    )
    created_at: datetime
    expires_at: datetime
    destroyed_at: datetime | None = None
    endpoints: list[Endpoint] = []
    workspace: str | None = None
    error: str | None = None
    metadata: dict[str, str] = {}
    links: dict[str, str]


class SandboxList(BaseModel):
    items: list[SandboxPublic]


class TemplatePublic(BaseModel):
    name: str
    description: str
    base_image: str
    services: list[str]
    cpu_limit: float
    memory_limit: str
    pids_limit: int
    ttl: str
    max_ttl: str
    expose: list[dict[str, Any]]


class PreviewChange(BaseModel):
    op: str
    type: str
    name: str
    properties: list[str]


class PreviewPublic(BaseModel):
    template: str
    changes: list[PreviewChange]
    summary: dict[str, int]


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=100)
    role: Literal["admin", "member"] = "member"


class KeyPublic(BaseModel):
    id: int
    name: str
    role: str
    key_prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class KeyCreated(KeyPublic):
    key: str = Field(description="the key itself: shown in this answer only")


class AccessToken(BaseModel):
    token: str
    expires_at: datetime
    terminal: str = Field(description="WebSocket path that this token opens")
    url: str = Field(description="candidate page: opens straight into the terminal")


class Problem(BaseModel):
    type: str = "about:blank"
    title: str
    status: int
    detail: str
    field: str | None = None


class CandidateView(BaseModel):
    """What a candidate's access token shows: its one sandbox, nothing else."""

    id: str
    template: str
    state: str
    expires_at: datetime
    endpoints: list[dict[str, Any]]
    terminal: str = Field(description="WebSocket path that this token opens")
