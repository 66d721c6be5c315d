"""The ``sandbox-engine`` command. Later subcommands hang off the same parser."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from engine.settings import Settings


def _cmd_doctor(settings: Settings, _: argparse.Namespace) -> int:
    from engine.doctor import render, run_checks

    checks = run_checks(settings)
    print(render(checks))
    return 0 if all(c.ok for c in checks) else 1


def _cmd_env(settings: Settings, _: argparse.Namespace) -> int:
    from engine.toolenv import pulumi_env

    env = pulumi_env(settings)
    env["SANDBOX_DATABASE_URL"] = settings.database_url.get_secret_value()
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")
    return 0


def _cmd_images_build(settings: Settings, args: argparse.Namespace) -> int:
    from engine.images import ImageBuildError, build

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


def _cmd_serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from api.app import create_app

    uvicorn.run(
        create_app(settings),
        host=args.host or settings.listen_host,
        port=args.port or settings.listen_port,
        log_level="info",
    )
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
    serve = sub.add_parser("serve", help="run the API service in the foreground")
    serve.add_argument("--host", help="listen address (default: SANDBOX_LISTEN_HOST)")
    serve.add_argument("--port", type=int, help="listen port (default: SANDBOX_LISTEN_PORT)")
    serve.set_defaults(func=_cmd_serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings()
    except ValueError as exc:  # pydantic's ValidationError names the variable and the problem
        print(f"sandbox-engine: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    code: int = args.func(settings, args)
    return code


if __name__ == "__main__":
    sys.exit(main())
