"""The engine's exceptions. Boundaries (CLI, HTTP) translate them once.

EngineError
├── TemplateError        a template file is invalid (file, field path, line)
├── NotFoundError        no such template or sandbox
├── ConflictError        an operation is already running on that sandbox's stack
└── StackError           a Pulumi operation failed (message without secrets)
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
