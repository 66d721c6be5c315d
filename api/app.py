"""The HTTP service: ``create_app(settings)`` builds it; nothing long-lived exists at import."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from engine.migrate import migrate
from engine.settings import Settings


def create_app(settings: Settings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.settings = settings
        # The schema is brought up to date before the first request (migrations are locked).
        await asyncio.to_thread(migrate, settings.database_url.get_secret_value())
        yield

    app = FastAPI(title="Sandbox Engine", version="0.1.0", lifespan=lifespan)

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    return app
