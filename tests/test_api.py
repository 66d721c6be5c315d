"""The API app factory."""

from __future__ import annotations

from fastapi.testclient import TestClient

from api.app import create_app
from engine.settings import Settings


def test_healthz(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
