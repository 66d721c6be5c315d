"""The AI gateway: the Anthropic Messages API for Claude Code in sandboxes, with the operator's
credential added here and nowhere else.

A listener of its own (``SANDBOX_GATEWAY_PORT``) that answers nothing but ``POST /v1/messages``
(streamed or not), ``POST /v1/messages/count_tokens`` and the ``HEAD`` probe; everything else
is a 404. Each request carries its sandbox's token (``Authorization: Bearer sgt_…``), good only
from that sandbox's own address while it runs. The body and the ``anthropic-version`` and
``anthropic-beta`` headers go upstream unchanged (only a ``max_tokens`` over the template's cap
is lowered, and then the body re-encoded) with ``x-api-key`` set to the operator's key; the
answer comes back as it arrives, chunk by chunk (``ping`` events included), and upstream error
bodies pass through unchanged. The stream is read on its way (``engine.ai.stream``) for the
usage and the assembled answer, which are recorded once it has been sent.

Refusals use the statuses Claude Code gives up on at once, never 401 or 429 (retried for
minutes): 403 for a token that is not good here, 402 for a used-up budget, 400 for a model
the template does not allow, each with an Anthropic-style error body whose message Claude Code
shows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import psycopg
import uvicorn
from prometheus_client import CollectorRegistry, Counter, Histogram
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.types import Message, Receive, Scope, Send

from engine.ai import budget, store, transcript
from engine.ai.stream import Assembler, from_message
from engine.settings import Settings

log = logging.getLogger("sandbox_engine.gateway")

MESSAGES = "/v1/messages"
COUNT_TOKENS = "/v1/messages/count_tokens"
# Request headers sent upstream as they came (lower-case); the credential is the gateway's.
FORWARDED = ("anthropic-version", "anthropic-beta", "content-type", "accept", "user-agent", "x-app")
# Answer headers not passed back: hop-by-hop, or about an encoding the gateway undid.
DROPPED = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
# Bytes of a non-streamed answer read for its record (it passes through whole regardless).
MAX_RECORDED = 8 << 20
DB_WAIT = 5.0
# Seconds a request waits for room the budget's reservations hold (requests still in flight
# that may leave it room); then it is refused like one over budget.
BUDGET_WAIT = 120.0


def error_body(kind: str, message: str) -> bytes:
    """An Anthropic-style error body: Claude Code shows its message."""
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": message}})


REFUSALS = {
    # reason: (status, Anthropic error type)
    "token": (403, "permission_error"),
    "address": (403, "permission_error"),
    "credential": (403, "permission_error"),
    "model": (400, "invalid_request_error"),
    "budget": (402, "billing_error"),
}


@dataclass
class Metrics:
    registry: CollectorRegistry
    requests: Counter
    tokens: Counter
    refusals: Counter
    added: Histogram

    @classmethod
    def make(cls) -> Metrics:
        registry = CollectorRegistry()
        return cls(
            registry,
            Counter(
                "sandbox_engine_ai_requests",
                "AI gateway requests forwarded, by template, kind and answer status",
                ["template", "kind", "status"],
                registry=registry,
            ),
            Counter(
                "sandbox_engine_ai_tokens",
                "Tokens of forwarded answers by template and kind (input, output, cache_read,"
                " cache_creation, billed)",
                ["template", "kind"],
                registry=registry,
            ),
            Counter(
                "sandbox_engine_ai_refusals",
                "Requests the AI gateway refused, by reason",
                ["reason"],
                registry=registry,
            ),
            Histogram(
                "sandbox_engine_ai_gateway_added_seconds",
                "Time the gateway adds before an answer's first byte (its own work: the token,"
                " budget and record, beside the upstream's time)",
                buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5),
                registry=registry,
            ),
        )


class Gateway:
    """The ASGI app. ``start``/``stop`` (or its lifespan) open and close its database pool and
    its upstream client."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.upstream = settings.anthropic_upstream.rstrip("/")
        self.key = settings.anthropic_api_key.get_secret_value()
        self.metrics = Metrics.make()
        self.port = settings.gateway_port  # the one it listens on, once it does
        self.pool: AsyncConnectionPool | None = None
        self.client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Conversations' last requests, for their next request's delta (the database
        # remembers them too, for a restarted gateway).
        self._priors: dict[tuple[str, str | None, str | None], transcript.Prior] = {}

    async def start(self) -> None:
        # Autocommit: an admission is one statement, one round trip (engine/ai/store.py). No
        # check when a connection is taken (a round trip per request): a broken one fails its
        # request, and the pool replaces it.
        self.pool = AsyncConnectionPool(
            self.settings.database_url.get_secret_value(),
            min_size=2,
            max_size=16,
            open=False,
            timeout=DB_WAIT,
            kwargs={"autocommit": True},
        )
        await self.pool.open(wait=True, timeout=30.0)
        self.client = httpx.AsyncClient(
            timeout=httpx.Timeout(
                connect=10.0, read=self.settings.gateway_stream_timeout, write=60.0, pool=30.0
            ),
            limits=httpx.Limits(max_connections=500, max_keepalive_connections=100),
        )

    async def stop(self) -> None:
        if self._tasks:  # the records of answers already sent
            await asyncio.wait(self._tasks, timeout=30)
        if self.client is not None:
            await self.client.aclose()
        if self.pool is not None:
            await self.pool.close()

    @asynccontextmanager
    async def lifespan(self, _: Any = None) -> AsyncIterator[None]:
        await self.start()
        try:
            yield
        finally:
            await self.stop()

    # --- ASGI --------------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return  # no WebSockets here
        method, path = scope["method"], scope["path"]
        if method == "HEAD" and path in ("/", "/api/hello"):
            await _respond(send, 200, b"", head=True)
        elif method == "POST" and path in (MESSAGES, COUNT_TOKENS):
            await self._forward(scope, receive, send, path)
        else:
            await _respond(send, 404, error_body("not_found_error", f"no gateway route {path}"))

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.start()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    # --- one request -------------------------------------------------------------------------

    async def _forward(self, scope: Scope, receive: Receive, send: Send, path: str) -> None:
        received = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        asked = await self._read(receive, send, headers, path)
        if asked is None:
            return
        admitted = await self._admitted(send, asked, (scope.get("client") or ("", 0))[0])
        if admitted is None:
            return
        admission, prior = admitted
        body = asked.body
        if (
            asked.kind == "messages"
            and admission.max_tokens
            and asked.wanted > admission.max_tokens
        ):
            body = _capped(asked.request, admission.max_tokens)
        record = _Record(
            gateway=self,
            admission=admission,
            kind=asked.kind,
            stream=asked.stream,
            messages=asked.messages if asked.kind == "messages" else [],
            prior=prior,
            session=asked.session,
            agent=asked.agent,
            side=asked.side,
            received=received,
        )
        query = scope.get("query_string", b"").decode("latin-1")
        await self._relay(send, path + (f"?{query}" if query else ""), headers, body, record)

    async def _read(
        self, receive: Receive, send: Send, headers: dict[str, str], path: str
    ) -> _Asked | None:
        """The request, or None once it is answered (too large, not JSON, no token or no key
        to forward it with)."""
        body = await _read_body(receive, self.settings.gateway_max_body)
        if body is None:
            limit = self.settings.gateway_max_body
            await _respond(send, 413, error_body("request_too_large", f"over {limit} bytes"))
            return None
        try:
            request = orjson.loads(body)
            if not isinstance(request, dict):
                raise ValueError("not an object")
        except ValueError:
            await _respond(
                send, 400, error_body("invalid_request_error", "the body is no JSON object")
            )
            return None
        asked = _Asked.of(
            body, request, headers, "messages" if path == MESSAGES else "count_tokens"
        )
        if not asked.token:
            await self._refuse(send, "token", "this request carries no sandbox token")
            return None
        if not self.key:
            await self._refuse(send, "credential", "the engine has no Anthropic API key configured")
            return None
        return asked

    async def _admitted(
        self, send: Send, asked: _Asked, peer: str
    ) -> tuple[store.Admission, transcript.Prior | None] | None:
        """The admission and the prior request, or None once the request is refused."""
        waiting_until = time.monotonic() + BUDGET_WAIT
        while True:
            try:
                admission, prior = await self._admit(
                    token=asked.token,
                    peer=peer,
                    kind=asked.kind,
                    model=asked.model,
                    reserve=budget.reservation(len(asked.body), asked.wanted)
                    if asked.kind == "messages"
                    else 0,
                    session=asked.session,
                    agent=asked.agent,
                    side=asked.side,
                    stream=asked.stream,
                    final=time.monotonic() > waiting_until,
                    messages=asked.messages,
                )
            except (psycopg.OperationalError, PoolTimeout):
                # Claude Code retries a 5xx: the database is back in seconds (a restart).
                await _respond(send, 503, error_body("api_error", "the AI gateway's database is"
                                                     " not reachable; retry"))  # fmt: skip
                return None
            if admission.refused != "wait":
                break
            # The budget is held by requests in flight, not spent: wait for them to end
            # (without holding a connection their records need).
            await asyncio.sleep(0.05)
        if admission.refused is None:
            return admission, prior
        detail = admission.detail
        if admission.refused in ("token", "address"):
            detail = f"this sandbox token is not valid here ({detail})"
        await self._refuse(send, admission.refused, detail)
        return None

    async def _relay(
        self, send: Send, target: str, headers: dict[str, str], body: bytes, record: _Record
    ) -> None:
        """Forward the request with the operator's key and stream the answer back as it comes,
        recording it on the way."""
        assert self.client is not None
        upstream_headers = {k: headers[k] for k in FORWARDED if k in headers}
        upstream_headers["x-api-key"] = self.key
        upstream_headers["accept-encoding"] = "identity"  # the stream is read on its way
        sent = time.perf_counter()
        try:
            answer = await self.client.send(
                self.client.build_request(
                    "POST", self.upstream + target, content=body, headers=upstream_headers
                ),
                stream=True,
            )
        except httpx.HTTPError as exc:
            record.failed(502, f"the upstream did not answer: {type(exc).__name__}")
            await _respond(
                send,
                502,
                error_body("api_error", "the AI gateway could not reach the upstream API"),
            )
            return
        record.upstream_first(sent)
        out_headers = [
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in answer.headers.multi_items()
            if k.lower() not in DROPPED
        ]
        await send(
            {"type": "http.response.start", "status": answer.status_code, "headers": out_headers}
        )
        try:
            async for chunk in answer.aiter_raw():
                record.chunk(chunk, answer.status_code)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            record.done(answer.status_code, None)
        except (httpx.HTTPError, OSError) as exc:
            record.done(answer.status_code, f"the answer broke off: {type(exc).__name__}")
        except BaseException:  # the client went away (cancelled): what came is still recorded
            record.done(answer.status_code, "the client went away mid-answer")
            raise
        finally:
            await answer.aclose()

    async def _admit(
        self, *, messages: list[Any], **given: Any
    ) -> tuple[store.Admission, transcript.Prior | None]:
        """The admission (engine/ai/store.py) and, for a conversation's request, the prior
        request it continues; this one is remembered for the next now, not once its answer is
        recorded (the next request comes that fast)."""
        assert self.pool is not None
        prior = None
        async with self.pool.connection() as conn:
            admission = await store.admit(conn, **given)
            if admission.exchange is not None and given["kind"] == "messages" and not given["side"]:
                key = (str(admission.sandbox_id), given["session"], given["agent"])
                prior = self._priors.get(key) or await store.prior(
                    conn, str(admission.sandbox_id), given["session"], given["agent"]
                )
                current = transcript.prior_of(messages)
                if current is not None:
                    self.remember(key, current)
        return admission, prior

    async def _refuse(self, send: Send, reason: str, message: str) -> None:
        status, kind = REFUSALS[reason]
        self.metrics.refusals.labels(reason=reason).inc()
        await _respond(send, status, error_body(kind, message))

    def spawn(self, work: Callable[[], Awaitable[None]]) -> None:
        """Run a record's database work after its answer was sent (off the answer's path)."""
        task = asyncio.get_running_loop().create_task(_logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def remember(self, key: tuple[str, str | None, str | None], prior: transcript.Prior) -> None:
        if len(self._priors) > 10_000:
            self._priors.clear()
        self._priors[key] = prior


@dataclass(frozen=True)
class _Asked:
    """What a request asks for, read from its body and headers."""

    body: bytes
    request: dict[str, Any]
    kind: str  # messages | count_tokens
    token: str
    model: str | None
    session: str | None
    agent: str | None
    stream: bool
    side: bool
    wanted: int  # max_tokens asked for; 0 when none is given
    messages: list[Any]

    @classmethod
    def of(cls, body: bytes, request: dict[str, Any], headers: dict[str, str], kind: str) -> _Asked:
        model, given, wanted = (
            request.get("model"),
            request.get("messages"),
            request.get("max_tokens"),
        )
        return cls(
            body=body,
            request=request,
            kind=kind,
            token=_token(headers),
            model=model if isinstance(model, str) else None,
            session=headers.get("x-claude-code-session-id"),
            agent=headers.get("x-claude-code-agent-id"),
            stream=bool(request.get("stream")) and kind == "messages",
            side=transcript.is_side(request),
            wanted=wanted if isinstance(wanted, int) and not isinstance(wanted, bool) else 0,
            messages=given if isinstance(given, list) else [],
        )


class _Record:
    """What is kept of one forwarded exchange, built as its answer passes through."""

    def __init__(
        self,
        *,
        gateway: Gateway,
        admission: store.Admission,
        kind: str,
        stream: bool,
        messages: list[Any],
        prior: transcript.Prior | None,
        session: str | None,
        agent: str | None,
        side: bool,
        received: float,
    ) -> None:
        self.gateway, self.admission, self.kind, self.stream = gateway, admission, kind, stream
        self.side = side
        self.messages, self.prior, self.session, self.agent = messages, prior, session, agent
        self.received = received
        self.assembler = Assembler() if stream else None
        self.raw: list[bytes] = []
        self.size = 0
        self.first_byte_ms: float | None = None
        self.upstream_ms: float | None = None
        self.closed = False

    def upstream_first(self, sent: float) -> None:
        now = time.perf_counter()
        self.upstream_ms = (now - sent) * 1000

    def chunk(self, chunk: bytes, status: int) -> None:
        if self.first_byte_ms is None:
            self.first_byte_ms = (time.perf_counter() - self.received) * 1000
            if self.upstream_ms is not None:
                added = max(0.0, self.first_byte_ms - self.upstream_ms) / 1000
                self.gateway.metrics.added.observe(added)
        if self.assembler is not None and status == 200:
            self.assembler.feed(chunk)
        elif self.size < MAX_RECORDED:
            self.raw.append(chunk)
            self.size += len(chunk)

    def failed(self, status: int, error: str) -> None:
        self.done(status, error)

    def done(self, status: int, error: str | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.gateway.spawn(lambda: self._write(status, error))

    def _answer(
        self, status: int, error: str | None
    ) -> tuple[dict[str, Any] | None, dict[str, int], str | None, str | None]:
        """What the upstream answered, read from the stream or the body: the answer as the
        transcript keeps it, its usage, its model, and the error (given, or the upstream's)."""
        answer: dict[str, Any] | None = None
        usage: dict[str, int] = {}
        model = None
        if self.assembler is not None and status == 200:
            result = self.assembler.result()
            answer, usage, model = result.public(), result.usage, result.model or None
            if result.error and not error:
                error = str(result.error.get("message") or result.error)
        elif self.raw:
            raw = b"".join(self.raw)
            try:
                parsed = orjson.loads(raw)
            except ValueError:
                parsed = None
            if status == 200 and self.kind == "messages":
                result = from_message(parsed)
                answer, usage, model = result.public(), result.usage, result.model or None
            elif status == 200:  # count_tokens: its answer is the count
                answer = parsed if isinstance(parsed, dict) else None
            elif not error:
                error = raw[:2000].decode("utf-8", "replace")
        if status != 200 and not error:
            error = f"the upstream answered {status}"
        return answer, usage, model, error

    async def _write(self, status: int, error: str | None) -> None:
        gateway, admission = self.gateway, self.admission
        assert gateway.pool is not None and admission.exchange is not None
        answer, usage, model, error = self._answer(status, error)
        billed = budget.billed(usage) if self.kind == "messages" and status == 200 else 0
        start, kept = transcript.new_messages(self.messages, self.prior)
        current = transcript.prior_of(self.messages)
        done = store.Finished(
            status=status,
            usage=usage,
            billed=billed,
            model=model,
            message_count=current.total if current else 0,
            first_digest=current.first if current else None,
            last_digest=current.last if current else None,
            first_message=start,
            messages=kept,
            answer=answer,
            error=error,
            first_byte_ms=self.first_byte_ms,
            upstream_ms=self.upstream_ms,
        )
        sandbox = str(admission.sandbox_id)
        # On the sandbox's activity timeline (engine.hiring.timeline), as its events are.
        timeline = (
            transcript.summary(kept, answer)
            if self.kind == "messages" and answer is not None and not self.side
            else None
        )
        async with gateway.pool.connection() as conn:
            await store.finish(conn, admission.exchange, sandbox, done, event=timeline)
        template = admission.template or ""
        metrics = gateway.metrics
        metrics.requests.labels(template=template, kind=self.kind, status=str(status)).inc()
        for name, value in usage.items():
            metrics.tokens.labels(template=template, kind=name.removesuffix("_tokens")
                                  .removesuffix("_input")).inc(value)  # fmt: skip
        if billed:
            metrics.tokens.labels(template=template, kind="billed").inc(billed)


async def _logged(work: Callable[[], Awaitable[None]]) -> None:
    try:
        await work()
    except Exception:
        log.exception("recording an AI exchange")


def _token(headers: dict[str, str]) -> str:
    auth = headers.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("x-api-key", "").strip()


def _capped(request: dict[str, Any], cap: int) -> bytes:
    """The body with ``max_tokens`` lowered to the cap (and a thinking budget under it)."""
    changed = dict(request, max_tokens=cap)
    thinking = request.get("thinking")
    given = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
    if isinstance(thinking, dict) and isinstance(given, int) and given >= cap:
        changed["thinking"] = dict(thinking, budget_tokens=max(1, cap - 1))
    return orjson.dumps(changed)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The request's body, or None past ``limit`` bytes (read no further)."""
    parts: list[bytes] = []
    size = 0
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(parts)
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
        if not message.get("more_body"):
            return b"".join(parts)


async def _respond(send: Send, status: int, body: bytes, *, head: bool = False) -> None:
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b"" if head else body})


class QuietServer(uvicorn.Server):
    """A uvicorn server that leaves the process's signals alone: another server (the API's)
    or the caller owns them; this one stops when told to (``should_exit``)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def running(settings: Settings, gateway: Gateway | None = None) -> AsyncIterator[Gateway]:
    """The gateway served on ``settings.gateway_host:gateway_port`` in this event loop (inside
    the API's lifespan: ``serve`` runs both); yields it once it listens (its ``port`` set)."""
    gateway = gateway or Gateway(settings)
    await gateway.start()

    server = QuietServer(
        uvicorn.Config(
            gateway,
            host=settings.gateway_host,
            port=settings.gateway_port,
            lifespan="off",
            log_level="warning",
            access_log=False,
        )
    )
    task = asyncio.get_running_loop().create_task(server.serve())
    deadline = time.monotonic() + 30
    while not server.started:
        if task.done():
            await gateway.stop()
            task.result()  # raises what stopped it (the port taken, say)
            raise RuntimeError(f"the AI gateway could not listen on port {settings.gateway_port}")
        if time.monotonic() > deadline:
            raise RuntimeError("the AI gateway did not start")
        await asyncio.sleep(0.02)
    gateway.port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield gateway
    finally:
        server.should_exit = True
        with contextlib.suppress(Exception):
            await task
        await gateway.stop()
