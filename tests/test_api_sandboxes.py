"""The API over real HTTP and WebSocket, with real PostgreSQL, dockerd and Pulumi."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from typing import Any

import docker
import httpx
import psycopg
import pytest
import websockets

from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from tests.api_server import Terminal, close_code, serve
from tests.conftest import remove_labelled

PROBLEM = "application/problem+json"


@pytest.fixture(scope="module")
def api(module_database: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    state = tmp_path_factory.mktemp("pulumi-state")
    settings = Settings(
        database_url=module_database,
        pulumi_backend_url=f"file://{state}",
        max_live_sandboxes_per_key=1,
    )
    migrate(module_database)
    with psycopg.connect(module_database, autocommit=True) as conn:
        keys = {
            name: create_client(conn, name=name, role=role)[1]
            for name, role in (("alice", Role.MEMBER), ("bob", Role.MEMBER), ("root", Role.ADMIN))
        }
    try:
        with serve(settings) as address:
            yield {"address": address, "keys": keys, "db": module_database}
    finally:  # a failed test may have left a sandbox running
        with psycopg.connect(module_database) as conn:
            ids = [r[0] for r in conn.execute("SELECT id FROM sandboxes").fetchall()]
        for sid in ids:
            remove_labelled(sid)
            (settings.stack_config_path / f"Pulumi.sbx-{sid}.yaml").unlink(missing_ok=True)


def client(api: dict[str, Any], who: str, form: str = "bearer") -> httpx.Client:
    key = api["keys"][who]
    headers = {"Authorization": f"Bearer {key}"} if form == "bearer" else {"X-API-Key": key}
    return httpx.Client(base_url=f"http://{api['address']}", headers=headers, timeout=120)


def wait_state(http: httpx.Client, sandbox_id: str, state: str, timeout: float = 180) -> dict:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = http.get(f"/api/v1/sandboxes/{sandbox_id}").json()
        if body["state"] == state:
            return body
        assert body["state"] not in ("failed",), body
        time.sleep(0.5)
    raise AssertionError(f"{sandbox_id} never reached {state}")


@pytest.fixture(scope="module")
def alice_sandbox(api: dict[str, Any]) -> Iterator[dict]:
    with client(api, "alice", "x-api-key") as http:
        created = http.post("/api/v1/sandboxes", json={"template": "backend-go", "ttl": "30m"})
        assert created.status_code == 202, created.text
        body = wait_state(http, created.json()["id"], "running")
        yield body
        http.delete(f"/api/v1/sandboxes/{body['id']}")
        wait_state(http, body["id"], "destroyed")


def test_lifecycle_over_http_sse_and_websocket(
    api: dict[str, Any], docker_client: docker.DockerClient
) -> None:
    with client(api, "bob", "bearer") as bearer, client(api, "bob", "x-api-key") as header:
        created = bearer.post(
            "/api/v1/sandboxes",
            json={"template": "backend-go", "ttl": "20m", "env": {"GREETING": "hi"}},
            headers={"Idempotency-Key": "bob-1"},
        )
        assert created.status_code == 202, created.text
        sandbox = created.json()
        assert sandbox["state"] == "creating" and sandbox["links"]["terminal"]
        again = bearer.post(
            "/api/v1/sandboxes",
            json={"template": "backend-go"},
            headers={"Idempotency-Key": "bob-1"},
        )
        assert again.status_code == 200 and again.json()["id"] == sandbox["id"]
        # A create is not interrupted.
        early = bearer.delete(f"/api/v1/sandboxes/{sandbox['id']}")
        assert early.status_code == 409 and early.headers["content-type"] == PROBLEM

        # Stream the progress to running.
        kinds, last = [], None
        with header.stream("GET", f"/api/v1/sandboxes/{sandbox['id']}/events") as events:
            assert events.headers["content-type"].startswith("text/event-stream")
            for line in events.iter_lines():
                if line.startswith("event: "):
                    kinds.append(line[7:])
                if line.startswith("data: "):
                    last = json.loads(line[6:])
        assert "progress" in kinds and kinds[-1] == "end" and last == {"state": "running"}
        running = header.get(f"/api/v1/sandboxes/{sandbox['id']}").json()
        assert running["state"] == "running" and running["endpoints"][0]["port"] == 8080

        async def terminal() -> None:
            url = (
                f"ws://{api['address']}/api/v1/ws/terminal/{sandbox['id']}"
                f"?token={api['keys']['bob']}"
            )
            async with websockets.connect(url) as ws:
                t = Terminal(ws)
                await t.resize(100, 30)
                await t.type("export MARK=kept-$GREETING; echo hel''lo\r")
                await t.expect("hello")
                await t.type("stty size\r")
                await t.expect("30 100")
                await t.resize(132, 43)
                await asyncio.sleep(0.5)
                await t.type("stty size\r")
                await t.expect("43 132")
            # The connection dropped; a new one finds the same shell.
            async with websockets.connect(url) as ws:
                t = Terminal(ws)
                await t.type("echo mark=$MARK\r")
                await t.expect("mark=kept-hi")
                # A second viewer at the same time sees what the first one types.
                async with websockets.connect(url) as other:
                    viewer = Terminal(other)
                    await t.type("echo both-$((40+2))\r")
                    await viewer.expect("both-42")
                    assert tmux_clients() == 2

        def tmux_clients() -> int:
            out = docker_client.containers.get(running["workspace"]).exec_run(
                ["tmux", "list-clients"], user="coder"
            )
            return len(out.output.decode().splitlines()) if out.exit_code == 0 else 0

        asyncio.run(terminal())
        # Every closed connection's tmux client is gone with it (none is left attached). The
        # hang-up is a docker exec of its own: on a loaded 2-core machine it can take seconds.
        deadline = time.monotonic() + 30
        while tmux_clients() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert tmux_clients() == 0

        deleted = bearer.delete(f"/api/v1/sandboxes/{sandbox['id']}")
        assert deleted.status_code == 202 and deleted.json()["state"] == "destroying"
        wait_state(header, sandbox["id"], "destroyed")
    assert not [
        c
        for c in docker_client.containers.list(all=True)
        if c.name.startswith(f"sbx-{sandbox['id']}")
    ]


def test_members_see_only_their_own(api: dict[str, Any], alice_sandbox: dict) -> None:
    sid = alice_sandbox["id"]
    with client(api, "bob") as bob, client(api, "root") as root:
        assert bob.get(f"/api/v1/sandboxes/{sid}").status_code == 404
        assert bob.delete(f"/api/v1/sandboxes/{sid}").status_code == 404
        assert sid not in [s["id"] for s in bob.get("/api/v1/sandboxes").json()["items"]]
        assert sid in [s["id"] for s in root.get("/api/v1/sandboxes").json()["items"]]
    url = f"ws://{api['address']}/api/v1/ws/terminal/{sid}?token={api['keys']['bob']}"
    assert asyncio.run(close_code(url)) == 4404


def test_revoked_key_is_refused_at_once(api: dict[str, Any], alice_sandbox: dict) -> None:
    with client(api, "root") as root:
        made = root.post("/api/v1/keys", json={"name": "temp", "role": "member"})
        assert made.status_code == 201
        key, key_id = made.json()["key"], made.json()["id"]
        assert "key" not in root.get("/api/v1/keys").json()[0]
        with httpx.Client(base_url=f"http://{api['address']}", timeout=30) as anon:
            headers = {"X-API-Key": key}
            assert anon.get("/api/v1/sandboxes", headers=headers).status_code == 200
            assert root.delete(f"/api/v1/keys/{key_id}").status_code == 204
            refused = anon.get("/api/v1/sandboxes", headers=headers)
            assert refused.status_code == 401
            assert refused.headers["content-type"] == PROBLEM
    url = f"ws://{api['address']}/api/v1/ws/terminal/{alice_sandbox['id']}?token={key}"
    assert asyncio.run(close_code(url)) == 4401


def test_candidate_token_opens_only_its_sandbox(api: dict[str, Any], alice_sandbox: dict) -> None:
    sid = alice_sandbox["id"]
    with client(api, "alice") as alice:
        token = alice.post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["token"]
        # A token is not an API key.
        with httpx.Client(base_url=f"http://{api['address']}") as anon:
            assert (
                anon.get(
                    f"/api/v1/sandboxes/{sid}", headers={"Authorization": f"Bearer {token}"}
                ).status_code
                == 401
            )

    async def open_terminal() -> None:
        url = f"ws://{api['address']}/api/v1/ws/terminal/{sid}?token={token}"
        async with websockets.connect(url) as ws:
            t = Terminal(ws)
            await t.type("echo candidate-$((6*7))\r")
            await t.expect("candidate-42")

    asyncio.run(open_terminal())
    other = f"ws://{api['address']}/api/v1/ws/terminal/0000000000?token={token}"
    assert asyncio.run(close_code(other)) == 4401
    forged = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert (
        asyncio.run(close_code(f"ws://{api['address']}/api/v1/ws/terminal/{sid}?token={forged}"))
        == 4401
    )


def test_quota_wrong_state_and_bad_input_are_problems(
    api: dict[str, Any], alice_sandbox: dict
) -> None:
    with client(api, "alice") as alice:
        quota = alice.post("/api/v1/sandboxes", json={"template": "backend-go"})
        assert quota.status_code == 429 and quota.headers["content-type"] == PROBLEM

        bad = [
            alice.post(
                "/api/v1/sandboxes",
                content=b"{not json",
                headers={"content-type": "application/json"},
            ),
            alice.post("/api/v1/sandboxes", json={"template": "no-such-template"}),
            alice.post("/api/v1/sandboxes", json={"template": "backend-go", "ttl": "99h"}),
            alice.post("/api/v1/sandboxes", json={"template": "backend-go", "colour": 1}),
            alice.post(
                "/api/v1/sandboxes",
                content=b"{" + b" " * 70_000 + b"}",
                headers={"content-type": "application/json"},
            ),
            alice.post(f"/api/v1/sandboxes/{alice_sandbox['id']}/extend", json={"ttl": "99h"}),
        ]
        # Input is checked before the quota: bad requests are 4xx for what is wrong with them.
        assert [r.status_code for r in bad] == [400, 422, 422, 422, 413, 422], [r.text for r in bad]
        assert bad[1].json()["field"] == "template" and bad[2].json()["field"] == "ttl"
        assert all(r.headers["content-type"] == PROBLEM for r in bad)
        assert bad[3].json()["field"] == "colour"
        assert bad[5].json()["field"] == "ttl"


def test_wrong_state_is_409(api: dict[str, Any]) -> None:
    with psycopg.connect(api["db"], autocommit=True) as conn:
        owner = conn.execute("SELECT id FROM api_clients WHERE name = 'root'").fetchone()
        assert owner is not None
        conn.execute(
            "INSERT INTO sandboxes (id, owner_id, template, state, expires_at)"
            " VALUES ('gone000001', %s, 'backend-go', 'destroyed', now())",
            (owner[0],),
        )
    with client(api, "root") as root:
        response = root.delete("/api/v1/sandboxes/gone000001")
        assert response.status_code == 409 and response.headers["content-type"] == PROBLEM
        url = f"ws://{api['address']}/api/v1/ws/terminal/gone000001?token={api['keys']['root']}"
        assert asyncio.run(close_code(url)) == 4409


def test_openapi_documents_every_endpoint(api: dict[str, Any]) -> None:
    spec = httpx.get(f"http://{api['address']}/openapi.json").json()
    paths = spec["paths"]
    for path, method in [
        ("/api/v1/sandboxes", "post"),
        ("/api/v1/sandboxes", "get"),
        ("/api/v1/sandboxes/{sandbox_id}", "get"),
        ("/api/v1/sandboxes/{sandbox_id}", "delete"),
        ("/api/v1/sandboxes/{sandbox_id}/extend", "post"),
        ("/api/v1/sandboxes/{sandbox_id}/events", "get"),
        ("/api/v1/sandboxes/{sandbox_id}/access-tokens", "post"),
        ("/api/v1/templates", "get"),
        ("/api/v1/templates/{name}", "get"),
        ("/api/v1/templates/{name}/preview", "post"),
        ("/api/v1/keys", "post"),
        ("/api/v1/keys", "get"),
        ("/api/v1/keys/{key_id}", "delete"),
        ("/healthz", "get"),
        ("/readyz", "get"),
        ("/metrics", "get"),
    ]:
        assert method in paths.get(path, {}), (path, method)
    create = paths["/api/v1/sandboxes"]["post"]
    assert "requestBody" in create and "202" in create["responses"]


def test_templates_and_ops(api: dict[str, Any]) -> None:
    with client(api, "bob") as bob:
        names = {t["name"] for t in bob.get("/api/v1/templates").json()}
        assert names == {"backend-python", "backend-node", "backend-go", "interview-python"}
        go = bob.get("/api/v1/templates/backend-go").json()
        assert go["services"] == ["postgres"] and go["memory_limit"] == "4096Mi"
        assert bob.get("/api/v1/templates/nope").status_code == 404
        assert bob.get("/readyz").status_code == 200
        assert "sandbox_engine_http_requests" in bob.get("/metrics").text


def test_keys_and_tokens_stay_out_of_the_logs(
    api: dict[str, Any], alice_sandbox: dict, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    sid = alice_sandbox["id"]
    with client(api, "alice") as alice:
        token = alice.post(f"/api/v1/sandboxes/{sid}/access-tokens").json()["token"]
        alice.get(f"/api/v1/sandboxes/{sid}?token={api['keys']['alice']}")
    for credential in (token, api["keys"]["alice"], api["keys"]["bob"]):
        url = f"ws://{api['address']}/api/v1/ws/terminal/{sid}?token={credential}"
        asyncio.run(close_code(url))
    # What the server wrote (the test's own HTTP and WebSocket clients log their requests too).
    server = "\n".join(
        r.getMessage()
        for r in caplog.records
        if r.name.startswith(("uvicorn", "sandbox_engine", "api"))
    )
    assert "terminal" in server and "token=***" in server, "the connections were not logged"
    for secret in (token, api["keys"]["alice"], api["keys"]["bob"]):
        assert secret not in server
        assert secret[8:30] not in server


def test_redaction_is_pure() -> None:
    from api.redact import redact

    assert redact('"WebSocket /ws/x?token=sek_abc&y=1"') == '"WebSocket /ws/x?token=***&y=1"'
    assert redact("key sat_abc.123.sig used") == "key sat_*** used"


def test_every_closed_terminal_is_hung_up(
    api: dict[str, Any], alice_sandbox: dict, docker_client: docker.DockerClient
) -> None:
    """Rounds of two overlapping connections (a terminal and a watcher or a second terminal),
    closed at once: each one's tmux client must be ended. Its pid comes from the shell's
    handshake, which tmux's flush of untransmitted output as it attaches could once swallow
    on a loaded machine (the client then stayed attached)."""
    workspace = docker_client.containers.get(alice_sandbox["workspace"])
    base = f"ws://{api['address']}/api/v1/ws/terminal/{alice_sandbox['id']}"
    url = f"{base}?token={api['keys']['alice']}"

    def tmux_clients() -> int:
        out = workspace.exec_run(["tmux", "list-clients"], user="coder")
        return len(out.output.decode().splitlines()) if out.exit_code == 0 else 0

    async def rounds() -> None:
        for n in range(10):
            second = f"{url}&mode=watch" if n % 2 else url
            async with websockets.connect(url) as ws, websockets.connect(second) as other:
                t, viewer = Terminal(ws), Terminal(other)
                await t.type(f"echo round-$((1000+{n}))\r")
                await t.expect(f"round-{1000 + n}")
                await viewer.expect(f"round-{1000 + n}")

    asyncio.run(rounds())
    deadline = time.monotonic() + 30  # each hang-up is a docker exec of its own
    while tmux_clients() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert tmux_clients() == 0


def test_the_handshake_reads_the_pid_after_the_echo() -> None:
    from engine.terminal.session import read_pid as _read_pid

    def read(*chunks: bytes) -> tuple[str, bytes]:
        ours, theirs = socket.socketpair()
        with ours, theirs:
            for chunk in chunks:
                theirs.sendall(chunk)
            theirs.shutdown(socket.SHUT_WR)
            return _read_pid(ours)

    assert read(b"\r\n", b"4242\r", b"\n\r\n") == ("4242", b"\r\n")
    assert read(b"\r\n17\r\n") == ("17", b"")
    assert read(b"\r\nbash: no such thing\r\n") == ("", b"")
    assert read(b"\r\n") == ("", b"\r\n")  # the shell ended before printing it
    assert read(b"\x1b[?1049h" * 10)[0] == ""  # no line within 64 bytes
