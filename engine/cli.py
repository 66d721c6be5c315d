"""The ``sandbox-engine`` command. Later subcommands hang off the same parser."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from engine.errors import EngineError
from engine.settings import Settings

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    import psycopg

    from engine.sandboxes.service import SandboxService
    from engine.sandboxes.stacks import StackManager
    from engine.store import Client, SandboxRow


def _cmd_doctor(settings: Settings, _: argparse.Namespace) -> int:
    from engine.host.doctor import render, run_checks

    checks = run_checks(settings)
    print(render(checks))
    return 0 if all(c.ok for c in checks) else 1


def _cmd_env(settings: Settings, _: argparse.Namespace) -> int:
    from engine.host.toolenv import pulumi_env

    env = pulumi_env(settings)
    env["SANDBOX_DATABASE_URL"] = settings.database_url.get_secret_value()
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_images_build(settings: Settings, args: argparse.Namespace) -> int:
    from engine.host.images import ImageBuildError, build

    try:
        build(
            settings.project_dir / "images",
            only=args.only,
            base_image=args.base_image,
            force=args.force,
            progress=lambda line: print(line, flush=True),
        )
    except (ImageBuildError, ValueError) as exc:
        print(f"sandbox-engine images build: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_templates_validate(settings: Settings, args: argparse.Namespace) -> int:
    from pathlib import Path

    from engine.errors import TemplateError
    from engine.model.templates import load

    files = [Path(f) for f in args.files] or sorted(settings.templates_path.glob("*.yaml"))
    failed = 0
    for file in files:
        try:
            template = load(file)
        except TemplateError as exc:
            failed += 1
            print(exc, file=sys.stderr)
        except OSError as exc:
            failed += 1
            print(f"{file}: cannot read: {exc.strerror}", file=sys.stderr)
        else:
            print(f"{file}: OK ({template.name})")
            for warning in template.warnings:
                print(f"warning: {warning}", file=sys.stderr)
    return 1 if failed else 0


def _manager(settings: Settings) -> StackManager:
    from engine.sandboxes.stacks import StackManager

    return StackManager(settings)


def _cmd_preview(settings: Settings, args: argparse.Namespace) -> int:
    from engine.model.templates import find

    preview = _manager(settings).preview_template(
        find(settings.templates_path, args.template), settings.templates_path
    )
    for change in preview.changes:
        props = f" ({', '.join(change.properties)})" if change.properties else ""
        print(f"{change.op:8} {change.type} {change.name}{props}")
    print("summary: " + ", ".join(f"{n} {op}" for op, n in sorted(preview.summary.items())))
    return 0


def _with_service(settings: Settings, work: Callable[..., Awaitable[int]]) -> int:
    """Run ``work(service, client)`` on the same service the API uses (same rows and events),
    as the local CLI's admin identity; running jobs finish before the command returns."""
    import asyncio

    from psycopg_pool import AsyncConnectionPool, ConnectionPool

    from engine import store
    from engine.migrate import migrate
    from engine.sandboxes.service import SandboxService

    async def main() -> int:
        url = settings.database_url.get_secret_value()
        await asyncio.to_thread(migrate, url)
        pool = ConnectionPool(url, min_size=1, max_size=4, open=False)
        await asyncio.to_thread(pool.open, True, 30.0)
        reads = AsyncConnectionPool(url, min_size=1, max_size=2, open=False)
        await reads.open(wait=True, timeout=30.0)
        manager = await asyncio.to_thread(_manager, settings)
        service = SandboxService(settings, pool, manager, reads)
        try:
            await service.start()
            client = await service.db(store.local_client)
            return await work(service, client)
        finally:
            await service.close(wait_all=True)
            await reads.close()
            await asyncio.to_thread(pool.close)

    return asyncio.run(main())


async def _follow(
    service: SandboxService, client: Client, sandbox_id: str, until: tuple[str, ...]
) -> SandboxRow:
    """Print the sandbox's events as progress lines until it reaches one of ``until``."""
    import asyncio

    last = 0
    while True:
        for event in await service.events(sandbox_id, after=last):
            last = event.id
            print(f"[{sandbox_id}] {event.kind}: {event.message}", file=sys.stderr, flush=True)
        row = await service.get(client, sandbox_id)
        if row.state in until:
            return row
        await asyncio.sleep(0.3)


