"""/api/v1/sandboxes: thin routes over the sandbox service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import ClientDep, ServiceDep
from api.schemas import (
    AccessToken,
    SandboxCreate,
    SandboxExtend,
    SandboxId,
    SandboxList,
    SandboxPublic,
    TimelineEntry,
)
from engine import tokens
from engine.hiring.timeline import timeline
from engine.sandboxes.service import CreateRequest
from engine.store import SandboxState

router = APIRouter(prefix="/api/v1/sandboxes", tags=["sandboxes"])
STREAM_END = ("running", "failed", "destroyed", "expired")


def shown(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """A sandbox (or a list) as the database encoded it: ``engine.store.SANDBOX_JSON`` is the
    one definition of the ``SandboxPublic`` shape (tests/test_api.py checks it)."""
    return Response(body, status, headers, media_type="application/json")


@router.post(
    "",
    status_code=202,
    response_model=SandboxPublic,
    responses={201: {"model": SandboxPublic}, 409: {}, 422: {}, 429: {}},
)
async def create_sandbox(
    body: SandboxCreate,
    client: ClientDep,
    service: ServiceDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> Response:
    """Start a sandbox: answers at once with state `creating` (202); poll or stream its
    events. When the template keeps a warm pool and the request sets no `env`, a sandbox made
    ahead is handed over instead: 201, state `running`, TTL counted from now."""
    row, created = await service.create(
        client,
        CreateRequest(
            template=body.template,
            ttl=body.ttl,
            env=body.env,
            metadata=body.metadata,
            idempotency_key=idempotency_key,
        ),
    )
    status = 202
    if not created:
        status = 200
    elif row.state == "running":  # served from the warm pool: running already
        status = 201
    view = await service.view(client, row.id)
    return shown(view, status, {"Location": f"/api/v1/sandboxes/{row.id}"})


@router.get("", response_model=SandboxList)
async def list_sandboxes(
    client: ClientDep,
    service: ServiceDep,
    state: Annotated[
        str | None,
        Query(pattern=f"^({'|'.join(SandboxState)})$"),
    ] = None,
) -> Response:
    """Your sandboxes (an admin key sees everyone's), newest first."""
    return shown(await service.list_view(client, state=state))


@router.get("/{sandbox_id}", response_model=SandboxPublic, responses={404: {}})
async def get_sandbox(sandbox_id: SandboxId, client: ClientDep, service: ServiceDep) -> Response:
    return shown(await service.view(client, sandbox_id))


@router.delete(
    "/{sandbox_id}", status_code=202, response_model=SandboxPublic, responses={404: {}, 409: {}}
)
async def delete_sandbox(sandbox_id: SandboxId, client: ClientDep, service: ServiceDep) -> Response:
    """Start destroying the sandbox: state `destroying`, then `destroyed`."""
    row = await service.destroy(client, sandbox_id)
    return shown(await service.view(client, row.id), 202)


@router.post(
    "/{sandbox_id}/extend", response_model=SandboxPublic, responses={404: {}, 409: {}, 422: {}}
)
async def extend_sandbox(
    sandbox_id: SandboxId, body: SandboxExtend, client: ClientDep, service: ServiceDep
) -> Response:
    """Set the time to live from now, up to the template's max_ttl from creation."""
    row = await service.extend(client, sandbox_id, body.ttl)
    return shown(await service.view(client, row.id))


@router.post(
    "/{sandbox_id}/access-tokens",
    status_code=201,
    response_model=AccessToken,
    responses={404: {}, 409: {}},
)
async def create_access_token(
    sandbox_id: SandboxId, client: ClientDep, service: ServiceDep, request: Request
) -> AccessToken:
    """A token for a candidate: opens this sandbox's terminal only, until it expires."""
    row = await service.get(client, sandbox_id)
    token = tokens.issue(request.app.state.secret_key, row.id, row.expires_at)
    return AccessToken(
        token=token,
        expires_at=row.expires_at,
        terminal=f"/api/v1/ws/terminal/{row.id}?token={token}",
        url=f"/s/{token}",
    )


@router.get(
    "/{sandbox_id}/events", responses={200: {"content": {"text/event-stream": {}}}, 404: {}}
)
async def sandbox_events(
    sandbox_id: SandboxId,
    client: ClientDep,
    service: ServiceDep,
    after: Annotated[int, Query(ge=0)] = 0,
    follow: Annotated[bool, Query(description="keep streaming after running/destroyed")] = False,
) -> StreamingResponse:
    """Server-Sent Events: every event of the sandbox; ends when the current operation does."""
    await service.get(client, sandbox_id)

    async def stream() -> AsyncIterator[str]:
        last = after
        while True:
            for event in await service.events(sandbox_id, after=last):
                last = event.id
                data = json.dumps(
                    {
                        "id": event.id,
                        "at": event.at.isoformat(),
                        "kind": event.kind,
                        "message": event.message,
                    }
                )
                yield f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"
            row = await service.get(client, sandbox_id)
            if row.state in STREAM_END and not follow:
                yield f"event: end\ndata: {json.dumps({'state': row.state})}\n\n"
                return
            await asyncio.sleep(0.5)

    return StreamingResponse(
        stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"}
    )


@router.get("/{sandbox_id}/timeline", response_model=list[TimelineEntry], responses={404: {}})
async def sandbox_timeline(
    sandbox_id: SandboxId, client: ClientDep, service: ServiceDep
) -> list[TimelineEntry]:
    """What happened to the sandbox, for a reviewer: created, task seeded, terminals connected
    and disconnected, idle periods, extended, submitted, archived, destroyed."""
    await service.get(client, sandbox_id)
    return [
        TimelineEntry(at=e.at, what=e.what, detail=e.detail)
        for e in timeline(await service.events(sandbox_id))
    ]
