"""Health, readiness and Prometheus metrics."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Gauge, generate_latest

from api.problems import problem
from engine.sandboxes.service import SandboxService

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """Liveness: the process answers."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {}})
async def readyz(request: Request) -> Response:
    """Readiness: the database and the backend (dockerd) answer."""
    service: SandboxService = request.app.state.service
    try:
        await service.db(lambda conn: conn.execute("SELECT 1"))
        await asyncio.to_thread(service.backend.ping)
    except Exception as exc:
        return problem(503, f"not ready: {type(exc).__name__}")
    return Response('{"status":"ready"}', media_type="application/json")


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Prometheus text format: sandboxes by state, HTTP requests by route and status, and the AI
    gateway's requests, tokens and refusals and the latency it adds (when this process runs it)."""
    service: SandboxService = request.app.state.service
    registry = CollectorRegistry()
    gauge = Gauge("sandbox_engine_sandboxes", "Sandboxes by state", ["state"], registry=registry)
    rows = await service.db(
        lambda conn: conn.execute("SELECT state, count(*) FROM sandboxes GROUP BY state").fetchall()
    )
    for state, count in rows:
        gauge.labels(state=state).set(count)
    body = generate_latest(registry) + generate_latest(request.app.state.http_registry)
    gateway = request.app.state.gateway
    if gateway is not None:  # served by this process: its tokens, requests, refusals, latency
        body += generate_latest(gateway.metrics.registry)
    egress = getattr(request.app.state, "egress", None)
    if egress is not None:  # the egress proxy's connections, allowed and refused
        body += generate_latest(egress.registry)
    return Response(body, media_type=CONTENT_TYPE_LATEST)
