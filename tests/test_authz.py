"""Who may do what: every endpoint (listed from the app, so a new one without a row fails) by
every kind of caller, and the limit on authentication failures per client address."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import websockets
from fastapi.routing import APIRoute, APIWebSocketRoute
from starlette.routing import Route

from api.app import create_app
from api.failures import AuthFailures
from engine import tokens
from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from engine.terminal.recordings import recording_path
from tests.api_server import Terminal, close_code, running_sandbox, serve
from tests.conftest import remove_labelled

PROBLEM = "application/problem+json"
PRINCIPALS = ("anon", "alice", "bob", "admin", "revoked", "token", "other_token")
OPEN = "open"  # a terminal that opens and answers

# What each caller gets, in PRINCIPALS order. alice owns the running sandbox {sid} and the
# destroyed {gone}; bob and the admin each hold a (recorded only) live sandbox, so with a quota
# of one no create here makes anything; "token" opens {sid}, "other_token" bob's sandbox.
# 409/429/404-for-a-missing-template mean the caller got past authorization.
MATRIX: dict[tuple[str, str], tuple[str, tuple[int | str, ...]]] = {
    ("GET", "/healthz"): ("/healthz", (200,) * 7),
    ("GET", "/readyz"): ("/readyz", (200,) * 7),
    # Public by design: counts by state and route, no ids; Prometheus scrapes without a key.
    ("GET", "/metrics"): ("/metrics", (200,) * 7),
    ("GET", "/openapi.json"): ("/openapi.json", (200,) * 7),
    ("GET", "/docs"): ("/docs", (200,) * 7),
    ("GET", "/docs/oauth2-redirect"): ("/docs/oauth2-redirect", (200,) * 7),
    ("GET", "/redoc"): ("/redoc", (200,) * 7),
    ("GET", "/{path:path}"): ("/sandboxes/{sid}", (200,) * 7),
    ("POST", "/api/v1/sandboxes"): ("/api/v1/sandboxes", (401, 429, 429, 429, 401, 401, 401)),
    ("GET", "/api/v1/sandboxes"): ("/api/v1/sandboxes", (401, 200, 200, 200, 401, 401, 401)),
    ("GET", "/api/v1/sandboxes/{sandbox_id}"): (
        "/api/v1/sandboxes/{sid}",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("DELETE", "/api/v1/sandboxes/{sandbox_id}"): (
        "/api/v1/sandboxes/{gone}",
        (401, 409, 404, 409, 401, 401, 401),
    ),
    ("POST", "/api/v1/sandboxes/{sandbox_id}/extend"): (
        "/api/v1/sandboxes/{sid}/extend",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("POST", "/api/v1/sandboxes/{sandbox_id}/access-tokens"): (
        "/api/v1/sandboxes/{sid}/access-tokens",
        (401, 201, 404, 201, 401, 401, 401),
    ),
    ("GET", "/api/v1/sandboxes/{sandbox_id}/events"): (
        "/api/v1/sandboxes/{sid}/events",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("GET", "/api/v1/sandboxes/{sandbox_id}/timeline"): (
        "/api/v1/sandboxes/{sid}/timeline",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    # A candidate's token is not a key: it opens no recording, not even its sandbox's.
    ("GET", "/api/v1/sandboxes/{sandbox_id}/recordings"): (
        "/api/v1/sandboxes/{sid}/recordings",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("GET", "/api/v1/sandboxes/{sandbox_id}/recordings/{recording_id}"): (
        "/api/v1/sandboxes/{sid}/recordings/{recording}",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    # The AI record (usage, transcript) is the reviewer's: the owner's and admins', never a
    # candidate token's.
    ("GET", "/api/v1/sandboxes/{sandbox_id}/ai"): (
        "/api/v1/sandboxes/{sid}/ai",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("GET", "/api/v1/sandboxes/{sandbox_id}/ai/transcript"): (
        "/api/v1/sandboxes/{sid}/ai/transcript",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    # Archives are for keys only; a submit by the owner, an admin, or the sandbox's own token
    # (bob's token submits his recorded-only sandbox: its failed archive is the report).
    ("GET", "/api/v1/sandboxes/{sandbox_id}/archives"): (
        "/api/v1/sandboxes/{sid}/archives",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("GET", "/api/v1/sandboxes/{sandbox_id}/archives/{archive_id}"): (
        "/api/v1/sandboxes/{sid}/archives/{archive}",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("POST", "/api/v1/sandboxes/{sandbox_id}/submit"): (
        "/api/v1/sandboxes/{sid}/submit",
        (401, 200, 404, 200, 401, 401, 401),
    ),
    ("POST", "/api/v1/access/{token}/submit"): (
        "/api/v1/access/{credential}/submit",
        (404, 404, 404, 404, 404, 200, 200),
    ),
    ("GET", "/api/v1/templates"): ("/api/v1/templates", (401, 200, 200, 200, 401, 401, 401)),
    ("GET", "/api/v1/templates/{name}"): (
        "/api/v1/templates/backend-go",
        (401, 200, 200, 200, 401, 401, 401),
    ),
    ("POST", "/api/v1/templates/{name}/preview"): (
        "/api/v1/templates/no-such-template/preview",
        (401, 404, 404, 404, 401, 401, 401),
    ),
    ("POST", "/api/v1/keys"): ("/api/v1/keys", (401, 403, 403, 201, 401, 401, 401)),
    ("GET", "/api/v1/keys"): ("/api/v1/keys", (401, 403, 403, 200, 401, 401, 401)),
    ("DELETE", "/api/v1/keys/{key_id}"): (
        "/api/v1/keys/{spare}",
        (401, 403, 403, 204, 401, 401, 401),
    ),
    # The path's token is the caller's credential: a key is not a token.
    ("GET", "/api/v1/access/{token}"): (
        "/api/v1/access/{credential}",
        (404, 404, 404, 404, 404, 200, 200),
    ),
    ("WS", "/api/v1/ws/terminal/{sandbox_id}"): (
        "/api/v1/ws/terminal/{sid}?token={credential}",
        (4401, OPEN, 4404, OPEN, 4401, OPEN, 4401),
    ),
}
BODIES = {
    ("POST", "/api/v1/sandboxes"): {"template": "backend-go"},
    ("POST", "/api/v1/sandboxes/{sandbox_id}/extend"): {"ttl": "1h"},
    ("POST", "/api/v1/keys"): {"name": "made-in-the-matrix"},
}


def routes(routes: list[Any] | None = None, prefix: str = "") -> set[tuple[str, str]]:
    """Every (method, path) the app answers; "WS" for WebSockets."""
    found: set[tuple[str, str]] = set()
    for route in create_app(Settings()).routes if routes is None else routes:
        if isinstance(route, APIWebSocketRoute):
            found.add(("WS", prefix + route.path))
        elif isinstance(route, APIRoute | Route):
            found.update((m, prefix + route.path) for m in route.methods or () if m != "HEAD")
        elif hasattr(route, "original_router"):  # newer FastAPI keeps an included router whole
            found |= routes_of(route, prefix)
        else:
            raise AssertionError(f"a route of an unknown kind: {route!r}")
    return found


def routes_of(included: Any, prefix: str) -> set[tuple[str, str]]:
    return routes(included.original_router.routes, prefix + included.include_context.prefix)


def test_every_endpoint_has_a_row() -> None:
    assert routes() == set(MATRIX)


@pytest.fixture(scope="module")
def world(module_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    state = tmp_path_factory.mktemp("pulumi-state")
    settings = Settings(
        database_url=module_database,
        pulumi_backend_url=f"file://{state}",
        max_live_sandboxes_per_key=1,
        auth_failures_per_minute=100_000,  # the matrix fails on purpose, many times
        reap_interval=0,  # the recorded-only sandboxes below have nothing for a reaper to see
        recordings_dir=tmp_path_factory.mktemp("recordings"),
    )
    migrate(module_database)
    with psycopg.connect(module_database, autocommit=True) as conn:
        clients = {
            name: create_client(conn, name=name, role=role)
            for name, role in (
                ("alice", Role.MEMBER),
                ("bob", Role.MEMBER),
                ("admin", Role.ADMIN),
                ("revoked", Role.MEMBER),
                ("spare", Role.MEMBER),
            )
        }
        conn.execute("UPDATE api_clients SET revoked_at = now() WHERE name = 'revoked'")
    keys = {name: key for name, (_, key) in clients.items()}
    try:
        with serve(settings) as address, running_sandbox(address, keys["alice"]) as sid:
            expires = datetime.now(UTC) + timedelta(hours=1)
            with psycopg.connect(module_database, autocommit=True) as conn:
                for sandbox_id, owner, state in (
                    ("bobs000001", "bob", "running"),
                    ("admins0001", "admin", "running"),
                    ("gone000001", "alice", "destroyed"),
                ):
                    conn.execute(
                        "INSERT INTO sandboxes (id, owner_id, template, state, expires_at)"
                        " VALUES (%s, %s, 'backend-go', %s, %s)",
                        (sandbox_id, clients[owner][0].id, state, expires),
                    )
                # A recording of alice's sandbox (its file, and its row).
                recording = "0123456789abcdef"
                conn.execute(
                    "INSERT INTO recordings (id, sandbox_id, owner_id, role, client, width,"
                    " height, has_input) VALUES (%s, %s, %s, 'member', 'alice', 80, 24, false)",
                    (recording, sid, clients["alice"][0].id),
                )
                # An archive of alice's sandbox (its file, and its row).
                archive = f"{sid}-authz.tar.gz"
                (archive_id,) = conn.execute(
                    "INSERT INTO archives (sandbox_id, owner_id, reason, file, expires_at)"
                    " VALUES (%s, %s, 'deleted', %s, %s) RETURNING id",
                    (sid, clients["alice"][0].id, archive, expires),
                ).fetchone()
            settings.archives_path.mkdir(parents=True, exist_ok=True)
            (settings.archives_path / archive).write_bytes(b"")
            cast = recording_path(settings.recordings_path, sid, recording)
            cast.parent.mkdir(parents=True)
            cast.write_text('{"version": 2, "width": 80, "height": 24}\n')
            secret = tokens.secret_key(settings)
            credentials = {
                "anon": "",
                **{p: keys[p] for p in ("alice", "bob", "admin", "revoked")},
                "token": tokens.issue(secret, sid, expires),
                "other_token": tokens.issue(secret, "bobs000001", expires),
            }
            yield {
                "address": address,
                "credentials": credentials,
                "fill": {
                    "sid": sid,
                    "gone": "gone000001",
                    "spare": clients["spare"][0].id,
                    "recording": recording,
                    "archive": archive_id,
                },
            }
            with psycopg.connect(module_database, autocommit=True) as conn:
                conn.execute("DELETE FROM sandboxes WHERE id IN ('bobs000001', 'admins0001')")
    finally:  # a failed test may have left a sandbox running
        with psycopg.connect(module_database) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()]
        for sandbox_id in ids:
            remove_labelled(sandbox_id)
            (settings.stack_config_path / f"Pulumi.sbx-{sandbox_id}.yaml").unlink(missing_ok=True)


async def _terminal(url: str) -> int | str:
    try:
        async with websockets.connect(url) as ws:
            t = Terminal(ws)
            await t.type("echo open-$((6*7))\r")
            await t.expect("open-42")
            return OPEN
    except websockets.ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd else 1006


def _call(world: dict, route: tuple[str, str], who: str) -> int | str:
    method, _ = route
    template, _ = MATRIX[route]
    credential = world["credentials"][who]
    url = template.format(**world["fill"], credential=credential or "none")
    if method == "WS":
        url = url if credential else url.partition("?")[0]
        return asyncio.run(_terminal(f"ws://{world['address']}{url}"))
    headers = {"Authorization": f"Bearer {credential}"} if credential else {}
    with httpx.Client(base_url=f"http://{world['address']}", timeout=60) as http:
        response = http.request(method, url, headers=headers, json=BODIES.get(route))
    if response.status_code >= 400:
        assert response.headers["content-type"] == PROBLEM, (route, who, response.text)
    if response.status_code == 401:
        assert response.headers["www-authenticate"] == "Bearer"
    if route == ("GET", "/api/v1/access/{token}") and response.status_code == 200:
        # A token shows its own sandbox, whichever that is.
        assert credential.startswith(f"sat_{response.json()['id']}.")
    return response.status_code


@pytest.mark.parametrize("route", sorted(MATRIX), ids=lambda r: f"{r[0]} {r[1]}")
def test_authorization_matrix(world: dict, route: tuple[str, str]) -> None:
    _, expected = MATRIX[route]
    got = tuple(_call(world, route, who) for who in PRINCIPALS)
    assert dict(zip(PRINCIPALS, got, strict=True)) == dict(zip(PRINCIPALS, expected, strict=True))


# --- authentication failures, per client address ---------------------------------------------


def test_the_failure_window_slides() -> None:
    now = [0.0]
    failures = AuthFailures(3, clock=lambda: now[0])
    for t in (0.0, 10.0, 20.0):
        now[0] = t
        assert failures.retry_after("a") is None
        failures.failed("a")
    assert failures.retry_after("a") == 40  # the first failure leaves the window at 60
    assert failures.retry_after("b") is None
    now[0] = 59.5
    assert failures.retry_after("a") == 1
    now[0] = 60.0
    assert failures.retry_after("a") is None


def test_failures_past_the_limit_refuse_the_address(
    module_database: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    limit = 6
    settings = Settings(
        database_url=module_database,
        pulumi_backend_url=f"file://{tmp_path_factory.mktemp('pulumi-state')}",
        auth_failures_per_minute=limit,
        reap_interval=0,
    )
    migrate(module_database)
    with psycopg.connect(module_database, autocommit=True) as conn:
        _, key = create_client(conn, name="limited", role=Role.MEMBER)
    good = {"X-API-Key": key}
    with serve(settings) as address, httpx.Client(base_url=f"http://{address}") as http:
        ws = f"ws://{address}/api/v1/ws/terminal/0000000000"
        assert http.get("/api/v1/sandboxes", headers=good).status_code == 200
        failures = [
            http.get("/api/v1/sandboxes").status_code,
            http.get("/api/v1/sandboxes", headers={"X-API-Key": "sek_wrong"}).status_code,
            http.get("/api/v1/keys", headers={"Authorization": "Bearer nonsense"}).status_code,
            http.get("/api/v1/access/sat_0000000000.1.forged").status_code,
            asyncio.run(close_code(f"{ws}?token=sek_wrong")),
            asyncio.run(close_code(f"{ws}?token=sat_0000000000.1.forged")),
        ]
        assert failures == [401, 401, 401, 404, 4401, 4401]
        # Limited now: even the right key is refused, before it is looked up.
        for response in (
            http.get("/api/v1/sandboxes", headers=good),
            http.get("/api/v1/sandboxes"),
            http.get("/api/v1/access/sat_0000000000.1.forged"),
        ):
            assert response.status_code == 429, response.text
            assert response.headers["content-type"] == PROBLEM
            assert 1 <= int(response.headers["retry-after"]) <= 60
        assert asyncio.run(close_code(f"{ws}?token={key}")) == 4429
        # What needs no credential still answers; another address is not limited (uvicorn
        # takes X-Forwarded-For from its trusted proxies only: 127.0.0.1 by default).
        assert http.get("/healthz").status_code == 200
        proxied = {**good, "X-Forwarded-For": "203.0.113.7"}
        assert http.get("/api/v1/sandboxes", headers=proxied).status_code == 200


# --- credentials that disagree ----------------------------------------------------------------

# Header sets beside a caller's valid key, none of which may be served: a bad or foreign
# Authorization beside a valid X-API-Key, and a valid Authorization beside a bad X-API-Key.
DISAGREEING = {
    "basic beside a key": lambda k, other: {"Authorization": "Basic Zm9vOmJhcg==", "X-API-Key": k},
    "bad bearer beside a key": lambda k, other: {"Authorization": "Bearer sek_x", "X-API-Key": k},
    "bearer without a key": lambda k, other: {"Authorization": "Bearer", "X-API-Key": k},
    "garbage beside a key": lambda k, other: {"Authorization": "garbage", "X-API-Key": k},
    "key beside a bad key": lambda k, other: {"Authorization": f"Bearer {k}", "X-API-Key": "x"},
    "two valid keys": lambda k, other: {"Authorization": f"Bearer {k}", "X-API-Key": other},
}


def test_credentials_that_disagree_are_refused_everywhere(world: dict) -> None:
    """On every endpoint that needs a key: a request carrying a valid key beside a credential
    that is not the same (or not in a form the API takes) is refused 401, saying so; the
    same key twice is served."""
    creds = world["credentials"]
    needing = [r for r, (_, expected) in MATRIX.items() if r[0] != "WS" and expected[0] == 401]
    assert ("POST", "/api/v1/keys") in needing
    admin = {"X-API-Key": creds["admin"]}
    with httpx.Client(base_url=f"http://{world['address']}", timeout=60) as http:
        keys_before = len(http.get("/api/v1/keys", headers=admin).json())
        for route in needing:
            method, _ = route
            url = MATRIX[route][0].format(**world["fill"], credential="none")
            for case, headers in DISAGREEING.items():
                response = http.request(
                    method,
                    url,
                    headers=headers(creds["admin"], creds["alice"]),
                    json=BODIES.get(route),
                )
                assert response.status_code == 401, (route, case, response.text)
                assert response.headers["content-type"] == PROBLEM
                detail = response.json()["detail"]
                assert "Authorization" in detail or "disagree" in detail, (route, case, detail)
        # The refused POST /api/v1/keys made no key, the refused DELETE revoked none.
        assert len(http.get("/api/v1/keys", headers=admin).json()) == keys_before
        both = {"Authorization": f"Bearer {creds['alice']}", "X-API-Key": creds["alice"]}
        assert http.get("/api/v1/sandboxes", headers=both).status_code == 200


async def _close_with_headers(url: str, headers: dict[str, str]) -> tuple[int, str]:
    try:
        async with websockets.connect(url, additional_headers=headers) as ws:
            await asyncio.wait_for(ws.recv(), 10)
    except websockets.ConnectionClosed as exc:
        return (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd else (1006, "")
    return 1000, ""


def test_a_terminal_token_beside_another_credential_is_refused(world: dict) -> None:
    creds, sid = world["credentials"], world["fill"]["sid"]
    base = f"ws://{world['address']}/api/v1/ws/terminal/{sid}"
    for token, headers in (
        (creds["alice"], {"X-API-Key": creds["bob"]}),  # a key in the query, another in a header
        (creds["token"], {"X-API-Key": creds["alice"]}),  # a candidate token beside a key
        (creds["token"], {"Authorization": "Basic Zm9vOmJhcg=="}),
        (None, {"Authorization": "Basic Zm9vOmJhcg==", "X-API-Key": creds["alice"]}),
    ):
        url = f"{base}?token={token}" if token else base
        code, reason = asyncio.run(_close_with_headers(url, headers))
        assert code == 4401, (token, headers, code, reason)
        assert "disagree" in reason or "Authorization" in reason, reason
    # The same key in the query and in a header agrees: the terminal opens.
    code, _ = asyncio.run(
        _close_with_headers(f"{base}?token={creds['alice']}", {"X-API-Key": creds["alice"]})
    )
    assert code == 1000
