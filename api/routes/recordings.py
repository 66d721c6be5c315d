"""/api/v1/sandboxes/{id}/recordings: the sandbox's recorded terminal sessions, for the member
who owns it and for admins (a candidate's token is not a key: it opens none of them). They
outlive the sandbox: after its row is pruned they are still listed to its owner."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import FileResponse

from api.deps import ClientDep, ServiceDep
from api.schemas import RecordingId, RecordingList, RecordingPublic, SandboxId
from engine.errors import NotFoundError
from engine.sandboxes.service import SandboxService
from engine.store import Client
from engine.terminal import recordings
from engine.terminal.recordings import RecordingRow

router = APIRouter(prefix="/api/v1/sandboxes", tags=["recordings"])
CAST = "application/x-asciicast"


async def _visible(service: SandboxService, client: Client, sandbox_id: str) -> list[RecordingRow]:
    owner = None if client.role == "admin" else client.id
    rows: list[RecordingRow] = await service.db(
        recordings.list_recordings, sandbox_id, owner_id=owner
    )
    if not rows:
        await service.get(client, sandbox_id)  # 404 unless the sandbox is there and theirs
    return rows


@router.get("/{sandbox_id}/recordings", response_model=RecordingList, responses={404: {}})
async def list_recordings(
    sandbox_id: SandboxId, client: ClientDep, service: ServiceDep
) -> RecordingList:
    """The sandbox's recorded terminal sessions, newest first (watch sessions are not
    recorded)."""
    rows = await _visible(service, client, sandbox_id)
    return RecordingList(
        items=[
            RecordingPublic(
                id=row.id,
                sandbox_id=row.sandbox_id,
                role=row.role,
                client=row.client,
                started_at=row.started_at,
                ended_at=row.ended_at,
                width=row.width,
                height=row.height,
                bytes=row.bytes,
                has_input=row.has_input,
                download=f"/api/v1/sandboxes/{row.sandbox_id}/recordings/{row.id}",
            )
            for row in rows
        ]
    )


@router.get(
    "/{sandbox_id}/recordings/{recording_id}",
    response_class=FileResponse,
    responses={200: {"content": {CAST: {}}, "description": "an asciicast v2 file"}, 404: {}},
)
async def download_recording(
    sandbox_id: SandboxId, recording_id: RecordingId, client: ClientDep, service: ServiceDep
) -> FileResponse:
    """The session as an asciicast v2 file (a session still open: what it has recorded so
    far, at most a second behind)."""
    rows = await _visible(service, client, sandbox_id)
    path = recordings.recording_path(service.settings.recordings_path, sandbox_id, recording_id)
    if not any(row.id == recording_id for row in rows) or not path.is_file():
        raise NotFoundError(f"no recording {recording_id!r} of sandbox {sandbox_id!r}")
    return FileResponse(
        path,
        media_type=CAST,
        filename=f"{sandbox_id}-{recording_id}.cast",
        headers={"Cache-Control": "no-store"},
    )
