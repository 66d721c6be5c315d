"""/api/v1/sandboxes/{id}/ai: the sandbox's Claude usage and its AI transcript, for the member
who owns it and for admins (a candidate's token is not a key: it opens neither). Both outlive
the sandbox, as recordings do."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import ClientDep, ServiceDep
from api.schemas import AiExchange, AiSession, AiTranscript, AiUsage, SandboxId
from engine.ai import store as ai_store
from engine.ai.transcript import entry
from engine.errors import NotFoundError
from engine.sandboxes.service import SandboxService
from engine.store import Client

router = APIRouter(prefix="/api/v1/sandboxes", tags=["ai"])


async def _check(service: SandboxService, client: Client, sandbox_id: str) -> None:
    """404 unless the caller may read the sandbox's AI record (its owner, or an admin)."""
    found, owner = await service.db(ai_store.owner_of, sandbox_id)
    if found and (client.role == "admin" or owner == client.id):
        return
    await service.get(client, sandbox_id)  # 404 unless the sandbox is there and theirs
    if not found:
        raise NotFoundError(f"sandbox {sandbox_id} has not used the AI gateway")


@router.get("/{sandbox_id}/ai", response_model=AiUsage, responses={404: {}})
async def ai_usage(sandbox_id: SandboxId, client: ClientDep, service: ServiceDep) -> AiUsage:
    """Usage against the budget, and the Claude Code sessions of the sandbox."""
    await _check(service, client, sandbox_id)
    row = await service.db(ai_store.usage, sandbox_id)
    if row is None:
        raise NotFoundError(f"sandbox {sandbox_id} has not used the AI gateway")
    row.pop("owner_id", None)
    return AiUsage(
        sandbox_id=sandbox_id,
        sessions=[AiSession(**s) for s in row.pop("sessions")],
        transcript=f"/api/v1/sandboxes/{sandbox_id}/ai/transcript",
        **row,
    )


@router.get("/{sandbox_id}/ai/transcript", response_model=AiTranscript, responses={404: {}})
async def ai_transcript(
    sandbox_id: SandboxId, client: ClientDep, service: ServiceDep
) -> AiTranscript:
    """Every exchange in order: the prompts and tool results each request added, and each
    answer with its text, thinking and tool calls."""
    await _check(service, client, sandbox_id)
    rows = await service.db(ai_store.exchanges, sandbox_id)
    return AiTranscript(sandbox_id=sandbox_id, items=[AiExchange(**entry(r)) for r in rows])
