"""The OpenAPI document as the API really answers: every error is application/problem+json
(api/problems.py), and the answers any route of a kind may give are listed here, once:
401 and 429 wherever a credential is needed, 400, 413 and 422 wherever a body is read."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI

from api.schemas import Problem

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
CREDENTIAL = (401, 429)
BODY = (400, 413, 422)


def install(app: FastAPI) -> None:
    built = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = problems_documented(built())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def problems_documented(spec: dict[str, Any]) -> dict[str, Any]:
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    schemas["Problem"] = Problem.model_json_schema()
    # FastAPI's own validation error shape is never sent: api/problems.py answers instead.
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for operations in spec.get("paths", {}).values():
        for operation in operations.values():
            responses = operation["responses"]
            added = (CREDENTIAL if "security" in operation else ()) + (
                BODY if "requestBody" in operation else ()
            )
            for status in added:
                responses.setdefault(str(status), {})
            for status, response in responses.items():
                if int(status) >= 400:
                    response["content"] = PROBLEM
                    response["description"] = HTTPStatus(int(status)).phrase
    return spec


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method the API documents for a path: a 405's Allow header (Starlette's names the
    methods of the first route that matched the path only)."""
    methods: set[str] = set()
    for template, operations in app.openapi().get("paths", {}).items():
        if re.fullmatch(re.sub(r"\\{[^/]+\\}", "[^/]+", re.escape(template)), path):
            methods.update(m.upper() for m in operations)
    return sorted(methods)
