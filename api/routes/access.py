"""/api/v1/access/{token}: what a candidate's access token opens (the ``/s/<token>`` page
reads it). The token is the only credential; it shows one sandbox and nothing else."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from api.deps import ServiceDep, check_failures, count_failure
from api.schemas import CandidateView, SubmitReport
from engine import store, tokens
from engine.errors import NotFoundError

router = APIRouter(prefix="/api/v1/access", tags=["access"])


@router.get("/{token}", response_model=CandidateView, responses={404: {}, 429: {}})
async def candidate_view(token: str, service: ServiceDep, request: Request) -> CandidateView:
    check_failures(request)
    sandbox_id = tokens.verify(request.app.state.secret_key, token)
    row = await service.db(store.get_sandbox, sandbox_id) if sandbox_id else None
    if row is None:
        count_failure(request)
        # One answer for a bad, expired or foreign token: nothing is learnt from it.
        raise NotFoundError("this link is not valid (it may have expired)")
    outputs: dict[str, Any] = row.outputs or {}
    try:
        recording = service.template(row.template).recording
        recorded = recording.enabled and recording.notice
    except NotFoundError:  # the template was removed since: its terminal opens no more
        recorded = False
    return CandidateView(
        id=row.id,
        template=row.template,
        state=row.state,
        expires_at=row.expires_at,
        endpoints=outputs.get("endpoints", []),
        terminal=f"/api/v1/ws/terminal/{row.id}?token={token}",
        recorded=recorded,
    )


@router.post("/{token}/submit", response_model=SubmitReport, responses={404: {}, 409: {}, 429: {}})
async def candidate_submit(token: str, service: ServiceDep, request: Request) -> SubmitReport:
    """The candidate hands in their work: the workspace is archived (and destroyed, when the
    template says so). Once: a second submit answers the first one's report."""
    check_failures(request)
    sandbox_id = tokens.verify(request.app.state.secret_key, token)
    if sandbox_id is None:
        count_failure(request)
        raise NotFoundError("this link is not valid (it may have expired)")
    return SubmitReport.model_validate(await service.submit(sandbox_id, by="candidate"))
