"""The AI gateway against a stand-in for the Messages API (tests/ai_upstream.py): the answer
streams through as it arrives, bodies and headers go upstream unchanged with the operator's key
and never a sandbox token, upstream errors come back unchanged, refusals use the statuses
Claude Code gives up on at once, the budget holds under 20 requests at once, and everything is
recorded. Requests come from 127.0.0.1, which the tokens here are minted for."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import psycopg
import pytest
import uvicorn
from pydantic import SecretStr

from engine.ai import budget
from engine.ai import store as ai_store
from engine.ai.gateway import Gateway
from engine.migrate import migrate
from engine.settings import Settings
from engine.store import Role, create_client
from tests.ai_upstream import Upstream, serving

OPERATOR_KEY = "sk-ant-api03-operator-only-" + "x" * 20
BETA = "claude-code-20250219,interleaved-thinking-2025-05-14"


@pytest.fixture
def world(database: str) -> Iterator[dict[str, Any]]:
    """A database with a running sandbox row, the stand-in upstream and the gateway on a
    free port of 127.0.0.1."""
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        owner, _ = create_client(conn, name="hiring", role=Role.MEMBER)
    with serving() as (url, upstream):
        settings = Settings(
            database_url=database,
            anthropic_upstream=url,
            anthropic_api_key=SecretStr(OPERATOR_KEY),
            gateway_port=0,
        )
        gateway = Gateway(settings)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = uvicorn.Server(
            uvicorn.Config(gateway, host="127.0.0.1", port=port, log_level="warning")
        )
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
            time.sleep(0.02)
        try:
            yield {
                "base": f"http://127.0.0.1:{port}",
                "upstream": upstream,
                "database": database,
                "owner": owner.id,
                "gateway": gateway,
            }
        finally:
            server.should_exit = True
            thread.join(timeout=30)


def sandbox(
    world: dict[str, Any],
    sid: str,
    *,
    state: str = "running",
    addresses: tuple[str, ...] = ("127.0.0.1",),
    model: str | None = None,
    max_tokens: int = 4096,
    budget_tokens: int = 1_000_000,
) -> str:
    """A sandbox row and its token (returned)."""
    with psycopg.connect(world["database"], autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sandboxes (id, owner_id, template, state, expires_at)"
            " VALUES (%s, %s, 'tmpl', %s, now() + interval '1 hour')",
            (sid, world["owner"], state),
        )
        return ai_store.mint(
            conn,
            sandbox_id=sid,
            owner_id=world["owner"],
            template="tmpl",
            model=model,
            max_tokens=max_tokens,
            budget_tokens=budget_tokens,
            addresses=list(addresses),
        )


def body(prompt: str = "hello", *, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-test-1",
        "max_tokens": 1024,
        "stream": stream,
        "tools": [{"name": "Bash", "input_schema": {"type": "object"}}],
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        **extra,
    }


def headers(token: str, session: str = "session-1") -> dict[str, str]:
    return {
        "Authorization": f"Bearer {token}",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": BETA,
        "content-type": "application/json",
        "X-Claude-Code-Session-Id": session,
    }


def exchanges(world: dict[str, Any], sid: str) -> list[dict[str, Any]]:
    # The record is written just after the answer: wait for it.
    deadline = time.monotonic() + 10
    with psycopg.connect(world["database"]) as conn:
        while True:
            rows = ai_store.exchanges(conn, sid)
            if all(r["finished_at"] for r in rows) or time.monotonic() > deadline:
                return rows
            conn.rollback()
            time.sleep(0.05)


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        data = [ln[6:] for ln in block.splitlines() if ln.startswith("data: ")]
        if data:
            out.append(json.loads("\n".join(data)))
    return out


def test_a_streamed_answer_passes_through_as_it_arrives(world: dict[str, Any]) -> None:
    token = sandbox(world, "stream0001")
    upstream: Upstream = world["upstream"]
    upstream.pause = 0.25  # between events: a buffering gateway would deliver all at once
    sent = json.dumps(body("say hi")).encode()
    arrivals: list[tuple[float, bytes]] = []
    started = time.monotonic()
    with httpx.stream(
        "POST", world["base"] + "/v1/messages?beta=true", content=sent, headers=headers(token)
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_raw():
            arrivals.append((time.monotonic() - started, chunk))
    raw = b"".join(c for _, c in arrivals)
    got = events(raw)
    kinds = [e["type"] for e in got]
    assert kinds[:2] == ["message_start", "ping"], kinds  # ping events kept
    assert kinds[-2:] == ["message_delta", "message_stop"], kinds
    first_delta = next(t for t, c in arrivals if b"content_block_delta" in c)
    assert arrivals[-1][0] - first_delta > 0.5, arrivals  # the first delta came well before the end
    # Upstream: the body byte for byte, the two headers, the operator's key; no sandbox token.
    [seen] = upstream.seen
    assert seen.raw == sent
    assert seen.path == "/v1/messages"
    assert seen.headers["anthropic-version"] == "2023-06-01"
    assert seen.headers["anthropic-beta"] == BETA
    assert seen.headers["x-api-key"] == OPERATOR_KEY
    assert "authorization" not in seen.headers
    assert token not in json.dumps(seen.headers) and b"sgt_" not in seen.raw
    # Recorded: usage as streamed (message_start, then the last message_delta), the answer.
    [row] = exchanges(world, "stream0001")
    text = "".join(e["delta"]["text"] for e in got if e["type"] == "content_block_delta")
    assert row["answer"]["content"] == [{"type": "text", "text": text}]
    assert row["usage"]["output_tokens"] == got[-2]["usage"]["output_tokens"]
    assert row["usage"]["input_tokens"] == got[0]["message"]["usage"]["input_tokens"]
    assert row["status"] == 200 and row["session_id"] == "session-1" and not row["side"]


def test_non_streamed_answers_count_tokens_and_the_probe(world: dict[str, Any]) -> None:
    token = sandbox(world, "plain00001")
    with httpx.Client(base_url=world["base"], headers=headers(token), timeout=30) as http:
        assert http.head("/").status_code == 200
        answer = http.post("/v1/messages", json=body("RUN: echo 42", stream=False))
        assert answer.status_code == 200, answer.text
        message = answer.json()
        assert message["content"][0]["type"] == "tool_use"
        counted = http.post("/v1/messages/count_tokens?beta=true", json=body(stream=False))
        assert counted.status_code == 200 and counted.json()["input_tokens"] > 0
    rows = exchanges(world, "plain00001")
    assert len(rows) == 1  # count_tokens is not part of the conversation
    assert rows[0]["answer"]["content"][0]["input"] == {
        "command": "echo 42",
        "description": "Run the command",
    }
    with psycopg.connect(world["database"]) as conn:
        usage = ai_store.usage(conn, "plain00001")
    assert usage is not None
    assert usage["used_tokens"] == budget.billed(message["usage"])
    assert usage["requests"] == 2  # the count_tokens call is a request, billed nothing


def test_upstream_error_bodies_pass_through_unchanged(world: dict[str, Any]) -> None:
    token = sandbox(world, "errors0001")
    overloaded = b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}'
    invalid = b'{"type":"error","error":{"type":"invalid_request_error","message":"bad x"}}'
    world["upstream"].errors = [(529, overloaded), (400, invalid)]
    with httpx.Client(base_url=world["base"], headers=headers(token), timeout=30) as http:
        first = http.post("/v1/messages", json=body())
        second = http.post("/v1/messages", json=body(stream=False))
    assert (first.status_code, first.content) == (529, overloaded)
    assert (second.status_code, second.content) == (400, invalid)
    rows = exchanges(world, "errors0001")
    assert [r["status"] for r in rows] == [529, 400]
    assert "overloaded_error" in rows[0]["error"]
    with psycopg.connect(world["database"]) as conn:
        assert ai_store.usage(conn, "errors0001")["used_tokens"] == 0  # type: ignore[index]


def test_refusals_are_final_for_claude_code_and_say_why(world: dict[str, Any]) -> None:
    live = sandbox(world, "refuse0001", model="claude-test-1", max_tokens=512)
    elsewhere = sandbox(world, "refuse0002", addresses=("10.99.0.7",))
    gone = sandbox(world, "refuse0003", state="destroying")
    spent = sandbox(world, "refuse0004", budget_tokens=100)
    with psycopg.connect(world["database"], autocommit=True) as conn:
        conn.execute("UPDATE ai_usage SET used_tokens = 100 WHERE sandbox_id = 'refuse0004'")
        revoked = sandbox(world, "refuse0005")
        ai_store.revoke(conn, "refuse0005")
    cases = [
        ({}, body(), 403, "permission_error", "no sandbox token"),
        (headers("sgt_forged"), body(), 403, "permission_error", "not valid here"),
        (headers(elsewhere), body(), 403, "permission_error", "not from its sandbox"),
        (headers(gone), body(), 403, "permission_error", "not valid here"),
        (headers(revoked), body(), 403, "permission_error", "not valid here"),
        (headers(live), body(model="claude-other"), 400, "invalid_request_error", "only"),
        (headers(spent), body(), 402, "billing_error", "AI budget is used up"),
        # A Console-style key header is no way around the token either.
        ({"x-api-key": OPERATOR_KEY}, body(), 403, "permission_error", "not valid here"),
    ]
    with httpx.Client(base_url=world["base"], timeout=30) as http:
        for given, request, status, kind, words in cases:
            answer = http.post("/v1/messages", json=request, headers=given)
            assert answer.status_code == status, (given, answer.text)
            error = answer.json()
            assert error["type"] == "error" and error["error"]["type"] == kind, error
            assert words in error["error"]["message"], error
    assert world["upstream"].seen == []  # nothing refused went upstream
    with psycopg.connect(world["database"]) as conn:
        reasons = dict(
            conn.execute(
                "SELECT sandbox_id, refused FROM ai_exchanges WHERE refused IS NOT NULL"
            ).fetchall()
        )
    assert reasons == {"refuse0002": "address", "refuse0001": "model", "refuse0004": "budget"}
    refusals = world["gateway"].metrics.refusals
    assert refusals.labels(reason="budget")._value.get() == 1
    assert refusals.labels(reason="token")._value.get() == 5


def test_the_gateway_port_answers_nothing_but_the_gateway(world: dict[str, Any]) -> None:
    token = sandbox(world, "nothing001")
    with httpx.Client(base_url=world["base"], headers=headers(token), timeout=30) as http:
        for method, path in (
            ("GET", "/api/v1/sandboxes"),
            ("GET", "/api/v1/templates"),
            ("GET", "/docs"),
            ("GET", "/openapi.json"),
            ("GET", "/metrics"),
            ("GET", "/healthz"),
            ("GET", "/"),
            ("GET", "/v1/models"),
            ("POST", "/api/v1/keys"),
        ):
            answer = http.request(method, path)
            assert answer.status_code == 404, (method, path, answer.text)
            assert answer.json()["error"]["type"] == "not_found_error"


def test_a_max_tokens_over_the_template_s_cap_is_lowered(world: dict[str, Any]) -> None:
    token = sandbox(world, "capped0001", max_tokens=512)
    request = body(max_tokens=32000, thinking={"type": "enabled", "budget_tokens": 4000})
    with httpx.Client(base_url=world["base"], headers=headers(token), timeout=30) as http:
        assert http.post("/v1/messages", json=request).status_code == 200
        under = json.dumps(body(max_tokens=100)).encode()
        assert http.post("/v1/messages", content=under).status_code == 200
    capped, kept = world["upstream"].seen
    assert capped.body["max_tokens"] == 512 and capped.body["thinking"]["budget_tokens"] == 511
    assert capped.body["messages"] == request["messages"]
    assert kept.raw == under  # under the cap: the body unchanged, byte for byte


def test_twenty_requests_at_the_budget_s_edge_overshoot_by_one_reservation_at_most(
    world: dict[str, Any],
) -> None:
    """The stated bound (engine/ai/budget.py): the total passes the budget by at most one
    request's reservation, however many come at once."""
    budget_tokens = 600  # about eight of these requests
    token = sandbox(world, "edge000001", budget_tokens=budget_tokens, max_tokens=300)
    world["upstream"].pause = 0.02  # answers overlap
    request = body("a question near the end of the budget", max_tokens=300)
    size = len(json.dumps(request).encode())
    bound = budget.overshoot_bound(size, 300)

    async def one(http: httpx.AsyncClient) -> int:
        answer = await http.post("/v1/messages", json=request)
        await answer.aread()
        return answer.status_code

    async def burst() -> list[int]:
        async with httpx.AsyncClient(
            base_url=world["base"], headers=headers(token), timeout=60
        ) as http:
            return await asyncio.gather(*(one(http) for _ in range(20)))

    statuses = asyncio.run(burst())
    assert set(statuses) == {200, 402}, statuses
    rows = exchanges(world, "edge000001")
    with psycopg.connect(world["database"]) as conn:
        usage = ai_store.usage(conn, "edge000001")
    assert usage is not None
    used = usage["used_tokens"]
    billed = sum((r["usage"] and budget.billed(r["usage"])) or 0 for r in rows)
    assert used == billed
    assert statuses.count(402) == usage["refused"] == sum(1 for r in rows if r["refused"])
    print(
        f"20 at once: {statuses.count(200)} answered, {statuses.count(402)} refused; used"
        f" {used} of {budget_tokens} (overshoot {max(0, used - budget_tokens)}, bound {bound})"
    )
    assert used - budget_tokens <= bound
    # And once over, nothing more starts.
    with httpx.Client(base_url=world["base"], headers=headers(token), timeout=30) as http:
        assert http.post("/v1/messages", json=request).status_code == (
            402 if used >= budget_tokens else 200
        )


