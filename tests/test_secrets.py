"""Secrets stay secret: after a whole lifecycle (create with a credential in env, access token,
terminal, Claude Code through the AI gateway, bad requests, extend, destroy), no API key, access
token, credential, gateway token or the operator's Anthropic key appears in the logs, events,
response bodies, database rows, stack config or Pulumi state — and the credential did reach the
sandbox, as a Pulumi secret; the operator's key reached the upstream only."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any

import docker
import httpx
import psycopg
import pytest
import websockets
from psycopg import sql
from pydantic import SecretStr

from engine.migrate import migrate
from engine.model.spec import L_ROLE, L_SANDBOX
from engine.settings import Settings
from engine.store import Role, create_client
from tests.ai_upstream import serving
from tests.api_server import Terminal, serve
from tests.gateway_lock import gateway_port

ROOT = Path(__file__).resolve().parent.parent
LIVE = ROOT / "tests" / "fixtures" / "live-templates"


def _wait(http: httpx.Client, sandbox_id: str, state: str) -> dict[str, Any]:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/sandboxes/{sandbox_id}").json()
        if body["state"] == state:
            return dict(body)
        assert body["state"] != "failed", body
        time.sleep(0.3)
    raise AssertionError(f"{sandbox_id} never reached {state}")


def _files(folder: Path) -> dict[str, str]:
    return {str(p): p.read_text(errors="replace") for p in folder.rglob("*") if p.is_file()}


def test_no_secret_leaks_through_a_whole_lifecycle(
    database: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    docker_client: docker.DockerClient,
) -> None:
    caplog.set_level(logging.DEBUG)
    operator_key = "sk-ant-api03-" + secrets.token_urlsafe(30)
    with gateway_port() as port, serving() as (upstream_url, upstream):
        # The production backend: Pulumi's state in a table of the engine's database.
        settings = Settings(
            database_url=database,
            templates_dir=LIVE,
            gateway_serve=True,
            gateway_port=port,
            anthropic_upstream=upstream_url,
            anthropic_api_key=SecretStr(operator_key),
        )
        _lifecycle(settings, database, tmp_path, caplog, docker_client, operator_key, upstream)


def _lifecycle(
    settings: Settings,
    database: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    docker_client: docker.DockerClient,
    operator_key: str,
    upstream: Any,
) -> None:

    def state() -> dict[str, str]:
        with psycopg.connect(database) as conn:
            rows = conn.execute(
                sql.SQL("SELECT key, data::text FROM {}").format(
                    sql.Identifier(settings.pulumi_state_table)
                )
            ).fetchall()
        return {f"state {key}": data for key, data in rows}

    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        member = create_client(conn, name="hiring", role=Role.MEMBER)[1]
        admin = create_client(conn, name="ops", role=Role.ADMIN)[1]
    credential = "sk-ant-api03-" + secrets.token_urlsafe(24)
    bodies: list[tuple[str, str]] = []  # (the request's URL, the answer)

    def keep(response: httpx.Response) -> None:
        response.read()
        if response.request.url.path.endswith("/access-tokens"):
            return  # the one answer whose job is to hand the token out
        bodies.append((str(response.request.url), response.text))

    seen_config: dict[str, str] = {}
    with serve(settings) as address:
        base = f"http://{address}"
        hooks = {"response": [keep]}
        with (
            httpx.Client(base_url=base, headers={"X-API-Key": member}, event_hooks=hooks) as http,
            httpx.Client(base_url=base, headers={"X-API-Key": admin}, event_hooks=hooks) as ops,
            httpx.Client(base_url=base, event_hooks=hooks) as anon,
        ):
            made = http.post(
                "/api/v1/sandboxes",
                json={"template": "web", "env": {"ANTHROPIC_API_KEY": credential}},
            )
            assert made.status_code == 202, made.text
            sid = made.json()["id"]
            _wait(http, sid, "running")
            # While it runs: its stack config and state exist (they go with the destroy).
            seen_config.update(_files(settings.stack_config_path))
            seen_config.update(state())
            assert any(sid in key for key in seen_config)  # the stack's checkpoint is there
            token = http.post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["token"]
            assert anon.get(f"/api/v1/access/{token}").status_code == 200
            assert anon.get(f"/api/v1/access/{token}x").status_code == 404
            assert (
                anon.get("/api/v1/sandboxes", headers={"X-API-Key": member + "x"}).status_code
                == 401
            )
            bad = http.post(
                "/api/v1/sandboxes",
                json={"template": "nope", "env": {"ANTHROPIC_API_KEY": credential}},
            )
            assert bad.status_code == 422
            assert (
                http.post(f"/api/v1/sandboxes/{sid}/extend", json={"ttl": "40m"}).status_code == 200
            )
            assert ops.get("/api/v1/sandboxes").status_code == 200
            with http.stream("GET", f"/api/v1/sandboxes/{sid}/events?follow=false") as events:
                bodies.append((str(events.request.url), "".join(events.iter_text())))

            async def terminal() -> None:
                url = f"ws://{address}/api/v1/ws/terminal/{sid}?token={token}"
                async with websockets.connect(url) as ws:
                    term = Terminal(ws)
                    await term.type("echo candidate-$((6*7))\r")
                    await term.expect("candidate-42")

            asyncio.run(terminal())

            # The credential reached the workspace, and only through its environment.
            workspace = docker_client.containers.list(
                filters={"label": [f"{L_SANDBOX}={sid}", f"{L_ROLE}=workspace"]}
            )[0]
            assert f"ANTHROPIC_API_KEY={credential}" in workspace.attrs["Config"]["Env"]
            # Claude Code through the gateway: the sandbox's token in, the operator's key out.
            said = workspace.exec_run(
                ["bash", "-lc", "cd ~/workspace && claude -p 'keep my secrets'"], user="coder"
            )
            assert said.exit_code == 0 and b"stand-in model" in said.output, said.output
            managed = workspace.exec_run(["cat", "/etc/claude-code/managed-settings.json"])
            gateway_token = json.loads(managed.output)["env"]["ANTHROPIC_AUTH_TOKEN"]
            assert gateway_token.startswith("sgt_")
            assert upstream.seen and all(
                r.headers.get("x-api-key") == operator_key for r in upstream.seen
            )
            for path in ("ai", "ai/transcript"):
                got = http.get(f"/api/v1/sandboxes/{sid}/{path}")
                assert got.status_code == 200, got.text

            assert http.delete(f"/api/v1/sandboxes/{sid}").status_code == 202
            _wait(http, sid, "destroyed")

    with psycopg.connect(database) as conn:
        rows = [
            json.dumps(r, default=str)
            for table in (
                "sandboxes",
                "sandbox_events",
                "api_clients",
                "ai_tokens",
                "ai_usage",
                "ai_exchanges",
            )
            for r in conn.execute(f"SELECT row_to_json(t) FROM {table} t").fetchall()  # noqa: S608
        ]
    # The engine's records (and uvicorn's): not the test's own HTTP and WebSocket clients.
    client_side = ("httpx", "httpcore", "websockets.client", "hpack")
    logs = [r.getMessage() for r in caplog.records if not r.name.startswith(client_side)]
    places = {
        "logs": "\n".join(logs),
        "response bodies": "\n".join(body for _, body in bodies),
        "database rows": "\n".join(rows),
        "stack config and Pulumi state while running": "\n".join(seen_config.values()),
        "Pulumi state after the destroy": "\n".join(state().values()),
    }
    needles = {
        "member key": member,
        "admin key": admin,
        "access token": token,
        "credential": credential,
        "gateway token": gateway_token,
        "operator's Anthropic key": operator_key,
    }
    # An answer may echo a token its own request carried (the candidate view names the
    # terminal URL with it); every other answer must not hold one.
    echoed = {n: "\n".join(b for url, b in bodies if n not in url) for n in needles.values()}
    leaks = [
        f"the {what} in the {where}"
        for what, needle in needles.items()
        for where, hay in places.items()
        if needle in (echoed[needle] if where == "response bodies" else hay)
    ]
    sizes = ", ".join(f"{where} {len(hay) // 1024} KiB" for where, hay in places.items())
    print(f"secrets: {len(needles)} searched in {sizes}; leaks: {leaks or 'none'}")
    assert not leaks
    # The haystacks are real: the sandbox is there, the credential's key name too.
    assert sid in places["logs"] and sid in places["database rows"]
    assert "keep my secrets" in places["database rows"]  # the transcript is there
    config = next(v for k, v in seen_config.items() if k.endswith(f"Pulumi.sbx-{sid}.yaml"))
    assert "sandbox:env:\n    secure: " in config  # a Pulumi secret, encrypted at rest
