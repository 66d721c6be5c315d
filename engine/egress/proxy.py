"""The egress proxy: the one way out of a restricted sandbox's network (docs/security.md).

The host firewall drops everything a restricted sandbox's bridge would forward outside it, so
a workspace reaches the outside only here, at ``egress-proxy:<SANDBOX_EGRESS_PORT>`` (its
proxy variables say so; package managers follow them). The sandbox is known by the address a
connection comes from (a workspace cannot change it: no capability), and every connection is
checked against that sandbox's rules (engine/model/egress.py):

- ``CONNECT host:port`` (HTTPS, and anything a client tunnels): the host checked; once the
  tunnel is up, the TLS ClientHello's server name must be that host too (no other name
  fronted through an allowed one's connection);
- ``GET http://host/…`` (plain HTTP through a proxy): the host checked, the request sent on
  in origin form, then the connection relayed.

Connections that go past the proxy (its variables unset, a raw address, another port) are
redirected by the host firewall to a second port, the catch port, when they are TCP to a public
address: the proxy records each as refused, with its original destination and the name its
first bytes give (SNI, Host), and closes it.

The proxy resolves a name itself (what the sandbox resolved does not matter) and never
connects to loopback, link-local, multicast or unspecified addresses. A refused connection gets
``403`` with the reason, and is counted and recorded as an ``egress`` event of the sandbox,
``SANDBOX_EGRESS_EVENTS_PER_MINUTE`` at most.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from psycopg_pool import AsyncConnectionPool

from engine.egress import store
from engine.model.egress import Address, Rules, never_reached
from engine.settings import Settings
from engine.store import add_event_async

log = logging.getLogger("sandbox_engine.egress")

MAX_HEAD = 16 * 1024  # bytes of a request's head
HEAD_TIMEOUT = 30.0  # seconds a client has to send its request's head
CONNECT_TIMEOUT = 10.0
HELLO_TIMEOUT = 10.0  # seconds after a tunnel is up for the ClientHello
RULES_TTL = 2.0  # seconds a sandbox's rules are kept before they are read again
CHUNK = 64 * 1024
CATCH_PEEK = 2.0  # seconds a caught connection has to send its first bytes (a name)
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h


class Refused(Exception):
    def __init__(self, host: str, port: int, reason: str, status: int = 403) -> None:
        super().__init__(f"{host}:{port}: {reason}")
        self.host, self.port, self.reason, self.status = host, port, reason, status


@dataclass
class _Budget:
    """A sandbox's refused connections recorded as events this minute."""

    minute: int = 0
    used: int = 0
    seen: dict[str, int] = field(default_factory=dict)  # "host:port" → minute last recorded