def _cmd_sandbox_create(settings: Settings, args: argparse.Namespace) -> int:
    from engine.sandboxes.service import CreateRequest

    async def work(service: SandboxService, client: Client) -> int:
        row, _ = await service.create(client, CreateRequest(template=args.template, ttl=args.ttl))
        row = await _follow(service, client, row.id, ("running", "failed"))
        if args.json:  # what the API shows
            print(json.dumps(json.loads(await service.view(client, row.id)), indent=2))
        else:
            print(
                f"sandbox {row.id} {row.state} ({row.template}), expires "
                f"{row.expires_at:%Y-%m-%d %H:%M} UTC; terminal: docker exec -it "
                f"{(row.outputs or {}).get('workspace')} bash -l"
            )
        return 0 if row.state == "running" else 1

    return _with_service(settings, work)


def _cmd_sandbox_list(settings: Settings, args: argparse.Namespace) -> int:
    async def work(service: SandboxService, client: Client) -> int:
        for row in await service.list_for(client, state=args.state):
            print(
                f"{row.id:12} {row.state:10} {row.template:16} "
                f"expires {row.expires_at:%Y-%m-%d %H:%M}"
            )
        return 0

    return _with_service(settings, work)


def _cmd_sandbox_destroy(settings: Settings, args: argparse.Namespace) -> int:
    async def work(service: SandboxService, client: Client) -> int:
        await service.destroy(client, args.id)
        row = await _follow(service, client, args.id, ("destroyed", "failed", "expired"))
        print(f"sandbox {args.id} {row.state}")
        return 0 if row.state != "failed" else 1

    return _with_service(settings, work)


def _cmd_reap(settings: Settings, args: argparse.Namespace) -> int:
    from engine.sandboxes.reaper import Reaper

    async def work(service: SandboxService, client: Client) -> int:
        reaper = Reaper(service, interval=settings.reap_interval or 15)
        if args.once:
            ids = await reaper.run_once(force=True)
            print(
                f"reaping {len(ids)} expired sandbox(es)" + (f": {', '.join(ids)}" if ids else "")
            )
            return 0  # the destroy jobs finish before the command returns
        await reaper.run_forever()
        return 0

    return _with_service(settings, work)


def _connect(settings: Settings) -> psycopg.Connection:
    import psycopg

    from engine.migrate import migrate

    url = settings.database_url.get_secret_value()
    migrate(url)
    return psycopg.connect(url)


def _cmd_migrate(settings: Settings, args: argparse.Namespace) -> int:
    from engine.migrate import migrate

    applied = migrate(settings.database_url.get_secret_value())
    print("applied: " + ", ".join(applied) if applied else "schema is up to date")
    return 0


def _cmd_keys_create(settings: Settings, args: argparse.Namespace) -> int:
    from engine.store import Role, create_client

    with _connect(settings) as conn:
        client, key = create_client(conn, name=args.name, role=Role(args.role))
    if args.json:
        print(json.dumps({"id": client.id, "name": client.name, "role": client.role, "key": key}))
    else:
        print(f"key for {client.name} ({client.role}, id {client.id}); shown once:\n{key}")
    return 0


def _cmd_keys_list(settings: Settings, args: argparse.Namespace) -> int:
    from engine.store import list_clients

    with _connect(settings) as conn:
        for c in list_clients(conn):
            state = f"revoked {c.revoked_at:%Y-%m-%d %H:%M}" if c.revoked_at else "live"
            used = f"{c.last_used_at:%Y-%m-%d %H:%M}" if c.last_used_at else "never"
            print(f"{c.id:4} {c.key_prefix}…  {c.role:6}  {state:22} used {used:16} {c.name}")
    return 0


def _cmd_keys_revoke(settings: Settings, args: argparse.Namespace) -> int:
    from engine import first_admin
    from engine.store import revoke_client

    with _connect(settings) as conn:
        if not revoke_client(conn, args.id):
            print(f"sandbox-engine: no live key with id {args.id}", file=sys.stderr)
            return 1
        path = settings.state_path / first_admin.FILE_NAME
        if first_admin.forget_if_revoked(conn, path, args.id):
            print(f"{path} held it: removed")
    print(f"key {args.id} revoked")
    return 0


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app
    from api.terminal import MAX_FRAME
    from engine import first_admin
    from engine.migrate import migrate

    # A fresh database (a first deploy) gets its schema before the first admin key is made.
    migrate(settings.database_url.get_secret_value())
    with _connect(settings) as conn:
        print(first_admin.settle(conn, settings.state_path / first_admin.FILE_NAME), flush=True)

    app = create_app(settings)

    class Server(uvicorn.Server):
        """uvicorn's server, telling the engine at once when a stop signal arrives: the
        Pulumi runs it has going may end before uvicorn gets to the lifespan's shutdown, and
        one that ends then was cut short by the stop, not failed."""

        def handle_exit(self, sig: int, frame: Any) -> None:
            service = getattr(app.state, "service", None)
            if service is not None:
                service.begin_stop()
            super().handle_exit(sig, frame)

    server = Server(
        uvicorn.Config(
            app,
            host=args.host or settings.listen_host,
            port=args.port or settings.listen_port,
            log_level="info",
            ws_max_size=MAX_FRAME,
            # Requests in flight (a submit's archive, say) get the stop's time too.
            timeout_graceful_shutdown=max(1, int(settings.stop_timeout)),
        )
    )
    try:
        server.run()
    finally:
        # A second Ctrl-C skips the lifespan's shutdown: no Pulumi run outlives the engine.
        service = getattr(app.state, "service", None)
        if service is not None:
            service.stacks.terminate_runs()
    return 0


