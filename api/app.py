"""The HTTP service: ``create_app(settings)`` builds it; nothing long-lived exists at import."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Response
from fastapi.responses import FileResponse
from prometheus_client import CollectorRegistry, Counter
from psycopg_pool import AsyncConnectionPool, ConnectionPool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api import openapi, problems, redact, terminal
from api.failures import AuthFailures
from api.routes import access, ai, archives, keys, ops, recordings, sandboxes, templates
from engine import tokens
from engine.ai import gateway as ai_gateway
from engine.egress import proxy as egress_proxy
from engine.migrate import migrate
from engine.sandboxes.reaper import Reaper
from engine.sandboxes.service import SandboxService
from engine.sandboxes.stacks import StackManager
from engine.settings import Settings

MAX_BODY_BYTES = 64 * 1024
IO_THREADS = 32
SWITCH_INTERVAL = 0.0005  # seconds
DB_WAIT = 5.0  # seconds a request waits for a database connection


class LimitsAndMetrics:
    """Refuses bodies over MAX_BODY_BYTES (413) and counts requests by route and status. Plain
    ASGI: a ``BaseHTTPMiddleware`` costs a task and a stream per request."""

    def __init__(self, app: ASGIApp, requests: Counter) -> None:
        self.app = app
        self.requests = requests

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length")
        if length and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            response = problems.problem(413, f"the body is over {MAX_BODY_BYTES} bytes")
            await response(scope, receive, send)
            return
        status = 500

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            self.requests.labels(scope["method"], route, str(status)).inc()


@asynccontextmanager
async def _lifespan(app: FastAPI, settings: Settings) -> AsyncIterator[None]:
    """Everything long-lived, started before the first request and stopped after the last."""
    # Database calls, Docker calls and terminal set-ups run on these threads (stack
    # operations have their own): enough that a burst never queues a request behind them.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=IO_THREADS, thread_name_prefix="engine-io")
    )
    # Requests hop between the event loop and those threads; with the interpreter's default
    # 5 ms between thread switches, a hop can wait that long behind a busy thread, and
    # under load the waits stack up (GET list p99 47-112 ms at 200/s; 15-32 ms with this).
    sys.setswitchinterval(SWITCH_INTERVAL)
    async with contextlib.AsyncExitStack() as exits:
        pool, reads = await _pools(settings, exits)
        app.state.gateway = app.state.egress = None
        if settings.gateway_serve:
            # The AI gateway on its own listener, in this event loop (engine/ai/gateway.py);
            # it stops after the service, whose jobs in flight may still use it.
            app.state.gateway = await exits.enter_async_context(ai_gateway.running(settings))
            # Beside it, the egress proxy restricted sandboxes go out through (engine/egress).
            app.state.egress = await exits.enter_async_context(egress_proxy.running(settings))
        stacks = await asyncio.to_thread(StackManager, settings)
        app.state.settings = settings
        app.state.service = service = SandboxService(settings, pool, stacks, reads)
        await service.start()
        exits.push_async_callback(service.close)
        if app.state.gateway is not None:
            service.gateway_port = app.state.gateway.port
        app.state.secret_key = tokens.secret_key(settings)
        # Sandboxes a previous engine process left mid-operation are settled first.
        await service.reconcile()
        if settings.reap_interval > 0:
            reaper = asyncio.create_task(
                Reaper(service, interval=settings.reap_interval).run_forever()
            )
            exits.callback(reaper.cancel)
        yield


def create_app(settings: Settings) -> FastAPI:
    app = FastAPI(
        title="Sandbox Engine",
        version="0.1.0",
        summary="Disposable Linux workspaces with the Claude Code CLI, one Pulumi stack each.",
        lifespan=lambda app: _lifespan(app, settings),
    )
    problems.install(app)
    openapi.install(app)
    redact.install()
    registry = CollectorRegistry()
    requests = Counter(
        "sandbox_engine_http_requests",
        "HTTP requests",
        ["method", "route", "status"],
        registry=registry,
    )
    app.state.http_registry = registry
    app.state.auth_failures = AuthFailures(settings.auth_failures_per_minute)

    app.add_middleware(LimitsAndMetrics, requests=requests)

    for router in (
        ops.router,
        sandboxes.router,
        templates.router,
        keys.router,
        access.router,
        ai.router,
        archives.router,
        recordings.router,
        terminal.router,
    ):
        app.include_router(router)
    install_ui(app, settings.web_path)
    return app


async def _pools(
    settings: Settings, exits: contextlib.AsyncExitStack
) -> tuple[ConnectionPool, AsyncConnectionPool]:
    """The schema brought up to date (migrations are locked), then the engine's connection
    pools: one for its threads, one for reads on the event loop; closed with ``exits``."""
    url = settings.database_url.get_secret_value()
    await asyncio.to_thread(migrate, url)
    # Connections are checked when taken (a round trip of ~0.1 ms), so after a database
    # restart no request meets a dead one; a request waits at most DB_WAIT seconds for a
    # connection, then is answered 503 (api/problems.py) instead of hanging.
    pool = ConnectionPool(
        url, min_size=1, max_size=16, open=False, timeout=DB_WAIT,
        check=ConnectionPool.check_connection,
    )  # fmt: skip
    await asyncio.to_thread(pool.open, True, 30.0)
    exits.push_async_callback(asyncio.to_thread, pool.close)
    reads = AsyncConnectionPool(
        url, min_size=1, max_size=8, open=False, timeout=DB_WAIT,
        check=AsyncConnectionPool.check_connection,
    )  # fmt: skip
    await reads.open(wait=True, timeout=30.0)
    exits.push_async_callback(reads.close)
    return pool, reads


def install_ui(app: FastAPI, web: Path) -> None:
    """The browser UI at ``/``: its files, and index.html for every other page path (the UI
    routes itself: /sandboxes/<id>, /s/<token>…). Paths under /api stay the API's."""
    root = web.resolve()

    @app.get("/{path:path}", include_in_schema=False)
    async def ui(path: str) -> Response:
        if path == "api" or path.startswith("api/"):
            return problems.problem(404, f"no API route /{path}")
        index = root / "index.html"
        if not index.is_file():
            return problems.problem(503, f"the web UI is not built ({index} is missing): make web")
        wanted = (root / path).resolve()
        if path and wanted.is_file() and root in wanted.parents:
            # Built assets have hashed names: cache them; index.html never.
            cache = (
                "public, max-age=31536000, immutable" if "/assets/" in f"/{path}" else "no-cache"
            )
            return FileResponse(wanted, headers={"Cache-Control": cache})
        return FileResponse(index, headers={"Cache-Control": "no-cache"})
