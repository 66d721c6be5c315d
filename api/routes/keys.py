"""/api/v1/keys: API key management, for admins."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, HTTPException

from api.deps import AdminDep, ServiceDep
from api.schemas import KeyCreate, KeyCreated, KeyId, KeyPublic
from engine import store

router = APIRouter(prefix="/api/v1/keys", tags=["keys"], responses={403: {}})


@router.post("", status_code=201, response_model=KeyCreated)
async def create_key(body: KeyCreate, admin: AdminDep, service: ServiceDep) -> KeyCreated:
    """A new key; the key itself is in this answer only."""
    client, key = await service.db(store.create_client, name=body.name, role=store.Role(body.role))
    return KeyCreated(**asdict(client), key=key)


@router.get("", response_model=list[KeyPublic])
async def list_keys(admin: AdminDep, service: ServiceDep) -> list[KeyPublic]:
    return [KeyPublic(**asdict(c)) for c in await service.db(store.list_clients)]


@router.delete("/{key_id}", status_code=204, responses={404: {}})
async def revoke_key(key_id: KeyId, admin: AdminDep, service: ServiceDep) -> None:
    """Revoke at once: the next request with the key is refused."""
    if not await service.revoke_key(key_id):
        raise HTTPException(404, f"no live key with id {key_id}")