def test_an_unreachable_upstream_is_a_502_and_a_missing_key_a_403(database: str) -> None:
    migrate(database)
    with psycopg.connect(database, autocommit=True) as conn:
        owner, _ = create_client(conn, name="o", role=Role.MEMBER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]  # nothing listens here once the socket closes

    async def call(settings: Settings) -> httpx.Response:
        gateway = Gateway(settings)
        async with gateway.lifespan():
            transport = httpx.ASGITransport(app=gateway, client=("127.0.0.1", 5555))
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as http:
                return await http.post("/v1/messages", json=body(), headers=headers(token))

    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO sandboxes (id, owner_id, template, state, expires_at)"
            " VALUES ('dead000001', %s, 't', 'running', now() + interval '1 hour')",
            (owner.id,),
        )
        token = ai_store.mint(conn, sandbox_id="dead000001", owner_id=owner.id, template="t",
                              model=None, max_tokens=100, budget_tokens=10**6,
                              addresses=["127.0.0.1"])  # fmt: skip
    base = Settings(database_url=database, anthropic_upstream=f"http://127.0.0.1:{dead}")
    unreachable = asyncio.run(call(base.model_copy(update={"anthropic_api_key": SecretStr("k")})))
    assert unreachable.status_code == 502
    assert unreachable.json()["error"]["type"] == "api_error"
    keyless = asyncio.run(call(base))
    assert keyless.status_code == 403
    assert "no Anthropic API key" in keyless.json()["error"]["message"]


