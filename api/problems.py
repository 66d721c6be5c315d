"""One translation point: engine errors and request errors → application/problem+json."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from api import openapi
from engine.errors import ConflictError, EngineError, NotFoundError, StackError, TemplateError
from engine.sandboxes.service import EngineBusy, InvalidRequest, QuotaExceeded

log = logging.getLogger("sandbox_engine.api")
TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Payload Too Large",
    415: "Unsupported Media Type",
    422: "Unprocessable Content",
    429: "Too Many Requests",
    500: "Internal Server Error",
    502: "Bad Gateway",
}


def problem(
    status: int, detail: str, *, field: str | None = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": TITLES.get(status, "Error"),
        "status": status,
        "detail": detail,
    }
    if field:
        body["field"] = field
    return JSONResponse(
        body, status_code=status, headers=dict(headers or {}), media_type="application/problem+json"
    )


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            return problem(
                400, f"the body is not valid JSON: {first.get('ctx', {}).get('error', msg)}"
            )
        return problem(422, f"{field}: {msg}" if field else msg, field=field)

    # Starlette's own (405, a body that cannot be read) as well as FastAPI's subclass.
    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = ", ".join(openapi.allowed_methods(request.app, request.url.path))
        return problem(exc.status_code, str(exc.detail), headers=headers)

    @app.exception_handler(EngineError)
    async def engine(_: Request, exc: EngineError) -> JSONResponse:
        if isinstance(exc, InvalidRequest):
            return problem(422, str(exc), field=exc.field)
        if isinstance(exc, NotFoundError):
            return problem(404, str(exc))
        if isinstance(exc, ConflictError):
            return problem(409, str(exc))
        if isinstance(exc, EngineBusy):
            return problem(503, str(exc), headers={"Retry-After": "5"})
        if isinstance(exc, QuotaExceeded):
            return problem(429, str(exc), headers={"Retry-After": "60"})
        if isinstance(exc, TemplateError):
            return problem(500, "a template on the server is invalid; an operator must fix it")
        if isinstance(exc, StackError):
            return problem(502, str(exc))
        return problem(500, "internal error")

    # The database is down or restarting (PoolTimeout is one of these): nothing was changed
    # that the client cannot retry.
    @app.exception_handler(psycopg.OperationalError)
    async def database(_: Request, exc: psycopg.OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", type(exc).__name__)
        return problem(
            503, "the database is unavailable; retry shortly", headers={"Retry-After": "5"}
        )

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return problem(500, "internal error")
