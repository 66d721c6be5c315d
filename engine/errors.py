"""The engine's exceptions. Boundaries (CLI, HTTP) translate them once.

EngineError
├── TemplateError        a template file is invalid (file, field path, line)
├── NotFoundError        no such template or sandbox
├── ConflictError        an operation is already running on that sandbox's stack
├── StackError           a Pulumi operation failed (message without secrets)
└── Interrupted          an operation cut short by the engine's own stop: not a failure of
                         the sandbox; the next start's recovery finishes it
"""

from __future__ import annotations


class EngineError(Exception):
    pass


class TemplateError(EngineError):
    """Every problem found in one template file, each with its field path and line."""

    def __init__(self, file: str, problems: list[tuple[str, int | None, str]]) -> None:
        self.file = file
        self.problems = problems
        lines = [f"{file}:{line or '?'}: {path or '(top)'}: {msg}" for path, line, msg in problems]
        super().__init__("\n".join(lines))


class NotFoundError(EngineError):
    pass


class ConflictError(EngineError):
    pass


class StackError(EngineError):
    pass


class Interrupted(EngineError):
    pass


def describe(exc: BaseException) -> str:
    """An exception in the words a user reads on a sandbox: the engine's own message, Docker's
    explanation without its HTTP client's request line, or how a Pulumi run ended."""
    import docker.errors
    from pulumi import automation as auto

    from engine.sandboxes.pulumi_cli import describe_command_error

    if isinstance(exc, EngineError):
        return str(exc)
    if isinstance(exc, auto.CommandError):
        return describe_command_error(exc)
    if isinstance(exc, docker.errors.APIError):
        why = exc.explanation or (exc.response.reason if exc.response is not None else "")
        return f"Docker answered {exc.status_code}: {why}" if why else f"Docker: {exc}"
    if isinstance(exc, docker.errors.DockerException):
        return f"Docker is not reachable ({type(exc).__name__})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
