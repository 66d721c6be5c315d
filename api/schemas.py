"""Request and response bodies: one schema per direction. The contract in docs/api.md."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from engine.model.schema import describe

# Text from a client: PostgreSQL text and JSONB cannot hold NUL, so it is refused here (422).
Text = Annotated[str, StringConstraints(pattern=r"^[^\x00]*$")]
# Path parameters, bounded as their columns are (text without NUL, bigint).
# A duration as engine/units.py reads it: "4h", "30m", "1h30m", "90s".
Duration = Annotated[str, StringConstraints(max_length=20, pattern=r"^ *([0-9]+[hms])+ *$")]
SandboxId = Annotated[str, Path(max_length=64, pattern=r"^[^\x00]+$")]
KeyId = Annotated[int, Path(ge=1, le=2**63 - 1)]


class SandboxCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    template: Text = Field(min_length=1, max_length=40, examples=["backend-python"])
    ttl: Duration | None = Field(default=None, examples=["30m"])
    env: dict[Text, Text] | None = Field(default=None, max_length=50)
    metadata: dict[Text, Text] | None = Field(default=None, max_length=20)


class SandboxExtend(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ttl: Duration = Field(examples=["1h"], description="new time to live, from now")


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
        "lost",
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


class TimelineEntry(BaseModel):
    """One moment of a sandbox's activity timeline (engine/hiring/timeline.py)."""

    at: datetime
    what: str = Field(
        description="created, task, running, terminal, idle, warned, extended, submitted, "
        "archived, destroying, destroyed, expired, failed, repaired, ai (an AI exchange)"
    )
    detail: str


class TemplatePublic(BaseModel):
    """A template as its file declares it (engine/model/schema.py), units as text."""

    name: str = Field(description=describe("name"))
    description: str = Field(description=describe("description"))
    base_image: str = Field(description=describe("base_image"))
    services: list[str] = Field(description=describe("services"))
    cpu_limit: float = Field(description=describe("resources.cpu_limit"))
    memory_limit: str = Field(description=describe("resources.memory_limit"), examples=["4096Mi"])
    pids_limit: int = Field(description=describe("resources.pids_limit"))
    ttl: str = Field(description=describe("ttl"))
    max_ttl: str = Field(description=describe("max_ttl"))
    expose: list[dict[str, Any]] = Field(
        description=f"{describe('expose')}: container ({describe('expose.container')}) and"
        f" public ({describe('expose.public')})"
    )


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

    name: Text = Field(min_length=1, max_length=100)
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
    recorded: bool = Field(
        default=False,
        description="the terminal is recorded and the template says so to the candidate",
    )


RecordingId = Annotated[str, Path(pattern=r"^[0-9a-f]{16}$")]


class RecordingPublic(BaseModel):
    """A recorded terminal session (asciicast v2): who opened it, when, its size."""

    id: str
    sandbox_id: str
    role: Literal["candidate", "member", "admin"]
    client: str = Field(description="the key's name; 'candidate' for a candidate's link")
    started_at: datetime
    ended_at: datetime | None = Field(description="none while the session is open")
    width: int
    height: int
    bytes: int = Field(description="the file's size, once the session ended")
    has_input: bool = Field(description="keystrokes are recorded too")
    download: str = Field(description="path of the .cast file")


class RecordingList(BaseModel):
    items: list[RecordingPublic]


class ArchivePublic(BaseModel):
    """A workspace archive (engine/hiring/archives.py); it outlives its sandbox."""

    id: int
    sandbox_id: str
    reason: Literal["expired", "deleted", "submitted"]
    created_at: datetime
    expires_at: datetime
    bytes: int = Field(description="size of the .tar.gz")
    files: int = Field(description="regular files in it")
    sha256: str | None
    git: str | None = Field(description="git log and diff of a repository in the workspace")
    notes: str | None = Field(description="what was left out on purpose, paths not found")
    error: str | None = Field(description="why the archive failed; then there is no file")
    download: str | None


class ArchiveList(BaseModel):
    items: list[ArchivePublic]


class SubmitReport(BaseModel):
    archive: ArchivePublic
    destroyed: bool = Field(description="the template destroys the sandbox on submit")


class AiSession(BaseModel):
    """One Claude Code session in the sandbox (its X-Claude-Code-Session-Id)."""

    session_id: str | None
    started_at: datetime
    last_at: datetime
    exchanges: int
    refused: int
    billed: int = Field(description="tokens billed against the budget (docs/claude.md)")
    agents: list[str] = Field(description="subagents that took part")


class AiUsage(BaseModel):
    """The sandbox's Claude usage through the AI gateway, against its template's budget."""

    sandbox_id: str
    template: str
    model: str | None = Field(description="the pinned model; none: any")
    max_tokens: int = Field(description="the cap on one request's output")
    budget_tokens: int
    used_tokens: int = Field(
        description="billed: input + cache creation + output + a tenth of cache reads"
    )
    input_tokens: int
    output_tokens: int
    cache_creation_tokens: int
    cache_read_tokens: int
    requests: int
    refused: int
    sessions: list[AiSession]
    transcript: str = Field(description="where the conversation is read")


class AiExchange(BaseModel):
    """One request Claude Code made and its answer: the messages the request added (the
    prompt, or the results of the tools the previous answer asked for) and the assembled
    answer (text, thinking, tool_use with its input)."""

    id: int
    at: datetime
    finished_at: datetime | None
    session_id: str | None
    agent_id: str | None = Field(description="a subagent's id; none: the main conversation")
    side: bool = Field(description="a side call (a title, a summary), not the conversation")
    model: str | None
    status: int | None = Field(description="the answer's HTTP status; none while in flight")
    refused: str | None = Field(description="why the gateway refused it: budget, model…")
    usage: dict[str, int]
    first_message: int = Field(description="index of messages[0] in the conversation")
    messages: list[dict[str, Any]]
    answer: dict[str, Any] | None
    error: str | None


class AiTranscript(BaseModel):
    sandbox_id: str
    items: list[AiExchange]