class EgressProxy:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.registry = CollectorRegistry()  # what /metrics shows of it
        self.connections = Counter(
            "sandbox_engine_egress_connections",
            "Connections through the egress proxy by template and result (allowed, or the"
            " refusal's kind)",
            ["template", "result"],
            registry=self.registry,
        )
        self.pool: AsyncConnectionPool | None = None
        self.server: asyncio.Server | None = None
        self.catcher: asyncio.Server | None = None
        self.port = 0
        self._rules: dict[str, tuple[float, tuple[str, str, Rules] | None]] = {}
        self._budgets: dict[str, _Budget] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.pool = AsyncConnectionPool(
            self.settings.database_url.get_secret_value(),
            min_size=1,
            max_size=4,
            open=False,
            kwargs={"autocommit": True},
        )
        await self.pool.open(wait=True, timeout=30.0)
        self.server = await asyncio.start_server(
            self._serve, host=self.settings.gateway_host, port=self.settings.egress_port
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.catcher = await asyncio.start_server(
            self._catch, host=self.settings.gateway_host, port=self.settings.egress_catch_port
        )

    async def stop(self) -> None:
        if self.catcher is not None:
            self.catcher.close()
        if self.server is not None:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.server.wait_closed(), 5)
        if self.pool is not None:
            await self.pool.close()

    # --- one connection ---------------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = str(writer.get_extra_info("peername")[0])
        who: tuple[str, str, Rules] | None = None
        try:
            who = await self._who(peer)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT)
            method, target, lines = _parse_head(head)
            if who is None:
                raise Refused(target, 0, "the proxy serves sandboxes with egress rules only")
            _, template, rules = who
            if method == "CONNECT":
                host, port = _split(target, None)
                upstream = await self._open(rules, host, port)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await writer.drain()
                first = await _hello(reader)
                name = server_name(first)
                if name is not None and name.lower() != host.lower().strip("[]"):
                    upstream[1].close()
                    raise Refused(host, port, f"TLS server name {name!r} is not {host!r}")
            else:
                host, port, request = _origin_form(method, target, lines)
                upstream = await self._open(rules, host, port)
                first = request
            self.connections.labels(template, "allowed").inc()
            up_reader, up_writer = upstream
            up_writer.write(first)
            await _relay(reader, writer, up_reader, up_writer)
        except Refused as refused:
            template = who[1] if who else ""
            kind = "refused" if refused.status == 403 else "failed"
            self.connections.labels(template, kind).inc()
            await self._answer(writer, refused)
            if who is not None and refused.status == 403:
                await self._record(who[0], refused)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass  # a client that went away or never spoke
        except (ValueError, UnicodeDecodeError) as exc:
            await self._answer(writer, Refused("", 0, f"bad request: {exc}", 400))
        except OSError as exc:
            log.debug("egress connection from %s: %s", peer, exc)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _catch(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A connection the firewall redirected here because it went past the proxy: its
        original destination (and the name its first bytes give, if any) recorded as
        refused; then closed."""
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            peer = str(writer.get_extra_info("peername")[0])
            host, port = original_destination(writer.get_extra_info("socket"))
            who = await self._who(peer)
            if who is None:
                return
            first = b""
            with contextlib.suppress(TimeoutError, OSError):
                first = await asyncio.wait_for(reader.read(CHUNK), CATCH_PEEK)
            name = server_name(first) or _host_header(first)
            self.connections.labels(who[1], "refused").inc()
            to = f" (to {name})" if name and name != host else ""
            reason = f"a direct connection{to}, not through the egress proxy"
            await self._record(who[0], Refused(host, port, reason))
        except OSError as exc:
            log.debug("egress catch: %s", exc)
        finally:
            with contextlib.suppress(Exception):
                writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _who(self, peer: str) -> tuple[str, str, Rules] | None:
        """The sandbox at this address and its rules (kept RULES_TTL seconds)."""
        now = time.monotonic()
        known = self._rules.get(peer)
        if known is not None and now - known[0] < RULES_TTL:
            return known[1]
        assert self.pool is not None
        async with self.pool.connection() as conn:
            row = await store.rules_at(conn, peer)
        found = (row[0], row[1], Rules.from_json(row[2])) if row else None
        if len(self._rules) > 10_000:
            self._rules.clear()
        self._rules[peer] = (now, found)
        return found

    async def _open(
        self, rules: Rules, host: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to host:port if the rules allow it (Refused otherwise)."""
        literal = _address(host)
        if literal is not None:
            why = rules.refuses_address(literal) or (
                "an address the proxy never connects to" if never_reached(literal) else None
            )
            if why:
                raise Refused(host, port, why)
            addresses = [str(literal)]
        else:
            why = rules.refuses_name(host, port)
            if why:
                raise Refused(host, port, why)
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                raise Refused(host, port, f"does not resolve: {exc}", 502) from None
            addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
            addresses = [a for a in addresses if not never_reached(ipaddress.ip_address(a))]
            if not addresses:
                raise Refused(host, port, "resolves to addresses the proxy never connects to")
        last: Exception | None = None
        for address in addresses:
            try:
                return await asyncio.wait_for(
                    asyncio.open_connection(address, port, limit=CHUNK), CONNECT_TIMEOUT
                )
            except (OSError, TimeoutError) as exc:
                last = exc
        raise Refused(host, port, f"could not connect: {last}", 502)

    async def _answer(self, writer: asyncio.StreamWriter, refused: Refused) -> None:
        reason = {403: "Forbidden", 400: "Bad Request"}.get(refused.status, "Bad Gateway")
        body = f"egress proxy: {refused}\n".encode()
        with contextlib.suppress(Exception):
            writer.write(
                f"HTTP/1.1 {refused.status} {reason}\r\ncontent-type: text/plain\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()

    async def _record(self, sandbox_id: str, refused: Refused) -> None:
        """The refusal as an event of the sandbox, within its budget a minute; the same
        refusal (host, port and reason) once a minute."""
        minute = int(time.time() // 60)
        budget = self._budgets.setdefault(sandbox_id, _Budget())
        if budget.minute != minute:
            budget.minute, budget.used = minute, 0
            budget.seen = {k: v for k, v in budget.seen.items() if v == minute}
        key = f"{refused.host}:{refused.port}: {refused.reason}"
        if budget.seen.get(key) == minute or budget.used >= self.settings.egress_events_per_minute:
            return
        budget.used += 1
        budget.seen[key] = minute
        if len(self._budgets) > 10_000:
            self._budgets.clear()
        assert self.pool is not None
        try:
            async with self.pool.connection() as conn:
                await add_event_async(conn, sandbox_id, "egress", f"refused {key}")
        except Exception as exc:  # the refusal stands; only its record is lost
            log.warning("egress event of %s not recorded: %s", sandbox_id, exc)


# --- the protocol, pure -----------------------------------------------------------------------


def _parse_head(head: bytes) -> tuple[str, str, list[str]]:
    if len(head) > MAX_HEAD:
        raise ValueError("request head too long")
    text = head.decode("latin-1")
    request, *lines = text.split("\r\n")
    parts = request.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        raise ValueError(f"not an HTTP request line: {request[:80]!r}")
    return parts[0].upper(), parts[1], [line for line in lines if line]


def _split(authority: str, default: int | None) -> tuple[str, int]:
    """host and port of ``host:port`` / ``[v6]:port`` (``default`` when no port)."""
    host, sep, port = authority.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.startswith("[")):
        host, port = authority, ""
    if not port:
        if default is None:
            raise ValueError(f"{authority!r} names no port")
        return authority.strip("[]"), default
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{authority!r}: bad port")
    return host.strip("[]"), int(port)


def _origin_form(method: str, target: str, lines: list[str]) -> tuple[str, int, bytes]:
    """host, port and the request to send on, for an absolute-form plain HTTP request."""
    if not target.lower().startswith("http://"):
        raise ValueError("a request through the proxy names an http:// URL (or uses CONNECT)")
    rest = target[len("http://") :]
    authority, slash, path = rest.partition("/")
    host, port = _split(authority.rpartition("@")[2], 80)
    kept = [
        line
        for line in lines
        if not line.lower().startswith(("proxy-connection:", "proxy-authorization:"))
    ]
    head = f"{method} /{path if slash else ''} HTTP/1.1\r\n" + "".join(f"{x}\r\n" for x in kept)
    return host, port, (head + "\r\n").encode("latin-1")


def original_destination(sock: socket.socket) -> tuple[str, int]:
    """Where a redirected connection was going (SO_ORIGINAL_DST, IPv4)."""
    raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    return socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")


def _host_header(head: bytes) -> str | None:
    """The Host header of a plain HTTP request's first bytes; None when there is none."""
    for line in head.split(b"\r\n")[1:]:
        if line.lower().startswith(b"host:"):
            value = line[5:].strip().decode("latin-1")
            return value.rpartition(":")[0] if value.count(":") == 1 else value
        if not line:
            break
    return None


def _address(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


async def _hello(reader: asyncio.StreamReader) -> bytes:
    """The tunnel's first bytes: a whole TLS record when it starts as one."""
    try:
        first = await asyncio.wait_for(reader.read(CHUNK), HELLO_TIMEOUT)
        if len(first) >= 5 and first[0] == 0x16:
            size = 5 + int.from_bytes(first[3:5], "big")
            while len(first) < min(size, MAX_HEAD):
                more = await asyncio.wait_for(reader.read(size - len(first)), HELLO_TIMEOUT)
                if not more:
                    break
                first += more
        return first
    except TimeoutError:
        return b""  # a client that speaks second (not TLS): relayed as it is


def server_name(record: bytes) -> str | None:
    """The server name (SNI) of a TLS ClientHello record; None when there is none."""
    try:
        if len(record) < 5 or record[0] != 0x16 or record[5] != 0x01:
            return None
        at = 5 + 4 + 2 + 32  # record header, handshake header, version, random
        at += 1 + record[at]  # session id
        at += 2 + int.from_bytes(record[at : at + 2], "big")  # cipher suites
        at += 1 + record[at]  # compression methods
        end = at + 2 + int.from_bytes(record[at : at + 2], "big")
        at += 2
        while at + 4 <= end:
            kind = int.from_bytes(record[at : at + 2], "big")
            size = int.from_bytes(record[at + 2 : at + 4], "big")
            body = record[at + 4 : at + 4 + size]
            if kind == 0:  # server_name: list length, type, name length, name
                length = int.from_bytes(body[3:5], "big")
                return body[5 : 5 + length].decode("ascii")
            at += 4 + size
    except (IndexError, UnicodeDecodeError):
        return None
    return None


async def _relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while chunk := await src.read(CHUNK):
                dst.write(chunk)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()
        except (OSError, RuntimeError):
            pass

    try:
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
    finally:
        with contextlib.suppress(Exception):
            up_writer.close()


@contextlib.asynccontextmanager
async def running(settings: Settings) -> AsyncIterator[EgressProxy]:
    """The proxy listening in this event loop while the block runs."""
    proxy = EgressProxy(settings)
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.stop()
