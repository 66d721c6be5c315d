"""/api/v1/sandboxes: thin routes over the sandbox service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request, Response
from fastapi.responses import StreamingResponse

from api.deps import ClientDep, ServiceDep
from api.schemas import AccessToken, SandboxCreate, SandboxExtend, SandboxList, SandboxPublic
from engine import tokens
from engine.service import CreateRequest
from engine.store import SandboxRow

router = APIRouter(prefix="/api/v1/sandboxes", tags=["sandboxes"])
STREAM_END = ("running", "failed", "destroyed", "expired")


def public(row: SandboxRow) -> SandboxPublic:
    outputs: dict[str, Any] = row.outputs or {}
    base = f"/api/v1/sandboxes/{row.id}"
    return SandboxPublic(
        id=row.id,
        template=row.template,
        state=row.state,
        reason=row.reason,
        owner=row.owner,
        created_at=row.created_at,
        expires_at=row.expires_at,
        destroyed_at=row.destroyed_at,
        endpoints=outputs.get("endpoints", []),
        workspace=outputs.get("workspace"),
        error=row.error,
        metadata=row.metadata,
        links={
            "self": base,
            "events": f"{base}/events",
            "terminal": f"/api/v1/ws/terminal/{row.id}",
            "extend": f"{base}/extend",
            "access_tokens": f"{base}/access-tokens",
        },
    )


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
    response: Response,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> SandboxPublic:
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
    response.headers["Location"] = f"/api/v1/sandboxes/{row.id}"
    if not created:
        response.status_code = 200
    elif row.state == "running":  # served from the warm pool: running already
        response.status_code = 201
    return public(row)


@router.get("", response_model=SandboxList)
async def list_sandboxes(
    client: ClientDep,
    service: ServiceDep,
    state: Annotated[
        str | None,
        Query(pattern="^(creating|pooled|running|repairing|failed|destroying|destroyed|expired)$"),
    ] = None,
) -> SandboxList:
    """Your sandboxes (an admin key sees everyone's), newest first."""
    return SandboxList(items=[public(r) for r in await service.list_for(client, state=state)])


@router.get("/{sandbox_id}", response_model=SandboxPublic, responses={404: {}})
async def get_sandbox(sandbox_id: str, client: ClientDep, service: ServiceDep) -> SandboxPublic:
    return public(await service.get(client, sandbox_id))


@router.delete(
    "/{sandbox_id}", status_code=202, response_model=SandboxPublic, responses={404: {}, 409: {}}
)
async def delete_sandbox(sandbox_id: str, client: ClientDep, service: ServiceDep) -> SandboxPublic:
    """Start destroying the sandbox: state `destroying`, then `destroyed`."""
    return public(await service.destroy(client, sandbox_id))


@router.post(
    "/{sandbox_id}/extend", response_model=SandboxPublic, responses={404: {}, 409: {}, 422: {}}
)
async def extend_sandbox(
    sandbox_id: str, body: SandboxExtend, client: ClientDep, service: ServiceDep
) -> SandboxPublic:
    """Set the time to live from now, up to the template's max_ttl from creation."""
    return public(await service.extend(client, sandbox_id, body.ttl))


@router.post(
    "/{sandbox_id}/access-tokens",
    status_code=201,
    response_model=AccessToken,
    responses={404: {}, 409: {}},
)
async def create_access_token(
    sandbox_id: str, client: ClientDep, service: ServiceDep, request: Request
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


@router.get("/{sandbox_id}/events", responses={200: {"content": {"text/event-stream": {}}}})
async def sandbox_events(
    sandbox_id: str,
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