def test_stale_reservations_are_released_and_old_transcripts_pruned(world: dict[str, Any]) -> None:
    token = sandbox(world, "prune00001")
    with httpx.Client(base_url=world["base"], headers=headers(token), timeout=30) as http:
        assert http.post("/v1/messages", json=body()).status_code == 200
    exchanges(world, "prune00001")
    with psycopg.connect(world["database"], autocommit=True) as conn:
        # What a gateway that died mid-answer leaves: an open exchange holding 500 tokens.
        conn.execute(
            "INSERT INTO ai_exchanges (sandbox_id, kind, reserved, started_at)"
            " VALUES ('prune00001', 'messages', 500, now() - interval '1 hour')"
        )
        conn.execute(
            "UPDATE ai_usage SET reserved_tokens = reserved_tokens + 500"
            " WHERE sandbox_id = 'prune00001'"
        )
        assert ai_store.release_stale(conn) == 1
        (held,) = conn.execute(
            "SELECT reserved_tokens FROM ai_usage WHERE sandbox_id = 'prune00001'"
        ).fetchone() or (None,)
        assert held == 0
        assert conn.execute(
            "SELECT count(*) FROM ai_exchanges WHERE finished_at IS NULL"
        ).fetchone() == (0,)
        # Kept for the recordings' retention, then gone with its token.
        now = datetime.now(UTC)
        assert ai_store.prune(conn, now=now, retention=timedelta(days=30)) == 0
        conn.execute(
            "UPDATE ai_usage SET created_at = now() - interval '31 days'"
            " WHERE sandbox_id = 'prune00001'"
        )
        assert ai_store.prune(conn, now=now, retention=timedelta(days=30)) == 1
        for table in ("ai_usage", "ai_exchanges", "ai_tokens"):
            found = conn.execute(
                f"SELECT count(*) FROM {table} WHERE sandbox_id = 'prune00001'"  # noqa: S608
            ).fetchone()
            assert found == (0,), table
