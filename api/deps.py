"""Request dependencies: the caller (API key), the service, and the problem+json mapping."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from api.failures import AuthFailures, address
from engine.service import SandboxService
from engine.store import Client

_bearer = HTTPBearer(auto_error=False, description="Authorization: Bearer <key>")
_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="X-API-Key: <key>")


class Unauthorized(HTTPException):
    def __init__(self, detail: str = "a valid API key is required") -> None:
        super().__init__(401, detail, headers={"WWW-Authenticate": "Bearer"})


class TooManyFailures(HTTPException):
    def __init__(self, retry_after: int) -> None:
        super().__init__(
            429,
            f"too many authentication failures from this address; retry in {retry_after} s",
            headers={"Retry-After": str(retry_after)},
        )


def check_failures(conn: HTTPConnection) -> None:
    """Refuse an address over its authentication failure limit (api/failures.py)."""
    failures: AuthFailures = conn.app.state.auth_failures
    wait = failures.retry_after(address(conn))
    if wait is not None:
        raise TooManyFailures(wait)


def count_failure(conn: HTTPConnection) -> None:
    failures: AuthFailures = conn.app.state.auth_failures
    failures.failed(address(conn))


async def get_service(request: Request) -> SandboxService:
    # async: FastAPI runs a plain function dependency on a worker thread, a hop per request.
    service: SandboxService = request.app.state.service
    return service


ServiceDep = Annotated[SandboxService, Depends(get_service)]


async def key_client(conn: HTTPConnection, key: str | None) -> Client:
    """The live client for a key; failures are rate-limited by the caller's address."""
    check_failures(conn)
    if not key:
        count_failure(conn)
        raise Unauthorized()
    service: SandboxService = conn.app.state.service
    client = await service.authenticate(key)
    if client is None:
        count_failure(conn)
        raise Unauthorized("the API key is unknown or revoked")
    return client


async def get_client(
    request: Request,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Client:
    return await key_client(request, bearer.credentials if bearer else header)


ClientDep = Annotated[Client, Depends(get_client)]


async def get_admin(client: ClientDep) -> Client:
    if client.role != "admin":
        raise HTTPException(403, "this needs an admin key")
    return client


AdminDep = Annotated[Client, Depends(get_admin)]
