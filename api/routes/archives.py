"""/api/v1/sandboxes/{id}/archives and …/submit: a sandbox's workspace archives (they outlive
it) and the owner's submit. API keys only: a candidate's token opens none of them."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import FileResponse

from api.deps import ClientDep, ServiceDep
from api.schemas import ArchiveList, ArchivePublic, SandboxId, SubmitReport
from engine.errors import NotFoundError
from engine.hiring import archives
from engine.sandboxes.service import SandboxService
from engine.store import Client

router = APIRouter(prefix="/api/v1/sandboxes", tags=["archives"])
ArchiveId = Annotated[int, Path(ge=1, le=2**63 - 1)]


async def _archives(
    service: SandboxService, client: Client, sandbox_id: str
) -> list[archives.ArchiveRow]:
    owner = None if client.role == "admin" else client.id
    rows: list[archives.ArchiveRow] = await service.db(
        archives.list_archives, sandbox_id, owner_id=owner
    )
    if not rows:
        await service.get(client, sandbox_id)  # 404 unless the sandbox is the caller's
    return rows


@router.get("/{sandbox_id}/archives", response_model=ArchiveList, responses={404: {}})
async def list_archives(
    sandbox_id: SandboxId, client: ClientDep, service: ServiceDep
) -> ArchiveList:
    """The sandbox's archives, oldest first, each with its git summary; listed after the
    sandbox is gone too."""
    rows = await _archives(service, client, sandbox_id)
    return ArchiveList(items=[ArchivePublic.model_validate(r.public()) for r in rows])


@router.get(
    "/{sandbox_id}/archives/{archive_id}",
    response_class=FileResponse,
    responses={200: {"content": {"application/gzip": {}}}, 404: {}},
)
async def download_archive(
    sandbox_id: SandboxId, archive_id: ArchiveId, client: ClientDep, service: ServiceDep
) -> FileResponse:
    """The archive itself, a .tar.gz (a failed archive has none: 404)."""
    for row in await _archives(service, client, sandbox_id):
        if row.id == archive_id and row.file is not None:
            return FileResponse(
                service.archiver.path(row),
                media_type="application/gzip",
                filename=f"sandbox-{sandbox_id}-{row.reason}-{row.id}.tar.gz",
            )
    raise NotFoundError(f"no archive {archive_id} of sandbox {sandbox_id!r}")


@router.post("/{sandbox_id}/submit", response_model=SubmitReport, responses={404: {}, 409: {}})
async def submit_sandbox(
    sandbox_id: SandboxId, client: ClientDep, service: ServiceDep
) -> SubmitReport:
    """Submit on the candidate's behalf: archive now, then destroy when the template says so.
    Once per sandbox: a second submit answers the first one's report."""
    await service.get(client, sandbox_id)
    report = await service.submit(sandbox_id, by=client.name)
    return SubmitReport.model_validate(report)