def _metrics_app(*registries: Any) -> Any:
    """An ASGI app answering /metrics with the registries' metrics (Prometheus text)."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        found = scope["path"] == "/metrics"
        body = b"".join(generate_latest(r) for r in registries) if found else b""
        kind = CONTENT_TYPE_LATEST.encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200 if found else 404,
                "headers": [(b"content-type", kind)],
            }
        )
        await send({"type": "http.response.body", "body": body})

    return app


def _cmd_gateway(settings: Settings, _: argparse.Namespace) -> int:
    """The AI gateway as a process of its own (the compose file runs it on the host's network
    beside the API), with its /metrics on 127.0.0.1 only."""
    import asyncio
    import signal

    import uvicorn

    from engine.ai import gateway as ai_gateway
    from engine.egress import proxy as egress_proxy
    from engine.migrate import migrate

    migrate(settings.database_url.get_secret_value())  # the API may not have started yet

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with (
            ai_gateway.running(settings) as gateway,
            egress_proxy.running(settings) as egress,
        ):
            print(f"AI gateway on {settings.gateway_host}:{gateway.port}", flush=True)
            print(f"egress proxy on {settings.gateway_host}:{egress.port}", flush=True)
            metrics = None
            if settings.gateway_metrics_port:
                app = _metrics_app(gateway.metrics.registry, egress.registry)
                metrics = ai_gateway.QuietServer(
                    uvicorn.Config(
                        app,
                        host="127.0.0.1",
                        port=settings.gateway_metrics_port,
                        lifespan="off",
                        log_level="warning",
                    )
                )
                serving = asyncio.create_task(metrics.serve())
            await stop.wait()
            if metrics is not None:
                metrics.should_exit = True
                await serving

    asyncio.run(main())
    return 0


def _cmd_edge(settings: Settings, args: argparse.Namespace) -> int:
    from engine.host.edge import Edge

    edge = Edge(settings)
    if args.edge_command == "start":
        print(edge.start())
    elif args.edge_command == "stop":
        print("traefik stopped" if edge.stop() else "traefik was not running")
    else:
        up = edge.healthy()
        print(f"traefik {'answers' if up else 'does not answer'} at {edge.url}")
        return 0 if up else 1
    return 0


def _cmd_firewall(settings: Settings, args: argparse.Namespace) -> int:
    from engine.host import firewall

    try:
        if args.firewall_command == "node":
            from engine.host import node_firewall

            if not args.engine_address:
                print("firewall node: --engine-address is required", file=sys.stderr)
                return 2
            changed = node_firewall.apply(
                args.engine_address, args.gateway_port or settings.gateway_port, tuple(args.block)
            )
            print("\n".join(changed) if changed else "node firewall: in place", flush=True)
        elif args.firewall_command == "apply":
            while True:
                changed = firewall.apply()
                print("\n".join(changed) if changed else "firewall: in place", flush=True)
                if not args.every:
                    break
                time.sleep(args.every)  # a host reboot or a flush loses the rules
        elif args.firewall_command == "remove":
            firewall.remove()
            print("firewall: removed")
        else:
            missing = firewall.problems()
            print("\n".join(missing) if missing else "firewall: in place")
            return 1 if missing else 0
    except (firewall.FirewallError, RuntimeError, ValueError) as exc:
        print(f"firewall: {exc}", file=sys.stderr)
        return 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sandbox-engine",
        description="Disposable Linux workspaces, one Pulumi stack per sandbox.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("doctor", help="check every component; exit 1 when one is missing").set_defaults(
        func=_cmd_doctor
    )
    sub.add_parser(
        "env", help="print shell exports for pulumi, traefik and the project's database"
    ).set_defaults(func=_cmd_env)
    edge = sub.add_parser("edge", help="the local Traefik in front of the API and sandboxes")
    edge.add_argument("edge_command", choices=["start", "stop", "status"])
    edge.set_defaults(func=_cmd_edge)
    fw = sub.add_parser(
        "firewall", help="the host rules that keep sandboxes off the host (needs root)"
    )
    fw.add_argument("firewall_command", choices=["apply", "check", "remove", "node"])
    fw.add_argument(
        "--engine-address",
        default="",
        help="node: the engine's address, whose AI gateway the node's sandboxes may reach",
    )
    fw.add_argument("--gateway-port", type=int, default=0, help="node: the AI gateway's port")
    fw.add_argument(
        "--block",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="node: an address or network its sandboxes may not reach (repeatable)",
    )
    fw.add_argument(
        "--every", type=float, default=0, metavar="SECONDS", help="apply: again every SECONDS"
    )
    fw.set_defaults(func=_cmd_firewall)
    images = sub.add_parser("images", help="workspace and service images")
    images_sub = images.add_subparsers(dest="images_command", required=True, metavar="ACTION")
    build = images_sub.add_parser("build", help="build the images that changed, in order")
    build.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="build only this image (and what it starts FROM); repeatable",
    )
    build.add_argument(
        "--base-image",
        default="sandbox-base:bookworm",
        help="image the base images start FROM (e.g. debian:bookworm online)",
    )
    build.add_argument("--force", action="store_true", help="rebuild even when unchanged")
    build.set_defaults(func=_cmd_images_build)
    templates = sub.add_parser("templates", help="sandbox templates")
    templates_sub = templates.add_subparsers(
        dest="templates_command", required=True, metavar="ACTION"
    )
    validate = templates_sub.add_parser("validate", help="check template files; exit 1 on errors")
    validate.add_argument("files", nargs="*", help="files (default: every template)")
    validate.set_defaults(func=_cmd_templates_validate)

    preview = sub.add_parser("preview", help="what a new sandbox would create (creates nothing)")
    preview.add_argument("--template", required=True)
    preview.set_defaults(func=_cmd_preview)

    sandbox = sub.add_parser("sandbox", help="create, list and destroy sandboxes")
    sandbox_sub = sandbox.add_subparsers(dest="sandbox_command", required=True, metavar="ACTION")
    create = sandbox_sub.add_parser("create", help="create a sandbox and wait until it runs")
    create.add_argument("--template", required=True)
    create.add_argument("--ttl", help="time to live, e.g. 2h (default: the template's)")
    create.add_argument("--json", action="store_true", help="print the sandbox as JSON")
    create.set_defaults(func=_cmd_sandbox_create)
    slist = sandbox_sub.add_parser("list", help="sandboxes, newest first")
    slist.add_argument(
        "--state",
        # engine.store.SandboxState's values, spelled out: importing the store (psycopg) would
        # add ~0.1 s to every command.
        choices=[
            "creating",
            "pooled",
            "running",
            "repairing",
            "lost",
            "failed",
            "destroying",
            "destroyed",
            "expired",
        ],
    )
    slist.set_defaults(func=_cmd_sandbox_list)
    destroy = sandbox_sub.add_parser("destroy", help="destroy a sandbox and remove its stack")
    destroy.add_argument("id")
    destroy.set_defaults(func=_cmd_sandbox_destroy)

    reap = sub.add_parser("reap", help="destroy expired sandboxes (for cron or a timer)")
    reap.add_argument("--once", action="store_true", help="one pass, then exit")
    reap.set_defaults(func=_cmd_reap)
    sub.add_parser("migrate", help="apply pending database migrations").set_defaults(
        func=_cmd_migrate
    )
    keys = sub.add_parser("keys", help="API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    kcreate = keys_sub.add_parser("create", help="create a key; it is printed once")
    kcreate.add_argument("--name", required=True)
    kcreate.add_argument("--role", choices=["admin", "member"], default="member")
    kcreate.add_argument("--json", action="store_true", help='print {"key": ...} as JSON')
    kcreate.set_defaults(func=_cmd_keys_create)
    keys_sub.add_parser("list", help="every key (never the key itself)").set_defaults(
        func=_cmd_keys_list
    )
    krevoke = keys_sub.add_parser("revoke", help="revoke a key at once")
    krevoke.add_argument("id", type=int)
    krevoke.set_defaults(func=_cmd_keys_revoke)

    serve = sub.add_parser("serve", help="run the API service in the foreground")
    serve.add_argument("--host", help="listen address (default: SANDBOX_LISTEN_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default: SANDBOX_LISTEN_PORT)")
    serve.set_defaults(func=_cmd_serve)
    gateway = sub.add_parser(
        "gateway",
        help="run the AI gateway alone (when serve does not: SANDBOX_GATEWAY_SERVE=false)",
    )
    gateway.set_defaults(func=_cmd_gateway)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError names the variable and the problem
        print(f"sandbox-engine: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    try:
        code: int = args.func(settings, args)
    except EngineError as exc:
        print(f"sandbox-engine: {exc}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
