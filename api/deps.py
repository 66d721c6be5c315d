"""Request dependencies: the caller (API key), the service, and the problem+json mapping."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.requests import HTTPConnection

from api.failures import AuthFailures, address
from engine.sandboxes.service import SandboxService
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


def presented_key(conn: HTTPConnection, token: str | None = None) -> str | None:
    """The one credential a request presents: ``Authorization: Bearer <key>``, ``X-API-Key``
    or (WebSocket) ``?token=``. Several are accepted only when they are the same; a request
    whose credentials disagree, or that carries one in a form the API does not take (another
    Authorization scheme, an empty value, a header twice), is refused (401): it is never
    served with whichever of them happens to be valid."""
    found: list[str] = []
    authorization = conn.headers.getlist("authorization")
    api_keys = conn.headers.getlist("x-api-key")
    if len(authorization) > 1 or len(api_keys) > 1:
        raise Unauthorized("send one Authorization or X-API-Key header, not several")
    if authorization:
        scheme, _, value = authorization[0].strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <key>'")
        found.append(value.strip())
    if api_keys:
        if not api_keys[0].strip():
            raise Unauthorized("the X-API-Key header is empty")
        found.append(api_keys[0].strip())
    if token is not None:
        found.append(token)
    if len(set(found)) > 1:
        raise Unauthorized(
            "the request carries credentials that disagree (Authorization, X-API-Key,"
            " token): send one"
        )
    return found[0] if found else None


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


async def request_client(conn: HTTPConnection, token: str | None = None) -> Client:
    """The live client a request (or a WebSocket with ``?token=``) authenticates as."""
    check_failures(conn)
    try:
        key = presented_key(conn, token)
    except Unauthorized:
        count_failure(conn)
        raise
    return await key_client(conn, key)


async def get_client(
    request: Request,
    # Declared for the OpenAPI document's security schemes; the headers are read (and
    # checked against each other) by presented_key.
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> Client:
    return await request_client(request)


ClientDep = Annotated[Client, Depends(get_client)]


async def get_admin(client: ClientDep) -> Client:
    if client.role != "admin":
        raise HTTPException(403, "this needs an admin key")
    return client


AdminDep = Annotated[Client, Depends(get_admin)]
